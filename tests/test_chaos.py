"""Opt-in chaos run: tasks keep flowing while workers are killed with SIGKILL, on each broker.

Not in the default suite (it takes minutes): ``DT_STRESS=1 scripts/test tests/test_chaos.py -s``
(``DT_CHAOS_TASKS`` sets the number of tasks, 3,000 by default). Two workers (``runworker -c 2
--pool process``, a short lease) run ``record(n)`` tasks, each of which writes a row saying which
process ran it, while the test sends them; every few seconds one worker, chosen at random, is
frozen and killed with its pool processes, then started again. At the end every task sent is
SUCCESS (nothing is lost), and a task ran more than once only if a killed process ran it first.
The figures are printed. A broker restarted under load is the fault tests' story
(tests/test_faults.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from django_tasks.backend import get_backend
from django_tasks.models import TaskResult
from django_tasks.states import TaskState
from tests.conftest import E2E
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import WorkerProcess, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("DT_STRESS") != "1", reason="opt-in: set DT_STRESS=1"),
]

TASKS = int(os.environ.get("DT_CHAOS_TASKS", "3000"))
#: Tasks sent per second at most: the sending spans several kills.
RATE = 250.0
KILL_EVERY = 3.0
#: Short, so that the tasks a killed worker held come back within seconds.
LEASE_SECONDS = 3.0
WORKER_ARGS = ("-c", "2", "--pool", "process")


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (its pool), read from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(worker: WorkerProcess) -> set[int]:
    """SIGKILL a worker and its pool, nothing given back; the pids that died.

    The supervisor is stopped first so that it cannot replace a pool process killed under it.
    """
    os.kill(worker.pid, signal.SIGSTOP)
    pids = {worker.pid, *descendants(worker.pid)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.wait(timeout=10)
    return pids


def queue_empty() -> bool:
    return get_backend().broker.queue_lengths(["default"])["default"] == 0


def all_succeeded(ids: list[str]) -> bool:
    done = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        done += TaskResult.objects.filter(pk__in=chunk, state=TaskState.SUCCESS).count()
    return done == len(ids)


def test_workers_killed_while_tasks_flow_lose_nothing(e2e: E2E) -> None:
    workers = [e2e.start_worker(*WORKER_ARGS, LEASE_SECONDS=LEASE_SECONDS) for _ in range(2)]
    chooser = random.Random(1)
    killed: set[int] = set()
    kills = 0
    ids: list[str] = []
    started = time.monotonic()
    next_kill = started + KILL_EVERY
    for n in range(TASKS):
        time.sleep(max(0.0, started + n / RATE - time.monotonic()))
        ids.append(tasks.record.delay(f"chaos-{n}").id)
        if time.monotonic() >= next_kill:
            slot = chooser.randrange(len(workers))
            killed |= kill(workers[slot])
            kills += 1
            workers[slot] = e2e.start_worker(*WORKER_ARGS, LEASE_SECONDS=LEASE_SECONDS)
            next_kill += KILL_EVERY
    sent = time.monotonic() - started
    # The last victims' leases expire and their tasks run again.
    wait_for(lambda: queue_empty() and all_succeeded(ids), timeout=300 + TASKS / 10,
             interval=0.5, what="every task sent SUCCESS")  # fmt: skip
    runs: dict[str, list[int]] = defaultdict(list)
    for marker, pid in Execution.objects.order_by("pk").values_list("marker", "pid"):
        runs[marker].append(pid)
    assert len(runs) == TASKS, f"{TASKS - len(runs)} task(s) never ran"
    duplicated = {m: pids for m, pids in runs.items() if len(pids) > 1}
    unexplained = {m: p for m, p in duplicated.items() if not set(p[:-1]) <= killed}
    assert not unexplained, f"ran twice without a kill: {dict(list(unexplained.items())[:5])}"
    print(
        f"\n{e2e.kind} broker: {TASKS} tasks sent in {sent:.1f}s, all SUCCESS after "
        f"{time.monotonic() - started:.1f}s; {kills} kills; {len(duplicated)} task(s) ran again "
        "after their worker was killed"
    )
