"""The Celery app, configured from Django's settings (``CELERY_*``), as Celery's docs show."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "celerydb_site.settings")

app = Celery("celerydb_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
