"""django-tasks-db: the database backend of Django 6's ``django.tasks``, on PostgreSQL."""

from djangobase import *  # noqa: F403
from djangobase import postgres

INSTALLED_APPS = ["django_tasks_db", "dtdb_site"]
DATABASES = {"default": postgres()}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
