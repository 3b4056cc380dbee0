"""Task name -> Task, the discovery of every installed app's ``tasks`` module, and alias -> backend.

A worker runs only the tasks found here: a message naming anything else is dead-lettered, so a
message can never make a worker import or call an arbitrary function.

Tasks and results find their backend through ``backend_for()``, which backend.py sets up when it
is imported (the app's ready() imports it): task.py and result.py need not import backend.py,
which imports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import import_module
from threading import RLock
from typing import TYPE_CHECKING

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import module_has_submodule

if TYPE_CHECKING:
    from django.tasks import Task as DjangoTask

    from .backend import TasksBackend

logger = logging.getLogger("django_tasks")


class Registry:
    """The tasks this process may run, by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, DjangoTask] = {}
        self._conflicts: dict[str, list[str]] = {}
        self._lock = RLock()
        self._discovered = False

    def register(self, task: DjangoTask, name: str) -> None:
        """Register ``task`` under ``name``. The first registration of a name wins."""
        with self._lock:
            existing = self._tasks.get(name)
            if existing is None:
                self._tasks[name] = task
            elif existing.func is not task.func:
                paths = self._conflicts.setdefault(name, [_path(existing)])
                paths.append(_path(task))

    def get(self, name: str) -> DjangoTask | None:
        return self._tasks.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._tasks

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def conflicts(self) -> dict[str, list[str]]:
        """Names claimed by more than one function (reported by a system check)."""
        return dict(self._conflicts)

    def autodiscover(self, extra_modules: tuple[str, ...] = ()) -> None:
        """Import ``<app>.tasks`` for every installed app, then ``extra_modules``."""
        with self._lock:
            if self._discovered and not extra_modules:
                return
            for config in apps.get_app_configs():
                if module_has_submodule(config.module, "tasks"):
                    import_module(f"{config.name}.tasks")
            for module in extra_modules:
                import_module(module)
            self._discovered = True


def _path(task: DjangoTask) -> str:
    return f"{task.func.__module__}.{task.func.__qualname__}"


registry = Registry()


_backend_lookup: list[Callable[[str], TasksBackend]] = []


def install_backend_lookup(lookup: Callable[[str], TasksBackend]) -> None:
    """Make ``lookup`` (backend.get_backend) the way tasks and results find their backend."""
    _backend_lookup[:] = [lookup]


def backend_for(alias: str) -> TasksBackend:
    """Our backend for the TASKS alias ``alias`` (see backend.get_backend)."""
    if not _backend_lookup:
        raise ImproperlyConfigured(
            "django_tasks is not set up: add it to INSTALLED_APPS and call django.setup()."
        )
    return _backend_lookup[0](alias)
