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

On a shared machine even that drifts by more than the cost measured.  ``--together`` runs the
three servers at the same time, each with its own load generator (a third of ``--inflight``
each), so every round puts them under the same conditions; it prints each round's CPU per
session relative to ``off`` and their median, the figure to trust there::

    python bench/admin_cost.py --together [--rounds 9] [--duration 4]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sessions per run")
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--socksflow-args", default="")
    parser.add_argument("--together", action="store_true", help="the three servers side by side")
    args = parser.parse_args()
    run.build()
    tmp = Path(tempfile.mkdtemp(prefix="socksflow-admin-bench-"))
    target = run.spawn([str(run.LOADGEN), "target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ports = re.match(r"TARGET echo=(\d+)", target.stdout.readline())
    assert ports, "the targets did not start"
    options = argparse.Namespace(
        inflight=args.inflight, sessions_secs=args.duration, loadgen_threads=1, rst=False,
        socksflow_args=args.socksflow_args,
    )  # fmt: skip
    targets = {"echo": int(ports[1])}
    if args.together:
        options.inflight = max(1, args.inflight // 3)
    results: dict[str, list[float]] = {"off": [], "on": [], "dashboard": []}
    cpu: dict[str, list[float]] = {mode: [] for mode in results}

    def measure(mode: str, server: run.Server, out: dict[str, dict]) -> None:
        out[mode] = run.Runner(options, targets).sessions(f"127.0.0.1:{server.port}", server.proc.pid)

    try:
        for round_ in range(args.rounds):
            batches = [list(results)] if args.together else [[mode] for mode in results]
            for batch in batches:
                servers, dashboards, out = {}, [], {}
                try:
                    for mode in batch:
                        directory = tmp / f"{mode}-{round_}"
                        directory.mkdir()
                        config = directory / "socksflow.yaml"
                        config.write_text(BASE if mode == "off" else ADMIN)
                        options.socksflow_config = str(config)
                        servers[mode] = run.start_socksflow(directory, options)
                        if mode == "dashboard":
                            dashboards.append(Dashboard(admin_address(servers[mode].logfile)))
                            dashboards[-1].start()
                    if dashboards:
                        time.sleep(1.5)
                    threads = [
                        threading.Thread(target=measure, args=(m, sv, out)) for m, sv in servers.items()
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                finally:
                    for dashboard in dashboards:
                        dashboard.stop.set()
                    for server in servers.values():
                        run.stop(server.proc)
                for mode in batch:
                    result = out[mode]
                    results[mode].append(result.get("ok", 0) / args.duration)
                    cpu[mode].append(result.get("cpu_user_us", 0.0) + result.get("cpu_sys_us", 0.0))
                    extra = f", {dashboards[0].requests} dashboard requests" if mode == "dashboard" else ""
                    run.log(
                        f"round {round_ + 1} {mode:<9} {results[mode][-1]:8.0f} sessions/s "
                        f"{cpu[mode][-1]:6.0f} µs CPU/session{extra}"
                    )
    finally:
        run.stop(target)
    if args.together:
        print(
            f"| admin | CPU per session vs off, each round ({args.rounds}, the servers side by side) | median |"
        )
        print("|---|---|---|")
        for mode in ("on", "dashboard"):
            ratios = [100 * (c / o - 1) for c, o in zip(cpu[mode], cpu["off"], strict=True)]
            rounds = " ".join(f"{r:+.1f}" for r in ratios)
            print(f"| {mode} | {rounds} | {statistics.median(ratios):+.1f} % |")
        return 0
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
