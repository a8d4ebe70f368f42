"""Reload and shutdown under load, with one process and with ``--workers 2``.

Extends ``test_cli.py`` (which checks a reload's log lines, a rejected reload, and one session
drained at SIGTERM): here a reload happens while 100 downloads run, and a shutdown refuses new
clients, lets a finishing session finish and cuts the rest at the deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import time

import pytest
from hardening import Firehose, report, server_process_fixture  # noqa: F401 - a fixture

from socksflow.protocol import Address, Command, build_request
from socksflow.testing import Socks5Client, socks5_handshake

DOWNLOADS = 100
SIZE = 2 * 1024 * 1024


@pytest.fixture
def slow_downloads():
    target = Firehose(SIZE)
    yield target
    target.close()


async def download(proxy: tuple[str, int], port: int, started: asyncio.Event, count: list[int]) -> bytes:
    """A download read slowly (about 3 MB/s), so that it is still running when the test acts."""
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"\x05\x01\x00" + build_request(Command.CONNECT, Address.parse(f"127.0.0.1:{port}")))
    reply = await reader.readexactly(12)
    assert reply[:4] == b"\x05\x00\x05\x00", reply
    digest, received = hashlib.sha256(), 0
    while received < SIZE:
        chunk = await reader.read(65536)
        assert chunk, f"a download broke after {received} bytes"
        digest.update(chunk)
        received += len(chunk)
        if received == len(chunk):
            count[0] += 1
            if count[0] == DOWNLOADS:
                started.set()
        await asyncio.sleep(0.02)
    writer.close()
    await writer.wait_closed()
    return digest.digest()


def rules(deny_port: int | None = None) -> str:
    deny = f"  - deny: {{port: [{deny_port}]}}\n    reason: reloaded\n" if deny_port else ""
    return f"timeouts: {{shutdown: 10s}}\nrules:\n{deny}  - allow: all\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_reload_during_100_downloads(server_process, slow_downloads, echo_target, tmp_path, workers):
    proxy = server_process(rules(), "--workers", workers)
    port = slow_downloads.port

    async def scenario() -> tuple[list[bytes], list[int]]:
        started, count = asyncio.Event(), [0]
        downloads = [
            asyncio.ensure_future(download(proxy.address, port, started, count)) for _ in range(DOWNLOADS)
        ]
        async with asyncio.timeout(30):
            await started.wait()  # every download has its first bytes
        (tmp_path / "rules.yaml").write_text(rules(deny_port=port))
        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while proxy.stderr.count("configuration reloaded") < int(workers):
            assert time.monotonic() < deadline, proxy.stderr
            await asyncio.sleep(0.05)
        after = [await asyncio.to_thread(new_session_code, proxy.address, port) for _ in range(10)]
        assert sum(1 for d in downloads if d.done()) < DOWNLOADS  # the reload happened mid-transfer
        return await asyncio.gather(*downloads), after

    digests, codes_after = asyncio.run(scenario())
    expected = hashlib.sha256(b"".join(Firehose.block(n) for n in range(SIZE // Firehose.BLOCK))).digest()
    assert digests == [expected] * DOWNLOADS  # none broken, every byte in order
    assert codes_after == [0x02] * 10  # new sessions see the new rules (whichever worker takes them)
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
    client.close()
    assert code == 0
    assert proxy.stop() == 0


def new_session_code(address: tuple[str, int], port: int) -> int:
    code, client = socks5_handshake(address, f"127.0.0.1:{port}")
    client.close()
    return code


def echo(client, message: bytes) -> bytes:
    client.sock.sendall(message)
    return client.recv_exactly(len(message))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_refuses_new_clients_drains_then_cuts_at_the_deadline(server_process, echo_target, workers):
    proxy = server_process("timeouts: {shutdown: 2s}\n", "--workers", workers)
    finishing, lingering = (
        socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")[1] for _ in range(2)
    )
    proxy.send_signal(signal.SIGTERM)
    proxy.wait_for_log("SIGTERM received: stopping (sessions get up to 2s)")
    began = time.monotonic()
    deadline = began + 5
    while True:  # new clients: the listeners are closed (with workers, as each worker stops)
        try:
            socket.create_connection(proxy.address, timeout=2).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.05)
    assert echo(finishing, b"finishing") == b"finishing"  # running sessions keep working
    finishing.close()
    assert echo(lingering, b"lingering") == b"lingering"
    lingering.sock.settimeout(10)
    assert lingering.sock.recv(1) == b""  # cut at the deadline
    cut_after = time.monotonic() - began
    lingering.close()
    assert proxy.wait(timeout=10) == 0  # no second signal: that one would mean "stop now"
    report(f"sigterm-workers-{workers}", cut_after_s=round(cut_after, 2))
    assert 1.5 < cut_after < 4.5
    log = proxy.stderr
    assert log.count("closing 1 sessions still open after 2s") == 1  # the finished one is not cut
    assert log.count("INFO socksflow: stopped") == int(workers)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_sigterm_stops_at_once(server_process, echo_target, workers):
    proxy = server_process("timeouts: {shutdown: 30s}\n", "--workers", workers)
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0
    proxy.send_signal(signal.SIGTERM)
    proxy.wait_for_log("SIGTERM received")
    time.sleep(0.3)
    began = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    client.sock.settimeout(10)
    assert client.sock.recv(1) == b""
    assert time.monotonic() - began < 2  # not the 30 s drain
    client.close()
    assert proxy.wait(timeout=10) == 0


def test_workers_give_unique_session_ids_and_name_themselves_in_the_log(
    server_process, echo_target, tmp_path
):
    """Issue #13: two ``session=1`` lines with --workers, log lines that did not say which worker,
    and an application log whose times did not look like the access log's."""
    proxy = server_process("log: {access: {format: json, file: access.log}}\n", "--workers", "2")
    for _ in range(40):  # SO_REUSEPORT spreads connections by their ports: both workers get some
        with Socks5Client(proxy.address) as client:
            client.greet()
            assert client.connect(f"127.0.0.1:{echo_target[1]}")[0] == 0
    proxy.send_signal(signal.SIGHUP)  # each worker reloads, and logs it
    deadline = time.monotonic() + 15
    while proxy.stderr.count("configuration reloaded") < 2:
        assert time.monotonic() < deadline, proxy.stderr
        time.sleep(0.05)
    assert proxy.stop() == 0
    records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    ids = [record["session"] for record in records]
    assert len(ids) == 40 and len(set(ids)) == 40, ids
    assert {session.split("-")[0] for session in ids} == {"w0", "w1"}
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # the access log's "time", to the millisecond
    assert all(re.fullmatch(stamp, record["time"]) for record in records)
    lines = proxy.stderr.splitlines()
    assert all(re.match(stamp + r" (\[worker \d\] )?[A-Z]+ ", line) for line in lines), lines[:5]
    for number in (0, 1):
        tagged = rf" \[worker {number}\] INFO socksflow\.server: configuration reloaded"
        assert any(re.match(stamp + tagged, line) for line in lines), lines
