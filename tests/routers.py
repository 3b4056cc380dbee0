"""A database router that keeps TaskResult rows on another database (results in PostgreSQL)."""

from __future__ import annotations

import os
from typing import Any

from django_tasks.models import TaskResult


class ResultsOn:
    """TaskResult on ``alias`` (default: the DT_TEST_RESULTS_DATABASE environment variable)."""

    def __init__(self, alias: str | None = None) -> None:
        self.alias = alias or os.environ["DT_TEST_RESULTS_DATABASE"]

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return self.alias if model is TaskResult else None

    db_for_write = db_for_read
