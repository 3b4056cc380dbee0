"""Waiting for notifications: one subscription per process, read by a thread of its own.

``AsyncResult.get()`` waits for a worker to announce that a result is stored, and an idle
consumer of the database broker on PostgreSQL waits for a message sent to its queues. Opening a
subscription for each waiting thread would cost a connection (and, on PostgreSQL, a server
process) per thread; instead a process has one ``Hub`` per subscription (a Redis channel, a set
of PostgreSQL channels), shared by the brokers of all its threads (base.per_process()). While the
subscription is open, a daemon thread reads it and wakes the waiters of each key it receives (a
task id, a queue's channel).

What a waiter can rely on:

- ``Hub.waiter()`` registers the waiter and returns once the subscription is live: a
  notification sent after that is not missed, even one that arrives before ``wait()``.
- When notifications may have been missed (the subscription was lost, or made anew), every
  waiter is woken: its caller looks again, which a spurious wake-up only costs one more read.
  While there is no subscription, waiters poll, and one of them subscribes again every
  RETRY_AFTER seconds.
- The subscription is read all the time, whether anyone waits or not. One left unread fills up:
  a PostgreSQL session whose client leaves its notifications unread stops in the middle of
  sending them, and the server's NOTIFY queue, shared by every database of the cluster, then
  grows until NOTIFY fails everywhere; Redis drops a subscriber whose output buffer overflows.
- Once no one has waited for CLOSE_AFTER seconds, the subscription is closed and its thread
  ends; the next waiter subscribes again. A forked child never touches its parent's connection:
  it subscribes anew.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from .base import PollingWaiter, ResultWaiter

logger = logging.getLogger("django_tasks.brokers")

#: Seconds before subscribing again after a failure; waiters poll meanwhile.
RETRY_AFTER = 1.0
#: Seconds without a waiter after which the subscription is closed.
CLOSE_AFTER = 300.0
#: The longest one read of the subscription blocks: close() waits for the thread that long.
READ_SLICE = 0.1


def announced_ids(payload: str | bytes) -> list[str]:
    """The task ids of one announcement: the strings of a JSON list, none for anything else.

    Anyone may publish on the channel (another program, a stray command): what cannot be read
    is skipped, so that it never reaches a waiting caller nor stops the subscription.
    """
    try:
        ids = json.loads(payload)
    except (ValueError, TypeError, RecursionError):  # RecursionError: nested too deep.
        return []
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


class Subscription(Protocol):
    """A live subscription (made by the broker), read by one thread only."""

    def read(self, timeout: float) -> Iterable[str | None]:
        """The keys notified within ``timeout`` seconds, and any received already.

        None among them means that notifications may have been missed (the client library
        renewed the connection, say). Raises an exception when the connection is lost.
        """

    def close(self) -> None:
        """Close the connection."""


class Hub:
    """One subscription of this process and the threads waiting on it (see the module's text)."""

    def __init__(self, name: str, subscribe: Callable[[], Subscription]) -> None:
        #: What the log calls the subscription, e.g. "result notifications at redis://host/0".
        self.name = name
        self.subscribe = subscribe
        self._pid = os.getpid()
        self._inherited: list[Subscription] = []
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._subscription: Subscription | None = None
        self._reader: threading.Thread | None = None
        self._retry_at = 0.0
        self._used_at = time.monotonic()

    def waiter(self, keys: Iterable[str]) -> Waiter:
        """A waiter woken by notifications of ``keys``, registered when this returns."""
        waiter = Waiter(self, frozenset(keys))
        with self._lock:
            self._forget_if_forked()
            self._subscribe_if_due()
            for key in waiter.keys:
                self._waiters.setdefault(key, set()).add(waiter)
            self._used_at = time.monotonic()
        return waiter

    @property
    def live(self) -> bool:
        """Whether the subscription is open."""
        return self._subscription is not None and self._pid == os.getpid()

    def wait(self, waiter: Waiter, timeout: float) -> bool:
        """See Waiter.wait()."""
        if not self.live:
            with self._lock:
                self._forget_if_forked()
                subscribed = self._subscribe_if_due()
            if subscribed or not self.live:
                waiter.event.clear()
                if not subscribed:
                    waiter.polling.wait(timeout)
                return True  # The caller looks again: what came meanwhile went unheard.
        woken = waiter.event.wait(timeout)
        waiter.event.clear()
        return woken

    def discard(self, waiter: Waiter) -> None:
        with self._lock:
            self._used_at = time.monotonic()  # It waited until now.
            for key in waiter.keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[key]

    def close(self) -> None:
        """Close the subscription (its thread does, within READ_SLICE); waiters poll until one
        of them subscribes again.
        """
        with self._lock:
            self._forget_if_forked()
            reader, self._reader = self._reader, None
            self._subscription = None
            self._retry_at = 0.0
            self._wake_all()
        if reader is not None and reader is not threading.current_thread():
            reader.join(10 * READ_SLICE)

    # With the lock held.

    def _subscribe_if_due(self) -> bool:
        """Subscribe if there is no subscription and it is time to try; return whether it did."""
        if self._subscription is not None or time.monotonic() < self._retry_at:
            return False
        try:
            subscription = self.subscribe()
        except Exception as exc:
            logger.warning("Cannot subscribe to the %s (%s); waiters poll until it is back.",
                           self.name, exc)  # fmt: skip
            self._retry_at = time.monotonic() + RETRY_AFTER
            return False
        self._subscription = subscription
        self._wake_all()  # Those already waiting may have missed something: they look again.
        self._reader = threading.Thread(
            target=self._read, args=(subscription,), name="django_tasks-notifications", daemon=True
        )
        self._reader.start()
        return True

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()

    def _forget_if_forked(self) -> None:
        """A forked child must not use its parent's connection (nor its locks): it starts anew.

        The parent's subscription is kept referenced, never closed here: closing it would end
        the parent's session too.
        """
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if self._subscription is not None:
                self._inherited.append(self._subscription)
            self._reset()

    # The reader thread.

    def _read(self, subscription: Subscription) -> None:
        """Read ``subscription`` until it is lost, closed or unused; then close it."""
        try:
            while self._still_wanted(subscription):
                try:
                    keys = list(subscription.read(READ_SLICE))
                except Exception as exc:
                    self._lost(subscription, exc)
                    return
                if keys:
                    self._wake(subscription, keys)
        finally:
            with contextlib.suppress(Exception):  # It may be broken already.
                subscription.close()

    def _still_wanted(self, subscription: Subscription) -> bool:
        with self._lock:
            if self._subscription is not subscription:
                return False  # Closed, or this process is a fork.
            if not self._waiters and time.monotonic() - self._used_at >= CLOSE_AFTER:
                self._subscription = self._reader = None
                return False
            return True

    def _wake(self, subscription: Subscription, keys: list[str | None]) -> None:
        with self._lock:
            if self._subscription is not subscription:
                return
            for key in keys:
                if key is None:
                    self._wake_all()
                    continue
                for waiter in self._waiters.get(key, ()):
                    waiter.event.set()

    def _lost(self, subscription: Subscription, error: Exception) -> None:
        with self._lock:
            if self._subscription is not subscription:
                return  # Closed meanwhile: the error is the closing's.
            self._subscription = self._reader = None
            self._retry_at = time.monotonic() + RETRY_AFTER
            self._wake_all()
        logger.warning("Lost the %s (%s); waiters poll until it is back.", self.name, error)


class Waiter(ResultWaiter):
    """One thread waiting on a Hub for some keys; polls while the hub has no subscription."""

    def __init__(self, hub: Hub, keys: frozenset[str]) -> None:
        self.hub = hub
        self.keys = keys
        #: Set when one of the keys is notified, or may have been.
        self.event = threading.Event()
        self.polling = PollingWaiter()
        self.pid = os.getpid()

    def wait(self, timeout: float) -> bool:
        """Return True once a key is notified (or may have been) since the last return,
        False after ``timeout`` seconds without. While polling, True after a short sleep.
        """
        return self.hub.wait(self, timeout)

    def close(self) -> None:
        self.hub.discard(self)
