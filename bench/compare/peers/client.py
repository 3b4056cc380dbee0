"""The benchmark's client, run by bench/compare/run.py in the library's own virtualenv.

    python client.py ADAPTER enqueue --count N [--bulk] --deadline S
    python client.py ADAPTER latency --runs M --deadline S
    python client.py ADAPTER interleaved --count N --blocks K --deadline S
    python client.py ADAPTER migrate | purge | versions

ADAPTER is the module of one library (``huey_app``, ``q2_site.adapter``...). It provides:

- ``init()``: set the library up (Django's setup, for instance); called before any clock starts;
- ``enqueue_one()``: queue one drain task with the library's ordinary one-call API;
- ``enqueue_bulk(n)`` or ``None``: queue ``n`` drain tasks with its bulk API, if it has one;
- ``BULK_API``: the name of that API, for the report;
- ``round_trip(timeout)``: queue one no-op task and wait for its result through the library's own
  result API; raises ``TimeoutError`` when it does not come within ``timeout`` seconds;
- ``migrate()``, ``purge()`` (optional): create its tables; empty its queue and results;
- ``DISTRIBUTIONS``: the packages whose versions the report records.

Only the standard library, redis-py and the library under test are needed here. The figures are
printed as one JSON object, the last line of stdout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import sys
import time
from types import ModuleType
from typing import Any

import redis

#: Round trips made before the measured ones: the worker's pool may still be starting.
WARMUP_RUNS = 5
#: How long the worker sits idle before the last, separate round trip (--idle overrides it).
IDLE_SECONDS = 3.0
#: Give up the latency phase after this many timeouts in a row: the worker is not answering.
MAX_CONSECUTIVE_TIMEOUTS = 3
GET_TIMEOUT = 10.0
#: Tasks per call of a bulk API: the same for every library that has one.
BULK_BATCH = 1000


def enqueue(adapter: ModuleType, count: int, deadline: float, bulk: bool) -> dict[str, Any]:
    """Queue ``count`` drain tasks one call at a time (or in bulk); stop at the deadline."""
    stop_at = time.monotonic() + deadline
    sent = 0
    started = time.perf_counter()
    while sent < count:
        if bulk:
            step = min(BULK_BATCH, count - sent)
            adapter.enqueue_bulk(step)
            sent += step
        else:
            adapter.enqueue_one()
            sent += 1
        # Reading the clock on every call would cost more than it is worth.
        if (bulk or sent % 100 == 0) and time.monotonic() > stop_at:
            break
    elapsed = time.perf_counter() - started
    api = adapter.BULK_API if bulk else "one call per task"
    return {
        "status": "ok" if sent == count else "overran",
        "detail": f"{sent}/{count} tasks in {elapsed:.2f} s ({api}; deadline {deadline:.0f} s)",
        "api": api,
        "tasks": sent,
        "seconds": elapsed,
        "per_second": sent / elapsed if elapsed > 0 else None,
    }


def interleaved(adapter: ModuleType, count: int, blocks: int, deadline: float) -> dict[str, Any]:
    """One-call enqueues and redis-py single ``LPUSH``es in alternate blocks, in this process.

    ``count`` of each in ``blocks`` blocks, an ``LPUSH`` block first, after one unmeasured call
    of each. Both loops run in the same process at the same moments, so the ratio of their
    rates is not moved by the machine's drift or by where the scheduler put this process,
    which move two fresh processes' rates apart by a tenth or more.
    """
    stop_at = time.monotonic() + deadline
    conn = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], single_connection_client=True)
    block = max(1, count // blocks)
    lpush_seconds = enqueue_seconds = 0.0
    done = 0
    try:
        conn.lpush("bench:reference", b"x")
        adapter.enqueue_one()
        while done < count and time.monotonic() < stop_at:
            step = min(block, count - done)
            started = time.perf_counter()
            for _ in range(step):
                conn.lpush("bench:reference", b"x")
            lpush_seconds += time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(step):
                adapter.enqueue_one()
            enqueue_seconds += time.perf_counter() - started
            done += step
        conn.delete("bench:reference")
    finally:
        conn.close()
    return {
        "status": "ok" if done == count else "overran",
        "detail": f"{done}/{count} of each in blocks of {block} (deadline {deadline:.0f} s)",
        "tasks": done,
        "per_second": done / enqueue_seconds,
        "lpush_per_second": done / lpush_seconds,
        "per_lpush": lpush_seconds / enqueue_seconds,
    }


def timed_round_trip(adapter: ModuleType) -> float | None:
    """One round trip in milliseconds; None when it timed out."""
    started = time.perf_counter()
    try:
        adapter.round_trip(GET_TIMEOUT)
    except TimeoutError:
        return None
    return (time.perf_counter() - started) * 1000


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency(
    adapter: ModuleType, runs: int, deadline: float, idle: float = IDLE_SECONDS
) -> dict[str, Any]:
    """``runs`` sequential round trips after a warm-up, then one after the worker sat idle."""
    stop_at = time.monotonic() + deadline
    for _ in range(WARMUP_RUNS):
        timed_round_trip(adapter)
    samples: list[float] = []
    timeouts = consecutive = 0
    status, detail = "ok", ""
    for _ in range(runs):
        if time.monotonic() > stop_at:
            status, detail = "overran", f"deadline of {deadline:.0f} s reached"
            break
        ms = timed_round_trip(adapter)
        if ms is None:
            timeouts += 1
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_TIMEOUTS:
                status = "failed"
                detail = f"{consecutive} round trips in a row timed out after {GET_TIMEOUT:.0f} s"
                break
            continue
        consecutive = 0
        samples.append(ms)
    result: dict[str, Any] = {
        "status": status,
        "detail": detail,
        "runs": runs,
        "completed": len(samples),
        "timeouts": timeouts,
    }
    if samples:
        ordered = sorted(samples)
        result.update(
            p50_ms=percentile(ordered, 0.50),
            p99_ms=percentile(ordered, 0.99),
            mean_ms=sum(ordered) / len(ordered),
            min_ms=ordered[0],
            max_ms=ordered[-1],
        )
    if status == "ok":
        time.sleep(idle)
        result["after_idle_ms"] = timed_round_trip(adapter)
    return result


def versions(adapter: ModuleType) -> dict[str, Any]:
    """The versions of the library's packages, and of this Python."""
    found: dict[str, Any] = {"python": sys.version.split()[0]}
    for dist in adapter.DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    found["bulk_api"] = adapter.BULK_API if adapter.enqueue_bulk is not None else None
    return found


def run(adapter: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    """Carry out one mode; its figures."""
    if args.mode == "versions":
        return versions(adapter)
    adapter.init()
    if args.mode == "migrate":
        getattr(adapter, "migrate", lambda: None)()
        return {"status": "ok"}
    if args.mode == "purge":
        getattr(adapter, "purge", lambda: None)()
        return {"status": "ok"}
    if args.mode == "interleaved":
        return interleaved(adapter, args.count, args.blocks, args.deadline)
    if args.mode == "enqueue":
        if args.bulk and adapter.enqueue_bulk is None:
            return {"status": "n/a", "detail": "no bulk API"}
        return enqueue(adapter, args.count, args.deadline, args.bulk)
    return latency(adapter, args.runs, args.deadline, args.idle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("adapter")
    modes = ["enqueue", "interleaved", "latency", "migrate", "purge", "versions"]
    parser.add_argument("mode", choices=modes)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--bulk", action="store_true")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS)
    args = parser.parse_args()
    adapter = importlib.import_module(args.adapter)
    figures = run(adapter, args)
    sys.stdout.write("\n" + json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
