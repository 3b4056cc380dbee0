"""What the peers' tiny Django projects share: base settings and their PostgreSQL database.

The database comes from the environment set by bench/compare/run.py (BENCH_PG_NAME, BENCH_PG_HOST,
BENCH_PG_PORT, BENCH_PG_USER, BENCH_CONN_MAX_AGE). Connections are persistent
(``CONN_MAX_AGE``), as production sites run them.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "bench-only"
# DEBUG would record every query in memory and slow every process down.
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def postgres() -> dict[str, Any]:
    """The default database: the PostgreSQL database the harness created for this library."""
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["BENCH_PG_NAME"],
        "USER": os.environ.get("BENCH_PG_USER", "postgres"),
        "HOST": os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("BENCH_PG_PORT", "5432"),
        "CONN_MAX_AGE": int(os.environ.get("BENCH_CONN_MAX_AGE", "600")),
        "CONN_HEALTH_CHECKS": True,
    }


def setup() -> None:
    """Set Django up (the settings module comes from DJANGO_SETTINGS_MODULE)."""
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def flush() -> None:
    """Empty every table Django manages (TRUNCATE on PostgreSQL)."""
    from django.core.management import call_command

    call_command("flush", verbosity=0, interactive=False)
