"""The database broker: queues kept in the QueuedMessage table of one of the project's databases.

A message is a row. ``consume`` leases rows by writing ``leased_until`` and a random
``lease_token``; every later operation on a delivery names its row *and* its token, so a consumer
whose lease expired and was taken by another can no longer ack, extend, release or requeue it.

On PostgreSQL, consumers lease with ``SELECT ... FOR UPDATE SKIP LOCKED`` and sleep on
LISTEN/NOTIFY: ``send`` notifies a channel per queue (on commit, as NOTIFY is transactional) and an
idle consumer wakes at once. Without SKIP LOCKED (SQLite), one conditional UPDATE leases; without
NOTIFY, idle consumers poll every ``poll_interval`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cached_property, reduce
from operator import or_
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.models import Count, Expression, Q
from django.db.models.functions import Now
from django.utils import timezone

from ..conf import BackendConfig
from ..exceptions import BrokerConnectionError, DecodeError
from ..messages import Message, decode
from ..models import QueuedMessage, QueuedMessageQuerySet, TaskResult
from .base import (
    Broker,
    Delivery,
    Outgoing,
    PollingWaiter,
    ResultWaiter,
    per_process,
    warn_if_lost,
)
from .database_listen import (
    ListenSubscription,
    can_listen_with_psycopg,
    database_key,
    libpq_connect_timeout,
)
from .database_sql import claim_params, claim_sql, send_sql
from .notifications import Hub, Waiter, announced_ids

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("django_tasks.brokers.database")

#: The PostgreSQL channel of result notifications; payloads are JSON lists of task ids.
RESULTS_CHANNEL = "dt_results"
#: NOTIFY payloads must stay under 8000 bytes.
MAX_PAYLOAD = 7900
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: A time for a query: a datetime, or an expression the database works out (Now()).
type Instant = datetime | Expression
#: How long to retry a claim while SQLite reports "database is locked".
LOCKED_RETRY_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


class DatabaseBroker(Broker):
    """A broker over the QueuedMessage table of the database ``config.database``."""

    #: send() runs on the caller's connection: it commits or rolls back with the caller's data.
    transactional = True
    #: Seconds between two passes that return expired leases to their queue.
    lease_check_interval = 0.5
    #: The longest an idle PostgreSQL consumer sleeps before looking again (a safety net for
    #: expired leases and missed notifications; due delayed messages wake it on time).
    max_wait = 1.0
    #: The polling interval of an idle consumer where the database cannot notify.
    poll_interval = 0.05
    #: PostgreSQL: VACUUM the queue table after acknowledging this many messages (0: never).
    #: Every message is a row inserted then deleted; until vacuumed, the dead rows stay in the
    #: index that each claim walks, and a busy queue slows down by the minute. Autovacuum may
    #: lag far behind such a table (or be off): consumers clean up after themselves.
    vacuum_every = 5000

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.alias = config.database
        self._next_lease_check = 0.0
        self._acked_since_vacuum = 0
        self._idle = _Idle()
        #: The waiters of this broker's consumer threads (see _queue_waiter()).
        self._queue_waiters: set[Waiter] = set()
        self._bound_connecting()

    # Plumbing -------------------------------------------------------------------------------

    @property
    def connection(self) -> BaseDatabaseWrapper:
        return connections[self.alias]

    def _bound_connecting(self) -> None:
        """Give PostgreSQL connections ``connect_timeout`` where the project set none.

        Without it, libpq waits for ever on a server that accepts connections but never answers,
        and delay() with it. The option joins the database's settings, so that every connection
        to it, the caller's included (send() runs on it), gives up after CONNECT_TIMEOUT.
        """
        if self.connection.vendor == "postgresql":
            seconds = libpq_connect_timeout(self.config.connect_timeout)
            self.connection.settings_dict["OPTIONS"].setdefault("connect_timeout", seconds)

    @property
    def can_notify(self) -> bool:
        """Whether the database has NOTIFY (whatever the driver of this process)."""
        return self.connection.vendor == "postgresql"

    @property
    def can_listen(self) -> bool:
        """Whether this process can LISTEN: PostgreSQL and psycopg 3."""
        return self.can_notify and can_listen_with_psycopg()

    def _now(self) -> Instant:
        """The time now, for a query: by the database's clock where it has one of its own.

        On PostgreSQL, Now() (statement_timestamp(), see database_sql.py): the workers and
        senders on other hosts may be seconds off, and it is the same clock for all of them.
        SQLite is used from one host only: this process's clock is the database's.
        """
        return Now() if self.connection.vendor == "postgresql" else timezone.now()

    def messages(self) -> QueuedMessageQuerySet:
        """Every message of this broker's database."""
        return QueuedMessage.objects.using(self.alias)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn a lost or broken database connection into BrokerConnectionError.

        The broken connection is closed (unless the caller's transaction holds it) so that the
        next call reconnects.
        """
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            if not self.connection.in_atomic_block:
                self.connection.close_if_unusable_or_obsolete()
            raise BrokerConnectionError(
                f"The database broker could not {action} on the database {self.alias!r}: {exc}"
            ) from exc

    # Sending --------------------------------------------------------------------------------

    def send(self, batch: Sequence[Outgoing]) -> None:
        """Insert the batch with one statement that, on PostgreSQL, wakes the consumers too.

        The wake-up is a NOTIFY of each queue's channel in the same statement: transactional,
        it fires when the caller's transaction commits. Elsewhere idle consumers poll.
        """
        if not batch:
            return
        connection = self.connection
        postgres = connection.vendor == "postgresql"
        adapt = connection.ops.adapt_datetimefield_value
        now = timezone.now()
        rows = []
        for message, body in batch:
            at, delay = _due(message.eta, message.eta_from_countdown)
            row = {"task_id": message.id, "queue": message.queue, "priority": message.priority,
                   "delayed": _is_delayed(message.eta), "body": body}  # fmt: skip
            if postgres:  # The database's clock adds the delay (see send_sql()).
                row.update(available_at=None if at is None else at.isoformat(), delay=delay)
            else:
                row.update(available_at=adapt(at or now + timedelta(seconds=delay)))
            rows.append(row)
        if postgres:
            woken = {queue_channel(m.queue) for m, _ in batch if _due_soon(m.eta, self.max_wait)}
            params: list[Any] = [_compact.encode(rows), sorted(woken)]
        else:
            params = [adapt(now), _compact.encode(rows)]
        with self._errors("store messages"), connection.cursor() as cursor:
            cursor.execute(send_sql(connection.vendor), params)

    def _notify_queues(self, queues: Iterable[str]) -> None:
        """NOTIFY the channels of ``queues``; transactional, so it fires on commit."""
        channels = sorted({queue_channel(q) for q in queues})
        if channels and self.can_notify:
            self._pg_notify(channels, [""] * len(channels))

    def _pg_notify(self, channels: list[str], payloads: list[str]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
                [channels, payloads],
            )

    # Consuming ------------------------------------------------------------------------------

    def consume(self, queues: Sequence[str], count: int, timeout: float) -> list[Delivery]:
        """Lease up to ``count`` deliveries, waiting up to ``timeout`` seconds for one.

        On PostgreSQL an idle consumer sleeps until a NOTIFY of one of its queues (see
        notifications.py: the consumers of a process share one LISTEN connection, and a
        notification wakes all of them). Its waiter is registered before its first claim and
        kept between calls, so nothing published after a claim goes unnoticed; a consumer whose
        last claim left nothing ready then waits for a notification before claiming again,
        instead of making an empty claim each time it comes back from a short batch.
        """
        if count <= 0:
            return []
        deadline = time.monotonic() + timeout
        idle = self._idle
        waiter = self._queue_waiter(queues) if timeout > 0 and self.can_listen else None
        claim = waiter is None or not (idle.empty and time.monotonic() < idle.until)
        while True:
            if claim:
                deliveries, idle_until = self._claim_all(queues, count)
                # Claim at least every max_wait: messages made ready without a notification
                # (an expired lease, a delayed one published far ahead) are seen as before.
                idle.until = time.monotonic() + self.max_wait
                idle.empty = idle_until is not None
                if idle_until is not None:
                    idle.until = min(idle.until, idle_until)
                if deliveries:
                    return deliveries
            claim = True  # Whatever ends a wait, a claim follows.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if waiter is None:
                time.sleep(min(remaining, self.poll_interval))
            else:
                waiter.wait(min(remaining, max(idle.until - time.monotonic(), 0.0)))

    def _queue_waiter(self, queues: Sequence[str]) -> Waiter:
        """This thread's waiter for ``queues``, kept from one consume() to the next."""
        idle = self._idle
        waiter = idle.waiter
        # A waiter closed by close(), or made before a fork, is no longer registered.
        if waiter is not None and waiter.pid == os.getpid() and waiter in self._queue_waiters:
            if idle.queues == tuple(queues):
                return waiter
            waiter.close()
            self._queue_waiters.discard(waiter)
        channels = sorted({queue_channel(q) for q in queues})
        waiter = self._queue_hub(channels).waiter(channels)
        self._queue_waiters.add(waiter)
        idle.waiter, idle.queues, idle.empty = waiter, tuple(queues), False
        return waiter

    def _queue_hub(self, channels: list[str]) -> Hub:
        """The process's hub of these channels (the consumers of a worker share their queues)."""
        alias, timeout = self.alias, self.config.connect_timeout
        return per_process(
            (*database_key("queues", alias), *channels),
            lambda: Hub(
                f"queue notifications of the database {alias!r}",
                lambda: ListenSubscription(alias, timeout, channels, lambda c, _: [c]),
            ),
        )

    def _claim_all(self, queues: Sequence[str], count: int) -> tuple[list[Delivery], float | None]:
        """Lease up to ``count`` deliveries from ``queues`` in order.

        Also returns, when the claims said that nothing else is ready (PostgreSQL), the
        monotonic time at which the first delayed message of ``queues`` is due (infinity
        when there is none); else None.
        """
        deliveries: list[Delivery] = []
        idle_until: float | None = math.inf
        with self._errors("lease messages"):
            self._return_expired_leases()
            for queue in queues:
                if len(deliveries) >= count:
                    return deliveries, None
                claimed, next_due = self._claim(queue, count - len(deliveries))
                deliveries += claimed
                if idle_until is not None:
                    idle_until = None if next_due is None else min(idle_until, next_due)
        return deliveries, idle_until

    def _return_expired_leases(self) -> None:
        """Put messages whose lease expired back in their queue, at most every interval."""
        if time.monotonic() < self._next_lease_check:
            return
        self._next_lease_check = time.monotonic() + self.lease_check_interval
        self._retry_locked(self._end_expired_leases)

    def _end_expired_leases(self) -> None:
        expired = self.messages().expired_leases(self._now())
        with transaction.atomic(using=self.alias):
            # PostgreSQL: skip the rows another consumer holds, so this never waits and never
            # deadlocks. SQLite has no row locks (Django leaves FOR UPDATE out): one statement
            # runs at a time.
            expired = self.messages().filter(
                pk__in=expired.select_for_update(skip_locked=True).values("pk")
            )
            expired.update(leased_until=None, lease_token="")

    def _claim(self, queue: str, count: int) -> tuple[list[Delivery], float | None]:
        """Lease up to ``count`` deliveries from ``queue``.

        Also returns what _claim_all() says of its queues, for this queue only (PostgreSQL).
        """
        token = secrets.token_hex(16)
        rows, idle_until, offset = self._retry_locked(
            lambda: self._claim_returning(queue, count, token)
        )
        return [self._delivery(queue, token, offset, *row) for row in rows], idle_until

    def _claim_returning(
        self, queue: str, count: int, token: str
    ) -> tuple[list[tuple[Any, ...]], float | None, float]:
        """Lease with one UPDATE ... RETURNING (see database_sql.py): one round trip.

        When the results live on this database, the same statement says which tasks were
        revoked, so the worker need not ask. On PostgreSQL, it also says when the claim was
        short, and when the queue's next delayed message is due (see _claim); and the time by
        the database's clock, returned as the offset of this host's clock from it.
        """
        connection = self.connection
        vendor, with_revoked = connection.vendor, self.results_here
        sql = claim_sql(vendor, connection.ops.quote_name("x")[0], with_revoked)
        with connection.cursor() as cursor:
            cursor.execute(sql, self._claim_params(token, queue, count))
            rows = cursor.fetchall()
        idle_until, offset = None, 0.0
        if vendor == "postgresql":
            rows, idle_until, offset = _read_postgres_claim(rows)
        # RETURNING keeps no order: sort as delivered (higher priority, then publish order).
        rows.sort(key=lambda row: (-row[3], row[4], row[0]))
        revoked = (lambda row: bool(row[5])) if with_revoked else (lambda row: None)
        return [(row[0], row[1], row[2], revoked(row)) for row in rows], idle_until, offset

    def _claim_params(self, token: str, queue: str, count: int) -> list[Any]:
        """claim_params() for this database: on SQLite, with this process's time."""
        vendor, lease = self.connection.vendor, self.config.lease_seconds
        if vendor == "postgresql":
            return claim_params(vendor, lease, token, queue, count, self.results_here)
        now = timezone.now()
        adapt = self.connection.ops.adapt_datetimefield_value
        until = adapt(now + timedelta(seconds=lease))
        return claim_params(vendor, until, token, queue, count, self.results_here, adapt(now))

    @cached_property
    def results_here(self) -> bool:
        """Whether TaskResult rows are written to this broker's database."""
        return bool(router.db_for_write(TaskResult) == self.alias)

    def _retry_locked[T](self, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying briefly while SQLite says "database is locked"."""
        for delay in LOCKED_RETRY_DELAYS:
            try:
                return operation()
            except OperationalError as exc:
                if "locked" not in str(exc) or self.connection.in_atomic_block:
                    raise
            time.sleep(delay)
        return operation()

    def _delivery(
        self,
        queue: str,
        token: str,
        clock_offset: float,
        pk: int,
        body: str,
        delivery_count: int,
        revoked: bool | None = None,
    ) -> Delivery:
        try:
            message, error = decode(body, self.config.max_message_size), None
        except DecodeError as exc:
            message, error = None, exc.reason
        return Delivery(
            tag=f"{pk}:{token}",
            queue=queue,
            body=body,
            message=message,
            error=error,
            delivery_count=delivery_count,
            revoked=revoked,
            clock_offset=clock_offset,
        )

    # Ending leases --------------------------------------------------------------------------

    def ack(self, deliveries: Sequence[Delivery], results: Sequence[str] = ()) -> None:
        """Delete the rows these leases still own, with one DELETE; then notify ``results``.

        One transaction; or part of the caller's (the worker stores the results of these
        deliveries in the same one): both take effect on its commit, as PostgreSQL's NOTIFY
        is transactional.
        """
        if not deliveries and not results:
            return
        with transaction.atomic(using=self.alias, savepoint=False):
            if deliveries:
                with self._errors("acknowledge messages"):
                    deleted, _ = self._owned(deliveries).delete()
                self._warn_if_taken_over("ack", deliveries, deleted, kept=0)
            self.notify_results(results)
        self._vacuum_if_due(len(deliveries))

    def _vacuum_if_due(self, acked: int) -> None:
        """VACUUM the queue table every ``vacuum_every`` acknowledged messages (PostgreSQL)."""
        self._acked_since_vacuum += acked
        if (
            not self.vacuum_every
            or self._acked_since_vacuum < self.vacuum_every
            or self.connection.vendor != "postgresql"
        ):
            return
        self._acked_since_vacuum = 0
        # VACUUM cannot run in a transaction: after the caller's commits (now, if none).
        transaction.on_commit(self._vacuum, using=self.alias)

    def _vacuum(self) -> None:
        table = self.connection.ops.quote_name(QueuedMessage._meta.db_table)
        try:
            with self.connection.cursor() as cursor:
                # SKIP_LOCKED: when another consumer vacuums it right now, do not wait.
                cursor.execute(f"VACUUM (SKIP_LOCKED) {table}")
        except DatabaseError as exc:
            logger.warning("Could not vacuum the queue table %s: %s", table, exc)

    def requeue(self, delivery: Delivery, message: Message, eta: float | None = None) -> None:
        """Turn the leased row into ``message``, ready at ``eta``, with one UPDATE.

        ``eta`` is this host's time plus a delay (a retry's countdown): the delay is counted on
        the database's clock.
        """
        body = self.encode(message)[1]
        with self._errors("requeue a message"):
            updated = self._owned([delivery]).update(
                task_id=message.id,
                queue=message.queue,
                priority=message.priority,
                body=body,
                available_at=_available_at(eta, True, self._now()),
                delayed=_is_delayed(eta),
                leased_until=None,
                lease_token="",
                delivery_count=0,
            )
            if updated and _due_soon(eta, self.max_wait):
                self._notify_queues([message.queue])
        warn_if_lost(logger, "requeue", [delivery], updated)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """End the leases, keeping the delivery counts; the messages are ready at once."""
        if deliveries:
            with self._errors("release messages"):
                self._owned(deliveries).update(leased_until=None, lease_token="")
                self._notify_queues(d.queue for d in deliveries)

    def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Push back the end of the leases these deliveries still own, with one UPDATE."""
        if deliveries:
            until = self._now() + timedelta(seconds=self.config.lease_seconds)
            with self._errors("extend leases"):
                extended = self._owned(deliveries).update(leased_until=until)
            self._warn_if_taken_over("extend", deliveries, extended, kept=extended)

    def _warn_if_taken_over(
        self, action: str, deliveries: Sequence[Delivery], done: int, kept: int
    ) -> None:
        """Warn about the deliveries whose rows are now leased to another consumer (or free).

        ``done`` rows were acted on, ``kept`` of them are still in the table. A row that is gone
        was acknowledged already: by this consumer (an extend listing a delivery acked since,
        an ack sent again after its reply was lost), which is no lost lease.
        """
        if done >= len(deliveries):
            return
        pks = [_lease(d)[0] for d in deliveries]
        try:
            taken = self.messages().filter(pk__in=pks).count() - kept
        except DatabaseError:
            taken = len(deliveries) - done  # Cannot tell: say all of them.
        warn_if_lost(logger, action, deliveries, len(deliveries) - taken)

    def _owned(self, deliveries: Sequence[Delivery]) -> QueuedMessageQuerySet:
        """The rows of ``deliveries`` whose lease is still theirs (same row, same token)."""
        by_token: dict[str, list[int]] = {}
        for delivery in deliveries:
            pk, token = _lease(delivery)
            by_token.setdefault(token, []).append(pk)
        condition = reduce(or_, (Q(lease_token=t, pk__in=pks) for t, pks in by_token.items()))
        return self.messages().filter(condition)

    # Inspection -----------------------------------------------------------------------------

    def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """Count ready, delayed and leased messages per queue in one query."""
        with self._errors("count messages"):
            counts = (
                self.messages()
                .filter(queue__in=queues)
                .values_list("queue")
                .annotate(n=Count("pk"))
                .order_by()
            )
            found = dict(counts)
        return {queue: found.get(queue, 0) for queue in queues}

    def purge(self, queue: str) -> int:
        """Delete the messages of ``queue`` that no live lease holds."""
        free = Q(leased_until__isnull=True) | Q(leased_until__lt=self._now())
        with self._errors("purge a queue"):
            deleted, _ = self.messages().filter(free, queue=queue).delete()
        return deleted

    def find(self, task_id: str, queues: Sequence[str]) -> Message | None:
        """The latest message of ``task_id`` in ``queues``; None if absent or undecodable."""
        with self._errors("find a message"):
            rows = self.messages().filter(task_id=task_id, queue__in=queues).order_by("-pk")
            body = rows.values_list("body", flat=True).first()
        try:
            return None if body is None else decode(body, self.config.max_message_size)
        except DecodeError:
            return None

    def remove(self, task_id: str, queues: Sequence[str]) -> bool:
        """Delete the unleased rows of ``task_id`` in ``queues`` with one DELETE.

        A row whose lease expired is still leased here, as on the Redis broker: the worker that
        takes it over next decides what becomes of it.
        """
        if not queues:
            return False
        waiting = self.messages().filter(
            task_id=task_id, queue__in=list(queues), leased_until__isnull=True
        )
        with self._errors("remove a message"):
            deleted, _ = waiting.delete()
        return bool(deleted)

    # Results --------------------------------------------------------------------------------

    def notify_results(self, task_ids: Sequence[str]) -> None:
        """On PostgreSQL, announce stored results on RESULTS_CHANNEL in one statement."""
        if task_ids and self.can_notify:
            payloads = list(_payloads(task_ids))
            with self._errors("announce results"):
                self._pg_notify([RESULTS_CHANNEL] * len(payloads), payloads)

    def result_waiter(self, task_id: str) -> ResultWaiter:
        """A waiter woken by notify_results() on PostgreSQL; a polling one elsewhere."""
        if not self.can_listen:
            return PollingWaiter()
        return self._notifications.waiter([task_id])

    @cached_property
    def _notifications(self) -> Hub:
        """The process's hub of result notifications for this database."""
        alias, timeout = self.alias, self.config.connect_timeout
        return per_process(
            database_key("results", alias),
            lambda: Hub(
                f"result notifications of the database {alias!r}",
                lambda: ListenSubscription(
                    alias, timeout, [RESULTS_CHANNEL], lambda _, payload: announced_ids(payload)
                ),
            ),
        )

    def close(self) -> None:
        """Close the LISTEN connections; they reopen on the next consume() or wait.

        They are the process's (see notifications.py): the other threads connect again too.
        """
        waiters, self._queue_waiters = self._queue_waiters, set()
        for waiter in waiters:
            if waiter.pid == os.getpid():
                waiter.close()
                waiter.hub.close()
        if "_notifications" in self.__dict__:
            self._notifications.close()


class _Idle(threading.local):
    """A consumer thread's waiter and what its last claim said (see consume())."""

    #: Registered for ``queues`` before the last claim of them.
    waiter: Waiter | None = None
    queues: tuple[str, ...] = ()
    #: Whether the last claim said that nothing else was ready (PostgreSQL)...
    empty = False
    #: ...before this monotonic time, unless ``waiter`` is notified: the next claim is due then.
    until = 0.0


def queue_channel(queue: str) -> str:
    """The NOTIFY channel of a queue: a valid identifier whatever the queue's name."""
    return "dt_q_" + hashlib.sha256(queue.encode()).hexdigest()[:32]


def _read_postgres_claim(
    rows: list[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], float | None, float]:
    """The leased rows of a PostgreSQL claim, what _claim_all() says, and the clock offset.

    The last two columns of each row are the database's time and, on the row that says the
    claim was short (its pk is NULL), the seconds until the next delayed message (see
    claim_sql()). The offset is what to add to this host's time.time() for the database's.
    """
    offset = rows[0][-2] - time.time() if rows else 0.0
    marks = [row for row in rows if row[0] is None]
    if not marks:
        return rows, None, offset
    return [row for row in rows if row[0] is not None], _monotonic_at(marks[0][-1]), offset


def _monotonic_at(due_in: float | None) -> float:
    """The monotonic time ``due_in`` seconds from now (by any clock), infinity for None."""
    if due_in is None:
        return math.inf
    return time.monotonic() + max(due_in, 0.0)


def _lease(delivery: Delivery) -> tuple[int, str]:
    """The row and the lease token a delivery's tag names (``"<pk>:<token>"``, see _delivery)."""
    pk, _, token = delivery.tag.partition(":")
    return int(pk), token


def _due(eta: float | None, from_countdown: bool) -> tuple[datetime | None, float]:
    """When a message with this ``eta`` (a Unix time) may be delivered.

    Either a time, as the database stores times, and 0; or None and a delay in seconds from
    now. An ``eta`` worked out as this host's time plus a countdown becomes that delay again,
    so that the database's clock counts it; an ``eta`` given as a point in time stays that time.
    """
    if eta is None:
        return None, 0.0
    if from_countdown:
        return None, max(eta - time.time(), 0.0)
    when = datetime.fromtimestamp(eta, tz=UTC)
    return (when if settings.USE_TZ else timezone.make_naive(when)), 0.0


def _available_at(eta: float | None, from_countdown: bool, now: Instant) -> Instant:
    """The available_at of a message due at ``eta`` (see _due()), ``now`` being the time now."""
    at, delay = _due(eta, from_countdown)
    if at is not None:
        return at
    return now + timedelta(seconds=delay) if delay else now


def _is_delayed(eta: float | None) -> bool:
    """Whether a message waits for its eta (only such rows are in the delayed-index)."""
    return eta is not None and eta > time.time()


def _due_soon(eta: float | None, within: float) -> bool:
    """Whether a message is due before a waiting consumer would look again anyway."""
    return eta is None or eta - time.time() < within


def _payloads(task_ids: Sequence[str]) -> Iterator[str]:
    """JSON lists of ``task_ids``, each small enough for one NOTIFY."""
    chunk: list[str] = []
    size = 2  # The brackets.
    for task_id in task_ids:
        item = len(_compact.encode(task_id).encode()) + 1  # With its comma.
        if chunk and size + item > MAX_PAYLOAD:
            yield _compact.encode(chunk)
            chunk, size = [], 2
        chunk.append(task_id)
        size += item
    if chunk:
        yield _compact.encode(chunk)
