"""What the comparison runs on: the peers' virtualenvs, a Redis server and PostgreSQL databases of
its own, and the physical reference (what one Redis client can do at all).

Only loopback addresses are used. The Redis server is started here on a free port, without
persistence, and stopped at the end: a Redis server already running (the test suite's on 6379)
is never touched. PostgreSQL databases are named ``bench_compare_<library>`` and dropped at the end.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from bench.compare import processes
from bench.compare.libraries import VENVS

HERE = Path(__file__).resolve().parent
VENV_DIR = HERE / ".venvs"
LOOPBACK = "127.0.0.1"
PG = {
    "host": LOOPBACK,
    "port": int(os.environ.get("BENCH_PG_PORT", "5432")),
    "user": os.environ.get("BENCH_PG_USER", "postgres"),
}
PIP_TIMEOUT = 900.0


class ServiceMissing(Exception):
    """A service or tool the comparison needs is not there."""


# Virtualenvs ------------------------------------------------------------------------------------


def venv_python(name: str | None) -> Path:
    """The interpreter of a peer's virtualenv; the project's own for django_tasks (None)."""
    return Path(sys.executable) if name is None else VENV_DIR / name / "bin" / "python"


def venv_bin(name: str | None, script: str) -> str:
    """A script of the virtualenv's bin/ (``python`` is the interpreter)."""
    python = venv_python(name)
    return str(python if script == "python" else python.parent / script)


def ensure_venv(name: str, logs: Path) -> str | None:
    """Build ``.venvs/<name>`` if missing or pinned differently; None, or why it failed."""
    path = VENV_DIR / name
    stamp = path / "bench-requirements.txt"
    wanted = "\n".join(VENVS[name]) + "\n"
    if stamp.exists() and stamp.read_text() == wanted and venv_python(name).exists():
        return None
    shutil.rmtree(path, ignore_errors=True)
    log = logs / f"venv-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    commands = [
        [sys.executable, "-m", "venv", str(path)],
        [
            str(venv_python(name)),
            *("-m", "pip", "install", "--disable-pip-version-check", "-q"),
            *VENVS[name],
        ],
    ]
    with open(log, "wb") as out:
        for command in commands:
            try:
                done = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, timeout=PIP_TIMEOUT
                )
            except subprocess.TimeoutExpired:
                return f"{' '.join(command[:4])} took over {PIP_TIMEOUT:.0f} s"
            if done.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                return f"building the virtualenv failed: {' '.join(tail)} (see {log})"
    stamp.write_text(wanted)
    return None


def ensure_venvs(names: list[str], logs: Path) -> dict[str, str | None]:
    """Build the missing virtualenvs, a few at a time (pip mostly waits on the network)."""
    VENV_DIR.mkdir(exist_ok=True)
    missing = [n for n in names if not (VENV_DIR / n / "bench-requirements.txt").exists()]
    if missing:
        print(f"Building virtualenvs under {VENV_DIR}: {', '.join(missing)}", flush=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(names, pool.map(lambda n: ensure_venv(n, logs), names), strict=True))


# The code measured -------------------------------------------------------------------------------


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_describe(checkout: Path) -> str:
    """The commit of ``checkout``, and whether its work tree has changes."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True)
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "no commit"
    return f"{head}{' (uncommitted changes)' if git('status', '--porcelain') else ''}"


def compile_bytecode(*folders: Path) -> None:
    """Write the bytecode of ``folders`` (django_tasks, the peers' adapters), as pip does.

    The peers run from bytecode that pip compiled when it installed them; django_tasks runs from
    a checkout. Where PYTHONDONTWRITEBYTECODE is set, Python caches no bytecode and every process
    compiles each module again (a client's first ``delay()`` spent about 10 ms on it, a worker
    kept about 1 MiB more). compileall writes the bytecode regardless of that variable.
    """
    for folder in folders:
        compileall.compile_dir(folder, quiet=1)


# Redis --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def client(port: int, db: int = 0) -> redis.Redis:
    """One dedicated, already connected connection to our Redis server."""
    conn = redis.Redis(host=LOOPBACK, port=port, db=db, single_connection_client=True)
    conn.ping()
    return conn


@contextlib.contextmanager
def redis_server(workdir: Path, logs: Path) -> Iterator[int]:
    """A Redis server of our own without persistence; yields its port, stops it at the end."""
    if not shutil.which("redis-server"):
        raise ServiceMissing("redis-server is not on PATH")
    for _attempt in range(3):  # another process may take the port between probe and bind
        port = free_port()
        command = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", ""]
        command += ["--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)]
        # No per-command latency histograms: CONFIG RESETSTAT frees them, which would skew the
        # memory-per-queued-task figure.
        command += ["--latency-tracking", "no"]
        process = processes.start(
            command, cwd=workdir, env=dict(os.environ), log=logs / "redis.log"
        )

        def answers(port: int = port) -> bool:
            try:
                client(port).close()
                return True
            except redis.RedisError:
                return False

        exited_or_up = processes.wait_until(lambda p=process: p.poll() is not None or answers(), 10)
        if exited_or_up and answers():
            break
        processes.stop(process)
    else:
        raise ServiceMissing(f"redis-server did not start; see {logs / 'redis.log'}")
    try:
        yield port
    finally:
        processes.stop(process)


# PostgreSQL ---------------------------------------------------------------------------------------


def pg_connect(dbname: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(dbname=dbname, autocommit=True, connect_timeout=5, **PG)


def check_postgres() -> None:
    try:
        pg_connect().close()
    except Exception as exc:
        raise ServiceMissing(f"PostgreSQL on {PG['host']}:{PG['port']}: {exc}") from exc


def pg_name(key: str) -> str:
    return "bench_compare_" + re.sub(r"[^a-z0-9]+", "_", key.lower())


def drop_database(name: str) -> None:
    from psycopg import sql

    with pg_connect() as conn:
        # FORCE: a killed worker may still hold a connection; the database must go regardless.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def create_database(name: str) -> None:
    from psycopg import sql

    drop_database(name)
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def wal_position() -> str:
    """A CHECKPOINT, then the server's WAL position: WAL written from here on can be measured.

    After a checkpoint the first change of each page writes the whole page, as in production;
    without one, the figure would depend on how recently the server checkpointed.
    """
    with pg_connect() as conn:
        conn.execute("CHECKPOINT")
        return str(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def wal_bytes_since(position: str) -> float:
    """Bytes of WAL the whole server wrote since ``position`` (other databases' writes too)."""
    with pg_connect() as conn:
        query = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)"
        return float(conn.execute(query, [position]).fetchone()[0])


def pg_version() -> str:
    with pg_connect() as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])


# The physical reference ---------------------------------------------------------------------------


def redis_benchmark(port: int, pipeline: int = 1, requests: int = 100_000) -> float | None:
    """``redis-benchmark -t lpush -c 1 [-P pipeline]``: LPUSH/s from one client."""
    if not shutil.which("redis-benchmark"):
        return None
    command = ["redis-benchmark", "-h", LOOPBACK, "-p", str(port), "-t", "lpush"]
    command += ["-n", str(requests), "-c", "1", "-q"]
    if pipeline > 1:
        command += ["-P", str(pipeline)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300).stdout
    found = re.findall(r"LPUSH: ([\d.]+) requests per second", out)
    return float(found[-1]) if found else None


def redis_py_lpush(port: int, count: int, batch: int = 0) -> float:
    """LPUSH/s from one redis-py client: one call per push, or pipelines of ``batch``."""
    conn = client(port)
    try:
        started = time.perf_counter()
        if batch:
            for first in range(0, count, batch):
                pipe = conn.pipeline(transaction=False)
                for _ in range(min(batch, count - first)):
                    pipe.lpush("bench:reference", b"x")
                pipe.execute()
        else:
            for _ in range(count):
                conn.lpush("bench:reference", b"x")
        elapsed = time.perf_counter() - started
        conn.delete("bench:reference")
        return count / elapsed
    finally:
        conn.close()


#: How long the latency client sits idle before its last, separate round trip (the "after idle"
#: figure); the physical reference pauses as long before its after-idle LPUSH.
IDLE_SECONDS = 3.0


def redis_py_lpush_after_idle(port: int, idle: float, samples: int = 3) -> float:
    """Milliseconds of one redis-py LPUSH made after the client sat idle ``idle`` seconds.

    The floor under every library's "after idle" round trip: a process (and, on a virtual
    machine, its CPU) woken after a pause answers slower than a busy one, whatever the library.
    The median of ``samples``, each after its own pause, on a connection made beforehand.
    """
    conn = client(port)
    try:
        conn.ping()
        times = []
        for _ in range(samples):
            time.sleep(idle)
            started = time.perf_counter()
            conn.lpush("bench:reference", b"x")
            times.append((time.perf_counter() - started) * 1000)
        conn.delete("bench:reference")
        return statistics.median(times)
    finally:
        conn.close()


#: The relay of relay_round_trips(): it moves each entry of one list to another, and stops on
#: "stop". Run with this harness's Python (redis-py is all it needs).
_RELAY = """
import sys, redis
conn = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), single_connection_client=True)
conn.ping()
print("ready", flush=True)
while True:
    _key, value = conn.blpop("bench:relay:in")
    if value == b"stop":
        break
    conn.lpush("bench:relay:out", value)
"""


def relay_round_trips(
    port: int, count: int = 200, idle: float = IDLE_SECONDS, samples: int = 3
) -> dict[str, float]:
    """Milliseconds of a bare round trip through a second process: busy (p50), and after idle.

    The caller LPUSHes, a relay process blocked in BLPOP pushes the value onto a second list, on
    which the caller blocks: four crossings between processes, as in every library's round trip
    (caller to Redis, Redis to worker, worker to Redis, Redis to caller), with no task, result
    store or library code. The floor under the latency figures; after a pause every process on
    the way is woken in turn, which shows in ``relay_after_idle_ms`` as in every library's "after
    idle" figure. The median of ``samples``, each after its own pause.
    """
    relay = processes.start(
        [sys.executable, "-c", _RELAY, LOOPBACK, str(port)],
        cwd=HERE,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
    )
    conn = client(port)
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != b"ready":
            raise RuntimeError("the relay process did not start")

        def round_trip() -> float:
            started = time.perf_counter()
            conn.lpush("bench:relay:in", b"x")
            if conn.blpop(["bench:relay:out"], timeout=10) is None:
                raise RuntimeError("the relay process did not answer in 10 s")
            return (time.perf_counter() - started) * 1000

        for _ in range(20):  # Warm-up.
            round_trip()
        busy = sorted(round_trip() for _ in range(count))
        after_idle = []
        for _ in range(samples):
            time.sleep(idle)
            after_idle.append(round_trip())
        conn.lpush("bench:relay:in", b"stop")
        relay.wait(timeout=10)
        return {
            "relay_round_trip_ms": busy[(len(busy) - 1) // 2],
            "relay_after_idle_ms": statistics.median(after_idle),
        }
    finally:
        conn.delete("bench:relay:in", "bench:relay:out")
        conn.close()
        processes.stop(relay)


def physical_reference(port: int, idle: float = IDLE_SECONDS) -> dict[str, Any]:
    """The reference rates and round trips, measured now on the same server."""
    figures: dict[str, Any] = {
        "redis_benchmark_lpush_c1": redis_benchmark(port),
        "redis_benchmark_lpush_c1_p100": redis_benchmark(port, pipeline=100),
        "redis_py_lpush_single": redis_py_lpush(port, 20_000),
        "redis_py_lpush_pipelined": redis_py_lpush(port, 100_000, batch=1000),
        "redis_py_after_idle_ms": redis_py_lpush_after_idle(port, idle),
        **relay_round_trips(port, idle=idle),
    }
    conn = client(port)
    conn.flushall()
    conn.close()
    figures["redis_py_round_trip_ms"] = 1000 / figures["redis_py_lpush_single"]
    return figures
