"""The options of one call (apply_async()'s), checked: clear errors before anything is sent.

Shared by the calling API (task.py) and the backend that builds the message (backend.py).
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta
from typing import Any

from django.tasks.exceptions import InvalidTask
from django.utils import timezone

#: Headers the worker reads and writes itself: apply_async() sets them from its options.
RESERVED_HEADERS = frozenset({"time_limit", "soft_time_limit", "worker_ids"})
#: The longest task id: the length of the columns that store it (TaskResult's primary key).
TASK_ID_MAX_LENGTH = 255


def call_headers(
    headers: Any, time_limit: float | None, soft_time_limit: float | None
) -> dict[str, Any]:
    """apply_async()'s ``headers`` checked, with the call's time limits added."""
    checked = checked_headers(headers)
    reserved = RESERVED_HEADERS.intersection(checked)
    if reserved:
        raise InvalidTask(f"headers may not set {', '.join(sorted(reserved))}: the worker "
                          "sets them (use the options of the same names).")  # fmt: skip
    for option, value in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
        if value is not None:
            seconds = seconds_option(option, value, "a positive number of seconds")
            if seconds <= 0:
                raise InvalidTask(f"{option} must be a positive number of seconds.")
            checked[option] = seconds
    return checked


def eta_option(
    countdown: float | timedelta | None, eta: datetime | None, run_after: datetime | None
) -> float | None:
    if countdown is not None and eta is not None:
        raise InvalidTask("Give either countdown or eta, not both.")
    if countdown is not None:
        seconds = seconds_option("countdown", countdown, "seconds or a timedelta")
        return time.time() + seconds if seconds > 0 else None
    when = eta if eta is not None else run_after
    return None if when is None else timestamp_option(when, "eta")


def expires_option(expires: float | timedelta | datetime | None) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return timestamp_option(expires, "expires")
    return time.time() + seconds_option("expires", expires, "seconds, a timedelta or a datetime")


#: The longest countdown, expiry or time limit accepted, in seconds (about a hundred years):
#: a longer one is a mistake, and would overflow the times of the database and of Redis.
MAX_SECONDS = 100 * 365 * 86400


def seconds_option(option: str, value: Any, kinds: str = "seconds") -> float:
    """``value`` (a number of seconds or a timedelta) as a finite float; InvalidTask if not."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidTask(f"{option} must be {kinds}, not {value!r}.")
    if not math.isfinite(seconds) or abs(seconds) > MAX_SECONDS:
        raise InvalidTask(f"{option} must be a finite number of seconds under 100 years, "
                          f"not {value!r}.")  # fmt: skip
    return float(seconds)


def checked_task_id(task_id: Any) -> str:
    if not isinstance(task_id, str) or not task_id or len(task_id) > TASK_ID_MAX_LENGTH:
        raise InvalidTask(
            f"task_id must be a non-empty string of at most {TASK_ID_MAX_LENGTH} characters "
            f"(the column that stores it), not {task_id!r:.80}."
        )
    return task_id


def checked_headers(headers: Any) -> dict[str, Any]:
    """A copy of apply_async()'s ``headers``: a dict with string keys (None: empty)."""
    if headers is None:
        return {}
    if not isinstance(headers, dict) or not all(isinstance(key, str) for key in headers):
        raise InvalidTask(f"headers must be a dict with string keys, not {headers!r:.80}.")
    return dict(headers)


def call_arguments(args: Any, kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    """apply_async()'s ``args`` and ``kwargs``, checked: a list or tuple, a dict of str keys."""
    if args is not None and not isinstance(args, list | tuple):
        raise InvalidTask(f"args must be a list or a tuple, not {type(args).__name__}.")
    if kwargs is not None and (
        not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs)
    ):
        raise InvalidTask("kwargs must be a dict with string keys.")
    return list(args or ()), dict(kwargs or {})


def timestamp_option(when: datetime, option: str) -> float:
    if not isinstance(when, datetime):
        raise InvalidTask(f"{option} must be a datetime, not {when!r}.")
    if timezone.is_naive(when):
        when = timezone.make_aware(when, timezone.get_default_timezone())
    return when.timestamp()
