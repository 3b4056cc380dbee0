"""Signals sent around the execution of a task, in the worker process.

Django's own ``django.tasks.signals`` (task_enqueued, task_started, task_finished) are sent too,
as Django documents them. A receiver's exception is logged, never propagated into the task.

- ``task_prerun(sender=task, task_id, task, args, kwargs)``: just before the task runs.
- ``task_postrun(sender=task, task_id, task, args, kwargs, retval, state)``: after it ran.
- ``task_success(sender=task, task_id, result)``: it returned.
- ``task_failure(sender=task, task_id, exception, traceback)``: it raised (last attempt).
- ``task_retry(sender=task, task_id, reason, eta)``: another attempt is scheduled.
- ``task_revoked(sender=task, task_id, reason)``: it will not run (revoked or expired).
"""

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("django_tasks.signals")

task_prerun = Signal()
task_postrun = Signal()
task_success = Signal()
task_failure = Signal()
task_retry = Signal()
task_revoked = Signal()


def send_robust(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``; a receiver that raises is logged at ERROR and the others still run."""
    for handler, response in signal.send_robust(sender=sender, **kwargs):
        if isinstance(response, Exception):
            logger.error("Signal receiver %r failed: %r", handler, response, exc_info=response)
