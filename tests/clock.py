"""A host whose wall clock is off: ``time.time()`` and ``timezone.now()`` shifted by some seconds.

Only this process's clock moves; the databases and their clocks stay the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from unittest import mock

from django.utils import timezone


def _shifted(seconds: float) -> tuple[Callable[[], float], Callable[[], datetime]]:
    """time.time() and timezone.now() as they read ``seconds`` later (earlier if negative)."""
    real_time, real_now = time.time, timezone.now
    return (lambda: real_time() + seconds), (lambda: real_now() + timedelta(seconds=seconds))


@contextmanager
def clock_off_by(seconds: float) -> Iterator[None]:
    """Run the block on a host whose clock is ``seconds`` ahead (behind if negative)."""
    shifted_time, shifted_now = _shifted(seconds)
    with (
        mock.patch.object(time, "time", shifted_time),
        mock.patch.object(timezone, "now", shifted_now),
    ):
        yield


def shift_clock(seconds: float) -> None:
    """Put this whole process on a clock ``seconds`` ahead, for good (a test's worker process)."""
    time.time, timezone.now = _shifted(seconds)
