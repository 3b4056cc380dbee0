"""The runtime: a supervisor (Worker) over a pool of consumers that run tasks."""

from .supervisor import Worker

__all__ = ["Worker"]
