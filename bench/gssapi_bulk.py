"""Bulk MB/s through socksflow with and without GSSAPI protection, in one run.

Starts a Kerberos KDC in a temporary directory (``tests/kdc.py``: needs krb5-kdc, krb5-admin-server,
krb5-user and ``pip install 'socksflow[gssapi]'``), one ``socksflow run`` process accepting
both no authentication and GSSAPI, and a target process that sends N bytes per connection;
then downloads N bytes through the proxy, per mode, ``--runs`` times:

* ``no auth``: method 0x00 — the zero-copy relay (the baseline);
* ``gssapi, none``: a Kerberos login, then level 0 (no protection) — still the fast path;
* ``gssapi, integrity`` / ``gssapi, confidentiality``: every byte in RFC 1961 frames,
  wrapped by the proxy and unwrapped by this client.

Reported per mode: the median MB/s (MB = 10^6 bytes) and the CPU seconds the proxy process and
this client spent per GB.  The client's unwrapping runs in parallel with the proxy's wrapping,
so MB/s is bounded by the slower of the two; the proxy's CPU per GB is its own cost.
Everything binds and connects to 127.0.0.1 only::

    python bench/gssapi_bulk.py                  # 256 MiB per download, 3 runs per mode
    python bench/gssapi_bulk.py --mib 64 --runs 1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gssclient import GssClient  # noqa: E402
from kdc import start_kdc  # noqa: E402

from socksflow.protocol import Method, Reply  # noqa: E402
from socksflow.testing import Socks5Client  # noqa: E402

# The target: for each connection, read an 8-byte length, send that many bytes, close.
TARGET = r"""
import os, socket, sys, threading
pattern = memoryview(os.urandom(1 << 20))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
def serve(conn):
    with conn:
        size = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        while size > 0:
            size -= conn.send(pattern[: min(size, len(pattern))])
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

MODES = [("no auth", None), ("gssapi, none", 0), ("gssapi, integrity", 1), ("gssapi, confidentiality", 2)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def download(proxy, kdc, target_port: int, size: int, level: int | None) -> None:
    """One download of ``size`` bytes through the proxy at ``level`` (None: no authentication)."""
    if level is None:
        client = Socks5Client(proxy)
        assert client.greet([Method.NO_AUTH]) == Method.NO_AUTH
        assert client.connect(f"127.0.0.1:{target_port}")[0] == Reply.SUCCEEDED
        client.sock.sendall(size.to_bytes(8, "big"))
        buffer, received = bytearray(1 << 20), 0
        while count := client.sock.recv_into(buffer):
            received += count
        client.close()
    else:
        with GssClient(proxy, kdc) as gss:
            gss.establish()
            assert gss.agree(level) == level
            assert gss.connect(f"127.0.0.1:{target_port}")[0] == Reply.SUCCEEDED
            gss.send(size.to_bytes(8, "big"))
            received = 0
            while chunk := gss.recv():
                received += len(chunk)
    if received != size:
        raise SystemExit(f"received {received} bytes, not {size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per download (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="downloads per mode (default 3)")
    args = parser.parse_args()
    size = args.mib << 20
    with (
        tempfile.TemporaryDirectory(prefix="socksflow-gssapi-bench-") as folder,
        start_kdc(Path(folder)) as kdc,
    ):
        os.environ.update(kdc.env)
        config = Path(folder) / "rules.yaml"
        config.write_text(
            "auth: {methods: [gssapi, none]}\n"
            f"gssapi: {{keytab: {kdc.keytab}, protection: [none, integrity, confidentiality]}}\n"
        )
        target = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE, text=True)
        proxy = subprocess.Popen(
            # one process: the CPU figures read /proc/PID of that process
            [sys.executable, "-m", "socksflow", "run", "--listen", "127.0.0.1:0", "--workers", "1", "-c", str(config)],
            stdout=subprocess.PIPE, text=True, cwd=folder,
        )  # fmt: skip
        try:
            target_port = int(target.stdout.readline())
            ready = proxy.stdout.readline()
            match = re.search(r"listening on ([\d.]+):(\d+)", ready)
            if match is None:
                raise SystemExit(f"socksflow did not start: {ready!r}")
            address = (match[1], int(match[2]))
            print(
                f"{args.runs} × {args.mib} MiB per mode; socksflow pid {proxy.pid}; loopback", file=sys.stderr
            )
            rows = []
            for name, level in MODES:
                rates, proxy_cpu, client_cpu = [], 0.0, 0.0
                for _ in range(args.runs):
                    cpu_before, mine_before = cpu_seconds(proxy.pid), time.process_time()
                    began = time.perf_counter()
                    download(address, kdc, target_port, size, level)
                    rates.append(size / (time.perf_counter() - began) / 1e6)
                    proxy_cpu += cpu_seconds(proxy.pid) - cpu_before
                    client_cpu += time.process_time() - mine_before
                gigabytes = size * args.runs / 1e9
                rows.append((name, statistics.median(rates), proxy_cpu / gigabytes, client_cpu / gigabytes))
        finally:
            for process in (proxy, target):
                process.terminate()
                process.wait(10)
    print("| mode | MB/s (median) | proxy CPU s/GB | client CPU s/GB |")
    print("|---|---:|---:|---:|")
    for name, rate, proxy_per_gb, client_per_gb in rows:
        print(f"| {name} | {rate:.0f} | {proxy_per_gb:.2f} | {client_per_gb:.2f} |")
    baseline = rows[0][1]
    print(f"\nconfidentiality ÷ no auth: {rows[-1][1] / baseline:.2f} of the throughput")


if __name__ == "__main__":
    main()
