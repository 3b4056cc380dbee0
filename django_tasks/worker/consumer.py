"""A consumer: takes deliveries from the broker, runs them one at a time, stores, acks.

Each pool child (or pool thread) runs one Consumer, so tasks never pass through the parent. The
order after running a batch is fixed: the "succeeded" lines are written, results are committed,
then the deliveries are acked, then waiting callers are notified. A crash between the commit and
the ack runs a task again (at-least-once); it never loses one. Where the database broker keeps
its messages on the results' database, results and acks commit in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from django.db import DatabaseError, close_old_connections, connections, transaction

from ..backend import TasksBackend
from ..brokers import Broker, Delivery
from ..exceptions import BrokerError
from ..models import DeadLetter, TaskResult
from ..results.store import RETRYABLE_ERRORS, is_refusal
from ..states import READY_STATES, TaskState
from .execution import Abort, Executor, Monitor, Outcome

logger = logging.getLogger("django_tasks.worker")

#: How long a busy consumer may hold finished results before writing them (it writes them at
#: once when its batch is done; an adapted batch is about this long, see Prefetch).
FLUSH_INTERVAL = 0.02
#: The longest one consume call blocks, so a stop request is seen within it.
CONSUME_TIMEOUT = 1.0
#: How often the lease keeper wakes (to record long-running tasks as STARTED).
KEEPER_TICK = 0.05
#: How often the lease keeper looks for revocations of the tasks its consumer holds.
REVOKE_CHECK_INTERVAL = 1.0
#: Errors a step is retried after: the broker or the database could not be reached.
RETRYABLE: tuple[type[Exception], ...] = (BrokerError, *RETRYABLE_ERRORS)
#: Backoff after a broker error: doubles from the first to the last value.
BACKOFF = (0.1, 5.0)


class Prefetch:
    """How many deliveries to lease at a time: fixed, or adapted to how long tasks take.

    Adapted, a consumer leases about BATCH_SECONDS of work: one delivery at a time while tasks
    are slow (a long task holds no others back from idle consumers), up to MAXIMUM while they
    take a millisecond or less (the round trips to the broker and to the result store are then
    shared by many tasks).
    """

    BATCH_SECONDS = 0.02
    MAXIMUM = 100
    INITIAL = 4

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self._task_seconds: float | None = None

    @property
    def count(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self._task_seconds is None:
            return self.INITIAL
        wanted = self.BATCH_SECONDS / max(self._task_seconds, 1e-6)
        return max(1, min(self.MAXIMUM, int(wanted)))

    def observe(self, tasks: int, seconds: float) -> None:
        """``tasks`` took ``seconds`` in all (run, stored and acked)."""
        if tasks <= 0:
            return
        sample = seconds / tasks
        previous = self._task_seconds
        self._task_seconds = sample if previous is None else (previous + sample) / 2


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
        max_memory_kib: int | None = None,
        alarms: bool = False,
        monitor: Monitor | None = None,
    ) -> None:
        self.backend = backend
        self.queues = list(queues)
        self.worker_id = worker_id
        self.prefetch = Prefetch(prefetch or backend.config.prefetch)
        self.max_tasks = max_tasks
        self.max_memory_kib = max_memory_kib
        self.burst = burst
        self.on_task = on_task
        self.monitor = monitor
        self.executor = Executor(backend, worker_id, alarms=alarms, monitor=monitor)
        self.stopping = stopping or threading.Event()
        self.processed = 0
        #: Set when this consumer stopped to be replaced (memory or task limit reached).
        self.recycle = False
        #: Called (from the lease keeper) to stop the running task of a terminated revoke.
        self.interrupt: Callable[[], None] | None = None
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
                refresh_idle_connections()
                if self.burst:
                    return
                continue
            started = time.monotonic()
            self._run_batch(deliveries)
            self.prefetch.observe(len(deliveries), time.monotonic() - started)

    def _consume(self) -> list[Delivery]:
        count = self.prefetch.count
        if self.max_tasks is not None:
            count = max(1, min(count, self.max_tasks - self.processed))
        timeout = 0.2 if self.burst else CONSUME_TIMEOUT
        deliveries = self.broker.consume(self.queues, count, timeout)
        if deliveries:
            self._hold(deliveries)
            self._note_revoked(deliveries)
        return deliveries

    def _note_revoked(self, deliveries: Sequence[Delivery]) -> None:
        """Skip the revoked deliveries: as the broker says, or as the result store says."""
        unknown = []
        for delivery in deliveries:
            if delivery.message is None:
                continue
            if delivery.revoked is None:
                unknown.append(delivery.message.id)
            elif delivery.revoked:
                self.executor.revoked.add(delivery.message.id)
        self.check_revoked(unknown)

    def check_revoked(self, task_ids: Sequence[str]) -> set[str]:
        """Note which of ``task_ids`` were revoked; return those to terminate if running."""
        if not task_ids:
            return set()
        revoked = TaskResult.objects.filter(pk__in=list(task_ids), state=TaskState.REVOKED)
        revoked = revoked.order_by()  # No sort: the default ordering is for the admin.
        try:
            rows = list(revoked.values_list("pk", "reason"))
        except DatabaseError as exc:
            # The result store is down (the task cannot start either): the lease keeper looks
            # again every REVOKE_CHECK_INTERVAL, and a consumer must not die of it.
            logger.warning("Could not look for revokes of %d task(s): %s", len(task_ids), exc)
            close_broken_connections()
            return set()
        terminate = set()
        for task_id, reason in rows:
            self.executor.revoked.add(task_id)
            if reason == "terminated":
                terminate.add(task_id)
        return terminate

    def _hold(self, deliveries: Sequence[Delivery]) -> None:
        with self._held_lock:
            self._held.extend(deliveries)
            held = list(self._held)
        if self.monitor is not None:
            self.monitor.held(held)

    def _unhold(self, deliveries: Sequence[Delivery]) -> None:
        done = {id(d) for d in deliveries}
        with self._held_lock:
            self._held = [d for d in self._held if id(d) not in done]
            held = list(self._held)
        if self.monitor is not None:
            self.monitor.held(held)

    def _run_batch(self, deliveries: list[Delivery]) -> None:
        checked = first_pending = time.monotonic()
        for index, delivery in enumerate(deliveries):
            if self.stopping.is_set():
                self._give_back(deliveries[index:])
                break
            if delivery.message and time.monotonic() - checked > REVOKE_CHECK_INTERVAL:
                # It waited behind slower tasks: look again for a revoke before running it.
                self.check_revoked([delivery.message.id])
                checked = time.monotonic()
            try:
                outcome = self.executor.execute(delivery)
            except RETRYABLE as exc:
                # Its STARTED row could not be written: it did not run. Keep what finished,
                # give this one and the rest back, and let the loop back off.
                logger.error("Could not start task %s: %s", delivery.tag, exc)
                self._flush()
                self._give_back_until_done(deliveries[index:])
                return
            except Exception as exc:
                # A failure of ours around the task (not of the task): running it again would
                # fail again, so it is dead-lettered with the reason, and the consumer goes on.
                self.executor.reset()
                logger.exception("Could not run the delivery %s", delivery.tag)
                outcome = Outcome(delivery, "DEAD", dead_letter=f"the worker failed: {exc!r}")
            self._pending.append(outcome)
            self.processed += 1
            if self.on_task is not None:
                self.on_task()
            self._check_memory()
            if time.monotonic() - first_pending >= FLUSH_INTERVAL:
                self._flush()
                first_pending = time.monotonic()
        self._flush()
        close_broken_connections()

    def _flush(self) -> None:
        """Store the finished results, then ack their deliveries, then notify.

        The tasks have run: a broker or database that cannot be reached now must not make them
        run again. Each step is retried with backoff until it succeeds (the deliveries stay
        held, so the lease keeper renews their leases as soon as the broker answers again); a
        second stop signal (Abort) gives up, and the leases bring the tasks back. A row the
        database refuses for good is not retried: see ResultStore.save_finished_or_lean().
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = [o.row for o in pending if o.row is not None]
        finished = [r.id for r in rows if r.state in READY_STATES]
        if self._settles_with_results(pending):
            try:
                step = lambda: self._store_and_settle(pending, rows, finished)  # noqa: E731
                self._until_done("store and acknowledge", len(pending), step)
            except Exception as exc:
                if not is_refusal(exc):
                    raise
                # Rolled back, nothing stored or acked: store row by row, then ack (below).
                logger.warning("The result store refused a batch of %d: %s", len(rows), exc)
            else:
                self._done(pending)
                return
        self._until_done("store the results of", len(pending),
                         lambda: self._store(pending, rows))  # fmt: skip
        self._until_done("acknowledge", len(pending), lambda: self._settle(pending, finished))
        self._done(pending)

    def _done(self, pending: list[Outcome]) -> None:
        """The batch is stored and acknowledged: let go of it, and tell the middleware."""
        self._unhold([o.delivery for o in pending])
        self.executor.middleware.after_ack([o.run for o in pending if o.run is not None])

    def _settles_with_results(self, pending: list[Outcome]) -> bool:
        """Whether the broker's messages live on the results' database, so that this batch's
        results and acks can commit in one transaction (dead letters take the two steps).
        """
        return (
            self.broker.transactional
            and self.backend.config.database == self.executor.store.using
            and all(o.dead_letter is None for o in pending)
        )

    def _store_and_settle(
        self, pending: list[Outcome], rows: list[TaskResult], finished: list[str]
    ) -> None:
        """Results, requeues and acks in one transaction: all of them commit, or none.

        A crash before the commit leaves the deliveries leased and no result stored: the
        tasks run again (at-least-once), never lost. PostgreSQL announces ``finished`` on
        commit (NOTIFY is transactional).
        """
        # Encoded before the transaction begins: on SQLite it holds the database's write lock.
        write_results = self.executor.store.prepare_finished(rows)
        with transaction.atomic(using=self.executor.store.using):
            write_results()
            self._settle(pending, finished)

    def _give_back_until_done(self, deliveries: list[Delivery]) -> None:
        self._until_done("give back", len(deliveries), lambda: self._give_back(deliveries))

    def _store(self, pending: list[Outcome], rows: list[TaskResult]) -> None:
        """Results, then dead letters; writing both again repeats neither.

        A result the database refuses for good is stored as a lean FAILURE row; one that not
        even a lean row can hold (an id too long for its column) is dead-lettered.
        """
        unstored = {r.id for r in self.executor.store.save_finished_or_lean(rows)}
        for outcome in pending:
            if outcome.row is not None and outcome.row.id in unstored:
                outcome.dead_letter = "the result store refused its result row (see the log)"
                outcome.row = None
        dead = [o for o in pending if o.dead_letter]
        if dead:
            self._store_dead_letters(dead)

    def _settle(self, pending: list[Outcome], finished: Sequence[str] = ()) -> None:
        """Requeue the retried deliveries, ack the others and announce the ``finished`` results.

        The results are stored by now: when the broker cannot announce them, a waiting caller
        finds them when it next reads the store.
        """
        for outcome in pending:
            if outcome.retry is not None:
                self.broker.requeue(outcome.delivery, *outcome.retry)
        self.broker.ack([o.delivery for o in pending if o.retry is None], finished)

    def _until_done(self, action: str, count: int, step: Callable[[], None]) -> None:
        """Run ``step`` until it gets through: an outage delays the work, never repeats it.

        Only an outage is retried (the broker or the database could not be reached); any other
        error is raised at once, as retrying could not cure it.
        """
        backoff = BACKOFF[0]
        while True:
            try:
                step()
            except RETRYABLE as exc:
                logger.error("Could not %s %d task(s): %s; retrying in %.1fs",
                             action, count, exc, backoff)  # fmt: skip
                close_broken_connections()
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF[1])
                continue
            if backoff > BACKOFF[0]:
                logger.info("Broker and database reachable again: %s %d task(s) done",
                            action, count)  # fmt: skip
            return

    def _check_memory(self) -> None:
        if self.max_memory_kib is None:
            return
        rss = resident_kib()
        if rss > self.max_memory_kib:
            logger.warning("Pool process uses %d KiB, over --max-memory-per-child %d KiB: "
                           "replacing it", rss, self.max_memory_kib)  # fmt: skip
            self.recycle = True
            self.stopping.set()

    def _store_dead_letters(self, outcomes: list[Outcome]) -> None:
        letters = [self._dead_letter(o) for o in outcomes]
        try:
            DeadLetter.objects.bulk_create(letters)
        except Exception as exc:
            if not is_refusal(exc):
                raise
            # Not even the dead letters can be stored: say everything in the log, go on.
            for letter in letters:
                logger.error("Could not store the dead letter of %s (%s): %s; body: %s",
                             letter.task_id, letter.reason, exc, letter.body)  # fmt: skip

    def _dead_letter(self, outcome: Outcome) -> DeadLetter:
        delivery = outcome.delivery
        message = delivery.message
        return DeadLetter(
            task_id=(message.id if message else delivery.tag)[:255],
            task_name=(message.task if message else "")[:255],
            queue=delivery.queue,
            reason=outcome.dead_letter or "",
            body=delivery.body,
            worker=self.worker_id,
        )

    def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        self.broker.release(deliveries)
        self._unhold(deliveries)

    def _flush_quietly(self) -> None:
        """One attempt at storing what finished while aborting: no retries here."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._store(pending, [o.row for o in pending if o.row is not None])
            self._settle(pending)
            self._done(pending)
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

    def running(self) -> str | None:
        """The id of the task running now, if any."""
        return self.executor.running

    def held(self) -> list[Delivery]:
        with self._held_lock:
            return list(self._held)


class LeaseKeeper(threading.Thread):
    """Keeps a consumer's leases alive, notices revocations, and records long tasks as STARTED.

    It wakes every KEEPER_TICK: it writes the STARTED row of a task that has run for
    OPTIONS["TRACK_STARTED_AFTER"] seconds; every REVOKE_CHECK_INTERVAL it reads which held
    tasks were revoked (so they are skipped, or stopped when revoked with terminate=True); and
    every third of the lease it extends the leases.
    """

    def __init__(self, consumer: Consumer) -> None:
        super().__init__(name=f"lease-keeper-{consumer.worker_id}", daemon=True)
        self.consumer = consumer
        self.interval = consumer.backend.config.lease_seconds / 3
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_extend = last_check = time.monotonic()
        while not self._stop_event.wait(min(KEEPER_TICK, self.interval)):
            now = time.monotonic()
            try:
                self.consumer.executor.record_started_if_due()
                held = self.consumer.held()
                if held and now - last_check >= REVOKE_CHECK_INTERVAL:
                    self._check_revoked(held)
                    last_check = now
                if held and now - last_extend >= self.interval:
                    self.consumer.broker.extend(held)
                    last_extend = now
            except Exception as exc:
                logger.warning("Lease keeper: %s (retrying)", exc)
            finally:
                close_broken_connections()

    def _check_revoked(self, held: Sequence[Delivery]) -> None:
        ids = [d.message.id for d in held if d.message]
        terminate = self.consumer.check_revoked(ids)
        running = self.consumer.running()
        if running is not None and running in terminate and self.consumer.interrupt:
            logger.warning("Task %s was revoked with terminate=True: stopping it", running)
            self.consumer.interrupt()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def resident_kib() -> int:
    """This process's resident memory in KiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


def close_broken_connections() -> None:
    """Close this thread's database connections that saw an error and no longer work.

    A busy consumer keeps its connections between batches (reconnecting per batch would cost
    more than the batch); an idle one honours CONN_MAX_AGE through close_old_connections().
    """
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            connection.close_if_unusable_or_obsolete()


def refresh_idle_connections() -> None:
    """What Django does between two requests, and the health checks it arms, done now.

    An idle consumer calls it after each empty consume: connections past CONN_MAX_AGE (or
    unusable) are closed. Where CONN_HEALTH_CHECKS is on, Django checks each persistent
    connection before its next query (a ``SELECT 1`` on PostgreSQL); run here, while nothing
    waits, the check no longer delays the first task after a pause, which then costs one round
    trip to the database less.
    """
    close_old_connections()
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None:
            # A failed check closes the connection: the next query connects again.
            with contextlib.suppress(DatabaseError):
                connection.close_if_health_check_failed()
