"""Settings of the test suite: SQLite as the default database, PostgreSQL as "postgres".

Workers started by end-to-end tests import these settings too; the test database names reach
them through DT_TEST_SQLITE_NAME and DT_TEST_POSTGRES_NAME.
"""

import os
import tempfile
from pathlib import Path

from tests.services import postgres_available

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "Europe/Paris"
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_tasks",
    "tests.testapp.apps.TestAppConfig",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_SQLITE_TEST_NAME = os.environ.get(
    "DT_TEST_SQLITE_NAME",
    os.path.join(tempfile.gettempdir(), f"django_tasks-test-{os.getpid()}.sqlite3"),
)
POSTGRES = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "test",
    "USER": os.environ.get("DT_TEST_POSTGRES_USER", "postgres"),
    "HOST": os.environ.get("DT_TEST_POSTGRES_HOST", "127.0.0.1"),
    "PORT": os.environ.get("DT_TEST_POSTGRES_PORT", "5432"),
    "CONN_MAX_AGE": 0,
    "TEST": {"NAME": os.environ.get("DT_TEST_POSTGRES_NAME", f"test_django_tasks_{os.getpid()}")},
}

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # A file, not memory, so that worker processes share the test database.
        "NAME": _SQLITE_TEST_NAME,
        "TEST": {"NAME": _SQLITE_TEST_NAME},
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    },
}
if postgres_available(POSTGRES):
    DATABASES["postgres"] = POSTGRES
if os.environ.get("DT_TEST_CLOCK_SKEW"):
    # A worker process of a test on clocks: its host's clock is that many seconds off.
    from tests.clock import shift_clock

    shift_clock(float(os.environ["DT_TEST_CLOCK_SKEW"]))
if os.environ.get("DT_TEST_WORKER"):
    # A worker process of an end-to-end test: use the test databases the suite created.
    DATABASES["default"]["NAME"] = DATABASES["default"]["TEST"]["NAME"]
    if "postgres" in DATABASES:
        DATABASES["postgres"]["NAME"] = DATABASES["postgres"]["TEST"]["NAME"]

if os.environ.get("DT_TEST_RESULTS_DATABASE"):
    # A worker of a test that keeps the results on another database (PostgreSQL).
    DATABASE_ROUTERS = ["tests.routers.ResultsOn"]

REDIS_URL = os.environ.get("DT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

TASKS = {
    "default": {
        "BACKEND": "django_tasks.backend.TasksBackend",
        "QUEUES": ["default", "hipri", "lopri"],
        "OPTIONS": {
            "BROKER_URL": os.environ.get("DT_TEST_BROKER_URL") or None,
            "DATABASE": os.environ.get("DT_TEST_BROKER_DATABASE", "default"),
            "ROUTES": {"tests.testapp.tasks.routed": {"queue": "hipri"}},
            "LEASE_SECONDS": float(os.environ.get("DT_TEST_LEASE_SECONDS", "30")),
            "TRACK_STARTED_AFTER": float(os.environ.get("DT_TEST_TRACK_STARTED_AFTER", "0.1")),
            "MIDDLEWARE": [m for m in os.environ.get("DT_TEST_MIDDLEWARE", "").split(",") if m],
            "IMPORTS": [
                "tests.testapp.reliability_tasks",
                "tests.testapp.hardening_tasks",
                *[m for m in os.environ.get("DT_TEST_IMPORTS", "").split(",") if m],
            ],
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_tasks": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
