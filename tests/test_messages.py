"""The JSON envelope: round trips, and a clear reason for every bad message."""

from __future__ import annotations

import json

import pytest

from django_tasks.exceptions import DecodeError
from django_tasks.messages import Message, decode, encode


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
