"""The JSON envelope: round trips, fields of newer releases kept, a reason for every bad one."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

import pytest

from django_tasks.exceptions import DecodeError, EncodeError, MessageTooLarge
from django_tasks.messages import (
    PROTOCOL_VERSION,
    Message,
    decode,
    encode,
    new_id,
)


def test_round_trip() -> None:
    message = Message(id="1", task="a.b", args=[1, "é", None], kwargs={"k": [1.5]}, eta=10.0)
    assert decode(encode(message)) == message
    assert decode(encode(message).encode()) == message


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (
            '{"v": 99, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q"}',
            "unsupported envelope version 99",
        ),
        ('{"id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "version None"),
        ('{"v": true, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "True"),
        ('{"v": "1", "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "'1'"),
        ('{"v": 1.5, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "1.5"),
        ('{"v": 1, "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "missing field 'id'"),
        (
            '{"v": 1, "id": "1", "task": "t", "args": {}, "kwargs": {}, "queue": "q"}',
            "field 'args' has the wrong type",
        ),
        (
            '{"v": 1, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q", '
            '"retries": "2", "x": 1}',
            "field 'retries' has the wrong type str",
        ),
        (
            '{"v": 1, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q", '
            '"priority": 1000}',
            "priority 1000 is out of range",
        ),
    ],
)
def test_bad_bodies_have_a_reason(body: str | bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(body)


def test_size_limit_at_decode() -> None:
    body = encode(Message(id="1", task="t", args=["x" * 100]))
    with pytest.raises(DecodeError, match="over the limit of 50 bytes"):
        decode(body, max_size=50)


def test_pickle_is_never_involved() -> None:
    body = encode(Message(id="1", task="t"))
    assert json.loads(body)["v"] == 1


def test_new_ids_are_distinct_version_7_uuids_of_the_current_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for task_id in ids[:1000]:
        parsed = uuid.UUID(task_id)
        assert (str(parsed), parsed.version, parsed.variant) == (task_id, 7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after  # The first 48 bits: Unix milliseconds.


def test_ids_made_later_sort_after_earlier_ones() -> None:
    """Time-ordered ids: new result rows go to the end of the primary-key index."""
    earlier = new_id()
    deadline = time.monotonic() + 5
    while time.time_ns() // 1_000_000 <= uuid.UUID(earlier).int >> 80:  # The next millisecond.
        assert time.monotonic() < deadline
    later = [new_id() for _ in range(100)]
    assert all(earlier < task_id for task_id in later)


def test_defaults_are_left_out_of_the_body_and_restored() -> None:
    message = Message(id=new_id(), task="tests.testapp.tasks.add", args=[1, 2])
    body = encode(message)
    assert set(json.loads(body)) == {"v", "id", "task", "args", "kwargs", "queue", "enqueued_at"}
    assert decode(body) == message
    full = Message(id=new_id(), task="t", priority=-5, eta=1.5, expires=2.5, retries=2,
                   root_id="r", parent_id="p", group_id="g", callbacks=[{"t": 1}],
                   errbacks=[{"t": 2}], headers={"h": 1})  # fmt: skip
    assert decode(encode(full)) == full


#: Message attributes that are not envelope fields.
LOCAL = ("extra", "eta_from_countdown")
#: A value of each JSON type, to give every field one it does not accept.
JSON_VALUES: list[Any] = [None, True, 1, 1.5, "x", [], {}]


def accepted_types(name: str) -> set[str]:
    """The JSON types decode() accepts in the field ``name``."""
    accepted = set()
    for value in JSON_VALUES:
        body = {"v": 1, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q", name: value}
        try:
            decode(json.dumps(body))
        except DecodeError as exc:
            assert exc.reason == f"field {name!r} has the wrong type {type(value).__name__}"
        else:
            accepted.add(type(value).__name__)
    return accepted


def test_every_field_is_checked_against_its_declared_type() -> None:
    """decode() takes the types from the Message dataclass: no second table to forget."""
    names = [f.name for f in dataclasses.fields(Message)]
    accepted = {name: accepted_types(name) for name in names if name not in LOCAL}
    assert accepted == {
        "id": {"str"},
        "task": {"str"},
        "args": {"list"},
        "kwargs": {"dict"},
        "queue": {"str"},
        "priority": {"int"},
        "eta": {"NoneType", "int", "float"},
        "expires": {"NoneType", "int", "float"},
        "retries": {"int"},
        "root_id": {"NoneType", "str"},
        "parent_id": {"NoneType", "str"},
        "group_id": {"NoneType", "str"},
        "callbacks": {"list"},
        "errbacks": {"list"},
        "headers": {"dict"},
        "enqueued_at": {"int", "float"},
    }


def newer_body(**fields: Any) -> str:
    """The body a producer of a later release of this major version might send."""
    data = json.loads(encode(Message(id=new_id(), task="a.b", args=[1], retries=1)))
    return json.dumps({**data, **fields})


def test_fields_of_a_newer_release_are_accepted_and_kept() -> None:
    body = newer_body(workflow={"step": 2, "of": 3}, trace="abc")
    message = decode(body)
    assert (message.task, message.args, message.retries) == ("a.b", [1], 1)
    assert message.extra == {"workflow": {"step": 2, "of": 3}, "trace": "abc"}
    again = json.loads(encode(message))
    assert again == json.loads(body)
    # A retry is the same message with a few fields changed: the unknown ones go along.
    retry = dataclasses.replace(message, retries=2, eta=1.5)
    assert json.loads(encode(retry)) == {**json.loads(body), "retries": 2, "eta": 1.5}


def test_unknown_fields_never_stand_in_for_known_ones() -> None:
    """extra holds names that are not fields: set by hand, such a name is not written."""
    message = Message(id="1", task="t", extra={"priority": 50, "v": 2, "task": "x", "new": 1})
    data = json.loads(encode(message))
    assert (data["v"], data["task"], data["new"]) == (PROTOCOL_VERSION, "t", 1)
    assert "priority" not in data
    assert decode(encode(message)) == Message(
        id="1", task="t", enqueued_at=message.enqueued_at, extra={"new": 1}
    )


def test_a_wrong_type_is_refused_even_among_unknown_fields() -> None:
    with pytest.raises(DecodeError, match="field 'priority' has the wrong type str"):
        decode(newer_body(workflow={}, priority="high"))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Message(id=new_id(), task="t", args=[object()]), EncodeError),
        (Message(id=new_id(), task="t", kwargs={"x": float("nan")}), EncodeError),
        (Message(id=new_id(), task="t", extra={"x": object()}), EncodeError),
        (Message(id=new_id(), task="t", args=["x" * 200]), MessageTooLarge),
        (Message(id=new_id(), task="t", args=["é" * 60]), MessageTooLarge),  # 120 bytes
    ],
)
def test_encode_refuses_what_json_or_the_size_limit_cannot_take(
    message: Message, error: type
) -> None:
    with pytest.raises(error):
        encode(message, max_size=100)
