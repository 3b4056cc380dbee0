"""Helpers of the fault tests: servers of their own to stop and restart, a producer, a reader.

The shared Redis and PostgreSQL servers of the machine are never stopped: a fault test starts a
private ``redis-server`` (with an append-only file, so a restart keeps the queue) or a private
PostgreSQL cluster (``initdb`` in a temporary directory), each on a free loopback port, and its
workers and producer run with ``tests.fault_settings`` pointed at them.

``python -m tests.faults produce ...`` is the producer: a process of its own that calls
``delay()`` in a loop and writes one JSON line per call (the task id, or the exception raised).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.services import in_ci
from tests.workers import wait_for

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
#: Where Debian and Ubuntu install the PostgreSQL server binaries (one directory per version).
PG_BIN_ROOT = Path("/usr/lib/postgresql")


def unavailable(reason: str) -> None:
    """Skip the test on a laptop that lacks a tool; fail it under CI=true, where nothing may."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def deadline_wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail, saying ``what``, on timeout."""
    return wait_for(predicate, timeout, interval, what=what)


# Redis ---------------------------------------------------------------------------------------


class PersistentRedis:
    """A redis-server of our own that keeps its data across restarts (append-only file).

    ``appendfsync always``: every write is on disk before Redis answers, so a message whose
    ``delay()`` returned survives a restart whatever the moment of the stop.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis-server.log"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) on the same port and directory; return once it answers."""
        command = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK,
                   "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                   "--dir", str(self.directory), "--daemonize", "no",
                   "--logfile", str(self.log_path)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline_wait(
            lambda: self.answers() or self.process is None or self.process.poll() is not None,
            15,
            "redis-server answers",
        )
        if not self.answers():
            raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: Redis syncs its append-only file and exits, as a service manager stops it."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def answers(self) -> bool:
        import redis

        client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")


# PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The directory of initdb and pg_ctl: DT_FAULT_PG_BIN, the newest Debian one, or PATH."""
    if os.environ.get("DT_FAULT_PG_BIN"):
        return Path(os.environ["DT_FAULT_PG_BIN"])
    versions = [p for p in PG_BIN_ROOT.glob("*/bin") if (p / "initdb").exists()]
    if versions:
        return max(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of our own: initdb in a temporary directory, a free loopback port.

    initdb and pg_ctl refuse to run as root: as root, they run as the ``postgres`` user through
    ``runuser``, in a directory that user owns. The cluster trusts local connections; it listens
    on 127.0.0.1 and on a socket in its own directory only.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="dt-faults-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log_path = self.root / "server.log"
        self.sockets.mkdir()
        owner = self._owner()
        if owner is not None:
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.running = False
        atexit.register(self.destroy)  # Should the test process die before its finalizers.

    @staticmethod
    def _owner() -> pwd.struct_passwd | None:
        """The user the server runs as: ``postgres`` when we are root, else ourselves (None)."""
        return pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def _run(self, *command: str, timeout: float = 60) -> str:
        prefix = ["runuser", "-u", "postgres", "--"] if self._owner() is not None else []
        done = subprocess.run(
            [*prefix, str(self.bindir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{command[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                f"{self.log_tail()}"
            )
        return done.stdout

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale", "C", "--no-sync", "--no-instructions")  # fmt: skip

    def start(self) -> None:
        """Start (or restart) on the same port and data directory; return once it accepts."""
        options = shlex.join(["-p", str(self.port), "-k", str(self.sockets),
                              "-c", f"listen_addresses={LOOPBACK}"])  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: every session is terminated, as when a server restarts."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def destroy(self) -> None:
        """Stop the server at once, whatever its state, and remove its directory. Idempotent."""
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            host=LOOPBACK, port=self.port, user="postgres", dbname=dbname,
            autocommit=True, connect_timeout=2,
        )  # fmt: skip

    def create_database(self, name: str) -> None:
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def require_private_postgres() -> Path:
    """The PostgreSQL binaries, or a skip (a failure under CI) saying what is missing."""
    bindir = postgres_bin()
    if bindir is None:
        unavailable("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root without a 'postgres' user to run initdb as")
        if shutil.which("runuser") is None:
            unavailable("running as root without runuser")
    return bindir


# The processes' settings -----------------------------------------------------------------------


def fault_env(
    database: dict[str, str], broker_url: str | None, lease_seconds: float, connect_timeout: float
) -> dict[str, str]:
    """The environment of a worker or producer with tests.fault_settings (see that module)."""
    env = dict(os.environ)
    env.pop("DT_TEST_WORKER", None)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.fault_settings",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        DT_FAULT_BROKER_URL=broker_url or "",
        DT_FAULT_LEASE_SECONDS=str(lease_seconds),
        DT_FAULT_CONNECT_TIMEOUT=str(connect_timeout),
        **{f"DT_FAULT_DB_{key.upper()}": value for key, value in database.items()},
    )
    return env


def migrate(env: dict[str, str]) -> None:
    """``manage.py migrate`` on the fault database the environment names."""
    done = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stdout}\n{done.stderr}")


class FaultDatabase:
    """Reads the fault database with plain SQL: the test process has no Django alias for it.

    Each read opens a connection of its own, so reads work again as soon as a restarted server
    accepts connections; ``None`` means the database could not be read right now.
    """

    def __init__(self, engine: str, name: str, postgres: PrivatePostgres | None = None) -> None:
        self.engine = engine
        self.name = name
        self.postgres = postgres

    def rows(self, query: str) -> list[tuple[Any, ...]] | None:
        try:
            if self.engine == "postgres":
                assert self.postgres is not None
                with self.postgres.connect(self.name) as conn:
                    return list(conn.execute(query).fetchall())
            with sqlite3.connect(self.name, timeout=10) as conn:
                return list(conn.execute(query).fetchall())
        except Exception:  # a server that is down reads as "not now"
            return None

    def executions(self) -> Counter[str] | None:
        """How many times each marker's task ran (the rows the tasks wrote)."""
        rows = self.rows("SELECT marker, COUNT(*) FROM testapp_execution GROUP BY marker")
        return None if rows is None else Counter({marker: n for marker, n in rows})

    def states(self) -> dict[str, str] | None:
        rows = self.rows("SELECT id, state FROM django_tasks_taskresult")
        return None if rows is None else dict(rows)

    def queued(self) -> int | None:
        """Messages in the database broker's table: ready, delayed or leased."""
        rows = self.rows("SELECT COUNT(*) FROM django_tasks_queuedmessage")
        return None if rows is None else int(rows[0][0])


# The producer ----------------------------------------------------------------------------------


class Producer:
    """``python -m tests.faults produce`` in a process of its own, read through its JSON lines."""

    def __init__(self, env: dict[str, str], out: Path, prefix: str, **options: float) -> None:
        """Start producing; ``options`` are the command's (``slow_every=100`` for --slow-every)."""
        self.out = out
        command = [sys.executable, "-m", "tests.faults", "produce", "--out", str(out),
                   "--prefix", prefix]  # fmt: skip
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        self.log_path = out.with_suffix(".log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def records(self) -> list[dict[str, Any]]:
        """Every complete line written so far."""
        if not self.out.exists():
            return []
        text = self.out.read_text()
        complete = text if text.endswith("\n") else text.rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line]

    def acked(self) -> dict[str, str]:
        """Marker -> task id of every call whose delay() returned."""
        return {r["marker"]: r["id"] for r in self.records() if "id" in r}

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "error" in r]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM: the producer finishes the call it is in, writes it down and exits 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _qualified(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def produce(args: argparse.Namespace) -> int:
    """Call delay() until SIGTERM; one JSON line per call, flushed at once."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.fault_settings")
    django.setup()
    from tests.testapp import tasks

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with open(args.out, "a", buffering=1) as out:
        number = 0
        while not stopping.is_set():
            number += 1
            slow = bool(args.slow_every) and number % args.slow_every == 0
            marker = f"{args.prefix}-{'slow' if slow else 'rec'}-{number}"
            started = time.monotonic()
            try:
                if args.through_outages:
                    seconds = args.slow_seconds if slow else 0.0
                    result = tasks.record_through_outages.delay(marker, seconds)
                elif slow:
                    result = tasks.slow_once.delay(marker, args.slow_seconds)
                else:
                    result = tasks.record.delay(marker)
            except Exception as exc:  # written down, for the test to judge
                seconds = round(time.monotonic() - started, 3)
                line = {"marker": marker, "error": _qualified(exc), "message": str(exc)[:500],
                        "seconds": seconds, "t": time.time()}  # fmt: skip
                out.write(json.dumps(line) + "\n")
                stopping.wait(args.error_pause)
                continue
            out.write(json.dumps({"marker": marker, "id": result.id, "t": time.time()}) + "\n")
            stopping.wait(args.pause)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    commands = parser.add_subparsers(dest="command", required=True)
    producer = commands.add_parser("produce", help="call delay() in a loop until SIGTERM")
    producer.add_argument("--out", required=True)
    producer.add_argument("--prefix", required=True)
    producer.add_argument("--pause", type=float, default=0.005, help="seconds between calls")
    producer.add_argument("--error-pause", type=float, default=0.2, help="seconds after an error")
    producer.add_argument("--slow-every", type=int, default=0, help="every Nth task is slow_once")
    producer.add_argument("--slow-seconds", type=float, default=1.0)
    producer.add_argument(
        "--through-outages",
        type=int,
        default=0,
        help="1: send record_through_outages (retried on database errors) instead of record",
    )
    args = parser.parse_args(argv)
    return produce(args)


if __name__ == "__main__":
    sys.exit(main())
