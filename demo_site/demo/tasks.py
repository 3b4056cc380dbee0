"""Tasks of the demo site."""

import logging

from django_tasks import task

logger = logging.getLogger(__name__)


@task
def add(x: int, y: int) -> int:
    return x + y


@task(bind=True)
def send_welcome_email(self, address: str) -> str:
    logger.info("Sending the welcome email to %s (attempt %d)", address, self.request.retries + 1)
    return f"sent to {address}"
