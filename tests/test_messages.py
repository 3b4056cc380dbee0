"""The JSON envelope: round trips, and a clear reason for every bad message."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from django_tasks.exceptions import DecodeError, EncodeError, MessageTooLarge
from django_tasks.messages import EnvelopeTemplate, Message, decode, encode, new_id


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


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([], {}),
        ([1, "é", None, 2.5, True, -7], {}),
        ([], {"k": [1.5], "quote": '"\\', "line": "a\nb"}),
        ([{"nested": [1, {"x": None}]}, []], {"a": {}}),
    ],
)
@pytest.mark.parametrize(
    ("task", "queue", "priority"),
    [("a.b", "default", 0), ('odd "name"\\é', 'hi"pri', -100), ("t", "q", 7)],
)
def test_a_template_encodes_a_plain_call_as_encode_does(
    args: list, kwargs: dict, task: str, queue: str, priority: int
) -> None:
    message = Message(
        id=new_id(), task=task, args=args, kwargs=kwargs, queue=queue, priority=priority
    )
    body = EnvelopeTemplate(task, queue, priority, None).encode(message)
    assert body == encode(message)
    assert decode(body) == message


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Message(id=new_id(), task="t", args=[object()]), EncodeError),
        (Message(id=new_id(), task="t", kwargs={"x": float("nan")}), EncodeError),
        (Message(id=new_id(), task="t", args=["x" * 200]), MessageTooLarge),
        (Message(id=new_id(), task="t", args=["é" * 60]), MessageTooLarge),  # 120 bytes
    ],
)
def test_a_template_refuses_what_encode_refuses(message: Message, error: type) -> None:
    with pytest.raises(error) as expected:
        encode(message, max_size=100)
    with pytest.raises(error) as refused:
        EnvelopeTemplate("t", "default", 0, 100).encode(message)
    assert str(refused.value) == str(expected.value)
