"""Tasks for the reliability tests (retries, time limits, dying pool processes, transactions).

Workers import this module through OPTIONS["IMPORTS"] of the test settings.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from django_tasks import task
from django_tasks.exceptions import SoftTimeLimitExceeded
from tests.testapp.models import Execution


class Flaky(Exception):
    pass


def _attempt(marker: str) -> int:
    """Record this attempt; return how many attempts there have been, this one included."""
    Execution.objects.create(marker=marker, pid=os.getpid())
    return Execution.objects.filter(marker=marker).count()


@task(bind=True, max_retries=3)
def succeeds_on_third_attempt(self: Any, marker: str) -> dict[str, int]:
    attempt = _attempt(marker)
    if attempt < 3:
        raise self.retry(exc=Flaky(f"attempt {attempt}"), countdown=0.2)
    return {"attempt": attempt, "retries": self.request.retries}


@task(bind=True, max_retries=1)
def always_retries(self: Any, marker: str, countdown: float = 0.2) -> None:
    attempt = _attempt(marker)
    raise self.retry(exc=Flaky(f"attempt {attempt}"), countdown=countdown)


@task(autoretry_for=(Flaky,), max_retries=2, retry_backoff=0.1, retry_jitter=False)
def autoretried(marker: str) -> None:
    attempt = _attempt(marker)
    raise Flaky(f"attempt {attempt}")


@task(soft_time_limit=0.5)
def cleans_up_after_soft_limit(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@task(time_limit=1)
def overruns(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


@task
def sleeps(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


@task
def dies(marker: str) -> None:
    """Kill its own pool process, as a segfault or the OOM killer would."""
    _attempt(marker)
    os._exit(1)


@task
def row_exists(marker: str) -> bool:
    return Execution.objects.filter(marker=marker).exists()


@task
def grows(megabytes: int) -> int:
    """Keep ``megabytes`` of memory alive in this process."""
    _BALLAST.append(bytearray(megabytes * 1024 * 1024))
    return os.getpid()


_BALLAST: list[bytearray] = []


@task(soft_time_limit=0.5)
def polls_until_soft_limit(seconds: float) -> str:
    """Like cleans_up_after_soft_limit, in short steps a thread can be interrupted between."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@task(bind=True, max_retries=1)
def observed_retry(self: Any) -> int:
    """Retries once, then succeeds (the signals test watches it)."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return self.request.retries


@task(
    autoretry_for=(Flaky,),
    max_retries=None,
    retry_backoff=0.05,
    retry_backoff_max=0.1,
    retry_jitter=False,
)
def succeeds_after_failures(marker: str, failures: int) -> int:
    """Fails ``failures`` times, then succeeds: retried for ever, with a short backoff."""
    attempt = _attempt(marker)
    if attempt <= failures:
        raise Flaky(f"attempt {attempt}")
    return attempt


@task(bind=True, default_retry_delay=42)
def asks_for_retry(self: Any, countdown: float | None = None, eta: float | None = None) -> float:
    """Asks once to be retried (``eta`` is a Unix time); the retry returns when it ran."""
    if self.request.retries == 0:
        when = None if eta is None else datetime.fromtimestamp(eta, UTC)
        raise self.retry(countdown=countdown, eta=when)
    return time.time()
