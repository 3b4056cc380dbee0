"""LISTEN connections of the database broker (PostgreSQL with psycopg 3).

A ``Listener`` is one dedicated autocommit connection that LISTENs to channels. Consumers do not
own one each: the consuming threads of a process share one, through a ``SharedListener``.
PostgreSQL signals every listening session of the database on every NOTIFY, so each extra LISTEN
connection costs the server a process wake-up per message sent or result stored, and each
consumer woken for a message that another one claims costs an empty claim.

The shared listener hands each notification to **one** waiting consumer of its channel. No thread
of ours reads the connection: a waiting consumer does (the reader), as in notifications.py. A
notification that finds no consumer waiting is kept as pending for its channel, and the next
consumer of that channel claims instead of sleeping. A consumer whose claim came back full (more
may be ready) wakes one more waiting consumer of its channels, which does the same: a batch sent
with one NOTIFY wakes as many consumers as it keeps busy. (When the only one waiting is the
reader, which sleeps in the connection, the claim wakes it with a NOTIFY of its own.)
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from functools import cache
from typing import Any

from django.db import connections

from ..exceptions import BrokerConnectionError
from .base import per_process


@cache
def can_listen_with_psycopg() -> bool:
    """Whether psycopg 3 is installed; Django may run PostgreSQL on psycopg2: consumers poll then.

    Asked only for a PostgreSQL database, so that a worker on SQLite or MySQL never loads
    psycopg and libpq (about 8 MiB of every process).
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


class Listener:
    """A dedicated autocommit psycopg connection that LISTENs to channels.

    Raises BrokerConnectionError (after closing itself) when the connection fails. Not safe for
    use by two threads at once: a wait holds the connection until it returns.
    """

    def __init__(self, alias: str, connect_timeout: float) -> None:
        import psycopg

        self.alias = alias
        self.channels: set[str] = set()
        with self._errors("connect"):
            self.connection = psycopg.connect(**_listen_params(alias, connect_timeout))

    @property
    def closed(self) -> bool:
        return bool(self.connection.closed)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            if hasattr(self, "connection"):
                self.connection.close()
            raise BrokerConnectionError(
                f"The database broker could not {action} its LISTEN connection to the database "
                f"{self.alias!r}: {exc}"
            ) from exc

    def listen(self, channels: Iterable[str]) -> None:
        """LISTEN to the ``channels`` not listened to yet."""
        from psycopg import sql

        with self._errors("listen on"):
            for channel in sorted(set(channels) - self.channels):
                self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self.channels.add(channel)

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """Wait up to ``timeout`` seconds for notifications; return their (channel, payload).

        With ``timeout=0``, return those received so far without waiting.
        """
        with self._errors("wait on"):
            notifies = self.connection.notifies(timeout=timeout, stop_after=1)
            return [(n.channel, n.payload) for n in notifies]

    def close(self) -> None:
        self.connection.close()


class SharedListener:
    """One LISTEN connection for every consuming thread of a process (see the module's text)."""

    def __init__(self, connect: Callable[[], Listener]) -> None:
        self.connect = connect
        self._pid = os.getpid()
        self._inherited: list[Listener] = []
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # Notified when a read ends.
        self._listener: Listener | None = None
        self._reading = False
        self._waiting: list[_Waiter] = []  # In arrival order: the first one is woken first.
        self._pending: set[str] = set()  # Notified channels that no claim has answered yet.
        self._wanted: set[str] = set()  # Channels to LISTEN to once the reader's wait ends.
        #: Changes with every new connection: what was notified before it went unheard.
        self.epoch = getattr(self, "epoch", 0) + 1

    def before_claim(self, channels: AbstractSet[str]) -> int:
        """LISTEN to ``channels`` (connecting if need be); the caller claims from them next.

        That claim answers every notification of ``channels`` received so far: they wake no
        one. Raises BrokerConnectionError when the connection cannot be made or is lost. A new
        channel waits for the reader's wait to end (at most the broker's ``max_wait``), as the
        connection is the reader's meanwhile: consumers of one worker listen to the same
        queues, so that is rare. Returns the connection's epoch.
        """
        self._forget_if_forked()
        with self._lock:
            self._listen(channels)
            listener = self._listener
            if not self._reading and listener is not None:
                # What already arrived (a reader, if there is one, is on it itself).
                self._hand_out(self._read(listener, 0), claiming=channels)
            self._pending.difference_update(channels)
            return self.epoch

    def after_claim(self, channels: AbstractSet[str], full: bool) -> bool:
        """The caller's claim of ``channels`` came back ``full`` or not.

        A full claim (more may be ready) wakes one more consumer of ``channels``; with none
        waiting, the next one to wait claims at once instead. Returns True when the only one to
        wake is the reader: a reader wakes for a notification only, so the caller then sends
        one (see DatabaseBroker._claim_listening).
        """
        if not full:
            return False
        with self._lock:
            mine = [w for w in self._waiting if not w.woken and not w.channels.isdisjoint(channels)]
            waiter = next((w for w in mine if not w.reading), None)
            if waiter is not None:
                waiter.wake()
            elif not mine:
                self._pending.update(channels)
            return waiter is None and bool(mine)

    def wait(self, channels: AbstractSet[str], timeout: float) -> None:
        """Return when a notification of ``channels`` is handed to the caller, when the
        connection was lost, or after ``timeout`` seconds; the caller claims next.

        Raises BrokerConnectionError when the connection is lost while the caller reads it.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            me = _Waiter(channels, threading.Condition(self._lock))
            self._waiting.append(me)
            try:
                while not me.woken and self._pending.isdisjoint(channels):
                    remaining = deadline - time.monotonic()
                    listener = self._listener
                    if remaining <= 0 or listener is None:
                        return
                    if self._reading:
                        me.condition.wait(remaining)
                        continue
                    me.reading = True
                    try:
                        self._hand_out(self._read(listener, remaining), reader=me)
                    finally:
                        me.reading = False
            finally:
                self._waiting.remove(me)
                self._next_reader()

    @property
    def waiting(self) -> int:
        """How many consumers wait on the listener now."""
        return len(self._waiting)

    def close(self) -> None:
        """Close the connection (at the end of the reader's wait, if one is reading); the next
        claim connects again.
        """
        with self._lock:
            listener, self._listener = self._listener, None
            for waiter in self._waiting:
                waiter.wake()
            if listener is not None and not self._reading:
                listener.close()

    # With the lock held.

    def _listen(self, channels: AbstractSet[str]) -> None:
        while True:
            listener = self._listener
            if listener is None or listener.closed:
                self._listener = None
                listener = self.connect()  # Raises BrokerConnectionError.
                self._listener = listener
                self.epoch += 1
                self._pending.clear()  # The claim that follows answers for the time before.
                self._wanted.clear()
            if listener.channels >= channels:
                return
            if not self._reading:
                self._run_listen(listener, channels)
                return
            self._wanted.update(channels)
            self._turn.wait()

    def _run_listen(self, listener: Listener, channels: AbstractSet[str]) -> None:
        try:
            listener.listen(channels)
        except BrokerConnectionError:
            self._lost(listener)
            raise

    def _read(self, listener: Listener, timeout: float) -> list[tuple[str, str]]:
        """Read the connection; above a zero timeout, with the lock released meanwhile."""
        if timeout <= 0:
            try:
                return listener.wait(0)
            except BrokerConnectionError:
                self._lost(listener)
                raise
        notified: list[tuple[str, str]] | None = None
        self._reading = True
        self._lock.release()
        try:
            notified = listener.wait(timeout)
        finally:
            self._lock.acquire()
            self._reading = False
            self._turn.notify_all()
            if notified is None:
                self._lost(listener)
        if self._listener is not listener:  # Closed meanwhile.
            listener.close()
            return []
        if self._wanted:
            wanted, self._wanted = self._wanted, set()
            self._run_listen(listener, wanted)
        return notified

    def _hand_out(
        self,
        notified: list[tuple[str, str]],
        reader: _Waiter | None = None,
        claiming: AbstractSet[str] = frozenset(),
    ) -> None:
        """Give each notification to one waiting consumer of its channel, the reader first."""
        for channel, _ in notified:
            if channel in claiming:
                continue  # The claim about to run answers it.
            if reader is not None and not reader.woken and channel in reader.channels:
                reader.woken = True
                continue
            waiter = next((w for w in self._waiting if not w.woken and channel in w.channels), None)
            if waiter is None:
                self._pending.add(channel)
            else:
                waiter.wake()

    def _next_reader(self) -> None:
        """Consumers still wait and no one reads: the first of them reads next."""
        if not self._reading:
            waiter = next((w for w in self._waiting if not w.woken), None)
            if waiter is not None:
                waiter.condition.notify()
        self._turn.notify_all()

    def _lost(self, listener: Listener) -> None:
        """The connection failed: the waiting consumers claim; the next claim reconnects."""
        if not listener.closed:
            listener.close()
        if self._listener is listener:
            self._listener = None
        for waiter in self._waiting:
            waiter.wake()
        self._turn.notify_all()

    def _forget_if_forked(self) -> None:
        """A forked child must not use its parent's connection (nor its locks): it starts anew.

        The parent's connection is kept referenced, never closed here: closing it would end the
        parent's session too.
        """
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if self._listener is not None:
                self._inherited.append(self._listener)
            self._reset()


class _Waiter:
    """A consumer waiting on a SharedListener."""

    def __init__(self, channels: AbstractSet[str], condition: threading.Condition) -> None:
        self.channels = channels
        self.condition = condition
        self.woken = False
        self.reading = False

    def wake(self) -> None:
        self.woken = True
        self.condition.notify()


def _listen_params(alias: str, connect_timeout: float) -> dict[str, Any]:
    """psycopg.connect() arguments for a connection of its own to the database ``alias``."""
    params = connections[alias].get_connection_params()  # Without any pool.
    params.setdefault("connect_timeout", libpq_connect_timeout(connect_timeout))
    params["autocommit"] = True
    return params


def libpq_connect_timeout(seconds: float) -> int:
    """libpq's ``connect_timeout`` for ``seconds``: whole seconds, and 2 at least (its minimum)."""
    return max(2, math.ceil(seconds))


def database_key(kind: str, alias: str) -> tuple[str, ...]:
    """A per_process() key for ``kind`` on the database ``alias`` as configured now."""
    db = connections[alias].settings_dict
    return (kind, alias, *(str(db.get(k)) for k in ("NAME", "HOST", "PORT", "USER")))


def shared_listener(alias: str, connect_timeout: float) -> SharedListener:
    """This process's SharedListener of the database ``alias``."""
    return per_process(
        database_key("queues", alias),
        lambda: SharedListener(lambda: Listener(alias, connect_timeout)),
    )
