"""Writing many TaskResult rows with one statement, their values sent as one JSON document.

A busy worker stores finished results in batches. Django's ``bulk_create(update_conflicts=True)``
builds model instances into SQL and adapts every value of every row as a parameter of its own;
here the rows travel as a single JSON parameter that the database unpacks itself
(``jsonb_to_recordset`` on PostgreSQL, ``json_each`` on SQLite), so a batch costs one round trip
and one JSON encoding, whatever its size. Other databases fall back to ``bulk_create``.

The statement is an upsert on the primary key: a row written earlier (STARTED, or REVOKED by a
revoke racing the task) is overwritten with the columns given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.db.models import Field, JSONField

from ..models import TaskResult

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

Converter = Callable[[Any], Any]


def upsert(using: str, results: Sequence[TaskResult], fields: Sequence[str]) -> None:
    """Insert ``results`` (every column), or update ``fields`` of the rows that exist.

    One statement, atomic by itself. When one id appears more than once, the last row wins (a
    database refuses to update a row twice in one statement).
    """
    prepared_upsert(using, results, fields)()


def prepared_upsert(
    using: str, results: Sequence[TaskResult], fields: Sequence[str]
) -> Callable[[], None]:
    """upsert() in two steps: the rows are encoded now, the returned call writes them.

    A caller that writes them in a transaction encodes them before it begins, so that the
    transaction (on SQLite, the database's write lock) lasts no longer than its statements.
    """
    rows = list({result.pk: result for result in results}.values())
    statement = _statement(connections[using].vendor, using, tuple(fields))
    if not rows:
        return _nothing
    if statement is None:

        def create() -> None:
            TaskResult.objects.using(using).bulk_create(
                rows, update_conflicts=True, unique_fields=["id"], update_fields=list(fields)
            )

        return create
    sql, columns = statement
    document = _json.encode([{name: convert(getattr(row, attname)) for name, attname, convert
                              in columns} for row in rows])  # fmt: skip

    def write() -> None:
        with connections[using].cursor() as cursor:
            cursor.execute(sql, [document])

    return write


def _nothing() -> None:
    pass


@lru_cache(maxsize=32)
def _statement(
    vendor: str, using: str, fields: tuple[str, ...]
) -> tuple[str, list[tuple[str, str, Converter]]] | None:
    """The SQL for ``vendor`` and, per column, its name, attribute and JSON converter."""
    connection = connections[using]
    meta = TaskResult._meta
    concrete = [meta.pk, *(f for f in meta.concrete_fields if not f.primary_key)]
    updated = {meta.get_field(name).name for name in fields}
    source = _source(vendor, connection, concrete)
    if source is None:
        return None
    qn = connection.ops.quote_name
    names = ", ".join(qn(_column(f)) for f in concrete)
    updates = ", ".join(
        f"{qn(_column(f))} = excluded.{qn(_column(f))}" for f in concrete if f.name in updated
    )
    # Only quoted column names and model types go into the text; the rows are the parameter.
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({names}) {source} "
        f"ON CONFLICT ({qn(_column(concrete[0]))}) DO UPDATE SET {updates}"
    )
    columns = [(_column(f), f.attname, _converter(f, vendor, connection)) for f in concrete]
    return sql, columns


def _source(
    vendor: str, connection: BaseDatabaseWrapper, fields: list[Field[Any, Any]]
) -> str | None:
    """The SELECT that turns the JSON parameter into rows, or None where there is none."""
    qn = connection.ops.quote_name
    if vendor == "postgresql":
        names = ", ".join(qn(_column(f)) for f in fields)
        record = ", ".join(f"{qn(_column(f))} {f.db_type(connection)}" for f in fields)
        return f"SELECT {names} FROM jsonb_to_recordset(%s::jsonb) AS r({record})"  # noqa: S608
    if vendor == "sqlite":
        values = ", ".join(f"json_extract(value, '$.{_column(f)}')" for f in fields)
        # "WHERE true" tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a
        # join of the SELECT.
        return f"SELECT {values} FROM json_each(%s) WHERE true"  # noqa: S608
    return None


def _column(field: Field[Any, Any]) -> str:
    return str(field.column)


def _converter(field: Field[Any, Any], vendor: str, connection: BaseDatabaseWrapper) -> Converter:
    """How one column's Python value goes into the JSON document."""
    if isinstance(field, JSONField):
        if vendor == "postgresql":
            return _same  # Nested as JSON; a None becomes SQL NULL, as Django stores it.
        return _json_text  # SQLite keeps JSON as text, as Django does.
    if field.get_internal_type() == "DateTimeField":
        if vendor == "postgresql":
            return _iso
        adapt = connection.ops.adapt_datetimefield_value
        return lambda value: None if value is None else adapt(value)
    return _same


def _same(value: Any) -> Any:
    return value


def _json_text(value: Any) -> str | None:
    return None if value is None else _json.encode(value)


def _iso(value: datetime | None) -> str | None:
    """An ISO 8601 time; a naive one is read in the connection's time zone, as Django's are."""
    if value is None:
        return None
    return value.isoformat()
