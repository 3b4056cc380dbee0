"""The processes the comparison starts: remembered until reaped, always stopped.

Each process gets the working directory and graceful signal of its library: every worker is
started in a session of its own, asked to stop with its graceful signal, and its whole process
group is killed after a grace period (and at exit, whatever happened).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_live: dict[int, subprocess.Popen[bytes]] = {}


def start(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: Path | None = None,
    stdout: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session; output appended to ``log`` or sent to ``stdout``."""
    out: int | IO[Any] | None = stdout
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log, "ab")  # noqa: SIM115 - the child keeps its own copy
        out = log_file
    try:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,
        )
    finally:
        if log_file is not None:
            log_file.close()
    _live[process.pid] = process
    return process


def _killpg(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def stop(
    process: subprocess.Popen[bytes], graceful: int = signal.SIGTERM, grace: float = 15.0
) -> int | None:
    """``graceful`` to the leader, wait ``grace`` s, then SIGKILL to the whole group."""
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(graceful)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # The leader is gone; a forked child of it may not be.
        _killpg(process.pid, signal.SIGKILL)
        return process.returncode
    finally:
        _live.pop(process.pid, None)


def reap(process: subprocess.Popen[bytes]) -> None:
    """Forget a process that exited by itself (and kill what it left in its group)."""
    if process.poll() is not None:
        _killpg(process.pid, signal.SIGKILL)
        _live.pop(process.pid, None)


def stop_all() -> None:
    """Stop every process still running, newest first."""
    for process in reversed(list(_live.values())):
        stop(process, grace=5.0)


def run(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float, errors: Path
) -> tuple[int | None, str]:
    """Run ``command`` to its end (killed at ``timeout``); its status and its stdout.

    Its stderr (a library's log lines, a traceback) is appended to ``errors``.
    """
    errors.parent.mkdir(parents=True, exist_ok=True)
    with open(errors, "ab") as err:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    _live[process.pid] = process
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process, grace=5.0)
        return None, f"killed after {timeout:.0f} s"
    reap(process)
    return process.returncode, out.decode(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` s pass; a bounded loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def memory_kib(pids: list[int]) -> dict[str, int]:
    """RSS and PSS summed over ``pids`` (and their descendants), from smaps_rollup, in KiB."""
    totals = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
    for pid in {p for root in pids for p in descendants(root)}:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        totals["processes"] += 1
        for line in lines:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                totals[f"{key.lower()}_kib"] += int(rest.split()[0])
    return totals


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, and SIGINT into KeyboardInterrupt (even when
    started in the background, where SIGINT is ignored), so that ``finally`` and atexit run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


atexit.register(stop_all)
