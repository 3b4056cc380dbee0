"""The benchmark's tasks: they do nothing, so the figures measure the queue, not the work."""

from django_tasks import task


@task
def noop() -> None:
    return None


@task
def record_execution(n: int) -> int:
    """Record one execution of task number ``n`` (bench/chaos.py counts them); return ``n``."""
    import os

    from bench.benchapp.models import Execution

    Execution.objects.create(n=n, worker=os.environ.get("BENCH_WORKER_NAME", ""), pid=os.getpid())
    return n
