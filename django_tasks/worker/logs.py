"""The worker's log output: its format, and the log records it need not build on every task.

A task is cheap enough that its log records are a large part of what it costs the worker: each
record is built, passed along the loggers and formatted. ``runworker`` configures logging with
the two functions below; neither changes a line that is written.
"""

from __future__ import annotations

import logging
import time

#: runworker's format where the project's LOGGING gives our handler none (as Celery's worker).
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


class WorkerFormatter(logging.Formatter):
    """A Formatter that formats the date and time of each second once, not once per record.

    Its output is the standard Formatter's: the seconds come from the cache, the milliseconds from
    the record.
    """

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt or not self.default_msec_format:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, text = self._second  # One tuple: threads sharing the formatter see a whole pair.
        if cached != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return self.default_msec_format % (text, record.msecs)


def skip_unheard(name: str, level: int, message: str, args: tuple[object, ...]) -> bool:
    """Stop logger ``name`` building ``level`` records that no handler would write.

    Django logs every task's start and end at INFO on ``django.tasks``. With Django's default
    LOGGING and DEBUG off those records reach no handler, yet each is built and offered to the
    handlers first. When a record like ``message % args`` would be written nowhere, the logger's
    level is raised above ``level``, so such records are no longer built; more severe ones are
    logged as before. Where a handler would take it, nothing changes. Returns whether the level
    was raised.
    """
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(level):
        return False
    probe = logger.makeRecord(name, level, __file__, 0, message, args, None)
    if logger.filter(probe) and _handled(logger, probe):
        return False
    logger.setLevel(level + 1)
    return True


def _handled(logger: logging.Logger, record: logging.LogRecord) -> bool:
    """Whether some handler on ``logger``'s way up would write ``record`` (as callHandlers)."""
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            found = True
            if record.levelno >= handler.level and handler.filter(record):
                return True
        current = current.parent if current.propagate else None
    if not found and logging.lastResort is not None:
        return record.levelno >= logging.lastResort.level
    return False
