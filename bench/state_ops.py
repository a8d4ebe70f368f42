"""Microseconds per limit-state operation: SharedTable vs RedisState (local-lease hits, misses).

    python3 bench/state_ops.py                 # starts redis-server on a free loopback port
    python3 bench/state_ops.py --url redis://127.0.0.1:6379/0 --hits 50000 --misses 5000

A *hit* is answered from what the instance holds (a spare slot, a leased token, the bandwidth
estimate, the block table); a *miss* asks Redis (one round trip on loopback).  Bounded: each
row runs a fixed count of operations; the whole run takes a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from socksflow.redisstate import RedisState
from socksflow.sharedstate import SharedTable

KEY = ("address", 4, 2130706433)


def per_op(count: int, operation: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(count):
        operation(i)
    return (time.perf_counter() - start) / count * 1e6


async def per_op_async(count: int, operation: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(count):
        result = operation(i)
        if inspect.isawaitable(result):
            await result
    return (time.perf_counter() - start) / count * 1e6


async def measure(url: str, hits: int, misses: int) -> list[tuple[str, float, float, float]]:
    table = SharedTable(workers=2, slots=65536)
    now = time.monotonic()
    local = {
        "acquire+release": per_op(hits, lambda i: (table.acquire(KEY, 1_000_000, now), table.release(KEY))),
        "take (session rate)": per_op(hits, lambda i: table.take(KEY, 1e9, 1e9, now)),
        "charge (bandwidth)": per_op(hits, lambda i: table.charge(KEY, 1e12, 1e12, 1024, now)),
        "blocked_until": per_op(hits, lambda i: table.blocked_until(KEY, now)),
        "record (failed login)": per_op(hits, lambda i: table.record(KEY, 60.0, now)),
    }
    state = RedisState(url, instance="bench")
    await state.start()
    assert state.healthy, f"redis at {url} does not answer"
    try:
        # Hits: a large limit leaves spare slots, a high rate leases big batches.
        hit = {
            "acquire+release": await per_op_async(
                hits, lambda i: (state.acquire(KEY, 1_000_000, now), state.release(KEY))[0]
            ),
            "take (session rate)": await per_op_async(
                hits, lambda i: state.take(KEY, 1e9, 1e9, time.monotonic())
            ),
            "charge (bandwidth)": await per_op_async(
                hits, lambda i: state.charge(KEY, 1e12, 1e12, 1024, time.monotonic())
            ),
            "blocked_until": await per_op_async(hits, lambda i: state.blocked_until(KEY, now)),
        }
        await state.flush()
        # Misses: a limit of 1 leaves no spare (every acquire asks Redis, every release gives
        # back); a rate of 10/s leases one token at a time; a failed login always asks Redis.
        miss = {
            "acquire+release": await per_op_async(
                misses, lambda i: _acquire_then_release(state, ("miss", i % 64), now)
            ),
            "take (session rate)": await per_op_async(
                misses, lambda i: state.take(("rate", i), 10.0, 10.0, time.monotonic())
            ),
            "record (failed login)": await per_op_async(
                misses, lambda i: state.record(("fail", i % 64), 60.0, time.monotonic())
            ),
        }
        await state.flush()
        assert state.healthy and not state.stats["fallback"], state.stats
    finally:
        await state.close()
    nan = float("nan")
    return [(name, local[name], hit.get(name, nan), miss.get(name, nan)) for name in local]


async def pacing(url: str, instances: int, seconds: float) -> tuple[float, int]:
    """Bytes/s four tunnels per instance get from one shared 2 MB/s bucket; Redis calls made."""
    rate, burst, chunk = 2_000_000.0, 200_000.0, 16384
    prefix = f"pacing{time.time_ns()}:"
    states = [RedisState(url, instance=f"p{i}", prefix=prefix) for i in range(instances)]
    for state in states:
        await state.start()
    sent = 0
    stop = time.monotonic() + seconds

    async def tunnel(state: RedisState) -> None:
        nonlocal sent
        while time.monotonic() < stop:
            pause = state.charge("bw", rate, burst, chunk, time.monotonic())
            sent += chunk
            await asyncio.sleep(pause)

    start = time.monotonic()
    await asyncio.gather(*[tunnel(state) for state in states for _ in range(4)])
    elapsed = time.monotonic() - start
    for state in states:
        await state.close()
    return sent / elapsed, sum(state.stats["redis_calls"] for state in states)


async def _acquire_then_release(state: RedisState, key: tuple[str, int], now: float) -> None:
    result = state.acquire(key, 1, now)
    if inspect.isawaitable(result):
        result = await result
    assert result
    state.release(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing Redis (default: start redis-server on loopback)")
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--misses", type=int, default=2000)
    parser.add_argument("--uvloop", action="store_true", help="run the Redis rows on uvloop")
    parser.add_argument(
        "--pacing",
        type=float,
        default=0,
        metavar="S",
        help="also pace 2 MB/s shared by 1-3 instances, S s each",
    )
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found: install it or pass --url")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
    try:
        if args.uvloop:
            import uvloop

            rows = uvloop.run(measure(url, args.hits, args.misses))
        else:
            rows = asyncio.run(measure(url, args.hits, args.misses))
        paced = [asyncio.run(pacing(url, n, args.pacing)) for n in (1, 2, 3)] if args.pacing else []
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
    print(f"µs per operation ({args.hits} hits, {args.misses} misses; one process, Redis on loopback)")
    print("| operation | SharedTable | RedisState hit | RedisState miss |\n|---|---:|---:|---:|")
    for name, local, hit, miss in rows:
        print(f"| {name} | {local:.2f} | {hit:.2f} | {miss:.1f} |".replace("nan", "–"))
    for instances, (bytes_per_second, calls) in enumerate(paced, 1):
        print(
            f"bandwidth 2 MB/s (burst 200 kB) shared by {instances} instance(s) x 4 tunnels: "
            f"{bytes_per_second / 1e6:.3f} MB/s over {args.pacing:g} s, {calls} Redis calls"
        )


if __name__ == "__main__":
    main()
