#!/usr/bin/env python3
"""What routing costs sessions that go ``direct``: ``bench/run.py``'s sessions scenario, three ways.

* ``none``: no ``outbounds:`` section (the outbounds plugin is dormant);
* ``declared``: an ``outbounds:`` section, no rule names one (every rule without ``via``);
* ``unmatched``: the same, and a first rule ``via: up`` for a network the load never goes to,
  so every session passes a routed rule before the direct one matches.

The rounds alternate (none, declared, unmatched, none, …) so a machine whose load drifts
spreads the drift over all three; the medians are printed, with the server's CPU time per
session (user + system, from /proc) and the spread (lowest–highest) of each.  Then
``bench/inprocess.py``'s ``calls`` figure for each configuration: the Python function calls per
session, which a loaded machine cannot blur::

    python bench/routing_cost.py [--rounds 5] [--duration 4]

Issue #14's goal: ≤ 3 % for ``declared`` and ``unmatched`` against ``none``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inprocess  # bench/inprocess.py: the engine's costs in one process (needs the test extra)
import run  # bench/run.py: the load generator, its targets and the server start-up

BASE = "listen: [127.0.0.1:1080]\nauth: {methods: [none]}\n"
DIRECT = "  - allow: {from: 127.0.0.0/8}\n"
OUTBOUNDS = "outbounds:\n  up: {socks5: 127.0.0.1:9}\n"
MODES = {
    "none": BASE + "rules:\n" + DIRECT,
    "declared": BASE + OUTBOUNDS + "rules:\n" + DIRECT,
    "unmatched": BASE + OUTBOUNDS + "rules:\n  - allow: {to: 10.0.0.0/8}\n    via: up\n" + DIRECT,
}


def main() -> int:
    args = run.paired_arguments(__doc__, rounds=5, duration=4.0)
    runner, options, target = run.sessions_runner(args.duration, args.inflight, args.socksflow_args)
    tmp = Path(tempfile.mkdtemp(prefix="socksflow-routing-bench-"))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for round_ in range(args.rounds):
            for mode, text in MODES.items():
                config = tmp / f"{mode}.yaml"
                config.write_text(text)
                options.socksflow_config = str(config)
                server = run.start_socksflow(tmp, options)
                try:
                    result = runner.sessions(f"127.0.0.1:{server.port}", server.proc.pid)
                finally:
                    run.stop(server.proc)
                rates[mode].append(result.get("ok", 0) / args.duration)
                cpu[mode].append(result.get("cpu_user_us", 0.0) + result.get("cpu_sys_us", 0.0))
                run.log(
                    f"round {round_ + 1} {mode:<9} {rates[mode][-1]:8.0f} sessions/s {cpu[mode][-1]:6.0f} µs CPU/session"
                )
    finally:
        run.stop(target)
    print(
        f"| outbounds | sessions/s (median of {args.rounds}) | spread | vs none | CPU µs/session | spread | vs none |"
    )
    print("|---|---|---|---|---|---|---|")
    base, base_cpu = statistics.median(rates["none"]), statistics.median(cpu["none"])
    for mode in MODES:
        rate, used = statistics.median(rates[mode]), statistics.median(cpu[mode])
        print(
            f"| {mode} | {rate:,.0f} | {min(rates[mode]):,.0f}–{max(rates[mode]):,.0f} | {100 * (rate - base) / base:+.1f} % "
            f"| {used:.0f} | {min(cpu[mode]):.0f}–{max(cpu[mode]):.0f} | {100 * (used - base_cpu) / base_cpu:+.1f} % |"
        )
    print(f"\n| outbounds | Python calls per session ({inprocess.calls.__module__}.calls) |\n|---|---|")
    for mode, text in MODES.items():
        inprocess.CONFIG = text.replace("127.0.0.1:1080", "127.0.0.1:0")
        print(f"| {mode} | {inprocess.calls().split(': ', 1)[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
