"""Fixtures: real Redis, real PostgreSQL and SQLite; brokers built for each."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from django_tasks.backend import close_brokers
from django_tasks.brokers import Broker, create_broker
from django_tasks.conf import BackendConfig
from tests.services import in_ci


@pytest.fixture(autouse=True)
def _close_brokers() -> Iterator[None]:
    """Close the brokers' connections (result subscriptions included) after every test."""
    yield
    close_brokers()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What django_tasks logs in this process (its logger does not propagate to caplog's)."""
    logger = logging.getLogger("django_tasks")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def redis_available() -> bool:
    try:
        return bool(redis_client().ping())
    except redis.RedisError:
        if in_ci():
            raise
        return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, flushed before and after the test."""
    if not redis_available():
        pytest.skip("Redis is not answering")
    client = redis_client()
    client.flushdb()
    yield settings.REDIS_URL
    client.flushdb()
    client.close()


def require_postgres() -> None:
    if "postgres" not in settings.DATABASES:
        pytest.skip("PostgreSQL is not answering")


def broker_options(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "redis":
        return {"BROKER_URL": request.getfixturevalue("redis_url")}
    if kind == "postgres":
        require_postgres()
        return {"DATABASE": "postgres"}
    return {"DATABASE": "default"}


def _postgres_missing() -> bool:
    return "postgres" not in settings.DATABASES


# The database marks sit on the params, so that pytest-django creates the test databases that
# the selected tests need before any of them runs.
BROKER_PARAMS = [
    pytest.param("redis", marks=pytest.mark.django_db(transaction=True), id="redis"),
    pytest.param("sqlite", marks=pytest.mark.django_db(transaction=True), id="sqlite"),
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.skipif(_postgres_missing(), reason="PostgreSQL is not answering"),
            pytest.mark.django_db(databases=["default", "postgres"], transaction=True),
        ],
        id="postgres",
    ),
]


DATABASE_PARAMS = [
    pytest.param("default", marks=pytest.mark.django_db(transaction=True), id="sqlite"),
    pytest.param(
        "postgres",
        marks=pytest.mark.django_db(databases=["default", "postgres"], transaction=True),
        id="postgres",
    ),
]


@pytest.fixture(params=DATABASE_PARAMS)
def using(request: pytest.FixtureRequest) -> str:
    """Each database alias in turn (SQLite, then PostgreSQL), with transactional access."""
    if request.param == "postgres":
        require_postgres()
    return str(request.param)


@pytest.fixture(params=BROKER_PARAMS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each broker in turn, with transactional access to the databases it needs."""
    return str(request.param)


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(broker_kind: str, request: pytest.FixtureRequest) -> Iterator[BrokerFactory]:
    """Build brokers of the parametrised kind; ``make_broker(LEASE_SECONDS=1)`` sets options."""
    base = broker_options(broker_kind, request)
    made: list[Broker] = []

    def factory(**options: Any) -> Broker:
        params = {"QUEUES": ["default", "hipri", "lopri"], "OPTIONS": {**base, **options}}
        broker = create_broker(BackendConfig.from_params("default", params))
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make_broker: BrokerFactory) -> Broker:
    return make_broker()


@pytest.fixture
def backend(broker_kind: str, request: pytest.FixtureRequest, settings: Any) -> Any:
    """The default backend, on each broker in turn (its connections closed afterwards)."""
    from django_tasks.backend import get_backend

    settings.TASKS = tasks_setting(broker_options(broker_kind, request))
    return get_backend()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"CI={os.environ.get('CI', '')!r}"]


class E2E:
    """An end-to-end test's world: TASKS pointed at one broker, and workers to start."""

    def __init__(self, kind: str, options: dict[str, Any], tmp_path: Any) -> None:
        self.kind = kind
        self.options = options
        self.tmp_path = tmp_path
        self.workers: list[Any] = []
        #: More environment for the workers (DT_TEST_RESULTS_DATABASE, say).
        self.env: dict[str, str] = {}

    def start_worker(self, *args: str, ready: bool = True, **options: Any) -> Any:
        from tests.workers import WorkerProcess, worker_env

        env = {**worker_env({**self.options, **options}), **self.env}
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(list(args) or ["-c", "2"], env, log)
        self.workers.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- worker {i} ---\n{w.log()}" for i, w in enumerate(self.workers))


def tasks_setting(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "django_tasks.backend.TasksBackend",
            "QUEUES": ["default", "hipri", "lopri"],
            "OPTIONS": {"ROUTES": {"tests.testapp.tasks.routed": {"queue": "hipri"}}, **options},
        }
    }


def _world(kind: str, request: pytest.FixtureRequest, settings: Any, tmp_path: Any):
    options = broker_options(kind, request)
    settings.TASKS = tasks_setting(options)
    world = E2E(kind, options, tmp_path)
    yield world
    for worker in world.workers:
        try:
            worker.stop(timeout=20)
        except Exception:
            worker.process.kill()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(world.logs())


@pytest.fixture
def e2e(broker_kind: str, request: pytest.FixtureRequest, settings: Any, tmp_path: Any):
    """TASKS on the parametrised broker; workers started through it are stopped afterwards."""
    yield from _world(broker_kind, request, settings, tmp_path)


@pytest.fixture
def e2e_sqlite(request: pytest.FixtureRequest, settings: Any, tmp_path: Any, transactional_db):
    """Like ``e2e``, on the database broker and SQLite only (for broker-independent behaviour)."""
    yield from _world("sqlite", request, settings, tmp_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
