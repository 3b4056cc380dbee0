"""The message envelope, declared once as the Message dataclass, and its JSON codec.

A message is what a broker carries: JSON text, never pickle. Message's fields are the envelope's
fields; encode() and decode() read their names, types and defaults from the dataclass, so a new
field is declared in one place.

Versions: ``"v"`` is the envelope's major version, an integer (1). Within a major version the
envelope only grows: a release may add optional fields (with a default meaning what older
releases did), and a worker accepts messages carrying fields it does not know. It ignores them
but keeps them (``Message.extra``), so a message it sends again, a retry, still carries them:
producers and workers of two consecutive releases run side by side during a deploy. A change
that an older worker would misread (a field removed, renamed, made required, or given another
meaning or type) takes a new major version; a worker dead-letters any major version but its
own, with the reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, dataclass, field, fields
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from django.tasks.base import TASK_MAX_PRIORITY, TASK_MIN_PRIORITY

from .exceptions import DecodeError, EncodeError, MessageTooLarge

#: The envelope's major version (see above).
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


#: Field metadata: a field every envelope carries, even at its default.
_REQUIRED = {"required": True}
#: Field metadata: an attribute of the Message that is not an envelope field (never encoded).
_LOCAL = {"local": True}


@dataclass(slots=True, kw_only=True)
class Message:
    """One request to run a task: the envelope. Times are Unix timestamps (seconds, UTC).

    Each field is an envelope field of that name, of the type declared; the codec below reads
    both from here.
    """

    id: str
    task: str
    args: list[Any] = field(default_factory=list, metadata=_REQUIRED)
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_REQUIRED)
    queue: str = field(default="default", metadata=_REQUIRED)
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
    #: The fields of a newer release of the same major version that this one does not know:
    #: ignored here, and written back by encode(), so a retry carries them on.
    extra: dict[str, Any] = field(default_factory=dict, metadata=_LOCAL)
    #: Whether ``eta`` was worked out by the sender as its own time plus a ``countdown``. A
    #: broker with a clock of its own counts that delay on it instead, ``eta - time.time()``
    #: from when it stores the message (see the database broker). An ``eta`` given as a point
    #: in time stays that point.
    eta_from_countdown: bool = field(default=False, compare=False, repr=False, metadata=_LOCAL)

    def to_dict(self) -> dict[str, Any]:
        """The envelope; fields at their default are left out unless required (see decode()).

        A short body is quicker to encode and send, and a waiting message takes less memory.
        Every optional field defaults to 0, None or an empty container.
        """
        data: dict[str, Any] = {"v": PROTOCOL_VERSION}
        for name, required in _WRITTEN:
            value = getattr(self, name)
            if value or required:
                data[name] = value
        for name, value in self.extra.items():
            if name not in data and name not in _FIELDS:  # Never in place of a known field.
                data[name] = value
        return data


@dataclass(frozen=True, slots=True)
class _Spec:
    """What decode() checks of one envelope field."""

    types: tuple[type, ...]
    required: bool


def _types(hint: Any) -> tuple[type, ...]:
    """The JSON value types a field of type ``hint`` accepts: a float field takes an int too.

    Exact types (the JSON decoder makes no subclasses): an int field does not take true.
    """
    if get_origin(hint) in (UnionType, Union):
        return tuple(kind for part in get_args(hint) for kind in _types(part))
    if hint is None or hint is type(None):
        return (type(None),)
    if hint is float:
        return (int, float)
    kind = get_origin(hint) or hint
    if kind not in (str, int, bool, list, dict):
        raise TypeError(f"an envelope field cannot be of type {hint!r}")
    return (kind,)


def _specs() -> dict[str, _Spec]:
    """The envelope fields, from the Message dataclass, in the order they are written."""
    hints = get_type_hints(Message)
    return {
        f.name: _Spec(
            _types(hints[f.name]),
            f.metadata.get("required", False)
            or (f.default is MISSING and f.default_factory is MISSING),
        )
        for f in fields(Message)
        if not f.metadata.get("local")
    }


_FIELDS = _specs()
#: to_dict()'s loop: each field's name and whether it is written at its default.
_WRITTEN = tuple((name, spec.required) for name, spec in _FIELDS.items())


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
    if type(version) is not int or version != PROTOCOL_VERSION:  # Not True, nor 1.0.
        raise DecodeError(
            f"unsupported envelope version {version!r}: this worker reads version "
            f"{PROTOCOL_VERSION} (a message of another major version needs a worker of a "
            "release that reads it)"
        )
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in data.items():
        spec = _FIELDS.get(name)
        if spec is None:
            extra[name] = value
        elif type(value) not in spec.types:
            raise DecodeError(f"field {name!r} has the wrong type {type(value).__name__}")
        else:
            known[name] = value
    for name, spec in _FIELDS.items():
        if spec.required and name not in known:
            raise DecodeError(f"missing field {name!r}")
    priority = known.get("priority", 0)
    if not TASK_MIN_PRIORITY <= priority <= TASK_MAX_PRIORITY:
        raise DecodeError(f"priority {priority} is out of range")
    return Message(**known, extra=extra)
