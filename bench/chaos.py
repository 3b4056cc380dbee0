"""Chaos benchmark: tasks keep flowing while workers are killed (and Redis is restarted).

    .venv/bin/python bench/chaos.py --broker redis|postgres|sqlite [--tasks 5000] [--kill-every 3]

N ``record_execution(n)`` tasks, each of which writes a row saying it ran, are sent while two
workers (``runworker -c 2``) run them. Every ``--kill-every`` seconds one of the two, at random,
is killed with SIGKILL (its pool processes die with it) and started again. With ``--broker redis``
the Redis server (a private one, with an append-only file) is also restarted once, mid-run. The
lease is short (``--lease``, 3 s) so that the tasks of a killed worker come back quickly.

At the end it prints the tasks sent, succeeded, lost (sent but not SUCCESS: must be 0) and
duplicated (ran more than once: only the tasks a killed worker had started may), and exits 1 if
any task was lost, 2 if a service is missing. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script (bench/chaos.py), this file's directory is on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.bench import PG, ServiceMissing, free_port, pg_connect, port_open

RESULTS_DIR = procs.ROOT / "bench" / "results"
LOGS = RESULTS_DIR / "chaos-logs"
LOOPBACK = "127.0.0.1"
PG_CHAOS_DB = "chaos_django_tasks"
CONCURRENCY = 2
WORKERS = 2
#: runworker's default PREFETCH: deliveries each pool process leases at a time.
PREFETCH = 4
#: How often the main loop looks at the results, and prints progress every so many looks.
POLL = 0.2
PROGRESS_EVERY = 25
#: Attempts of one delay() while the broker refuses it (a Redis restart takes well under 1 s).
SEND_ATTEMPTS = 150
SEND_RETRY_PAUSE = 0.2


# Services -------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of our own with an append-only file: a restart keeps the queues."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK,
                   "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                   "--daemonize", "no", "--dir", str(self.directory)]  # fmt: skip
        self.process = procs.start(command, log=LOGS / "redis-server.log", new_session=True)
        if not procs.wait_until(lambda: self.answers() or self.exited(), 15.0) or self.exited():
            raise ServiceMissing(f"redis-server did not start; see {LOGS / 'redis-server.log'}")

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits, as a service manager does."""
        if self.process is not None:
            procs.stop(self.process, grace=15.0)
            self.process = None

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def answers(self) -> bool:
        import redis

        client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def drop_pg_database() -> None:
    from psycopg import sql

    with pg_connect() as conn:
        # FORCE: a killed worker's connection may linger; the database must go regardless.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(PG_CHAOS_DB))
        )


def create_pg_database() -> None:
    from psycopg import sql

    drop_pg_database()
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_CHAOS_DB)))


def check_services(broker: str) -> None:
    if broker == "redis" and not shutil.which("redis-server"):
        raise ServiceMissing("redis-server is not on PATH: --broker redis starts its own.")
    if broker == "postgres":
        where = f"{PG['host']}:{PG['port']} (user {PG['user']})"
        if not port_open(PG["host"], PG["port"]):
            raise ServiceMissing(f"PostgreSQL is not answering on {where}.")
        try:
            pg_connect().close()
        except Exception as exc:
            raise ServiceMissing(f"cannot connect to PostgreSQL on {where}: {exc}") from exc


def environment(
    args: argparse.Namespace, workdir: Path, redis: RedisServer | None
) -> dict[str, str]:
    """The variables of bench/settings.py and bench/chaos_settings.py for this run."""
    env = {
        "DJANGO_SETTINGS_MODULE": "bench.chaos_settings",
        "BENCH_LEASE_SECONDS": str(args.lease),
        "BENCH_BROKER_URL": redis.url if redis else "",
        "BENCH_DB": "postgres" if args.broker == "postgres" else "sqlite",
    }
    if args.broker == "postgres":
        env.update(BENCH_PG_NAME=PG_CHAOS_DB, BENCH_PG_HOST=PG["host"],
                   BENCH_PG_PORT=str(PG["port"]), BENCH_PG_USER=PG["user"])  # fmt: skip
    else:
        env["BENCH_SQLITE_PATH"] = str(workdir / "chaos.sqlite3")
    return env


# Workers --------------------------------------------------------------------------------------


class ChaosWorker:
    """One of the two worker slots; each start is a new generation with a name of its own."""

    def __init__(self, slot: int, env: dict[str, str], loglevel: str) -> None:
        self.slot = slot
        self.env = env
        self.loglevel = loglevel
        self.generation = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """What the tasks record (BENCH_WORKER_NAME) and the worker reports (-n)."""
        return f"w{self.slot}-g{self.generation}"

    def start(self) -> None:
        self.generation += 1
        command = [procs.PYTHON, "-m", "django", "runworker", "-c", str(CONCURRENCY),
                   "-n", self.name, "-l", self.loglevel]  # fmt: skip
        env = procs.child_env(**self.env, BENCH_WORKER_NAME=self.name)
        # Its own process group: one killpg() reaches the worker and its pool processes.
        self.process = procs.start(
            command, env=env, log=LOGS / f"{self.name}.log", new_session=True
        )

    def kill(self) -> None:
        """SIGKILL to the worker and its pool processes: no chance to give anything back."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        procs.reap(self.process)

    def stop(self) -> int | None:
        return None if self.process is None else procs.stop(self.process, grace=20.0)


# The run --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened during the run, as the chaos loop saw it."""

    sent: int = 0
    refused: int = 0
    unsent: int = 0
    kills: int = 0
    running_at_kills: int = 0
    killed: set[str] = field(default_factory=set)
    redis_restarts: int = 0
    events: list[str] = field(default_factory=list)


class Producer(threading.Thread):
    """Sends the N tasks, retrying a send the broker refused (same task id)."""

    def __init__(self, ids: list[str], tally: Tally, rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.ids = ids
        self.tally = tally
        self.rate = rate
        self.stopping = threading.Event()

    def run(self) -> None:
        from django.db import connections

        started = time.monotonic()
        try:
            for n, task_id in enumerate(self.ids):
                # Paced, so that the sending spans the kills and the Redis restart.
                if self.stopping.wait(max(0.0, started + n / self.rate - time.monotonic())):
                    return
                if self._send(n, task_id):
                    self.tally.sent += 1
                else:
                    self.tally.unsent += 1
        finally:
            connections.close_all()

    def _send(self, n: int, task_id: str) -> bool:
        from bench.benchapp.tasks import record_execution
        from django_tasks.exceptions import BrokerConnectionError

        for _attempt in range(SEND_ATTEMPTS):
            try:
                record_execution.apply_async((n,), task_id=task_id)
                return True
            except BrokerConnectionError:
                self.tally.refused += 1
                self.stopping.wait(SEND_RETRY_PAUSE)
        return False


def succeeded() -> int:
    from django_tasks.models import TaskResult
    from django_tasks.states import TaskState

    return TaskResult.objects.filter(state=TaskState.SUCCESS).count()


def queued() -> int | None:
    from django_tasks.backend import get_backend
    from django_tasks.exceptions import BrokerError

    try:
        return get_backend().broker.queue_lengths(["default"])["default"]
    except BrokerError:
        return None


def running_on(worker: ChaosWorker) -> int:
    """Results STARTED by this worker generation: the tasks that may run twice if it dies."""
    from django_tasks.models import TaskResult
    from django_tasks.states import TaskState

    started = TaskResult.objects.filter(
        state=TaskState.STARTED, worker__startswith=f"{worker.name}:"
    )
    return started.count()


class Chaos:
    """The chaos loop: kills, the Redis restart, progress; bounded by the deadline."""

    def __init__(self, args: argparse.Namespace, workers: list[ChaosWorker],
                 redis: RedisServer | None, ids: list[str], tally: Tally) -> None:  # fmt: skip
        self.args = args
        self.workers = workers
        self.redis = redis
        self.ids = ids
        self.tally = tally
        self.random = random.Random(args.seed)
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        line = f"  [{time.monotonic() - self.started:6.1f} s] {text}"
        self.tally.events.append(line)
        print(line, flush=True)

    def run(self, producer: Producer) -> bool:
        """Kill and restart until every task succeeded; False if the deadline passed first."""
        deadline = self.started + self.args.deadline
        next_kill = self.started + self.args.kill_every
        looks = 0
        while time.monotonic() < deadline:
            done = succeeded()
            if not producer.is_alive() and done >= self.tally.sent and queued() == 0:
                return True
            if time.monotonic() >= next_kill:
                self.kill_one()
                next_kill += self.args.kill_every
            if self.redis and not self.tally.redis_restarts and done >= len(self.ids) * 0.4:
                self.restart_redis()
            looks += 1
            if looks % PROGRESS_EVERY == 0:
                self.say(f"sent {self.tally.sent}, succeeded {done}, kills {self.tally.kills}")
            time.sleep(POLL)
        return False

    def kill_one(self) -> None:
        worker = self.random.choice(self.workers)
        running = running_on(worker)
        worker.kill()
        self.tally.kills += 1
        self.tally.running_at_kills += running
        self.tally.killed.add(worker.name)
        self.say(f"SIGKILL {worker.name} ({running} task(s) started and not stored); new worker")
        worker.start()

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.say("restarting Redis (SIGTERM, then the same port and append-only file)")
        stopped = time.monotonic()
        self.redis.stop()
        self.redis.start()
        self.tally.redis_restarts += 1
        self.say(f"Redis back after {time.monotonic() - stopped:.1f} s")

    def settle(self) -> bool:
        """No more kills: give the leases of the last victims time to expire and be run."""
        limit = time.monotonic() + 2 * self.args.lease + 60
        while time.monotonic() < limit:
            if succeeded() >= self.tally.sent and queued() == 0:
                return True
            time.sleep(POLL)
        return False


# The report -----------------------------------------------------------------------------------


@dataclass
class Figures:
    sent: int
    succeeded: int
    never_ran: list[int]
    not_successful: Counter[str]
    duplicated: dict[int, list[str]]
    explained: int

    @property
    def lost(self) -> int:
        return len(self.never_ran) + sum(self.not_successful.values())


def figures(ids: list[str], tally: Tally) -> Figures:
    """Count executions and results per task number."""
    from bench.benchapp.models import Execution
    from django_tasks.models import TaskResult
    from django_tasks.states import TaskState

    runs: dict[int, list[str]] = {}
    for n, worker in Execution.objects.order_by("pk").values_list("n", "worker"):
        runs.setdefault(n, []).append(worker)
    states = dict(TaskResult.objects.values_list("pk", "state"))
    sent = ids[: tally.sent]
    duplicated = {n: workers for n, workers in runs.items() if len(workers) > 1}
    # A duplicate is explained when every run but the last was on a worker that was killed.
    explained = sum(1 for w in duplicated.values() if all(x in tally.killed for x in w[:-1]))
    return Figures(
        sent=len(sent),
        succeeded=sum(1 for i in sent if states.get(i) == TaskState.SUCCESS),
        never_ran=[n for n in range(len(sent)) if n not in runs],
        not_successful=Counter(
            states.get(i, "no result")
            for n, i in enumerate(sent)
            if n in runs and states.get(i) != TaskState.SUCCESS
        ),
        duplicated=duplicated,
        explained=explained,
    )


def report(args: argparse.Namespace, tally: Tally, result: Figures, elapsed: float) -> None:
    extra = sum(len(w) - 1 for w in result.duplicated.values())
    bound = tally.kills * CONCURRENCY * PREFETCH
    print(f"\n# Chaos: {args.broker} broker, {args.tasks} tasks\n")
    print(f"workers: {WORKERS} x runworker -c {CONCURRENCY}; lease {args.lease:g} s; a SIGKILL "
          f"every {args.kill_every:g} s (seed {args.seed}); sent at {args.rate:g}/s")  # fmt: skip
    print(f"run:     {elapsed:.1f} s; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"sent:        {result.sent} (sends refused and retried: {tally.refused}"
          f"{f', given up: {tally.unsent}' if tally.unsent else ''})")  # fmt: skip
    print(f"succeeded:   {result.succeeded}")
    print(f"lost:        {result.lost}" + (
        f" (never ran: {len(result.never_ran)} e.g. {result.never_ran[:5]}; "
        f"ran but not SUCCESS: {dict(result.not_successful)})" if result.lost else ""))  # fmt: skip
    print(
        f"duplicated:  {len(result.duplicated)} task(s) ran more than once ({extra} extra "
        f"execution(s)); {result.explained} of them had run on a worker killed later"
    )
    print(f"kills:       {tally.kills} (tasks started and not stored at the kills: "
          f"{tally.running_at_kills}; at most {bound} leased by the killed workers)")  # fmt: skip
    if args.broker == "redis":
        print(f"redis:       restarted {tally.redis_restarts} time(s)")
    unexplained = {n: w for n, w in result.duplicated.items()
                   if not all(x in tally.killed for x in w[:-1])}  # fmt: skip
    if unexplained:
        sample = dict(list(unexplained.items())[:5])
        print(
            f"UNEXPLAINED duplicates (no killed worker ran them first): {len(unexplained)}, "
            f"e.g. task -> workers that ran it: {sample}"
        )
    print(f"\nWorker logs: {LOGS.relative_to(procs.ROOT)}/")


# Command line ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=["redis", "postgres", "sqlite"], required=True)
    parser.add_argument("--tasks", type=int, default=5000, help="tasks sent (default: 5000)")
    parser.add_argument("--kill-every", type=float, default=3.0,
                        help="seconds between two SIGKILLs (default: 3)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=250.0,
                        help="tasks sent per second, at most (default: 250)")  # fmt: skip
    parser.add_argument("--lease", type=float, default=3.0, help="LEASE_SECONDS (default: 3)")
    parser.add_argument("--seed", type=int, default=1, help="which worker dies when (default: 1)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds before giving up (default: scaled to --tasks)")  # fmt: skip
    parser.add_argument("--worker-loglevel", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])  # fmt: skip
    args = parser.parse_args()
    if args.tasks < 1 or min(args.kill_every, args.lease, args.rate) <= 0:
        parser.error("--tasks, --kill-every, --rate and --lease must be positive")
    if args.deadline is None:
        args.deadline = max(180.0, args.tasks / 10)
    return args


def cleanup(workdir: Path, broker: str) -> None:
    """Stop every process we started, drop the database, remove the files. Idempotent."""
    procs.stop_all()
    if broker == "postgres":
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        with contextlib.suppress(Exception):
            drop_pg_database()
    shutil.rmtree(workdir, ignore_errors=True)


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[RedisServer | None, dict[str, str]]:
    """A fresh database (and Redis server), Django set up on them, the tables migrated."""
    import django
    from django.core.management import call_command

    redis = None
    if args.broker == "redis":
        redis = RedisServer(workdir)
        redis.start()
    if args.broker == "postgres":
        create_pg_database()
    env = environment(args, workdir, redis)
    os.environ.update(env)
    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    return redis, env


def run(args: argparse.Namespace, workdir: Path) -> int:
    redis, env = prepare(args, workdir)
    workers = [ChaosWorker(slot, env, args.worker_loglevel) for slot in range(1, WORKERS + 1)]
    for worker in workers:
        worker.start()
    tally = Tally()
    ids = [str(uuid.uuid4()) for _ in range(args.tasks)]
    producer = Producer(ids, tally, args.rate)
    chaos = Chaos(args, workers, redis, ids, tally)
    producer.start()
    try:
        finished = chaos.run(producer) or chaos.settle()
    finally:
        producer.stopping.set()
        producer.join(30)
    elapsed = time.monotonic() - chaos.started
    if not finished:
        print(f"\nchaos: not finished within {args.deadline:.0f} s (+ settling)", flush=True)
    for worker in workers:
        worker.stop()
    result = figures(ids, tally)
    report(args, tally, result, elapsed)
    return 1 if result.lost or tally.unsent or not finished else 0


def main() -> int:
    args = parse_args()
    try:
        check_services(args.broker)
    except ServiceMissing as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    procs.exit_on_signals()
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir=RESULTS_DIR))
    # Registered after procs' own hook, so it runs first: processes, then database and files.
    atexit.register(cleanup, workdir, args.broker)
    try:
        return run(args, workdir)
    except ServiceMissing as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nchaos: interrupted; stopping the processes, removing the database", file=sys.stderr
        )
        return 130
    finally:
        cleanup(workdir, args.broker)


if __name__ == "__main__":
    sys.exit(main())
