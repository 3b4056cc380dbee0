"""A consumer: takes deliveries from the broker, runs them one at a time, stores, acks.

Each pool child (or pool thread) runs one Consumer, so tasks never pass through the parent. The
order after running a batch is fixed: results are committed, then the deliveries are acked, then
waiting callers are notified. A crash between the commit and the ack runs a task again
(at-least-once); it never loses one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from django.db import close_old_connections, connections

from ..backend import TasksBackend
from ..brokers import Broker, Delivery
from ..exceptions import BrokerError
from ..models import DeadLetter
from .execution import Abort, Executor, Outcome

logger = logging.getLogger("django_tasks.worker")

#: How long a busy consumer may hold finished results before writing them.
FLUSH_INTERVAL = 0.005
#: The longest one consume call blocks, so a stop request is seen within it.
CONSUME_TIMEOUT = 1.0
#: Backoff after a broker error: doubles from the first to the last value.
BACKOFF = (0.1, 5.0)


class Consumer:
    """The consume-run-store-ack loop of one pool member."""

    def __init__(
        self,
        backend: TasksBackend,
        queues: Sequence[str],
        worker_id: str,
        *,
        prefetch: int | None = None,
        max_tasks: int | None = None,
        burst: bool = False,
        on_task: Callable[[], None] | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.backend = backend
        self.queues = list(queues)
        self.worker_id = worker_id
        self.prefetch = prefetch or backend.config.prefetch
        self.max_tasks = max_tasks
        self.burst = burst
        self.on_task = on_task
        self.executor = Executor(backend, worker_id)
        self.stopping = stopping or threading.Event()
        self.processed = 0
        self._held: list[Delivery] = []  # leased and not yet acked: the lease keeper's list
        self._held_lock = threading.Lock()
        self._pending: list[Outcome] = []

    @property
    def broker(self) -> Broker:
        return self.backend.broker

    def stop(self) -> None:
        """Finish the running task, give back the unstarted ones, and return from run()."""
        self.stopping.set()

    def run(self) -> None:
        keeper = LeaseKeeper(self)
        keeper.start()
        try:
            self._loop()
        except Abort:
            logger.warning(
                "Consumer %s aborted: its unfinished tasks go back to the queue", self.worker_id
            )
            self._flush_quietly()
        finally:
            keeper.stop()
            self.release_held()

    def _loop(self) -> None:
        backoff = BACKOFF[0]
        while not self.stopping.is_set() and not self._reached_max():
            try:
                deliveries = self._consume()
            except BrokerError as exc:
                logger.error("Broker error: %s; retrying in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF[1])
                close_old_connections()
                continue
            backoff = BACKOFF[0]
            if not deliveries:
                close_old_connections()
                if self.burst:
                    return
                continue
            self._run_batch(deliveries)

    def _consume(self) -> list[Delivery]:
        count = self.prefetch
        if self.max_tasks is not None:
            count = max(1, min(count, self.max_tasks - self.processed))
        timeout = 0.2 if self.burst else CONSUME_TIMEOUT
        deliveries = self.broker.consume(self.queues, count, timeout)
        with self._held_lock:
            self._held.extend(deliveries)
        return deliveries

    def _run_batch(self, deliveries: list[Delivery]) -> None:
        first_pending = time.monotonic()
        for index, delivery in enumerate(deliveries):
            if self.stopping.is_set():
                self._give_back(deliveries[index:])
                break
            self._pending.append(self.executor.execute(delivery))
            self.processed += 1
            if self.on_task is not None:
                self.on_task()
            if time.monotonic() - first_pending >= FLUSH_INTERVAL:
                self._flush()
                first_pending = time.monotonic()
        self._flush()
        close_broken_connections()

    def _flush(self) -> None:
        """Store the finished results, then ack their deliveries, then notify."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = [o.row for o in pending if o.row is not None]
        self.executor.store.save_finished(rows)
        self._store_dead_letters([o for o in pending if o.dead_letter])
        done = [o.delivery for o in pending]
        self.broker.ack(done)
        with self._held_lock:
            self._held = [d for d in self._held if d not in done]
        if rows:
            self.broker.notify_results([r.id for r in rows])

    def _store_dead_letters(self, outcomes: list[Outcome]) -> None:
        if outcomes:
            DeadLetter.objects.bulk_create([self._dead_letter(o) for o in outcomes])

    def _dead_letter(self, outcome: Outcome) -> DeadLetter:
        delivery = outcome.delivery
        message = delivery.message
        return DeadLetter(
            task_id=message.id if message else delivery.tag,
            task_name=message.task if message else "",
            queue=delivery.queue,
            reason=outcome.dead_letter or "",
            body=delivery.body,
            worker=self.worker_id,
        )

    def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        self.broker.release(deliveries)
        with self._held_lock:
            self._held = [d for d in self._held if d not in deliveries]

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except Exception:
            logger.exception("Could not store the finished results before stopping")

    def release_held(self) -> None:
        with self._held_lock:
            held, self._held = self._held, []
        if not held:
            return
        try:
            self.broker.release(held)
        except Exception:
            logger.exception(
                "Could not give back %d deliveries; they return when their lease expires", len(held)
            )

    def _reached_max(self) -> bool:
        return self.max_tasks is not None and self.processed >= self.max_tasks

    def held(self) -> list[Delivery]:
        with self._held_lock:
            return list(self._held)


class LeaseKeeper(threading.Thread):
    """Extends the leases of a consumer's deliveries while it works on them."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__(name=f"lease-keeper-{consumer.worker_id}", daemon=True)
        self.consumer = consumer
        self.interval = consumer.backend.config.lease_seconds / 3
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            held = self.consumer.held()
            if not held:
                continue
            try:
                self.consumer.broker.extend(held)
            except Exception as exc:
                logger.warning("Could not extend %d leases: %s", len(held), exc)
            finally:
                close_broken_connections()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def close_broken_connections() -> None:
    """Close this thread's database connections that saw an error and no longer work.

    A busy consumer keeps its connections between batches (reconnecting per batch would cost
    more than the batch); an idle one honours CONN_MAX_AGE through close_old_connections().
    """
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            connection.close_if_unusable_or_obsolete()
