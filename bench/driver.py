"""Measure one broker configuration: bench/bench.py runs this once per configuration.

    python -m bench.driver --name NAME --tasks N --latency-runs M --out FILE --logs DIR

The configuration comes from the environment (see bench/settings.py). The phases run in order,
each with a deadline; the figures are written to ``--out`` after every phase, so that a run
stopped half-way still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django

from bench import procs

#: How often the drain phase counts finished results: short, so the wall time is close.
POLL_INTERVAL = 0.025
#: A drain in which no task finishes for this long is reported as stalled (a lost task comes
#: back after its 30 s lease, so give that a chance).
STALL_SECONDS = 60.0
#: How long a worker may take to log its banner.
READY_TIMEOUT = 60.0
CONCURRENCY = 2


class Worker:
    """A ``runworker`` subprocess logging to a file, started and stopped by us."""

    def __init__(self, pool: str, log: Path, *, burst: bool, loglevel: str) -> None:
        self.log = log
        self.command = [
            procs.PYTHON,
            "-m",
            "django",
            "runworker",
            "-c",
            str(CONCURRENCY),
            "--pool",
            pool,
            "-l",
            loglevel,
            *(["--burst"] if burst else []),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._seen_ready = False

    def start(self) -> None:
        if self.log.exists():
            self.log.unlink()
        self.process = procs.start(self.command, env=procs.child_env(), log=self.log)

    def exited(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def ready(self) -> bool:
        """Whether the banner ("... ready") was logged; reads only what is new in the log."""
        if self._seen_ready or not self.log.exists():
            return self._seen_ready
        with open(self.log, "rb") as log:
            log.seek(max(0, self._offset - 16))  # a word cut in half by the previous read
            chunk = log.read()
            self._offset = log.tell()
        self._seen_ready = b" ready" in chunk
        return self._seen_ready

    def stop(self, grace: float = 15.0) -> int | None:
        """Wait ``grace`` s for a --burst worker to leave by itself; else SIGTERM, then SIGKILL."""
        if self.process is None:
            return None
        if "--burst" in self.command:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        return procs.stop(self.process, grace)

    def tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.logs = Path(args.logs)
        self.figures: dict[str, Any] = {
            "name": args.name,
            "tasks": args.tasks,
            "latency_runs": args.latency_runs,
            "phases": {},
        }

    # Helpers ------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"  [{self.args.name}] {text}", flush=True)

    def record(self, phase: str, figures: dict[str, Any]) -> None:
        self.figures["phases"][phase] = figures
        Path(self.args.out).write_text(json.dumps(self.figures, indent=2, default=str))

    def deadline(self, phase: str) -> float:
        """Seconds a phase may take: --phase-timeout, or generous for the expected sizes."""
        if self.args.phase_timeout:
            return self.args.phase_timeout
        n, m = self.args.tasks, self.args.latency_runs
        return {
            "enqueue": max(60.0, n / 25),
            "drain": max(120.0, n / 10),
            "latency": 60.0 + m * 0.25,
        }[phase]

    @staticmethod
    def broker() -> Any:
        from django_tasks.backend import get_backend

        return get_backend().broker

    def queued(self) -> int:
        return int(self.broker().queue_lengths(["default"])["default"])

    def reset(self) -> None:
        """An empty queue and no results, whatever the previous phase left behind."""
        from django_tasks.models import DeadLetter, TaskResult

        self.broker().purge("default")
        if self.queued():
            # Leased messages of a worker we had to kill: purge() leaves them, by design.
            self._hard_reset_broker()
        dead = DeadLetter.objects.count()
        if dead:
            self.say(f"warning: {dead} dead letter(s) in the database (see the admin model)")
        TaskResult.objects.all().delete()
        left = self.queued()
        if left:
            raise RuntimeError(f"the queue still holds {left} message(s) after a reset")

    def _hard_reset_broker(self) -> None:
        from django.conf import settings

        from django_tasks.models import QueuedMessage

        url = settings.TASKS["default"]["OPTIONS"]["BROKER_URL"]
        if url is None:
            QueuedMessage.objects.all().delete()
        elif os.environ.get("BENCH_REDIS_DEDICATED") == "1":
            # Only ever the Redis server bench.py started for this run, never a shared one.
            import redis

            redis.Redis.from_url(url).flushdb()
        else:
            raise RuntimeError("leased messages left on a Redis server the benchmark does not own")

    def run_client(self, mode: str, deadline: float, *options: str) -> dict[str, Any]:
        """Run bench.client in a fresh process; its figures, or why there are none."""
        command = [procs.PYTHON, "-m", "bench.client", mode, "--deadline", str(deadline), *options]
        process = procs.start(command, env=procs.child_env(), stdout=subprocess.PIPE)
        try:
            # The client stops itself at the deadline; the margin covers its start-up.
            out, _ = process.communicate(timeout=deadline + 60)
        except subprocess.TimeoutExpired:
            procs.stop(process)
            return {"status": "overran", "detail": f"client killed after {deadline + 60:.0f} s"}
        procs.reap(process)
        if process.returncode != 0:
            return {
                "status": "failed",
                "detail": f"client exited with status {process.returncode} (traceback above)",
            }
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    # Phases -------------------------------------------------------------------------------------

    def migrate(self) -> None:
        from django.core.management import call_command

        started = time.perf_counter()
        call_command("migrate", verbosity=0, interactive=False)
        self.say(f"migrated the fresh database in {time.perf_counter() - started:.1f} s")

    def enqueue(self, phase: str) -> dict[str, Any]:
        n = self.args.tasks
        figures = self.run_client("enqueue", self.deadline("enqueue"), "--count", str(n))
        figures["queued_after"] = self.queued()
        if figures.get("status") == "ok" and figures["queued_after"] != n:
            figures.update(
                status="failed", detail=f"{n} delay() calls but {figures['queued_after']} queued"
            )
        self.record(phase, figures)
        self.say(f"{phase}: {describe(figures, 'per_second', 'tasks/s')}")
        return figures

    def drain(self, phase: str, pool: str) -> dict[str, Any]:
        queued = self.queued()
        if not queued:
            figures = {"status": "skipped", "detail": "nothing queued (enqueue failed)"}
            self.record(phase, figures)
            return figures
        worker = Worker(
            pool,
            self.logs / f"{self.args.name}-{phase}.log",
            burst=True,
            loglevel=self.args.worker_loglevel,
        )
        wal_start = checkpoint()
        started = time.perf_counter()
        worker.start()
        try:
            figures = self._wait_drained(worker, queued, started)
        finally:
            exit_status = worker.stop()
        if wal_start is not None and figures["status"] == "ok":
            figures["wal_bytes_per_task"] = wal_since(wal_start) / queued
        figures.update(
            queued=queued,
            pool=pool,
            concurrency=CONCURRENCY,
            worker_exit_status=exit_status,
            states=self._states(),
        )
        figures.update(self._run_window())
        if figures["status"] != "ok":
            figures["worker_log_tail"] = worker.tail()
        self.record(phase, figures)
        self.say(
            f"{phase}: {describe(figures, 'per_second', 'tasks/s')}, "
            f"incl. start {describe(figures, 'per_second_incl_start', 'tasks/s')}"
        )
        return figures

    def _wait_drained(self, worker: Worker, queued: int, started: float) -> dict[str, Any]:
        """Poll the SUCCESS count until it reaches ``queued``; a bounded loop."""
        from django_tasks.models import TaskResult
        from django_tasks.states import TaskState

        stop_at = started + self.deadline("drain")
        ready_s: float | None = None
        done, last_progress = 0, time.perf_counter()
        while True:
            now = time.perf_counter()
            if ready_s is None and worker.ready():
                ready_s = now - started
            exit_status = worker.exited()
            count = TaskResult.objects.filter(state=TaskState.SUCCESS).count()
            if count >= queued:
                wall = time.perf_counter() - started
                return {
                    "status": "ok",
                    "seconds_incl_start": wall,
                    "worker_ready_s": ready_s,
                    "per_second_incl_start": queued / wall,
                }
            if count > done:
                done, last_progress = count, now
            if exit_status is not None:
                return {
                    "status": "failed",
                    "done": count,
                    "worker_ready_s": ready_s,
                    "detail": f"worker exited ({exit_status}) with {count}/{queued} done",
                }
            if now > stop_at:
                return {
                    "status": "overran",
                    "done": count,
                    "worker_ready_s": ready_s,
                    "detail": f"{count}/{queued} done after {self.deadline('drain'):.0f} s",
                }
            if now - last_progress > STALL_SECONDS:
                return {
                    "status": "overran",
                    "done": count,
                    "worker_ready_s": ready_s,
                    "detail": f"stalled: no task finished for {STALL_SECONDS:.0f} s "
                    f"({count}/{queued} done)",
                }
            time.sleep(POLL_INTERVAL)

    @staticmethod
    def _states() -> dict[str, int]:
        """How many results are in each state: all SUCCESS after a good drain."""
        from django.db.models import Count

        from django_tasks.models import TaskResult

        rows = TaskResult.objects.values_list("state").annotate(n=Count("id")).order_by()
        return {state: n for state, n in rows}

    @staticmethod
    def _run_window() -> dict[str, Any]:
        """Throughput from the first task's start to the last task's end, from TaskResult."""
        from django.db.models import Max, Min

        from django_tasks.models import TaskResult
        from django_tasks.states import TaskState

        window = TaskResult.objects.filter(state=TaskState.SUCCESS).aggregate(
            first=Min("started_at"), last=Max("date_done")
        )
        if window["first"] is None or window["last"] is None:
            return {}
        seconds = (window["last"] - window["first"]).total_seconds()
        done = TaskResult.objects.filter(state=TaskState.SUCCESS).count()
        return {
            "seconds": seconds,
            "per_second": done / seconds if seconds > 0 else None,
            "first_started_at": window["first"].isoformat(),
            "last_done_at": window["last"].isoformat(),
        }

    def latency(self) -> dict[str, Any]:
        worker = Worker(
            "process",
            self.logs / f"{self.args.name}-latency.log",
            burst=False,
            loglevel=self.args.worker_loglevel,
        )
        worker.start()
        try:
            if not procs.wait_until(
                lambda: worker.ready() or worker.exited() is not None, READY_TIMEOUT
            ):
                figures = {"status": "failed", "detail": f"worker not ready in {READY_TIMEOUT} s"}
            elif worker.exited() is not None:
                figures = {"status": "failed", "detail": f"worker exited ({worker.exited()})"}
            else:
                runs = str(self.args.latency_runs)
                figures = self.run_client("latency", self.deadline("latency"), "--runs", runs)
        finally:
            exit_status = worker.stop()
        figures["worker_exit_status"] = exit_status
        if figures.get("status") != "ok":
            figures["worker_log_tail"] = worker.tail()
        self.record("latency", figures)
        self.say(
            f"latency: p50 {describe(figures, 'p50_ms', 'ms')}, p99 "
            f"{describe(figures, 'p99_ms', 'ms')}, after idle "
            f"{describe(figures, 'after_idle_ms', 'ms')}"
        )
        return figures

    def guarded(self, phase: str, step: Callable[[], Any]) -> bool:
        """Run one step; an exception fails that phase (recorded, traceback shown), not the run."""
        try:
            step()
            return True
        except Exception as exc:
            traceback.print_exc()
            self.record(phase, {"status": "failed", "detail": f"{type(exc).__name__}: {exc}"})
            self.say(f"{phase}: failed: {type(exc).__name__}: {exc}")
            return False

    def run(self) -> None:
        self.migrate()
        self.reset()
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("enqueue", lambda: self.enqueue("enqueue")),
            ("drain_process", lambda: self.drain("drain_process", "process")),
            ("reset", self.reset),
            # The thread pool needs N tasks queued again; this enqueue is a second sample.
            ("enqueue_again", lambda: self.enqueue("enqueue_again")),
            ("drain_thread", lambda: self.drain("drain_thread", "thread")),
            ("reset", self.reset),
            ("latency", self.latency),
        ]
        for phase, step in steps:
            if not self.guarded(phase, step) and phase == "reset":
                # Leftovers would make the next figures wrong: stop here instead.
                break


def checkpoint() -> str | None:
    """On PostgreSQL, a CHECKPOINT, then the WAL position; None elsewhere or when refused.

    The drain starts right after a checkpoint, as work does after each of the periodic
    checkpoints of a production server: the first change to each page after one writes the
    whole page to the WAL, so how many pages a task's writes touch shows in the WAL bytes per
    task. result_ids.py measures its writes the same way.
    """
    from django.db import DatabaseError, connection

    if connection.vendor != "postgresql":
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")  # A superuser's or pg_checkpoint's right.
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            return str(cursor.fetchone()[0])
    except DatabaseError as exc:
        print(f"driver: no WAL figure: {exc}", file=sys.stderr)
        return None


def wal_since(start: str) -> float:
    """Bytes of WAL written since ``start`` (by the whole server: the benchmark runs alone)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", [start])
        return float(cursor.fetchone()[0])


def describe(figures: dict[str, Any], key: str, unit: str) -> str:
    """A figure for the progress line; the status and reason when the phase did not finish."""
    if figures.get("status") != "ok":
        return f"{figures.get('status', 'failed')} ({figures.get('detail', 'no detail')})"
    value = figures.get(key)
    if value is None:
        return "n/a"
    return f"{value:,.1f} {unit}" if unit == "ms" else f"{value:,.0f} {unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--latency-runs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--logs", required=True)
    parser.add_argument("--phase-timeout", type=float, default=0)
    parser.add_argument("--worker-loglevel", default="INFO")
    args = parser.parse_args()
    procs.exit_on_signals()
    django.setup()
    try:
        Driver(args).run()
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
