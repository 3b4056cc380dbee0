"""Middleware used by the test suite (tests/test_middleware.py)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from typing import Any

from django_tasks.messages import Message
from django_tasks.middleware import Middleware, SkipTask, TaskRun

#: The hook calls Recorder saw: (middleware name, hook, state or task id).
calls: list[tuple[str, str, Any]] = []


class Recorder(Middleware):
    """Notes every hook it sees, with the run's state at that moment."""

    name = "recorder"

    def before_enqueue(self, message: Message) -> None:
        calls.append((self.name, "before_enqueue", message.task))

    def after_enqueue(self, message: Message) -> None:
        calls.append((self.name, "after_enqueue", message.task))

    def before_execute(self, run: TaskRun) -> None:
        calls.append((self.name, "before_execute", run.state))

    def after_execute(self, run: TaskRun) -> None:
        calls.append((self.name, "after_execute", run.state))

    def on_success(self, run: TaskRun) -> None:
        calls.append((self.name, "on_success", run.value))

    def on_failure(self, run: TaskRun) -> None:
        calls.append((self.name, "on_failure", type(run.exception).__name__))

    def on_retry(self, run: TaskRun) -> None:
        calls.append((self.name, "on_retry", run.next_message is not None))

    def on_skip(self, run: TaskRun) -> None:
        calls.append((self.name, "on_skip", run.reason))

    def after_ack(self, runs: Sequence[TaskRun]) -> None:
        calls.append((self.name, "after_ack", [run.message.id for run in runs]))


class SecondRecorder(Recorder):
    name = "second"


class Maintenance(Middleware):
    """Skips the tasks whose kwargs ask for it, as a maintenance switch would."""

    def before_execute(self, run: TaskRun) -> None:
        if run.message.kwargs.get("skip_me"):
            raise SkipTask("maintenance")


class Broken(Middleware):
    """Every hook raises: the worker logs it and carries on."""

    def before_enqueue(self, message: Message) -> None:
        raise RuntimeError("broken before_enqueue")

    def before_execute(self, run: TaskRun) -> None:
        raise RuntimeError("broken before_execute")

    def after_execute(self, run: TaskRun) -> None:
        raise RuntimeError("broken after_execute")

    def on_success(self, run: TaskRun) -> None:
        raise RuntimeError("broken on_success")


# The README's example: every task carries the tenant of the code that sent it.

current_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


class TenantMiddleware(Middleware):
    def before_enqueue(self, message: Message) -> None:
        tenant = current_tenant.get()
        if tenant is not None:
            message.headers.setdefault("tenant", tenant)

    def before_execute(self, run: TaskRun) -> None:
        run.notes["tenant"] = current_tenant.set(run.message.headers.get("tenant"))

    def after_execute(self, run: TaskRun) -> None:
        current_tenant.reset(run.notes["tenant"])


class TimingMiddleware(Middleware):
    """The README's other example: how long each task took, by task name."""

    seconds: dict[str, list[float]] = {}

    def before_execute(self, run: TaskRun) -> None:
        run.notes["timer"] = time.perf_counter()

    def after_execute(self, run: TaskRun) -> None:
        elapsed = time.perf_counter() - run.notes["timer"]
        self.seconds.setdefault(run.task.name, []).append(elapsed)
