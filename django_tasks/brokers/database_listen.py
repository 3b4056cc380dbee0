"""LISTEN connections of the database broker (PostgreSQL with psycopg 3).

A ``ListenSubscription`` is what a notifications.Hub reads on PostgreSQL: one connection of its
own per process and purpose, LISTENing to the queues' channels (to wake idle consumers) or to the
results channel (to wake ``AsyncResult.get()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from django.db import connections

from ..exceptions import BrokerConnectionError


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


class ListenSubscription:
    """A dedicated autocommit psycopg connection that LISTENs to ``channels``.

    A notifications.Subscription: ``keys(channel, payload)`` says which keys a notification
    wakes. Raises BrokerConnectionError (after closing itself) when the connection fails.
    """

    def __init__(
        self,
        alias: str,
        connect_timeout: float,
        channels: Iterable[str],
        keys: Callable[[str, str], Iterable[str]],
    ) -> None:
        import psycopg
        from psycopg import sql

        self.alias = alias
        self.keys = keys
        with self._errors("connect"):
            self.connection = psycopg.connect(**_listen_params(alias, connect_timeout))
        with self._errors("listen on"):
            for channel in sorted(set(channels)):
                self.connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

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

    def read(self, timeout: float) -> list[str]:
        """The keys notified within ``timeout`` seconds, and those of any received already."""
        with self._errors("wait on"):
            notifies = list(self.connection.notifies(timeout=timeout, stop_after=1))
            if notifies:
                notifies += self.connection.notifies(timeout=0)
        return [key for n in notifies for key in self.keys(n.channel, n.payload)]

    def close(self) -> None:
        self.connection.close()


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
