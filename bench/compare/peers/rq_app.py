"""RQ: results in Redis (its default), read with ``Job.latest_result(timeout=...)``.

Worker: ``rq worker-pool -n 2`` (fork per job), or with ``-w rq.worker.SimpleWorker``.
"""

from __future__ import annotations

import math
import os

from counter import bump
from redis import Redis
from rq import Queue

DISTRIBUTIONS = ["rq", "redis"]
BULK_API = "Queue.enqueue_many()"

queue = Queue("default", connection=Redis.from_url(os.environ["BENCH_REDIS_URL"]))


def noop() -> None:
    return None


def count() -> None:
    bump()


def init() -> None:
    """Nothing to set up."""


def enqueue_one() -> None:
    queue.enqueue(count)


def enqueue_bulk(n: int) -> None:
    queue.enqueue_many([Queue.prepare_data(count) for _ in range(n)])


def round_trip(timeout: float) -> None:
    job = queue.enqueue(noop)
    # latest_result() blocks on the job's result stream (XREAD); whole seconds.
    if job.latest_result(timeout=math.ceil(timeout)) is None:
        raise TimeoutError("no result")
