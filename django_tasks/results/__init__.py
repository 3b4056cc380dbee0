"""The result store: TaskResult rows, written by workers and read by AsyncResult."""

from .store import ResultStore, error_entry, rebuild_exception

__all__ = ["ResultStore", "error_entry", "rebuild_exception"]
