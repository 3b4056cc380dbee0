"""The benchmark's one model: the chaos benchmark's tasks record each of their executions."""

from django.db import models


class Execution(models.Model):
    """One execution of ``record_execution(n)``, written by the task itself.

    ``worker`` is the name bench/chaos.py gave the worker process (BENCH_WORKER_NAME), so that a
    task that ran twice can be traced to the worker that was killed while running it.
    """

    n = models.IntegerField(db_index=True)
    worker = models.CharField(max_length=64, blank=True)
    pid = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.n} on {self.worker or self.pid}"
