"""The benchmark's tasks: plain functions, queued by their dotted path."""

from counter import bump


def noop() -> None:
    return None


def count() -> None:
    bump()
