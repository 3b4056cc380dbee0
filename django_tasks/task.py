"""Task objects and the @task decorator.

Our Task is a Django ``django.tasks.Task`` (frozen, keyword-only dataclass) that adds Celery's
calling API: direct call, ``delay``, ``apply_async``, ``bind`` and ``request``. One object serves
both APIs; ``enqueue()`` keeps Django's semantics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, DEFAULT_TASK_QUEUE_NAME
from django.tasks import Task as DjangoTask
from django.tasks.base import DEFAULT_TASK_PRIORITY
from django.tasks.exceptions import InvalidTask
from django.utils.inspect import get_func_args

from .registry import registry

if TYPE_CHECKING:
    from .backend import TasksBackend
    from .result import AsyncResult


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What a running task knows about its own call (``self.request`` in a bound task)."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int = DEFAULT_TASK_PRIORITY
    retries: int = 0
    eta: float | None = None
    expires: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    hostname: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    called_directly: bool = True


_DIRECT_CALL = Request()
_local = threading.local()


def current_request() -> Request:
    """The request of the task running in this thread (a direct call has an empty one)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _DIRECT_CALL


def push_request(request: Request) -> None:
    _local.__dict__.setdefault("stack", []).append(request)


def pop_request() -> None:
    _local.stack.pop()


@dataclass(frozen=True, slots=True, kw_only=True)
class Task(DjangoTask):
    """A task: call it to run it here, ``delay()``/``apply_async()``/``enqueue()`` to queue it."""

    #: The registered name; the dotted path of the function unless given.
    name: str = ""
    #: Pass the task itself as the first argument (``self``), as Celery's ``bind=True`` does.
    bind: bool = False
    #: Store no TaskResult row: AsyncResult stays PENDING.
    ignore_result: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.module_path)
        super(Task, self).__post_init__()
        registry.register(self, self.name)

    def get_backend(self) -> TasksBackend:
        from .backend import get_backend

        return get_backend(self.backend)

    @property
    def request(self) -> Request:
        """The current call's request (id, retries, args, ...); empty for a direct call."""
        return current_request()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here and now, like the plain function."""
        if self.bind:
            return self.func(self, *args, **kwargs)
        return self.func(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return DjangoTask.call(self, self, *args, **kwargs)
        return DjangoTask.call(self, *args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return await DjangoTask.acall(self, self, *args, **kwargs)
        return await DjangoTask.acall(self, *args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Queue the task with these arguments; return its AsyncResult at once."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        on_commit: bool | None = None,
        headers: dict[str, Any] | None = None,
    ) -> AsyncResult:
        """Queue the task with call options; return its AsyncResult at once.

        ``countdown`` (seconds) or ``eta`` (a datetime; a naive one is read in TIME_ZONE) delay
        it; ``expires`` (seconds, timedelta or datetime) drops it if no worker reached it by then;
        ``queue`` and ``priority`` (-100..100, higher first) override the task's and the route's.
        ``on_commit`` (Redis broker) overrides OPTIONS["PUBLISH_ON_COMMIT"].
        """
        from .result import AsyncResult

        message = self.get_backend().send(
            self,
            list(args or ()),
            dict(kwargs or {}),
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            priority=priority,
            task_id=task_id,
            on_commit=on_commit,
            headers=headers,
        )
        return AsyncResult(message.id, backend=self.backend, task_name=self.name)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        from .result import AsyncResult

        return AsyncResult(task_id, backend=self.backend, task_name=self.name)


def task(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str | None = None,
    queue_name: str | None = None,
    priority: int = DEFAULT_TASK_PRIORITY,
    backend: str = DEFAULT_TASK_BACKEND_ALIAS,
    bind: bool = False,
    ignore_result: bool = False,
    takes_context: bool = False,
) -> Any:
    """Turn a module-level function into a Task, registered under ``name`` (default: its path).

    Usable bare (``@task``) or with options (``@task(queue="hipri", bind=True)``). ``queue`` and
    Django's ``queue_name`` are the same option.
    """
    if queue and queue_name and queue != queue_name:
        raise InvalidTask("Give either queue= or queue_name=, not both.")

    def decorate(func: Callable[..., Any]) -> Task:
        if bind and not get_func_args(func):
            raise InvalidTask(f"Task {func.__qualname__} has bind=True but takes no 'self'.")
        return Task(
            func=func,
            name=name or "",
            queue_name=queue or queue_name or DEFAULT_TASK_QUEUE_NAME,
            priority=priority,
            backend=backend,
            bind=bind,
            ignore_result=ignore_result,
            takes_context=takes_context,
        )

    if function is not None:
        return decorate(function)
    return decorate
