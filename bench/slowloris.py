"""Slowloris: what a handshake flood costs good clients, socksflow against a trivial server.

    python3 bench/slowloris.py                       # 3000 stalled + 2000 silent, 8 s measured each
    python3 bench/slowloris.py --stalled 300 --silent 200 --seconds 3 --json   # a short run

The attack (one process, from 127.0.0.1): ``--stalled`` connections send ``05`` (a greeting's
first byte) and stall, ``--silent`` ones send nothing; each is reopened as soon as the server
closes it, so every handshake deadline brings a burst of reconnects.  Meanwhile a good client
(this process, from 127.0.0.2) connects every few milliseconds, sends ``05 01 00`` and times
the ``05 00`` answer; a connect that takes ~1 s or more is a SYN the kernel dropped (the listen
queue overflowed), and ``TcpExt ListenOverflows`` (``/proc/net/netstat``, machine-wide) counts
them too.  The same attack and client run, one after the other, against ``socksflow run`` with
``timeouts: {handshake: 2s}`` and against a trivial server on the same event loop that accepts,
arms a 2 s timer, answers a full greeting and closes at the timer: the cost of socksflow
itself.  Everything listens and connects on loopback; counts shrink to fit ``RLIMIT_NOFILE``
(raised to its hard limit first), and every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HANDSHAKE_SECONDS = 2.0
DROPPED_SYN_SECONDS = 0.9  # Linux retransmits a SYN after 1 s: a connect this slow lost one
ATTACKER = "127.0.0.1"
GOOD_CLIENT = "127.0.0.2"
HEADROOM = 256  # descriptors kept for everything but the attack's sockets


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen_overflows() -> int:
    """TcpExt ListenOverflows + ListenDrops, machine-wide (other processes count too)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return table.get("ListenOverflows", 0) + table.get("ListenDrops", 0)
    return 0


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# ---------------------------------------------------------------------------- the trivial server


class Trivial(asyncio.Protocol):
    """Accept, arm the handshake timer, answer ``05 00`` to a full greeting, close at the timer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.data = b""
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= 2 and len(self.data) >= 2 + self.data[1]:
            self.transport.write(b"\x05\x00")  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def trivial_server(loop_kind: str) -> None:
    loop = new_loop(loop_kind)
    backlog = int(Path("/proc/sys/net/core/somaxconn").read_text())
    server = loop.run_until_complete(loop.create_server(Trivial, "127.0.0.1", 0, backlog=backlog))
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


# ---------------------------------------------------------------------------- the attack


class Loris(asyncio.Protocol):
    def __init__(self, attack: Attack, stall: bool) -> None:
        self.attack, self.stall = attack, stall

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.stall:
            transport.write(b"\x05")  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.attack.reopen(self.stall)


class Attack:
    def __init__(self, port: int, until: float) -> None:
        self.port, self.until = port, until
        self.loop = asyncio.get_running_loop()
        self.opened = 0

    def reopen(self, stall: bool) -> None:
        if time.monotonic() < self.until:
            self.loop.create_task(self.open(stall))

    async def open(self, stall: bool) -> None:
        try:
            await self.loop.create_connection(
                lambda: Loris(self, stall), "127.0.0.1", self.port, local_addr=(ATTACKER, 0)
            )
            self.opened += 1
        except OSError:
            await asyncio.sleep(0.05)
            self.reopen(stall)


async def attack(port: int, stalled: int, silent: int, seconds: float) -> None:
    flood = Attack(port, time.monotonic() + seconds)
    await asyncio.gather(
        *(flood.open(True) for _ in range(stalled)), *(flood.open(False) for _ in range(silent))
    )
    await asyncio.sleep(max(0.0, flood.until - time.monotonic()))
    print(json.dumps({"opened": flood.opened}), flush=True)


# ---------------------------------------------------------------------------- the good client


def good_client(port: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """(connect seconds, greeting seconds) for each session until ``stop``."""
    while not stop.is_set():
        began = time.perf_counter()
        try:
            with socket.socket() as sock:
                sock.settimeout(10)
                sock.bind((GOOD_CLIENT, 0))
                sock.connect(("127.0.0.1", port))
                connected = time.perf_counter()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"\x05\x01\x00")
                answer = sock.recv(2)
                answered = time.perf_counter()
        except OSError:
            samples.append((float("inf"), float("inf")))
            continue
        samples.append((connected - began, answered - connected if answer == b"\x05\x00" else float("inf")))
        time.sleep(0.005)


def percentile(values: list[float], cut: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[cut - 1] if len(values) > 1 else values[0]


def measure(name: str, port: int, args: argparse.Namespace, stalled: int, silent: int) -> dict:
    warmup = 3.0
    attacker = subprocess.Popen(
        [sys.executable, __file__, "--attack-port", str(port), "--stalled", str(stalled),
         "--silent", str(silent), "--seconds", str(warmup + args.seconds), "--loop", args.loop],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(warmup)  # the flood is open, and its first deadlines have come and gone
        overflows = listen_overflows()
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        client = threading.Thread(target=good_client, args=(port, stop, samples))
        client.start()
        time.sleep(args.seconds)
        stop.set()
        client.join()
        overflows = listen_overflows() - overflows
        opened = json.loads(attacker.communicate(timeout=60)[0].strip().splitlines()[-1])["opened"]
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    connects = [c for c, _ in samples]
    greetings = [g for _, g in samples]
    return {
        "server": name,
        "sessions": len(samples),
        "failed": sum(g == float("inf") for g in greetings),
        "greeting_p50_ms": round(percentile(greetings, 50) * 1000, 2),
        "greeting_p99_ms": round(percentile(greetings, 99) * 1000, 2),
        "greeting_max_ms": round(max(greetings) * 1000, 2),
        "connect_p99_ms": round(percentile(connects, 99) * 1000, 2),
        "dropped_syns": sum(c >= DROPPED_SYN_SECONDS for c in connects),
        "listen_overflows": overflows,
        "attack_connections_opened": opened,
    }


# ---------------------------------------------------------------------------- the servers


def start(command: list[str], **options) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
    line = process.stdout.readline()  # type: ignore[union-attr]
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"{command[:4]} did not start: {line!r} {process.communicate()[1][-2000:]}")
    return process, int(line.split(" (")[0].rsplit(":", 1)[1])  # socksflow's ends " (LOOP, N workers)"


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=30)[1] or ""
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1] or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stalled", type=int, default=3000, help="connections that send 05 and stall")
    parser.add_argument("--silent", type=int, default=2000, help="connections that send nothing")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds measured per server")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop", help="both servers' loop")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--attack-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trivial-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    if args.trivial_server:
        trivial_server(args.loop)
        return 0
    if args.attack_port:
        loop = new_loop(args.loop)
        loop.run_until_complete(attack(args.attack_port, args.stalled, args.silent, args.seconds))
        return 0
    share = max(0.0, min(1.0, (nofile - HEADROOM) / max(1, args.stalled + args.silent)))
    stalled, silent = int(args.stalled * share), int(args.silent * share)
    results = []
    trivial, port = start([sys.executable, __file__, "--trivial-server", "--loop", args.loop])
    try:
        results.append(measure("trivial", port, args, stalled, silent))
    finally:
        stop(trivial)
    with tempfile.TemporaryDirectory(prefix="socksflow-slowloris-") as folder:
        Path(folder, "rules.yaml").write_text(f"timeouts: {{handshake: {HANDSHAKE_SECONDS:g}s}}\n")
        env = {**os.environ, "SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}
        command = [sys.executable, "-m", "socksflow", "--log-level", "warning", "run", "--loop", args.loop,
                   "--workers", "1", "--listen", "127.0.0.1:0"]  # fmt: skip  # one process, as the trivial server
        server, port = start(command, cwd=folder, env=env)
        try:
            results.append(measure("socksflow", port, args, stalled, silent))
        finally:
            log = stop(server)
    report = {
        "attack": {"stalled": stalled, "silent": silent, "seconds": args.seconds, "loop": args.loop},
        "results": results,
        "p99_ratio": round(results[1]["greeting_p99_ms"] / max(0.01, results[0]["greeting_p99_ms"]), 2),
        "server_log_lines": len(log.splitlines()),
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
