"""Settings of the benchmark, configured by bench/bench.py through environment variables.

- BENCH_DB: ``sqlite`` (default) or ``postgres``: the default database, which holds the results
  and, for the database broker, the queue.
- BENCH_SQLITE_PATH: the SQLite file (required for ``sqlite``).
- BENCH_PG_NAME, BENCH_PG_HOST, BENCH_PG_PORT, BENCH_PG_USER: the PostgreSQL database.
- BENCH_CONN_MAX_AGE: seconds database connections are kept (persistent connections; 600 unless
  set, on SQLite as on PostgreSQL).
- BENCH_BROKER_URL: a redis:// URL for the Redis broker; empty for the database broker.
"""

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "bench-only"
# DEBUG would record every query in memory and slow every process down.
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS: list[str] = []

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_tasks",
    "bench.benchapp",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _sqlite() -> dict[str, Any]:
    path = os.environ.get("BENCH_SQLITE_PATH")
    if not path:
        raise RuntimeError("bench.settings: BENCH_SQLITE_PATH is not set (run bench/bench.py).")
    # As tests/settings.py and the README recommend: WAL so that readers never block the
    # writer, IMMEDIATE so that concurrent writers queue on the busy timeout instead of failing.
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        # Persistent, as on PostgreSQL: a worker otherwise reopens the file (and runs the
        # PRAGMAs below) for the first task after each idle second.
        "CONN_MAX_AGE": int(os.environ.get("BENCH_CONN_MAX_AGE", "600")),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


def _postgres() -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("BENCH_PG_NAME", "bench_django_tasks"),
        "USER": os.environ.get("BENCH_PG_USER", "postgres"),
        "HOST": os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("BENCH_PG_PORT", "5432"),
        # Persistent connections, as production sites run: no connect per task or per request.
        "CONN_MAX_AGE": int(os.environ.get("BENCH_CONN_MAX_AGE", "600")),
        "CONN_HEALTH_CHECKS": True,
    }


DATABASES = {
    "default": _postgres() if os.environ.get("BENCH_DB", "sqlite") == "postgres" else _sqlite()
}

TASKS = {
    "default": {
        "BACKEND": "django_tasks.backend.TasksBackend",
        "QUEUES": ["default"],
        "OPTIONS": {
            "BROKER_URL": os.environ.get("BENCH_BROKER_URL") or None,
            "DATABASE": "default",
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The worker's own level (runworker -l) decides what is written; INFO by default, as in
    # production, so the per-task log lines are part of the cost measured.
    "loggers": {"django_tasks": {"handlers": ["console"], "propagate": False}},
}
