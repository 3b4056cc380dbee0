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
    """A redis-server of this test's own on a free loopback port (the shared one is not touched).

    With a ``password``, it is that of the default user and of a user named "user".
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        if self.password is not None:
            user = ["user", "on", f">{self.password}", "~*", "&*", "+@all"]
            command += ["--requirepass", self.password, "--user", *user]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(self._answers, timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def _answers(self) -> bool:
        try:
            client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5)
            return bool(client.ping())
        except redis.RedisError:
            return False


def start_private_redis(directory: Path, password: str | None = None) -> PrivateRedis:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = PrivateRedis(directory, password)
    server.start()
    return server


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = start_private_redis(tmp_path)
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


@pytest.mark.parametrize(
    ("credentials", "query", "masked"),
    [("", "?password=s3cret", "/0?password=***"), ("user:s3cret@", "", "//user:***@")],
    ids=["query", "userinfo"],
)
def test_the_password_of_the_broker_url_is_never_logged(
    credentials: str, query: str, masked: str, settings, tmp_path, logged: pytest.LogCaptureFixture
) -> None:
    server = start_private_redis(tmp_path, password="s3cret")
    options = {"BROKER_URL": f"redis://{credentials}127.0.0.1:{server.port}/0{query}",
               "CONNECT_TIMEOUT": 1}  # fmt: skip
    settings.TASKS = tasks_setting(options)
    world = E2E("redis", options, tmp_path)
    worker = world.start_worker("-c", "1")
    try:
        assert tasks.add.delay(1, 2).get(timeout=20) == 3  # This process subscribes to results.
        server.stop()
        with pytest.raises(BrokerConnectionError) as info:
            tasks.add.delay(2, 2)
        wait_for(lambda: "Broker error" in worker.log(), timeout=20)
        wait_for(lambda: "Lost the result notifications" in logged.text)
    finally:
        worker.stop()
        server.stop()
    for text in [worker.log(), str(info.value), logged.text]:
        assert "s3cret" not in text
    assert masked in worker.log() and masked in str(info.value)
