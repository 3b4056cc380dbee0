"""Celery + django-celery-results: broker on the benchmark's Redis, results in PostgreSQL."""

import os

from djangobase import *  # noqa: F403
from djangobase import postgres

INSTALLED_APPS = ["django_celery_results", "celerydb_site"]
DATABASES = {"default": postgres()}
CELERY_BROKER_URL = os.environ["BENCH_REDIS_URL"]
CELERY_RESULT_BACKEND = "django-db"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
