"""Opt-in stress run: 1,000 bad tasks mixed into 10,000 good ones, on one real worker.

Not in the default suite (it takes minutes): ``DT_STRESS=1 scripts/test tests/test_stress.py -s``.
At the end every good task is SUCCESS, every bad one is in a final state with a reason (or a
dead letter with one), the worker is alive and its pool is complete. The figures are printed.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from django_tasks import AsyncResult, TaskState
from django_tasks.backend import get_backend
from django_tasks.messages import Message, new_id
from django_tasks.models import DeadLetter, TaskResult
from django_tasks.states import READY_STATES
from tests.conftest import E2E
from tests.test_hardening import publish_raw, raw_message, results_on_postgres
from tests.test_hardening import world as world  # The fixture: the four worlds.
from tests.testapp import hardening_tasks as ht
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.environ.get("DT_STRESS") != "1", reason="opt-in: set DT_STRESS=1"),
]

GOOD, BAD = 10_000, 1_000
CONCURRENCY = 2


def bad_senders(pool: str) -> list[tuple[str, Callable[[], str | None]]]:
    """(kind, send) for each kind of bad task; send returns the task id (None: undecodable)."""
    limit = get_backend().config.max_message_size

    def raw(body: str) -> Callable[[], None]:
        def send() -> None:
            publish_raw(Message(id=new_id(), task="x", queue="default"), body)

        return send

    senders: list[tuple[str, Callable[[], str | None]]] = [
        ("returns NUL", lambda: ht.returns_nul.delay().id),
        ("raises with NUL", lambda: ht.raises_with_nul.delay().id),
        ("NUL argument", lambda: publish_raw(raw_message(ht.returns, "a\x00b")).id),
        ("returns object()", lambda: ht.returns_object.delay().id),
        ("unknown task", lambda: publish_raw(Message(id=new_id(), task="no.such.task")).id),
        ("bad JSON", raw("{not json")),
        ("nested too deeply", raw('{"v":1,"args":' + "[" * 50_000 + "]" * 50_000 + "}")),
        ("fails", lambda: tasks.fail.delay("stress").id),
    ]
    senders += [(f"raises {kind}", _raises(kind)) for kind in ht.RAISED]
    if results_on_postgres():
        senders.append(("retry too large", lambda: _too_large(limit)))
    return senders


def _raises(kind: str) -> Callable[[], str]:
    return lambda: ht.raises_base.delay(kind).id


def _too_large(limit: int) -> str:
    backend = get_backend()
    empty = len(backend.broker.encode(backend.message(ht.retries_grown, [""], {}))[1])
    return ht.retries_grown.delay("x" * (limit - empty - 10)).id


def pool_complete(worker: Any, pool: str) -> bool:
    """Whether every pool member takes work: CONCURRENCY tasks that run at once, all at once.

    Each is sent once the one before runs, so that a member busy with it cannot hold the next
    one prefetched: a member missing leaves the last without anyone to run it.
    """
    if pool == "process" and _children(worker.pid) != CONCURRENCY:
        return False
    marker = f"rendezvous-{new_id()}"
    results = []
    for member in range(CONCURRENCY):
        results.append(ht.rendezvous.delay(marker, CONCURRENCY, 20))
        wait_for(lambda n=member: Execution.objects.filter(marker=marker).count() > n)
    return all(result.get(timeout=30) for result in results)


def _children(pid: int) -> int:
    children = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children += int(fields[1]) == pid
    return children


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_bad_tasks_mixed_into_good_ones(world: E2E, pool: str) -> None:
    senders = bad_senders(pool)
    plan = ["good"] * GOOD + [senders[i % len(senders)][0] for i in range(BAD)]
    random.Random(7).shuffle(plan)
    by_kind = dict(senders)
    good_ids: list[str] = []
    bad_ids: dict[str, str] = {}
    started = time.monotonic()
    batch = 0
    for kind in [*plan, "flush"]:
        if kind == "good":
            batch += 1
            continue
        if batch:
            good_ids += [r.id for r in tasks.add.delay_many([(1, 2)] * batch)]
            batch = 0
        if kind != "flush":
            task_id = by_kind[kind]()
            if task_id is not None:
                bad_ids[task_id] = kind
    sent = time.monotonic() - started
    worker = world.start_worker("-c", str(CONCURRENCY), "--pool", pool)
    queues = get_backend().broker
    wait_for(
        lambda: queues.queue_lengths(["default"])["default"] == 0,
        timeout=900,
        interval=0.5,
        what="the queue drained",
    )
    drained = time.monotonic() - started - sent
    assert worker.process.poll() is None, "the worker died"
    assert pool_complete(worker, pool), "a pool member is missing"
    states = Counter(_states(good_ids).values())
    assert states == {TaskState.SUCCESS: GOOD}, states
    bad_states = _states(list(bad_ids))
    outcome: Counter[str] = Counter()
    for task_id, kind in bad_ids.items():
        state = bad_states.get(task_id)
        if state is None and DeadLetter.objects.filter(task_id=task_id).exists():
            state = "dead letter"
        assert state in (*READY_STATES, "dead letter"), (kind, task_id, state)
        if state == TaskState.FAILURE:
            row = TaskResult.objects.get(pk=task_id)
            assert row.exception_type, (kind, task_id)
        outcome[f"{kind}: {state}"] += 1
    undecodable = sum(1 for kind in plan if kind in ("bad JSON", "nested too deeply"))
    letters = DeadLetter.objects.filter(task_name="").count()
    assert letters == undecodable
    print(
        f"\n{world.kind} broker, results on {'PostgreSQL' if results_on_postgres() else 'SQLite'}, "
        f"{pool} pool x{CONCURRENCY}: {GOOD} good + {BAD} bad sent in {sent:.1f}s, drained in "
        f"{drained:.1f}s ({(GOOD + BAD) / drained:.0f}/s); undecodable dead letters: {letters}"
    )
    for line in sorted(outcome.items()):
        print(f"  {line[0]}: {line[1]}")
    assert AsyncResult(good_ids[-1]).get(timeout=5) == 3


def _states(task_ids: list[str]) -> dict[str, str]:
    states: dict[str, str] = {}
    for start in range(0, len(task_ids), 500):
        chunk = task_ids[start : start + 500]
        states.update(TaskResult.objects.filter(pk__in=chunk).values_list("pk", "state"))
    return states
