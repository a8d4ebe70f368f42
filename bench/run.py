#!/usr/bin/env python3
"""socksflow benchmark harness (stdlib only).

One command:  python3 bench/run.py  [--quick] [--servers ...] [--duration S]

It compiles bench/loadgen.c into bench/build/, starts the targets
(`loadgen target`), then for each server in [none, socksflow, microsocks,
danted, pproxy] starts it on a free loopback port, waits until it answers a
SOCKS5 greeting, runs the scenarios it supports, samples the memory of its
process tree, stops it by PID, and finally prints one markdown table plus a
socksflow/peer ratio table.  Everything binds and connects to 127.0.0.1 only.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
LOADGEN = BUILD / "loadgen"
ALL_SERVERS = ["none", "socksflow", "microsocks", "danted", "pproxy"]
FEATURES_CONFIG = BUILD / "features" / "rules.yaml"  # written by bench/features.py


@dataclass(frozen=True)
class Variant:
    """socksflow started another way, as a row of its own: extra arguments, another
    configuration, and the scenarios it runs (None: all of them)."""

    label: str
    args: tuple[str, ...] = ()
    config: Path | None = None
    scenarios: frozenset[str] | None = None


VARIANTS = {
    "socksflow-1w": Variant("socksflow, one worker", ("--workers", "1")),
    "socksflow-features": Variant(
        "socksflow, features on", config=FEATURES_CONFIG, scenarios=frozenset({"sessions"})
    ),
}
GOAL_SERVERS = ["socksflow", "socksflow-1w", "socksflow-features", "microsocks", "danted"]
LABEL = {"none": "no proxy (limit)", **{name: v.label for name, v in VARIANTS.items()}}
RR_RUNS = 5
DASH, TIMES = "\u2013", "\u00d7"  # en dash (not supported) and the ratio sign

# pproxy 2.7.9 calls uvloop.install() and then asyncio.get_event_loop(); with
# uvloop >= 0.21 that raises "no current event loop".  This shim makes
# install() also create and set the loop, so pproxy runs on uvloop as intended.
PPROXY_SHIM = r"""
import asyncio, sys
try:
    import uvloop
    def _install():
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())
    uvloop.install = _install
except ImportError:
    asyncio.set_event_loop(asyncio.new_event_loop())
from pproxy.server import main
sys.argv[0] = "pproxy"
main()
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Process bookkeeping: every process we start is stopped by PID, even on errors.
# --------------------------------------------------------------------------
_started: list[subprocess.Popen] = []
_libc = None


def _pdeathsig() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with run.py


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks used by ``pid``, its reaped children and its live descendants."""
    user = system = 0
    for p in (pid, *descendants(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])  # utime + cutime
        system += int(fields[12]) + int(fields[14])  # stime + cstime
    return user, system


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def spawn(cmd: list[str], deathsig: bool = True, **kw) -> subprocess.Popen:
    # No setsid(): with kernel.sched_autogroup_enabled=1 every new session is
    # its own scheduling group, which changed where the scheduler woke the
    # processes and made rr latencies swing 12 <-> 70 µs.  All benchmark
    # processes share run.py's session/autogroup, as in a shell pipeline.
    p = subprocess.Popen(cmd, preexec_fn=_pdeathsig if deathsig else None, **kw)
    _started.append(p)
    return p


def watchdog(p: subprocess.Popen) -> None:
    """A tiny shell that SIGTERMs the server if run.py dies without cleaning
    up (e.g. SIGKILL): PR_SET_PDEATHSIG alone is not enough, the kernel clears
    it when a server switches user (danted runs as `nobody`).  stop() tells
    it "done" first, so it never signals a PID after we reaped it."""
    w = subprocess.Popen(
        ["sh", "-c", 'read x; [ "$x" = done ] || kill -TERM "$1" 2>/dev/null', "sh", str(p.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    p._watchdog = w  # type: ignore[attr-defined]


def stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the process (by PID), wait, then SIGKILL it and any leftover
    descendants that we recorded before (checked against their start time)."""
    if p.poll() is None:
        tree = [(c, _starttime(c)) for c in descendants(p.pid)]
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        deadline = time.monotonic() + grace
        for c, st in tree:
            while st and _starttime(c) == st and time.monotonic() < deadline:
                time.sleep(0.05)
            if st and _starttime(c) == st:
                with contextlib.suppress(OSError):
                    os.kill(c, signal.SIGKILL)
    for s in (p.stdin, p.stdout, p.stderr):
        if s:
            with contextlib.suppress(OSError):
                s.close()
    w = getattr(p, "_watchdog", None)
    if w is not None:
        try:
            w.communicate("done\n", timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            w.kill()
            w.wait()
        p._watchdog = None  # type: ignore[attr-defined]
    if p in _started:
        _started.remove(p)


def _cleanup() -> None:
    for p in list(reversed(_started)):
        try:
            stop(p, grace=2.0)
        except Exception as e:  # best effort at exit
            log(f"cleanup: {e}")


def _on_term(signum, frame):
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------
def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def tree_mem(pid: int) -> dict:
    pids = [pid, *descendants(pid)]
    rss = sum(_status_kib(p, "VmRSS") for p in pids)
    pss_vals = [_pss_kib(p) for p in pids]
    pss = sum(v for v in pss_vals if v is not None) if all(v is not None for v in pss_vals) else None
    return {"rss": rss, "pss": pss, "nproc": len(pids)}


class MemSampler(threading.Thread):
    """Samples the summed VmRSS of the server's process tree."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.maxproc = pid, 0, 1
        self._halt = threading.Event()

    def run(self) -> None:
        # Cheap on purpose (it shares 2 cores with the benchmark): VmRSS every
        # 200 ms, the /proc walk for new descendants only every second.
        pids, last_walk = [self.pid], 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now - last_walk >= 1.0:
                pids, last_walk = [self.pid, *descendants(self.pid)], now
            self.peak = max(self.peak, sum(_status_kib(p, "VmRSS") for p in pids))
            self.maxproc = max(self.maxproc, len(pids))
            self._halt.wait(0.2)

    def finish(self) -> int:
        self._halt.set()
        self.join(timeout=2)
        if self.maxproc == 1:  # single process: the kernel's own high-water mark
            self.peak = max(self.peak, _status_kib(self.pid, "VmHWM"))
        return self.peak


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def build() -> None:
    BUILD.mkdir(exist_ok=True)
    src = HERE / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    cc = os.environ.get("CC", "gcc")
    cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(LOADGEN), str(src)]
    log("build: " + " ".join(cmd))
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"cannot build {LOADGEN.name} with {cc!r}: {e} (apt-get install gcc)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DOOR = "socks5"  # the protocol the load generator speaks to the proxies: socks5 or http (--door)


def probe(port: int, timeout: float = 1.0) -> bool:
    """Readiness: TCP connect + SOCKS5 greeting (05 01 00) -> 05 00 (--door http: the connect only,
    as HTTP proxies differ in how they answer a request to nowhere)."""
    hello, expect = b"\x05\x01\x00", b"\x05\x00"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if DOOR == "http":
                return True
            s.sendall(hello)
            buf = b""
            while len(buf) < len(expect):
                chunk = s.recv(len(expect) - len(buf))
                if not chunk:
                    return False
                buf += chunk
            return buf == expect
    except OSError:
        return False


def wait_ready(p: subprocess.Popen | None, port: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p is not None and p.poll() is not None:
            return f"exited with code {p.returncode} before becoming ready"
        if probe(port):
            return None
        time.sleep(0.05)
    return f"no {DOOR} answer on 127.0.0.1:{port} within {timeout:.0f}s"


def parse_result(out: str, tag: str) -> dict | None:
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "RESULT" and parts[1] == tag:
            d = {}
            for kv in parts[2:]:
                k, _, v = kv.partition("=")
                try:
                    d[k] = float(v)
                except ValueError:
                    d[k] = v
            return d
    return None


def tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def version_of(cmd: list[str], pattern: str = r"\S+") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(0) if m else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def cpu_busy(secs: float = 1.0) -> float:
    """Percent of all CPUs busy over `secs` (from /proc/stat), before we load
    the machine: anything else running skews every number."""

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle

    try:
        t0, i0 = snap()
        time.sleep(secs)
        t1, i1 = snap()
        return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))
    except (OSError, ValueError):
        return float("nan")


def dpkg_version(pkg: str) -> str:
    return version_of(["dpkg-query", "-W", "-f=${Version}", pkg])


def py_version(mod: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({mod!r}))"
    return version_of([sys.executable, "-c", code])


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    udp: bool
    proc: subprocess.Popen | None = None
    port: int = 0
    note: str = ""
    logfile: Path | None = None
    extra: list[str] = field(default_factory=list)


class StartError(Exception):
    pass


def start_server(name: str, tmp: Path, args) -> Server | None:
    """Start `name` on a free loopback port. Returns None if not installed."""
    errlog = tmp / f"{name}.log"
    if name == "microsocks":
        exe = shutil.which("microsocks")
        if not exe:
            return None
        port = free_port()
        s = Server(name, udp=False, port=port, logfile=errlog)
        with open(errlog, "wb") as f:
            s.proc = spawn(
                [exe, "-i", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
    elif name == "danted":
        exe = shutil.which("danted") or ("/usr/sbin/danted" if os.path.exists("/usr/sbin/danted") else None)
        if not exe:
            return None
        port = free_port()
        users = ""
        if os.geteuid() == 0:
            users = "user.privileged: nobody\nuser.unprivileged: nobody"
        tmp.chmod(0o755)  # dante's unprivileged children reopen files here
        conf = string.Template((HERE / "danted.conf").read_text()).substitute(
            port=port, logfile=str(tmp / "danted-server.log"), users=users
        )
        cpath = tmp / "danted.conf"
        cpath.write_text(conf)
        s = Server(name, udp=True, port=port, logfile=tmp / "danted-server.log")
        with open(errlog, "wb") as f:
            s.proc = spawn(
                [exe, "-f", str(cpath), "-N", str(args.danted_mothers)],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        s.note = f"-N {args.danted_mothers}"
    elif name == "pproxy":
        chk = subprocess.run([sys.executable, "-c", "import pproxy"], capture_output=True)
        if chk.returncode != 0:
            return None
        port = free_port()
        s = Server(name, udp=False, port=port, logfile=errlog)
        with open(errlog, "wb") as f:
            s.proc = spawn(
                [sys.executable, "-c", PPROXY_SHIM, "-l", f"{DOOR}://127.0.0.1:{port}"]
                + (["-r", f"socks5://{args.pproxy_upstream}"] if args.pproxy_upstream else []),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
    elif name == "socksflow" or name in VARIANTS:
        return start_socksflow(tmp, args, VARIANTS.get(name))
    else:
        raise ValueError(name)
    watchdog(s.proc)
    err = wait_ready(s.proc, s.port, timeout=15)
    if err:
        stop(s.proc)
        raise StartError(f"{err}\n{tail(errlog)}")
    return s


def start_socksflow(tmp: Path, args, variant: Variant | None = None) -> Server | None:
    cfg = Path(args.socksflow_config).resolve()
    extra = shlex.split(args.socksflow_args or "")
    if variant is not None:
        cfg = variant.config or cfg
        extra = [*extra, *variant.args]
    if (REPO / "socksflow" / "__main__.py").exists():
        base = [sys.executable, "-m", "socksflow"]
    elif shutil.which("socksflow"):
        base = [shutil.which("socksflow")]
    else:
        return None
    if DOOR == "http" and "--protocols" not in extra:
        extra = [*extra, "--protocols", "mixed"]  # the HTTP door beside SOCKS5, as users run it
    cmd = [*base, "run", "--listen", "127.0.0.1:0", "-c", str(cfg), *extra]
    errlog = tmp / "socksflow.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    s = Server("socksflow", udp=True, logfile=errlog, extra=extra)
    with open(errlog, "wb") as ferr:
        s.proc = spawn(
            cmd,
            cwd=str(REPO),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=ferr,
        )
    watchdog(s.proc)
    # Read stdout in a thread (the pipe must never fill up); the ready line is
    # "socksflow: listening on 127.0.0.1:PORT".
    found = threading.Event()
    lines: list[str] = []

    def reader(stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            m = re.search(r"listening on (?:\[[^\]]+\]|[\d.]+):(\d+)", line)
            if m and not found.is_set():
                s.port = int(m.group(1))
                found.set()

    threading.Thread(target=reader, args=(s.proc.stdout,), daemon=True).start()
    deadline = time.monotonic() + 20
    while not found.is_set() and time.monotonic() < deadline and s.proc.poll() is None:
        found.wait(0.1)
    if not found.is_set():
        why = (
            f"exited with code {s.proc.returncode}"
            if s.proc.poll() is not None
            else "no 'socksflow: listening on HOST:PORT' line on stdout within 20s"
        )
        stop(s.proc)
        out = "\n".join("    " + x for x in lines[-5:])
        raise StartError(f"{why}\n  command: {shlex.join(cmd)}\n{out}\n{tail(errlog)}")
    err = wait_ready(s.proc, s.port, timeout=10)
    if err:
        stop(s.proc)
        raise StartError(f"{err}\n{tail(errlog)}")
    if extra:
        s.note = " ".join(extra)
    return s


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------
class Runner:
    def __init__(self, args, targets: dict[str, int]):
        self.a = args
        self.t = targets

    def lg(self, scenario: str, proxy: str, target: str, extra: list[str], timeout: float) -> dict:
        cmd = [str(LOADGEN), scenario, "-p", proxy, "-T", f"127.0.0.1:{self.t[target]}", *extra]
        if DOOR == "http":
            cmd.append("--http")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"loadgen {scenario} timed out after {timeout:.0f}s"}
        res = parse_result(r.stdout, scenario)
        if res is None:
            return {"error": f"loadgen {scenario} rc={r.returncode}: {r.stderr.strip()[-300:]}"}
        if r.stderr.strip():
            res["stderr"] = r.stderr.strip()[-300:]
        return res

    def sessions(self, proxy, pid):
        a = self.a
        extra = ["-n", str(a.inflight), "-d", str(a.sessions_secs), "-t", str(a.loadgen_threads)]
        if a.rst:
            extra.append("--rst")
        before = cpu_ticks(pid) if pid else None
        res = self.lg("sessions", proxy, "echo", extra, a.sessions_secs + 15)
        if before is not None and res.get("ok"):
            after = cpu_ticks(pid)
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            res["cpu_user_us"] = (after[0] - before[0]) * tick_us / res["ok"]
            res["cpu_sys_us"] = (after[1] - before[1]) * tick_us / res["ok"]
        return res

    def bulk(self, proxy, streams):
        a = self.a
        extra = [
            "-S",
            str(streams),
            "-B",
            str(a.bulk_bytes),
            "-d",
            str(a.bulk_max_secs),
            "-t",
            str(a.bulk_threads),
        ]
        return self.lg("bulk", proxy, "bulk", extra, a.bulk_max_secs + 15)

    def rr(self, proxy):
        """RR_RUNS separate loadgen runs (fresh tunnel and process each time);
        report the median p50 and median p99.  The client busy-polls for the
        pong (--spin): with a blocking client, a ping-pong on this 2-vCPU VM
        is bimodal -- all processes on one vCPU (fast) vs wake-ups of a halted
        vCPU (+~25 µs each, guest halt-polling is off) -- and which one a run
        gets is up to the scheduler.  Spinning keeps the client's vCPU busy, so
        the server and target run on the other one, the same way every time."""
        runs = []
        secs = round(self.a.rr_secs / RR_RUNS, 3)
        for _ in range(RR_RUNS):
            r = self.lg(
                "rr",
                proxy,
                "keep",
                ["-d", str(secs)] + ([] if self.a.rr_block else ["--spin"]),
                secs + 15,
            )
            if "error" in r or not r.get("ok"):
                return r
            runs.append(r)
        med = lambda k: sorted(x[k] for x in runs)[len(runs) // 2]  # noqa: E731
        res = dict(runs[0])
        res.update(
            ok=sum(x["ok"] for x in runs),
            p50_us=med("p50_us"),
            p99_us=med("p99_us"),
            p50_runs=[x["p50_us"] for x in runs],
        )
        return res

    def udp(self, proxy):
        a = self.a
        return self.lg("udp", proxy, "udp", ["-d", str(a.udp_secs), "-w", str(a.udp_window)], a.udp_secs + 15)

    def idle(self, proxy, pid: int | None):
        """Open K idle tunnels, measure the server's memory before/after."""
        before = tree_mem(pid) if pid else None
        cmd = [
            str(LOADGEN),
            "idle",
            "-p",
            proxy,
            "-T",
            f"127.0.0.1:{self.t['keep']}",
            "-k",
            str(self.a.idle_tunnels),
            "--hold",
            "60",
        ]
        p = spawn(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            deathsig=False,
        )
        try:
            ready = {}
            box: list[str] = []
            th = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
            th.start()
            th.join(timeout=60)
            line = box[0] if box else ""
            if not line.startswith("READY"):
                return {"error": "idle: loadgen did not get ready"}
            for kv in line.split()[2:]:
                k, _, v = kv.partition("=")
                ready[k] = float(v)
            time.sleep(0.5)  # let the server settle (lazy allocations, child forks)
            after = tree_mem(pid) if pid else None
            out, _ = p.communicate(input="go\n", timeout=30)
            res = parse_result(out, "idle") or {}
            res.update({f"ready_{k}": v for k, v in ready.items()})
            ok = int(ready.get("ok", 0))
            if before and after and ok > 0:
                res["kib_rss"] = (after["rss"] - before["rss"]) / ok
                if before["pss"] is not None and after["pss"] is not None:
                    res["kib_pss"] = (after["pss"] - before["pss"]) / ok
                res["nproc_after"] = after["nproc"]
                res["rss_after_mib"] = after["rss"] / 1024
                if after["pss"] is not None:
                    res["pss_after_mib"] = after["pss"] / 1024
            return res
        finally:
            stop(p)


def paired_arguments(doc: str, rounds: int, duration: float) -> argparse.Namespace:
    """The command line of a script that alternates socksflow configurations round after round."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--duration", type=float, default=duration, help="seconds of sessions per run")
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--socksflow-args", default="")
    return parser.parse_args()


def sessions_runner(
    duration: float, inflight: int = 100, socksflow_args: str = ""
) -> tuple[Runner, argparse.Namespace, subprocess.Popen]:
    """For scripts that compare socksflow configurations on the sessions scenario alone:
    builds the load generator, starts its echo target, and returns a Runner, the options
    start_socksflow() takes (set ``socksflow_config`` before each start) and the target
    process (stop it at the end)."""
    build()
    target = spawn([str(LOADGEN), "target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ports = re.match(r"TARGET echo=(\d+)", target.stdout.readline())
    assert ports, "the targets did not start"
    options = argparse.Namespace(
        inflight=inflight, sessions_secs=duration, loadgen_threads=1, rst=False,
        socksflow_args=socksflow_args,
    )  # fmt: skip
    return Runner(options, {"echo": int(ports[1])}), options, target


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------
METRICS = [  # key, column title, higher-is-better, format
    ("sessions", "sessions/s", True, "{:,.0f}"),
    ("bulk1", "bulk MB/s 1 stream", True, "{:,.0f}"),
    ("bulk8", "bulk MB/s 8 streams", True, "{:,.0f}"),
    ("idle", "KiB per idle tunnel", False, "{:,.1f}"),
    ("rr50", "rr p50 µs", False, "{:,.1f}"),
    ("rr99", "rr p99 µs", False, "{:,.1f}"),
    ("udp", "UDP datagrams/s", True, "{:,.0f}"),
    ("peak", "peak RSS MiB", False, "{:,.1f}"),
]


def summarize(raw: dict) -> tuple[dict, list[str]]:
    """raw scenario results -> metric values (None = n/a) and notes."""
    v: dict = {}
    notes: list[str] = []

    def get(key, res, field_, bad=lambda r: False):
        if res is None:
            return None
        if "error" in res:
            notes.append(f"{key}: {res['error']}")
            return "err"
        if bad(res):
            return "err"
        return res.get(field_)

    s = raw.get("sessions")
    v["sessions"] = get("sessions", s, "rate", lambda r: r.get("ok", 0) == 0)
    if s and "error" not in s and s.get("err", 0):
        notes.append(
            f"sessions: {int(s['err'])} errors ({int(s.get('timeouts', 0))} timeouts, "
            f"{int(s.get('eof_timeouts', 0))} without EOF) vs {int(s.get('ok', 0))} ok"
        )
    if s and "cpu_user_us" in s:
        v["cpu"] = s["cpu_user_us"] + s["cpu_sys_us"]
        notes.append(
            f"sessions: server CPU per session {s['cpu_user_us'] + s['cpu_sys_us']:.0f} µs "
            f"(user {s['cpu_user_us']:.0f}, system {s['cpu_sys_us']:.0f})"
        )
    for key in ("bulk1", "bulk8"):
        b = raw.get(key)
        v[key] = get(key, b, "mbps", lambda r: r.get("corrupt", 0) > 0 or r.get("bytes", 0) == 0)
        if b and "error" not in b:
            if b.get("corrupt", 0):
                notes.append(f"{key}: DATA CORRUPTION detected")
            elif not b.get("complete", 1):
                notes.append(
                    f"{key}: incomplete (time cap hit or stream error): "
                    f"{b.get('bytes', 0) / 1e6:.0f} MB in {b.get('secs', 0):.1f}s, "
                    f"{int(b.get('err', 0))} stream errors"
                )
    i = raw.get("idle")
    if i is not None:
        if "error" in i:
            notes.append(f"idle: {i['error']}")
            v["idle"] = "err"
        else:
            v["idle"] = i.get("kib_pss", i.get("kib_rss"))
            if i.get("ready_err", 0) or i.get("dropped", 0):
                notes.append(
                    f"idle: {int(i.get('ready_ok', 0))} tunnels up, "
                    f"{int(i.get('ready_err', 0))} failed, {int(i.get('dropped', 0))} dropped"
                )
    r = raw.get("rr")
    v["rr50"] = get("rr", r, "p50_us", lambda x: x.get("ok", 0) == 0)
    v["rr99"] = None if r is None or "error" in r or r.get("ok", 0) == 0 else r.get("p99_us")
    u = raw.get("udp")
    if u == "unsupported":
        v["udp"] = DASH
    else:
        v["udp"] = get("udp", u, "rate", lambda x: x.get("ok", 0) == 0)
        if u and "error" not in u:
            if u.get("ok", 0) == 0:
                notes.append(f"udp: {u.get('reason', 'no echoes received')}")
            elif u.get("loss_pct", 0) > 0:
                notes.append(f"udp: {u['loss_pct']:.2f}% loss (window {int(u.get('window', 0))})")
    v["peak"] = raw.get("peak_mib")
    return v, notes


def fmt(val, f) -> str:
    if val is None:
        return "n/a"
    if isinstance(val, str):
        return val
    return f.format(val)


def print_tables(rows: list[tuple[str, dict]], out=sys.stdout) -> None:
    head = "| server | " + " | ".join(m[1] for m in METRICS) + " |"
    print(head, file=out)
    print("|" + "---|" * (len(METRICS) + 1), file=out)
    for name, v in rows:
        cells = [fmt(v.get(k), f) for k, _, _, f in METRICS]
        print(f"| {name} | " + " | ".join(cells) + " |", file=out)

    sf = next((v for n, v in rows if n.startswith("socksflow")), None)
    peers = [(n, v) for n, v in rows if not n.startswith("socksflow") and not n.startswith("no proxy")]
    print(file=out)
    if sf is None or all(not isinstance(sf.get(k), (int, float)) for k, *_ in METRICS):
        print("_socksflow/peer ratios: socksflow produced no numbers in this run._", file=out)
        return
    print(
        "socksflow / peer (each cell = socksflow value ÷ peer value; ↑ higher is better, ↓ lower is better)",
        file=out,
    )
    print(file=out)
    print(
        "| vs peer | " + " | ".join(f"{m[1]} {'↑' if m[2] else '↓'}" for m in METRICS) + " |",
        file=out,
    )
    print("|" + "---|" * (len(METRICS) + 1), file=out)
    for name, v in peers:
        cells = []
        for k, *_ in METRICS:
            a, b = sf.get(k), v.get(k)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                cells.append(f"{a / b:.2f}{TIMES}")
            else:
                cells.append(DASH)
        print(f"| {name} | " + " | ".join(cells) + " |", file=out)


GOALS = [  # figure, value from the rows (by server name), goal, higher is better
    ("sessions/s vs microsocks, default `socksflow run`",
     lambda r: _ratio(r, "socksflow", "microsocks", "sessions"), 1.0, True, TIMES),
    ("sessions/s vs microsocks, one worker",
     lambda r: _ratio(r, "socksflow-1w", "microsocks", "sessions"), 0.8, True, TIMES),
    ("CPU µs per session, one worker",
     lambda r: r.get("socksflow-1w", {}).get("cpu"), 100, False, " µs"),
    ("features on / bare (sessions/s)",
     lambda r: _ratio(r, "socksflow-features", "socksflow", "sessions"), 0.85, True, TIMES),
    ("rr p50 vs microsocks", lambda r: _ratio(r, "socksflow", "microsocks", "rr50"), 1.0, False, TIMES),
    ("bulk 1 stream vs danted", lambda r: _ratio(r, "socksflow", "danted", "bulk1"), 1.5, True, TIMES),
    ("idle KiB per tunnel", lambda r: r.get("socksflow", {}).get("idle"), 4.0, False, " KiB"),
]  # fmt: skip


def _ratio(rows: dict[str, dict], a: str, b: str, key: str) -> float | None:
    x, y = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
        return x / y
    return None


def print_goals(by_server: dict[str, dict], rows: list[tuple[str, dict]], out=sys.stdout) -> None:
    """The Speed II goals table (issue #17), every figure from this run."""
    print("| socksflow row | sessions/s | CPU µs/session |", file=out)
    print("|---|---|---|", file=out)
    for label, v in rows:
        if label.startswith("socksflow"):
            print(
                f"| {label} | {fmt(v.get('sessions'), '{:,.0f}')} | {fmt(v.get('cpu'), '{:,.0f}')} |",
                file=out,
            )
    print(file=out)
    print("| goal | this run | target | met |", file=out)
    print("|---|---|---|---|", file=out)
    for figure, value_of, target, higher, unit in GOALS:
        value = value_of(by_server)
        if not isinstance(value, (int, float)):
            print(f"| {figure} | n/a | | |", file=out)
            continue
        met = value >= target if higher else value <= target
        shown = f"{value:.2f}{unit}" if unit == TIMES else f"{value:,.1f}{unit}"
        sign = "≥" if higher else "≤"
        print(
            f"| {figure} | {shown} | {sign} {target:g}{unit.strip() and unit} | {'yes' if met else 'no'} |",
            file=out,
        )


def write_features_config() -> None:
    """bench/features.py's configuration: 100 000 domains + 10 000 networks, access log, limits."""
    subprocess.run(
        [sys.executable, str(HERE / "features.py")], check=True, cwd=HERE, stdout=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of: " + ",".join(ALL_SERVERS) + " (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: a few seconds per server")
    ap.add_argument(
        "--door", choices=["socks5", "http"], default="socks5",
        help="what the load generator speaks: SOCKS5, or HTTP CONNECT (socksflow --protocols mixed, "
        "pproxy's http listener; no UDP)",
    )  # fmt: skip
    ap.add_argument("--duration", type=float, help="seconds for sessions (rr and udp get 60%% of it)")
    ap.add_argument("--socksflow-args", default="", help="extra args for `socksflow run`, e.g. '--workers 2'")
    ap.add_argument("--socksflow-config", default=str(HERE / "socksflow-bench.yaml"))
    ap.add_argument(
        "--pproxy-upstream",
        help="HOST:PORT of a SOCKS5 upstream pproxy chains to (-r); bench/upstream.py sets it",
    )
    ap.add_argument("--inflight", type=int, default=100, help="sessions kept in flight (default 100)")
    ap.add_argument(
        "--loadgen-threads",
        type=int,
        default=1,
        help="load generator threads for sessions (default 1: leaves a core to the server)",
    )
    ap.add_argument("--bulk-threads", type=int, default=1, help="load generator threads for bulk")
    ap.add_argument("--bulk-bytes", type=int, help="total bytes per bulk run (default 1 GiB; quick 512 MiB)")
    ap.add_argument("--bulk-max-secs", type=float, help="time cap per bulk run (default 10; quick 4)")
    ap.add_argument("--idle-tunnels", type=int, help="idle tunnels (default 2000; quick 500)")
    ap.add_argument("--udp-window", type=int, default=64, help="UDP datagrams in flight (default 64)")
    ap.add_argument("--danted-mothers", type=int, default=2, help="danted -N (default 2 = cores)")
    ap.add_argument(
        "--rst",
        action="store_true",
        help="sessions: client closes with SO_LINGER{1,0} right after the echo "
        "instead of waiting for the target's close",
    )
    ap.add_argument("--target-threads", type=int, default=1)
    ap.add_argument(
        "--rr-block",
        action="store_true",
        help="rr: the client blocks in recv() for the pong instead of busy-polling "
        "(bimodal on this VM, see README)",
    )
    ap.add_argument(
        "--goals",
        action="store_true",
        help="the Speed II goals in one run: socksflow as `socksflow run` starts it, with one "
        "worker, and with features on (bench/features.py), beside microsocks and danted; "
        "then the goals table",
    )
    ap.add_argument("--keep-going", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    q = a.quick
    a.sessions_secs = a.duration if a.duration else (1.0 if q else 5.0)
    a.rr_secs = round(a.sessions_secs * (0.5 if q else 0.6), 2)
    a.udp_secs = round(a.sessions_secs * (1.0 if q else 0.6), 2)
    a.bulk_bytes = a.bulk_bytes or ((512 << 20) if q else (1 << 30))
    a.bulk_max_secs = a.bulk_max_secs or (4.0 if q else 10.0)
    a.idle_tunnels = a.idle_tunnels or (500 if q else 2000)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    if a.goals:
        servers = GOAL_SERVERS
        write_features_config()
    for s in servers:
        if s not in ALL_SERVERS and s not in VARIANTS:
            ap.error(f"unknown server {s!r}; choose from {','.join([*ALL_SERVERS, *VARIANTS])}")
    global DOOR
    DOOR = a.door
    if DOOR == "http":  # microsocks and danted have no HTTP proxy; UDP has no HTTP form
        servers = [s for s in servers if s in ("none", "socksflow", "pproxy")]

    global _libc
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        _libc = None
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = 2 * a.idle_tunnels + 200
    if hard < need:
        log(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}: idle tunnels may fail")

    build()
    busy_before = cpu_busy()
    if busy_before > 10:
        log(
            f"warning: the machine is already {busy_before:.0f}% busy before the benchmark starts; "
            f"numbers will be noisy (see `top`)"
        )
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="socksflow-bench-"))
    target = spawn(
        [str(LOADGEN), "target", "-t", str(a.target_threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = target.stdout.readline()
    m = re.match(r"TARGET echo=(\d+) keep=(\d+) bulk=(\d+) udp=(\d+)", line)
    if not m:
        err = target.stderr.read() if target.poll() is not None else ""
        log(f"targets failed to start: {line!r} {err}")
        return 2
    targets = dict(zip(("echo", "keep", "bulk", "udp"), map(int, m.groups()), strict=True))
    runner = Runner(a, targets)
    log(f"targets on 127.0.0.1: {targets}; temp dir {tmp}")

    rows: list[tuple[str, dict]] = []
    by_server: dict[str, dict] = {}
    all_notes: list[str] = []
    details: list[str] = []

    def phase(name: str, steps: list, raw: dict) -> str | None:
        """Start a fresh instance of `name`, run `steps`, stop it.
        Returns the row label, or None if the server is not installed."""
        srv = None
        if name == "none":
            proxy, pid = "none", None
        else:
            try:
                srv = start_server(name, tmp, a)
            except StartError as e:
                log(f"== {name}: failed to start: {e}")
                raise
            if srv is None:
                return None
            proxy, pid = f"127.0.0.1:{srv.port}", srv.proc.pid
        label = LABEL.get(name, name) + (f" ({srv.note})" if srv and srv.note else "")
        log(f"== {label}: proxy={proxy}" + (f" pid={pid}" if pid else ""))
        sampler = MemSampler(pid) if pid else None
        if sampler:
            sampler.start()
        try:
            for key, fn in steps:
                if key == "udp" and (DOOR == "http" or (srv and not srv.udp)):
                    raw["udp"] = "unsupported"
                    continue
                if srv and srv.proc.poll() is not None:
                    raw[key] = {"error": f"server died (exit {srv.proc.returncode})"}
                    continue
                ts = time.monotonic()
                raw[key] = fn(proxy, pid)
                brief = {k: raw[key][k] for k in list(raw[key])[:6] if k != "stderr"}
                log(f"   {key:<8} {time.monotonic() - ts:5.1f}s  {brief}")
                time.sleep(0.2)
        finally:
            if sampler:
                raw["peak_mib"] = max(raw.get("peak_mib", 0), sampler.finish() / 1024)
                raw["max_procs"] = max(raw.get("max_procs", 1), sampler.maxproc)
            if srv:
                if srv.proc.poll() is not None and not raw.get("died"):
                    raw["died"] = f"server exited with code {srv.proc.returncode} during the run"
                stop(srv.proc)
        return label

    # Two fresh instances per server: the idle-memory test runs alone on the
    # first (clean baseline; and e.g. danted's 2000-tunnel child-process
    # burst would otherwise slow down everything measured after it), the
    # throughput/latency scenarios on the second.
    phase_idle = [("idle", lambda p, pid: runner.idle(p, pid))]
    phase_load = [
        ("rr", lambda p, pid: runner.rr(p)),
        ("sessions", lambda p, pid: runner.sessions(p, pid)),
        ("bulk1", lambda p, pid: runner.bulk(p, 1)),
        ("bulk8", lambda p, pid: runner.bulk(p, 8)),
        ("udp", lambda p, pid: runner.udp(p)),
    ]
    try:
        for name in servers:
            t0 = time.monotonic()
            raw: dict = {}
            label = None
            only = VARIANTS[name].scenarios if name in VARIANTS else None
            chosen = [step for step in phase_load if only is None or step[0] in only]
            try:
                if only is None or "idle" in only:
                    label = phase(name, phase_idle, raw)
                    if label is None:
                        log(f"== {name}: not installed, skipped")
                        all_notes.append(f"{name}: not installed, skipped")
                        continue
                    phase(name, chosen, raw)
                elif (label := phase(name, chosen, raw)) is None:
                    continue
            except StartError as e:
                all_notes.append(f"{name}: failed to start ({str(e).splitlines()[0]})")
                if label is None:
                    rows.append((name, {k: "fail" for k, *_ in METRICS}))
                    continue
            v, notes = summarize(raw)
            if name == "socksflow" and isinstance(raw.get("udp"), dict) and raw["udp"].get("ok", 0) == 0:
                v["udp"] = DASH
            if name == "none":
                v["peak"] = None
            rows.append((label, v))
            by_server[name] = v
            all_notes += [f"{name}: {n}" for n in notes]
            if raw.get("died"):
                all_notes.append(f"{name}: {raw['died']}")
            idle = raw.get("idle") or {}
            if isinstance(idle, dict) and "kib_rss" in idle:
                details.append(
                    f"{name}: idle KiB/tunnel by Pss {idle.get('kib_pss', float('nan')):.1f}, "
                    f"by summed VmRSS {idle['kib_rss']:.1f} "
                    f"({int(idle.get('nproc_after', 1))} processes with the tunnels open)"
                )
            if raw.get("max_procs", 1) > 1 and isinstance(idle, dict) and "pss_after_mib" in idle:
                details.append(
                    f"{name}: peak RSS sums VmRSS over up to {int(raw['max_procs'])} processes, "
                    f"counting shared pages once per process; with the idle tunnels open "
                    f"the tree's RSS sum was {idle['rss_after_mib']:,.0f} MiB but its Pss "
                    f"(shared pages split) {idle['pss_after_mib']:,.0f} MiB"
                )
            if isinstance(raw.get("rr"), dict) and "p50_runs" in raw["rr"]:
                details.append(
                    f"{name}: rr p50 of the {RR_RUNS} runs: "
                    + ", ".join(f"{x:.1f}" for x in raw["rr"]["p50_runs"])
                    + " µs"
                )
            log(f"   ({time.monotonic() - t0:.1f}s)")
    finally:
        stop(target)
        shutil.rmtree(tmp, ignore_errors=True)

    total = time.monotonic() - t_start
    print()
    print(f"### socksflow benchmark ({'quick' if q else 'default'} run, {total:.0f}s)")
    print()
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    print(
        f"{os.cpu_count()} {TIMES} {cpu}, Linux {platform.release()}, "
        f"Python {platform.python_version()}; "
        f"microsocks {dpkg_version('microsocks')}, dante-server {dpkg_version('dante-server')}, "
        f"pproxy {py_version('pproxy')} (uvloop {py_version('uvloop')})."
    )
    busy_after = cpu_busy(0.5)
    quiet = "" if max(busy_before, busy_after) <= 10 else " **(not quiet: numbers are noisy)**"
    print(f"Background CPU load: {busy_before:.0f}% before, {busy_after:.0f}% after the run{quiet}.")
    close = "client RST" if a.rst else "target first"
    rr_client = "blocking" if a.rr_block else "busy-polling"
    print(
        f"sessions: {a.inflight} in flight, {a.sessions_secs:g}s, "
        f"{a.loadgen_threads} loadgen thread(s), close={close}; "
        f"bulk: {a.bulk_bytes / 2**20:.0f} MiB total per run; idle: {a.idle_tunnels} tunnels; "
        f"rr: {RR_RUNS} {TIMES} {a.rr_secs / RR_RUNS:g}s, client {rr_client}; "
        f"udp: {a.udp_secs:g}s, window {a.udp_window}, 64-byte payloads."
    )
    print()
    print_tables(rows)
    if a.goals:
        print()
        print_goals(by_server, rows)
    if all_notes or details:
        print()
        print("Notes:")
        for n in all_notes + details:
            print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
