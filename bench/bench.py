"""Benchmark django_tasks: enqueue rate, drain rate and round-trip latency per broker.

    .venv/bin/python bench/bench.py [--brokers redis,sqlite,postgres] [--tasks 5000]
                                    [--latency-runs 200] [--results sqlite,postgres]

Each broker configuration gets fresh state: a Redis server of its own on a free loopback port,
a new SQLite file, a new PostgreSQL database. This process prepares and removes them; the
measuring is done by ``bench/driver.py`` in a child process per configuration (Django can be set
up only once per process). Figures are printed as a Markdown table and written to
``bench/results/latest.json``. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import atexit
import compileall
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (bench/bench.py), this file's directory is on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs

RESULTS_DIR = procs.ROOT / "bench" / "results"
LOOPBACK = "127.0.0.1"
#: The PostgreSQL server (loopback only); BENCH_PG_PORT and BENCH_PG_USER override the defaults.
PG = {
    "host": LOOPBACK,
    "port": int(os.environ.get("BENCH_PG_PORT", "5432")),
    "user": os.environ.get("BENCH_PG_USER", "postgres"),
}
PG_BENCH_DB = "bench_django_tasks"
CONN_MAX_AGE = 600
#: Lines of the table, in this order; key -> (heading, JSON phase, figure, unit).
COLUMNS = [
    ("enqueue/s", "enqueue", "per_second", "rate"),
    ("drain/s (processes)", "drain_process", "per_second", "rate"),
    ("drain/s incl. start", "drain_process", "per_second_incl_start", "rate"),
    ("drain/s (threads)", "drain_thread", "per_second", "rate"),
    ("WAL bytes per drained task", "drain_process", "wal_bytes_per_task", "rate"),
    ("latency p50 / p99 ms", "latency", ("p50_ms", "p99_ms"), "ms"),
    ("after-idle ms", "latency", "after_idle_ms", "ms"),
]


class ServiceMissing(Exception):
    """A service a requested configuration needs is not there."""


@dataclass
class Config:
    """One row of the table: a broker and the database that holds results (and the queue)."""

    key: str
    title: str
    broker: str  # "redis" or "database"
    database: str  # "sqlite" or "postgres"
    notes: list[str] = field(default_factory=list)


def configurations(brokers: list[str], results: list[str]) -> list[Config]:
    configs = []
    for broker in brokers:
        if broker == "redis":
            for db in results:
                configs.append(
                    Config(f"redis-{db}", f"Redis broker, results in {NAMES[db]}", "redis", db)
                )
        else:
            configs.append(
                Config(broker, f"database broker on {NAMES[broker]}", "database", broker)
            )
    sqlite = "SQLite file in WAL mode, IMMEDIATE transactions, 30 s timeout"
    for config in configs:
        database = "PostgreSQL" if config.database == "postgres" else sqlite
        config.notes.append(f"{database}, persistent connections (CONN_MAX_AGE={CONN_MAX_AGE})")
    return configs


NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


# Services ---------------------------------------------------------------------------------------


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def pg_connect(dbname: str = "postgres") -> Any:
    import psycopg

    return psycopg.connect(dbname=dbname, autocommit=True, connect_timeout=5, **PG)


def check_services(configs: list[Config]) -> None:
    """Fail early, with what to do, when a service a configuration needs is missing."""
    if any(c.broker == "redis" for c in configs) and not shutil.which("redis-server"):
        raise ServiceMissing(
            "redis-server is not on PATH: the redis configuration starts a Redis server of its "
            "own. Install Redis, or leave redis out of --brokers."
        )
    if any(c.database == "postgres" for c in configs):
        where = f"{PG['host']}:{PG['port']} (user {PG['user']})"
        if not port_open(PG["host"], PG["port"]):
            raise ServiceMissing(
                f"PostgreSQL is not answering on {where}: start it, or leave "
                "postgres out of --brokers and --results."
            )
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ServiceMissing("psycopg is not installed in this Python.") from exc
        try:
            pg_connect().close()
        except Exception as exc:
            raise ServiceMissing(f"cannot connect to PostgreSQL on {where}: {exc}") from exc


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path, logs: Path) -> Iterator[str]:
    """A Redis server of our own, without persistence; yields its URL, stops it at the end."""
    import redis

    for _attempt in range(3):  # Another process may take the port between probe and bind.
        port = free_port()
        process = procs.start(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
            ],
            log=logs / "redis-server.log",
            new_session=True,
        )
        client = redis.Redis(host=LOOPBACK, port=port, socket_connect_timeout=0.5)

        def answers(client: redis.Redis = client) -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        started = procs.wait_until(lambda p=process: answers() or p.poll() is not None, 10.0)
        if started and answers():
            break
        procs.stop(process)
    else:
        raise ServiceMissing(f"redis-server did not start; see {logs / 'redis-server.log'}")
    try:
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        client.close()
        procs.stop(process)


def drop_pg_database() -> None:
    from psycopg import sql

    with pg_connect() as conn:
        # FORCE: a killed worker may still hold a connection; the database must go regardless.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(PG_BENCH_DB))
        )


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one configuration, dropped at the end."""
    from psycopg import sql

    drop_pg_database()
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_BENCH_DB)))
    try:
        yield PG_BENCH_DB
    finally:
        drop_pg_database()


@contextlib.contextmanager
def environment(config: Config, workdir: Path, logs: Path) -> Iterator[dict[str, str]]:
    """The services of ``config``, fresh, as environment variables for bench/settings.py."""
    with contextlib.ExitStack() as stack:
        env = {
            "BENCH_DB": config.database,
            "BENCH_CONN_MAX_AGE": str(CONN_MAX_AGE),
            "BENCH_BROKER_URL": "",
            "BENCH_REDIS_DEDICATED": "0",
        }
        if config.database == "postgres":
            env.update(
                BENCH_PG_NAME=stack.enter_context(pg_database()),
                BENCH_PG_HOST=PG["host"],
                BENCH_PG_PORT=str(PG["port"]),
                BENCH_PG_USER=PG["user"],
            )
        else:
            path = workdir / f"{config.key}.sqlite3"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            env["BENCH_SQLITE_PATH"] = str(path)
        if config.broker == "redis":
            env.update(
                BENCH_BROKER_URL=stack.enter_context(redis_server(workdir, logs)),
                BENCH_REDIS_DEDICATED="1",
            )
        yield env


# Running a configuration --------------------------------------------------------------------------


def run_config(
    config: Config, args: argparse.Namespace, workdir: Path, logs: Path
) -> dict[str, Any]:
    """Measure one configuration in a driver process; its figures (partial if it failed)."""
    out = workdir / f"{config.key}.json"
    out.unlink(missing_ok=True)
    print(f"\n## {config.title}", flush=True)
    with environment(config, workdir, logs) as env:
        command = [
            procs.PYTHON,
            "-m",
            "bench.driver",
            "--name",
            config.key,
            "--tasks",
            str(args.tasks),
            "--latency-runs",
            str(args.latency_runs),
            "--out",
            str(out),
            "--logs",
            str(logs),
            "--phase-timeout",
            str(args.phase_timeout or 0),
            "--worker-loglevel",
            args.worker_loglevel,
        ]
        # Its own process group: if it overruns, one killpg() stops it and its workers.
        driver = procs.start(command, env=procs.child_env(**env), new_session=True)
        try:
            status = driver.wait(driver_budget(args))
        except subprocess.TimeoutExpired:
            status = None
            print(
                f"  [{config.key}] overran its {driver_budget(args):.0f} s budget: stopped",
                flush=True,
            )
        finally:
            procs.stop(driver)
    figures = json.loads(out.read_text()) if out.exists() else {"phases": {}}
    figures.update(title=config.title, notes=config.notes, driver_exit_status=status)
    return figures


def driver_budget(args: argparse.Namespace) -> float:
    """The whole configuration's deadline: the phases' own deadlines plus start-up margins."""
    if args.phase_timeout:
        return 6 * args.phase_timeout + 300
    enqueue, drain = max(60.0, args.tasks / 25), max(120.0, args.tasks / 10)
    latency = 60.0 + args.latency_runs * 0.25
    return 2 * (enqueue + 60) + 2 * (drain + 30) + latency + 180


# Reporting ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import django

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "sqlite": sqlite3.sqlite_version,
        "git": git_describe(),
        # Other work on the machine skews every figure: keep a trace of it.
        "load_average_at_start": os.getloadavg(),
    }
    for name in ("redis", "psycopg"):
        with contextlib.suppress(ImportError):
            info[f"{name}_py"] = __import__(name).__version__
    return info


def service_versions(info: dict[str, Any], configs: list[Config]) -> None:
    if any(c.broker == "redis" for c in configs):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        info["redis_server"] = out.stdout.strip()
    if any(c.database == "postgres" for c in configs):
        with pg_connect() as conn:
            info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def compile_bytecode() -> None:
    """Write the bytecode of the checkout's modules (django_tasks/, bench/), as pip does at install.

    The libraries under test run from bytecode that pip compiled when it installed them; ours run
    from the checkout. Where PYTHONDONTWRITEBYTECODE is set (it is on the benchmark's machines),
    Python caches no bytecode, and every process it starts would compile each of the project's
    modules again: a client's first ``delay()`` spent about 10 ms doing it, and a worker process
    kept about 1 MiB more memory. compileall writes the bytecode regardless of that variable.
    """
    bench = procs.ROOT / "bench"
    skip = {bench / "compare" / ".venvs", bench / "results"}  # The peers' own, and our output.
    for top in ("django_tasks", "bench"):
        for folder, dirs, files in os.walk(procs.ROOT / top):
            here = Path(folder)
            dirs[:] = [d for d in dirs if d != "__pycache__" and here / d not in skip]
            for name in files:
                if name.endswith(".py"):
                    compileall.compile_file(here / name, quiet=1)


def git_describe() -> str:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, text=True)
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "no commit"
    return f"{head}{' (uncommitted changes)' if git('status', '--porcelain') else ''}"


def cell(figures: dict[str, Any], phase: str, key: str | tuple[str, ...], unit: str) -> str:
    data = figures.get("phases", {}).get(phase)
    if not data:
        return "—"
    if data.get("status") != "ok":
        return str(data.get("status", "failed"))
    keys = key if isinstance(key, tuple) else (key,)
    values = [data.get(k) for k in keys]
    if any(v is None for v in values):
        return "—"
    if unit == "ms":
        return " / ".join(f"{v:.1f}" for v in values)
    return " / ".join(f"{v:,.0f}" for v in values)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ["configuration", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(COLUMNS)]
    for figures in results.values():
        row = [figures["title"], *(cell(figures, p, k, u) for _, p, k, u in COLUMNS)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def problems(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every phase that did not finish, with its reason: a table cell cannot say why."""
    found = []
    for key, figures in results.items():
        for phase, data in figures.get("phases", {}).items():
            if data.get("status") != "ok":
                found.append(
                    f"- {key} / {phase}: {data.get('status')}: "
                    f"{data.get('detail', 'see the output above')}"
                )
        if "error" in figures:
            found.append(f"- {key}: {figures['error']}")
        elif figures.get("driver_exit_status") is None:
            found.append(f"- {key}: stopped after overrunning its time budget")
        elif figures["driver_exit_status"] != 0:
            found.append(f"- {key}: the driver exited with status {figures['driver_exit_status']}")
    return found


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"Machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
        f"{info['cpu_model']}, {info['platform']}"
    )
    print(
        f"Python {info['python']}, Django {info['django']}, SQLite {info['sqlite']}, "
        f"redis-py {info.get('redis_py', '-')}, psycopg {info.get('psycopg_py', '-')}"
        + (f", {info['redis_server']}" if "redis_server" in info else "")
        + (f", PostgreSQL {info['postgresql']}" if "postgresql" in info else "")
    )
    print(f"Date: {info['date']}; code: {info['git']}")
    load = ", ".join(f"{x:.2f}" for x in info["load_average_at_start"])
    print(
        f"Load average (1, 5, 15 min) at start: {load}"
        + (
            "; at end: " + ", ".join(f"{x:.2f}" for x in info["load_average_at_end"])
            if "load_average_at_end" in info
            else ""
        )
    )


def report(
    info: dict[str, Any],
    args: argparse.Namespace,
    configs: list[Config],
    results: dict[str, dict[str, Any]],
) -> Path:
    print("\n# django_tasks benchmark\n")
    print_machine(info)
    print(
        f"Tasks per drain: {args.tasks}; latency round trips: {args.latency_runs}; workers: "
        "runworker -c 2; worker log level: " + args.worker_loglevel + "\n"
    )
    print(table(results))
    print()
    for config in configs:
        print(f"- {config.title}: {'; '.join(config.notes)}")
    trouble = problems(results)
    if trouble:
        print("\nPhases that did not complete:\n" + "\n".join(trouble))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "latest.json"
    payload = {
        "machine": info,
        "parameters": {
            "tasks": args.tasks,
            "latency_runs": args.latency_runs,
            "concurrency": 2,
            "worker_loglevel": args.worker_loglevel,
        },
        "configurations": results,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nFigures written to {path.relative_to(procs.ROOT)}")
    return path


# Command line -------------------------------------------------------------------------------------


def csv_choice(allowed: set[str]) -> Any:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        wrong = [v for v in items if v not in allowed]
        if wrong or not items:
            raise argparse.ArgumentTypeError(
                f"choose among {', '.join(sorted(allowed))}, comma-separated"
            )
        return list(dict.fromkeys(items))

    return parse


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def final_cleanup(workdir: Path, configs: list[Config]) -> None:
    """Stop what runs, drop the benchmark database, remove the SQLite files. Idempotent."""
    procs.stop_all()
    if any(c.database == "postgres" for c in configs):
        with contextlib.suppress(Exception):
            drop_pg_database()
    shutil.rmtree(workdir, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--brokers",
        type=csv_choice({"redis", "sqlite", "postgres"}),
        default=["redis", "sqlite", "postgres"],
        help="configurations to measure (default: redis,sqlite,postgres)",
    )
    parser.add_argument(
        "--results",
        type=csv_choice({"sqlite", "postgres"}),
        default=["sqlite"],
        help="where the redis configuration stores results (default: sqlite; "
        "sqlite,postgres measures both)",
    )
    parser.add_argument(
        "--tasks",
        type=positive,
        default=5000,
        help="no-op tasks enqueued and drained (default: 5000)",
    )
    parser.add_argument(
        "--latency-runs",
        type=positive,
        default=200,
        help="sequential round trips measured (default: 200)",
    )
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=None,
        help="deadline of every phase in seconds (default: scaled to --tasks)",
    )
    parser.add_argument(
        "--worker-loglevel",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="runworker -l (default: INFO, as in production)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    configs = configurations(args.brokers, args.results)
    try:
        check_services(configs)
    except ServiceMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    procs.exit_on_signals()
    compile_bytecode()
    info = machine()
    service_versions(info, configs)
    print_machine(info)
    logs = RESULTS_DIR / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    # The SQLite files live next to the results, on the project's disk, as a site's would.
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=RESULTS_DIR))
    # Registered after procs' own hook, so it runs first: processes, then database and files.
    atexit.register(final_cleanup, workdir, configs)
    results: dict[str, dict[str, Any]] = {}
    try:
        for config in configs:
            try:
                results[config.key] = run_config(config, args, workdir, logs)
            except ServiceMissing as exc:
                print(f"  [{config.key}] {exc}", file=sys.stderr)
                results[config.key] = {
                    "title": config.title,
                    "notes": config.notes,
                    "phases": {},
                    "error": str(exc),
                }
    except (KeyboardInterrupt, SystemExit):
        print(
            "\nbench: interrupted; stopping processes and removing the databases", file=sys.stderr
        )
        raise
    finally:
        final_cleanup(workdir, configs)
    info["load_average_at_end"] = os.getloadavg()
    report(info, args, configs, results)
    print(f"Worker logs: {logs.relative_to(procs.ROOT)}/")
    return 0 if not problems(results) else 1


if __name__ == "__main__":
    sys.exit(main())
