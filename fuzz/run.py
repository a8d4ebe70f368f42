"""Run the fuzz targets under atheris (coverage-guided, libFuzzer) for a time budget.

    python fuzz/run.py --seconds 20                 # every target, 20 s in all (what CI runs)
    python fuzz/run.py --seconds 3600 --target config --corpus ~/socksflow-corpus   # a long run

Each target (see ``fuzz/targets.py``) runs in its own process, started from the seeds below (and
the corpus folder, if given, which keeps what the fuzzer learnt for the next run).  A crash is
saved as ``fuzz/crashes/<target>-crash-<sha1>``; replay it with ``python fuzz/run.py --replay
FILE --target NAME``, fix the defect, and move the file to ``fuzz/regressions/<target>/`` so
``tests/test_fuzz.py`` replays it for ever.  The exit code is 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRASHES = HERE / "crashes"
TARGET_NAMES = ("protocol", "front_door", "udp_header", "address", "config")

# Starting points: a few well-formed inputs per target; the fuzzer mutates from there.
_CONNECT = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
SEEDS: dict[str, list[bytes]] = {
    "protocol": [
        b"\x08\x00\x05\x01\x00" + _CONNECT + b"early data",
        b"\x0d\x05\x05\x02\x00\x02\x01\x05alice\x06secret" + _CONNECT,
        b"\x2a\x09\x05\x01\x80\x01\x02\x03" + b"\x05\x03\x00\x03\x0bexample.com\x01\xbb",
        b"\x08\x01\x05\x01\x00\x05\x03\x00\x04" + bytes(16) + b"\x00\x00",
        b"\x09\x02\x05\x01\x00\x05\x01\x00\x03\x09127.0.0.1\x00\x19",
    ],
    "front_door": [
        b"\x07\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00early",
        b"\x03\x04\x02\x01\xbb\x00\x00\x00\x01\x00example.com\x00",
        b"\x05CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01",
        b"\x0bPOST http://[::1]:8080/a?b HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YTpi\r\n"
        b"Connection: keep-alive, X-A\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc",
    ],
    "udp_header": [
        b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35payload",
        b"\x00\x00\x00\x03\x07example\x00\x35",
        b"\x00\x00\x01\x04" + bytes(15) + b"\x01\x00\x35",
    ],
    "address": [
        b"\x00\x01\x0a\x00\x00\x01\x1f\x90",
        b"\x00\x03\x09LOCALHOST\x00\x50",
        b"\x02xx\x04" + bytes(16) + b"\x00\x01",
        b"\x00[::1]:1080",
        b"\x00xn--bcher-kva.example.:443",
    ],
    "config": [
        b"listen: [127.0.0.1:1080, '[::1]:0']\ntimeouts: {handshake: 10s, idle: 5m}\n",
        b"rules:\n  - deny: {to: [special:loopback, '*.ads.example', '~^track']}\n"
        b"    reason: no\n    reply: host_unreachable\n  - allow: {from: [10.0.0.0/8], port: [80, 1024-65535]}\n",
        b"groups: {admins: [alice]}\nrules: [{allow: {group: admins, command: [connect, udp]}}]\n"
        b"tests:\n  - {from: 127.0.0.1, to: 'example.com:443', answers: [192.0.2.1], expect: allow}\n",
        b"dns: {servers: [127.0.0.1:5353, 'tls://192.0.2.1'], hosts: {a.test: 192.0.2.1}, timeout: 1s,"
        b" cache: {size: 10, min_ttl: 1s}, policy: {'*.corp': [127.0.0.1]}}\n",
        b"limits:\n  - match: {from: 0.0.0.0/0}\n    sessions_per_second: 10/s\n    burst: 20\n"
        b"    per: /24\n  - match: {user: bob}\n    bandwidth: {up: 1MiB/s, down: 2MiB/s}\n"
        b"  - auth_failures: {max: 5, within: 1m, block: 15m}\n",
        b"udp: {idle: 2m, max_per_client: 4, replies_from: sent}\nbind: {timeout: 30s, peer_check: strict}\n"
        b"log: {access: {format: json, file: stderr}}\nmetrics: {listen: 127.0.0.1:9150}\n",
        b"auth: {methods: [none]}\nlisten: {addresses: [0.0.0.0:0], open_proxy: true}\n"
        b"x: &a [*a]\nplugins: {autoload: true, disable: [nothing]}\n",
    ],
}
CONFIG_WORDS = [
    "listen", "timeouts", "handshake", "connect", "idle", "hook", "shutdown", "udp", "advertise",
    "max_per_client", "replies_from", "bind", "peer_check", "plugins", "paths", "disable", "autoload",
    "auth", "methods", "users", "userpass", "none", "dns", "servers", "hosts", "hosts_file", "policy",
    "prefer", "retries", "cache", "size", "min_ttl", "max_ttl", "negative_ttl", "groups", "rules",
    "allow", "deny", "reason", "reply", "from", "user", "group", "command", "to", "port", "all", "tests",
    "expect", "answers", "limits", "match", "per", "sessions_per_second", "burst", "max_sessions",
    "bandwidth", "auth_failures", "max", "within", "block", "log", "access", "format", "file", "json",
    "metrics", "open_proxy", "addresses", "address", "protocols", "mixed", "socks5", "socks4", "http",
    "protocol", "doors", "socks4_userid", "http_reason_header", "http_via", "tor_resolve", "resolve", "special:self", "special:private", "special:loopback",
    "file:", "~", "regex:", "*.", "/24", "/56", "1024-65535", "0.0.0.0/0", "::/0", "[::1]:1080",
    "10MiB/s", "100/s", "500ms", "1h", "true", "false", "null", "&a", "*a", "!!str", "? ", "- ", ": ",
]  # fmt: skip
LIBFUZZER_FLAGS = ["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1", "-max_len=4096"]


@dataclass
class Result:
    target: str
    runs: int
    seconds: float
    crashes: list[Path]
    coverage: int
    output: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="time budget for all targets together")
    parser.add_argument("--target", action="append", choices=TARGET_NAMES, help="only these targets")
    parser.add_argument("--corpus", type=Path, help="a folder that keeps each target's corpus between runs")
    parser.add_argument(
        "--replay", type=Path, metavar="FILE", help="run one input through --target, no fuzzing"
    )
    parser.add_argument("--worker", choices=TARGET_NAMES, help=argparse.SUPPRESS)
    args, libfuzzer_args = parser.parse_known_args(argv)
    if args.worker:
        return _worker(args.worker, libfuzzer_args)
    targets = args.target or list(TARGET_NAMES)
    if args.replay:
        sys.path.insert(0, str(HERE))
        from targets import TARGETS

        for name in targets:
            TARGETS[name](args.replay.read_bytes())
        print(f"{args.replay}: no crash")
        return 0
    budget = max(1, int(args.seconds / len(targets)))
    results = [run_target(name, budget, args.corpus) for name in targets]
    print(f"{'target':<12} {'runs':>10} {'runs/s':>8} {'coverage':>9}  crashes")
    for result in results:
        rate = result.runs / result.seconds if result.seconds else 0
        crashes = ", ".join(str(p.relative_to(HERE.parent)) for p in result.crashes) or "none"
        print(f"{result.target:<12} {result.runs:>10} {rate:>8.0f} {result.coverage:>9}  {crashes}")
    print(f"total: {sum(r.runs for r in results)} runs, {sum(len(r.crashes) for r in results)} crashes")
    crashed = [r for r in results if r.crashes]
    for result in crashed:
        print(f"\n--- {result.target} ---\n{result.output[-4000:]}", file=sys.stderr)
    return 1 if crashed else 0


def run_target(name: str, seconds: int, corpus_root: Path | None) -> Result:
    """Fuzz one target for ``seconds`` in its own process."""
    CRASHES.mkdir(exist_ok=True)
    before = set(CRASHES.glob(f"{name}-*"))
    with tempfile.TemporaryDirectory(prefix=f"socksflow-fuzz-{name}-") as scratch:
        work = Path(scratch)
        corpus = corpus_root / name if corpus_root else work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        seeds = work / "seeds"
        seeds.mkdir()
        for number, seed in enumerate(SEEDS[name]):
            (seeds / f"seed-{number}").write_bytes(seed)
        flags = [*LIBFUZZER_FLAGS, f"-max_total_time={seconds}", f"-artifact_prefix={CRASHES}/{name}-"]
        if name == "config":
            dictionary = work / "config.dict"
            dictionary.write_text("".join(f'"{word}"\n' for word in CONFIG_WORDS))
            flags.append(f"-dict={dictionary}")
        process = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", name, *flags, str(corpus), str(seeds)],
            capture_output=True, text=True, timeout=seconds + 120, cwd=work,
        )  # fmt: skip
    output = process.stdout + process.stderr
    runs = _last_int(r"stat::number_of_executed_units: (\d+)", output) or _last_int(r"^#(\d+)", output)
    seconds_taken = _last_int(r"Done \d+ runs in (\d+) second", output) or seconds
    coverage = _last_int(r"cov: (\d+)", output)
    crashes = sorted(set(CRASHES.glob(f"{name}-*")) - before)
    if process.returncode != 0 and not crashes:
        raise SystemExit(f"fuzz target {name} failed to run (exit {process.returncode}):\n{output[-3000:]}")
    return Result(name, runs, float(seconds_taken), crashes, coverage, output)


def _last_int(pattern: str, text: str) -> int:
    found = re.findall(pattern, text, re.M)
    return int(found[-1]) if found else 0


def _worker(name: str, libfuzzer_args: list[str]) -> int:
    """In the fuzzing process: instrument socksflow, its plugins and PyYAML, then fuzz ``name``."""
    try:
        import atheris
    except ImportError:
        raise SystemExit("fuzzing needs atheris: pip install atheris") from None
    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["socksflow", "socksflow_plugins", "yaml", "targets"]):
        import targets

        for entry in importlib.metadata.entry_points(group="socksflow"):  # plugins load later: instrument now
            if entry.value.startswith("socksflow_plugins"):
                entry.load()
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets.TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
