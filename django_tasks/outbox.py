"""The outbox: a message sent inside a transaction is written in it, and published after it.

With the Redis broker, a task sent inside ``transaction.atomic()`` must reach Redis only if the
transaction commits, and must not be lost when Redis is down at that moment or the process dies
right after the commit. So each message is first written as an OutboxMessage row in the caller's
transaction, on the database of its atomic block. After the commit the sending process publishes
it and deletes the row; a row still there (the publish failed, or never ran) is published by a
worker's sweep once it is older than GRACE.

Delivery stays at least once: a message may be published twice (by a sender that took longer than
GRACE to get there, or when a commit fails after the publish), never lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from functools import partial

from django.db import DatabaseError, connections, router, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from .brokers import Broker, Outgoing
from .exceptions import DecodeError
from .messages import Message, decode
from .models import DeadLetter, OutboxMessage

logger = logging.getLogger("django_tasks.outbox")

#: How old a row must be before a worker publishes it: the sender publishes its own rows right
#: after the commit, and a worker should not race it.
GRACE = timedelta(seconds=10)
#: The most rows a worker claims, and publishes in one round trip, at a time.
BATCH_SIZE = 100


def publish_on_commit(broker: Broker, backend: str, batch: Sequence[Outgoing], using: str) -> None:
    """Publish ``batch`` when the transaction open on ``using`` commits; never on a rollback.

    The messages are written to the outbox in that transaction (one INSERT). On a database the
    router keeps OutboxMessage out of, they are written only if the publish fails.
    """
    rows: list[OutboxMessage] = []
    if router.allow_migrate_model(using, OutboxMessage):
        rows = [_row(backend, message, body) for message, body in batch]
        OutboxMessage.objects.using(using).bulk_create(rows)
    callback = partial(_publish_committed, broker, backend, batch, rows, using)
    # robust: should ours fail after all, the project's later callbacks still run.
    transaction.on_commit(callback, using=using, robust=True)


def _publish_committed(
    broker: Broker, backend: str, batch: Sequence[Outgoing], rows: list[OutboxMessage], using: str
) -> None:
    """After the commit: publish, then delete the rows. Never raises."""
    try:
        broker.send(batch)
    except Exception as exc:
        _keep(backend, batch, rows, using, exc)
        return
    if rows:
        try:
            _same_rows(using, rows).delete()
        except Exception:
            logger.exception(
                "Published task(s) %s, but could not delete them from the outbox: a worker will "
                "publish them again",
                _ids(batch),
            )


def _keep(
    backend: str,
    batch: Sequence[Outgoing],
    rows: list[OutboxMessage],
    using: str,
    error: Exception,
) -> None:
    """Log a failed publish at ERROR, its messages left (or put) in the outbox."""
    try:
        if rows:
            where = using
            _record_failure(_same_rows(using, rows), error)
        else:
            where = router.db_for_write(OutboxMessage)
            kept = [_row(backend, message, body, error) for message, body in batch]
            OutboxMessage.objects.using(where).bulk_create(kept)
    except Exception:
        logger.exception(
            "Could not publish task(s) %s after the commit (%s), nor keep them in the outbox: "
            "they are lost",
            _ids(batch),
            error,
        )
        return
    logger.error(
        "Task(s) %s not published after the commit; they wait in the outbox (database %r) for "
        "a worker to publish them. %s",
        _ids(batch),
        where,
        error,
    )


def _row(
    backend: str, message: Message, body: str, error: Exception | None = None
) -> OutboxMessage:
    """The outbox row of one message (``error``: of a publish that failed already)."""
    return OutboxMessage(
        backend=backend,
        task_id=message.id,
        task_name=message.task,
        queue=message.queue,
        body=body,
        attempts=0 if error is None else 1,
        last_error="" if error is None else str(error),
    )


def _same_rows(using: str, rows: Sequence[OutboxMessage]) -> QuerySet[OutboxMessage]:
    """A queryset of ``rows`` (to update or delete them)."""
    return OutboxMessage.objects.using(using).filter(pk__in=[row.pk for row in rows])


def _ids(batch: Sequence[Outgoing]) -> str:
    return ", ".join(message.id for message, _body in batch)


def _record_failure(rows: QuerySet[OutboxMessage], error: Exception) -> None:
    """Count a failed attempt on ``rows`` and keep its error, for the admin."""
    try:
        rows.update(attempts=F("attempts") + 1, last_error=str(error))
    except DatabaseError as exc:
        logger.warning("Could not record a failed publish in the outbox: %s", exc)


# Workers ------------------------------------------------------------------------------------------


def sweep(broker: Broker, backend: str) -> int:
    """Publish the messages of ``backend`` that have waited in the outbox longer than GRACE.

    Workers call it periodically, several at once: each row is claimed by one of them. It looks
    in every database the router lets OutboxMessage into; one whose rows cannot be published is
    logged and tried again next time. Returns how many rows were claimed.
    """
    claimed = 0
    for using in outbox_databases():
        due = OutboxMessage.objects.using(using).due(backend, timezone.now() - GRACE)
        try:
            while (count := publish(broker, due, limit=BATCH_SIZE)) > 0:
                claimed += count
                if count < BATCH_SIZE:
                    break
        except Exception as exc:
            # Once per database until it works again: a database the outbox cannot be read
            # from (a replica, one not migrated) would otherwise warn every few seconds.
            level = logging.DEBUG if using in _failing else logging.WARNING
            _failing.add(using)
            logger.log(level, "Could not publish the outbox of database %r: %s", using, exc)
        else:
            _failing.discard(using)
    return claimed


#: The databases whose last sweep failed (in this process).
_failing: set[str] = set()


def outbox_databases() -> list[str]:
    """The databases the router lets OutboxMessage into: where senders may have left rows."""
    return [alias for alias in connections if router.allow_migrate_model(alias, OutboxMessage)]


def publish(broker: Broker, rows: QuerySet[OutboxMessage], limit: int | None = None) -> int:
    """Claim up to ``limit`` of ``rows`` (those no one else holds), publish and delete them.

    One transaction: the rows are deleted before the publish and come back if it fails; the
    broker's error is then recorded on them and raised. A row whose body cannot be decoded is
    moved to the dead letters. Returns how many rows were claimed.
    """
    using = rows.db
    claimed: list[OutboxMessage] = []
    try:
        with transaction.atomic(using=using):
            claimed = list(rows.select_for_update(skip_locked=True)[:limit])
            if claimed:
                _same_rows(using, claimed).delete()
                _send(broker, claimed)
    except Exception as exc:
        if claimed:
            _record_failure(_same_rows(using, claimed), exc)
        raise
    return len(claimed)


def _send(broker: Broker, rows: list[OutboxMessage]) -> None:
    """Publish the rows' messages in one round trip; dead-letter those that do not decode."""
    batch: list[Outgoing] = []
    dead: list[DeadLetter] = []
    for row in rows:
        try:
            batch.append((decode(row.body), row.body))
        except DecodeError as exc:
            dead.append(DeadLetter(task_id=row.task_id, task_name=row.task_name, queue=row.queue,
                                   reason=f"outbox: {exc.reason}", body=row.body))  # fmt: skip
    if batch:
        broker.send(batch)
    if dead:
        DeadLetter.objects.bulk_create(dead)
        logger.error("Moved %d outbox message(s) that do not decode to the dead letters: %s",
                     len(dead), ", ".join(letter.task_id for letter in dead))  # fmt: skip
