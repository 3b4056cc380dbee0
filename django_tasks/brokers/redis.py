"""The Redis broker: queues kept in Redis, moved by Lua scripts, consumers woken by BLPOP.

The layout of the keys is described in redis_keys.py. Every operation that changes a queue is one
Lua script touching the keys of that queue only (one hash slot), so it is atomic and costs one
round trip; sending is the enqueue script too, the one entrance to a queue. Idle consumers block
in BLPOP on the queue's wake list, which never holds a message: a script that makes messages
ready pushes one wake-up token to it, only when it is empty. BLPOP hands the token to one blocked
consumer only: one send wakes one consumer, not all of them. The claim script clears the list and,
when it leaves messages ready, pushes a token again for the next consumer (chain wake-up).

Lease deadlines and due times are compared with the Redis server clock (TIME), never a client's,
so consumers on hosts with skewed clocks agree on when a lease has expired.

Redis round trips are the cost model of this module: each public method makes one (consume makes
one per queue it looks at, plus one blocking BLPOP when there is nothing to do). Commands go
through redis-py's public API, so its connection pool, health checks and retry apply to them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ..conf import BackendConfig
from ..exceptions import BrokerConnectionError, BrokerError, DecodeError
from ..messages import Message, decode, encode
from .base import Broker, Delivery, Outgoing, ResultWaiter, per_process, warn_if_lost
from .notifications import Hub, announced_ids
from .redis_keys import QueueKeys, queue_keys, results_channel

logger = logging.getLogger("django_tasks.brokers.redis")
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

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
#: Seconds a revoked id is remembered, so that a delivery of it comes marked revoked (one leased
#: at the revoke and redelivered, or one published after the revoke).
REVOKED_KEEP = 86400

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

-- The ids of ARGV[first..] (pairs: id, delivery count) still held by the caller: a lease is the
-- caller's while the message's delivery count is the one its claim returned. Once a lease
-- expired and another consumer claimed the message, the count moved on, and an ack, release,
-- extend or requeue of the first consumer leaves the message alone. Also returns how many of
-- the others were taken over (a count, not gone: no count once a message is acknowledged).
local function owned(deliveries, first)
  local ids, counts = {}, {}
  for i = first, #ARGV, 2 do
    ids[#ids + 1] = ARGV[i]
    counts[#counts + 1] = ARGV[i + 1]
  end
  if #ids == 0 then return ids, 0 end
  local held, taken = {}, 0
  local current = redis.call('HMGET', deliveries, unpack(ids))
  for i, id in ipairs(ids) do
    if current[i] == counts[i] then
      held[#held + 1] = id
    elseif current[i] then
      taken = taken + 1
    end
  end
  return held, taken
end

-- Wake one blocked consumer of the queue: they wait in BLPOP on KEYS[6]. A token goes only
-- into an empty list, so there is never more than one; the claim script clears it.
local function wake()
  if redis.call('LLEN', KEYS[6]) == 0 then redis.call('RPUSH', KEYS[6], 1) end
end
"""

_LUA_KEYS = """\
-- KEYS[1] msgs  KEYS[2] ready  KEYS[3] delayed  KEYS[4] leases  KEYS[5] deliveries
-- KEYS[6] wake  KEYS[7] seq  KEYS[8] revoked  (one queue; see redis_keys.py)
"""

ENQUEUE_LUA = (
    """\
-- enqueue: store messages in one queue, ready at once or delayed until their eta.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1]   the id of a leased message to replace (requeue), or "" to replace none
-- ARGV[2]   its delivery count (the lease must still be the caller's), or ""
-- ARGV[3..] four per message, in publish order: id, body, priority, eta in ms or ""
-- Returns the number of messages stored: 0 when the message to replace is no longer the
-- caller's (its lease expired and another consumer claimed it, or it is gone).
--@helpers
local drop = ARGV[1]
if drop ~= '' then
  if redis.call('HGET', KEYS[5], drop) ~= ARGV[2] then return 0 end
  redis.call('ZREM', KEYS[4], drop)
  redis.call('HDEL', KEYS[5], drop) -- a new attempt starts counting deliveries again
  redis.call('HDEL', KEYS[1], drop)
end
local n = (#ARGV - 2) / 4
-- One INCRBY reserves a sequence number per message (gaps left by delayed ones are harmless).
local seq = redis.call('INCRBY', KEYS[7], n) - n
local now = nil
local bodies, ready, delayed, delayed_ids = {}, {}, {}, {}
for i = 3, #ARGV, 4 do
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
  wake()
elseif #delayed > 0 then
  -- A new earliest delayed message: wake a blocked consumer so that it sleeps less.
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if delayed_ids[head] then wake() end
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
-- Returns {now in ms, earliest delayed eta in ms or -1, then per message: id, body, deliveries,
-- revoked (1 if the id was revoked, else 0)}.
-- The earliest eta is only looked up when nothing was claimed: the caller then sleeps until it.
--@helpers
local count, lease_ms, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = server_ms()
-- This claim answers the wake-up token, if one is left (nobody waited for it): cleared, so that
-- no consumer wakes for what this one takes.
redis.call('DEL', KEYS[6])

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
  local counts = redis.call('HMGET', KEYS[5], unpack(ids))
  local revoked = redis.call('ZMSCORE', KEYS[8], unpack(ids))
  local leases, deliveries = {}, {}
  for i, id in ipairs(ids) do
    if bodies[i] then
      local count = (tonumber(counts[i]) or 0) + 1
      leases[#leases + 1] = now + lease_ms
      leases[#leases + 1] = id
      deliveries[#deliveries + 1] = id
      deliveries[#deliveries + 1] = count
      result[#result + 1] = id
      result[#result + 1] = bodies[i]
      result[#result + 1] = count
      result[#result + 1] = revoked[i] and 1 or 0
    end
  end
  if #leases > 0 then
    redis.call('ZADD', KEYS[4], unpack(leases))
    redis.call('HSET', KEYS[5], unpack(deliveries))
  end
end
-- Messages left ready: another idle consumer wakes for them (chain wake-up).
if #popped / 2 == count and redis.call('ZCARD', KEYS[2]) > 0 then wake() end
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
-- ARGV three per message: id, priority, delivery count
-- Returns the number of messages released (ids no longer leased by the caller are left alone).
--@helpers
local n = #ARGV / 3
local seq = redis.call('INCRBY', KEYS[7], n) - n
local entries = {}
for i = 1, #ARGV, 3 do
  seq = seq + 1
  if redis.call('HGET', KEYS[5], ARGV[i]) == ARGV[i + 2]
      and redis.call('ZREM', KEYS[4], ARGV[i]) == 1 then
    entries[#entries + 1] = ready_score(tonumber(ARGV[i + 1]), seq)
    entries[#entries + 1] = ARGV[i]
  end
end
if #entries > 0 then
  call_chunked('ZADD', KEYS[2], entries)
  wake()
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
-- ARGV[1] lease duration in ms  ARGV[2..] two per message: id, delivery count
-- Only leases still the caller's are renewed; XX: an id acked meanwhile is not leased again.
-- Returns how many leases were taken over by another consumer (acknowledged ones are not).
--@helpers
local deadline = server_ms() + tonumber(ARGV[1])
local held, taken = owned(KEYS[5], 2)
local entries = {}
for _, id in ipairs(held) do
  entries[#entries + 1] = deadline
  entries[#entries + 1] = id
end
call_chunked('ZADD', KEYS[4], entries, 'XX')
return taken
"""
)

PURGE_LUA = (
    """\
-- purge: delete up to ARGV[1] messages ready or delayed; leased messages are kept.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] the most messages to delete
-- Returns {how many messages were deleted, 1 if some may be left, else 0}.
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
return {deleted, deleted == limit and 1 or 0}
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
--@helpers
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[4], id) then return 0 end
if redis.call('ZREM', KEYS[2], id) + redis.call('ZREM', KEYS[3], id) == 0 then return 0 end
redis.call('HDEL', KEYS[1], id)
redis.call('HDEL', KEYS[5], id)
return 1
"""
)

REVOKE_LUA = (
    """\
-- revoke: delete one message waiting in ready or delayed, and remember its id as revoked.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] the task id  ARGV[2] how long revoked ids are remembered, in ms
-- A leased message is kept, and so is one not here yet (published later, e.g. on commit): the
-- claim script marks their deliveries revoked. Returns 1 if the message was deleted, else 0.
--@helpers
local id, keep = ARGV[1], tonumber(ARGV[2])
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now - keep)
if not redis.call('ZSCORE', KEYS[4], id)
    and redis.call('ZREM', KEYS[2], id) + redis.call('ZREM', KEYS[3], id) > 0 then
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[5], id)
  return 1
end
redis.call('ZADD', KEYS[8], now, id)
return 0
"""
)

ACK_LUA = (
    """\
-- ack: delete finished messages of one queue, then announce stored results.
"""
    + _LUA_KEYS
    + """\
-- ARGV[1] the results channel, or "" to announce nothing  ARGV[2] its payload (a JSON list)
-- ARGV[3..] two per message: id, delivery count. A message whose lease is no longer the
-- caller's (another consumer claimed it after the lease expired) is left to that consumer.
-- Returns how many were left so; one acknowledged already (say, an ack sent again after its
-- reply was lost) is gone and not counted.
--@helpers
local ids, taken = owned(KEYS[5], 3)
if #ids > 0 then
  call_chunked('ZREM', KEYS[4], ids)
  call_chunked('HDEL', KEYS[1], ids)
  call_chunked('HDEL', KEYS[5], ids)
end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return taken
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
        self.revoke = client.register_script(_lua(REVOKE_LUA))
        self.ack = client.register_script(_lua(ACK_LUA))


def _translate_errors(
    action: str,
) -> Callable[[Callable[Concatenate[RedisBroker, P], R]], Callable[Concatenate[RedisBroker, P], R]]:
    """Turn redis-py's exceptions into BrokerConnectionError / BrokerError naming the broker."""

    def decorator(
        method: Callable[Concatenate[RedisBroker, P], R],
    ) -> Callable[Concatenate[RedisBroker, P], R]:
        @functools.wraps(method)
        def wrapper(self: RedisBroker, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(self, *args, **kwargs)
            except redis.RedisError as exc:
                raise self._translated(exc, action) from exc

        return wrapper

    return decorator


class RedisBroker(Broker):
    """A broker keeping its queues in Redis (BROKER_URL ``redis://``, ``rediss://``, ``unix://``).

    The client is made on first use and shared by the threads that use this broker (redis-py's
    connection pool is thread-safe). Django gives each thread its own task backends, and so its
    own broker and client; what must be one per process, the result subscription, is kept by
    ``per_process()``. REDIS_OPTIONS are passed to ``redis.Redis.from_url()`` and
    override the defaults of ``client_options()``.
    """

    transactional = False

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._local = threading.local()
        # The client and its scripts, made together on first use (None after close()).
        self._connection: tuple[redis.Redis, _Scripts] | None = None
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
            self._local = threading.local()  # The threads' own connections go with the pool.
        if "_notifications" in self.__dict__:
            self._notifications.close()
        if connection is not None:
            connection[0].close()

    def _translated(self, exc: redis.RedisError, action: str) -> BrokerError:
        """The BrokerError (or BrokerConnectionError) to raise for ``exc``."""
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return BrokerConnectionError(
                f"Could not {action}: the Redis broker at {self.config.safe_broker_url()} cannot "
                f"be reached ({self._scrub(exc)})."
            )
        return BrokerError(
            f"Could not {action} on the Redis broker at {self.config.safe_broker_url()}: "
            f"{self._scrub(exc)}"
        )

    def _scrub(self, exc: BaseException) -> str:
        """The text of exc, with the URL's passwords masked should redis-py ever include one."""
        return self.config.scrub(str(exc) or type(exc).__name__)

    @functools.cached_property
    def results_channel(self) -> str:
        """The channel of result notifications, named after this prefix and database."""
        db = self.client.get_connection_kwargs().get("db") or 0
        return results_channel(self.config.key_prefix, db)

    def keys(self, queue: str) -> QueueKeys:
        """The Redis keys of ``queue``."""
        return queue_keys(self.config.key_prefix, queue)

    # Running scripts.

    def _run(self, script: Script, queue: str, args: Sequence[Any]) -> Any:
        """Run ``script`` on the keys of ``queue``: one EVALSHA (the script is loaded again if
        Redis lost it)."""
        return script(keys=self.keys(queue), args=args)

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
            queue_args = calls.setdefault(message.queue, ["", ""])  # Replaces no leased message.
            queue_args.extend(_enqueue_args(message, body, message.eta))
        if len(calls) == 1:
            [(queue, args)] = calls.items()
            self._enqueue_on_own_connection(queue, args)
        elif calls:
            self._run_per_queue(self.scripts.enqueue, calls)

    def _enqueue_on_own_connection(self, queue: str, args: list[Any]) -> None:
        """The enqueue script for one queue, sent on this thread's own connection.

        The fast path of every delay(), and the one place that does not go through the client's
        command methods: their per-call work (encoding each argument, taking a connection from
        the pool and giving it back, the retry wrapper, observability hooks) cost about as much
        as the round trip itself. Measured side by side on one machine, delay() ran at 0.45 to
        0.50x a redis-py LPUSH through them, and at 0.9 to 1.0x this way. The connection is
        taken from the client's pool (public API) and kept by the thread; hiredis packs the
        command. The client's policy holds: a dropped connection is tried once more on a new
        one, a timeout is not; a script Redis lost is loaded again.
        """
        script = self.scripts.enqueue
        keys = self.keys(queue)
        packed = [hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))]
        for attempt in range(3):
            connection = self._own_connection()
            try:
                connection.send_packed_command(packed)
                connection.read_response()
                return
            except NoScriptError:
                if attempt:
                    raise
                self.client.script_load(script.script)  # Redis restarted or flushed its scripts.
            except redis.ConnectionError:
                connection.disconnect()  # The next attempt connects again.
                if attempt:
                    raise
            except BaseException:
                connection.disconnect()  # A timeout, or interrupted mid-reply: start afresh.
                raise

    def _own_connection(self) -> redis.Connection:
        """This thread's connection for _enqueue_on_own_connection(), kept from the pool."""
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.pid != os.getpid():  # A forked child makes its own.
            connection = cast(redis.Connection, self.client.connection_pool.get_connection())
            local.connection, local.pid = connection, os.getpid()
        return cast(redis.Connection, connection)

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
        deliveries, pause = self._claim(queues, count)
        while not deliveries and (remaining := deadline - time.monotonic()) > 0:
            deliveries, pause = self._block_then_claim(
                queues, count, min(remaining, pause, self._block_cap)
            )
        return deliveries

    def _claim(self, queues: Sequence[str], count: int) -> tuple[list[Delivery], float]:
        """Claim from the queues in order until ``count`` messages are leased.

        Returns the deliveries, and how long the caller may sleep when there are none: until the
        earliest delayed message is due.
        """
        deliveries: list[Delivery] = []
        pause = math.inf
        for queue in queues:
            if len(deliveries) >= count:
                break
            reply = self._run(self.scripts.claim, queue, self._claim_args(count - len(deliveries)))
            pause = min(pause, self._read_claim(queue, reply, deliveries))
        return deliveries, pause

    def _claim_args(self, count: int) -> list[int]:
        return [count, self._lease_ms, MOVE_LIMIT]

    def _read_claim(self, queue: str, reply: list[Any], deliveries: list[Delivery]) -> float:
        """Add the deliveries of a claim reply; return the seconds until its next due message."""
        now, next_due = int(reply[0]), int(reply[1])
        for i in range(2, len(reply), 4):
            delivery = self._delivery(queue, reply[i], reply[i + 1], int(reply[i + 2]))
            # Unmarked is not "not revoked": Redis's mark may be lost (a restart or failover
            # without it, or its day passed). None has the worker ask the result store.
            delivery.revoked = True if reply[i + 3] == 1 else None
            deliveries.append(delivery)
        return math.inf if next_due < 0 else max(0.0, (next_due - now) / 1000)

    def _block_then_claim(
        self, queues: Sequence[str], count: int, seconds: float
    ) -> tuple[list[Delivery], float]:
        """Wait up to ``seconds`` for a wake-up token, then claim: one round trip for both on
        the first queue.

        BLPOP and the claim of the first queue go in one pipeline; Redis runs the claim as soon
        as BLPOP returns (or times out), so a woken consumer has its messages without asking
        again. The other queues, if any, are claimed after. BLPOP hands a token to one blocked
        consumer: the others sleep on. A token pushed while nobody waited is taken by the next
        consumer that does, which returns at once.

        The keys of several hash slots work on a single Redis; on Redis Cluster the queues one
        worker consumes must share a hash tag (see redis_keys.py).
        """
        first = queues[0]
        keys = self.keys(first)
        wake_lists = [self.keys(queue).wake for queue in queues]
        pipe = self.client.pipeline(transaction=False)
        # Never 0, which would mean "block forever" (Redis counts whole milliseconds).
        pipe.blpop(wake_lists, timeout=max(0.001, round(seconds, 3)))
        # EVALSHA, not the Script object: a pipeline of scripts asks SCRIPT EXISTS first, one
        # more round trip; NOSCRIPT is handled below.
        pipe.evalsha(self.scripts.claim.sha, len(keys), *keys, *self._claim_args(count))
        woken, reply = pipe.execute(raise_on_error=False)
        if isinstance(woken, Exception):
            raise woken
        if isinstance(reply, NoScriptError):  # Redis was restarted or flushed its scripts.
            return self._claim(queues, count)
        if isinstance(reply, Exception):
            raise reply
        deliveries: list[Delivery] = []
        pause = self._read_claim(first, reply, deliveries)
        if len(queues) > 1 and len(deliveries) < count:
            more, later = self._claim(queues[1:], count - len(deliveries))
            deliveries += more
            pause = min(pause, later)
        return deliveries, pause

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
    def ack(self, deliveries: Sequence[Delivery], results: Sequence[str] = ()) -> None:
        """Delete the messages and their leases, then publish ``results``.

        One script per queue (the first one publishes), all in one round trip.
        """
        calls = {queue: ["", "", *held] for queue, held in _held_by_queue(deliveries).items()}
        if results:
            channel = self.results_channel
            first = next(iter(calls.values()), None)
            if first is None:
                first = calls[self.config.default_queue] = ["", ""]
            first[:2] = [channel, _compact.encode(list(results))]
        if calls:
            taken = sum(int(n) for n in self._run_per_queue(self.scripts.ack, calls))
            warn_if_lost(logger, "ack", deliveries, len(deliveries) - taken)

    @_translate_errors("requeue a message")
    def requeue(self, delivery: Delivery, message: Message, eta: float | None = None) -> None:
        """Replace the leased delivery by ``message``, due at ``eta`` or at once."""
        # Not size-checked: a retry refused here would come back forever with its expired lease;
        # an oversize body is dead-lettered at consume instead.
        args = _enqueue_args(message, encode(message), eta)
        if message.queue == delivery.queue:
            lease = [delivery.tag, delivery.delivery_count]
            stored = self._run(self.scripts.enqueue, delivery.queue, [*lease, *args])
            warn_if_lost(logger, "requeue", [delivery], int(stored))
            return
        # A move to another queue spans two hash slots: drop and enqueue in one transaction,
        # which WATCH aborts (and the loop tries again) if a claim or an ack touched the
        # delivery counts of the old queue between the ownership check and EXEC.
        old, new = self.keys(delivery.queue), self.keys(message.queue)
        count = str(delivery.delivery_count).encode()
        while True:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(old.deliveries)
                    moved = pipe.hget(old.deliveries, delivery.tag) == count
                    if moved:
                        pipe.multi()
                        pipe.zrem(old.leases, delivery.tag)
                        pipe.hdel(old.msgs, delivery.tag)
                        pipe.hdel(old.deliveries, delivery.tag)
                        pipe.eval(_source(self.scripts.enqueue), len(new), *new, "", "", *args)
                        pipe.execute()
                    break
                except redis.WatchError:
                    continue
        warn_if_lost(logger, "requeue", [delivery], int(moved))

    @_translate_errors("release messages")
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make the messages ready again at once; they keep their delivery counts.

        They go behind the messages of the same priority that are already waiting.
        """
        calls: dict[str, list[Any]] = {}
        for delivery in deliveries:
            priority = delivery.message.priority if delivery.message else 0
            held = (delivery.tag, priority, delivery.delivery_count)
            calls.setdefault(delivery.queue, []).extend(held)
        if calls:
            self._run_per_queue(self.scripts.release, calls)

    @_translate_errors("extend leases")
    def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Renew the leases still held for another ``lease_seconds`` (Redis server time)."""
        calls = {
            queue: [self._lease_ms, *held] for queue, held in _held_by_queue(deliveries).items()
        }
        if calls:
            taken = sum(int(n) for n in self._run_per_queue(self.scripts.extend, calls))
            warn_if_lost(logger, "extend", deliveries, len(deliveries) - taken)

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
        replies = pipe.execute()
        return {queue: sum(replies[3 * i : 3 * i + 3]) for i, queue in enumerate(queues)}

    @_translate_errors("purge a queue")
    def purge(self, queue: str) -> int:
        """Delete the waiting and delayed messages of ``queue``; return how many.

        Each script deletes at most PURGE_CHUNK messages, so that a long queue does not stall
        Redis; a message published meanwhile may be deleted too, as if it came before the purge.
        """
        total = 0
        while True:
            deleted, more = self._run(self.scripts.purge, queue, [PURGE_CHUNK])
            total += int(deleted)
            if not int(more):
                return total

    @_translate_errors("find a message")
    def find(self, task_id: str, queues: Sequence[str]) -> Message | None:
        """The waiting, delayed or leased message of ``task_id``; None if absent or unreadable.

        One HGET per queue, all in one round trip.
        """
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
        replies = self._run_per_queue(self.scripts.remove, {queue: [task_id] for queue in queues})
        return any(int(removed) == 1 for removed in replies)

    @_translate_errors("revoke a message")
    def revoke(self, task_id: str, queues: Sequence[str]) -> bool:
        """Delete the waiting message of ``task_id``, or mark its later deliveries revoked.

        Revoked ids are remembered for REVOKED_KEEP seconds. One script per queue, all in one
        round trip.
        """
        args = [task_id, REVOKED_KEEP * 1000]
        replies = self._run_per_queue(self.scripts.revoke, {queue: args for queue in queues})
        return any(int(removed) == 1 for removed in replies)

    # Result notifications.

    @_translate_errors("announce results")
    def notify_results(self, task_ids: Sequence[str]) -> None:
        """Publish the ids of stored results to waiting callers: one PUBLISH."""
        if task_ids:
            self.client.publish(self.results_channel, json.dumps(list(task_ids)))

    def result_waiter(self, task_id: str) -> ResultWaiter:
        """A waiter woken when ``task_id`` is announced, through this process's subscription."""
        return self._notifications.waiter([task_id])

    @functools.cached_property
    def _notifications(self) -> Hub:
        """The process's hub for this server and prefix, whichever thread's broker made it.

        Its subscriptions are made with that broker's client (made again if it was closed).
        """
        config = self.config
        options = repr(sorted(config.redis_options.items()))
        key = ("redis", config.broker_url, config.key_prefix, config.connect_timeout, options)
        name = f"result notifications at {config.safe_broker_url()}"
        return per_process(key, lambda: Hub(name, lambda: RedisSubscription(self)))


class RedisSubscription:
    """The results channel, subscribed on a connection of its own (see notifications.py)."""

    def __init__(self, broker: RedisBroker) -> None:
        self._pubsub = broker.client.pubsub()
        try:
            self._pubsub.subscribe(broker.results_channel)
            self._confirm(broker.config.connect_timeout)
        except BaseException:
            self._pubsub.close()
            raise

    def _confirm(self, timeout: float) -> None:
        """Read the reply to SUBSCRIBE, proof that Redis registered the subscription."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            reply = self._pubsub.get_message(timeout=remaining)
            if reply is not None and reply["type"] == "subscribe":
                return
        raise redis.TimeoutError("Redis did not confirm the subscription")

    def read(self, timeout: float) -> list[str | None]:
        """The task ids announced within ``timeout``, and any already buffered.

        redis-py reconnects a dropped subscription by itself; the confirmation of the new
        SUBSCRIBE reads as None: announcements may have been lost in between.
        """
        announced: list[str | None] = []
        reply = self._pubsub.get_message(timeout=timeout)
        while reply is not None:
            if reply["type"] == "message":
                announced += announced_ids(reply["data"])
            elif reply["type"] == "subscribe":
                announced.append(None)
            reply = self._pubsub.get_message(timeout=0)
        return announced

    def close(self) -> None:
        """Drop the subscription: the connection is closed, which ends it on the server."""
        self._pubsub.close()


def _enqueue_args(
    message: Message, body: str, eta: float | None
) -> tuple[str, str, int, int | str]:
    """The four arguments of the enqueue script for one message, due at ``eta`` (Unix time)."""
    # Rounded up: a message is never due before its eta, even by a fraction of a millisecond.
    eta_ms: int | str = "" if eta is None else math.ceil(eta * 1000)
    return message.id, body, message.priority, eta_ms


def _held_by_queue(deliveries: Iterable[Delivery]) -> dict[str, list[str | int]]:
    """Per queue, two arguments per delivery: its id and the delivery count of its lease."""
    grouped: dict[str, list[str | int]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.queue, []).extend((delivery.tag, delivery.delivery_count))
    return grouped
