"""The worker's log output: the lines it writes, and Django's task signals and log records."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.tasks.signals import task_finished, task_started

from django_tasks.backend import get_backend
from django_tasks.brokers import Delivery
from django_tasks.management.commands.runworker import Command, skip_unheard
from django_tasks.messages import Message, new_id
from django_tasks.models import TaskResult
from django_tasks.states import TaskState
from django_tasks.worker.execution import Executor, Outcome, Short
from tests.conftest import E2E
from tests.testapp import tasks


class Collect(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def django_tasks_logger() -> Iterator[logging.Logger]:
    """Django's ``django.tasks`` logger, restored after the test."""
    logger = logging.getLogger("django.tasks")
    level, handlers, filters = logger.level, list(logger.handlers), list(logger.filters)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.filters[:] = filters


@contextmanager
def without_pytest_handlers() -> Iterator[None]:
    """Take off the handlers pytest puts on the root logger (they capture every record).

    What is left is a worker's logging: the test settings' LOGGING over Django's default.
    """
    root = logging.getLogger()
    captured = list(root.handlers)
    root.handlers[:] = []
    try:
        yield
    finally:
        root.handlers[:] = captured


def test_a_return_value_is_shown_cut_and_only_when_the_line_is_written() -> None:
    assert str(Short({"a": [1, 2]})) == "{'a': [1, 2]}"
    long = "x" * 500
    assert str(Short(long)) == repr(long)[: Short.LIMIT] + "..."

    class Counted:
        made = 0

        def __repr__(self) -> str:
            Counted.made += 1
            return "counted"

    quiet = logging.getLogger("tests.quiet")
    quiet.setLevel(logging.WARNING)
    quiet.info("Task %s succeeded: %s", "x", Short(Counted()))
    assert Counted.made == 0


def test_django_task_records_are_skipped_where_no_handler_would_write_them(
    django_tasks_logger: logging.Logger,
) -> None:
    # The test settings keep Django's default logging for "django", and DEBUG is off: Django's
    # console handler only writes with DEBUG on, and mail_admins only errors.
    with without_pytest_handlers():
        assert skip_unheard("django.tasks", logging.INFO, "Task id=%s", ("x",))
    assert not django_tasks_logger.isEnabledFor(logging.INFO)
    assert django_tasks_logger.isEnabledFor(logging.ERROR)  # Failures are logged as before.

    rejecting = Collect()
    rejecting.addFilter(lambda record: False)
    django_tasks_logger.setLevel(logging.NOTSET)
    django_tasks_logger.addHandler(rejecting)
    with without_pytest_handlers():
        assert skip_unheard("django.tasks", logging.INFO, "Task id=%s", ("x",))


def test_runworker_skips_django_records_that_go_nowhere(
    django_tasks_logger: logging.Logger,
) -> None:
    with without_pytest_handlers():
        Command._configure_logging("INFO")
    assert not django_tasks_logger.isEnabledFor(logging.INFO)


def test_django_task_records_are_kept_where_a_handler_writes_them(
    django_tasks_logger: logging.Logger,
) -> None:
    collect = Collect(logging.INFO)
    django_tasks_logger.addHandler(collect)
    with without_pytest_handlers():
        assert not skip_unheard("django.tasks", logging.INFO, "Task id=%s", ("x",))
        assert django_tasks_logger.isEnabledFor(logging.INFO)
        # runworker's set-up keeps them too, and Django's receivers log each start and end.
        Command._configure_logging("INFO")
    assert django_tasks_logger.isEnabledFor(logging.INFO)
    row = TaskResult.build(id="logged", task_name=tasks.add.name, state="SUCCESS")
    result = get_backend().to_django_result(row, tasks.add)
    task_started.send(type(get_backend()), task_result=result)
    task_finished.send(type(get_backend()), task_result=result)
    assert [r.getMessage() for r in collect.records] == [
        "Task id=logged path=tests.testapp.tasks.add state=SUCCESSFUL"
    ] * 2


#: A per-task line as runworker writes it (LOG_FORMAT), up to what follows the task id.
LINE = (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: INFO/[^\]]+\] "
    r"Task tests\.testapp\.tasks\.{task}\[{id}\] "
)


def line(task: str, task_id: str) -> str:
    return LINE.replace("{task}", task).replace("{id}", re.escape(task_id))


@pytest.mark.e2e
def test_a_worker_logs_how_each_task_ended_and_the_start_of_a_long_one(e2e: E2E) -> None:
    worker = e2e.start_worker("-c", "1", TRACK_STARTED_AFTER=1.0)
    quick = tasks.add.delay(1, 2)
    assert quick.get(timeout=20) == 3
    slow = tasks.sleep_then_record.delay("long", 1.5)
    assert slow.get(timeout=20) == "long"
    log = worker.log()
    # A quick task: one line, how it ended.
    quick_line = line("add", quick.id)
    quick_lines = re.findall(quick_line + ".*$", log, re.M)
    assert len(quick_lines) == 1, log
    assert re.fullmatch(quick_line + r"succeeded in \d+\.\d{3}s: 3", quick_lines[0])
    # A long one once it has run TRACK_STARTED_AFTER seconds, while it runs, and as it ends.
    slow_line = line("sleep_then_record", slow.id)
    started = re.search(slow_line + r"started 1\.\ds ago, still running$", log, re.M)
    ended = re.search(slow_line + r"succeeded in 1\.\d{3}s: 'long'$", log, re.M)
    assert started and ended, log
    assert started.start() < ended.start()


@pytest.mark.e2e
def test_with_track_started_after_0_every_start_is_logged_at_once(e2e: E2E) -> None:
    worker = e2e.start_worker("-c", "1", TRACK_STARTED_AFTER=0)
    result = tasks.add.delay(2, 3)
    assert result.get(timeout=20) == 5
    prefix = line("add", result.id)
    lines = re.findall(prefix + ".*$", worker.log(), re.M)
    assert len(lines) == 2, worker.log()
    assert re.fullmatch(prefix + "started", lines[0])
    assert re.fullmatch(prefix + r"succeeded in \d+\.\d{3}s: 5", lines[1])


@contextmanager
def only_djangos_receivers() -> Iterator[None]:
    """Take the test app's receivers off Django's task signals: only Django's own are left."""
    from tests.testapp.receivers import broken_django_receiver, on_django_signal

    for signal in (task_started, task_finished):
        assert signal.disconnect(on_django_signal)
        assert signal.disconnect(broken_django_receiver)
    try:
        yield
    finally:
        for signal in (task_started, task_finished):
            signal.connect(on_django_signal)
            signal.connect(broken_django_receiver)


class Counting:
    """Counts Django's signals sent (robustly) and the Django TaskResults made for them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        self.made = 0
        for name, signal in (("started", task_started), ("finished", task_finished)):
            monkeypatch.setattr(signal, "send_robust", self._send(name, signal.send_robust))
        backend_type = type(get_backend())
        original = backend_type.to_django_result

        def to_django_result(backend: Any, *args: Any, **kwargs: Any) -> Any:
            self.made += 1
            return original(backend, *args, **kwargs)

        monkeypatch.setattr(backend_type, "to_django_result", to_django_result)

    def _send(self, name: str, send: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent.append(name)
            return send(*args, **kwargs)

        return counted


def execute(task: Any, *args: Any) -> Outcome:
    """Run one call of ``task`` through a worker's executor, in this process."""
    message = Message(id=new_id(), task=task.name, args=list(args))
    delivery = Delivery(tag=message.id, queue="default", body="", message=message)
    executor = Executor(get_backend(), "test-worker")
    return executor.execute(delivery)


@pytest.mark.django_db
def test_django_task_signals_are_sent_for_every_task(
    django_tasks_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    errors = Collect(logging.ERROR)
    django_tasks_logger.addHandler(errors)
    with only_djangos_receivers():
        assert execute(tasks.add, 1, 2).state == TaskState.SUCCESS
        assert counting.sent == ["started", "finished"] and counting.made == 1
        # A task that takes its context gets the same Django TaskResult in it.
        outcome = execute(tasks.django_attempt, "v")
        assert outcome.row is not None and outcome.row.result["id"] == outcome.delivery.tag
        assert counting.made == 2
        # Django's receiver logs a failure at ERROR, with the traceback.
        failed = execute(tasks.observed_failure)
        assert failed.state == TaskState.FAILURE
        [record] = errors.records
        assert record.getMessage() == (
            f"Task id={failed.delivery.tag} path={tasks.observed_failure.name} state=FAILED"
        )
        assert record.exc_info and record.exc_info[0] is tasks.CustomError


@pytest.mark.django_db
def test_django_task_signals_are_sent_to_any_other_receiver_or_heard_log(
    django_tasks_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    django_tasks_logger.setLevel(logging.INFO + 1)
    assert execute(tasks.observed).state == TaskState.SUCCESS  # The test app's receivers.
    assert counting.sent == ["started", "finished"]
    counting.sent.clear()
    collect = Collect(logging.INFO)
    django_tasks_logger.addHandler(collect)
    django_tasks_logger.setLevel(logging.NOTSET)
    with only_djangos_receivers():
        outcome = execute(tasks.add, 1, 2)
    assert counting.sent == ["started", "finished"]
    assert [r.getMessage() for r in collect.records] == [
        f"Task id={outcome.delivery.tag} path={tasks.add.name} state={state}"
        for state in ("RUNNING", "SUCCESSFUL")
    ]


@pytest.mark.django_db(transaction=True)
def test_each_task_of_a_batch_gets_its_line_before_its_result_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The "succeeded" lines of a batch are written in run order, before its results are stored."""
    from django_tasks.results.store import ResultStore
    from django_tasks.worker.consumer import Consumer

    results = tasks.add.delay_many([(i, 1) for i in range(30)])
    worker_logger = logging.getLogger("django_tasks.worker")
    collect = Collect(logging.INFO)
    stores: list[tuple[int, int]] = []  # (lines written, results stored) at each store
    save_finished, prepare_finished = ResultStore.save_finished, ResultStore.prepare_finished

    def note(rows: Any) -> None:
        stored = (stores[-1][1] if stores else 0) + len(rows)
        stores.append((len(collect.records), stored))

    def noting(store: ResultStore, rows: Any) -> None:
        note(rows)
        save_finished(store, rows)

    def preparing(store: ResultStore, rows: Any) -> Any:
        write = prepare_finished(store, rows)

        def written() -> None:  # The database broker writes them with its acks.
            note(rows)
            write()

        return written

    monkeypatch.setattr(ResultStore, "save_finished", noting)
    monkeypatch.setattr(ResultStore, "prepare_finished", preparing)
    level = worker_logger.level
    worker_logger.setLevel(logging.INFO)
    worker_logger.addHandler(collect)
    try:
        Consumer(get_backend(), ["default"], "test-0", burst=True).run()
    finally:
        worker_logger.removeHandler(collect)
        worker_logger.setLevel(level)
    lines = [r.getMessage() for r in collect.records]
    pattern = r"Task {}\[{}\] succeeded in \d+\.\d{{3}}s: {}"
    assert len(lines) == len(results)
    for n, (result, text) in enumerate(zip(results, lines, strict=True)):
        assert re.fullmatch(pattern.format(re.escape(tasks.add.name), result.id, n + 1), text)
    assert stores[-1][1] == len(results)
    assert all(written >= stored for written, stored in stores)
