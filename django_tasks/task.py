"""Task objects and the @task decorator.

Our Task is a Django ``django.tasks.Task`` (frozen, keyword-only dataclass) that adds Celery's
calling API: direct call, ``delay``, ``apply_async``, ``bind`` and ``request``. One object serves
both APIs; ``enqueue()`` keeps Django's semantics.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, Concatenate, Literal, TypedDict, Unpack, overload

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, DEFAULT_TASK_QUEUE_NAME, TaskContext
from django.tasks import Task as DjangoTask
from django.tasks.base import DEFAULT_TASK_PRIORITY
from django.tasks.exceptions import InvalidTask
from django.utils.inspect import get_func_args

from .exceptions import MaxRetriesExceededError, Retry
from .options import call_arguments, call_headers
from .registry import backend_for, registry

if TYPE_CHECKING:
    from .backend import TasksBackend
    from .result import AsyncResult


class _Default:
    """Marks an argument that was not given (None has a meaning of its own)."""


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
    if not stack:
        return _DIRECT_CALL
    request = stack[-1]
    if not isinstance(request, Request):  # Made when first asked for: few tasks ask.
        request = stack[-1] = request()
    return request


def push_request(request: Request | Callable[[], Request]) -> None:
    """Make ``request`` (or what the callable returns, once asked for) the current one."""
    _local.__dict__.setdefault("stack", []).append(request)


def pop_request() -> None:
    _local.stack.pop()


@dataclass(frozen=True, slots=True, kw_only=True)
class Task[**P, R](DjangoTask):
    """A task: call it to run it here, ``delay()``/``apply_async()``/``enqueue()`` to queue it.

    Typed by the function it wraps: ``P`` its parameters (without ``self`` of a bound task or
    the context of one that takes it), ``R`` what it returns, so a type checker sees
    ``add.delay(1, "x")`` against ``def add(x: int, y: int)`` as the mistake it is.
    """

    #: The registered name; the dotted path of the function unless given.
    name: str = ""
    #: Pass the task itself as the first argument (``self``), as Celery's ``bind=True`` does.
    bind: bool = False
    #: Store no TaskResult row: AsyncResult stays PENDING.
    ignore_result: bool = False
    #: Retries allowed after the first attempt; None retries for ever.
    max_retries: int | None = 3
    #: Seconds before a retry when neither ``countdown`` nor a backoff says otherwise.
    default_retry_delay: float = 180.0
    #: Exceptions that schedule another attempt by themselves (as ``self.retry(exc=...)``).
    autoretry_for: tuple[type[BaseException], ...] = ()
    #: Exponential backoff for automatic retries: False, True (1 s base) or the base in seconds.
    retry_backoff: bool | float = False
    #: The longest backoff delay, in seconds.
    retry_backoff_max: float = 600.0
    #: Spread backoff delays at random between 0 and the computed delay.
    retry_jitter: bool = True
    #: Seconds after which SoftTimeLimitExceeded is raised inside the task (process pool).
    soft_time_limit: float | None = None
    #: Seconds after which the task is stopped and fails with TimeLimitExceeded (process pool).
    time_limit: float | None = None
    #: Whether func is a coroutine function, found once (call() would look on every run).
    _coroutine: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.module_path)
        if len(self.name) > 255:  # The length of the columns that store it.
            raise InvalidTask(f"The task name {self.name[:40]!r}... is over 255 characters.")
        super(Task, self).__post_init__()
        object.__setattr__(self, "_coroutine", iscoroutinefunction(self.func))
        registry.register(self, self.name)

    def get_backend(self) -> TasksBackend:
        return backend_for(self.backend)

    @property
    def request(self) -> Request:
        """The current call's request (id, retries, args, ...); empty for a direct call."""
        return current_request()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here and now, like the plain function."""
        if self.bind:
            return self.func(self, *args, **kwargs)
        return self.func(*args, **kwargs)

    def call(self, *args: P.args, **kwargs: P.kwargs) -> R:
        leading = (self,) if self.bind else ()
        if self._coroutine:  # Django's call() runs it in an event loop.
            return super(Task, self).call(*leading, *args, **kwargs)
        return self.func(*leading, *args, **kwargs)

    async def acall(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.bind:
            return await DjangoTask.acall(self, self, *args, **kwargs)
        return await DjangoTask.acall(self, *args, **kwargs)

    def retry(
        self,
        exc: BaseException | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        max_retries: int | type[_Default] | None = _Default,
    ) -> Retry:
        """Ask the worker for another attempt of the running task: ``raise self.retry(exc=exc)``.

        Raises Retry (the worker schedules the attempt after ``countdown`` seconds, at ``eta``,
        or after ``default_retry_delay``). When ``max_retries`` (default: the task's) attempts
        were already retried, raises ``exc`` itself, or MaxRetriesExceededError without one.
        Called outside a worker, raises ``exc`` (or Retry).
        """
        request = self.request
        limit = self.max_retries if isinstance(max_retries, type) else max_retries
        if request.called_directly:
            raise exc if exc is not None else Retry("retry() called outside a worker")
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}]: {limit} retries were allowed."
            )
        if eta is not None:
            delay = max(0.0, eta.timestamp() - time.time())
        else:
            delay = self.default_retry_delay if countdown is None else float(countdown)
        raise Retry(exc=exc, when=delay)

    def retry_delay(self, retries: int) -> float:
        """The delay before automatic retry number ``retries + 1`` (backoff and jitter)."""
        if not self.retry_backoff:
            return self.default_retry_delay
        base = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(base * (2**retries), self.retry_backoff_max)
        return random.uniform(0, delay) if self.retry_jitter else delay  # noqa: S311

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Queue the task with these arguments; return its AsyncResult at once."""
        if type(self).apply_async is not Task.apply_async:  # A subclass's sees every call.
            return self.apply_async(args, kwargs)
        return self.get_backend().delay(self, args, kwargs)

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
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
    ) -> AsyncResult:
        """Queue the task with call options; return its AsyncResult at once.

        ``countdown`` (seconds) or ``eta`` (a datetime; a naive one is read in TIME_ZONE) delay
        it; ``expires`` (seconds, timedelta or datetime) drops it if no worker reached it by then;
        ``queue`` and ``priority`` (-100..100, higher first) override the task's and the route's.
        ``on_commit`` (Redis broker) overrides OPTIONS["PUBLISH_ON_COMMIT"]; ``time_limit`` and
        ``soft_time_limit`` (seconds) override the task's for this call.
        """
        args, kwargs = call_arguments(args, kwargs)
        headers = call_headers(headers, time_limit, soft_time_limit)
        if on_commit is not None and not isinstance(on_commit, bool):
            raise InvalidTask(f"on_commit must be True, False or None, not {on_commit!r}.")

        backend = self.get_backend()
        message = backend.send(
            self,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            priority=priority,
            task_id=task_id,
            on_commit=on_commit,
            headers=headers or None,
        )
        return backend.sent_result(message)

    def delay_many(self, calls: Iterable[tuple[Any, ...] | list[Any]]) -> list[AsyncResult]:
        """Queue one call per argument tuple in ``calls``, in one round trip to the broker.

        ``add.delay_many([(1, 2), (3, 4)])`` queues ``add(1, 2)`` and ``add(3, 4)``. All or none
        are queued: a call whose arguments cannot be sent queues nothing.
        """
        return self.apply_many([(list(args), {}) for args in calls])

    def apply_many(
        self,
        calls: Iterable[tuple[tuple[Any, ...] | list[Any], dict[str, Any]]],
        *,
        on_commit: bool | None = None,
        **options: Any,
    ) -> list[AsyncResult]:
        """Queue one call per ``(args, kwargs)`` in ``calls`` with apply_async()'s options.

        One round trip to the broker for the whole batch (``task_id`` is not accepted: each call
        gets its own id).
        """
        if "task_id" in options:
            raise InvalidTask("apply_many() gives each call its own id: task_id is not accepted.")
        batch = [(list(args), dict(kwargs)) for args, kwargs in calls]
        backend = self.get_backend()
        messages = backend.send_many(self, batch, on_commit=on_commit, **options)
        return [backend.sent_result(message) for message in messages]

    def AsyncResult(self, task_id: str) -> AsyncResult:
        from .result import AsyncResult

        return AsyncResult(task_id, backend=self.backend, task_name=self.name)


class TaskOptions(TypedDict, total=False):
    """The options of ``@task(...)`` other than ``bind`` and ``takes_context`` (see task())."""

    name: str | None
    queue: str | None
    queue_name: str | None
    priority: int
    backend: str
    ignore_result: bool
    max_retries: int | None
    default_retry_delay: float
    autoretry_for: tuple[type[BaseException], ...]
    retry_backoff: bool | float
    retry_backoff_max: float
    retry_jitter: bool
    soft_time_limit: float | None
    time_limit: float | None


# The overloads tell a type checker which parameters the task's calls take: the function's,
# without ``self`` (bind=True) or the context (takes_context=True).
@overload
def task[**P, R](function: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task[**P, R](
    *,
    bind: Literal[False] = False,
    takes_context: Literal[False] = False,
    **options: Unpack[TaskOptions],
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
@overload
def task[**P, R](
    *, bind: Literal[True], takes_context: Literal[False] = False, **options: Unpack[TaskOptions]
) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...
@overload
def task[**P, R](
    *, bind: Literal[False] = False, takes_context: Literal[True], **options: Unpack[TaskOptions]
) -> Callable[[Callable[Concatenate[TaskContext, P], R]], Task[P, R]]: ...
@overload
def task[R](
    *, bind: bool, takes_context: bool, **options: Unpack[TaskOptions]
) -> Callable[[Callable[..., R]], Task[..., R]]: ...
def task(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    queue_name: str | None = None,
    priority: int = DEFAULT_TASK_PRIORITY,
    backend: str = DEFAULT_TASK_BACKEND_ALIAS,
    bind: bool = False,
    ignore_result: bool = False,
    takes_context: bool = False,
    max_retries: int | None = 3,
    default_retry_delay: float = 180.0,
    autoretry_for: tuple[type[BaseException], ...] = (),
    retry_backoff: bool | float = False,
    retry_backoff_max: float = 600.0,
    retry_jitter: bool = True,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
) -> Any:
    """Turn a module-level function into a Task, registered under ``name`` (default: its path).

    Usable bare (``@task``) or with options (``@task(queue="hipri", bind=True)``). ``queue`` and
    Django's ``queue_name`` are the same option.
    """
    if queue and queue_name and queue != queue_name:
        raise InvalidTask("Give either queue= or queue_name=, not both.")

    def decorate(func: Callable[..., Any]) -> Task[..., Any]:
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
            max_retries=max_retries,
            default_retry_delay=default_retry_delay,
            autoretry_for=tuple(autoretry_for),
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
        )

    if function is not None:
        return decorate(function)
    return decorate
