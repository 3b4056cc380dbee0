"""The supervisor: the Worker, one parent process over a pool of consumers.

Process pool (the default): each child is a forked process running one Consumer that takes work
from the broker itself: no per-task traffic through the parent. The parent restarts children that
die, records the worker's heartbeat, publishes what senders left in the outbox (at start and with
each heartbeat), deletes expired results, and turns signals into a warm then a cold shutdown.

Thread pool: the consumers are threads of this process. A running task cannot be interrupted in
a thread, so the second signal releases the unfinished deliveries and exits the process.

Signals: the first SIGTERM/SIGINT stops consuming; running tasks finish, unstarted prefetched ones
go back to the queue, then the worker exits 0. A second signal aborts the running tasks; their
deliveries go back to the queue at once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Any

from django.db import close_old_connections, connections
from django.utils import timezone

from .. import outbox
from ..backend import TasksBackend, get_backend
from ..brokers import Delivery
from ..exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from ..messages import Message
from ..models import Worker as WorkerRecord
from ..registry import registry
from ..results import ResultStore
from .consumer import Consumer
from .execution import Abort
from .middleware import Monitor, raise_soft_time_limit

logger = logging.getLogger("django_tasks.worker")

HEARTBEAT_INTERVAL = 5.0
#: How often a worker deletes expired results (OPTIONS["RESULT_EXPIRES"]), in seconds.
EXPIRY_INTERVAL = 60.0
SUPERVISE_INTERVAL = 0.2
#: A child that dies sooner than this after its start delays its restart (crash loop guard).
RESTART_DELAY = 1.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: What the parent sends its pool processes to abort (after a SIGTERM to stop). A signal of its
#: own: a second SIGTERM sent right after the first may merge with it while it is pending.
ABORT_SIGNAL = signal.SIGUSR2
#: Signals blocked while a pool process is forked, until it has its own handlers.
CHILD_SIGNALS = {*STOP_SIGNALS, ABORT_SIGNAL}
#: The exit status of a pool process that stopped to be replaced (per-child limits).
RECYCLE_EXIT = 3


@dataclass(kw_only=True)
class WorkerOptions:
    backend: str = "default"
    queues: Sequence[str] = ()
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    pool: str = "process"
    prefetch: int | None = None
    max_tasks: int | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    burst: bool = False
    hostname: str = field(default_factory=socket.gethostname)


class Worker:
    """Runs tasks until told to stop. ``Worker(queues=["default"]).run()``."""

    def __init__(self, **options: Any) -> None:
        self.options = WorkerOptions(**options)
        self.backend: TasksBackend = get_backend(self.options.backend)
        self.queues = list(self.options.queues) or [self.backend.config.default_queue]
        self.name = f"{self.options.hostname}:{os.getpid()}"
        self.signals_received = 0
        self._stop = threading.Event()
        self._next_expiry = 0.0

    # Start-up -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit status (0 after a clean shutdown)."""
        registry.autodiscover(self.backend.config.imports)
        self._log_banner()
        self._record(started=True)
        self._install_signal_handlers()
        self.sweep_outbox()  # Once the handlers are in place: a stop request may come meanwhile.
        self.expire_results()
        pool = ProcessPool(self) if self.options.pool == "process" else ThreadPool(self)
        try:
            pool.run()
        finally:
            self._record(stopped=True)
            logger.info("Worker %s stopped", self.name)
        return 0

    def _log_banner(self) -> None:
        config = self.backend.config
        broker = config.safe_broker_url()
        if config.broker_kind == "redis":  # A web process with another prefix sends elsewhere.
            broker += f", key prefix {config.key_prefix!r}"
        tasks = "\n".join(f"    . {name}" for name in registry.names())
        logger.info(
            "django_tasks worker %s ready\n  broker:      %s\n  queues:      %s\n"
            "  concurrency: %d (%s pool)\n  tasks:\n%s",
            self.name,
            broker,
            ", ".join(self.queues),
            self.options.concurrency,
            self.options.pool,
            tasks or "    (none)",
        )

    # Signals ------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals_received += 1
        name = signal.Signals(signum).name
        if self.signals_received == 1:
            logger.info("%s received: finishing running tasks (again to abort them)", name)
        else:
            logger.warning("%s received again: aborting running tasks", name)
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def aborting(self) -> bool:
        return self.signals_received > 1

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # Heartbeat ----------------------------------------------------------------------------------

    def _record(self, *, started: bool = False, stopped: bool = False, processed: int = 0) -> None:
        """Create, refresh or close this worker's row (the admin's list of workers)."""
        now = timezone.now()
        fields: dict[str, Any] = {"last_seen": now, "processed": processed}
        if started:
            fields.update(
                hostname=self.options.hostname,
                pid=os.getpid(),
                backend=self.options.backend,
                queues=self.queues,
                concurrency=self.options.concurrency,
                pool=self.options.pool,
                started_at=now,
                stopped_at=None,
            )
        if stopped:
            fields["stopped_at"] = now
            fields.pop("processed")
        try:
            WorkerRecord.objects.update_or_create(name=self.name, defaults=fields)
        except Exception as exc:
            logger.warning("Could not record the worker's heartbeat: %s", exc)
        finally:
            close_old_connections()

    def heartbeat(self, processed: int) -> None:
        """Record that this worker is alive, publish what senders left in the outbox, and
        delete expired results when it is time to."""
        self._record(processed=processed)
        self.sweep_outbox()
        self.expire_results()

    def expire_results(self) -> None:
        """Delete the finished results older than RESULT_EXPIRES, at most every EXPIRY_INTERVAL.

        Every worker does it (there is no scheduler to ask yet); two doing it at once delete
        each row once. A long backlog goes a few batches per pass (ResultStore.delete_expired).
        """
        seconds = self.backend.config.result_expires
        if not seconds or time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + EXPIRY_INTERVAL
        self._chore(
            lambda: ResultStore().delete_expired(timedelta(seconds=seconds)),
            failed="Could not delete expired results",
            done="Deleted %d expired result(s)",
        )

    def sweep_outbox(self) -> None:
        """Publish the messages left in the outbox (see outbox.sweep())."""
        # The database broker too: a task sent inside atomic() on another database than the
        # broker's goes through the outbox.
        self._chore(
            lambda: outbox.sweep(self.backend.broker, self.backend.alias),
            failed="Could not publish the outbox",
            done="Published %d message(s) left in the outbox",
        )

    def _chore(self, step: Callable[[], int], *, failed: str, done: str) -> None:
        """Run one of the parent's periodic chores and log how many rows it handled.

        Never raises: a chore that fails is logged and tried again at its next turn.
        """
        try:
            count = step()
        except Exception:
            logger.exception(failed)
        else:
            if count:
                logger.info(done, count)
        finally:
            close_old_connections()


class ProcessPool:
    """Forked children, each running one Consumer; restarted when they die."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.context = multiprocessing.get_context("fork")
        self.children: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}
        self.slots = [SlotMonitor(self.context) for _ in range(worker.options.concurrency)]
        #: Task ids whose pool process was killed for overrunning its time limit, by slot.
        self.overrun: dict[int, dict[str, Any]] = {}
        self.processed = self.context.Value("Q", 0)
        self.forwarded = 0

    def run(self) -> None:
        for slot in range(self.worker.options.concurrency):
            if not self.worker.stopping:
                self._spawn(slot)
        last_beat = time.monotonic()
        while self.children:
            self.worker.wait(SUPERVISE_INTERVAL)
            self._forward_signals()
            self._enforce_time_limits()
            self._reap()
            if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                self.worker.heartbeat(self.processed.value)
                last_beat = time.monotonic()

    def _spawn(self, slot: int) -> None:
        # Children must not share the parent's database or broker connections.
        connections.close_all()
        self.worker.backend.broker.close()
        self.slots[slot].clear()
        process = self.context.Process(
            target=_child_main,
            args=(self.worker, slot, self.processed, self.slots[slot]),
            name=f"{self.worker.name}-{slot}",
            daemon=False,
        )
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.children[slot] = (process, time.monotonic())

    def _forward_signals(self) -> None:
        while self.forwarded < self.worker.signals_received:
            self.forwarded += 1
            signum = signal.SIGTERM if self.forwarded == 1 else ABORT_SIGNAL
            for process, _started in self.children.values():
                if process.pid is not None and process.is_alive():
                    os.kill(process.pid, signum)

    def _enforce_time_limits(self) -> None:
        """Kill a pool process whose running task overran its hard time limit."""
        now = time.time()
        for slot, (process, _started) in self.children.items():
            running = self.slots[slot].read().get("running")
            deadline = running.get("deadline") if running else None
            if running is None or deadline is None or now <= deadline or slot in self.overrun:
                continue
            logger.error("Task %s[%s] exceeded its time limit: stopping pool process %s",
                         running["task"], running["id"], process.name)  # fmt: skip
            self.overrun[slot] = running
            if process.pid is not None:
                os.kill(process.pid, signal.SIGKILL)

    def _reap(self) -> None:
        for slot, (process, started) in list(self.children.items()):
            if process.is_alive():
                continue
            process.join()
            del self.children[slot]
            overrun = self.overrun.pop(slot, None)
            clean = self.slots[slot].exited_cleanly()
            if not clean:
                self._recover(slot, process, overrun)
            if self.worker.stopping or (clean and process.exitcode == 0):
                # Shutdown, or the member finished its --burst or --max-tasks run.
                continue
            if not clean and overrun is None:
                # A crash, a kill, os._exit() in a task, or an error that escaped the consumer:
                # whatever the status, the pool must not silently shrink.
                logger.error("Pool process %s exited with code %s outside shutdown; starting "
                             "a new one", process.name, process.exitcode)  # fmt: skip
            if time.monotonic() - started < RESTART_DELAY:
                self.worker.wait(RESTART_DELAY)
            if not self.worker.stopping:
                self._spawn(slot)

    def _recover(self, slot: int, process: multiprocessing.process.BaseProcess,
                 overrun: dict[str, Any] | None) -> None:  # fmt: skip
        """Settle the deliveries a dead pool process held: fail, redeliver or give back."""
        state = self.slots[slot].read()
        running = state.get("running")
        waiting = [h for h in state.get("held", []) if not running or h["tag"] != running["tag"]]
        try:
            if waiting:
                self.worker.backend.broker.release([_delivery(h) for h in waiting])
            if running:
                self._settle_running(running, process, overrun)
        except Exception:
            logger.exception("Could not settle the tasks of pool process %s; they return to "
                             "the queue when their leases expire", process.name)  # fmt: skip
        finally:
            close_old_connections()

    def _settle_running(self, running: dict[str, Any], process: multiprocessing.process.BaseProcess,
                        overrun: dict[str, Any] | None) -> None:  # fmt: skip
        broker, store = self.worker.backend.broker, ResultStore()
        label = f"{running['task']}[{running['id']}]"
        redeliveries = self.worker.backend.config.worker_lost_redeliveries
        error: Exception
        if overrun is not None and overrun["id"] == running["id"]:
            error = TimeLimitExceeded(f"Task {label} exceeded its time limit and was stopped.")
        elif running["count"] <= redeliveries:
            logger.warning("Pool process %s died running task %s (exit code %s): delivering "
                           "it again", process.name, label, process.exitcode)  # fmt: skip
            broker.release([_delivery(running)])
            return
        else:
            error = WorkerLostError(
                f"The worker process running task {label} died (exit code {process.exitcode}) "
                f"on each of its {running['count']} deliveries."
            )
        logger.error("Task %s failed: %s", label, error)
        store.fail(running["id"], error, task_name=running["task"], queue=running["queue"])
        broker.ack([_delivery(running)], [running["id"]])


def _child_main(worker: Worker, slot: int, processed: Any, monitor: SlotMonitor) -> None:
    """The body of a pool process: one Consumer until the parent says stop.

    The parent forks with SIGTERM blocked, so a stop request that arrives before the handlers
    below are installed waits for them instead of reaching the parent's handler in this copy.
    """
    stopping = threading.Event()
    terms = 0

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal terms
        terms += 1
        stopping.set()
        if terms > 1:
            raise Abort()

    def on_abort(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        raise Abort()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(ABORT_SIGNAL, on_abort)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent forwards what matters.
    signal.signal(signal.SIGALRM, raise_soft_time_limit)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)
    _die_with_parent()
    options = worker.options
    consumer = Consumer(
        get_backend(options.backend), worker.queues, f"{worker.name}-{slot}",
        prefetch=options.prefetch, max_tasks=options.max_tasks_per_child or options.max_tasks,
        burst=options.burst, on_task=lambda: _increment(processed), stopping=stopping,
        max_memory_kib=options.max_memory_per_child, alarms=True, monitor=monitor,
    )  # fmt: skip
    main_thread = threading.get_ident()

    def on_terminate(signum: int, frame: FrameType | None) -> None:
        # Only a task still running is stopped: the revoke may arrive just after it ended.
        if consumer.running() is not None:
            raise Terminated()

    signal.signal(signal.SIGUSR1, on_terminate)
    consumer.interrupt = lambda: signal.pthread_kill(main_thread, signal.SIGUSR1)
    try:
        consumer.run()
    finally:
        connections.close_all()
    limit = options.max_tasks_per_child
    spent = limit is not None and consumer.processed >= limit
    monitor.exit_cleanly()
    sys.exit(RECYCLE_EXIT if consumer.recycle or spent else 0)


class SlotMonitor(Monitor):
    """What a pool process is doing, in memory shared with the parent.

    Two JSON documents: the running task (rewritten for every task, so kept small) and the held
    deliveries (rewritten only when a batch is leased or settled).
    """

    RUNNING_SIZE = 2048
    HELD_SIZE = 65536

    def __init__(self, context: Any) -> None:
        self.running = context.Array("c", self.RUNNING_SIZE)
        self.holding = context.Array("c", self.HELD_SIZE)
        #: Set by the pool process when its consumer returned (stop, limits, --burst): an exit
        #: without it is a crash, whatever the exit status.
        self.clean_exit = context.Value("b", 0, lock=False)

    def started(self, delivery: Delivery, hard_deadline: float | None) -> None:
        # Written for every task: fields joined by the ASCII unit separator, cheaper than JSON.
        message = delivery.message
        line = _SEPARATOR.join((
            delivery.tag, delivery.queue, str(delivery.delivery_count),
            message.id if message else delivery.tag, message.task if message else "?",
            str(message.priority if message else 0), repr(hard_deadline),
        ))  # fmt: skip
        data = line.encode()
        if len(data) < self.RUNNING_SIZE:
            with self.running.get_lock():
                self.running.value = data

    def finished(self) -> None:
        with self.running.get_lock():
            self.running.value = b""  # Idle: what read() takes for no running task.

    def held(self, deliveries: list[Delivery]) -> None:
        described = [_describe(d) for d in deliveries]
        if not _store(self.holding, described):
            _store(self.holding, [])  # Too many to describe: their leases will expire.

    def clear(self) -> None:
        self.finished()
        _store(self.holding, [])
        self.clean_exit.value = 0

    def exit_cleanly(self) -> None:
        """The pool process is about to exit because its consumer returned."""
        self.clean_exit.value = 1

    def exited_cleanly(self) -> bool:
        return bool(self.clean_exit.value)

    def read(self) -> dict[str, Any]:
        """The last state written (read by the parent)."""
        running = _running(_load(self.running, raw=True))
        return {"running": running, "held": _load(self.holding) or []}


def _store(array: Any, value: Any) -> bool:
    data = json.dumps(value).encode()
    if len(data) >= len(array):
        return False
    with array.get_lock():
        array.value = data
    return True


def _load(array: Any, raw: bool = False) -> Any:
    # A pool process killed while writing holds the lock for ever: do not wait on it.
    if not array.get_lock().acquire(timeout=0.5):
        return None
    try:
        data = array.value
    finally:
        array.get_lock().release()
    if raw or not data:
        return data or None
    return json.loads(data)


_SEPARATOR = "\x1f"


def _running(data: bytes | None) -> dict[str, Any] | None:
    """The running task as SlotMonitor.started() wrote it (None when idle or unreadable)."""
    if not data:
        return None
    fields = data.decode().split(_SEPARATOR)
    if len(fields) != 7:
        return None
    tag, queue, count, task_id, task, priority, deadline = fields
    return {
        "tag": tag, "queue": queue, "count": int(count), "id": task_id, "task": task,
        "priority": int(priority), "deadline": None if deadline == "None" else float(deadline),
    }  # fmt: skip


def _describe(delivery: Delivery) -> dict[str, Any]:
    message = delivery.message
    return {
        "tag": delivery.tag,
        "queue": delivery.queue,
        "count": delivery.delivery_count,
        "id": message.id if message else delivery.tag,
        "task": message.task if message else "?",
        "priority": message.priority if message else 0,
    }


def _delivery(described: dict[str, Any]) -> Delivery:
    """A Delivery rebuilt from _describe(), enough to ack or release it."""
    message = Message(id=described["id"], task=described["task"], queue=described["queue"],
                      priority=described["priority"])  # fmt: skip
    return Delivery(described["tag"], described["queue"], "", message,
                    delivery_count=described["count"])  # fmt: skip


def _increment(counter: Any) -> None:
    with counter.get_lock():
        counter.value += 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the parent dies, so a killed worker is all gone."""
    import ctypes  # Here: the thread pool does without it (0.6 MiB).

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ThreadPool:
    """Consumers as threads of this process; a thread that dies is replaced."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.consumers: list[Consumer] = []
        self.lock = threading.Lock()
        self.processed = 0
        #: The slots whose consumer returned (stop, --max-tasks, --burst): not replaced.
        self.finished: set[int] = set()

    def run(self) -> None:
        threads = {slot: self._start(slot) for slot in range(self.worker.options.concurrency)}
        started = dict.fromkeys(threads, time.monotonic())
        last_beat = time.monotonic()
        while any(t.is_alive() for t in threads.values()):
            self.worker.wait(SUPERVISE_INTERVAL)
            if self.worker.stopping:
                for consumer in list(self.consumers):
                    consumer.stop()
            if self.worker.aborting:
                self._abort()
            if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                self.worker.heartbeat(self.processed)
                last_beat = time.monotonic()
            for slot, thread in list(threads.items()):
                thread.join(timeout=0)
                if not thread.is_alive() and slot not in self.finished and not self.worker.stopping:
                    logger.error("Pool thread %s died; starting a new one", thread.name)
                    if time.monotonic() - started[slot] < RESTART_DELAY:
                        self.worker.wait(RESTART_DELAY)  # Crash loop guard.
                    threads[slot], started[slot] = self._start(slot), time.monotonic()

    def _start(self, slot: int) -> threading.Thread:
        thread = threading.Thread(target=self._thread_main, args=(slot,), name=f"consumer-{slot}")
        thread.start()
        return thread

    def _thread_main(self, slot: int) -> None:
        backend = get_backend(self.worker.options.backend)
        consumer = Consumer(
            backend,
            self.worker.queues,
            f"{self.worker.name}-t{slot}",
            prefetch=self.worker.options.prefetch,
            max_tasks=self.worker.options.max_tasks,
            burst=self.worker.options.burst,
            on_task=self._count,
        )
        with self.lock:
            self.consumers.append(consumer)
        try:
            consumer.run()
            self.finished.add(slot)
        finally:
            with self.lock:
                self.consumers.remove(consumer)
            connections.close_all()

    def _count(self) -> None:
        with self.lock:
            self.processed += 1

    def _abort(self) -> None:
        """Give back every unfinished delivery, then leave: threads cannot be interrupted."""
        for consumer in self.consumers:
            consumer.release_held()
        logger.warning("Aborted: unfinished tasks were given back to the queue")
        self.worker._record(stopped=True)
        logging.shutdown()
        os._exit(1)
