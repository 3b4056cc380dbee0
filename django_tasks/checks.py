"""System checks: configuration errors are reported here, never at import time."""

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core import checks


@checks.register("django_tasks")
def check_tasks_setting(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[Any]:
    """Warn when no TASKS entry uses our backend, and report duplicate task names."""
    from .backend import TasksBackend
    from .registry import registry

    messages: list[Any] = []
    ours = [
        alias
        for alias, params in getattr(settings, "TASKS", {}).items()
        if params.get("BACKEND") == f"{TasksBackend.__module__}.{TasksBackend.__qualname__}"
    ]
    if not ours:
        messages.append(
            checks.Info(
                "No TASKS entry uses django_tasks.backend.TasksBackend: @task from django_tasks "
                "uses the database broker with default options.",
                hint="Set TASKS = {'default': {'BACKEND': 'django_tasks.backend.TasksBackend'}}.",
                id="django_tasks.I001",
            )
        )
    for name, paths in registry.conflicts().items():
        messages.append(
            checks.Error(
                f"The task name {name!r} is registered by more than one function: "
                f"{', '.join(paths)}.",
                hint="Give one of them another name with @task(name=...).",
                id="django_tasks.E010",
            )
        )
    return messages
