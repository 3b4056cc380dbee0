"""What the kind of task id costs the result store on PostgreSQL: WAL bytes and rows per second.

    .venv/bin/python bench/result_ids.py [--history 1000000] [--results 20000]

django_tasks makes time-ordered ids (UUID version 7, see ``messages.new_id``); Celery and the
earlier versions of django_tasks make random ones (version 4). For each kind, in a fresh
PostgreSQL database of its own: the results table is filled with ``--history`` rows of that kind
(older ids, as a site that keeps its results a while has), then, right after a CHECKPOINT, the
worker's own write (``ResultStore.save_finished``) stores ``--results`` new results, one per
statement (one task at a time) and then in batches of 50 (a busy worker). Printed per kind and
batch size: results per second, WAL bytes per result (``pg_current_wal_lsn``), and the size of
the primary-key index afterwards. The first change to an index page after a checkpoint writes
the whole page to the WAL: random ids touch a different page of a large index almost every time.
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench, driver

#: SQL making the text of ``%(n)s`` ids of each kind, oldest first (one per millisecond before
#: now for the time-ordered ones).
HISTORY_IDS = {
    "time-ordered (v7)": """
        SELECT substr(t, 1, 8) || '-' || substr(t, 9, 4) || '-7' || substr(r, 1, 3) || '-8'
               || substr(r, 4, 3) || '-' || substr(r, 7, 12)
        FROM (SELECT lpad(to_hex(%(now_ms)s::bigint - %(n)s + i), 12, '0') AS t,
                     md5(random()::text) AS r
              FROM generate_series(1, %(n)s) AS i) AS ids""",
    "random (v4)": "SELECT gen_random_uuid()::text FROM generate_series(1, %(n)s)",
}
BATCHES = (1, 50)


def _random_id() -> str:
    return str(uuid.uuid4())


def fill_history(kind: str, n: int) -> None:
    from django.db import connection

    from django_tasks.models import TaskResult

    table = connection.ops.quote_name(TaskResult._meta.db_table)
    ids = HISTORY_IDS[kind]
    with connection.cursor() as cursor:
        # Every column given, as the worker's upsert writes them; only a quoted table name and
        # the fixed SQL of HISTORY_IDS go into the text.
        cursor.execute(
            f"""INSERT INTO {table} (id, task_name, state, reason, queue, priority, args, kwargs,
                    result, exception_type, exception_message, traceback, errors, worker,
                    worker_ids, retries, root_id, parent_id, group_id, enqueued_at, started_at,
                    date_done)
                SELECT id, 'bench.benchapp.tasks.noop', 'SUCCESS', '', 'default', 0, '[]', '{{}}',
                    'null', '', '', '', '[]', 'bench@host:1', '["bench@host:1"]', 0, '', '', '',
                    now(), now(), now()
                FROM ({ids}) AS history(id)""",
            {"n": n, "now_ms": time.time_ns() // 1_000_000},
        )
        cursor.execute("VACUUM ANALYZE " + table)


def store_results(make_id: Callable[[], str], count: int, batch: int) -> dict[str, float]:
    from django.db import connection
    from django.utils import timezone

    from django_tasks.models import TaskResult
    from django_tasks.results.store import ResultStore

    store = ResultStore()
    start_lsn = driver.checkpoint()
    if start_lsn is None:
        raise SystemExit("result_ids.py: PostgreSQL refused the CHECKPOINT (see above)")
    elapsed = 0.0
    for _ in range(count // batch):
        now = timezone.now()
        fields = {
            "task_name": "bench.benchapp.tasks.noop",
            "state": "SUCCESS",
            "queue": "default",
            "worker": "bench@host:1",
            "worker_ids": ["bench@host:1"],
            "enqueued_at": now,
            "started_at": now,
            "date_done": now,
        }
        rows = [TaskResult(id=make_id(), **fields) for _ in range(batch)]
        started = time.perf_counter()
        store.save_finished(rows)
        elapsed += time.perf_counter() - started
    wal = driver.wal_since(start_lsn)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_relation_size(%s)", [f"{TaskResult._meta.db_table}_pkey"])
        index = float(cursor.fetchone()[0])
    done = count // batch * batch
    return {"per_second": done / elapsed, "wal_bytes": wal / done, "pk_index_mib": index / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", type=bench.positive, default=1_000_000)
    parser.add_argument("--results", type=bench.positive, default=20_000)
    args = parser.parse_args()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="bench.settings", BENCH_DB="postgres",
        BENCH_PG_NAME=bench.PG_BENCH_DB, BENCH_PG_HOST=bench.PG["host"],
        BENCH_PG_PORT=str(bench.PG["port"]), BENCH_PG_USER=bench.PG["user"],
    )  # fmt: skip
    bench.check_services([bench.Config("postgres", "", "database", "postgres")])
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from django_tasks.messages import new_id

    makers = {"time-ordered (v7)": new_id, "random (v4)": _random_id}
    lines = [
        "| task ids | history rows | results per statement | results/s | WAL bytes per result "
        "| primary-key index MiB after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, make_id in makers.items():
        connection.close()
        with bench.pg_database():
            call_command("migrate", verbosity=0, interactive=False)
            started = time.perf_counter()
            fill_history(kind, args.history)
            print(f"{kind}: {args.history:,} history rows in {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip
            for batch in BATCHES:
                count = args.results if batch > 1 else args.results // 4
                f = store_results(make_id, count, batch)
                lines.append(
                    f"| {kind} | {args.history:,} | {batch} | {f['per_second']:,.0f} "
                    f"| {f['wal_bytes']:,.0f} | {f['pk_index_mib']:,.1f} |"
                )
                print(lines[-1], flush=True)
            connection.close()
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
