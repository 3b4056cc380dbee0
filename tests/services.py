"""Is a service answering? Used by the settings and the fixtures of the test suite."""

import os
import socket
from typing import Any


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def postgres_available(settings: dict[str, Any]) -> bool:
    """PostgreSQL answers; under CI=true an absent server is an error, never a skip."""
    if port_open(settings["HOST"], int(settings["PORT"])):
        return True
    if in_ci():
        raise RuntimeError(f"PostgreSQL is not answering on {settings['HOST']}:{settings['PORT']}")
    return False
