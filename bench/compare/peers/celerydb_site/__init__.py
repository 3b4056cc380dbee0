"""Celery with the Redis broker and django-celery-results (results in PostgreSQL)."""

from celerydb_site.celery import app as celery_app

__all__ = ["celery_app"]
