"""A broker outage: the worker logs, backs off, reconnects and carries on; delay() fails fast."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from django_tasks.exceptions import BrokerConnectionError
from tests.conftest import E2E, tasks_setting
from tests.faults import unavailable
from tests.testapp import tasks
from tests.workers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port (the shared one is not touched)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(self._answers, timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_worker_survives_a_redis_outage(private_redis: PrivateRedis, settings, tmp_path) -> None:
    options = {"BROKER_URL": private_redis.url, "CONNECT_TIMEOUT": 1}
    settings.TASKS = tasks_setting(options)
    world = E2E("redis", options, tmp_path)
    worker = world.start_worker("-c", "1")
    try:
        assert tasks.add.delay(1, 2).get(timeout=20) == 3

        private_redis.stop()
        with pytest.raises(BrokerConnectionError) as info:
            tasks.add.delay(2, 2)
        assert f"127.0.0.1:{private_redis.port}" in str(info.value)
        wait_for(lambda: "Broker error" in worker.log(), timeout=20)
        assert worker.process.poll() is None

        private_redis.start()
        assert tasks.add.delay(2, 2).get(timeout=30) == 4
        assert worker.process.poll() is None
    finally:
        worker.stop()
