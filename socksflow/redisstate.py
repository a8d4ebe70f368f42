"""Limit state that every instance pointing at one Redis shares: counts, token buckets, blocks.

:class:`RedisState` has the operations of :class:`~socksflow.sharedstate.SharedTable` (the
one-machine backend) for many machines.  A round trip to Redis per session would halve a
server's sessions/s, so the hot operations answer from what this instance already holds and
talk to Redis only in batches:

* **Concurrency** (:meth:`~RedisState.acquire`, :meth:`~RedisState.release`): an instance leases
  slots from Redis.  A Lua script grants a slot, plus spare slots while the limit is far off,
  and never grants beyond the limit across instances.  A session that finds a spare slot is
  admitted without a round trip; one that does not waits for the script (one script per key at
  a time, asking for every session waiting on it).  Spares are given back when sessions end
  (batched, fire-and-forget), when idle, and on request: a refusal while other instances hold
  spares publishes a *reclaim* and retries, so a limit admits exactly its number.
* **Session rates** (:meth:`~RedisState.take`): tokens are leased in batches sized from the rate
  and refilled in the background before they run out.  Low rates lease one token at a time.
* **Bandwidth** (:meth:`~RedisState.charge`): always answered synchronously, per chunk.  Each
  instance paces from its estimate of the shared bucket (the balance Redis last reported,
  refilled since, minus what it has sent and not reported yet) and reports what it sent once a
  batch has gone (and at each heartbeat): every instance then sees the others' traffic.
* **Failed logins and blocks** (:meth:`~RedisState.record`, :meth:`~RedisState.block`): counted in
  Redis; a block is a key with an expiry and is pushed to every instance over pub/sub, so
  :meth:`~RedisState.blocked_until` is a local look-up.

Hot operations return a plain value when they can answer locally and an awaitable when they
must ask Redis: ``bool | Awaitable[bool]``.  Await the result when :func:`inspect.isawaitable`
says so (socksflow's hook caller does: a hook that answers synchronously costs no coroutine).

**Liveness.**  Each instance keeps a heartbeat key (``SET … PX``) renewed by a background task;
slots held by an instance whose heartbeat expired are dropped by the next script that looks at
the key, so an instance that dies gives its sessions back within ``lease_ttl`` seconds.

**Redis unreachable.**  The instance logs once, marks itself unhealthy (:attr:`RedisState.healthy`,
:attr:`RedisState.stats`) and enforces its own limits with a local
:class:`~socksflow.sharedstate.SharedTable` (or, with ``fail_closed=True``, refuses admission),
reconnects with back-off and, once Redis answers, registers the sessions it holds again.

**Time.**  Redis scripts use Redis's ``TIME``, the one clock every instance shares.  The ``now``
arguments, like :class:`SharedTable`'s, are the caller's monotonic clock; block deadlines
travel as durations.  Tests pass ``clock=`` to make every script use the given ``now`` instead.

**Data model** (``P`` is the prefix, ``K`` the key's :func:`key_text`): ``P alive:<instance>``
heartbeat (``PX lease_ttl``); ``P c:K`` hash of slots held, field ``<instance>`` = held,
``~<instance>`` = of which spare (expires ``2 × lease_ttl`` after the last holder's heartbeat);
``P t:K`` and ``P b:K`` token buckets (``t`` tokens, ``s`` stamp, ``r`` rate, ``b`` burst;
expire once full again); ``P e:K`` failed-login windows (``w`` start, ``c`` current, ``p``
previous); ``P k:K`` a block (``PX`` its duration); channel ``P events``: ``b <ms> K`` (a
block), ``r K`` (reclaim spares).  The scripts build the heartbeat keys' names, so this needs
one Redis (or a primary behind Sentinel), not Redis Cluster.

**Where it differs from SharedTable.**  :meth:`~RedisState.count` is awaitable and counts the
spares instances hold (an upper bound).  A release reaches Redis a round trip later, so another
instance may briefly be refused a slot just given back.  :meth:`~RedisState.charge` sees other
instances' traffic once they report it (every ``lease_seconds`` of the rate, or heartbeat): the
long-run total is the rate, a momentary burst across n instances up to n × ``burst``.  Leased
session-rate tokens left unused for a while are dropped.  :meth:`~RedisState.release_worker`
takes an instance id and only hastens the expiry.  Keys are str, int, bool and
:mod:`ipaddress` objects, or tuples of them (``hash`` differs between processes;
:func:`key_text` does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any

from .sharedstate import SharedTable

try:  # an optional extra: ``pip install socksflow[redis]``
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import NoScriptError
    from redis.exceptions import TimeoutError as _RedisTimeoutError
except ImportError:  # pragma: no cover - exercised only without the extra
    aioredis = None
    _RedisConnectionError = _RedisTimeoutError = NoScriptError = OSError  # type: ignore[assignment,misc]

log = logging.getLogger("socksflow.redisstate")

_DOWN = (_RedisConnectionError, _RedisTimeoutError, OSError, asyncio.TimeoutError)
_KEY_TEXT_MAX = 120  # longer key texts are hashed
_RECLAIM_WAITS = (0.02, 0.05, 0.1, 0.25)  # a refusal while others hold spares: wait, ask again
_BACKOFF = (0.1, 5.0)
_TEXTS_MAX = 100_000

# KEYS[1] holdings hash (field <instance> = slots held, ~<instance> = of which spare).
# ARGV: instance, limit, slots wanted (sessions waiting), spares wanted, heartbeat key prefix,
# hash expiry ms, channel, key text.  Returns {slots granted (0 = refused), spares other live
# instances say they hold}.
_ACQUIRE = """
local me, limit, want, spares = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local total, elsewhere = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local field, value = fields[i], tonumber(fields[i + 1])
  local owner = field
  if string.sub(field, 1, 1) == '~' then owner = string.sub(field, 2) end
  if owner ~= me and redis.call('EXISTS', ARGV[5] .. owner) == 0 then
    redis.call('HDEL', KEYS[1], field)
  elseif owner == field then
    total = total + value
  elseif owner ~= me then
    elsewhere = elsewhere + value
  end
end
local grant = math.max(0, math.min(want, limit - total))
if grant < want and elsewhere > 0 then redis.call('PUBLISH', ARGV[7], 'r ' .. ARGV[8]) end
if grant == 0 then return {0, elsewhere} end
local spare = math.max(0, math.min(spares, math.floor((limit - total - grant) / 8)))
redis.call('HINCRBY', KEYS[1], me, grant + spare)
if spare > 0 then redis.call('HINCRBY', KEYS[1], '~' .. me, spare) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {grant + spare, elsewhere}
"""

# KEYS[1] holdings hash.  ARGV: instance, minus the slots given back (an integer's text: Lua
# would print minus zero as "-0", which HINCRBY refuses), spares still held, hash expiry ms.
_RELEASE = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1], '~' .. ARGV[1])
elseif tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], '~' .. ARGV[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('HDEL', KEYS[1], '~' .. ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return left
"""

# ARGV[1] of the scripts with a clock: now in seconds, or empty for Redis's TIME (the clock
# every instance shares).
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS[1] bucket hash (t tokens, s stamp, r rate, b burst).  ARGV: now, rate, burst, amount,
# mode ('t': lease up to amount whole tokens, never into debt; 'c': charge amount, into debt).
# Returns {tokens granted, balance after, as text}.
_BUCKET = (
    _NOW
    + """
local rate, burst, amount = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 's', 'r', 'b')
local tokens = burst
if b[1] and tonumber(b[3]) == rate and tonumber(b[4]) == burst then
  tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate)
end
local granted = amount
if ARGV[5] == 't' then granted = math.max(0, math.min(amount, math.floor(tokens))) end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.17g', now),
           'r', ARGV[2], 'b', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {granted, string.format('%.17g', tokens)}
"""
)

# KEYS[1] events hash (w window start, c current count, p previous count).  ARGV: now, within.
# Two fixed windows estimate a sliding one, exactly as SharedTable.record does.
_RECORD = (
    _NOW
    + """
local within = tonumber(ARGV[2])
local e = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local start, current, previous = tonumber(e[1]) or now, tonumber(e[2]) or 0, tonumber(e[3]) or 0
local elapsed = now - start
if elapsed >= 2 * within then
  previous, current, start = 0, 0, now
elseif elapsed >= within then
  previous, current, start = current, 0, start + within
end
current = current + 1
redis.call('HSET', KEYS[1], 'w', string.format('%.17g', start), 'c', current, 'p', previous)
redis.call('PEXPIRE', KEYS[1], math.ceil(2 * within * 1000) + 1000)
return string.format('%.17g', previous * (1 - (now - start) / within) + current)
"""
)

# KEYS[1] block key.  ARGV: duration ms, channel, key text.  Returns 1 if it was not blocked.
_BLOCK = """
local left = redis.call('PTTL', KEYS[1])
local ms = tonumber(ARGV[1])
if ms > left then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  redis.call('PUBLISH', ARGV[2], 'b ' .. ms .. ' ' .. ARGV[3])
end
if left > 0 then return 0 end
return 1
"""


_ADDRESSES = (
    ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network,
    ipaddress.IPv4Interface, ipaddress.IPv6Interface,
)  # fmt: skip


def key_text(key: Hashable) -> str:
    """A stable text for a limit key: the same on every instance and Python (``hash`` is not).

    Tuples join their parts with ``|``; strings are escaped, ints marked ``#``, addresses and
    networks ``@``; a text longer than 120 characters is replaced by its BLAKE2b digest.
    """
    text = _part(key)
    if len(text) > _KEY_TEXT_MAX:
        text = "=" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return text


def _part(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + "|".join(_part(item) for item in value) + ")"
    if isinstance(value, str):
        return value.replace("%", "%25").replace("|", "%7C").replace("(", "%28").replace(")", "%29")
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return f"#{value}"
    if isinstance(value, _ADDRESSES):
        return f"@{value}"
    raise TypeError(f"no stable text for a limit key part of type {type(value).__name__}")


class _Slots:
    """Concurrency slots this instance holds for one key."""

    __slots__ = ("asking", "held", "key", "name", "returning", "spare", "text", "tickets", "used", "waiting")

    def __init__(self, key: Hashable, text: str, name: str) -> None:
        self.key, self.text, self.name = key, text, name
        self.held = 0  # granted by Redis
        self.used = 0  # sessions counted: held - used are spare
        self.spare = 0  # how many spares to keep when sessions end
        self.returning: asyncio.Future[None] | None = None  # slots on their way back to Redis
        # One script in flight per key asks for every session waiting; its outcome: (spares
        # elsewhere, or None if Redis is unreachable; the tickets below the one it covered).
        self.asking: asyncio.Future[tuple[int | None, int]] | None = None
        self.tickets = 0  # numbers handed to sessions waiting, in arrival order
        self.waiting = 0

    def idle(self) -> bool:
        """Nothing held, used or on its way: the entry may be forgotten."""
        return not (self.held or self.used or self.waiting or self.returning)


class _Tokens:
    """Session-rate tokens leased from one shared bucket."""

    __slots__ = ("burst", "fetch", "name", "rate", "stamp", "tokens", "waiting")

    def __init__(self, name: str, rate: float, burst: float) -> None:
        self.name, self.rate, self.burst = name, rate, burst
        self.tokens = 0
        self.stamp = 0.0  # when they were leased: stale tokens are dropped
        self.fetch: asyncio.Future[bool] | None = None  # a lease in flight: did Redis answer?
        self.waiting = 0  # sessions waiting for a token


class _Flow:
    """This instance's view of a shared bandwidth bucket."""

    __slots__ = ("balance", "burst", "name", "pending", "rate", "reporting", "stamp")

    def __init__(self, name: str, rate: float, burst: float, now: float) -> None:
        self.name, self.rate, self.burst = name, rate, burst
        self.balance = burst  # the shared bucket's balance at ``stamp``, as last reported
        self.stamp = now
        self.pending = 0.0  # sent and not yet reported (including a report in flight)
        self.reporting = 0.0  # the part of ``pending`` in flight

    def pause(self, now: float) -> float:
        estimate = min(self.burst, self.balance + (now - self.stamp) * self.rate) - self.pending
        return -estimate / self.rate if estimate < 0 else 0.0


class RedisState:
    """Shared limit state in Redis; the operations and meaning of :class:`SharedTable`.

    ``url``: ``redis://``, ``rediss://`` or ``unix://`` (or pass a ready ``client``).
    ``lease_ttl``: seconds after which a silent instance's slots are given back.
    ``lease_seconds``: how much of a rate one lease or one bandwidth report covers.
    ``spares``: at most this many spare slots leased per key (fewer near the limit).
    ``timeout``: seconds a command may take before Redis counts as unreachable.
    ``connections``: the most connections to Redis (one asks per key at a time).
    ``fail_closed``: refuse admission (``acquire``, ``take``) while Redis is unreachable
    instead of enforcing this instance's own limits.
    ``clock``: tests only: a clock every instance shares; scripts then use the ``now`` given.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "socksflow:",
        instance: str | None = None,
        lease_ttl: float = 3.0,
        lease_seconds: float = 0.05,
        spares: int = 8,
        fail_closed: bool = False,
        timeout: float = 0.5,
        connections: int = 32,
        clock: Callable[[], float] | None = None,
        client: Any = None,
    ) -> None:
        if client is None:
            if aioredis is None:
                raise RuntimeError("Redis state needs redis-py: pip install 'socksflow[redis]'")
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=connections,  # more asks wait for a connection instead of failing
                timeout=4 * timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # an outage is handled here: fall back, do not stall
            )
            client = aioredis.Redis(connection_pool=pool)
        self.url = url
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fail_closed = fail_closed
        self.stats = {"redis_calls": 0, "local_hits": 0, "fallback": 0, "outages": 0, "rejoins": 0}
        self._redis = client
        self._prefix = prefix
        self._alive = f"{prefix}alive:"
        self._channel = f"{prefix}events"
        self._ttl_ms = max(1, round(lease_ttl * 1000))
        self._hold_ms = 2 * self._ttl_ms
        self._lease_seconds = lease_seconds
        self._spares = spares
        self._clock = clock
        self._now = clock or time.monotonic
        self._local = SharedTable(workers=1, slots=4096)
        self._local_keys: set[Hashable] = set()  # keys admitted by the local table during an outage
        self._texts: dict[Hashable, str] = {}
        self._slots: dict[str, _Slots] = {}
        self._tokens: dict[str, _Tokens] = {}
        self._flows: dict[str, _Flow] = {}
        self._blocks: dict[str, float] = {}
        self._returns: set[_Slots] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._healthy = False
        self._down_logged = False
        self._started = False
        self._runner: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._bucket = client.register_script(_BUCKET)
        self._record = client.register_script(_RECORD)
        self._block = client.register_script(_BLOCK)

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        """Whether Redis answers: False means this instance enforces its own limits."""
        return self._healthy

    async def start(self) -> None:
        """Join (or, if Redis does not answer, start on local limits and keep trying)."""
        self._started = True
        try:
            await self._join()
        except _DOWN as exc:
            self._down(exc)
        self._runner = asyncio.create_task(self._run(), name="redisstate")

    async def close(self) -> None:
        """Give back every slot held, stop the background tasks, close the connections."""
        self._started = False
        tasks = [task for task in (self._runner, self._listener, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._healthy:
            try:
                await self._report_all()
                async with self._redis.pipeline(transaction=False) as pipe:
                    for slots in self._slots.values():
                        if slots.held:
                            pipe.hdel(slots.name, self.instance, "~" + self.instance)
                    pipe.delete(self._alive + self.instance)
                    await pipe.execute()
            except _DOWN as exc:
                log.debug("redis: giving back on close failed: %s", exc)
        self._slots.clear()
        self._healthy = False
        await self._redis.aclose()

    async def flush(self) -> None:
        """Wait for the fire-and-forget work in flight (returns, refills, reports): for tests."""
        self._send_returns()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ concurrency counts

    def acquire(self, key: Hashable, limit: int, now: float) -> bool | Awaitable[bool]:
        """Count one more session under ``key`` unless ``limit`` are counted across instances.

        Answers ``True`` at once when this instance holds a spare slot; otherwise returns an
        awaitable that asks Redis.  While Redis is unreachable, answers at once from this
        instance's own count (or ``False`` with ``fail_closed``).
        """
        slots = self._slots_of(key)
        if not self._healthy:
            return self._acquire_locally(slots, limit, now)
        if slots.used < slots.held:
            slots.used += 1
            self.stats["local_hits"] += 1
            return True
        return self._acquire_remote(slots, limit, now)

    def _slots_of(self, key: Hashable) -> _Slots:
        text = self._text(key)
        slots = self._slots.get(text)
        if slots is None:
            slots = self._slots[text] = _Slots(key, text, f"{self._prefix}c:{text}")
        return slots

    def _acquire_locally(self, slots: _Slots, limit: int, now: float) -> bool:
        self.stats["fallback"] += 1
        if self.fail_closed:
            return False
        self._local_keys.add(slots.key)
        return self._local.acquire(slots.key, limit - slots.used, now)

    async def _acquire_remote(self, slots: _Slots, limit: int, now: float) -> bool:
        slots.waiting += 1
        try:
            for wait in (*_RECLAIM_WAITS, None):
                ticket = slots.tickets
                slots.tickets += 1
                while True:
                    elsewhere, covered = await self._ask(slots, limit)
                    if elsewhere is None:
                        return self._acquire_locally(slots, limit, now)
                    if slots.used < slots.held:
                        slots.used += 1
                        return True
                    if ticket < covered:  # the script counted this session: the limit is reached
                        break
                if not elsewhere or wait is None:
                    return False
                await asyncio.sleep(wait)  # the script asked the others to give their spares back
                if slots.used < slots.held:  # a grant to another waiter left one
                    slots.used += 1
                    return True
            return False  # pragma: no cover - the loop returns
        finally:
            slots.waiting -= 1

    async def _ask(self, slots: _Slots, limit: int) -> tuple[int | None, int]:
        """Ask Redis for a slot for every session waiting on ``slots``: one script at a time."""
        while slots.returning is not None:  # our own slots must be back before we ask for more
            await asyncio.shield(slots.returning)
        if slots.asking is not None:
            return await asyncio.shield(slots.asking)
        want = max(1, slots.waiting - (slots.held - slots.used))
        outcome: tuple[int | None, int] = (None, slots.tickets)
        slots.asking = asking = asyncio.get_running_loop().create_future()
        try:
            answer = await self._call(
                self._acquire,
                slots.name,
                self.instance, limit, want, self._spares, self._alive, self._hold_ms, self._channel, slots.text,
            )  # fmt: skip
            if answer is not None:
                granted, elsewhere = int(answer[0]), int(answer[1])
                slots.held += granted
                slots.spare = max(0, granted - want)
                outcome = (elsewhere, outcome[1])
        finally:
            slots.asking = None
            asking.set_result(outcome)
        return outcome

    def release(self, key: Hashable) -> None:
        """Give back one session this instance counted under ``key`` (Redis is told in a batch)."""
        slots = self._slots.get(self._text(key))
        if key in self._local_keys and self._local.count(key):
            self._local.release(key)
            return
        if slots is None or not slots.used:
            return
        slots.used -= 1
        if slots.held - slots.used > 2 * slots.spare:  # hysteresis: not a round trip per session
            self._queue_return(slots)

    def count(self, key: Hashable) -> int | Awaitable[int]:
        """Slots held under ``key`` by every live instance (spares included: an upper bound)."""
        if not self._healthy:
            slots = self._slots.get(self._text(key))
            return self._local.count(key) + (slots.used if slots else 0)
        return self._count(key)

    async def _count(self, key: Hashable) -> int:
        try:
            return await self._count_live(f"{self._prefix}c:{self._text(key)}")
        except _DOWN as exc:
            self._down(exc)
            slots = self._slots.get(self._text(key))
            return self._local.count(key) + (slots.used if slots else 0)

    async def _count_live(self, name: str) -> int:
        fields = await self._redis.hgetall(name)
        owners = [f for f in fields if not f.startswith(b"~")]
        alive = await self._redis.exists(*[self._alive + f.decode() for f in owners]) if owners else 0
        if alive == len(owners):
            return sum(int(fields[f]) for f in owners)
        total = 0
        for owner in owners:  # some are dead: count the live ones only
            if await self._redis.exists(self._alive + owner.decode()):
                total += int(fields[owner])
        return total

    def release_worker(self, instance: str) -> Awaitable[None]:
        """Declare ``instance`` dead now instead of when its heartbeat expires.

        Its slots are dropped by the next script that looks at each key (SharedTable's
        supervisor counts what it releases; Redis cannot without a scan).
        """
        return self._redis.delete(self._alive + instance)

    def _queue_return(self, slots: _Slots) -> None:
        if not self._returns:
            asyncio.get_running_loop().call_soon(self._send_returns)
        self._returns.add(slots)

    def _send_returns(self) -> None:
        if self._returns and self._healthy:
            self._spawn(self._returns_task(list(self._returns)))
        self._returns.clear()

    async def _returns_task(self, batch: list[_Slots]) -> None:
        calls = []
        done = asyncio.get_running_loop().create_future()
        for slots in batch:  # what to give back is decided now: sessions may have come or gone
            back = slots.held - slots.used - slots.spare
            if back >= 0:
                slots.held -= back
                slots.returning = done
                calls.append(([slots.name], [self.instance, -back, slots.held - slots.used, self._hold_ms]))
        if not calls:
            return
        self.stats["redis_calls"] += 1
        try:
            await self._send_release(calls)
        finally:
            done.set_result(None)
            for slots in batch:
                if slots.returning is done:
                    slots.returning = None

    async def _send_release(self, calls: list[tuple[list[str], list[Any]]]) -> None:
        try:
            if len(calls) == 1:
                await self._release(keys=calls[0][0], args=calls[0][1])
                return
            for attempt in range(2):  # EVALSHA straight: redis-py's pipelined scripts cost a round trip
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for keys, args in calls:
                            pipe.evalsha(self._release.sha, len(keys), *keys, *args)
                        await pipe.execute()
                    return
                except NoScriptError:  # the server forgot its scripts (SCRIPT FLUSH): load them again
                    if attempt:
                        raise
                    await self._load_scripts()
        except _DOWN as exc:
            self._down(exc)

    def _reclaim(self, text: str) -> None:
        """Another instance was refused while we hold spares: give them back now."""
        slots = self._slots.get(text)
        if slots is not None:
            slots.spare = 0
            self._queue_return(slots)  # even with none spare: corrects what Redis believes

    # ------------------------------------------------------------------ token buckets

    def take(self, key: Hashable, rate: float, burst: float, now: float) -> bool | Awaitable[bool]:
        """Take one token from the shared bucket ``key`` (``rate``/s, at most ``burst``; starts full).

        Answers at once from leased tokens; returns an awaitable when none is left.
        """
        text = self._text(key)
        lease = self._tokens.get(text)
        if lease is None or lease.rate != rate or lease.burst != burst:
            lease = self._tokens[text] = _Tokens(f"{self._prefix}t:{text}", rate, burst)
        if not self._healthy:
            self.stats["fallback"] += 1
            return False if self.fail_closed else self._local.take(key, rate, burst, now)
        if lease.tokens and now - lease.stamp > 20 * self._lease_seconds + 1.0:
            lease.tokens = 0  # leased long ago: would add to a burst the shared bucket refilled
        batch = self._batch(rate, burst)
        if lease.tokens:
            lease.tokens -= 1
            self.stats["local_hits"] += 1
            if batch > 1 and lease.tokens < batch / 2 and lease.fetch is None:  # refill ahead
                self._fetch(lease, batch, now)
            return True
        return self._take_remote(lease, key, batch, now)

    async def _take_remote(self, lease: _Tokens, key: Hashable, batch: int, now: float) -> bool:
        lease.waiting += 1
        try:
            for _ in range(2):  # the lease in flight, then (if it brought too few) one for all waiting
                if not await asyncio.shield(self._fetch(lease, max(batch, lease.waiting), now)):
                    self.stats["fallback"] += 1
                    return False if self.fail_closed else self._local.take(key, lease.rate, lease.burst, now)
                if lease.tokens:
                    lease.tokens -= 1
                    return True
            return False
        finally:
            lease.waiting -= 1

    def _fetch(self, lease: _Tokens, want: int, now: float) -> asyncio.Future[bool]:
        """Lease up to ``want`` tokens (one lease in flight per bucket); whether Redis answered."""
        if lease.fetch is None:
            done = lease.fetch = asyncio.get_running_loop().create_future()
            task = self._spawn(self._lease_tokens(lease, want, now, done))
            if task is None:
                done.set_result(False)
            else:  # cancelled before it ran (close): its waiters must not wait for ever
                task.add_done_callback(lambda _: done.done() or done.set_result(False))
        return lease.fetch

    async def _lease_tokens(self, lease: _Tokens, want: int, now: float, done: asyncio.Future[bool]) -> None:
        answered = False
        try:
            answer = await self._call(
                self._bucket, lease.name, self._script_now(now), lease.rate, lease.burst, want, "t"
            )
            if answer is not None:
                lease.tokens += int(answer[0])
                lease.stamp = now
                answered = True
        finally:
            if lease.fetch is done:
                lease.fetch = None
            done.set_result(answered)

    def _batch(self, rate: float, burst: float) -> int:
        return max(1, min(int(burst), int(rate * self._lease_seconds)))

    def charge(self, key: Hashable, rate: float, burst: float, amount: float, now: float) -> float:
        """Take ``amount`` tokens, into debt if need be; the seconds until the debt is paid.

        Always synchronous (bandwidth is paced per chunk): paces from this instance's estimate
        of the shared bucket and reports to Redis once a batch has been sent.
        """
        if not self._healthy:
            self.stats["fallback"] += 1
            return self._local.charge(key, rate, burst, amount, now)
        text = self._text(key)
        flow = self._flows.get(text)
        if flow is None or flow.rate != rate or flow.burst != burst:
            flow = self._flows[text] = _Flow(f"{self._prefix}b:{text}", rate, burst, now)
        flow.pending += amount
        if not flow.reporting and flow.pending >= rate * self._lease_seconds:
            self._spawn(self._report(flow, now))
        return flow.pause(now)

    async def _report(self, flow: _Flow, now: float) -> None:
        amount = flow.reporting = flow.pending
        try:
            answer = await self._call(
                self._bucket, flow.name, self._script_now(now), flow.rate, flow.burst, amount, "c"
            )
        finally:
            flow.reporting = 0.0
        if answer is None:
            return
        flow.pending -= amount
        flow.balance = float(answer[1])
        flow.stamp = self._now() if self._clock is None else now

    async def _report_all(self) -> None:
        now = self._now()
        reports = [
            self._report(flow, now) for flow in self._flows.values() if flow.pending and not flow.reporting
        ]
        await asyncio.gather(*reports)

    # ------------------------------------------------------------------ events and blocks

    def record(self, key: Hashable, within: float, now: float) -> float | Awaitable[float]:
        """Count one event (a failed login) under ``key``; the events within ``within`` seconds.

        Asks Redis (an awaitable); answers at once from the local table during an outage.
        """
        if not self._healthy:
            self.stats["fallback"] += 1
            return self._local.record(key, within, now)
        return self._record_remote(key, within, now)

    async def _record_remote(self, key: Hashable, within: float, now: float) -> float:
        name = f"{self._prefix}e:{self._text(key)}"
        seen = await self._call(self._record, name, self._script_now(now), within)
        return self._local.record(key, within, now) if seen is None else float(seen)

    def forget_events(self, key: Hashable) -> None:
        """Start counting ``key``'s events afresh (fire-and-forget)."""
        self._local.forget_events(key)
        if self._healthy:
            self._spawn(self._quietly(self._redis.delete(f"{self._prefix}e:{self._text(key)}")))

    def block(self, key: Hashable, until: float, now: float) -> bool | Awaitable[bool]:
        """Block ``key`` until ``until`` on every instance; True if it was not blocked anywhere.

        Takes effect here at once; the awaitable tells whether another instance had blocked it
        already (log once across instances).  ``False`` at once if it is blocked here already.
        """
        text = self._text(key)
        fresh_here = self._blocks.get(text, 0.0) <= now
        self._blocks[text] = max(self._blocks.get(text, 0.0), until)
        if not self._healthy:
            return fresh_here
        if not fresh_here:
            self._spawn(self._block_remote(text, until, now))
            return False
        return self._block_remote(text, until, now)

    async def _block_remote(self, text: str, until: float, now: float) -> bool:
        ms = max(1, math.ceil((until - now) * 1000))
        fresh = await self._call(self._block, f"{self._prefix}k:{text}", ms, self._channel, text)
        return fresh is None or bool(fresh)

    def blocked_until(self, key: Hashable, now: float) -> float:
        """When ``key``'s block ends, or 0.0 if it is not blocked (a local look-up)."""
        text = self._text(key)
        until = self._blocks.get(text, 0.0)
        if until > now:
            return until
        if until:
            del self._blocks[text]
        return 0.0

    # ------------------------------------------------------------------ plumbing

    def _text(self, key: Hashable) -> str:
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) >= _TEXTS_MAX:
                self._texts.clear()
            text = self._texts[key] = key_text(key)
        return text

    async def _call(self, script: Any, name: str, *args: Any) -> Any:
        """Run a script on key ``name``; None if Redis is unreachable (this instance is then down)."""
        self.stats["redis_calls"] += 1
        try:
            return await script(keys=[name], args=args)
        except _DOWN as exc:
            self._down(exc)
            return None

    def _script_now(self, now: float) -> str | float:
        return "" if self._clock is None else now

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        if not self._started:  # closed: what it held is given back already
            work.close()
            return None
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug or a Redis refusal
            log.error("redis state: background work failed", exc_info=task.exception())

    async def _quietly(self, work: Awaitable[Any]) -> None:  # for a plain command, fire-and-forget
        try:
            await work
        except _DOWN as exc:
            self._down(exc)

    def _down(self, exc: BaseException) -> None:
        self._healthy = False
        if self._down_logged or not self._started:
            return
        self._down_logged = True
        self.stats["outages"] += 1
        log.warning(
            "redis at %s unreachable (%s): enforcing this instance's own limits%s until it is back",
            self.url, exc or type(exc).__name__, " and refusing new sessions" if self.fail_closed else "",
        )  # fmt: skip
        if self._listener is not None and self._listener is not asyncio.current_task():
            self._listener.cancel()
        self._returns.clear()
        self._tokens.clear()
        self._flows.clear()

    async def _join(self) -> None:
        """(Re)register this instance: heartbeat, the sessions it holds, the blocks in force."""
        if self.stats["outages"]:  # pooled connections to the Redis that went away are dead
            await self._redis.connection_pool.disconnect()
        await self._redis.ping()
        await self._load_scripts()
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self._channel)  # before reading the blocks: none slips between
        if self._listener is not None:
            self._listener.cancel()
        self._listener = asyncio.create_task(self._listen(pubsub), name="redisstate-events")
        in_redis: set[str] = set()
        now = self._now()
        async for name in self._redis.scan_iter(match=f"{self._prefix}k:*", count=1000):
            left = await self._redis.pttl(name)
            if left > 0:
                text = name.decode()[len(self._prefix) + 2 :]
                in_redis.add(text)
                self._blocks[text] = max(self._blocks.get(text, 0.0), now + left / 1000)
        while True:  # sessions admitted on local limits meanwhile now count in Redis
            for key in self._local_keys:
                slots = self._slots_of(key)
                while self._local.count(key):
                    self._local.release(key)
                    slots.used += 1
            self._local_keys.clear()
            await self._register()
            if not self._local_keys:  # none admitted locally while registering: switch now
                break
        if self.stats["outages"]:
            self.stats["rejoins"] += 1
            log.warning("redis at %s is back: limits are shared again", self.url)
        self._healthy = True
        self._down_logged = False
        now = self._now()
        for text, until in list(self._blocks.items()):  # blocks made here during the outage
            if until > now and text not in in_redis:
                self._spawn(self._block_remote(text, until, now))

    async def _load_scripts(self) -> None:
        for script in (self._acquire, self._release, self._bucket, self._record, self._block):
            script.sha = await self._redis.script_load(script.script)

    async def _register(self) -> None:
        """Heartbeat and the slots held, as this instance counts them (spares dropped)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._alive + self.instance, "1", px=self._ttl_ms)
            for slots in list(self._slots.values()):
                if slots.asking is not None:  # its grant will count
                    continue
                slots.held, slots.spare = slots.used, 0
                if slots.used:
                    pipe.hset(slots.name, self.instance, slots.used)
                    pipe.hdel(slots.name, "~" + self.instance)
                    pipe.pexpire(slots.name, self._hold_ms)
                else:
                    pipe.hdel(slots.name, self.instance, "~" + self.instance)
                    if slots.idle():
                        del self._slots[slots.text]
            await pipe.execute()

    async def _heartbeat(self) -> None:
        if not await self._redis.set(self._alive + self.instance, "1", px=self._ttl_ms, xx=True):
            log.warning("redis: this instance's lease had expired (a stall?): registering again")
            await self._register()
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for slots in list(self._slots.values()):
                    if slots.held:
                        pipe.pexpire(slots.name, self._hold_ms)
                        if not slots.used:  # idle: give its spares back
                            slots.spare = 0
                            self._queue_return(slots)
                    elif slots.idle():
                        del self._slots[slots.text]
                await pipe.execute()
        await self._report_all()
        stale = self._now() - 10.0  # forget buckets not used for a while
        for text, flow in list(self._flows.items()):
            if flow.stamp < stale and not flow.pending:
                del self._flows[text]
        for text, lease in list(self._tokens.items()):
            if lease.stamp < stale and lease.fetch is None and not lease.waiting:
                del self._tokens[text]

    async def _run(self) -> None:
        backoff = _BACKOFF[0]
        while self._started:
            if self._healthy:
                await asyncio.sleep(self._ttl_ms / 3000)
                if not self._healthy:  # went down while asleep: rejoin instead
                    continue
                try:
                    await self._heartbeat()
                except _DOWN as exc:
                    self._down(exc)
                except Exception:  # a refusal (say, NOAUTH): keep the heartbeat going regardless
                    log.exception("redis state: heartbeat failed")
            else:
                await asyncio.sleep(backoff)
                try:
                    await self._join()
                    backoff = _BACKOFF[0]
                except Exception as exc:
                    if not isinstance(exc, _DOWN):
                        log.exception("redis state: joining failed")
                    backoff = min(backoff * 2, _BACKOFF[1])

    async def _listen(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                kind, _, rest = message["data"].decode().partition(" ")
                if kind == "r":
                    self._reclaim(rest)
                elif kind == "b":
                    ms, _, text = rest.partition(" ")
                    until = self._now() + int(ms) / 1000
                    self._blocks[text] = max(self._blocks.get(text, 0.0), until)
        except _DOWN as exc:
            self._down(exc)
        finally:
            with contextlib.suppress(*_DOWN):
                await pubsub.aclose()
