"""The names of every Redis key the Redis broker uses, built in this one place.

All the keys of one queue share the Redis Cluster hash tag ``{queue}`` (queue names cannot contain
braces, see conf.py), so each Lua script of the broker touches a single hash slot::

    dt:{default}:msgs        hash         task id -> encoded message body
    dt:{default}:ready       sorted set   task id, score (100 - priority) * 2**44 + seq
    dt:{default}:delayed     sorted set   task id, score eta in milliseconds
    dt:{default}:leases      sorted set   task id, score lease deadline in ms (Redis server time)
    dt:{default}:deliveries  hash         task id -> delivery count
    dt:{default}:inbox       stream       messages pushed one at a time, not yet in msgs/ready
                                          (fields id, p priority, b body), or one wake-up
                                          marker (field w); consumers block on it with
                                          XREADGROUP through its consumer group "wake"
    dt:{default}:seq         string       counter giving FIFO order within a priority
    dt:{default}:revoked     sorted set   revoked task ids, score the revoke time in ms (kept a day)
    dt:results               pub/sub      channel of result notifications (JSON list of ids)
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
    inbox: str
    seq: str
    revoked: str


def queue_keys(prefix: str, queue: str) -> QueueKeys:
    """The keys of ``queue`` under ``prefix``, all in the queue's hash slot."""
    base = f"{prefix}:{{{queue}}}"
    return QueueKeys(*(f"{base}:{name}" for name in QueueKeys._fields))


def results_channel(prefix: str) -> str:
    """The pub/sub channel on which workers announce stored results."""
    return f"{prefix}:results"
