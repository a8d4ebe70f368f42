"""Soak: a mixed load on ``socksflow run`` for a while, every transfer verified, then no leaks.

    python3 bench/soak.py --minutes 10            # the documented long soak
    python3 bench/soak.py --seconds 30 --json     # what tests/test_soak.py runs (shorter)

Starts ``socksflow run`` on 127.0.0.1 (a subprocess, measured through /proc) and targets in this
process, then runs ``--concurrency`` clients that repeat, at random: CONNECT downloads and
uploads of random sizes (each checked by SHA-256 against what was generated), UDP ASSOCIATE
echoes (every datagram checked), BIND with the client as the peer (both directions checked),
and downloads the client abandons part-way (a close or a reset).  Afterwards it waits for the
sessions to drain and compares the server's open descriptors, asyncio tasks and memory with a
baseline taken after a warm-up.  Exit code 1 on any failed transfer or leak.

The server's task and session counts come from a probe plugin written next to its rules file:
on SIGUSR2 it logs ``probe: tasks=N sessions=M``.  Everything binds and connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MAX_TRANSFER = 4 * 1024 * 1024
CHUNK = 65536
OPERATIONS = {"download": 4, "upload": 3, "udp": 2, "bind": 1, "abort": 2}  # relative weights
RSS_SLACK = 24 * 1024 * 1024  # allocator arenas that Python keeps after a burst

PROBE = """
import asyncio, logging, signal


def socksflow_startup(server):
    log = logging.getLogger("probe")

    def report():
        tasks = len(asyncio.all_tasks())
        log.warning("probe: tasks=%d sessions=%d", tasks, len(server.sessions))

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, report)
"""
RULES = """\
listen: [127.0.0.1:0]
plugins: {{paths: [probe.py]}}
timeouts: {{handshake: 10s, idle: 30s, shutdown: 5s}}
bind: {{timeout: 10s, peer_check: ip}}
udp: {{idle: 30s}}
{extra}"""


# ---------------------------------------------------------------------------- the data


def stream(seed: int, size: int) -> list[bytes]:
    """``size`` deterministic pseudo-random bytes, in chunks: the same for the same seed."""
    generator = random.Random(seed)
    chunks, left = [], size
    while left:
        chunks.append(generator.randbytes(min(CHUNK, left)))
        left -= len(chunks[-1])
    return chunks


def sha256_of(chunks: list[bytes]) -> bytes:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


# ---------------------------------------------------------------------------- targets


class Targets:
    """Download (send what the header asks for), upload (answer the SHA-256) and UDP echo."""

    def __init__(self) -> None:
        self.download = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.upload = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self._threads = [
            threading.Thread(target=self._accept, args=(self.download, self._send), daemon=True),
            threading.Thread(target=self._accept, args=(self.upload, self._digest), daemon=True),
            threading.Thread(target=self._echo, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def port(self, name: str) -> int:
        return getattr(self, name).getsockname()[1]

    @staticmethod
    def _accept(listener: socket.socket, handle) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=Targets._serve, args=(conn, handle), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, handle) -> None:
        with conn, contextlib.suppress(OSError):
            handle(conn)

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    @staticmethod
    def _send(conn: socket.socket) -> None:
        seed, size = struct.unpack("!QQ", Targets._read(conn, 16))
        for chunk in stream(seed, size):
            conn.sendall(chunk)

    @staticmethod
    def _digest(conn: socket.socket) -> None:
        (size,) = struct.unpack("!Q", Targets._read(conn, 8))
        digest = hashlib.sha256()
        while size:
            chunk = conn.recv(min(size, 1 << 20))
            if not chunk:
                return
            digest.update(chunk)
            size -= len(chunk)
        conn.sendall(digest.digest())

    def _echo(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65536)
                if peer is None:  # shut down
                    return
                self.udp.sendto(data, peer)
            except OSError:
                return

    def close(self) -> None:
        for sock in (self.download, self.upload, self.udp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# ---------------------------------------------------------------------------- the server


class Server:
    """``socksflow run`` in ``directory``; descriptors, memory and the probe's counts from outside."""

    READY = re.compile(r"^socksflow: listening on (\S+):(\d+)")  # then " (LOOP, 1 worker)"

    def __init__(self, directory: Path, extra_rules: str = "", args: tuple[str, ...] = ()) -> None:
        (directory / "probe.py").write_text(PROBE)
        (directory / "rules.yaml").write_text(RULES.format(extra=extra_rules))
        self.process = subprocess.Popen(
            # one process: the probe (SIGUSR2) and the /proc figures are that process's
            [sys.executable, "-m", "socksflow", "run", "--workers", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory,
        )  # fmt: skip
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.process.stdout.readline().strip()
        match = self.READY.match(line)
        if not match:
            self.stop()
            raise RuntimeError(f"socksflow did not start: {line!r}\n{''.join(self.log)}")
        self.address = (match[1], int(match[2]))

    def _drain(self) -> None:
        for line in iter(self.process.stderr.readline, ""):
            self.log.append(line)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024

    def probe(self) -> tuple[int, int]:
        """(asyncio tasks, open sessions) inside the server."""
        seen = len(self.log)
        self.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.log[seen:]:
                found = re.search(r"probe: tasks=(\d+) sessions=(\d+)", line)
                if found:
                    return int(found[1]), int(found[2])
            time.sleep(0.02)
        raise RuntimeError("the probe did not answer")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


# ---------------------------------------------------------------------------- the clients


class Failed(Exception):
    """A transfer that did not deliver exactly what was sent."""


@dataclass
class Tally:
    sessions: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0
    datagrams_verified: int = 0
    errors: list[str] = field(default_factory=list)


async def socks_open(proxy, command: int, host: str, port: int):
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(
        b"\x05\x01\x00" + bytes((5, command, 0, 1)) + socket.inet_aton(host) + struct.pack("!H", port)
    )
    reply = await reader.readexactly(12)
    if reply[:2] != b"\x05\x00" or reply[2:4] != b"\x05\x00":
        writer.close()
        raise Failed(f"command {command} to {host}:{port}: reply {reply.hex()}")
    bound = (socket.inet_ntoa(reply[6:10]), struct.unpack("!H", reply[10:12])[0])
    return reader, writer, bound


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def download(proxy, targets: Targets, rng: random.Random, tally: Tally) -> None:
    seed, size = rng.getrandbits(63), rng.randint(0, MAX_TRANSFER)
    reader, writer, _ = await socks_open(proxy, 1, "127.0.0.1", targets.port("download"))
    writer.write(struct.pack("!QQ", seed, size))
    digest = hashlib.sha256()
    received = 0
    while received < size:
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise Failed(f"download closed after {received} of {size} bytes")
        digest.update(chunk)
        received += len(chunk)
    await close(writer)
    if digest.digest() != sha256_of(stream(seed, size)):
        raise Failed(f"download of {size} bytes: wrong content")
    tally.bytes_verified += size


async def upload(proxy, targets: Targets, rng: random.Random, tally: Tally) -> None:
    seed, size = rng.getrandbits(63), rng.randint(0, MAX_TRANSFER)
    chunks = stream(seed, size)
    reader, writer, _ = await socks_open(proxy, 1, "127.0.0.1", targets.port("upload"))
    writer.write(struct.pack("!Q", size))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    answer = await reader.readexactly(32)
    await close(writer)
    if answer != sha256_of(chunks):
        raise Failed(f"upload of {size} bytes: the target got something else")
    tally.bytes_verified += size


async def udp_echo(proxy, targets: Targets, rng: random.Random, tally: Tally) -> None:
    _, writer, relay = await socks_open(proxy, 3, "0.0.0.0", 0)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", targets.port("udp"))
    try:
        for _ in range(rng.randint(1, 20)):
            payload = rng.randbytes(rng.randint(1, 1400))
            for attempt in range(3):  # UDP: a datagram lost under load is sent again
                await loop.sock_sendto(sock, header + payload, relay)
                try:
                    async with asyncio.timeout(2):
                        answer = await loop.sock_recv(sock, 65536)
                    break
                except TimeoutError:
                    if attempt == 2:
                        raise Failed("UDP: no echo after 3 tries") from None
            if answer != header + payload:
                raise Failed("UDP: the echo differs")
            tally.datagrams_verified += 1
    finally:
        sock.close()
        await close(writer)


async def bind(proxy, targets: Targets, rng: random.Random, tally: Tally) -> None:
    reader, writer, listening = await socks_open(proxy, 2, "127.0.0.1", 0)
    peer_reader, peer_writer = await asyncio.open_connection(*listening)
    second = await reader.readexactly(10)
    if second[:2] != b"\x05\x00":
        raise Failed(f"BIND second reply {second.hex()}")
    up, down = rng.randbytes(rng.randint(1, 200_000)), rng.randbytes(rng.randint(1, 200_000))
    writer.write(up)
    peer_writer.write(down)
    got_up, got_down = await asyncio.gather(peer_reader.readexactly(len(up)), reader.readexactly(len(down)))
    await close(writer)
    await close(peer_writer)
    if (got_up, got_down) != (up, down):
        raise Failed("BIND: the bytes differ")
    tally.bytes_verified += len(up) + len(down)


async def abort(proxy, targets: Targets, rng: random.Random, tally: Tally) -> None:
    reader, writer, _ = await socks_open(proxy, 1, "127.0.0.1", targets.port("download"))
    writer.write(struct.pack("!QQ", rng.getrandbits(63), MAX_TRANSFER))
    with contextlib.suppress(asyncio.IncompleteReadError):
        await reader.readexactly(rng.randint(0, MAX_TRANSFER // 2))
    if rng.random() < 0.5:  # a reset, as a client that vanishes
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await close(writer)


ACTIONS = {"download": download, "upload": upload, "udp": udp_echo, "bind": bind, "abort": abort}


async def client(proxy, targets: Targets, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    names, weights = list(OPERATIONS), list(OPERATIONS.values())
    while time.monotonic() < until:
        name = rng.choices(names, weights)[0]
        try:
            async with asyncio.timeout(60):
                await ACTIONS[name](proxy, targets, rng, tally)
            tally.sessions[name] += 1
        except (Failed, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            tally.errors.append(f"{name}: {type(exc).__name__}: {exc}")


async def load(proxy, targets: Targets, seconds: float, concurrency: int, seed: int) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(proxy, targets, seed + n, until, tally) for n in range(concurrency)))
    return tally


# ---------------------------------------------------------------------------- the soak


def measure(server: Server) -> dict[str, int]:
    tasks, sessions = server.probe()
    return {"fds": server.fds(), "tasks": tasks, "sessions": sessions, "rss": server.rss()}


def settle(server: Server, baseline: dict[str, int], seconds: float = 15) -> dict[str, int]:
    """Measure once the sessions have drained and descriptors are back (or the time is up)."""
    deadline = time.monotonic() + seconds
    while True:
        now = measure(server)
        if (now["sessions"] == 0 and now["fds"] <= baseline["fds"]) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def soak(seconds: float, concurrency: int = 16, seed: int = 1, server_args: tuple[str, ...] = ()) -> dict:
    """Run the soak; the figures and the verdict as a dict."""
    targets = Targets()
    with tempfile.TemporaryDirectory(prefix="socksflow-soak-") as directory:
        server = Server(Path(directory), args=server_args)
        try:
            cold = measure(server)
            asyncio.run(load(server.address, targets, 2, 4, seed + 10_000))  # warm-up: caches, pools
            warm = settle(server, cold)
            began = time.monotonic()
            tally = asyncio.run(load(server.address, targets, seconds, concurrency, seed))
            took = time.monotonic() - began
            after = settle(server, warm)
        finally:
            exit_code = server.stop()
            targets.close()
    leaks = [
        f"{key}: {warm[key]} before, {after[key]} after"
        for key in ("fds", "tasks", "sessions")
        if after[key] > warm[key]
    ]
    if after["rss"] > warm["rss"] + RSS_SLACK:
        leaks.append(f"rss: {warm['rss']} before, {after['rss']} after")
    mib = 1024 * 1024
    return {
        "seconds": round(took, 1),
        "concurrency": concurrency,
        "sessions": dict(tally.sessions),
        "sessions_total": sum(tally.sessions.values()),
        "bytes_verified": tally.bytes_verified,
        "mib_verified": round(tally.bytes_verified / mib, 1),
        "datagrams_verified": tally.datagrams_verified,
        "errors": tally.errors[:20],
        "error_count": len(tally.errors),
        "cold": {**cold, "rss_mib": round(cold["rss"] / mib, 1)},
        "before": {**warm, "rss_mib": round(warm["rss"] / mib, 1)},
        "after": {**after, "rss_mib": round(after["rss"] / mib, 1)},
        "leaks": leaks,
        "exit_code": exit_code,
        "ok": not tally.errors and not leaks and exit_code == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run the load (default 10)")
    length.add_argument("--seconds", type=float, help="the same, in seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at a time (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="for the random choices and data")
    parser.add_argument(
        "--socksflow-args", default="", help="extra arguments for socksflow run, e.g. '--loop asyncio'"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    result = soak(seconds, args.concurrency, args.seed, tuple(args.socksflow_args.split()))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['sessions_total']} sessions in {result['seconds']} s: {result['sessions']}")
        print(f"verified: {result['mib_verified']} MiB, {result['datagrams_verified']} datagrams; "
              f"errors: {result['error_count']}")  # fmt: skip
        for key in ("before", "after"):
            figures = result[key]
            print(f"{key:>6}: fds {figures['fds']}, tasks {figures['tasks']}, sessions {figures['sessions']}, "
                  f"rss {figures['rss_mib']} MiB")  # fmt: skip
        for line in result["errors"] + result["leaks"]:
            print(f"FAIL {line}")
        print("OK" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
