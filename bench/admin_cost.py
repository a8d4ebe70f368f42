#!/usr/bin/env python3
"""The admin listener's cost on sessions/s: ``bench/run.py``'s sessions scenario, three ways.

* ``off``: no ``admin:`` section (the plugin is dormant);
* ``on``: an ``admin:`` section, nobody looking;
* ``dashboard``: the same, with a client doing what an open dashboard does — the event stream
  read, and once a second the first page of sessions, the rule hits, the users and the events.

The rounds alternate (off, on, dashboard, off, …) so a machine whose load drifts spreads the
drift over all three; the median of each is printed, with the server's CPU time per session
(user + system, from /proc), which other processes on a busy machine disturb far less than
sessions/s::

    python bench/admin_cost.py [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the load generator, its targets and the server start-up

BASE = "listen: [127.0.0.1:1080]\nauth: {methods: [none]}\nrules:\n  - allow: {from: 127.0.0.0/8}\n"
ADMIN = BASE + "admin: {listen: 127.0.0.1:0}\n"
PAGES = ("/api/sessions?limit=100", "/api/rules", "/api/users", "/api/events", "/api/totals")


class Dashboard(threading.Thread):
    """What the page asks for: the stream, and on each of its samples the tables."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stop = threading.Event()
        self.requests = 0

    def run(self) -> None:
        with urllib.request.urlopen(self.base + "/api/stream", timeout=30) as stream:
            for line in stream:
                if self.stop.is_set():
                    return
                if line.startswith(b"data: "):
                    for page in PAGES:
                        with urllib.request.urlopen(self.base + page, timeout=30) as response:
                            json.load(response)
                        self.requests += 1


def admin_address(log: Path) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"admin API and dashboard on (http://\S+?)/?$", log.read_text(), re.M)
        if match:
            return match[1]
        time.sleep(0.1)
    raise SystemExit("no admin API address in the log")


def main() -> int:
    args = run.paired_arguments(__doc__, rounds=3, duration=5.0)
    runner, options, target = run.sessions_runner(args.duration, args.inflight, args.socksflow_args)
    tmp = Path(tempfile.mkdtemp(prefix="socksflow-admin-bench-"))
    results: dict[str, list[float]] = {"off": [], "on": [], "dashboard": []}
    cpu: dict[str, list[float]] = {mode: [] for mode in results}
    try:
        for round_ in range(args.rounds):
            for mode in results:
                config = tmp / f"{mode}.yaml"
                config.write_text(BASE if mode == "off" else ADMIN)
                options.socksflow_config = str(config)
                server = run.start_socksflow(tmp, options)
                dashboard = None
                if mode == "dashboard":
                    dashboard = Dashboard(admin_address(server.logfile))
                    dashboard.start()
                    time.sleep(1.5)
                try:
                    result = runner.sessions(f"127.0.0.1:{server.port}", server.proc.pid)
                finally:
                    if dashboard is not None:
                        dashboard.stop.set()
                    run.stop(server.proc)
                rate = result.get("ok", 0) / args.duration
                results[mode].append(rate)
                cpu[mode].append(result.get("cpu_user_us", 0.0) + result.get("cpu_sys_us", 0.0))
                extra = f", {dashboard.requests} dashboard requests" if dashboard else ""
                run.log(
                    f"round {round_ + 1} {mode:<9} {rate:8.0f} sessions/s {cpu[mode][-1]:6.0f} µs CPU/session{extra}"
                )
    finally:
        run.stop(target)
    base, base_cpu = statistics.median(results["off"]), statistics.median(cpu["off"])
    print(f"| admin | sessions/s (median of {args.rounds}) | vs off | CPU µs/session | vs off |")
    print("|---|---|---|---|---|")
    for mode, rates in results.items():
        median, median_cpu = statistics.median(rates), statistics.median(cpu[mode])
        print(
            f"| {mode} | {median:.0f} | {100 * (median - base) / base:+.1f} % "
            f"| {median_cpu:.0f} | {100 * (median_cpu - base_cpu) / base_cpu:+.1f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
