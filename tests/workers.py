"""Start real ``runworker`` processes against the test databases and brokers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    The failure names ``what`` when given, else the predicate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            if what is not None:
                raise AssertionError(f"not within {timeout:.0f} s: {what}")
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def worker_env(options: dict[str, Any]) -> dict[str, str]:
    """The environment that points a worker process at this test run's databases and broker."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DT_TEST_WORKER="1",
        DT_TEST_SQLITE_NAME=connections["default"].settings_dict["NAME"],
        PYTHONPATH=str(ROOT),
        DT_TEST_BROKER_URL=options.get("BROKER_URL") or "",
        DT_TEST_BROKER_DATABASE=options.get("DATABASE", "default"),
        DT_TEST_LEASE_SECONDS=str(options.get("LEASE_SECONDS", 30)),
        DT_TEST_TRACK_STARTED_AFTER=str(options.get("TRACK_STARTED_AFTER", 0.1)),
        DT_TEST_CLOCK_SKEW=str(options.get("CLOCK_SKEW", "")),
    )
    if options.get("MIDDLEWARE"):
        env["DT_TEST_MIDDLEWARE"] = ",".join(options["MIDDLEWARE"])
    if options.get("IMPORTS"):
        env["DT_TEST_IMPORTS"] = ",".join(options["IMPORTS"])
    if options.get("PATH"):
        env["PYTHONPATH"] = os.pathsep.join([str(options["PATH"]), str(ROOT)])
    if "postgres" in settings.DATABASES:
        env["DT_TEST_POSTGRES_NAME"] = connections["postgres"].settings_dict["NAME"]
    return env


class WorkerProcess:
    """A ``manage.py runworker`` subprocess whose log goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        command = [sys.executable, "-m", "django", "runworker", *args]
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(lambda: "ready" in self.log() or self.process.poll() is not None, timeout)
        assert self.process.poll() is None, f"worker exited early:\n{self.log()}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
