"""Compare django_tasks with other task queues, side by side, on this machine, in one run.

    .venv/bin/python bench/compare/run.py [--fast | --quick] [--libraries huey,celery,...]
                                          [--runs 3] [--django-tasks-src CHECKOUT]

Builds a virtualenv per peer under bench/compare/.venvs/ (if missing), starts a Redis server of its
own on a free loopback port, then measures each library in turn (never two at once): enqueue,
drain, round-trip latency, idle memory, Redis commands and PostgreSQL WAL per task; plus the
physical reference (what one Redis client can do) and, in the full run, the scale runs. ``--fast``
measures only the headline figures (django_tasks' three configurations and Huey, process pools).
Prints Markdown tables, the headline ratios last, and writes bench/results/compare-latest.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory is on sys.path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.compare import libraries, processes, report, services
from bench.compare.libraries import FAMILIES, Library, select
from bench.compare.phases import PEERS, Context, Session

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
LOGS_DIR = RESULTS_DIR / "compare-logs"
#: Scale runs (without --quick): configuration -> the large queue (its first pool is measured).
SCALE = {"dt-redis-postgres": 1_000_000, "dt-db-postgres": 100_000}
SCALE_WINDOW = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 tasks, 50 round trips, 1 run")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the headline figures only: django_tasks (Redis broker with results in PostgreSQL "
        "and in SQLite, database broker on PostgreSQL) and Huey, process pools, 5,000 tasks, "
        "3 runs (about 10 minutes)",
    )
    parser.add_argument(
        "--django-tasks-src",
        type=Path,
        default=ROOT,
        help="the checkout whose django_tasks is measured, put first on the PYTHONPATH of "
        "django_tasks' processes (default: this one); for a before/after comparison",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(FAMILIES),
        help=f"comma-separated: {', '.join(FAMILIES)}, or a django_tasks configuration "
        "(dt-redis-sqlite, dt-redis-postgres, dt-db-postgres, dt-db-sqlite); default: all",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per enqueue and drain")
    parser.add_argument("--latency-runs", type=int, default=None, help="round trips measured")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale runs")
    parser.add_argument(
        "--scale-large",
        type=int,
        default=None,
        help="the large queue of both scale runs (default: 1,000,000 on Redis, 100,000 on "
        "PostgreSQL); for a shorter check",
    )
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.tasks = args.tasks or (2_000 if args.quick else 5_000 if args.fast else 10_000)
    args.latency_runs = args.latency_runs or (50 if args.quick else 200)
    args.scale = not (args.quick or args.fast or args.no_scale)
    args.django_tasks_src = args.django_tasks_src.resolve()
    if not (args.django_tasks_src / "django_tasks" / "__init__.py").exists():
        parser.error(f"no django_tasks package in {args.django_tasks_src}")
    names = [n.strip() for n in args.libraries.split(",") if n.strip()]
    args.selected = libraries.fast() if args.fast else select(names)
    if not args.selected:
        parser.error(f"no library matches {args.libraries!r}")
    return args


# Machine and estimate -----------------------------------------------------------------------------


def machine(dt_src: Path) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": services.cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "django_tasks_src": str(dt_src),
        "git": services.git_describe(dt_src),
        "load_average_at_start": os.getloadavg(),
    }


def estimate_minutes(args: argparse.Namespace) -> float:
    """A rough forecast: per row, fixed costs plus the tasks at a few hundred per second."""
    rows = sum(len(lib.pools) for lib in args.selected)
    per_row = 15 + args.tasks / 250 + args.latency_runs * 0.15
    seconds = rows * args.runs * per_row
    if args.scale:
        chosen = {lib.key for lib in args.selected}
        seconds += args.runs * sum(q / 20000 + 30 for key, q in SCALE.items() if key in chosen)
    return seconds / 60


# Running ------------------------------------------------------------------------------------------


def run_library(lib: Library, ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """Every row of one library configuration, every run; its scale runs; its clean-up."""
    print(f"\n## {lib.title}", flush=True)
    rows = {p.key: report.row_entry(lib, p.key, p.label, p.kind) for p in lib.pools}
    entry: dict[str, Any] = {"title": lib.title, "rows": rows, "notes": list(lib.notes)}
    pg_name = services.pg_name(lib.key) if lib.database == "postgres" else None
    try:
        if pg_name:
            services.create_database(pg_name)
        session = Session(lib, ctx, pg_name)
        entry["versions"] = session.prepare()
        print(f"  versions: {entry['versions']}", flush=True)
        for run in range(1, args.runs + 1):
            for pool in lib.pools:
                rows[pool.key]["runs"].append(guarded(lambda p=pool, r=run: session.measure(p, r)))
        if args.scale and lib.key in SCALE:
            entry["scale"] = run_scale(session, lib, args.scale_large or SCALE[lib.key], args.runs)
    except Exception as exc:
        print(f"  [{lib.key}] failed: {exc}", flush=True)
        for row in rows.values():
            if not row["runs"]:
                row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if pg_name:
            with contextlib.suppress(Exception):
                services.drop_database(pg_name)
    for row in rows.values():
        row["median"] = report.summarise(row["runs"], bulk=bool(session_bulk(entry)))
    return entry


def session_bulk(entry: dict[str, Any]) -> str | None:
    return entry.get("versions", {}).get("bulk_api")


def guarded(step: Any) -> dict[str, Any]:
    """One run of one row; an exception fails that run (recorded), not the comparison."""
    try:
        return dict(step())
    except Exception as exc:
        print(f"  run failed: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_scale(session: Session, lib: Library, large: int, runs: int) -> dict[str, Any]:
    """Drain rate over the first SCALE_WINDOW completions, small queue against large queue.

    Each size is measured ``runs`` times, small and large in turn (so that a drift of the
    machine weighs on both); the run with the median rate stands for the size, and every
    rate is kept under ``rates``.
    """
    pool = lib.pools[0]
    entry: dict[str, Any] = {"title": f"{lib.title}, {pool.label}"}
    samples: dict[str, list[dict[str, Any]]] = {"small": [], "large": []}
    for run in range(1, runs + 1):
        for size, queued in (("small", SCALE_WINDOW), ("large", large)):
            print(f"  [{lib.key}] scale run {run}: {queued:,} queued, timing {SCALE_WINDOW:,}",
                  flush=True)  # fmt: skip
            sample = guarded(lambda q=queued: session.scale(pool, q, SCALE_WINDOW))
            samples[size].append(sample)
            rate = sample.get("drain", {}).get("per_second")
            shown = f"{rate:,.0f} tasks/s" if rate else sample.get("detail", sample)
            print(f"  [{lib.key}] scale run {run}, {queued:,} queued: {shown}", flush=True)
    for size, taken in samples.items():
        entry[size] = median_sample(taken)
    return entry


def median_sample(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median drain rate, with every rate; the first failure if none ran."""
    ok = [s for s in samples if s.get("status") == "ok" and s.get("drain", {}).get("per_second")]
    if not ok:
        return samples[0]
    ok.sort(key=lambda s: s["drain"]["per_second"])
    return {**ok[(len(ok) - 1) // 2], "rates": [s["drain"]["per_second"] for s in ok]}


def reference_runs(port: int, runs: int) -> dict[str, Any]:
    """The physical reference, measured ``runs`` times; medians, and every sample."""
    samples = [services.physical_reference(port) for _ in range(runs)]
    medians = {
        key: statistics.median(s[key] for s in samples if s[key] is not None)
        for key in samples[0]
        if any(s[key] is not None for s in samples)
    }
    return {**medians, "samples": samples}


# Report -------------------------------------------------------------------------------------------


def print_report(
    payload: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    info = payload["machine"]
    print("\n# django_tasks side by side\n")
    print(
        f"{info['date']}; {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"{info['memory_gib']} GiB; "
        f"Python {info['python']}; {info.get('redis_server', '')}; PostgreSQL "
        f"{info.get('postgresql', '-')}; django_tasks {info['git']} from "
        f"{info['django_tasks_src']}; load "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])} at start, "
        f"{', '.join(f'{x:.2f}' for x in info.get('load_average_at_end', ()))} at end."
    )
    print(
        f"{args.tasks:,} tasks per enqueue and drain, {args.latency_runs} round trips; medians of "
        f"{args.runs} run(s). Django-based libraries use persistent connections (CONN_MAX_AGE=600)."
        "\n"
    )
    print(report.main_table(rows))
    print()
    print(report.reference_table(payload["reference"]))
    print()
    print(report.ratio_table(rows, payload["reference"]))
    scale = {k: v["scale"] for k, v in payload["libraries"].items() if "scale" in v}
    if scale:
        print()
        print(report.scale_table(scale))
    print()
    for lib in payload["libraries"].values():
        versions = ", ".join(
            f"{k} {v}" for k, v in lib.get("versions", {}).items() if k != "bulk_api"
        )
        notes = "; ".join(lib["notes"])
        print(f"- {lib['title']}: {versions}" + (f"; {notes}" if notes else ""))
    trouble = report.problems(rows)
    if trouble:
        print("\nWhat did not complete:\n" + "\n".join(trouble))
    print("\n## Headline figures (process pools)\n")
    print(report.headline_table(rows))


def write_json(payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "compare-latest.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def cleanup(workdir: Path, libraries: list[Library]) -> None:
    """Stop what runs, drop the databases, remove the SQLite files. Idempotent."""
    processes.stop_all()
    for lib in libraries:
        if lib.database == "postgres":
            with contextlib.suppress(Exception):
                services.drop_database(services.pg_name(lib.key))
    shutil.rmtree(workdir, ignore_errors=True)


def prepare_venvs(libraries: list[Library]) -> dict[str, str]:
    """Build the peers' virtualenvs; the reason for each that could not be built."""
    names = sorted({lib.venv for lib in libraries if lib.venv})
    failed = services.ensure_venvs(names, LOGS_DIR)
    return {name: reason for name, reason in failed.items() if reason}


def main() -> int:
    args = parse_args()
    if any(lib.database == "postgres" for lib in args.selected):
        try:
            services.check_postgres()
        except services.ServiceMissing as exc:
            print(f"compare: {exc}", file=sys.stderr)
            return 2
    processes.exit_on_signals()
    shutil.rmtree(LOGS_DIR, ignore_errors=True)
    LOGS_DIR.mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix="compare-", dir=RESULTS_DIR))
    atexit.register(cleanup, workdir, args.selected)
    info = machine(args.django_tasks_src)
    print(
        f"Comparing {len(args.selected)} configurations, {args.runs} run(s), {args.tasks:,} tasks, "
        f"{args.latency_runs} round trips{', with the scale runs' if args.scale else ''}: "
        f"about {estimate_minutes(args):.0f} min (every phase has a deadline).",
        flush=True,
    )
    started = time.monotonic()
    broken_venvs = prepare_venvs(args.selected)
    services.compile_bytecode(args.django_tasks_src / "django_tasks", PEERS)
    payload: dict[str, Any] = {"machine": info, "parameters": vars_of(args), "libraries": {}}
    rows: list[dict[str, Any]] = []
    try:
        run_all(args, payload, rows, broken_venvs, workdir)
    except services.ServiceMissing as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("\ncompare: interrupted; stopping processes, dropping databases", file=sys.stderr)
        raise
    finally:
        cleanup(workdir, args.selected)
    info["load_average_at_end"] = os.getloadavg()
    info["minutes"] = round((time.monotonic() - started) / 60, 1)
    print_report(payload, rows, args)
    path = write_json(payload)
    print(f"\nFigures: {path.relative_to(ROOT)}; worker logs: {LOGS_DIR.relative_to(ROOT)}/")
    print(f"Took {info['minutes']} min.")
    return 0 if not report.problems(rows) else 1


def run_all(
    args: argparse.Namespace,
    payload: dict[str, Any],
    rows: list[dict[str, Any]],
    broken_venvs: dict[str, str],
    workdir: Path,
) -> None:
    """The reference, then every library in turn, on one Redis server of our own."""
    info = payload["machine"]
    with services.redis_server(workdir, LOGS_DIR) as port:
        ctx = Context(port, args.tasks, args.latency_runs, LOGS_DIR, workdir, args.django_tasks_src)
        info["redis_server"] = f"Redis {ctx.admin.info('server')['redis_version']}"
        if any(lib.database for lib in args.selected):
            info["postgresql"] = services.pg_version()
        print(f"Redis on {services.LOOPBACK}:{port}; physical reference...", flush=True)
        payload["reference"] = reference_runs(port, args.runs)
        for lib in args.selected:
            if lib.venv in broken_venvs:
                entry = failed_library(lib, broken_venvs[lib.venv])
            else:
                entry = run_library(lib, ctx, args)
            payload["libraries"][lib.key] = entry
            rows.extend(entry["rows"].values())
            write_json(payload)


def failed_library(lib: Library, reason: str) -> dict[str, Any]:
    print(f"\n## {lib.title}\n  failed: {reason}", flush=True)
    rows = {p.key: report.row_entry(lib, p.key, p.label, p.kind) for p in lib.pools}
    for row in rows.values():
        row["error"] = reason
        row["median"] = report.summarise([], bulk=False)
    return {"title": lib.title, "rows": rows, "notes": list(lib.notes)}


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "fast": args.fast,
        "django_tasks_src": str(args.django_tasks_src),
        "runs": args.runs,
        "tasks": args.tasks,
        "latency_runs": args.latency_runs,
        "scale": args.scale,
        "libraries": [lib.key for lib in args.selected],
        "workers": "2 executors each",
    }


if __name__ == "__main__":
    sys.exit(main())
