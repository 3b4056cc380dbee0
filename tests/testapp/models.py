from django.db import models


class Execution(models.Model):
    """One execution of a task, recorded by the task itself (counts side effects)."""

    marker = models.CharField(max_length=255, db_index=True)
    pid = models.IntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.marker} by {self.pid}"
