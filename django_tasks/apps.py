"""The app's configuration: what django_tasks does when Django starts."""

from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.utils.module_loading import import_string
from django.utils.translation import gettext_lazy as _


class DjangoTasksConfig(AppConfig):
    name = "django_tasks"
    verbose_name = _("Tasks")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers checks and receivers; backend installs how tasks find their backend.
        from . import backend, checks, signals  # noqa: F401

        self.import_brokers()

    def import_brokers(self) -> None:
        """Import the brokers TASKS names now, not in the first request that sends a task.

        Importing redis-py takes a good fraction of a second. Bad settings are left to the
        system checks.
        """
        from .brokers import BROKER_CLASSES

        entries: Any = getattr(settings, "TASKS", {})
        for params in entries.values() if isinstance(entries, dict) else ():
            options = params.get("OPTIONS") if isinstance(params, dict) else None
            if isinstance(options, dict) and options.get("BROKER_URL"):
                import_string(BROKER_CLASSES["redis"])
                return
