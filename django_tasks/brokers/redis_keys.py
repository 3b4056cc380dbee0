"""The names of every Redis key the Redis broker uses, built in this one place.

Every name begins with KEY_PREFIX, by default ``dt:`` and the top package of the project
(``dt:shop`` below, see conf.default_key_prefix()), so that two projects sharing a Redis database
never take each other's tasks. All the keys of one queue share the Redis Cluster hash tag
``{queue}`` (queue names cannot contain braces, see conf.py), so each Lua script of the broker
touches a single hash slot::

    dt:shop:{default}:msgs        hash        task id -> encoded message body
    dt:shop:{default}:ready       sorted set  task id, score (100 - priority) * 2**44 + seq
    dt:shop:{default}:delayed     sorted set  task id, score eta in milliseconds
    dt:shop:{default}:leases      sorted set  task id, score lease deadline in ms (server time)
    dt:shop:{default}:deliveries  hash        task id -> delivery count
    dt:shop:{default}:wake        list        at most one wake-up token, never a message:
                                              pushed by a script that makes messages ready,
                                              cleared by the next claim; idle consumers block
                                              on it with BLPOP, which hands the token to one
    dt:shop:{default}:seq         string      counter giving FIFO order within a priority
    dt:shop:{default}:revoked     sorted set  revoked task ids, score the revoke time in ms
                                              (kept a day)
    dt:shop:db0:results           pub/sub     channel of result notifications (JSON list of
                                              ids); it names the database (here 0) because
                                              PUBLISH reaches the subscribers of every
                                              database of the server
"""

from __future__ import annotations

from typing import NamedTuple


class QueueKeys(NamedTuple):
    """The keys of one queue."""

    msgs: str
    ready: str
    delayed: str
    leases: str
    deliveries: str
    wake: str
    seq: str
    revoked: str


def queue_keys(prefix: str, queue: str) -> QueueKeys:
    """The keys of ``queue`` under ``prefix``, all in the queue's hash slot."""
    base = f"{prefix}:{{{queue}}}"
    return QueueKeys(*(f"{base}:{name}" for name in QueueKeys._fields))


def results_channel(prefix: str, db: int) -> str:
    """The pub/sub channel on which workers announce the results stored by users of ``db``."""
    return f"{prefix}:db{db}:results"
