"""Tasks that misbehave: values the result store refuses, BaseExceptions, a dying process.

Workers import this module through OPTIONS["IMPORTS"] of the test settings.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from django_tasks import task
from tests.testapp.models import Execution


@task
def returns(value: Any) -> Any:
    return value


@task
def returns_nul() -> str:
    return "before\x00after"


@task
def returns_object() -> Any:
    return object()


@task
def raises_with_nul() -> None:
    raise ValueError("bad\x00value")


#: What each task raises: the BaseExceptions that are not Exceptions.
RAISED: dict[str, Any] = {
    "exit0": lambda: sys.exit(0),
    "exit2": lambda: sys.exit(2),
    "keyboard": KeyboardInterrupt,
    "generator": GeneratorExit,
    "cancelled": asyncio.CancelledError,
}


@task
def raises_base(kind: str) -> None:
    raise_it = RAISED[kind]
    if isinstance(raise_it, type):
        raise raise_it()
    raise_it()


@task
def exits_process(marker: str) -> None:
    """Leave the process with status 0 as if nothing happened (os._exit skips everything)."""
    Execution.objects.create(marker=marker, pid=os.getpid())
    os._exit(0)


@task(bind=True, max_retries=5)
def retries_grown(self: Any, padding: str) -> None:
    """Ask for a retry; the padding leaves no room for what the retry adds to the message."""
    raise self.retry(countdown=0.1)


@task(bind=True, max_retries=3)
def retries_slowly(self: Any, marker: str, seconds: float) -> None:
    """Record the attempt, run ``seconds``, then ask for a retry in a minute."""
    import time

    Execution.objects.create(marker=marker, pid=os.getpid())
    time.sleep(seconds)
    raise self.retry(countdown=60)


@task
def noisy() -> str:
    """Observed by receivers of Django's signals that always raise (tests/testapp/receivers.py)."""
    return "noisy"


@task
def rendezvous(marker: str, members: int, timeout: float) -> bool:
    """Wait until ``members`` tasks of ``marker`` run at once; False if they never do."""
    import time

    Execution.objects.create(marker=marker, pid=os.getpid())
    deadline = time.monotonic() + timeout
    while Execution.objects.filter(marker=marker).count() < members:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
