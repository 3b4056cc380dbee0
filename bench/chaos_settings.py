"""Settings of the chaos benchmark: bench/settings.py with a short lease (bench/chaos.py).

- BENCH_LEASE_SECONDS: the backend's LEASE_SECONDS. Short, so that the tasks of a worker killed
  with SIGKILL come back within seconds.
- BENCH_CONNECT_TIMEOUT: the backend's CONNECT_TIMEOUT (delay() against a broker that is down).
"""

import os

from bench.settings import *  # noqa: F403
from bench.settings import TASKS

TASKS["default"]["OPTIONS"].update(
    LEASE_SECONDS=float(os.environ.get("BENCH_LEASE_SECONDS", "3")),
    CONNECT_TIMEOUT=float(os.environ.get("BENCH_CONNECT_TIMEOUT", "1")),
)
