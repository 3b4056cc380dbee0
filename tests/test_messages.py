"""The JSON envelope: round trips, and a clear reason for every bad message."""

from __future__ import annotations

import json
import uuid

import pytest

from django_tasks.exceptions import DecodeError
from django_tasks.messages import Message, decode, encode, new_id


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
        ('{"v": 1, "task": "t", "args": [], "kwargs": {}, "queue": "q"}', "missing field 'id'"),
        (
            '{"v": 1, "id": "1", "task": "t", "args": {}, "kwargs": {}, "queue": "q"}',
            "field 'args' has the wrong type",
        ),
        (
            '{"v": 1, "id": "1", "task": "t", "args": [], "kwargs": {}, "queue": "q", "x": 1}',
            "unknown fields",
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


def test_new_ids_are_distinct_version_4_uuids() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for task_id in ids[:1000]:
        parsed = uuid.UUID(task_id)
        assert (str(parsed), parsed.version, parsed.variant) == (task_id, 4, uuid.RFC_4122)


def test_defaults_are_left_out_of_the_body_and_restored() -> None:
    message = Message(id=new_id(), task="tests.testapp.tasks.add", args=[1, 2])
    body = encode(message)
    assert set(json.loads(body)) == {"v", "id", "task", "args", "kwargs", "queue", "enqueued_at"}
    assert decode(body) == message
    full = Message(id=new_id(), task="t", priority=-5, eta=1.5, expires=2.5, retries=2,
                   root_id="r", parent_id="p", group_id="g", callbacks=[{"t": 1}],
                   errbacks=[{"t": 2}], headers={"h": 1})  # fmt: skip
    assert decode(encode(full)) == full
