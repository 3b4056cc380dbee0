"""The database broker's hot statements, send and claim, one round trip each.

The ORM would lease in a transaction of four round trips (BEGIN, SELECT ... FOR UPDATE SKIP
LOCKED, UPDATE, COMMIT), and send with two on PostgreSQL (INSERT, then NOTIFY). PostgreSQL and
SQLite (3.35 and later) pick, lease and return the rows with one ``UPDATE ... RETURNING``, a
transaction by itself; they are the databases the broker supports (see unsupported_database(),
reported by the system checks).

Only quoted table and column names of our own models go into the SQL text; every value is a
parameter.

On PostgreSQL the statements read the time from the database's clock, ``statement_timestamp()``
(Django's ``Now()``), never from the caller's: the hosts that send and consume may disagree by
seconds, and a worker ahead would take over leases that others still renew, or deliver delayed
messages early. ``statement_timestamp()`` is one instant for the whole statement (every row
compares with the same time, and the planner can use it in an index condition, which it cannot
with the volatile ``clock_timestamp()``), and, unlike ``now()``, the time of the statement rather
than of its transaction: a message sent inside the caller's long ``atomic()`` block counts its
delay from the INSERT, as its sender does. SQLite is read and written on one host: the caller's
clock is the database's, and goes in as a parameter.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.core import checks
from django.db import connections

from ..models import QueuedMessage, TaskResult
from ..states import TaskState

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

#: RETURNING columns of the claim: pk, body, delivery_count, priority, available_at[, revoked].
CLAIM_COLUMNS = ("id", "body", "delivery_count", "priority", "available_at")
#: The database's time, as a PostgreSQL expression (see the module's docstring).
PG_NOW = "statement_timestamp()"


def database_broker_errors(backend: str, alias: str) -> list[checks.Error]:
    """The system-check error of a database broker on a database it does not support."""
    problem = unsupported_database(connections[alias])
    if problem is None:
        return []
    message = f"TASKS[{backend!r}] keeps its queues on the database {alias!r}, but {problem}."
    return [checks.Error(message, id="django_tasks.E004")]


def unsupported_database(connection: BaseDatabaseWrapper) -> str | None:
    """Why the database broker cannot run on ``connection``'s database; None when it can."""
    if connection.vendor == "postgresql":
        return None
    if connection.vendor == "sqlite":
        version: tuple[int, ...] = getattr(connection, "Database").sqlite_version_info  # noqa: B009
        if version >= (3, 35):
            return None
        return f"SQLite {'.'.join(map(str, version))} has no UPDATE ... RETURNING (3.35 has)"
    return f"the database broker supports PostgreSQL and SQLite only, not {connection.display_name}"


@lru_cache(maxsize=8)
def claim_sql(vendor: str, quote: str, with_revoked: bool) -> str:
    """``UPDATE ... RETURNING`` leasing up to a number of ready messages of one queue.

    Parameters: see claim_params(). ``quote`` is the database's identifier quote (part of the
    cache key). With ``with_revoked``, the last of CLAIM_COLUMNS is followed by a column that
    says whether the task's result row is REVOKED (results on this database).

    On PostgreSQL, whose clock decides, every row has two more columns: the database's time
    (a Unix time), and NULL. When fewer than ``count`` rows were leased the statement returns
    one more row: its pk is NULL and its last column says in how many seconds the queue's next
    delayed message is due (NULL when none is). From the same snapshot as the claim, it tells
    the consumer that nothing else is ready, and how long it may sleep.
    """

    def qn(name: str) -> str:
        """The quoted column of QueuedMessage's field ``name``."""
        return f"{quote}{_column(QueuedMessage, name)}{quote}"

    table = f"{quote}{QueuedMessage._meta.db_table}{quote}"
    returned = [f"{table}.{qn(column)}" for column in CLAIM_COLUMNS]
    if with_revoked:
        results = f"{quote}{TaskResult._meta.db_table}{quote}"
        result_id = f"{quote}{_column(TaskResult, 'id')}{quote}"
        state = f"{quote}{_column(TaskResult, 'state')}{quote}"
        returned.append(
            f"EXISTS (SELECT 1 FROM {results} WHERE {results}.{result_id} = "  # noqa: S608
            f"{table}.{qn('task_id')} AND {results}.{state} = %s)"
        )
    postgres = vendor == "postgresql"
    now = PG_NOW if postgres else "%s"
    # The subquery walks the partial index dt_queue_ready in delivery order.
    ready = (
        f"SELECT {qn('id')} FROM {table} WHERE {qn('queue')} = %s AND "  # noqa: S608
        f"{qn('leased_until')} IS NULL AND {qn('available_at')} <= {now} "
        f"ORDER BY {qn('priority')} DESC, {qn('available_at')}, {qn('id')} LIMIT %s"
    )
    until = f"{PG_NOW} + make_interval(secs => %s)" if postgres else "%s"
    lease = (
        f"UPDATE {table} SET {qn('leased_until')} = {until}, {qn('lease_token')} = %s, "  # noqa: S608
        f"{qn('delivery_count')} = {table}.{qn('delivery_count')} + 1"
    )
    if postgres:
        # SKIP LOCKED: concurrent consumers take different rows and never wait for each other.
        claim = (
            f"{lease} FROM ({ready} FOR UPDATE SKIP LOCKED) AS picked "
            f"WHERE {table}.{qn('id')} = picked.{qn('id')} RETURNING {', '.join(returned)}"
        )
        # One probe of the partial index dt_queue_delayed, made only when the claim is short.
        next_due = (
            f"SELECT {qn('available_at')} FROM {table} WHERE {qn('queue')} = %s AND "  # noqa: S608
            f"{qn('leased_until')} IS NULL AND {qn('delayed')} AND {qn('available_at')} > {now} "
            f"ORDER BY {qn('available_at')} LIMIT 1"
        )
        clock = f"date_part('epoch', {now})"
        due_in = f"date_part('epoch', ({next_due}) - {now})"
        nulls = ", ".join(["NULL"] * len(returned))
        return (
            f"WITH claimed AS ({claim}) SELECT *, {clock}, NULL::float8 FROM claimed "  # noqa: S608
            f"UNION ALL SELECT {nulls}, {clock}, {due_in} "
            "WHERE (SELECT count(*) FROM claimed) < %s"
        )
    # SQLite runs one writing statement at a time: the subquery cannot pick a leased row.
    return f"{lease} WHERE {qn('id')} IN ({ready}) RETURNING {', '.join(returned)}"


def _column(model: type[QueuedMessage] | type[TaskResult], name: str) -> str:
    return str(model._meta.get_field(name).column)  # type: ignore[union-attr]


def claim_params(
    vendor: str,
    lease: Any,
    token: str,
    queue: str,
    count: int,
    with_revoked: bool,
    now: Any = None,
) -> list[Any]:
    """The parameters of claim_sql(), in its order.

    On PostgreSQL ``lease`` is the length of the lease in seconds, counted on the database's
    clock; elsewhere it is the time the lease ends, and ``now`` the current time (as the
    database stores times).
    """
    if vendor == "postgresql":
        params: list[Any] = [lease, token, queue, count]
    else:
        params = [lease, token, queue, now, count]
    if with_revoked:
        params.append(TaskState.REVOKED)
    return [*params, queue, count] if vendor == "postgresql" else params


#: The fields of each message that send_sql() reads from its JSON document, with their
#: PostgreSQL types: QueuedMessage's, and ``delay``.
SEND_FIELDS = (
    ("task_id", "text"),
    ("queue", "text"),
    ("priority", "smallint"),
    ("available_at", "timestamptz"),
    ("delay", "float8"),
    ("delayed", "boolean"),
    ("body", "text"),
)


@lru_cache(maxsize=2)
def send_sql(vendor: str) -> str:
    """Insert a batch of messages with one statement; on PostgreSQL, NOTIFY channels too.

    Parameters on PostgreSQL: the messages as one JSON array of objects (SEND_FIELDS), then
    the channels to notify (a text array; notifications are transactional: they fire on
    commit). A message is due at its ``available_at`` or, when that is null, ``delay``
    seconds from now by the database's clock. Elsewhere: the time now (as the database stores
    times), then the messages, each due at its ``available_at`` (worked out by the caller).
    """
    table = _quote(QueuedMessage._meta.db_table)
    columns = ["task_id", "queue", "priority", "available_at", "delayed", "body", "created_at"]
    columns += ["leased_until", "lease_token", "delivery_count"]
    names = ", ".join(_quote(_column(QueuedMessage, name)) for name in columns)
    if vendor == "postgresql":
        record = ", ".join(f"{_quote(name)} {kind}" for name, kind in SEND_FIELDS)
        due = f"COALESCE(r.available_at, {PG_NOW} + make_interval(secs => r.delay))"
        values = f"r.task_id, r.queue, r.priority, {due}, r.delayed, r.body, {PG_NOW}, NULL, '', 0"
        return (
            f"WITH inserted AS (INSERT INTO {table} ({names}) SELECT {values} "  # noqa: S608
            f"FROM jsonb_to_recordset(%s::jsonb) AS r({record}) RETURNING 1) "
            "SELECT (SELECT count(*) FROM inserted), pg_notify(c, '') FROM unnest(%s::text[]) AS c"
        )
    fields = ("task_id", "queue", "priority", "available_at", "delayed", "body")
    values = ", ".join(f"json_extract(value, '$.{name}')" for name in fields)
    return (
        f"INSERT INTO {table} ({names}) "  # noqa: S608
        f"SELECT {values}, %s, NULL, '', 0 FROM json_each(%s)"
    )


def _quote(name: str) -> str:
    return f'"{name}"'
