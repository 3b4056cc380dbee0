"""The comparison's report: medians of the runs, the Markdown tables and the ratios."""

from __future__ import annotations

import statistics
from typing import Any

from bench.compare.libraries import Library
from bench.compare.services import IDLE_SECONDS

#: figure -> (phase, key in that phase's figures)
FIGURES: dict[str, tuple[str, str]] = {
    "enqueue_per_s": ("enqueue", "per_second"),
    "enqueue_per_lpush_interleaved": ("enqueue_interleaved", "per_lpush"),
    "bulk_per_s": ("enqueue_bulk", "per_second"),
    "drain_per_s": ("drain", "per_second"),
    "drain_incl_start_per_s": ("drain", "per_second_incl_start"),
    "p50_ms": ("latency", "p50_ms"),
    "p99_ms": ("latency", "p99_ms"),
    "after_idle_ms": ("latency", "after_idle_ms"),
    "rss_mib": ("memory", "rss_mib"),
    "pss_mib": ("memory", "pss_mib"),
    "enqueue_cmds": ("enqueue", "redis_commands_per_task"),
    "bulk_cmds": ("enqueue_bulk", "redis_commands_per_task"),
    "drain_cmds": ("drain", "redis_commands_per_task"),
    "redis_bytes": ("enqueue", "redis_bytes_per_task"),
    "wal_bytes": ("drain", "wal_bytes_per_task"),
    "interleaved_per_s": ("enqueue_interleaved", "per_second"),
    "interleaved_lpush_per_s": ("enqueue_interleaved", "lpush_per_second"),
}
#: Figures where less is better (the best peer is the smallest).
LOWER_IS_BETTER = {"p50_ms", "p99_ms", "after_idle_ms", "rss_mib", "pss_mib", "drain_cmds"}
REASON_CHARS = 70


def summarise(runs: list[dict[str, Any]], bulk: bool) -> dict[str, Any]:
    """The median of each figure over the runs that measured it, or why none did."""
    out: dict[str, Any] = {}
    for name, (phase, key) in FIGURES.items():
        values = [
            r[phase][key]
            for r in runs
            if r.get(phase, {}).get("status") == "ok" and r[phase].get(key) is not None
        ]
        if values:
            out[name] = statistics.median(values)
        elif phase == "enqueue_bulk" and not bulk:
            out[name] = "n/a"
        else:
            out[name] = why_missing(runs, phase)
    return out


def why_missing(runs: list[dict[str, Any]], phase: str) -> str:
    """The status (and reason) of a phase that gave no figure in any run."""
    for run in runs:
        data = run.get(phase)
        if data and data.get("status") != "ok":
            return f"{data.get('status', 'failed')}: {data.get('detail', '')}".strip(": ")
        if "error" in run:
            return f"failed: {run['error']}"
    return "—"


def number(value: Any, digits: int = 0) -> str:
    if isinstance(value, str):
        return value if len(value) <= REASON_CHARS else value[: REASON_CHARS - 1] + "…"
    return f"{value:,.{digits}f}"


def pair(a: Any, b: Any, digits: int) -> str:
    if isinstance(a, str) and a == b:
        return number(a)
    return f"{number(a, digits)} / {number(b, digits)}"


def main_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "library, configuration",
        "workers",
        "enqueue/s",
        "bulk enqueue/s",
        "drain/s",
        "drain/s incl. start",
        "p50 / p99 ms",
        "after idle ms",
        "idle RSS / PSS MiB",
        "Redis cmds/task enqueue / drain",
        "Redis bytes/queued task",
        "PostgreSQL WAL bytes/drained task",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        m = row["median"]
        if "error" in row:
            cells = [f"failed: {number(row['error'])}"] + [""] * (len(head) - 3)
        else:
            cells = [
                number(m["enqueue_per_s"]),
                number(m["bulk_per_s"]),
                number(m["drain_per_s"]),
                number(m["drain_incl_start_per_s"]),
                pair(m["p50_ms"], m["p99_ms"], 1),
                number(m["after_idle_ms"], 1),
                pair(m["rss_mib"], m["pss_mib"], 1),
                commands(row, m),
                number(m["redis_bytes"]) if row["redis_broker"] else "no Redis queue",
                number(m["wal_bytes"]) if row["database"] == "postgres" else "—",
            ]
        lines.append("| " + " | ".join([row["title"], row["label"], *cells]) + " |")
    return "\n".join(lines)


def commands(row: dict[str, Any], m: dict[str, Any]) -> str:
    if not row["redis_broker"]:
        return "no Redis queue"
    return pair(m["enqueue_cmds"], m["drain_cmds"], 1)


def best(rows: list[dict[str, Any]], figure: str, **where: Any) -> tuple[float, str] | None:
    """The best peer value of ``figure`` among the rows matching ``where``, and its row's name."""
    found = [
        (r["median"][figure], f"{r['short']} {r['pool']}")
        for r in rows
        if r["peer"]
        and isinstance(r["median"].get(figure), int | float)
        and all(r.get(k) == v for k, v in where.items())
    ]
    if not found:
        return None
    pick = min if figure in LOWER_IS_BETTER else max
    return pick(found, key=lambda item: item[0])


def ratio(value: Any, reference: tuple[float, str] | float | None, named: bool = True) -> str:
    if not isinstance(value, int | float) or reference is None:
        return "—"
    ref, name = reference if isinstance(reference, tuple) else (reference, "")
    if not ref:
        return "—"
    return f"{value / ref:.2f}x" + (f" ({name})" if named and name else "")


def ratio_table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    head = [
        "django_tasks row",
        "enqueue ÷ best peer",
        "enqueue ÷ redis-py single LPUSH (alternated in one client)",
        "bulk ÷ best peer bulk",
        "bulk ÷ pipelined LPUSH",
        "drain ÷ best peer",
        "drain ÷ best database peer",
        "p50 ÷ best peer (lower is better)",
        "p50 ÷ LPUSH round trip",
        "PSS ÷ smallest peer, same executors",
        "Redis cmds/drained task ÷ fewest",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        if row["peer"] or "error" in row:
            continue
        m = row["median"]
        cells = [
            ratio(m["enqueue_per_s"], best(rows, "enqueue_per_s")),
            ratio(m["enqueue_per_lpush_interleaved"], 1.0),
            ratio(m["bulk_per_s"], best(rows, "bulk_per_s")),
            ratio(m["bulk_per_s"], reference.get("redis_py_lpush_pipelined")),
            ratio(m["drain_per_s"], best(rows, "drain_per_s")),
            ratio(m["drain_per_s"], best(rows, "drain_per_s", database_backed=True)),
            ratio(m["p50_ms"], best(rows, "p50_ms")),
            ratio(m["p50_ms"], reference.get("redis_py_round_trip_ms")),
            ratio(m["pss_mib"], best(rows, "pss_mib", kind=row["kind"])),
            ratio(m["drain_cmds"], best(rows, "drain_cmds", redis_broker=True))
            if row["redis_broker"]
            else "—",
        ]
        lines.append("| " + " | ".join([f"{row['title']}, {row['pool']}", *cells]) + " |")
    return "\n".join(lines)


#: The headline figures the project guards: (what, django_tasks row, figure, reference row,
#: figure). A reference row of None: the figure stands alone (no ratio).
HEADLINES: tuple[tuple[str, str, str, str | None, str], ...] = (
    ("drain/s, Redis broker, results in PostgreSQL ÷ Huey", "dt-redis-postgres/processes",
     "drain_per_s", "huey/processes", "drain_per_s"),
    ("drain/s, database broker on PostgreSQL ÷ Huey", "dt-db-postgres/processes",
     "drain_per_s", "huey/processes", "drain_per_s"),
    ("delay()/s ÷ redis-py single LPUSH/s (one client, alternated)",
     "dt-redis-postgres/processes", "interleaved_per_s", "dt-redis-postgres/processes",
     "interleaved_lpush_per_s"),
    ("round trip p50 ms, results in SQLite ÷ Huey (notify_result)", "dt-redis-sqlite/processes",
     "p50_ms", "huey/processes", "p50_ms"),
    ("round trip p50 ms, results in PostgreSQL ÷ Huey (notify_result)",
     "dt-redis-postgres/processes", "p50_ms", "huey/processes", "p50_ms"),
    ("Redis commands per drained task, Redis broker", "dt-redis-postgres/processes",
     "drain_cmds", None, ""),
)  # fmt: skip


def headline_table(rows: list[dict[str, Any]]) -> str:
    """The figures the project guards, as ratios, with the process pools' rows (--fast)."""
    by_key = {row["key"]: row["median"] for row in rows if "error" not in row}
    lines = ["| headline | django_tasks | reference | ratio |", "|---|---:|---:|---:|"]
    for title, ours, figure, theirs, reference_figure in HEADLINES:
        value = by_key.get(ours, {}).get(figure)
        ref = by_key.get(theirs, {}).get(reference_figure) if theirs else None
        digits = 1 if figure in ("p50_ms", "drain_cmds") else 0
        shown_ref = number(ref, digits) if ref is not None else "—"
        shown = number(value, digits) if value is not None else "not measured"
        lines.append(f"| {title} | {shown} | {shown_ref} | {ratio(value, ref, named=False)} |")
    return "\n".join(lines)


def reference_table(reference: dict[str, Any]) -> str:
    names = {
        "redis_benchmark_lpush_c1": "redis-benchmark -t lpush -c 1",
        "redis_benchmark_lpush_c1_p100": "redis-benchmark -t lpush -c 1 -P 100",
        "redis_py_lpush_single": "redis-py, one LPUSH per call",
        "redis_py_lpush_pipelined": "redis-py, pipelines of 1000 LPUSH",
    }
    lines = ["| physical reference (one client) | LPUSH/s |", "|---|---:|"]
    for key, title in names.items():
        lines.append(f"| {title} | {number(reference.get(key, '—'))} |")
    idle = f"after {number(IDLE_SECONDS, 0)} s idle"
    round_trips = {
        "redis_py_round_trip_ms": "redis-py round trip, ms",
        "redis_py_after_idle_ms": f"redis-py round trip {idle}, ms",
        "relay_round_trip_ms": "round trip through a relay process (caller, Redis, relay, Redis, "
        "caller), p50 ms",
        "relay_after_idle_ms": f"the same {idle}, ms",
    }
    for key, title in round_trips.items():
        ms = reference.get(key)
        lines.append(f"| {title} | {number(ms, 3) if ms else '—'} |")
    return "\n".join(lines)


def scale_table(scale: dict[str, Any]) -> str:
    lines = [
        "| configuration | queued | drain/s (first completions) | ÷ rate with the small queue "
        "| Redis bytes/queued task |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in scale.values():
        small = entry.get("small", {})
        small_rate = small.get("drain", {}).get("per_second")
        for size in ("small", "large"):
            data = entry.get(size, {})
            rate = data.get("drain", {}).get("per_second") if data.get("status") == "ok" else None
            why = data.get("detail") or data.get("error", "")
            shown = number(rate) if rate else number(f"{data.get('status', 'failed')}: {why}")
            rel = ratio(rate, small_rate, named=False) if size == "large" else "1.00x"
            mem = data.get("redis_bytes_per_task")
            lines.append(
                f"| {entry['title']} | {number(data.get('queued', '—'))} | {shown} | {rel} "
                f"| {number(mem) if mem is not None else '—'} |"
            )
    return "\n".join(lines)


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """Every phase that did not give a figure, with its full reason."""
    found = []
    for row in rows:
        if "error" in row:
            found.append(f"- {row['title']}: {row['error']}")
            continue
        for index, run in enumerate(row["runs"], 1):
            for phase, data in run.items():
                if isinstance(data, dict) and data.get("status") not in ("ok", "n/a", None):
                    found.append(
                        f"- {row['title']}, {row['pool']}, run {index}, {phase}: "
                        f"{data.get('status')}: {data.get('detail', '')}"
                    )
    return found


def row_entry(lib: Library, pool_key: str, label: str, kind: str) -> dict[str, Any]:
    """An empty row of the report for one library and one pool."""
    return {
        "key": f"{lib.key}/{pool_key}",
        "title": lib.title,
        "short": lib.title.split(" (")[0].split(",")[0],
        "pool": pool_key,
        "label": label,
        "kind": kind,
        "peer": lib.peer,
        "redis_broker": lib.redis_broker,
        "database": lib.database,
        "database_backed": lib.database is not None,
        "notes": list(lib.notes),
        "runs": [],
        "median": {},
    }
