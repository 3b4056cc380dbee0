"""The broker interface: a broker moves messages and nothing else.

Delivery is at-least-once. ``consume`` leases each delivery to the caller for
``config.lease_seconds``; the caller keeps the lease alive with ``extend`` while it works and ends
it with ``ack`` (done), ``requeue`` (run again, possibly later) or ``release`` (give it back now).
A lease that is not extended expires and its message goes back to its queue, so the messages of a
worker that died are delivered again and never lost. Once another consumer has claimed it, the
first one's ``ack``, ``extend``, ``requeue`` and ``release`` leave the message alone (all but
``release`` log a warning): the lease, and the say over the message, are the new holder's.

Order: within a queue, a higher priority is delivered first and equal priorities in publish order;
a delayed message (``eta``) is never delivered before its time. ``consume`` takes queues in the
order given.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from ..conf import BackendConfig
from ..messages import Message, encode

#: A message and its encoded body, ready to send.
Outgoing = tuple[Message, str]


@dataclass(slots=True, eq=False)
class Delivery:
    """A message leased to this consumer.

    ``message`` is None when the body could not be decoded; ``error`` then says why, and the caller
    dead-letters it. ``tag`` is the broker's own handle for the lease. ``revoked`` says whether
    the task was revoked (see Broker.revoke), or is None when the broker cannot tell: the caller
    then asks the result store. ``clock_offset`` is what to add to this host's ``time.time()``
    for the time by the broker's clock, as measured when the delivery was leased: where the
    broker decides when leases end and messages are due by a clock of its own, the worker
    judges expiry by that clock too (0: the broker goes by this host's clock).
    """

    tag: str
    queue: str
    body: str
    message: Message | None
    error: str | None = None
    delivery_count: int = 1
    revoked: bool | None = None
    clock_offset: float = 0.0


class Broker(ABC):
    """Base class of the brokers. Subclasses implement the primitives below."""

    #: Whether publish() joins the caller's database transaction (commit publishes, rollback
    #: discards) by itself.
    transactional = False

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    def encode(self, message: Message) -> Outgoing:
        """Encode and size-check ``message``; raise EncodeError or MessageTooLarge."""
        return message, encode(message, self.config.max_message_size)

    def publish(self, message: Message) -> None:
        """Encode and send one message. One round trip; atomic."""
        self.send([self.encode(message)])

    def publish_many(self, messages: Sequence[Message]) -> None:
        """Encode and send many messages in one round trip. All or none are sent."""
        self.send([self.encode(m) for m in messages])

    @abstractmethod
    def send(self, batch: Sequence[Outgoing]) -> None:
        """Store encoded messages: in their queue, or delayed until their ``eta``.

        Blocks for one round trip; atomic for the whole batch. Raises BrokerConnectionError when
        the broker cannot be reached within ``config.connect_timeout``.
        """

    @abstractmethod
    def consume(self, queues: Sequence[str], count: int, timeout: float) -> list[Delivery]:
        """Lease up to ``count`` deliveries from ``queues`` (earlier queues first).

        Blocks up to ``timeout`` seconds when nothing is ready, returning as soon as a message
        arrives (no fixed polling delay on a broker that can notify). Returns an empty list on
        timeout. Each lease is atomic: no other consumer receives the same delivery while its lease
        lives. Messages whose lease expired and delayed messages now due are delivered too.
        """

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery], results: Sequence[str] = ()) -> None:
        """Remove finished deliveries for good, then announce ``results`` (see notify_results).

        The ids in ``results`` are those of results just stored for these deliveries; waiting
        callers are told in the same round trip where the broker can. One round trip for the
        batch.
        """

    @abstractmethod
    def requeue(self, delivery: Delivery, message: Message, eta: float | None = None) -> None:
        """Atomically replace a leased delivery by ``message`` (e.g. the next attempt).

        The new message is delivered at ``eta`` (a Unix time) or at once; the old one is gone.
        """

    @abstractmethod
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """End the leases without running: the messages are ready again at once."""

    @abstractmethod
    def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Renew the leases for another ``config.lease_seconds``. One round trip."""

    @abstractmethod
    def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """The number of messages per queue: ready, delayed and leased."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every message of ``queue`` that is not leased; return how many."""

    @abstractmethod
    def find(self, task_id: str, queues: Sequence[str]) -> Message | None:
        """The message of ``task_id`` still in one of ``queues`` (ready, delayed or leased)."""

    @abstractmethod
    def remove(self, task_id: str, queues: Sequence[str]) -> bool:
        """Delete the message of ``task_id`` if it waits (ready or delayed) in one of ``queues``.

        A leased message is left alone. Returns whether one was removed. Atomic; one round trip
        per queue at most.
        """

    def revoke(self, task_id: str, queues: Sequence[str]) -> bool:
        """Delete the waiting message of ``task_id``, as ``remove()``, for a revoked task.

        A broker that can also remember the id marks the deliveries of it that it hands out
        later (``Delivery.revoked``): one leased now and redelivered, or one published after the
        revoke. This one cannot: its deliveries say None. Returns whether a message was removed.
        """
        return self.remove(task_id, queues)

    def notify_results(self, task_ids: Sequence[str]) -> None:  # noqa: B027
        """Tell waiting callers that these results were stored. Default: nobody is told."""

    def result_waiter(self, task_id: str) -> ResultWaiter:
        """A waiter that wakes when ``task_id`` may have a new result (see ResultWaiter).

        The default polls with a short, growing interval; brokers that can notify override it.
        """
        return PollingWaiter()

    def close(self) -> None:  # noqa: B027
        """Release connections. The broker may be used again afterwards."""


class ResultWaiter:
    """Waits for result notifications of one task id.

    Made before the caller first reads the result store, so no notification is missed between
    that read and ``wait``. Callers re-read the store after every ``wait``: a spurious wake-up is
    harmless.
    """

    def wait(self, timeout: float) -> bool:
        """Block until a notification arrives or ``timeout`` seconds pass.

        Returns whether the caller should look again: False only when the time passed and
        nothing was notified.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the waiter holds."""

    def __enter__(self) -> ResultWaiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PollingWaiter(ResultWaiter):
    """Bounded polling: 5 ms at first, growing to 100 ms."""

    def __init__(self) -> None:
        self.interval = 0.005

    def wait(self, timeout: float) -> bool:
        time.sleep(max(0.0, min(timeout, self.interval)))
        self.interval = min(self.interval * 1.5, 0.1)
        return True


def warn_if_lost(
    logger: logging.Logger, action: str, deliveries: Sequence[Delivery], done: int
) -> None:
    """Log the deliveries whose lease expired and was taken over before ``action``."""
    if done < len(deliveries):
        logger.warning(
            "%d of %d %s(s) did nothing: the lease expired and the message was (or will be) "
            "delivered again. Raise LEASE_SECONDS or extend leases more often.",
            len(deliveries) - done,
            len(deliveries),
            action,
        )


_per_process: dict[Hashable, Any] = {}
_per_process_lock = threading.Lock()


def per_process[T](key: Hashable, make: Callable[[], T]) -> T:
    """This process's one object for ``key``, made by ``make()`` on first use.

    Each thread has a broker of its own (Django gives each thread its own backends); what holds
    a subscription or a LISTEN connection is shared by all of them instead.
    """
    with _per_process_lock:
        if key not in _per_process:
            _per_process[key] = make()
        return cast("T", _per_process[key])
