"""The database broker goes by the database's clock, whatever the clocks of its workers and senders.

A host whose clock is off is simulated by shifting this process's wall clock (``time.time()`` and
``timezone.now()``) around what that host does; the database and its clock are the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from django_tasks import TaskState
from django_tasks.backend import TasksBackend
from django_tasks.brokers.base import Delivery
from django_tasks.brokers.database import DatabaseBroker
from django_tasks.messages import Message, new_id
from django_tasks.models import QueuedMessage, TaskResult
from django_tasks.worker.consumer import Consumer
from tests.clock import clock_off_by
from tests.conftest import E2E
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for

pytestmark = [
    pytest.mark.skipif("postgres" not in settings.DATABASES, reason="PostgreSQL is not answering"),
    pytest.mark.django_db(databases=["default", "postgres"], transaction=True),
    # The make_broker and backend fixtures: the database broker, its queue on PostgreSQL.
    pytest.mark.parametrize("broker_kind", ["postgres"]),
]

#: Further off than any lease, countdown or expiry below.
SKEW = 25.0
#: Long enough that a stall of the (busy) test machine does not end a lease that is renewed.
LEASE_SECONDS = 2.5
#: A countdown long enough that a stall between sending and the first claim does not make it due.
COUNTDOWN = 4

BrokerMaker = Callable[..., DatabaseBroker]


def claim(broker: DatabaseBroker, skew: float) -> list[Delivery]:
    """What ``broker`` leases at once on a host whose clock is ``skew`` seconds off."""
    with clock_off_by(skew):
        return broker.consume(["default"], 1, timeout=0)


@pytest.mark.parametrize(
    ("holder_skew", "taker_skew"), [(0, SKEW), (-SKEW, 0)], ids=["taker-ahead", "holder-behind"]
)
def test_a_lease_that_is_renewed_is_never_taken_over(
    make_broker: BrokerMaker, holder_skew: float, taker_skew: float
) -> None:
    holder = make_broker(LEASE_SECONDS=LEASE_SECONDS)
    taker = make_broker(LEASE_SECONDS=LEASE_SECONDS)
    taker.lease_check_interval = 0  # It looks for expired leases at every claim.
    holder.publish(Message(id=new_id(), task="tests.testapp.tasks.add"))
    [held] = claim(holder, holder_skew)
    renewed_until = time.monotonic() + 2 * LEASE_SECONDS
    while time.monotonic() < renewed_until:
        assert claim(taker, taker_skew) == []
        with clock_off_by(holder_skew):
            holder.extend([held])
        time.sleep(0.1)  # The holder's heartbeat.
    # Once the holder stops renewing, its lease ends on time by the database's clock.
    [taken] = wait_for(lambda: claim(taker, taker_skew), timeout=LEASE_SECONDS + 10)
    assert taken.body == held.body


@pytest.mark.parametrize(
    ("sender_skew", "worker_skew"), [(0, SKEW), (-SKEW, 0)], ids=["worker-ahead", "sender-behind"]
)
def test_a_countdown_is_counted_on_the_database_clock(
    make_broker: BrokerMaker, backend: TasksBackend, sender_skew: float, worker_skew: float
) -> None:
    worker = make_broker()
    sent_at = time.monotonic()
    with clock_off_by(sender_skew):
        result = tasks.add.apply_async((1, 2), countdown=COUNTDOWN)
    assert claim(worker, worker_skew) == []
    [delivery] = wait_for(lambda: claim(worker, worker_skew), timeout=15)
    assert delivery.message is not None and delivery.message.id == result.id
    assert time.monotonic() - sent_at >= COUNTDOWN - 0.1


def test_a_retry_is_due_after_its_countdown_by_the_database_clock(
    make_broker: BrokerMaker,
) -> None:
    worker, other = make_broker(), make_broker()
    worker.publish(Message(id=new_id(), task="tests.testapp.tasks.add"))
    [delivery] = claim(worker, -SKEW)
    assert delivery.message is not None
    with clock_off_by(-SKEW):  # The worker's clock is behind: its eta is in the past.
        worker.requeue(delivery, delivery.message, eta=time.time() + COUNTDOWN)
    retried_at = time.monotonic()
    assert claim(other, 0) == []
    wait_for(lambda: claim(other, 0), timeout=15)
    assert time.monotonic() - retried_at >= COUNTDOWN - 0.1


def test_an_eta_given_as_a_time_stays_that_time(backend: TasksBackend) -> None:
    eta = timezone.now() + timedelta(minutes=5)
    with clock_off_by(-SKEW):
        result = tasks.add.apply_async((1, 2), eta=eta)
    row = QueuedMessage.objects.using("postgres").get(task_id=result.id)
    assert abs(row.available_at - eta) < timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("expires_in", "worker_skew", "state"),
    [(10, SKEW, TaskState.SUCCESS), (-1, -SKEW, TaskState.REVOKED)],
    ids=["worker-ahead-runs-it", "worker-behind-drops-it"],
)
def test_expiry_is_judged_by_the_database_clock(
    backend: TasksBackend, expires_in: float, worker_skew: float, state: str
) -> None:
    result = tasks.add.apply_async((1, 2), expires=timezone.now() + timedelta(seconds=expires_in))
    with clock_off_by(worker_skew):
        Consumer(backend, ["default"], "test-0", burst=True).run()
    assert TaskResult.objects.get(pk=result.id).state == state


@pytest.mark.e2e
def test_a_worker_whose_clock_is_ahead_leaves_the_tasks_of_others_alone(
    e2e: E2E, backend: TasksBackend
) -> None:
    e2e.start_worker("-c", "1", LEASE_SECONDS=2)
    result = tasks.sleep_then_record.delay("held", 12)  # Its lease is renewed six times.
    wait_for(lambda: result.state == TaskState.STARTED)
    e2e.start_worker("-c", "1", LEASE_SECONDS=2, CLOCK_SKEW=SKEW)
    assert result.state == TaskState.STARTED, "too slow a start: the task ended before it"
    assert result.get(timeout=30) == "held"
    # Acknowledged by the worker that ran it: no other worker held the message.
    wait_for(lambda: backend.broker.queue_lengths(["default"]) == {"default": 0})
    assert Execution.objects.filter(marker="held").count() == 1
