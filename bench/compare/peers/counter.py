"""The counter every drain task increments: one ``INCR`` on the benchmark's own Redis server.

Every library's drain task calls ``bump()``, so the harness detects completions the same way for
all of them, by reading this one key. The connection is made on first use, in the process that
runs the task (after any fork).
"""

from __future__ import annotations

import os

import redis

KEY = "bench:counter"
_client: redis.Redis | None = None


def bump() -> None:
    """Add one to the shared counter."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_COUNTER_URL"])
    # INCR itself (redis-py's incr() sends INCRBY): the harness subtracts exactly these calls.
    _client.execute_command("INCR", KEY)
