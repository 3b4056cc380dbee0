"""Result notifications, received on one connection per process for every waiting caller.

``AsyncResult.get()`` waits for a worker to announce that the result is stored. Opening a
subscription for each call would cost a connection (and, on PostgreSQL, a server process) per
call; instead a process has one ``NotificationHub`` per Redis server or database, shared by the
brokers of all its threads (base.per_process()), whose subscription is made on first use and
kept while callers use it (see the keeper below).

No thread of ours reads it: a waiting caller does. One waiter at a time reads the subscription
(the reader) and hands the ids it receives to the waiters they concern; the others sleep until
the reader wakes them, and one of them reads next. A lone caller, the usual case, is woken by the
kernel straight from its own socket.

A caller registers before it first reads the result store, and the subscription is live by then,
so no announcement made after that read is missed. A caller waiting for a task its own process
sent need not read the store first at all: the hub remembers the ids it has read lately, and a
``mark()`` taken before the message went out tells whether every announcement since then is one
the hub still remembers (see ``unannounced()``); if so and the id is not among them, the task has
not finished, and the caller waits straight away. While there is no subscription (the broker is
unreachable), waiters poll the store instead: slower, never wrong; the subscription is tried again
after RETRY_AFTER seconds. When a subscription is lost, every waiter is woken, since announcements
may have been missed: a spurious wake-up only costs the caller one more read of the store.

A subscription that no one reads must not fill up: a PostgreSQL session whose client leaves its
notifications unread stops in the middle of sending them, and the server's NOTIFY queue, shared
by every database of the cluster, then grows until NOTIFY fails everywhere (sends and acks
included); Redis drops a subscriber whose output buffer overflows. So while a subscription is
open, a keeper thread reads what arrived every KEEP_READ seconds when no caller is reading, and
closes the subscription once no caller has waited for CLOSE_AFTER seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from .base import PollingWaiter, ResultWaiter

logger = logging.getLogger("django_tasks.brokers")

#: Seconds before subscribing again after a failure; waiters poll meanwhile.
RETRY_AFTER = 1.0
#: How many announced ids a hub remembers, for unannounced().
REMEMBERED = 4096
#: Seconds between two reads of the keeper thread while no caller reads the subscription.
KEEP_READ = 1.0
#: The most reads of one pass of the keeper (each takes what the socket holds).
KEEP_READS = 1000
#: Seconds without a waiter after which the keeper closes the subscription.
CLOSE_AFTER = 300.0

#: Where a hub's subscription stood when a message was sent: (hub token, epoch, reads).
Mark = tuple[str, int, int]


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
    """A live subscription to result announcements (made by the broker)."""

    def read(self, timeout: float) -> Iterable[list[str] | None]:
        """The announcements received within ``timeout`` seconds, each a list of task ids.

        None in the list means that announcements may have been missed (the connection was
        renewed by the client library, say). Raises an exception when the connection is lost.
        """

    def close(self) -> None:
        """Close the connection."""


class NotificationHub:
    """One subscription per process, read by the waiting callers in turn."""

    def __init__(self, name: str, subscribe: Callable[[], Subscription]) -> None:
        #: What the log calls the subscription, e.g. the broker's URL without its password.
        self.name = name
        self.subscribe = subscribe
        self._cond = threading.Condition()
        self._subscription: Subscription | None = None
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._reading = False
        self._waiters: dict[str, set[HubWaiter]] = {}
        # For mark() and unannounced(). The epoch changes whenever announcements may have been
        # missed (a new or lost subscription); reads counts the reads of the subscription.
        self._token = secrets.token_hex(8)
        self._epoch = 0
        self._reads = 0
        self._announced: dict[str, int] = {}  # id -> the read that brought it, oldest first
        self._forgotten = 0  # the latest read whose ids are no longer all in _announced
        self._keeper: threading.Thread | None = None
        self._last_waiter = time.monotonic()
        self._blocked = 0  # callers inside wait()

    def waiter(self, task_id: str) -> ResultWaiter:
        """A waiter for ``task_id``, registered (and the subscription live) when this returns."""
        waiter = HubWaiter(self, task_id)
        with self._cond:
            self._forget_if_forked()
            self._waiters.setdefault(task_id, set()).add(waiter)
            self._last_waiter = time.monotonic()
            if self._subscription is None and time.monotonic() >= self._retry_at:
                self._connect()
        return waiter

    def close(self) -> None:
        """Drop the subscription; the next waiter subscribes again."""
        with self._cond:
            subscription, self._subscription = self._subscription, None
            self._epoch += 1
            self._wake_all()
        if subscription is not None and not self._reading:
            _close_quietly(subscription)

    def mark(self) -> Mark | None:
        """Where the subscription stands now, or None when there is none (no hub is made).

        Taken before a message is sent; unannounced() compares it with later.
        """
        with self._cond:
            self._forget_if_forked()
            if self._subscription is None:
                return None
            return self._token, self._epoch, self._reads

    def unannounced(self, task_id: str, mark: Mark) -> bool:
        """Whether ``task_id`` is certainly not announced yet, for a message sent after ``mark``.

        True when the subscription has not changed since the mark (no announcement can have
        been missed), every id it brought since then is still remembered, and ``task_id`` is
        not one of them. Its announcement is then still to be read, and wakes a waiter
        registered before this call. False means "maybe": the caller reads the store.
        """
        token, epoch, reads = mark
        with self._cond:
            self._forget_if_forked()
            return (
                token == self._token
                and epoch == self._epoch
                and self._subscription is not None
                and self._forgotten <= reads
                and task_id not in self._announced
            )

    # Waiting (called by HubWaiter.wait).

    def wait(self, waiter: HubWaiter, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._blocked += 1
            try:
                while not waiter.woken:
                    if self._subscription is None:
                        break  # Nothing to read: the caller polls the store.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    if not self._reading:
                        self._read(remaining)
                    else:
                        self._cond.wait(remaining)
                waiter.woken = False
            finally:
                self._blocked -= 1

    @property
    def blocked(self) -> int:
        """How many callers are inside wait() now (one reading, the others on the lock)."""
        return self._blocked

    def _read(self, timeout: float) -> int:
        """Read the subscription once as the reader (called and returns with the lock held).

        Returns how many announcements it read.
        """
        subscription = self._subscription
        assert subscription is not None
        self._reading = True
        self._cond.release()
        try:
            announced = list(subscription.read(timeout))
            error = None
        except Exception as exc:
            announced, error = [], exc
        finally:
            self._cond.acquire()
            self._reading = False
        self._reads += 1
        if error is not None:
            logger.warning("Lost the result notifications at %s (%s); waiting callers poll the "
                           "result store until it is back.", self.name, error)  # fmt: skip
            if self._subscription is subscription:
                self._subscription = None
                self._epoch += 1
                self._retry_at = time.monotonic() + RETRY_AFTER
            _close_quietly(subscription)
            self._wake_all()
            return 0
        if self._subscription is not subscription:  # Closed meanwhile.
            _close_quietly(subscription)
        for task_ids in announced:
            if task_ids is None:
                self._epoch += 1
                self._wake_all()
                continue
            for task_id in task_ids:
                self._remember(task_id)
                for waiter in self._waiters.get(task_id, ()):
                    waiter.woken = True
        self._cond.notify_all()  # The woken ones return; one of the others reads next.
        return len(announced)

    def _remember(self, task_id: str) -> None:
        announced = self._announced
        announced.pop(task_id, None)  # Again: it moves to the end, the newest.
        announced[task_id] = self._reads
        if len(announced) > REMEMBERED:
            oldest = next(iter(announced))
            self._forgotten = announced.pop(oldest)

    def discard(self, waiter: HubWaiter) -> None:
        with self._cond:
            self._last_waiter = time.monotonic()  # It waited until now.
            waiters = self._waiters.get(waiter.task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[waiter.task_id]

    @property
    def live(self) -> bool:
        return self._subscription is not None

    def resubscribe(self) -> bool:
        """Subscribe again if it is time to try; return whether the subscription is live."""
        with self._cond:
            self._forget_if_forked()
            if self._subscription is None and time.monotonic() >= self._retry_at:
                self._connect()
            return self._subscription is not None

    # Connecting (with the lock held).

    def _connect(self) -> None:
        self._epoch += 1  # What was announced before this subscription was missed.
        try:
            self._subscription = self.subscribe()
        except Exception as exc:
            logger.warning("Cannot subscribe to result notifications at %s (%s); waiting "
                           "callers poll the result store.", self.name, exc)  # fmt: skip
            self._retry_at = time.monotonic() + RETRY_AFTER
            return
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep, name="django_tasks-notifications", daemon=True
            )
            self._keeper.start()

    def _keep(self) -> None:
        """The keeper thread: read what no caller reads; close the subscription when unused."""
        me = threading.current_thread()
        while True:
            time.sleep(KEEP_READ)
            with self._cond:
                if self._keeper is not me or self._subscription is None:
                    if self._keeper is me:
                        self._keeper = None
                    return
                if self._reading or any(self._waiters.values()):
                    continue
                if time.monotonic() - self._last_waiter < CLOSE_AFTER:
                    # Until nothing more is there (a caller who comes meanwhile waits on it).
                    for _ in range(KEEP_READS):
                        if not self._read(0) or self._subscription is None:
                            break
                    continue
                self._keeper = None
            self.close()
            return

    def _forget_if_forked(self) -> None:
        """A forked child must not read its parent's connection: it subscribes anew."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._subscription = None
            self._reading = False
            self._keeper = None  # The parent's thread is not in this process.
            self._waiters = {}
            self._token = secrets.token_hex(8)
            self._announced = {}

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.woken = True
        self._cond.notify_all()


class HubWaiter(ResultWaiter):
    """One caller waiting on the hub; polls while the hub has no subscription."""

    def __init__(self, hub: NotificationHub, task_id: str) -> None:
        self.hub = hub
        self.task_id = task_id
        #: Set (under the hub's lock) when task_id is announced or may have been.
        self.woken = False
        self._polling = PollingWaiter()

    def wait(self, timeout: float) -> None:
        """Return when ``task_id`` is announced (or may have been), or after ``timeout``."""
        if self.hub.live:
            self.hub.wait(self, timeout)
        elif not self.hub.resubscribe():
            self._polling.wait(timeout)
        # Resubscribed: return at once, so that the caller reads the store after that.

    def unannounced_since(self, mark: object) -> bool:
        return isinstance(mark, tuple) and self.hub.unannounced(self.task_id, mark)

    def close(self) -> None:
        self.hub.discard(self)


def _close_quietly(subscription: Subscription) -> None:
    with contextlib.suppress(Exception):  # It may be broken already.
        subscription.close()
