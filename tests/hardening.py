"""Helpers of the hardening suites: ``socksflow run`` measured through /proc, latency figures.

``ServerProcess`` runs the real command line (optionally with a low ``RLIMIT_NOFILE``) and reads
its open descriptors, memory and CPU time from /proc; its stderr is drained continuously, so a
chatty server never blocks on a full pipe.  ``round_trip`` times one well-behaved CONNECT.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from socksflow.protocol import Address, Command, build_request
from socksflow.testing import loop_args, parse_ready_line

# Runs the CLI with a descriptor limit set in the child itself (no preexec_fn in a threaded pytest).
_LIMITED = (
    "import resource, sys, runpy; "
    "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); "
    "sys.argv[0] = 'socksflow'; runpy.run_module('socksflow', run_name='__main__')"
)


class ServerProcess:
    """``socksflow run --listen LISTEN`` in ``directory``, with ``rules`` as its rules.yaml.

    It runs on the tests' loop (:func:`~socksflow.testing.loop_args`) and with the default
    ``--workers`` (one per usable CPU) unless ``args`` say otherwise; the figures from /proc
    cover the supervisor and its workers.
    """

    def __init__(
        self,
        directory: Path,
        rules: str,
        *args: str,
        nofile: int | None = None,
        listen: str = "127.0.0.1:0",
        log_level: str = "info",
    ) -> None:
        (directory / "rules.yaml").write_text(rules)
        command = ["-m", "socksflow"] if nofile is None else ["-c", _LIMITED, str(nofile)]
        self.process = subprocess.Popen(
            [sys.executable, *command, "--log-level", log_level, "run", "--listen", listen, *loop_args(), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory,
        )  # fmt: skip
        self.pid = self.process.pid
        self._stderr: list[str] = []
        self._pump = threading.Thread(target=self._drain, daemon=True)
        self._pump.start()
        line = self.process.stdout.readline()
        ready = parse_ready_line(line)
        if ready is None:
            self.kill()
            raise AssertionError(f"no ready line: {line!r}\n{self.stderr}")
        self.ready = ready
        self.address = ready.address

    def _drain(self) -> None:
        for line in iter(self.process.stderr.readline, ""):
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_for_log(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert time.monotonic() < deadline, f"no {text!r} in the log within {timeout}s:\n{self.stderr}"
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The server's process and its workers (with ``--workers N``)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [self.pid, *map(int, children)]

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids())

    def rss(self) -> int:
        """Resident memory in bytes, all processes together."""
        total = 0
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """User and system CPU time, all processes together (the workers' too)."""
        ticks = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal, wait for the exit; the exit code (the log stays in ``stderr``)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the exit (after a signal the test sent); the exit code."""
        try:
            self.process.wait(timeout)
        finally:
            self.kill()
        self._pump.join(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(name="server_process")
def server_process_fixture(tmp_path: Path) -> Iterator:
    """Factory: ``server_process(rules, *args, **options)`` (see :class:`ServerProcess`); all are
    stopped after the test."""
    started: list[ServerProcess] = []

    def start(rules: str = "", *args: str, **options: Any) -> ServerProcess:
        process = ServerProcess(tmp_path, rules, *args, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def round_trip(proxy: tuple[str, int], echo: tuple[str, int], source: str = "127.0.0.1") -> float:
    """Seconds for one well-behaved client: connect, greet, CONNECT, echo one message, close."""
    request = build_request(Command.CONNECT, Address.parse("{}:{}".format(*echo)))
    began = time.perf_counter()
    with socket.create_connection(proxy, timeout=10, source_address=(source, 0)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"\x05\x01\x00" + request + b"ping")
        expected = 2 + 10 + 4
        data = b""
        while len(data) < expected:
            chunk = sock.recv(expected - len(data))
            assert chunk, f"closed after {data!r}"
            data += chunk
        assert data[:4] == b"\x05\x00\x05\x00" and data[-4:] == b"ping", data
    return time.perf_counter() - began


def latency(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49] * 1000, 2), "p99_ms": round(cuts[98] * 1000, 2)}


def report(name: str, **figures: object) -> None:
    """Print a measurement on one line (``pytest -s`` shows it; the issue's closing note quotes it)."""
    print(f"\nFIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# ---------------------------------------------------------------------------- a target that sends


class Firehose:
    """A target that sends each client ``size`` bytes of a known stream as fast as TCP lets it.

    ``sent[i]`` counts what connection ``i`` took so far; ``ended[i]`` is set when its sending
    stopped, and ``errors[i]`` says why if the connection broke first.
    """

    BLOCK = 65536

    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.sent: list[int] = []
        self.ended: list[threading.Event] = []
        self.errors: list[OSError | None] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def block(cls, number: int) -> bytes:
        """Block ``number`` of the stream: 64 KiB, different for each number."""
        return hashlib.sha256(struct.pack("!Q", number)).digest() * (cls.BLOCK // 32)

    def expected_sha256(self) -> bytes:
        digest = hashlib.sha256()
        for number in range(self.size // self.BLOCK):
            digest.update(self.block(number))
        return digest.digest()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sent.append(0)
            self.errors.append(None)
            self.ended.append(threading.Event())
            thread = threading.Thread(target=self._send, args=(conn, len(self.sent) - 1), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _send(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                for number in range(self.size // self.BLOCK):
                    conn.sendall(self.block(number))
                    self.sent[index] += self.BLOCK
            except OSError as exc:
                self.errors[index] = exc
            finally:
                self.ended[index].set()

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture(name="firehose")
def firehose_fixture() -> Iterator[Firehose]:
    """A :class:`Firehose` of 64 MiB per connection."""
    target = Firehose(64 * 1024 * 1024)
    yield target
    target.close()
