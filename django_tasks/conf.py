"""The OPTIONS of a TasksBackend entry in the TASKS setting: read once, validated, with defaults."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

from django.conf import settings
from django.tasks import DEFAULT_TASK_QUEUE_NAME

from .exceptions import ConfigurationError

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})

#: Every option a TasksBackend accepts, with its default.
DEFAULTS: dict[str, Any] = {
    "BROKER_URL": None,  # None: the database broker; redis://, rediss://, unix://: Redis.
    "DATABASE": "default",  # The database alias of the database broker.
    "ROUTES": {},  # {"app.tasks.name": {"queue": "hipri", "priority": 10}}
    "LEASE_SECONDS": 30.0,  # How long a delivery stays leased without a heartbeat.
    "PREFETCH": None,  # Deliveries one consumer leases at a time; None: adapted to the tasks.
    "MAX_MESSAGE_SIZE": 1_000_000,  # Bytes, enforced at publish and at consume.
    "RESULT_EXPIRES": 86400,  # Seconds finished results are kept (0: for ever); see expiry.
    "IMPORTS": [],  # Modules imported at start besides each app's tasks module.
    "REDIS_OPTIONS": {},  # Keyword arguments for redis.Redis.from_url().
    "KEY_PREFIX": None,  # The namespace of every Redis key; None: default_key_prefix().
    "PUBLISH_ON_COMMIT": True,  # Redis: inside atomic(), publish when the transaction commits.
    "CONNECT_TIMEOUT": 5.0,  # Seconds delay() waits for an unreachable broker before raising.
    "WORKER_LOST_REDELIVERIES": 1,  # A task whose pool process dies runs again this many times.
    "TRACK_STARTED_AFTER": 0.1,  # Seconds a task runs before its row says STARTED (0: at once).
    "MIDDLEWARE": [],  # Dotted paths of middleware classes (see middleware.py).
}


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """The validated configuration of one TASKS alias served by our backend."""

    alias: str
    queues: tuple[str, ...]
    broker_url: str | None
    database: str
    routes: Mapping[str, Mapping[str, Any]]
    lease_seconds: float
    prefetch: int | None
    max_message_size: int
    result_expires: float
    imports: tuple[str, ...]
    redis_options: Mapping[str, Any]
    key_prefix: str
    publish_on_commit: bool
    connect_timeout: float
    worker_lost_redeliveries: int = 1
    track_started_after: float = 0.1
    middleware: tuple[str, ...] = ()

    @property
    def broker_kind(self) -> str:
        """``"redis"`` or ``"database"``."""
        return "database" if self.broker_url is None else "redis"

    @property
    def default_queue(self) -> str:
        return DEFAULT_TASK_QUEUE_NAME if not self.queues else self.queues[0]

    def safe_broker_url(self) -> str:
        """The broker URL with any password masked, fit for logs."""
        if self.broker_url is None:
            return f"database ({self.database})"
        return mask_url(self.broker_url)

    def scrub(self, text: str) -> str:
        """``text`` with the broker URL's passwords masked, should a library's error quote one."""
        for password in url_passwords(self.broker_url or ""):
            text = text.replace(password, "***")
        return text

    @classmethod
    def from_params(cls, alias: str, params: Mapping[str, Any]) -> BackendConfig:
        """Build from one TASKS entry; raise ConfigurationError naming the bad option."""
        options = dict(params.get("OPTIONS") or {})
        _reject_unknown(alias, options)
        merged = {**DEFAULTS, **options}
        prefix = f"TASKS[{alias!r}]['OPTIONS']"
        return cls(
            alias=alias,
            queues=_queues(alias, params),
            broker_url=_broker_url(prefix, merged["BROKER_URL"]),
            database=_string(prefix, "DATABASE", merged["DATABASE"]),
            routes=_routes(prefix, merged["ROUTES"]),
            lease_seconds=_positive(prefix, "LEASE_SECONDS", merged["LEASE_SECONDS"]),
            prefetch=_optional_count(prefix, "PREFETCH", merged["PREFETCH"]),
            max_message_size=int(
                _positive(prefix, "MAX_MESSAGE_SIZE", merged["MAX_MESSAGE_SIZE"], integer=True)
            ),
            result_expires=_non_negative(prefix, "RESULT_EXPIRES", merged["RESULT_EXPIRES"]),
            imports=tuple(_string_list(prefix, "IMPORTS", merged["IMPORTS"])),
            redis_options=_mapping(prefix, "REDIS_OPTIONS", merged["REDIS_OPTIONS"]),
            key_prefix=_key_prefix(prefix, merged["KEY_PREFIX"]),
            publish_on_commit=bool(merged["PUBLISH_ON_COMMIT"]),
            connect_timeout=_positive(prefix, "CONNECT_TIMEOUT", merged["CONNECT_TIMEOUT"]),
            track_started_after=_non_negative(
                prefix, "TRACK_STARTED_AFTER", merged["TRACK_STARTED_AFTER"]
            ),
            worker_lost_redeliveries=int(
                _non_negative(
                    prefix,
                    "WORKER_LOST_REDELIVERIES",
                    merged["WORKER_LOST_REDELIVERIES"],
                    integer=True,
                )
            ),
            middleware=tuple(_string_list(prefix, "MIDDLEWARE", merged["MIDDLEWARE"])),
        )


def mask_url(url: str) -> str:
    """The URL with asterisks for its passwords: the userinfo's and the query string's.

    redis-py reads ``?password=`` (and the other parameters named ``*password*``) as it reads
    ``user:password@``. The fragment, which it ignores, is left out.
    """
    parts = urlsplit(url)
    if "@" in url and "@" not in parts.netloc:
        # An unescaped "/", "?" or "#" in the password ended the userinfo early: mask all up to
        # the last "@" (an "@" in the query string hides the host, never shows a password).
        parts = urlsplit(f"{parts.scheme}://***@{url.rpartition('@')[2]}")
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{name}=***" if _is_password(name, value) else f"{name}{equals}{value}"
        for name, equals, value in _parameters(parts.query)
    )
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{masked}?{query}" if query else masked


def url_passwords(url: str) -> list[str]:
    """The passwords in ``url`` (see mask_url()), as written and decoded, the longest first."""
    parts = urlsplit(url)
    written = [parts.password or ""]
    written += [value for name, _, value in _parameters(parts.query) if _is_password(name, value)]
    forms = {form for each in written for form in (each, unquote(each), unquote_plus(each))}
    return sorted(forms - {""}, key=len, reverse=True)


def _parameters(query: str) -> list[tuple[str, str, str]]:
    """The parameters of a query string as written: (name, "=" or "", value)."""
    return [parameter.partition("=") for parameter in query.split("&")] if query else []


def _is_password(name: str, value: str) -> bool:
    return bool(value) and "password" in unquote_plus(name).lower()


def default_key_prefix() -> str:
    """``dt:`` and the top package of the project, e.g. ``dt:shop`` for ``shop.urls``.

    The package is that of ROOT_URLCONF, else of the settings module, names that the web and
    worker processes of one project share (ROOT_URLCONF first: override_settings() hides the
    settings module from tests). Two projects on one Redis database then keep apart.
    """
    for module in (getattr(settings, "ROOT_URLCONF", None), settings.SETTINGS_MODULE):
        package = module.partition(".")[0] if isinstance(module, str) else ""
        if package.isidentifier():  # Which also keeps braces (hash tags) out.
            return f"dt:{package}"
    return "dt"


def _key_prefix(prefix: str, value: Any) -> str:
    if value is None:
        return default_key_prefix()
    value = _string(prefix, "KEY_PREFIX", value)
    if "{" in value or "}" in value:
        # A hash tag in the prefix would put every queue in one slot of a Redis Cluster.
        raise ConfigurationError(f"{prefix}['KEY_PREFIX'] must not contain braces.")
    return value


def _reject_unknown(alias: str, options: Mapping[str, Any]) -> None:
    for key in options:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"TASKS[{alias!r}]['OPTIONS'] has an unknown option {key!r}.{hint} "
                f"Known options: {', '.join(sorted(DEFAULTS))}."
            )


def _queues(alias: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    queues = params.get("QUEUES", [DEFAULT_TASK_QUEUE_NAME])
    if isinstance(queues, str) or not all(isinstance(q, str) and q for q in queues):
        raise ConfigurationError(f"TASKS[{alias!r}]['QUEUES'] must be a list of queue names.")
    for name in queues:
        if "{" in name or "}" in name or len(name) > 200:
            raise ConfigurationError(
                f"TASKS[{alias!r}]['QUEUES'] has an invalid queue name {name!r} "
                "(at most 200 characters, no braces)."
            )
    return tuple(queues)


def _broker_url(prefix: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{prefix}['BROKER_URL'] must be a string or None.")
    scheme = urlsplit(value).scheme
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{prefix}['BROKER_URL'] has the unsupported scheme {scheme!r}: use a redis://, "
            "rediss:// or unix:// URL, or leave it out for the database broker."
        )
    return value


def _routes(prefix: str, value: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{prefix}['ROUTES'] must be a dict of task name -> options.")
    for name, route in value.items():
        if not isinstance(route, Mapping) or not set(route) <= {"queue", "priority"}:
            raise ConfigurationError(
                f"{prefix}['ROUTES'][{name!r}] must be a dict with 'queue' and/or 'priority'."
            )
    return value


def _string(prefix: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{prefix}[{key!r}] must be a non-empty string.")
    return value


def _string_list(prefix: str, key: str, value: Any) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{prefix}[{key!r}] must be a list of strings.")
    return list(value)


def _mapping(prefix: str, key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{prefix}[{key!r}] must be a dict.")
    return value


def _optional_count(prefix: str, key: str, value: Any) -> int | None:
    return None if value is None else int(_positive(prefix, key, value, integer=True))


def _positive(prefix: str, key: str, value: Any, *, integer: bool = False) -> float:
    number = _non_negative(prefix, key, value, integer=integer)
    if number <= 0:
        raise ConfigurationError(f"{prefix}[{key!r}] must be greater than zero.")
    return number


def _non_negative(prefix: str, key: str, value: Any, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "a whole number" if integer else "a number"
        raise ConfigurationError(f"{prefix}[{key!r}] must be {kind} >= 0, not {value!r}.")
    return float(value)
