"""django_tasks on the benchmark's services, configured by environment variables (run.py sets them).

- BENCH_DB: ``sqlite`` or ``postgres``: the default database, which holds the results and, for the
  database broker, the queue.
- BENCH_SQLITE_PATH: the SQLite file (for ``sqlite``); BENCH_PG_*: the PostgreSQL database.
- BENCH_BROKER_URL: a redis:// URL for the Redis broker; empty for the database broker.
"""

from __future__ import annotations

import os
from typing import Any

from djangobase import *  # noqa: F403
from djangobase import postgres

INSTALLED_APPS = ["django.contrib.contenttypes", "django_tasks", "dt_site"]


def sqlite() -> dict[str, Any]:
    """As the README recommends: WAL so that readers never block the writer, IMMEDIATE so that
    concurrent writers queue on the busy timeout instead of failing; persistent, as on
    PostgreSQL, so that a worker does not reopen the file after each idle second."""
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["BENCH_SQLITE_PATH"],
        "CONN_MAX_AGE": int(os.environ.get("BENCH_CONN_MAX_AGE", "600")),
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


DATABASES = {"default": postgres() if os.environ.get("BENCH_DB") == "postgres" else sqlite()}

TASKS = {
    "default": {
        "BACKEND": "django_tasks.backend.TasksBackend",
        "QUEUES": ["default"],
        "OPTIONS": {"BROKER_URL": os.environ.get("BENCH_BROKER_URL") or None},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The worker's own level (runworker -l INFO) decides what is written, as in production: the
    # per-task log lines are part of the cost measured.
    "loggers": {"django_tasks": {"handlers": ["console"], "propagate": False}},
}
