"""Subprocesses the benchmark owns: started here, always stopped (SIGTERM, then SIGKILL).

Every process started through this module is remembered until it is reaped, and an ``atexit``
hook stops whatever is left, so that an exception or a signal never leaves a worker or a Redis
server running behind us.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

_live: dict[int, tuple[subprocess.Popen[bytes], bool]] = {}


def start(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    stdout: int | IO[Any] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in the repository root; output to ``log`` (appended) or ``stdout``.

    ``new_session`` puts the process and its descendants in their own process group, so that
    stop(group=True) reaches all of them and a Ctrl-C in the terminal reaches only us.
    """
    out: int | IO[Any] | None = stdout
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log, "ab")  # noqa: SIM115 - the child keeps its own copy
        out = log_file
    try:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=new_session,
        )
    finally:
        if log_file is not None:
            log_file.close()
    _live[process.pid] = (process, new_session)
    return process


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
    """SIGTERM (the worker's warm shutdown), wait ``grace`` s, then SIGKILL. Returns the status."""
    group = _live.get(process.pid, (process, False))[1]
    try:
        if process.poll() is None:
            _send(process, signal.SIGTERM, group)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _send(process, signal.SIGKILL, group)
                process.wait(10)
        elif group:
            # The leader is gone, but its group may not be (a forked child of a worker).
            _send(process, signal.SIGKILL, group)
        return process.returncode
    finally:
        _live.pop(process.pid, None)


def reap(process: subprocess.Popen[bytes]) -> None:
    """Forget a process that exited by itself."""
    if process.poll() is not None:
        _live.pop(process.pid, None)


def _send(process: subprocess.Popen[bytes], signum: int, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    """Stop every process still running, newest first."""
    for process, _group in reversed(list(_live.values())):
        stop(process, grace=5.0)


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so that ``finally`` blocks and atexit run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` s pass; a bounded loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def child_env(**extra: str) -> dict[str, str]:
    """Our environment plus ``extra``, with the repository importable and Django pointed at us."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


atexit.register(stop_all)
