"""The libraries compared, their virtualenvs and their workers: the rows of the report.

Each ``Library`` is one configuration (django_tasks has four: two brokers, two result stores);
each of its ``Pool``s is one worker command with two executors, and one row of the table. The code
that runs inside a library's virtualenv (its tasks and how to call them) is under ``peers/``.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field

#: The pins of each virtualenv (the versions compared; the report records the installed ones).
DJANGO = "Django>=6.0,<7"
PSYCOPG = "psycopg[binary]>=3.2"
REDIS = "redis>=5.0"
VENVS: dict[str, tuple[str, ...]] = {
    "celery": ("celery[redis]==5.7.*",),
    "rq": ("rq==2.12.*",),
    "dramatiq": ("dramatiq[redis]==2.2.*",),
    "huey": ("huey==3.5.*", REDIS),
    "django-tasks-db": ("django-tasks-db==0.13.*", DJANGO, PSYCOPG, REDIS),
    "django-q2": ("django-q2==1.11.*", DJANGO, PSYCOPG, REDIS),
    "procrastinate": ("procrastinate==3.10.*", DJANGO, PSYCOPG, REDIS),
    "celery-django": ("celery[redis]==5.7.*", "django-celery-results==2.6.*", DJANGO, PSYCOPG),
}
#: The token in a worker command replaced by the benchmark Redis server's URL.
REDIS_URL = "{redis_url}"


@dataclass(frozen=True)
class Pool:
    """One worker command with two executors."""

    key: str  # "processes", "threads", ...
    label: str  # how the report names it
    command: tuple[str, ...]  # the first item is a script of the venv's bin/ (or "python")
    kind: str = "processes"  # processes, threads or asyncio: what the executors are
    copies: int = 1  # worker processes started side by side (db_worker runs one task at a time)
    graceful: int = signal.SIGTERM


@dataclass(frozen=True)
class Library:
    """One configuration of one library."""

    key: str
    family: str  # what --libraries selects
    title: str
    adapter: str  # the module under peers/ that client.py drives
    pools: tuple[Pool, ...]
    venv: str | None = None  # None: the project's own .venv (django_tasks)
    settings: str | None = None  # DJANGO_SETTINGS_MODULE
    database: str | None = None  # "postgres", "sqlite" or None
    redis_broker: bool = True  # whether the queue lives on Redis
    env: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def peer(self) -> bool:
        return self.family != "django_tasks"


def _runworker(pool: str) -> tuple[str, ...]:
    return ("python", "-m", "django", "runworker", "-c", "2", "--pool", pool, "-l", "INFO")


DT_POOLS = (
    Pool("processes", "runworker -c 2 --pool process", _runworker("process")),
    Pool("threads", "runworker -c 2 --pool thread", _runworker("thread"), kind="threads"),
)


def _django_tasks(key: str, title: str, database: str, redis_broker: bool) -> Library:
    notes = ["results in the database (TaskResult)", "persistent connections (CONN_MAX_AGE=600)"]
    if database == "sqlite":
        notes.append("SQLite in WAL mode, IMMEDIATE transactions")
    return Library(
        key=key,
        family="django_tasks",
        title=title,
        adapter="dt_site.adapter",
        pools=DT_POOLS,
        settings="dt_site.settings",
        database=database,
        redis_broker=redis_broker,
        env={"BENCH_DB": database},
        notes=tuple(notes),
    )


def _celery_pools(app: str) -> tuple[Pool, ...]:
    base = ("celery", "-A", app, "worker", "-c", "2", "-l", "INFO", "-P")
    return (
        Pool("processes", "worker -c 2 -P prefork", (*base, "prefork")),
        Pool("threads", "worker -c 2 -P threads", (*base, "threads"), kind="threads"),
    )


def _rq_pools() -> tuple[Pool, ...]:
    base = ("rq", "worker-pool", "-n", "2", "-u", REDIS_URL)
    return (
        Pool(
            "simpleworker",
            "worker-pool -n 2 -w SimpleWorker",
            (*base, "-w", "rq.worker.SimpleWorker", "default"),
        ),
        Pool("fork", "worker-pool -n 2 (fork per job)", (*base, "default")),
    )


LIBRARIES: tuple[Library, ...] = (
    _django_tasks(
        "dt-redis-sqlite", "django_tasks, Redis broker, results in SQLite", "sqlite", True
    ),
    _django_tasks(
        "dt-redis-postgres", "django_tasks, Redis broker, results in PostgreSQL", "postgres", True
    ),
    _django_tasks(
        "dt-db-postgres", "django_tasks, database broker on PostgreSQL", "postgres", False
    ),
    _django_tasks("dt-db-sqlite", "django_tasks, database broker on SQLite", "sqlite", False),
    Library(
        key="celery",
        family="celery",
        title="Celery (Redis broker, Redis results)",
        adapter="celery_app",
        venv="celery",
        pools=_celery_pools("celery_app"),
    ),
    Library(
        key="rq",
        family="rq",
        title="RQ (results in Redis)",
        adapter="rq_app",
        venv="rq",
        pools=_rq_pools(),
    ),
    Library(
        key="dramatiq",
        family="dramatiq",
        title="Dramatiq (Redis broker, Results on Redis)",
        adapter="dramatiq_app",
        venv="dramatiq",
        pools=(
            Pool("processes", "-p 2 -t 1", ("dramatiq", "dramatiq_app", "-p", "2", "-t", "1")),
            Pool(
                "threads",
                "-p 1 -t 2",
                ("dramatiq", "dramatiq_app", "-p", "1", "-t", "2"),
                kind="threads",
            ),
        ),
    ),
    Library(
        key="huey",
        family="huey",
        title="Huey (Redis, notify_result)",
        adapter="huey_app",
        venv="huey",
        pools=tuple(
            Pool(
                key,
                f"huey_consumer -w 2 -k {kind}",
                ("huey_consumer", "huey_app.huey", "-w", "2", "-k", kind),
                kind="processes" if kind == "process" else "threads",
                graceful=signal.SIGINT,
            )
            for key, kind in (("processes", "process"), ("threads", "thread"))
        ),
    ),
    Library(
        key="django-tasks-db",
        family="django-tasks-db",
        title="django-tasks-db (PostgreSQL)",
        adapter="dtdb_site.adapter",
        venv="django-tasks-db",
        settings="dtdb_site.settings",
        database="postgres",
        redis_broker=False,
        pools=(
            Pool(
                "processes",
                "2 x db_worker",
                ("python", "-m", "django", "db_worker"),
                copies=2,
            ),
        ),
        notes=("persistent connections (CONN_MAX_AGE=600)", "idle poll 1 s (its default)"),
    ),
    Library(
        key="django-q2",
        family="django-q2",
        title="django-q2 (ORM broker on PostgreSQL)",
        adapter="q2_site.adapter",
        venv="django-q2",
        settings="q2_site.settings",
        database="postgres",
        redis_broker=False,
        pools=(Pool("processes", "qcluster, 2 workers", ("python", "-m", "django", "qcluster")),),
        notes=("persistent connections (CONN_MAX_AGE=600)", "save_limit 0 (keeps all results)"),
    ),
    Library(
        key="procrastinate",
        family="procrastinate",
        title="procrastinate (PostgreSQL)",
        adapter="procr_site.adapter",
        venv="procrastinate",
        settings="procr_site.settings",
        database="postgres",
        redis_broker=False,
        pools=(
            Pool(
                "asyncio",
                "worker --concurrency 2",
                ("python", "-m", "django", "procrastinate", "worker", "--concurrency", "2"),
                kind="asyncio",
            ),
        ),
        notes=("stores no return value: the round trip waits for the job's status",),
    ),
    Library(
        key="celery-django",
        family="celery-django",
        title="Celery + django-celery-results (Redis broker, results in PostgreSQL)",
        adapter="celerydb_site.adapter",
        venv="celery-django",
        settings="celerydb_site.settings",
        database="postgres",
        pools=_celery_pools("celerydb_site"),
        notes=("persistent connections (CONN_MAX_AGE=600)", "get() polls every 0.5 s (default)"),
    ),
)

FAMILIES = tuple(dict.fromkeys(lib.family for lib in LIBRARIES))


#: The rows of the fast mode: the configurations of the headline figures, process pools only.
FAST = ("dt-redis-postgres", "dt-redis-sqlite", "dt-db-postgres", "huey")


def select(names: list[str]) -> list[Library]:
    """The configurations named by family (``huey``) or by key (``dt-db-postgres``)."""
    chosen = [lib for lib in LIBRARIES if lib.family in names or lib.key in names]
    return chosen


def fast() -> list[Library]:
    """The configurations of the fast mode, each with its first (process) pool only."""
    return [dataclasses.replace(lib, pools=lib.pools[:1]) for lib in LIBRARIES if lib.key in FAST]
