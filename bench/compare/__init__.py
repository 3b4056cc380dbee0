"""Side-by-side benchmark of django_tasks and other task queues (see bench/README.md)."""
