"""``manage.py runworker``: start a worker (a supervisor and its pool)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core import checks
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...backend import get_backend
from ...worker import Worker

#: System checks of the web side, which a worker leaves to ``manage.py check`` and ``runserver``:
#: it serves no URL, renders no template and makes no migration, and running them would load the
#: URLconf, the template engines and the migration autodetector into every worker for good.
WEB_CHECK_TAGS = frozenset({
    checks.Tags.admin, checks.Tags.commands, checks.Tags.security, checks.Tags.staticfiles,
    checks.Tags.templates, checks.Tags.urls,
})  # fmt: skip


#: The format of our log lines where the project's LOGGING gives our handler none (as Celery's).
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


class Command(BaseCommand):
    help = "Run a django_tasks worker: consume the queues and run their tasks."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "-c",
            "--concurrency",
            type=int,
            default=os.cpu_count() or 1,
            help="Pool size: processes or threads (default: the number of CPUs).",
        )
        parser.add_argument(
            "-Q",
            "--queues",
            default="",
            help="Comma-separated queues to consume, earlier first (default: the default queue).",
        )
        parser.add_argument(
            "--pool",
            choices=["process", "thread"],
            default="process",
            help="Run tasks in forked processes (default) or in threads.",
        )
        parser.add_argument(
            "-l",
            "--loglevel",
            default="INFO",
            choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            type=str.upper,
            help="Level of the worker's log (default: INFO).",
        )
        parser.add_argument("--backend", default="default", help="The TASKS alias to serve.")
        parser.add_argument(
            "--prefetch",
            type=int,
            default=None,
            help="Deliveries each pool member leases at a time (default: OPTIONS['PREFETCH']).",
        )
        parser.add_argument(
            "--max-tasks",
            type=int,
            default=None,
            help="Each pool member exits after this many tasks; the worker exits when all have.",
        )
        parser.add_argument(
            "--max-tasks-per-child",
            type=int,
            default=None,
            help="Replace a pool process after it ran this many tasks (process pool).",
        )
        parser.add_argument(
            "--max-memory-per-child",
            type=int,
            default=None,
            help="Replace a pool process once its resident memory exceeds this many KiB, after "
            "the task that made it grow (process pool).",
        )
        parser.add_argument(
            "--burst",
            action="store_true",
            help="Exit once the queues are empty instead of waiting for more work.",
        )
        parser.add_argument("-n", "--hostname", default=None, help="Name this worker reports.")

    def check(
        self,
        app_configs: Sequence[AppConfig] | None = None,
        tags: Sequence[str] | None = None,
        display_num_errors: bool = False,
        include_deployment_checks: bool = False,
        fail_level: int = checks.ERROR,
        databases: Sequence[str] | None = None,
    ) -> None:
        """Run the system checks a worker depends on (models, caches, mail, ours, ...).

        ``tags`` (None when Django runs the checks before ``handle()``) defaults to every tag
        but WEB_CHECK_TAGS. Checks without a tag, such as Django's check of the TASKS backends,
        run only without a tag filter: ``handle()`` checks the backend it serves itself.
        """
        if tags is None:
            tags = sorted(checks.registry.registry.tags_available() - WEB_CHECK_TAGS)
        super().check(
            app_configs, tags, display_num_errors, include_deployment_checks, fail_level, databases
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self._configure_logging(options["loglevel"])
        backend = get_backend(options["backend"])
        if not options["skip_checks"]:
            errors = [m for m in backend.check() if m.is_serious() and not m.is_silenced()]
            if errors:
                raise CommandError("\n".join(str(error) for error in errors))
        queues = [q.strip() for q in options["queues"].split(",") if q.strip()]
        self._validate(backend.queues, queues, options)
        worker_options: dict[str, Any] = {
            "backend": options["backend"],
            "queues": queues,
            "concurrency": options["concurrency"],
            "pool": options["pool"],
            "prefetch": options["prefetch"],
            "max_tasks": options["max_tasks"],
            "max_tasks_per_child": options["max_tasks_per_child"],
            "max_memory_per_child": options["max_memory_per_child"],
            "burst": options["burst"],
        }
        if options["hostname"]:
            worker_options["hostname"] = options["hostname"]
        Worker(**worker_options).run()

    @staticmethod
    def _validate(known: set[str], queues: list[str], options: dict[str, Any]) -> None:
        unknown = [q for q in queues if known and q not in known]
        if unknown:
            raise CommandError(
                f"Unknown queue(s) {', '.join(unknown)}; TASKS['{options['backend']}']['QUEUES'] "
                f"has {', '.join(sorted(known))}."
            )
        for name in ("concurrency", "prefetch", "max_tasks", "max_tasks_per_child",
                     "max_memory_per_child"):  # fmt: skip
            value = options[name]
            if value is not None and value < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1.")
        if options["pool"] == "thread" and (
            options["max_tasks_per_child"] or options["max_memory_per_child"]
        ):
            raise CommandError(
                "--max-tasks-per-child and --max-memory-per-child apply to the process pool."
            )

    @staticmethod
    def _configure_logging(level: str) -> None:
        """Log to stderr unless the project's LOGGING already routes our logger somewhere.

        Django's own per-task records (INFO on ``django.tasks``) are not built at all where the
        project's LOGGING would write them nowhere (Django's default with DEBUG off).
        """
        logger = logging.getLogger("django_tasks")
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
        for existing in logger.handlers:
            if existing.formatter is None:
                existing.setFormatter(logging.Formatter(LOG_FORMAT))
        if skip_unheard("django.tasks", logging.INFO, "Task id=%s path=%s state=%s",
                        ("", "", "RUNNING")):  # fmt: skip
            logger.debug("django.tasks INFO records go to no handler: the worker skips them")


def skip_unheard(name: str, level: int, message: str, args: tuple[object, ...]) -> bool:
    """Stop logger ``name`` building ``level`` records that no handler would write.

    Django logs every task's start and end at INFO on ``django.tasks``. With Django's default
    LOGGING and DEBUG off those records reach no handler, yet each is built and offered to the
    handlers first, which cost a no-op task in a worker about as much as running it. When a
    record like ``message % args`` would be written nowhere, the logger's level is raised above
    ``level``, so such records are no longer built; more severe ones (a task's failure) are
    logged as before. Where a handler would take it, nothing changes. Returns whether the level
    was raised.
    """
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(level):
        return False
    probe = logger.makeRecord(name, level, __file__, 0, message, args, None)
    if logger.filter(probe) and _handled(logger, probe):
        return False
    logger.setLevel(level + 1)
    return True


def _handled(logger: logging.Logger, record: logging.LogRecord) -> bool:
    """Whether some handler on ``logger``'s way up would write ``record`` (as callHandlers)."""
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            found = True
            if record.levelno >= handler.level and handler.filter(record):
                return True
        current = current.parent if current.propagate else None
    if not found and logging.lastResort is not None:
        return record.levelno >= logging.lastResort.level
    return False
