"""The benchmark's tasks, on procrastinate's Django app."""

from counter import bump
from procrastinate.contrib.django import app


@app.task(queue="default")
def noop() -> None:
    return None


@app.task(queue="default")
def count() -> None:
    bump()
