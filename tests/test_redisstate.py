"""Limit state shared through a real redis-server on loopback by several RedisState instances."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from socksflow.redisstate import RedisState, key_text

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1, no persistence; stopped and restarted by PID on one port."""

    def __init__(self) -> None:
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start on the same port as before, or (first start) on a port found free."""
        for _ in range(3):  # a port found free may be taken before redis-server binds it
            port = self.port or _free_port()
            if self._run(port):
                self.port, self.url = port, f"redis://127.0.0.1:{port}/0"
                return
        raise AssertionError("redis-server did not start")

    def _run(self, port: int) -> bool:
        assert REDIS_SERVER is not None
        command = [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        with tempfile.TemporaryFile() as output:  # not a pipe: a full pipe would stall the server
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16) == b"+PONG\r\n":
                            return True
                except OSError:
                    pass
                if self.process.poll() is not None:
                    output.seek(0)
                    print("redis-server exited:", output.read().decode(errors="replace")[-2000:])
                    return False
                time.sleep(0.02)
        raise AssertionError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def answer(result: Any) -> Any:
    """What a hook caller does: await the result only when it is awaitable."""
    return await result if inspect.isawaitable(result) else result


async def eventually(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def instances(url: str, n: int, **options: Any) -> list[RedisState]:
    states = [RedisState(url, instance=f"i{i}", **options) for i in range(n)]
    for state in states:
        await state.start()
        assert state.healthy
    return states


def test_key_texts_are_stable_typed_and_bounded() -> None:
    assert key_text(("user", "alice")) == "(user|alice)"
    assert key_text(("address", 4, int(ipaddress.ip_address("10.0.0.1")))) == "(address|#4|#167772161)"
    assert key_text(("net", ipaddress.ip_network("10.0.0.0/8"))) == "(net|@10.0.0.0/8)"
    assert key_text(("x", "1")) != key_text(("x", 1))  # a str and an int never meet
    assert key_text(("a|b",)) != key_text(("a", "b"))  # separators in a name are escaped
    long = key_text(("user", "x" * 500))
    assert long.startswith("=") and len(long) == 33
    with pytest.raises(TypeError):
        key_text(("float", 1.5))


def test_three_instances_admit_exactly_the_limit_between_them(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b, c = await instances(redis_server.url, 3)
        try:
            now = time.monotonic()
            granted = [await answer(s.acquire(("user", "u"), 6, now)) for _ in range(4) for s in (a, b, c)]
            assert granted.count(True) == 6
            # A session rate on Redis's own clock (no clock= given): one bucket for all three.
            assert [await answer(s.take("rate", 1.0, 2.0, now)) for s in (a, b, c)] == [True, True, False]
            assert await answer(a.count(("user", "u"))) == 6
            a.release(("user", "u"))  # a held 2: one goes back to Redis, in a batch
            a.release(("user", "u"))
            await a.flush()
            assert [await answer(c.acquire(("user", "u"), 6, now)) for _ in range(3)] == [True, True, False]
            # Concurrent asks from every instance at once still stop at the limit.
            asks = [answer(s.acquire(("user", "v"), 6, now)) for _ in range(5) for s in (a, b, c)]
            assert sum(await asyncio.gather(*asks)) == 6
            # Sessions waiting on one key at once share a script: it asks for all of them.
            calls = a.stats["redis_calls"]
            asks = [answer(a.acquire(("user", "w"), 6, now)) for _ in range(20)]
            assert sum(await asyncio.gather(*asks)) == 6
            assert a.stats["redis_calls"] - calls == 2  # the first, then one for the 19 that queued behind it
            # Sessions of several keys ending in one tick go back in one pipeline, even to a
            # server that has forgotten its scripts.
            await a._redis.script_flush()
            for state in (a, b, c):
                for key in (("user", "u"), ("user", "v"), ("user", "w")):
                    for _ in range(state._slots_of(key).used):
                        state.release(key)
                await state.flush()
            for key in (("user", "u"), ("user", "v"), ("user", "w")):
                assert await answer(a.count(key)) == 0
        finally:
            for state in (a, b, c):
                await state.close()

    asyncio.run(main())


def test_spare_slots_make_admission_local_and_are_reclaimed_at_the_limit(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = await instances(redis_server.url, 2, spares=8)
        try:
            now = time.monotonic()
            first = a.acquire("k", 40, now)
            assert inspect.isawaitable(first) and await first
            # The script granted spares (40 is far off): the next sessions need no round trip.
            follow = [a.acquire("k", 40, now) for _ in range(2)]
            assert follow == [True, True] and a.stats["local_hits"] == 2
            assert await answer(b.count("k")) == 5  # 1 + 4 spares: a's 2 unused count until given back
            # b fills the rest: a's spares come back when b is refused while a holds them.
            got = [await answer(b.acquire("k", 40, now)) for _ in range(40)]
            assert got.count(True) == 37
            assert await answer(b.count("k")) == 40
            assert not await answer(a.acquire("k", 40, now))
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_an_instance_that_stops_heartbeating_has_its_counts_expire(redis_server: RedisServer) -> None:
    async def main() -> None:
        dead, live = await instances(redis_server.url, 2, lease_ttl=0.3, spares=0)
        try:
            now = time.monotonic()
            assert [await answer(dead.acquire("k", 5, now)) for _ in range(3)] == [True] * 3
            for task in (dead._runner, dead._listener):  # a death: no cleanup, no goodbye
                assert task is not None
                task.cancel()
            assert [await answer(live.acquire("k", 5, now)) for _ in range(3)] == [True, True, False]
            probe = live._redis
            deadline = time.monotonic() + 5
            while await probe.exists("socksflow:alive:i0"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert [await answer(live.acquire("k", 5, now)) for _ in range(4)] == [True, True, True, False]
            assert await answer(live.count("k")) == 5
        finally:
            await live.close()
            await dead._redis.aclose()

    asyncio.run(main())


_CHILD = """
import asyncio, sys, time
from socksflow.redisstate import RedisState

async def main():
    state = RedisState(sys.argv[1], instance="child", lease_ttl=0.3, spares=0)
    await state.start()
    held = [await state.acquire(("user", "alice"), 3, time.monotonic()) for _ in range(2)]
    print("held" if all(held) else "refused", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_process_killed_while_holding_slots_gives_them_back_at_lease_expiry(
    redis_server: RedisServer,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, redis_server.url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": "12345"},  # its hash() differs from ours: key texts do not
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"

        async def main() -> None:
            (parent,) = await instances(redis_server.url, 1, spares=0)
            try:
                now = time.monotonic()
                assert [await answer(parent.acquire(("user", "alice"), 3, now)) for _ in range(2)] == [
                    True,
                    False,
                ]
                child.send_signal(signal.SIGKILL)  # no goodbye: only the heartbeat's expiry tells
                child.wait(10)
                deadline = time.monotonic() + 5
                while not await answer(parent.acquire(("user", "alice"), 3, now)):
                    assert time.monotonic() < deadline, "the dead process's slots were never given back"
                    await asyncio.sleep(0.05)
                assert await answer(parent.acquire(("user", "alice"), 3, now))
                assert not await answer(parent.acquire(("user", "alice"), 3, now))
            finally:
                await parent.close()

        asyncio.run(main())
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait(10)


def test_bandwidth_is_paced_by_the_total_of_both_instances(redis_server: RedisServer) -> None:
    async def main() -> None:
        clock = [100.0]
        a, b = await instances(redis_server.url, 2, clock=lambda: clock[0], lease_seconds=0.1)
        try:
            rate, burst = 1000.0, 1000.0
            # a sends 1500 at once: 500 into debt, as with one bucket (SharedTable says the same).
            assert a.charge("bw", rate, burst, 1500, 100.0) == pytest.approx(0.5)
            await a.flush()  # its report is in Redis: the shared balance is -500
            # b has heard nothing yet: it paces from a full bucket until its own report comes back.
            assert b.charge("bw", rate, burst, 500, 100.0) == 0.0
            await b.flush()
            # Now b knows the total: 2000 sent against 1000 of burst, at 1000/s: one second.
            assert b.charge("bw", rate, burst, 0, 100.0) == pytest.approx(1.0)
            # Half a second later half of it is paid, for both instances.
            assert b.charge("bw", rate, burst, 0, 100.5) == pytest.approx(0.5)
            assert a.charge("bw", rate, burst, 100, 100.5) == pytest.approx(0.1)  # a: its own view
            await a.flush()  # a's report brings b's traffic: 2100 sent in all
            assert a.charge("bw", rate, burst, 0, 100.5) == pytest.approx(0.6)
            # Small chunks are reported in batches (a tenth of a second of the rate), not one by one.
            calls = b.stats["redis_calls"]
            for _ in range(9):
                b.charge("bw", rate, burst, 10, 110.0)
            assert b.stats["redis_calls"] == calls
            b.charge("bw", rate, burst, 10, 110.0)
            await b.flush()
            assert b.stats["redis_calls"] == calls + 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_session_rates_are_shared_and_leased_in_batches(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = await instances(redis_server.url, 2, clock=time.monotonic)
        try:
            now = time.monotonic()
            # A low rate leases one token at a time: exact across instances.
            assert await answer(a.take("slow", 10.0, 3.0, now))
            assert [await answer(b.take("slow", 10.0, 3.0, now)) for _ in range(3)] == [True, True, False]
            assert not await answer(a.take("slow", 10.0, 3.0, now))
            assert await answer(a.take("slow", 10.0, 3.0, now + 0.15))  # 1.5 tokens back at 10/s
            # Sessions waiting on one bucket at once share a lease: one script asks for all of them.
            calls = b.stats["redis_calls"]
            takes = [answer(b.take("burst", 10.0, 3.0, now)) for _ in range(10)]
            assert sum(await asyncio.gather(*takes)) == 3
            assert b.stats["redis_calls"] - calls == 2  # the first (one token), then one for the 9 behind it
            # A high rate leases a batch (rate x 50 ms): the next takes are answered locally.
            assert await answer(a.take("fast", 1000.0, 100.0, now))
            assert all(a.take("fast", 1000.0, 100.0, now) is True for _ in range(20))
            await a.flush()  # the background refill
            granted = [await answer(b.take("fast", 1000.0, 100.0, now)) for _ in range(100)]
            await b.flush()
            taken_by_a = 21
            # The bucket holds 100 at this instant: what a took or holds leased, b cannot have.
            assert granted.count(True) == 100 - taken_by_a - a._tokens["fast"].tokens
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_failed_logins_are_counted_together_and_a_block_reaches_every_instance(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        a, b = await instances(redis_server.url, 2, clock=time.monotonic)
        try:
            ip = ("address", 4, 2130706433)
            assert await answer(a.record(ip, 60.0, 1000.0)) == 1
            assert await answer(b.record(ip, 60.0, 1001.0)) == 2
            assert await answer(b.record(ip, 60.0, 1090.0)) == pytest.approx(2.0)  # as SharedTable
            now = time.monotonic()
            assert await answer(a.block(ip, now + 100, now)) is True
            await eventually(lambda: b.blocked_until(ip, time.monotonic()) > 0)
            assert b.blocked_until(ip, now) == pytest.approx(now + 100, abs=0.5)
            assert await answer(b.block(ip, now + 100, now)) is False  # logged once, by a
            a.forget_events(ip)
            await a.flush()
            assert await answer(b.record(ip, 60.0, 1100.0)) == 1
            # An instance that joins later learns the blocks in force.
            c = RedisState(redis_server.url, instance="late")
            await c.start()
            assert c.blocked_until(ip, time.monotonic()) == pytest.approx(now + 100, abs=0.5)
            await c.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_down_falls_back_to_local_limits_and_rejoins(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        a, b = await instances(redis_server.url, 2, spares=0, lease_ttl=1.0)
        closed = RedisState(redis_server.url, instance="closed", fail_closed=True)
        await closed.start()
        try:
            now = time.monotonic()
            assert await answer(a.acquire("k", 3, now)) and await answer(b.acquire("k", 3, now))
            redis_server.stop()
            # The first ask finds Redis gone and answers from a's own count (1 held): 2 more.
            asks = [await answer(a.acquire("k", 3, now)) for _ in range(4)]
            assert asks == [True, True, False, False]
            assert not a.healthy
            assert a.stats["outages"] == 1
            assert a.charge("bw", 1000.0, 1000.0, 1500, now) == pytest.approx(0.5)  # local bucket
            assert await answer(closed.acquire("k", 3, now)) is False  # fail closed
            assert closed.take("r", 10.0, 10.0, now) is False
            assert a.block("ip", now + 100, now) is True  # a block made during the outage
            late = RedisState(redis_server.url, instance="late")  # starts while Redis is down
            await late.start()
            assert not late.healthy and late.acquire("solo", 1, now) is True
            a.release("k")  # one of the local ones ends
            await eventually(lambda: not b.healthy)  # b finds out at its next heartbeat
            redis_server.start()
            await eventually(lambda: a.healthy and b.healthy and closed.healthy and late.healthy)
            assert a.stats["rejoins"] == 1
            # a registered the 2 sessions it still holds, b its 1: the limit is shared again.
            assert await answer(b.count("k")) == 3
            assert await answer(b.acquire("k", 4, time.monotonic())) is True
            assert await answer(a.acquire("k", 4, time.monotonic())) is False
            assert await answer(closed.acquire("other", 1, time.monotonic())) is True
            await eventually(lambda: b.blocked_until("ip", time.monotonic()) > 0)  # pushed on rejoin
            assert await answer(b.count("solo")) == 1  # late's session, admitted before it joined
        finally:
            for state in (a, b, closed, late):
                await state.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "socksflow.redisstate"]
        assert sum("unreachable" in m for m in messages) == 4  # once per instance, not per operation
        assert sum("is back:" in m for m in messages) == 4
        assert not any("expired" in m for m in messages)

    with caplog.at_level(logging.WARNING, logger="socksflow.redisstate"):
        asyncio.run(main())
