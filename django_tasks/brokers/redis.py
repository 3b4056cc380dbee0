"""The Redis broker: queues kept in Redis, moved by Lua scripts, consumers woken by BLPOP.

The layout of the keys is described in redis_keys.py. Every operation that changes a queue is one
Lua script touching the keys of that queue only (one hash slot), so it is atomic and costs one
round trip. Lease deadlines and due times are compared with the Redis server clock (TIME), never a
client's, so consumers on hosts with skewed clocks agree on when a lease has expired.

Redis round trips are the cost model of this module: each public method makes one (consume makes
one per queue it looks at, plus one blocking BLPOP when there is nothing to do).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.commands.core import Script
from redis.retry import Retry

from ..conf import BackendConfig
from ..exceptions import BrokerConnectionError, BrokerError, DecodeError
from ..messages import Message, decode, encode
from .base import Broker, Delivery, Outgoing, PollingWaiter, ResultWaiter
from .redis_keys import QueueKeys, queue_keys, results_channel

logger = logging.getLogger("django_tasks.brokers.redis")

#: The longest a consumer blocks in BLPOP before looking at its queues again: expired leases of
#: dead workers and due delayed messages are noticed at the latest after this long.
MAX_BLOCK = 1.0
#: Expired leases and due delayed messages moved back to ready per queue and consume call. The
#: bound keeps each script short (Redis runs nothing else meanwhile); a backlog drains over a few
#: calls, and calls are frequent whenever messages are ready.
MOVE_LIMIT = 100
#: Messages deleted per purge script, for the same reason.
PURGE_CHUNK = 5000
#: The most messages one consume call leases (the scripts unpack() them: Lua caps that at 8000).
CLAIM_LIMIT = 1000

P = ParamSpec("P")
R = TypeVar("R")

# Lua helpers shared by the scripts; each script includes them where it says --@helpers.
_LUA_HELPERS = """
local PRIORITY_STEP = 17592186044416 -- 2^44: room for 2^44 sequence numbers per priority
local CHUNK = 2000 -- arguments per variadic call, far below Lua's unpack() limit

-- The server clock in milliseconds.
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Higher priority first, then publish order. At most 200 * 2^44 + 2^44 < 2^53: an exact double.
local function ready_score(priority, seq)
  return (100 - priority) * PRIORITY_STEP + seq
end

-- The priority written in an encoded message; 0 when the body is not a JSON envelope (the
-- consumer dead-letters it anyway).
local function priority_of(body)
  local ok, data = pcall(cjson.decode, body)
  if not ok or type(data) ~= 'table' then return 0 end
  local priority = data['priority']
  if type(priority) ~= 'number' or priority ~= priority then return 0 end
  return math.max(-100, math.min(100, math.floor(priority)))
end

-- Run a variadic command over items in slices; option (e.g. 'XX') goes before the items.
local function call_chunked(command, key, items, option)
  for first = 1, #items, CHUNK do
    local last = math.min(first + CHUNK - 1, #items)
    if option then
      redis.call(command, key, option, unpack(items, first, last))
    else
      redis.call(command, key, unpack(items, first, last))
    end
  end
end

-- Leave one wake-up token for a blocked consumer; the list never holds more than one.
local function wake(signal)
  if redis.call('LLEN', signal) == 0 then redis.call('RPUSH', signal, 1) end
end
"""

_LUA_KEYS = """\
-- KEYS[1] msgs  KEYS[2] ready  KEYS[3] delayed  KEYS[4] leases  KEYS[5] deliveries
-- KEYS[6] signal  KEYS[7] seq  (one queue; see redis_keys.py)
"""

ENQUEUE_LUA = (
    """\
-- enqueue: store messages in one queue, ready at once or delayed until their eta.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1]   the id of a leased message to remove first (requeue), or "" to remove none
-- ARGV[2..] four per message, in publish order: id, body, priority, eta in ms or ""
-- Returns the number of messages stored.
--@helpers
local drop = ARGV[1]
if drop ~= '' then
  redis.call('ZREM', KEYS[4], drop)
  redis.call('HDEL', KEYS[5], drop) -- a new attempt starts counting deliveries again
  redis.call('HDEL', KEYS[1], drop)
end
local n = (#ARGV - 1) / 4
-- One INCRBY reserves a sequence number per message (gaps left by delayed ones are harmless).
local seq = redis.call('INCRBY', KEYS[7], n) - n
local now = nil
local bodies, ready, delayed, delayed_ids = {}, {}, {}, {}
for i = 2, #ARGV, 4 do
  local id, eta = ARGV[i], ARGV[i + 3]
  seq = seq + 1
  bodies[#bodies + 1] = id
  bodies[#bodies + 1] = ARGV[i + 1]
  if eta ~= '' then now = now or server_ms() end
  if eta ~= '' and tonumber(eta) > now then
    delayed[#delayed + 1] = eta
    delayed[#delayed + 1] = id
    delayed_ids[id] = true
  else
    ready[#ready + 1] = ready_score(tonumber(ARGV[i + 2]), seq)
    ready[#ready + 1] = id
  end
end
call_chunked('HSET', KEYS[1], bodies)
call_chunked('ZADD', KEYS[2], ready)
call_chunked('ZADD', KEYS[3], delayed)
if #ready > 0 then
  wake(KEYS[6])
elseif #delayed > 0 then
  -- A new earliest delayed message: wake a blocked consumer so that it sleeps less.
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if delayed_ids[head] then wake(KEYS[6]) end
end
return n
"""
)

CLAIM_LUA = (
    """\
-- claim: lease up to ARGV[1] messages of one queue to the caller.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] count  ARGV[2] lease duration in ms  ARGV[3] most due messages to move per source
-- Returns {now in ms, earliest delayed eta in ms or -1, then per message: id, body, deliveries}.
-- The earliest eta is only looked up when nothing was claimed: the caller then sleeps until it.
--@helpers
local count, lease_ms, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = server_ms()

-- Move the members of a sorted set whose score (eta or lease deadline) has passed into ready.
local function move_due(source)
  local ids = redis.call('ZRANGEBYSCORE', source, '-inf', now, 'LIMIT', 0, limit)
  if #ids == 0 then return end
  redis.call('ZREM', source, unpack(ids))
  local bodies = redis.call('HMGET', KEYS[1], unpack(ids))
  local seq = redis.call('INCRBY', KEYS[7], #ids) - #ids
  local entries = {}
  for i, id in ipairs(ids) do
    if bodies[i] then -- no body: the message was deleted meanwhile; drop the stray id
      entries[#entries + 1] = ready_score(priority_of(bodies[i]), seq + i)
      entries[#entries + 1] = id
    end
  end
  if #entries > 0 then redis.call('ZADD', KEYS[2], unpack(entries)) end
end

move_due(KEYS[3])
move_due(KEYS[4])

local popped = redis.call('ZPOPMIN', KEYS[2], count)
local result = {now, -1}
if #popped > 0 then
  local ids = {}
  for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
  local bodies = redis.call('HMGET', KEYS[1], unpack(ids))
  local leases = {}
  for i, id in ipairs(ids) do
    if bodies[i] then
      leases[#leases + 1] = now + lease_ms
      leases[#leases + 1] = id
      result[#result + 1] = id
      result[#result + 1] = bodies[i]
      result[#result + 1] = redis.call('HINCRBY', KEYS[5], id, 1)
    end
  end
  if #leases > 0 then redis.call('ZADD', KEYS[4], unpack(leases)) end
end
-- Keep a token exactly while messages are ready: another idle consumer wakes for what is left
-- (chain wake-up), and no stale token wakes anybody for nothing.
if #popped / 2 == count and redis.call('ZCARD', KEYS[2]) > 0 then
  wake(KEYS[6])
else
  redis.call('DEL', KEYS[6])
end
if #result == 2 then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if head[2] then result[2] = tonumber(head[2]) end
end
return result
"""
)

RELEASE_LUA = (
    """\
-- release: end leases at once; the messages are ready again and keep their delivery counts.
"""
    + _LUA_KEYS
    + """\
-- ARGV two per message: id, priority
-- Returns the number of messages released (ids no longer leased are left alone).
--@helpers
local n = #ARGV / 2
local seq = redis.call('INCRBY', KEYS[7], n) - n
local entries = {}
for i = 1, #ARGV, 2 do
  seq = seq + 1
  if redis.call('ZREM', KEYS[4], ARGV[i]) == 1 then
    entries[#entries + 1] = ready_score(tonumber(ARGV[i + 1]), seq)
    entries[#entries + 1] = ARGV[i]
  end
end
if #entries > 0 then
  call_chunked('ZADD', KEYS[2], entries)
  wake(KEYS[6])
end
return #entries / 2
"""
)

EXTEND_LUA = (
    """\
-- extend: move the lease deadlines of messages still leased to now + ARGV[1] ms.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] lease duration in ms  ARGV[2..] ids
-- XX: an id acked meanwhile is not leased again.
--@helpers
local deadline = server_ms() + tonumber(ARGV[1])
local entries = {}
for i = 2, #ARGV do
  entries[#entries + 1] = deadline
  entries[#entries + 1] = ARGV[i]
end
call_chunked('ZADD', KEYS[4], entries, 'XX')
return #ARGV - 1
"""
)

PURGE_LUA = (
    """\
-- purge: delete up to ARGV[1] messages waiting in ready or delayed; leased ones are kept.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] the most messages to delete
-- Returns how many were deleted; fewer than ARGV[1] means none is left.
--@helpers
local limit = tonumber(ARGV[1])
local deleted = 0
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  if deleted < limit then
    local ids = redis.call('ZRANGE', key, 0, limit - deleted - 1)
    if #ids > 0 then
      redis.call('ZREMRANGEBYRANK', key, 0, #ids - 1)
      call_chunked('HDEL', KEYS[1], ids)
      call_chunked('HDEL', KEYS[5], ids)
      deleted = deleted + #ids
    end
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[6]) end
return deleted
"""
)

REMOVE_LUA = (
    """\
-- remove: delete one message waiting in ready or delayed; a leased one is kept.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] the task id
-- Returns 1 if the message was deleted, 0 if it is leased or not in this queue.
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[4], id) then return 0 end
if redis.call('ZREM', KEYS[2], id) + redis.call('ZREM', KEYS[3], id) == 0 then return 0 end
redis.call('HDEL', KEYS[1], id)
redis.call('HDEL', KEYS[5], id)
return 1
"""
)

WAKE_LUA = (
    """\
-- wake: leave a wake-up token for a blocked consumer of one queue.
"""
    + _LUA_KEYS
    + """\
-- ARGV none
--@helpers
wake(KEYS[6])
return 1
"""
)


def _lua(source: str) -> str:
    return source.replace("--@helpers\n", _LUA_HELPERS, 1)


def _source(script: Script) -> str:
    """The Lua text of a script registered by _Scripts (always a str)."""
    return cast(str, script.script)


class _Scripts:
    """The Lua scripts, registered with one client (EVALSHA, loaded again on NOSCRIPT)."""

    def __init__(self, client: redis.Redis) -> None:
        self.enqueue = client.register_script(_lua(ENQUEUE_LUA))
        self.claim = client.register_script(_lua(CLAIM_LUA))
        self.release = client.register_script(_lua(RELEASE_LUA))
        self.extend = client.register_script(_lua(EXTEND_LUA))
        self.purge = client.register_script(_lua(PURGE_LUA))
        self.remove = client.register_script(_lua(REMOVE_LUA))
        self.wake = client.register_script(_lua(WAKE_LUA))


def _translate_errors(
    action: str,
) -> Callable[[Callable[Concatenate[RedisBroker, P], R]], Callable[Concatenate[RedisBroker, P], R]]:
    """Turn redis-py's exceptions into BrokerConnectionError / BrokerError naming the broker."""

    def decorator(
        method: Callable[Concatenate[RedisBroker, P], R],
    ) -> Callable[Concatenate[RedisBroker, P], R]:
        @functools.wraps(method)
        def wrapper(self: RedisBroker, *args: P.args, **kwargs: P.kwargs) -> R:
            with self._errors(action):
                return method(self, *args, **kwargs)

        return wrapper

    return decorator


class RedisBroker(Broker):
    """A broker keeping its queues in Redis (BROKER_URL ``redis://``, ``rediss://``, ``unix://``).

    The client is made on first use and shared by the threads of the process (redis-py's
    connection pool is thread-safe). REDIS_OPTIONS are passed to ``redis.Redis.from_url()`` and
    override the defaults of ``client_options()``.
    """

    transactional = False

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        # The client and its scripts, made together on first use (None after close()).
        self._connection: tuple[redis.Redis, _Scripts] | None = None
        self._keys: dict[str, QueueKeys] = {}
        self._lease_ms = math.ceil(config.lease_seconds * 1000)
        # A BLPOP must end on the server before the client's socket timeout fires, even when
        # REDIS_OPTIONS sets a short one.
        socket_timeout = self.client_options().get("socket_timeout") or math.inf
        self._block_cap = min(MAX_BLOCK, socket_timeout / 2)

    # Connection.

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments of ``redis.Redis.from_url()``."""
        options: dict[str, Any] = {
            "socket_connect_timeout": self.config.connect_timeout,
            # Longer than the longest BLPOP by connect_timeout: a server that accepted the
            # connection but stays silent fails the call about as fast as one that is down.
            "socket_timeout": self.config.connect_timeout + MAX_BLOCK,
            "health_check_interval": 30,
            # One immediate retry on a dropped connection (e.g. a pooled socket that Redis
            # closed), none on a timeout: a server that does not answer fails the call within
            # connect_timeout instead of after redis-py's default ten retries with backoff.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
        options.update(self.config.redis_options)
        # Bodies are read as bytes and decoded by messages.decode(), which checks their size.
        options["decode_responses"] = False
        return options

    def _connect(self) -> tuple[redis.Redis, _Scripts]:
        connection = self._connection
        if connection is None:
            with self._lock:
                connection = self._connection
                if connection is None:
                    assert self.config.broker_url is not None
                    client = redis.Redis.from_url(self.config.broker_url, **self.client_options())
                    connection = self._connection = (client, _Scripts(client))
        return connection

    @property
    def client(self) -> redis.Redis:
        """The redis-py client, made on first use (and again after close())."""
        return self._connect()[0]

    @property
    def scripts(self) -> _Scripts:
        """The Lua scripts, registered with the client."""
        return self._connect()[1]

    def close(self) -> None:
        """Close the connections. The broker connects again when it is next used."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection[0].close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerConnectionError(
                f"Could not {action}: the Redis broker at {self.config.safe_broker_url()} cannot "
                f"be reached ({self._scrub(exc)})."
            ) from exc
        except redis.RedisError as exc:
            raise BrokerError(
                f"Could not {action} on the Redis broker at {self.config.safe_broker_url()}: "
                f"{self._scrub(exc)}"
            ) from exc

    def _scrub(self, exc: BaseException) -> str:
        """The text of exc, with the URL's password masked should redis-py ever include it."""
        text = str(exc) or type(exc).__name__
        password = urlsplit(self.config.broker_url or "").password
        return text.replace(password, "***") if password else text

    def keys(self, queue: str) -> QueueKeys:
        """The Redis keys of ``queue``."""
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = queue_keys(self.config.key_prefix, queue)
        return keys

    # Running scripts.

    def _run(self, script: Script, queue: str, args: Sequence[Any]) -> Any:
        """Run ``script`` on the keys of ``queue``: one round trip."""
        return script(keys=self.keys(queue), args=args, client=self.client)

    def _run_per_queue(self, script: Script, calls: dict[str, list[Any]]) -> list[Any]:
        """Run ``script`` once per queue in one round trip, as one MULTI/EXEC transaction.

        Inside the pipeline the scripts are sent with EVAL (their text) rather than EVALSHA: a
        NOSCRIPT error inside a transaction would leave it half applied.
        """
        if len(calls) == 1:
            [(queue, args)] = calls.items()
            return [self._run(script, queue, args)]
        pipe = self.client.pipeline(transaction=True)
        for queue, args in calls.items():
            keys = self.keys(queue)
            pipe.eval(_source(script), len(keys), *keys, *args)
        return pipe.execute()

    # Publishing.

    @_translate_errors("send messages")
    def send(self, batch: Sequence[Outgoing]) -> None:
        """Store the messages: one script per queue, in one round trip for the whole batch."""
        calls: dict[str, list[Any]] = {}
        for message, body in batch:
            calls.setdefault(message.queue, [""]).extend(_enqueue_args(message, body, message.eta))
        if calls:
            self._run_per_queue(self.scripts.enqueue, calls)

    # Consuming.

    @_translate_errors("consume messages")
    def consume(self, queues: Sequence[str], count: int, timeout: float) -> list[Delivery]:
        """Lease up to ``count`` messages, blocking up to ``timeout`` seconds for the first.

        At most CLAIM_LIMIT messages are leased per call.
        """
        if count <= 0 or not queues:
            return []
        count = min(count, CLAIM_LIMIT)
        deadline = time.monotonic() + max(0.0, timeout)
        woken: str | None = None
        while True:
            deliveries, pause = self._claim(queues, count, woken)
            remaining = deadline - time.monotonic()
            if deliveries or remaining <= 0:
                return deliveries
            woken = self._block(queues, min(remaining, pause, self._block_cap))

    def _claim(
        self, queues: Sequence[str], count: int, woken: str | None
    ) -> tuple[list[Delivery], float]:
        """Claim from the queues in order until ``count`` messages are leased.

        Returns the deliveries, and how long the caller may sleep when there are none: until the
        earliest delayed message is due. ``woken`` is the queue whose wake-up token this consumer
        took; when the claim stops before that queue, the token is passed on.
        """
        deliveries: list[Delivery] = []
        pause = math.inf
        visited: set[str] = set()
        for queue in queues:
            if len(deliveries) >= count:
                break
            visited.add(queue)
            reply = self._run(
                self.scripts.claim, queue, [count - len(deliveries), self._lease_ms, MOVE_LIMIT]
            )
            now, next_due = int(reply[0]), int(reply[1])
            for i in range(2, len(reply), 3):
                deliveries.append(self._delivery(queue, reply[i], reply[i + 1], int(reply[i + 2])))
            if next_due >= 0:
                pause = min(pause, max(0.0, (next_due - now) / 1000))
        if woken is not None and woken not in visited:
            self._run(self.scripts.wake, woken, [])
        return deliveries, pause

    def _block(self, queues: Sequence[str], seconds: float) -> str | None:
        """Wait for a wake-up token of one of the queues; return that queue, or None.

        BLPOP on keys of several hash slots works on a single Redis; on Redis Cluster the queues
        one worker consumes must share a hash tag (see redis_keys.py).
        """
        signals = {self.keys(queue).signal: queue for queue in queues}
        # Whole milliseconds, and never 0, which would mean "block forever".
        popped = self.client.blpop(list(signals), timeout=max(0.001, round(seconds, 3)))
        if popped is None:
            return None
        key = popped[0].decode() if isinstance(popped[0], bytes) else popped[0]
        return signals.get(key)

    def _delivery(self, queue: str, tag: bytes, body: bytes, count: int) -> Delivery:
        """A Delivery; an undecodable body comes with its error, for the caller to dead-letter."""
        text = body.decode("utf-8", errors="replace")
        try:
            message = decode(body, self.config.max_message_size)
        except DecodeError as exc:
            return Delivery(
                tag=tag.decode(),
                queue=queue,
                body=text,
                message=None,
                error=exc.reason,
                delivery_count=count,
            )
        return Delivery(
            tag=tag.decode(), queue=queue, body=text, message=message, delivery_count=count
        )

    # Ending and renewing leases.

    @_translate_errors("acknowledge messages")
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages and their leases: one MULTI/EXEC round trip for the batch."""
        if not deliveries:
            return
        pipe = self.client.pipeline(transaction=True)
        for queue, tags in _tags_by_queue(deliveries).items():
            keys = self.keys(queue)
            pipe.zrem(keys.leases, *tags)
            pipe.hdel(keys.msgs, *tags)
            pipe.hdel(keys.deliveries, *tags)
        pipe.execute()

    @_translate_errors("requeue a message")
    def requeue(self, delivery: Delivery, message: Message, eta: float | None = None) -> None:
        """Replace the leased delivery by ``message``, due at ``eta`` or at once."""
        # Not size-checked: a retry refused here would come back forever with its expired lease;
        # an oversize body is dead-lettered at consume instead.
        args = _enqueue_args(message, encode(message), eta)
        if message.queue == delivery.queue:
            self._run(self.scripts.enqueue, delivery.queue, [delivery.tag, *args])
            return
        # A move to another queue spans two hash slots: drop and enqueue in one transaction.
        old = self.keys(delivery.queue)
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(old.leases, delivery.tag)
        pipe.hdel(old.msgs, delivery.tag)
        pipe.hdel(old.deliveries, delivery.tag)
        new = self.keys(message.queue)
        pipe.eval(_source(self.scripts.enqueue), len(new), *new, "", *args)
        pipe.execute()

    @_translate_errors("release messages")
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make the messages ready again at once; they keep their delivery counts.

        They go behind the messages of the same priority that are already waiting.
        """
        calls: dict[str, list[Any]] = {}
        for delivery in deliveries:
            priority = delivery.message.priority if delivery.message else 0
            calls.setdefault(delivery.queue, []).extend((delivery.tag, priority))
        if calls:
            self._run_per_queue(self.scripts.release, calls)

    @_translate_errors("extend leases")
    def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Renew the leases still held for another ``lease_seconds`` (Redis server time)."""
        calls = {
            queue: [self._lease_ms, *tags] for queue, tags in _tags_by_queue(deliveries).items()
        }
        if calls:
            self._run_per_queue(self.scripts.extend, calls)

    # Inspecting.

    @_translate_errors("count messages")
    def queue_lengths(self, queues: Sequence[str]) -> dict[str, int]:
        """Ready, delayed and leased messages per queue, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            keys = self.keys(queue)
            pipe.zcard(keys.ready)
            pipe.zcard(keys.delayed)
            pipe.zcard(keys.leases)
        counts = pipe.execute()
        return {queue: sum(counts[3 * i : 3 * i + 3]) for i, queue in enumerate(queues)}

    @_translate_errors("purge a queue")
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many.

        Each script deletes at most PURGE_CHUNK messages, so that a long queue does not stall
        Redis; a message published meanwhile may be deleted too, as if it came before the purge.
        """
        total = 0
        while True:
            deleted = int(self._run(self.scripts.purge, queue, [PURGE_CHUNK]))
            total += deleted
            if deleted < PURGE_CHUNK:
                return total

    @_translate_errors("find a message")
    def find(self, task_id: str, queues: Sequence[str]) -> Message | None:
        """The waiting, delayed or leased message of ``task_id``; None if absent or unreadable."""
        if not queues:
            return None
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.hget(self.keys(queue).msgs, task_id)
        for body in pipe.execute():
            if body is not None:
                try:
                    return decode(body, self.config.max_message_size)
                except DecodeError:
                    return None
        return None

    @_translate_errors("remove a message")
    def remove(self, task_id: str, queues: Sequence[str]) -> bool:
        """Delete the waiting or delayed message of ``task_id``; a leased one is kept.

        One script per queue, all in one round trip.
        """
        calls = {queue: [task_id] for queue in dict.fromkeys(queues)}
        if not calls:
            return False
        return any(int(removed) for removed in self._run_per_queue(self.scripts.remove, calls))

    # Result notifications.

    @_translate_errors("announce results")
    def notify_results(self, task_ids: Sequence[str]) -> None:
        """Publish the ids of stored results to waiting callers: one PUBLISH."""
        if task_ids:
            self.client.publish(results_channel(self.config.key_prefix), json.dumps(list(task_ids)))

    def result_waiter(self, task_id: str) -> ResultWaiter:
        """A waiter subscribed to the result notifications, woken when ``task_id`` is listed."""
        return RedisResultWaiter(self, task_id)


class RedisResultWaiter(ResultWaiter):
    """Waits for a PUBLISH naming one task id on the results channel.

    The subscription is confirmed by Redis before the constructor returns, so a notification
    sent after the caller's next read of the result store is never missed. When Redis cannot be
    reached, the waiter falls back to polling: results live in the database, and the caller
    re-reads them after every wait.
    """

    def __init__(self, broker: RedisBroker, task_id: str) -> None:
        self.task_id = task_id
        self._broker = broker
        self._pubsub: PubSub | None = None
        self._fallback: PollingWaiter | None = None
        try:
            self._pubsub = broker.client.pubsub()
            self._pubsub.subscribe(results_channel(broker.config.key_prefix))
            self._confirm(broker.config.connect_timeout)
        except redis.RedisError as exc:
            self._fall_back(exc)

    def _confirm(self, timeout: float) -> None:
        """Read the reply to SUBSCRIBE, proof that Redis registered the subscription."""
        assert self._pubsub is not None
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            reply = self._pubsub.get_message(timeout=remaining)
            if reply is not None and reply["type"] == "subscribe":
                return
        raise redis.TimeoutError("Redis did not confirm the subscription")

    def _fall_back(self, exc: BaseException) -> None:
        logger.warning(
            "Cannot subscribe to result notifications at %s (%s); polling the result store.",
            self._broker.config.safe_broker_url(),
            self._broker._scrub(exc),
        )
        self.close()
        self._fallback = PollingWaiter()

    def wait(self, timeout: float) -> None:
        """Return when a notification lists this task id, or after ``timeout`` seconds."""
        if self._fallback is not None or self._pubsub is None:
            return (self._fallback or PollingWaiter()).wait(timeout)
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                reply = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
                if reply is not None and self.task_id in _notified_ids(reply["data"]):
                    return
        except redis.RedisError as exc:
            self._fall_back(exc)

    def close(self) -> None:
        """Drop the subscription: the connection is closed, which ends it on the server."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            pubsub.close()


def _enqueue_args(
    message: Message, body: str, eta: float | None
) -> tuple[str, str, int, int | str]:
    """The four arguments of the enqueue script for one message, due at ``eta`` (Unix time)."""
    # Rounded up: a message is never due before its eta, even by a fraction of a millisecond.
    eta_ms: int | str = "" if eta is None else math.ceil(eta * 1000)
    return message.id, body, message.priority, eta_ms


def _tags_by_queue(deliveries: Iterable[Delivery]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.queue, []).append(delivery.tag)
    return grouped


def _notified_ids(data: Any) -> list[str]:
    """The ids listed in a notification; none if it is malformed."""
    try:
        ids = json.loads(data)
    except (TypeError, ValueError):
        return []
    return ids if isinstance(ids, list) else []
