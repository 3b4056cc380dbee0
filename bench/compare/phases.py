"""The workloads, measured the same way for every library: enqueue, drain, latency, memory, and
Redis commands per task; and the scale runs of django_tasks.

The harness (this process) only starts processes in the library's virtualenv, with the library's
own commands: ``peers/client.py`` to enqueue or make round trips, and the library's worker. It
detects completions by reading the counter every drain task increments, and counts Redis commands
with ``INFO commandstats``, from connections of its own whose commands it subtracts.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import redis

from bench.compare import processes, services
from bench.compare.libraries import REDIS_URL, Library, Pool

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
COUNTER_KEY = "bench:counter"  # peers/counter.py
COUNTER_DB = 1
#: How often the drain reads the counter: short, so that the first and last completions are timed
#: to within a few milliseconds.
POLL_SECONDS = 0.005
#: A drain in which no task finishes for this long is reported as stalled.
STALL_SECONDS = 60.0
#: The worker sits idle this long after the latency run before its memory is read.
IDLE_BEFORE_MEMORY = 3.0
CONN_MAX_AGE = "600"
#: Blocks of one-call enqueues and of LPUSHes alternated in one client process (the interleaved
#: ratio): ``ctx.tasks`` of each in all.
INTERLEAVED_BLOCKS = 10


@dataclass
class Context:
    """What every phase of the run shares."""

    port: int
    tasks: int
    latency_runs: int
    logs: Path
    workdir: Path
    dt_src: Path  # the checkout whose django_tasks is measured
    admin: redis.Redis = field(init=False)  # CONFIG RESETSTAT, INFO, FLUSHALL
    poller: redis.Redis = field(init=False)  # the counter's GETs, counted and subtracted

    def __post_init__(self) -> None:
        self.admin = services.client(self.port)
        self.poller = services.client(self.port, COUNTER_DB)

    @property
    def redis_url(self) -> str:
        return f"redis://{services.LOOPBACK}:{self.port}/0"

    def counter(self) -> int:
        return int(self.poller.get(COUNTER_KEY) or 0)

    def used_memory(self) -> int:
        """Bytes Redis holds, less its clients' buffers (which come and go with connections)."""
        info = self.admin.info("memory")
        return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))

    def reset_stats(self) -> None:
        self.admin.config_resetstat()

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the last reset, less the reset itself."""
        stats = self.admin.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        calls["config|resetstat"] = calls.get("config|resetstat", 1) - 1
        return {name: n for name, n in calls.items() if n > 0}


def deadlines(tasks: int, latency_runs: int) -> dict[str, float]:
    """Seconds each phase may take: generous for the slowest peer at these sizes."""
    return {
        "enqueue": max(60.0, tasks / 20),
        "drain": max(120.0, tasks / 10),
        "latency": 60.0 + latency_runs * 0.75,
        "client": 120.0,
    }


def per_task(calls: dict[str, int], tasks: int) -> dict[str, Any]:
    """Commands per task, in all and for the five most frequent commands."""
    total = sum(calls.values())
    top = sorted(calls.items(), key=lambda item: -item[1])[:5]
    return {
        "redis_commands": total,
        "redis_commands_per_task": total / tasks if tasks else None,
        "redis_commands_top": {name: round(n / tasks, 2) for name, n in top} if tasks else {},
    }


class Worker:
    """A library's worker: ``pool.copies`` processes of its command, started and stopped by us."""

    def __init__(self, session: Session, pool: Pool, log: Path) -> None:
        self.pool = pool
        self.log = log
        self.session = session
        name, *args = pool.command
        self.command = [
            services.venv_bin(session.lib.venv, name),
            *(arg.replace(REDIS_URL, session.ctx.redis_url) for arg in args),
        ]
        self.processes: list[Popen[bytes]] = []

    def start(self) -> None:
        self.log.unlink(missing_ok=True)
        for _ in range(self.pool.copies):
            self.processes.append(
                processes.start(self.command, cwd=PEERS, env=self.session.env, log=self.log)
            )

    def exited(self) -> int | None:
        """The status of the first process that exited, or None while all run."""
        for process in self.processes:
            if process.poll() is not None:
                return process.returncode
        return None

    def memory(self) -> dict[str, Any]:
        kib = processes.memory_kib([p.pid for p in self.processes])
        return {
            "status": "ok",
            "rss_mib": kib["rss_kib"] / 1024,
            "pss_mib": kib["pss_kib"] / 1024,
            "processes": kib["processes"],
        }

    def stop(self) -> list[int | None]:
        return [processes.stop(p, self.pool.graceful) for p in self.processes]

    def tail(self, lines: int = 12) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Session:
    """One library configuration, set up: its environment, its database, its client."""

    def __init__(self, lib: Library, ctx: Context, pg_name: str | None) -> None:
        self.lib = lib
        self.ctx = ctx
        self.limits = deadlines(ctx.tasks, ctx.latency_runs)
        self.env = self._environment(pg_name)
        self.bulk_api: str | None = None

    def _environment(self, pg_name: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        # django_tasks comes from the checkout measured, ahead of the one installed in .venv.
        path = [str(PEERS)] + ([str(self.ctx.dt_src)] if not self.lib.peer else [])
        env.update(
            PYTHONPATH=os.pathsep.join(path),
            PYTHONUNBUFFERED="1",
            BENCH_REDIS_URL=self.ctx.redis_url,
            BENCH_COUNTER_URL=f"redis://{services.LOOPBACK}:{self.ctx.port}/{COUNTER_DB}",
        )
        if self.lib.settings:
            env["DJANGO_SETTINGS_MODULE"] = self.lib.settings
        if self.lib.database:
            env["BENCH_CONN_MAX_AGE"] = CONN_MAX_AGE
        if self.lib.database == "postgres" and pg_name:
            env.update(
                BENCH_PG_NAME=pg_name,
                BENCH_PG_HOST=services.PG["host"],
                BENCH_PG_PORT=str(services.PG["port"]),
                BENCH_PG_USER=services.PG["user"],
            )
        elif self.lib.database == "sqlite":
            env["BENCH_SQLITE_PATH"] = str(self.ctx.workdir / f"{self.lib.key}.sqlite3")
        if not self.lib.peer:
            env["BENCH_BROKER_URL"] = self.ctx.redis_url if self.lib.redis_broker else ""
        env.update(self.lib.env)
        return env

    def client(self, mode: str, *options: str, deadline: float | None = None) -> dict[str, Any]:
        """Run peers/client.py in the library's virtualenv; its figures, or why there are none."""
        deadline = deadline or self.limits["client"]
        command = [str(services.venv_python(self.lib.venv)), str(PEERS / "client.py")]
        command += [self.lib.adapter, mode, "--deadline", str(deadline), *options]
        errors = self.ctx.logs / f"{self.lib.key}-client.log"
        status, out = processes.run(
            command, cwd=PEERS, env=self.env, timeout=deadline + 60, errors=errors
        )
        if status is None:
            return {"status": "overran", "detail": f"client {mode}: {out}"}
        last = out.strip().splitlines()[-1:] if out.strip() else []
        if status != 0 or not last:
            why = tail(errors.read_text(errors="replace"), 3) if errors.exists() else ""
            return {"status": "failed", "detail": f"client {mode} exited with {status}: {why}"}
        return dict(json.loads(last[0]))

    def prepare(self) -> dict[str, Any]:
        """The versions of the library, and its tables created; raises when it cannot run."""
        versions = self.client("versions")
        if "status" in versions:
            raise RuntimeError(versions["detail"])
        self.bulk_api = versions.get("bulk_api")
        if self.lib.database:
            migrated = self.client("migrate", deadline=300)
            if migrated["status"] != "ok":
                raise RuntimeError(f"migrate: {migrated['detail']}")
        self.reset()
        return versions

    def reset(self) -> None:
        """Empty queue, results and counter: flush our Redis server, purge the database."""
        self.ctx.admin.flushall()
        if self.lib.database:
            purged = self.client("purge", deadline=300)
            if purged["status"] != "ok":
                raise RuntimeError(f"purge: {purged['detail']}")

    # Phases -------------------------------------------------------------------------------------

    def enqueue(self, bulk: bool, count: int | None = None) -> dict[str, Any]:
        """Queue ``count`` drain tasks from one fresh client; rate, Redis commands and memory."""
        count = count or self.ctx.tasks
        memory_before = self.ctx.used_memory()
        self.ctx.reset_stats()
        options = ["--count", str(count), *(["--bulk"] if bulk else [])]
        figures = self.client("enqueue", *options, deadline=self.limits["enqueue"])
        figures.update(per_task(self.ctx.command_calls(), count))
        if self.lib.redis_broker:
            figures["redis_bytes_per_task"] = (self.ctx.used_memory() - memory_before) / count
        return figures

    def enqueue_interleaved(self) -> dict[str, Any]:
        """One-call enqueues and single ``LPUSH``es alternated in blocks in one fresh client.

        The ratio of the two rates is the enqueue's share of the one-round-trip limit, with the
        drift of the machine and the scheduler's placement of the process taken out: both
        loops share them (two fresh processes, even one right after the other, ran the same
        ``LPUSH`` loop at rates a tenth or more apart on a 2-core virtual machine). Redis-backed
        libraries only (a database broker's enqueue is no Redis round trip); what it queues is
        flushed before the next phase.
        """
        count = str(self.ctx.tasks)
        return self.client(
            "interleaved", "--count", count, "--blocks", str(INTERLEAVED_BLOCKS),
            deadline=self.limits["enqueue"],
        )  # fmt: skip

    def drain(self, worker: Worker, queued: int, window: int | None = None) -> dict[str, Any]:
        """Start the worker on a full queue; time the completions through the counter.

        The rate is between the first poll that saw a completion and the one that saw ``window``
        (default: all); ``per_second_incl_start`` counts from the worker's start.
        """
        target = window or queued
        if self.ctx.counter():
            return {"status": "failed", "detail": "the counter was not reset"}
        wal_start = services.wal_position() if self.lib.database == "postgres" else None
        self.ctx.reset_stats()
        polls = 0
        first: tuple[float, int] | None = None
        started = time.perf_counter()
        worker.start()
        stop_at = started + self.limits["drain"] * max(1.0, target / self.ctx.tasks)
        done, last_progress = 0, started
        while True:
            count = self.ctx.counter()
            polls += 1
            now = time.perf_counter()
            if count and first is None:
                first = (now, count)
            if count >= target:
                break
            if count > done:
                done, last_progress = count, now
            problem = self._drain_problem(worker, count, target, now, stop_at, last_progress)
            if problem:
                return problem
            time.sleep(POLL_SECONDS)
        calls = self.ctx.command_calls()
        wal = {} if wal_start is None else {"wal_bytes_per_task": wal_bytes(wal_start, target)}
        calls["get"] = calls.get("get", 0) - polls  # ours
        calls["incr"] = calls.get("incr", 0) - count  # the task bodies', the same for all
        assert first is not None
        return {
            "status": "ok",
            "queued": queued,
            "completed": count,
            "seconds": now - first[0],
            "per_second": (target - first[1]) / (now - first[0]) if now > first[0] else None,
            "per_second_incl_start": target / (now - started),
            "first_completion_s": first[0] - started,
            "counter_polls": polls,
            **per_task({k: v for k, v in calls.items() if v > 0}, target),
            **wal,
        }

    @staticmethod
    def _drain_problem(
        worker: Worker, count: int, target: int, now: float, stop_at: float, last_progress: float
    ) -> dict[str, Any] | None:
        """Why the drain must stop before its end, if it must."""
        exited = worker.exited()
        if exited is not None:
            detail = f"worker exited ({exited}) with {count}/{target} done"
        elif now > stop_at:
            detail = f"{count}/{target} done at the deadline"
        elif now - last_progress > STALL_SECONDS:
            detail = f"stalled: nothing finished for {STALL_SECONDS:.0f} s ({count}/{target} done)"
        else:
            return None
        return {
            "status": "failed" if exited is not None else "overran",
            "detail": detail,
            "completed": count,
            "worker_log_tail": worker.tail(),
        }

    def latency(self) -> dict[str, Any]:
        runs, idle = str(self.ctx.latency_runs), str(services.IDLE_SECONDS)
        return self.client(
            "latency", "--runs", runs, "--idle", idle, deadline=self.limits["latency"]
        )

    def measure(self, pool: Pool, run: int) -> dict[str, Any]:
        """Every figure of one row (this library, this pool) for one run."""
        figures: dict[str, Any] = {}
        label = f"{self.lib.key}/{pool.key}"
        started = time.monotonic()
        try:
            self._measure(pool, run, label, figures)
        finally:
            figures["row_seconds"] = round(time.monotonic() - started, 1)
        return figures

    def _measure(self, pool: Pool, run: int, label: str, figures: dict[str, Any]) -> None:
        self.reset()
        if self.lib.redis_broker:
            figures["enqueue_interleaved"] = self.enqueue_interleaved()
            say(label, "enqueue ÷ LPUSH, interleaved", figures["enqueue_interleaved"],
                "per_lpush", "x")  # fmt: skip
            self.reset()
        if self.bulk_api:
            figures["enqueue_bulk"] = self.enqueue(bulk=True)
            say(label, "bulk enqueue", figures["enqueue_bulk"], "per_second", "tasks/s")
            self.reset()
        figures["enqueue"] = self.enqueue(bulk=False)
        say(label, "enqueue", figures["enqueue"], "per_second", "tasks/s")
        if figures["enqueue"]["status"] != "ok":
            return
        worker = Worker(self, pool, self.ctx.logs / f"{self.lib.key}-{pool.key}-run{run}.log")
        try:
            figures["drain"] = self.drain(worker, self.ctx.tasks)
            say(label, "drain", figures["drain"], "per_second", "tasks/s")
            if figures["drain"]["status"] == "ok":
                figures["latency"] = self.latency()
                say(label, "latency p50", figures["latency"], "p50_ms", "ms")
                time.sleep(IDLE_BEFORE_MEMORY)
                figures["memory"] = worker.memory()
        finally:
            figures["worker_exit_status"] = worker.stop()
        if figures.get("latency", {}).get("status", "ok") != "ok":
            figures["latency"]["worker_log_tail"] = worker.tail()

    def scale(self, pool: Pool, queued: int, window: int) -> dict[str, Any]:
        """Drain rate over the first ``window`` completions with ``queued`` tasks queued."""
        self.reset()
        memory_before = self.ctx.used_memory()
        fill = self._fill(queued)
        if fill["status"] != "ok":
            return fill
        figures: dict[str, Any] = {"queued": queued, "window": window, "fill": fill}
        if self.lib.redis_broker:
            figures["redis_bytes_per_task"] = (self.ctx.used_memory() - memory_before) / queued
        worker = Worker(self, pool, self.ctx.logs / f"{self.lib.key}-scale-{queued}.log")
        try:
            figures["drain"] = self.drain(worker, queued, window)
        finally:
            worker.stop()
        self.reset()
        figures["status"] = figures["drain"]["status"]
        return figures

    def _fill(self, queued: int) -> dict[str, Any]:
        """Queue ``queued`` tasks from two clients side by side (bulk API if there is one)."""
        halves = [queued // 2, queued - queued // 2]
        deadline = max(600.0, queued / 400)
        options = ["--bulk"] if self.bulk_api else []

        def one(count: int) -> dict[str, Any]:
            return self.client("enqueue", "--count", str(count), *options, deadline=deadline)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as pool:
            parts = list(pool.map(one, halves))
        elapsed = time.perf_counter() - started
        bad = [p for p in parts if p.get("status") != "ok"]
        if bad:
            return {"status": bad[0].get("status", "failed"), "detail": bad[0].get("detail")}
        return {"status": "ok", "seconds": elapsed, "per_second": queued / elapsed}


def wal_bytes(start: str, tasks: int) -> float:
    """PostgreSQL WAL bytes per task since ``start``: the cost of durability per task.

    The whole server's WAL: anything else writing to it at the time is counted too.
    """
    return services.wal_bytes_since(start) / tasks


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def say(label: str, what: str, figures: dict[str, Any], key: str, unit: str) -> None:
    """One progress line."""
    if figures.get("status") != "ok":
        text = f"{figures.get('status', 'failed')} ({figures.get('detail', '')})"
    elif figures.get(key) is None:
        text = "n/a"
    else:
        value = figures[key]
        text = (
            f"{value:.3f}x" if unit == "x"
            else f"{value:,.1f} {unit}" if unit == "ms"
            else f"{value:,.0f} {unit}"
        )  # fmt: skip
    print(f"  [{label}] {what}: {text}", flush=True)
