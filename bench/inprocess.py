"""Engine costs measured in one process, steadier than bench/run.py on a loaded machine.

    python bench/inprocess.py [sessions|udp|idle|calls|garbage ...]

Each figure runs socksflow (``socksflow.testing.AsyncServer``, so the ``test`` extra is needed)
and its clients on one event loop over loopback, and counts what the process spends:

* ``sessions``: CPU (user+system) per CONNECT session: greeting, CONNECT by IPv4, 64 bytes
  echoed, close; 3,000 sessions, 50 at a time.  Client and echo target included.
* ``udp``: CPU per datagram round trip through a UDP association (64-byte payloads, 64 in
  flight, 20,000 datagrams), client and echo included.
* ``idle``: bytes allocated (tracemalloc) per idle tunnel, for 1,000 tunnels.
* ``calls``: Python function calls per session (cProfile): deterministic, so a change in the
  engine's per-session work shows even when the machine is too loaded for timings.
* ``garbage``: objects per session that only the cyclic garbage collector frees (they are
  walked by every collection until then); deterministic too.  Client and target included.

Compare two checkouts by running each with its own tree first on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import pstats
import sys
import time
import tracemalloc

from socksflow.testing import AsyncServer

CONFIG = "listen: [127.0.0.1:0]\nauth: {methods: [none]}\n"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def _connect_request(port: int) -> bytes:
    return b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")


async def _session(proxy: tuple[str, int], port: int) -> None:
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(_connect_request(port))
    await reader.readexactly(12)
    writer.write(b"x" * 64)
    await reader.readexactly(64)
    writer.write_eof()
    await reader.read()
    writer.close()


async def _sessions(count: int, profile: cProfile.Profile | None = None) -> float:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    async with AsyncServer(CONFIG) as server:
        proxy = (server.host, server.port)
        for _ in range(50):  # warm up
            await _session(proxy, port)
        began = time.process_time()
        if profile is not None:
            profile.enable()
        for _ in range(count // 50):
            await asyncio.gather(*(_session(proxy, port) for _ in range(50)))
        while server.server.sessions:
            await asyncio.sleep(0.001)
        if profile is not None:
            profile.disable()
        spent = time.process_time() - began
    target.close()
    return spent


def sessions() -> str:
    count = 3000
    return f"sessions: {asyncio.run(_sessions(count)) / count * 1e6:.1f} us CPU per session (client and target included)"


def calls() -> str:
    count = 1500
    profile = cProfile.Profile()
    asyncio.run(_sessions(count, profile))
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(nc for (_, nc, _, _, _) in stats.values())
    own = sum(
        nc for (file, _, _), (_, nc, _, _, _) in stats.items() if "socksflow" in file or "plugins" in file
    )
    return f"calls: {total / count:.1f} Python calls per session, {own / count:.1f} of them socksflow's"


def garbage() -> str:
    count = 500
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, to be counted
    try:
        asyncio.run(_sessions(count))
        gc.collect()
        found = [type(o) for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    own = sum(1 for kind in found if kind.__module__.startswith(("socksflow", "plugins")))
    return (
        f"garbage: {len(found) / count:.1f} objects per session left to the cyclic collector, "
        f"{own / count:.1f} of them socksflow's"
    )


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self, count: int) -> None:
        self.count = count
        self.sent = self.received = 0
        self.done = asyncio.Event()
        self.relay: tuple[str, int] = ("", 0)
        self.header = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.send()

    def send(self) -> None:
        if self.sent < self.count:
            self.sent += 1
            self.transport.sendto(self.header + b"x" * 64, self.relay)
        if self.received >= self.count:
            self.done.set()


async def _udp(count: int) -> float:
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    echo_port = echo.get_extra_info("sockname")[1]
    async with AsyncServer(CONFIG) as server:
        transport, client = await loop.create_datagram_endpoint(
            lambda: _UdpClient(count), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        reply = (await reader.readexactly(12))[2:]
        client.relay = ("127.0.0.1", int.from_bytes(reply[8:10], "big"))
        client.header = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
        began = time.process_time()
        for _ in range(64):
            client.send()
        await asyncio.wait_for(client.done.wait(), 120)
        spent = time.process_time() - began
        writer.close()
        transport.close()
        while server.server.sessions:
            await asyncio.sleep(0.01)
    echo.close()
    return spent


def udp() -> str:
    count = 20000
    return f"udp: {asyncio.run(_udp(count)) / count * 1e6:.2f} us CPU per datagram round trip (client and echo included)"


async def _idle(count: int) -> int:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    async with AsyncServer(CONFIG) as server:

        async def tunnel() -> asyncio.StreamWriter:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(_connect_request(port) + b"x")
            await reader.readexactly(13)
            return writer

        writers = [await tunnel() for _ in range(50)]
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        writers += [await tunnel() for _ in range(count)]
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        for writer in writers:
            writer.close()
        while server.server.sessions:
            await asyncio.sleep(0.01)
    target.close()
    return used


def idle() -> str:
    count = 1000
    return f"idle: {asyncio.run(_idle(count)) / count:.0f} bytes allocated per idle tunnel (client and target included)"


FIGURES = {"sessions": sessions, "udp": udp, "idle": idle, "calls": calls, "garbage": garbage}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(FIGURES):
        print(FIGURES[name]())
