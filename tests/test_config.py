"""The TASKS setting: validation with clear messages, as system checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.db import connections
from django.test import override_settings

from django_tasks.backend import get_backend
from django_tasks.conf import BackendConfig, mask_url
from django_tasks.exceptions import ConfigurationError
from django_tasks.management.commands.runworker import Command as RunWorker

BACKEND = "django_tasks.backend.TasksBackend"
check_db = pytest.mark.django_db


def config(**options: object) -> BackendConfig:
    return BackendConfig.from_params("default", {"OPTIONS": options})


def test_defaults_use_the_database_broker() -> None:
    conf = config()
    assert conf.broker_kind == "database"
    assert conf.database == "default"
    assert conf.max_message_size == 1_000_000
    assert conf.queues == ("default",)


def test_redis_url_selects_redis() -> None:
    assert config(BROKER_URL="redis://127.0.0.1:6379/0").broker_kind == "redis"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"BROKER_URLS": "redis://x"}, "unknown option 'BROKER_URLS'. Did you mean 'BROKER_URL'"),
        ({"BROKER_URL": "amqp://x"}, "unsupported scheme 'amqp'"),
        ({"LEASE_SECONDS": 0}, "LEASE_SECONDS'] must be greater than zero"),
        ({"PREFETCH": 1.5}, "PREFETCH'] must be a whole number"),
        ({"ROUTES": {"a.b": {"queue": "x", "speed": 1}}}, "ROUTES']['a.b'] must be a dict"),
        ({"IMPORTS": "a.b"}, "IMPORTS'] must be a list"),
        ({"KEY_PREFIX": "dt:{shop}"}, "KEY_PREFIX'] must not contain braces"),
        ({"KEY_PREFIX": ""}, "KEY_PREFIX'] must be a non-empty string"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config(**options)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://host:6379/0?db=1&password=s3cret", "redis://host:6379/0?db=1&password=***"),
        (
            "rediss://h/0?ssl_password=s3cret&pass%77ord=s3cret",
            "rediss://h/0?ssl_password=***&pass%77ord=***",
        ),
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
        ("redis://:s3#cret@host/0", "redis://***@host/0"),  # An unescaped "#" in the password.
        ("redis://host:6379/0?db=1", "redis://host:6379/0?db=1"),
    ],
)
def test_passwords_are_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert config(BROKER_URL=url).safe_broker_url() == masked


def test_an_error_quoting_a_password_is_scrubbed() -> None:
    conf = config(BROKER_URL="redis://:0ne@host/0?password=s3%2Fcret")
    assert conf.scrub("AUTH s3/cret or s3%2Fcret or 0ne failed") == "AUTH *** or *** or *** failed"


@check_db
@override_settings(TASKS={"default": {"BACKEND": BACKEND, "OPTIONS": {"BROKER_URL": "http://x"}}})
def test_check_reports_bad_configuration() -> None:
    with pytest.raises(SystemCheckError, match=r"django_tasks\.E001"):
        call_command("check")
    with pytest.raises(ConfigurationError):
        get_backend().config  # noqa: B018


@check_db
@override_settings(
    TASKS={
        "default": {
            "BACKEND": BACKEND,
            "QUEUES": ["default"],
            "OPTIONS": {"ROUTES": {"a.b": {"queue": "elsewhere"}}, "DATABASE": "nope"},
        }
    }
)
def test_check_reports_unknown_database_and_route_queue() -> None:
    with pytest.raises(SystemCheckError) as info:
        call_command("check")
    assert "django_tasks.E002" in str(info.value)
    assert "django_tasks.E003" in str(info.value)


@pytest.fixture
def unsupported_database(settings: Any) -> Iterator[str]:
    """A database alias of a vendor the database broker does not support (no server needed)."""
    alias, engine = "unsupported", {"ENGINE": "django.db.backends.dummy"}
    settings.DATABASES = {**settings.DATABASES, alias: engine}
    connections.settings[alias] = engine
    yield alias
    del connections[alias]
    del connections.settings[alias]


@check_db
@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_check_reports_a_database_the_database_broker_does_not_support(
    settings: Any, unsupported_database: str
) -> None:
    options = {"DATABASE": unsupported_database}
    settings.TASKS = {"default": {"BACKEND": BACKEND, "OPTIONS": options}}
    with pytest.raises(SystemCheckError, match=r"django_tasks\.E004") as info:
        call_command("check")
    assert "supports PostgreSQL and SQLite only" in str(info.value)


@check_db
def test_check_passes_on_the_test_settings() -> None:
    call_command("check")


@check_db
@override_settings(TASKS={"default": {"BACKEND": BACKEND, "OPTIONS": {"DATABASE": "nope"}}})
def test_runworker_refuses_to_start_on_a_backend_error() -> None:
    with pytest.raises(CommandError, match=r"django_tasks\.E002.*'nope'"):
        call_command("runworker", "--burst", skip_checks=False)


@pytest.fixture
def failing_check() -> Iterator[Any]:
    """Register a check that reports an error under the tag given; unregister it afterwards."""
    registered: list[Any] = []

    def register(tag: str) -> None:
        def failing(**kwargs: Any) -> list[checks.CheckMessage]:
            return [checks.Error(f"broken {tag}", id="tests.E001")]

        checks.register(failing, tag)
        registered.append(failing)

    yield register
    for check in registered:
        checks.registry.registry.registered_checks.discard(check)


@check_db
@pytest.mark.parametrize("tag", [checks.Tags.urls, checks.Tags.templates, checks.Tags.security])
def test_runworker_leaves_the_web_side_checks_to_manage_py_check(
    failing_check: Any, tag: str
) -> None:
    failing_check(tag)
    RunWorker().check()  # A worker serves no URL and renders no template...
    with pytest.raises(SystemCheckError, match=f"broken {tag}"):
        call_command("check")  # ...the project's check still reports it.


@check_db
@pytest.mark.parametrize("tag", [checks.Tags.models, checks.Tags.caches, "django_tasks"])
def test_runworker_stops_on_the_checks_of_what_it_runs(failing_check: Any, tag: str) -> None:
    failing_check(tag)
    with pytest.raises(SystemCheckError, match=f"broken {tag}"):
        RunWorker().check()


def test_each_thread_gets_the_backend_of_the_current_settings() -> None:
    import threading

    first = get_backend()
    assert get_backend() is first  # Remembered...
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(get_backend()))
    thread.start()
    thread.join()
    assert seen[0] is not None
    with override_settings(TASKS={"default": {"BACKEND": "django_tasks.backend.TasksBackend",
                                              "OPTIONS": {"PREFETCH": 7}}}):  # fmt: skip
        changed = get_backend()
        assert changed is not first and changed.config.prefetch == 7  # ...until TASKS changes.
    assert get_backend().config.prefetch != 7
