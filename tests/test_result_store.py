"""The worker's batched result writes: one statement per batch, read back as Django reads rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_tasks import TaskState
from django_tasks.messages import new_id
from django_tasks.models import TaskResult
from django_tasks.results.bulk import upsert
from django_tasks.results.store import FINISHED_FIELDS, STARTED_FIELDS, ResultStore
from tests.conftest import require_postgres
from tests.routers import ResultsOn


def finished_row(**values: Any) -> TaskResult:
    started = datetime(2026, 3, 29, 0, 59, 59, 123456, tzinfo=UTC)
    defaults: dict[str, Any] = {
        "id": new_id(),
        "task_name": "tests.testapp.tasks.add",
        "state": TaskState.SUCCESS,
        "queue": "hipri",
        "priority": -7,
        "args": [1, "zwei", {"drei": [3.5, None, True]}],
        "kwargs": {"ünïcode": "✓", "nested": {"a": []}},
        "result": {"sum": 3, "text": 'it\'s "quoted"'},
        "worker": "host:1-0",
        "worker_ids": ["host:1-0"],
        "retries": 2,
        "root_id": "root",
        "parent_id": "parent",
        "group_id": "group",
        "enqueued_at": started - timedelta(seconds=1),
        "started_at": started,
        "date_done": started + timedelta(microseconds=1),
    }
    return TaskResult.build(**{**defaults, **values})


def columns(row: TaskResult) -> dict[str, Any]:
    return {f.attname: getattr(row, f.attname) for f in TaskResult._meta.concrete_fields}


def test_rows_read_back_as_written(using: str) -> None:
    rows = [
        finished_row(),
        finished_row(result=None, state=TaskState.REVOKED, reason="expired"),
        finished_row(result="just text"),
        finished_row(
            result=None,
            state=TaskState.FAILURE,
            exception_type="builtins.ValueError",
            exception_message="bad",
            traceback="Traceback ...",
            errors=[{"exception_class_path": "builtins.ValueError", "traceback": "..."}],
            date_done=None,
        ),
    ]
    upsert(using, rows, FINISHED_FIELDS)
    stored = {r.pk: r for r in TaskResult.objects.using(using).filter(pk__in=[r.pk for r in rows])}
    assert len(stored) == len(rows)
    for row in rows:
        assert columns(stored[row.pk]) == columns(row)
    # A None result is SQL NULL, as Django stores it: JSON null would not match isnull.
    nulls = TaskResult.objects.using(using).filter(pk__in=[r.pk for r in rows], result__isnull=True)
    assert nulls.count() == 2


def test_a_batch_is_one_statement(using: str) -> None:
    rows = [finished_row() for _ in range(50)]
    with CaptureQueriesContext(connections[using]) as queries:
        upsert(using, rows, FINISHED_FIELDS)
    assert len(queries.captured_queries) == 1
    assert TaskResult.objects.using(using).count() == 50


def test_existing_rows_are_updated_in_the_columns_given(using: str) -> None:
    started = finished_row(state=TaskState.STARTED, result=None, date_done=None)
    upsert(using, [started], STARTED_FIELDS)
    done = finished_row(id=started.id, result=42, errors=[{"earlier": "attempt"}])
    upsert(using, [done], FINISHED_FIELDS)
    row = TaskResult.objects.using(using).get(pk=started.id)
    assert (row.state, row.result, row.errors) == (TaskState.SUCCESS, 42, [{"earlier": "attempt"}])
    # Columns left out of an update keep their value.
    again = finished_row(id=started.id, state=TaskState.STARTED, result=None, errors=[])
    upsert(using, [again], STARTED_FIELDS)
    row = TaskResult.objects.using(using).get(pk=started.id)
    assert (row.state, row.result, row.errors) == (TaskState.STARTED, 42, [{"earlier": "attempt"}])


def test_the_last_row_of_an_id_wins_within_a_batch(using: str) -> None:
    """A database refuses to update one row twice in a statement: the batch keeps the last."""
    first = finished_row(result=1)
    second = finished_row(id=first.id, result=2)
    upsert(using, [first, finished_row(), second], FINISHED_FIELDS)
    assert TaskResult.objects.using(using).get(pk=first.id).result == 2
    assert TaskResult.objects.using(using).count() == 2


@pytest.mark.django_db
def test_build_matches_the_keyword_constructor() -> None:
    values = {"id": "x", "task_name": "a.b", "state": TaskState.STARTED, "args": [1]}
    assert columns(TaskResult.build(**values)) == columns(TaskResult(**values))
    # Mutable defaults are fresh for every row.
    first, second = TaskResult.build(id="1"), TaskResult.build(id="2")
    assert first.errors == [] and first.errors is not second.errors


@pytest.mark.django_db(databases=["default", "postgres"])
def test_the_tables_every_task_writes_carry_no_index_they_do_not_need() -> None:
    # Each index costs every task's insert. PostgreSQL's "_like" twins of text indexes serve
    # only LIKE 'prefix%', which nothing runs; only grouped results enter the group index.
    require_postgres()
    with connections["postgres"].cursor() as cursor:
        cursor.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename IN "
            "('django_tasks_taskresult', 'django_tasks_queuedmessage')"
        )
        indexes = {name: (table, definition) for table, name, definition in cursor.fetchall()}
    assert not [name for name, (_, d) in indexes.items() if "pattern_ops" in d]
    assert "WHERE" in indexes["dt_result_group"][1]
    result_indexes = [name for name, (table, _) in indexes.items() if table.endswith("result")]
    assert len(result_indexes) == 6, sorted(result_indexes)
    # The lookups that need an index still have one.
    for column, table in (("task_name", "taskresult"), ("task_id", "queuedmessage")):
        assert any(t.endswith(table) and f"({column})" in d for t, d in indexes.values()), column


def test_expired_results_are_deleted_in_batches_and_unfinished_ones_kept(
    using: str, settings: Any
) -> None:
    from django_tasks.results import ResultStore

    settings.DATABASE_ROUTERS = [ResultsOn(using)]
    now = datetime.now(UTC)
    old = [finished_row(date_done=now - timedelta(days=2)) for _ in range(7)]
    recent = finished_row(date_done=now - timedelta(hours=1))
    running = finished_row(state=TaskState.STARTED, date_done=None,
                           started_at=now - timedelta(days=3))  # fmt: skip
    TaskResult.objects.using(using).bulk_create([*old, recent, running])

    store = ResultStore()
    # Two batches of 3 per call: one call deletes 6, the next the last one.
    assert store.delete_expired(timedelta(days=1), batch_size=3, max_batches=2) == 6
    assert store.delete_expired(timedelta(days=1), batch_size=3, max_batches=2) == 1
    assert store.delete_expired(timedelta(days=1), batch_size=3, max_batches=2) == 0
    left = set(TaskResult.objects.using(using).values_list("pk", flat=True))
    assert left == {recent.pk, running.pk}


def test_the_store_reads_a_row_as_the_orm_reads_it(using: str, settings: Any) -> None:
    settings.DATABASE_ROUTERS = [ResultsOn(using)]
    rows = [finished_row(), finished_row(result=None, date_done=None, errors=[{"a": [1]}])]
    upsert(using, rows, FINISHED_FIELDS)
    for row in rows:
        read = ResultStore().get(row.id)
        assert read is not None and read._state.db == using and not read._state.adding
        assert columns(read) == columns(TaskResult.objects.using(using).get(pk=row.id))
    assert ResultStore().get(new_id()) is None
