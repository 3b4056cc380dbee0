"""The message envelope and its JSON codec.

A message is what a broker carries: JSON text, never pickle. The envelope is versioned (``"v"``); a
worker dead-letters any version it does not know instead of guessing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from django.tasks.base import TASK_MAX_PRIORITY, TASK_MIN_PRIORITY

from .exceptions import DecodeError, EncodeError, MessageTooLarge

PROTOCOL_VERSION = 1

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def new_id() -> str:
    """A new task id: a time-ordered (version 7, RFC 9562) UUID, as text.

    Its first 48 bits are the Unix time in milliseconds; of the other 80, all but the version
    and variant bits (74) are random, so an id still cannot be guessed, but it tells when it was
    made. Ids made one after another sort together: each new row goes into the rightmost pages
    of the indexes on task ids (TaskResult's primary key, QueuedMessage's and DeadLetter's
    task_id), where a random (version 4) id lands on a random page of a large index. On
    PostgreSQL the first change to a page after a checkpoint writes the whole page (8 KiB) to the
    WAL, so random ids cost several times the WAL per result. Callers may still give ids of
    their own (``task_id``).
    """
    digits = ((time.time_ns() // 1_000_000).to_bytes(6) + os.urandom(10)).hex()
    variant = _VARIANT[digits[16]]  # The two top bits of the variant field are 10.
    return f"{digits[:8]}-{digits[8:12]}-7{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


@dataclass(slots=True, kw_only=True)
class Message:
    """One request to run a task. Times are Unix timestamps (seconds, UTC)."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    eta: float | None = None
    expires: float | None = None
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    callbacks: list[Any] = field(default_factory=list)
    errbacks: list[Any] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    enqueued_at: float = field(default_factory=time.time)
    #: Not part of the envelope (never encoded): whether ``eta`` was worked out by the sender as
    #: its own time plus a ``countdown``. A broker with a clock of its own counts that delay on
    #: it instead, ``eta - time.time()`` from when it stores the message (see the database
    #: broker). An ``eta`` given as a point in time stays that point.
    eta_from_countdown: bool = field(default=False, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The envelope; optional fields at their default are left out (decode() restores them).

        A short body is quicker to encode and send, and a waiting message takes less memory.
        """
        data = {
            "v": PROTOCOL_VERSION,
            "id": self.id,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "queue": self.queue,
            "enqueued_at": self.enqueued_at,
        }
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value:  # Every optional field defaults to 0, None or an empty container.
                data[name] = value
        return data


#: The fields to_dict() leaves out when they hold their default.
_OPTIONAL = (
    "priority",
    "eta",
    "expires",
    "retries",
    "root_id",
    "parent_id",
    "group_id",
    "callbacks",
    "errbacks",
    "headers",
)


def encode(message: Message, max_size: int | None = None) -> str:
    """Encode to JSON text; raise EncodeError or MessageTooLarge with a clear reason."""
    try:
        body = _encoder.encode(message.to_dict())
    except (TypeError, ValueError, RecursionError) as exc:
        raise _not_serialisable(message, exc) from exc
    return _size_checked(message, body, max_size)


def _not_serialisable(message: Message, exc: Exception) -> EncodeError:
    return EncodeError(
        f"The arguments of task {message.task!r} are not JSON-serialisable: {exc}. "
        "Pass plain data (str, int, float, bool, None, lists and dicts), e.g. a model's "
        "primary key instead of the instance."
    )


def _size_checked(message: Message, body: str, max_size: int | None) -> str:
    if max_size is not None and len(body) > max_size and len(body.encode()) > max_size:
        raise MessageTooLarge(
            f"The message for task {message.task!r} is {len(body.encode())} bytes, over the "
            f"limit of {max_size} bytes (OPTIONS['MAX_MESSAGE_SIZE'])."
        )
    return body


class EnvelopeTemplate:
    """encode() for the messages of one task sent without options, its fixed parts encoded once.

    A message whose task, queue and priority are the template's, and whose other fields but
    id, args, kwargs and enqueued_at hold their defaults, encodes to the very text encode()
    gives (the same keys in the same order): only the arguments go through the JSON encoder,
    and none at all when there are none. Every ``delay()`` is such a message.
    """

    __slots__ = ("_after_id", "_after_kwargs", "_tail", "max_size")

    def __init__(self, task: str, queue: str, priority: int, max_size: int | None) -> None:
        fixed = _encoder.encode
        self._after_id = f'","task":{fixed(task)},"args":'
        self._after_kwargs = f',"queue":{fixed(queue)},"enqueued_at":'
        self._tail = f',"priority":{fixed(priority)}}}' if priority else "}"
        self.max_size = max_size

    def encode(self, message: Message) -> str:
        """The JSON text of ``message``; raise EncodeError or MessageTooLarge as encode() does."""
        try:
            args = _encoder.encode(message.args) if message.args else "[]"
            kwargs = _encoder.encode(message.kwargs) if message.kwargs else "{}"
        except (TypeError, ValueError, RecursionError) as exc:
            raise _not_serialisable(message, exc) from exc
        # The id is new_id()'s (hex digits and dashes) and enqueued_at a finite float, whose
        # repr() is the JSON encoder's text for it.
        body = (
            f'{{"v":{PROTOCOL_VERSION},"id":"{message.id}{self._after_id}{args},"kwargs":'
            f"{kwargs}{self._after_kwargs}{message.enqueued_at!r}{self._tail}"
        )
        return _size_checked(message, body, self.max_size)


# Field name -> (accepted types, required). bool is excluded from numbers below.
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True),
    "task": ((str,), True),
    "args": ((list,), True),
    "kwargs": ((dict,), True),
    "queue": ((str,), True),
    "priority": ((int,), False),
    "eta": ((int, float, type(None)), False),
    "expires": ((int, float, type(None)), False),
    "retries": ((int,), False),
    "root_id": ((str, type(None)), False),
    "parent_id": ((str, type(None)), False),
    "group_id": ((str, type(None)), False),
    "callbacks": ((list,), False),
    "errbacks": ((list,), False),
    "headers": ((dict,), False),
    "enqueued_at": ((int, float), False),
}


def decode(body: str | bytes, max_size: int | None = None) -> Message:
    """Decode JSON text into a Message; raise DecodeError whose ``reason`` says what is wrong."""
    if max_size is not None and len(body) > max_size:
        raise DecodeError(f"message is {len(body)} bytes, over the limit of {max_size} bytes")
    try:
        data = _decoder.decode(body.decode() if isinstance(body, bytes) else body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("nested too deeply to decode") from None
    if not isinstance(data, dict):
        raise DecodeError("not a JSON object")
    version = data.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported envelope version {version!r} (expected {PROTOCOL_VERSION})")
    for name, (types, required) in _SCHEMA.items():
        if name not in data:
            if required:
                raise DecodeError(f"missing field {name!r}")
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise DecodeError(f"field {name!r} has the wrong type {type(value).__name__}")
    unknown = set(data) - set(_SCHEMA)
    if unknown:
        raise DecodeError(f"unknown fields {sorted(unknown)}")
    priority = data.get("priority", 0)
    if not TASK_MIN_PRIORITY <= priority <= TASK_MAX_PRIORITY:
        raise DecodeError(f"priority {priority} is out of range")
    return Message(**data)
