"""The benchmark's client: one fresh process that enqueues, or makes round trips, and reports.

    python -m bench.client enqueue --count N --deadline SECONDS
    python -m bench.client latency --runs M --deadline SECONDS

Django is set up before the clock starts, so start-up is not measured, but nothing else is
warmed: the first ``delay()`` opens the broker connection, as in a fresh web process. The
figures are printed as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import django

#: Round trips made before the measured ones: the worker's pool may still be forking.
WARMUP_RUNS = 5
#: How long the worker sits idle before the last, separate round trip.
IDLE_SECONDS = 3.0
#: Give up the latency phase after this many timeouts in a row: the worker is not answering.
MAX_CONSECUTIVE_TIMEOUTS = 3
GET_TIMEOUT = 10.0


def enqueue(count: int, deadline: float) -> dict[str, Any]:
    """``noop.delay()`` ``count`` times; stop early (and say so) at the deadline."""
    from bench.benchapp.tasks import noop

    stop_at = time.monotonic() + deadline
    sent = 0
    started = time.perf_counter()
    while sent < count:
        noop.delay()
        sent += 1
        # Checking the clock every call would cost more than it is worth.
        if sent % 100 == 0 and time.monotonic() > stop_at:
            break
    elapsed = time.perf_counter() - started
    return {
        "status": "ok" if sent == count else "overran",
        "detail": f"{sent}/{count} delay() calls in {elapsed:.1f} s (deadline {deadline:.0f} s)",
        "tasks": sent,
        "seconds": elapsed,
        "per_second": sent / elapsed if elapsed > 0 else None,
    }


def round_trip() -> float | None:
    """One ``noop.delay().get(timeout=10)`` in milliseconds; None when it timed out."""
    from bench.benchapp.tasks import noop

    started = time.perf_counter()
    try:
        noop.delay().get(timeout=GET_TIMEOUT)
    except TimeoutError:
        return None
    return (time.perf_counter() - started) * 1000


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency(runs: int, deadline: float) -> dict[str, Any]:
    """``runs`` sequential round trips after a warm-up, then one after the worker sat idle."""
    stop_at = time.monotonic() + deadline
    for _ in range(WARMUP_RUNS):
        round_trip()
    samples: list[float] = []
    timeouts = consecutive = 0
    status, detail = "ok", ""
    for _ in range(runs):
        if time.monotonic() > stop_at:
            status = "overran"
            detail = f"deadline of {deadline:.0f} s reached"
            break
        ms = round_trip()
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
        "warmup_runs": WARMUP_RUNS,
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
        time.sleep(IDLE_SECONDS)
        result["idle_seconds"] = IDLE_SECONDS
        result["after_idle_ms"] = round_trip()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["enqueue", "latency"])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()
    django.setup()
    if args.mode == "enqueue":
        figures = enqueue(args.count, args.deadline)
    else:
        figures = latency(args.runs, args.deadline)
    json.dump(figures, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
