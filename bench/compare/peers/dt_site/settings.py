"""django_tasks: bench/settings.py (configured by its BENCH_* variables) plus this app."""

from bench.settings import *  # noqa: F403
from bench.settings import INSTALLED_APPS as _APPS

INSTALLED_APPS = [*_APPS, "dt_site"]
