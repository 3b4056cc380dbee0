"""Settings of the processes a fault test starts: tests.settings on servers of the test's own.

tests/test_faults.py stops and restarts the servers its workers use, so it never points them at
the shared services: the workers and producers it starts run with these settings, and the
environment (set by tests.faults.fault_env) says where everything is:

- DT_FAULT_DB_ENGINE: ``sqlite`` or ``postgres``: the only database, which holds the results, the
  test app's rows and, for the database broker, the queue.
- DT_FAULT_DB_NAME: the SQLite file, or the PostgreSQL database.
- DT_FAULT_DB_HOST, DT_FAULT_DB_PORT: the private PostgreSQL cluster.
- DT_FAULT_BROKER_URL: the private Redis server's URL; empty for the database broker.
- DT_FAULT_LEASE_SECONDS, DT_FAULT_CONNECT_TIMEOUT: the backend's OPTIONS of the same names.
"""

import os
from typing import Any

from tests.settings import *  # noqa: F403


def _database() -> dict[str, Any]:
    name = os.environ["DT_FAULT_DB_NAME"]
    if os.environ.get("DT_FAULT_DB_ENGINE", "sqlite") == "postgres":
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": "postgres",
            "HOST": os.environ.get("DT_FAULT_DB_HOST", "127.0.0.1"),
            "PORT": os.environ["DT_FAULT_DB_PORT"],
            # Persistent connections, as production sites run: a restart of the server leaves
            # every process holding a dead connection, which is what a fault test wants.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": name,
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


DATABASES = {"default": _database()}

TASKS = {
    "default": {
        "BACKEND": "django_tasks.backend.TasksBackend",
        "QUEUES": ["default", "hipri", "lopri"],
        "OPTIONS": {
            "BROKER_URL": os.environ.get("DT_FAULT_BROKER_URL") or None,
            "DATABASE": "default",
            "LEASE_SECONDS": float(os.environ.get("DT_FAULT_LEASE_SECONDS", "30")),
            "CONNECT_TIMEOUT": float(os.environ.get("DT_FAULT_CONNECT_TIMEOUT", "1")),
        },
    }
}
