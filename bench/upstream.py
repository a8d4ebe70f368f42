#!/usr/bin/env python3
"""The routing benchmark: socksflow sending every session through a microsocks upstream.

Starts one microsocks on a loopback port as the upstream, writes a socksflow configuration
that routes everything to it (``via: up``), and runs ``bench/run.py`` with:

* ``socksflow`` — client → socksflow → microsocks → target;
* ``pproxy`` — client → pproxy → the same microsocks (``-r socks5://…``): the peer to beat
  on sessions/s;
* ``microsocks`` — a microsocks alone (client → microsocks → target): the bulk ceiling.

    python3 bench/upstream.py [--quick] [run.py options…]

Goals (issue #14): socksflow→upstream sessions/s ≥ 1.0× pproxy→upstream, bulk ≥ 0.9× the
upstream alone.  Everything binds and connects to 127.0.0.1; microsocks is stopped by PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "build" / "upstream"

CONFIG = """\
listen: [127.0.0.1:1080]
auth: {{methods: [none]}}
outbounds:
  up: {{socks5: 127.0.0.1:{port}}}
rules:
  - allow: {{from: 127.0.0.0/8, command: connect}}
    via: up
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    exe = shutil.which("microsocks")
    if exe is None:
        print("microsocks is not installed", file=sys.stderr)
        return 2
    FOLDER.mkdir(parents=True, exist_ok=True)
    port = free_port()
    upstream = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if time.monotonic() > deadline or upstream.poll() is not None:
                print("the microsocks upstream did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        config = FOLDER / "rules.yaml"
        config.write_text(CONFIG.format(port=port))
        command = [sys.executable, str(HERE / "run.py"), "--servers", "socksflow,pproxy,microsocks",
                   "--socksflow-config", str(config), "--pproxy-upstream", f"127.0.0.1:{port}", *sys.argv[1:]]  # fmt: skip
        return subprocess.run(command).returncode
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    sys.exit(main())
