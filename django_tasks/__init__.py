"""django_tasks: background tasks for Django, with Celery's calling API.

from django_tasks import task, AsyncResult

@task
def add(x, y):
    return x + y

result = add.delay(2, 2)
result.get(timeout=10)  # 4
"""

from typing import TYPE_CHECKING, Any

from .states import TaskState
from .task import Task, task

__all__ = ["AsyncResult", "Task", "TaskState", "task"]

if TYPE_CHECKING:
    from .result import AsyncResult


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package (e.g. for INSTALLED_APPS) loads no models.
    if name == "AsyncResult":
        from .result import AsyncResult

        return AsyncResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
