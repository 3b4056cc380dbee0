"""TasksBackend: our entry in Django's TASKS setting, and the way tasks reach a broker."""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.dispatch import receiver
from django.tasks import Task as DjangoTask
from django.tasks import TaskResult as DjangoTaskResult
from django.tasks import TaskResultStatus, task_backends
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, TaskError
from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone
from django.utils.module_loading import import_string

from . import outbox
from .brokers import Broker, create_broker
from .brokers.base import Outgoing
from .brokers.database_sql import database_broker_errors
from .conf import BackendConfig
from .exceptions import EncodeError
from .messages import Message, new_id
from .middleware import Middleware, MiddlewareStack
from .options import checked_headers, checked_task_id, eta_option, expires_option
from .registry import install_backend_lookup, registry
from .result import AsyncResult
from .results.store import ResultStore
from .signals import send_robust
from .states import DJANGO_STATUS
from .task import Task

if TYPE_CHECKING:
    from .models import TaskResult


class TasksBackend(BaseTaskBackend):
    """Runs tasks on django_tasks workers through a Redis or database broker."""

    task_class = Task
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.params = params

    @cached_property
    def config(self) -> BackendConfig:
        """The validated OPTIONS; raises ConfigurationError (an ImproperlyConfigured)."""
        return BackendConfig.from_params(self.alias, self.params)

    @cached_property
    def middleware(self) -> list[Middleware]:
        """The project's middleware (OPTIONS["MIDDLEWARE"]), each made once; check() says
        which cannot be imported."""
        return [_middleware(path) for path in self.config.middleware]

    @cached_property
    def hooks(self) -> MiddlewareStack:
        """The project's middleware as a stack, for the enqueue hooks."""
        return MiddlewareStack(self.middleware)

    @cached_property
    def broker(self) -> Broker:
        broker = create_broker(self.config)
        _brokers.add(broker)
        return broker

    def task_name(self, task: DjangoTask) -> str:
        return task.name if isinstance(task, Task) else task.module_path

    # Enqueueing -----------------------------------------------------------------------------

    def enqueue(self, task: DjangoTask, args: Any, kwargs: Any) -> DjangoTaskResult:
        """Django's enqueue(): queue the task and return a READY TaskResult."""
        self.validate_task(task)
        message = self.send(task, list(args), dict(kwargs))
        result = self._django_result(task, message.id, TaskResultStatus.READY, args, kwargs)
        object.__setattr__(result, "enqueued_at", timezone.now())
        send_robust(task_enqueued, type(self), task_result=result)
        return result

    def send(
        self,
        task: DjangoTask,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        on_commit: bool | None = None,
        **options: Any,
    ) -> Message:
        """Build the message for one call of ``task`` and publish it. Returns the message.

        ``options`` are apply_async()'s: countdown, eta, expires, queue, priority, task_id and
        headers.
        """
        message = self.message(task, args, kwargs, **options)
        self.publish([message], on_commit=on_commit)
        return message

    def send_many(
        self,
        task: DjangoTask,
        calls: Sequence[tuple[list[Any], dict[str, Any]]],
        *,
        on_commit: bool | None = None,
        **options: Any,
    ) -> list[Message]:
        """Publish one message per ``(args, kwargs)`` in ``calls``, in one round trip."""
        messages = [self.message(task, args, kwargs, **options) for args, kwargs in calls]
        self.publish(messages, on_commit=on_commit)
        return messages

    def delay(self, task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncResult:
        """Task.delay(): send one call with no options and return its AsyncResult."""
        return self.sent_result(self.send(task, list(args), kwargs))

    def sent_result(self, message: Message) -> AsyncResult:
        """The AsyncResult of a message this process sent."""
        return AsyncResult(message.id, backend=self.alias, task_name=message.task)

    def message(
        self,
        task: DjangoTask,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Message:
        """The message of one call of ``task``, its options validated and its route applied."""
        name = self.task_name(task)
        route = self.config.routes.get(name, {})
        return Message(
            id=new_id() if task_id is None else checked_task_id(task_id),
            task=name,
            args=args,
            kwargs=kwargs,
            queue=self._queue(queue or route.get("queue") or task.queue_name),
            priority=self._priority(priority, route.get("priority"), task.priority),
            eta=eta_option(countdown, eta, task.run_after),
            eta_from_countdown=countdown is not None,
            expires=expires_option(expires),
            headers=checked_headers(headers),
        )

    def publish(self, messages: Sequence[Message], *, on_commit: bool | None = None) -> None:
        """Send ``messages`` (one round trip) now, or when the caller's transaction commits.

        The database broker writes inside the transaction of its own database, so a rollback
        discards the messages. Otherwise, inside ``atomic()`` (on any database) they are written
        to the outbox in that transaction and sent when it commits (see outbox.py), unless
        ``on_commit`` or PUBLISH_ON_COMMIT say not to. Every message is encoded and size-checked
        first: a bad one sends none. The project's middleware sees each message before it is
        encoded (before_enqueue) and after it is sent (after_enqueue).
        """
        for message in messages:
            self.hooks.before_enqueue(message)
        self._dispatch([self.broker.encode(message) for message in messages], on_commit)
        for message in messages:
            self.hooks.after_enqueue(message)

    def _dispatch(self, batch: Sequence[Outgoing], on_commit: bool | None) -> None:
        """publish() for messages already encoded."""
        for message, body in batch:
            if "\\u0000" in body:  # Rare: look closer only then.
                _refuse_unstorable_nul(message, body)
        if self.broker.transactional and connections[self.config.database].in_atomic_block:
            self.broker.send(batch)
            return
        defer = self.config.publish_on_commit if on_commit is None else on_commit
        using = _open_transaction() if defer else None
        if using is not None:
            outbox.publish_on_commit(self.broker, self.alias, batch, using)
        else:
            self.broker.send(batch)

    def _queue(self, queue: str) -> str:
        if not isinstance(queue, str):
            raise InvalidTask(f"queue must be a queue name, not {queue!r}.")
        if self.queues and queue not in self.queues:
            raise InvalidTask(
                f"Queue {queue!r} is not in TASKS[{self.alias!r}]['QUEUES'] "
                f"({', '.join(sorted(self.queues))})."
            )
        return queue

    @staticmethod
    def _priority(explicit: int | None, routed: int | None, default: int) -> int:
        value = explicit if explicit is not None else routed if routed is not None else default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidTask(f"priority must be a whole number, not {value!r}.")
        if not TASK_MIN_PRIORITY <= value <= TASK_MAX_PRIORITY:
            raise InvalidTask(
                f"priority must be between {TASK_MIN_PRIORITY} and {TASK_MAX_PRIORITY}, "
                f"not {value}."
            )
        return value

    # Results ----------------------------------------------------------------------------------

    def get_result(self, result_id: str) -> DjangoTaskResult:
        """Django's get_result(): the stored result, or READY while the message waits."""
        row = ResultStore().get(result_id)
        if row is not None:
            return self.to_django_result(row)
        message = self.broker.find(result_id, self.known_queues())
        if message is None:
            # A worker stores the result before it acks the message: the task may have finished
            # between the two reads.
            row = ResultStore().get(result_id)
            if row is not None:
                return self.to_django_result(row)
            raise TaskResultDoesNotExist(result_id)
        task = resolve_task(message.task)
        return self._django_result(
            task, message.id, TaskResultStatus.READY, message.args, message.kwargs
        )

    def known_queues(self) -> list[str]:
        """The queues this backend's tasks may be in: QUEUES, or the default queue alone."""
        return sorted(self.queues) if self.queues else [self.config.default_queue]

    def to_django_result(self, row: TaskResult, task: DjangoTask | None = None) -> DjangoTaskResult:
        """Our TaskResult row as Django's TaskResult."""
        result = self._django_result(
            task or resolve_task(row.task_name),
            row.id,
            DJANGO_STATUS[row.state],
            row.args,
            row.kwargs,
        )
        errors = [
            TaskError(exception_class_path=e["exception_class_path"], traceback=e["traceback"])
            for e in row.errors
        ]
        for attr, value in (
            ("enqueued_at", row.enqueued_at),
            ("started_at", row.started_at),
            ("last_attempted_at", row.started_at),
            ("finished_at", row.date_done),
            ("errors", errors),
            ("worker_ids", list(row.worker_ids)),
            ("_return_value", row.result),
        ):
            object.__setattr__(result, attr, value)
        return result

    def _django_result(
        self, task: DjangoTask, task_id: str, status: TaskResultStatus, args: Any, kwargs: Any
    ) -> DjangoTaskResult:
        return DjangoTaskResult(
            task=task,
            id=task_id,
            status=status,
            enqueued_at=None,
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )

    # Checks -----------------------------------------------------------------------------------

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        try:
            config = self.config
        except ImproperlyConfigured as exc:
            return [checks.Error(str(exc), id="django_tasks.E001")]
        errors: list[checks.CheckMessage] = []
        if config.broker_kind == "database" and config.database not in settings.DATABASES:
            errors.append(
                checks.Error(
                    f"TASKS[{self.alias!r}]['OPTIONS']['DATABASE'] names the database "
                    f"{config.database!r}, which is not in DATABASES.",
                    id="django_tasks.E002",
                )
            )
        elif config.broker_kind == "database":
            errors += database_broker_errors(self.alias, config.database)
        for path in config.middleware:
            try:
                _middleware(path)
            except (ImportError, TypeError) as exc:
                errors.append(checks.Error(
                    f"TASKS[{self.alias!r}]['OPTIONS']['MIDDLEWARE'] has {path!r}: {exc}",
                    id="django_tasks.E005",
                ))  # fmt: skip
        for route_name, route in config.routes.items():
            queue = route.get("queue")
            if queue and self.queues and queue not in self.queues:
                errors.append(
                    checks.Error(
                        f"TASKS[{self.alias!r}]['OPTIONS']['ROUTES'][{route_name!r}] sends to "
                        f"the queue {queue!r}, which is not in QUEUES.",
                        id="django_tasks.E003",
                    )
                )
        return errors


#: A NUL character escaped in JSON text: "\u0000" after an even number of backslashes.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _refuse_unstorable_nul(message: Message, body: str) -> None:
    """Raise EncodeError if ``message`` holds a NUL character and results go to PostgreSQL.

    PostgreSQL's text and jsonb cannot hold it: the worker could not store the task's row.
    """
    from .models import TaskResult

    if not _ESCAPED_NUL.search(body):
        return
    using = router.db_for_write(TaskResult)
    if connections[using].vendor == "postgresql":
        raise EncodeError(
            f"The arguments of task {message.task!r} hold a NUL character (\\x00), which "
            f"PostgreSQL cannot store (task results are on the database {using!r}). Remove it, "
            "or pass the value encoded (base64, say)."
        )


def _open_transaction() -> str | None:
    """The alias of a database whose atomic block the caller is in (the default one first).

    This runs for every task sent: one look at each database's connection wrapper (made
    without connecting if this thread had none).
    """
    found = None
    for alias in connections.settings:  # A plain dict: no per-thread lookups to list them.
        if connections[alias].in_atomic_block:
            if alias == DEFAULT_DB_ALIAS:
                return DEFAULT_DB_ALIAS
            found = found or alias
    return found


def _middleware(path: str) -> Middleware:
    """An instance of the middleware class at ``path``; ImportError or TypeError if none."""
    cls = import_string(path)
    if not (isinstance(cls, type) and issubclass(cls, Middleware)):
        raise TypeError("not a subclass of django_tasks.middleware.Middleware")
    return cls()


def resolve_task(name: str) -> DjangoTask:
    """The registered task called ``name``; imports the tasks modules once if needed."""
    task = registry.get(name)
    if task is None:
        registry.autodiscover()
        task = registry.get(name)
    if task is None:
        try:
            candidate = import_string(name)
        except ImportError:
            candidate = None
        if isinstance(candidate, DjangoTask):
            task = candidate
    if task is None:
        raise TaskResultDoesNotExist(f"The task {name!r} of this result is not registered.")
    return task


# Our backend for an alias, even when TASKS does not configure one ------------------------------

_implicit_backends: dict[str, TasksBackend] = {}
_implicit_lock = threading.Lock()


def get_backend(alias: str = "default") -> TasksBackend:
    """Our backend for ``alias``; with no TasksBackend configured there, the database default.

    A project that only adds the app gets the database broker with default options. Each
    thread remembers what it got (until TASKS changes): Django's handler answers through an
    asgiref Local, whose cost showed in every delay().
    """
    cache: tuple[int, dict[str, TasksBackend]] | None = getattr(_local, "backends", None)
    if cache is None or cache[0] != _generation[0]:
        cache = _local.backends = (_generation[0], {})
    backends = cache[1]
    backend = backends.get(alias)
    if backend is None:
        backend = backends[alias] = _get_backend(alias)
    return backend


def _get_backend(alias: str) -> TasksBackend:
    try:
        backend = task_backends[alias]
    except InvalidTaskBackend:
        backend = None
    if isinstance(backend, TasksBackend):
        return backend
    with _implicit_lock:
        if alias not in _implicit_backends:
            _implicit_backends[alias] = TasksBackend(alias, {})
        return _implicit_backends[alias]


#: Every broker a backend made, so that a reset can close their connections.
_brokers: weakref.WeakSet[Broker] = weakref.WeakSet()


_local = threading.local()
#: Bumped when TASKS changes: every thread's cache of get_backend() is then stale.
_generation = [0]


install_backend_lookup(get_backend)


def reset_implicit_backends() -> None:
    with _implicit_lock:
        _implicit_backends.clear()
        _generation[0] += 1


def close_brokers() -> None:
    """Close the connections of every broker made so far (they reconnect if used again).

    Called when TASKS changes (Django then forgets its backends): a broker's result
    subscription or LISTEN connection must not outlive the backend that made it.
    """
    for broker in list(_brokers):
        broker.close()


@receiver(setting_changed)
def reset_backends(*, setting: str, **kwargs: object) -> None:
    """Forget cached backends (and close their brokers) when a test overrides TASKS."""
    if setting == "TASKS":
        close_brokers()
        reset_implicit_backends()
