"""``socksflow run | check | plugins``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import socksflow
from socksflow import admincli, app, detect, exposure, hookspecs, logs
from socksflow.errors import ConfigErrors
from socksflow.explain import ExplainQuery, explain, run_checks
from socksflow.hooks import Hooks
from socksflow.plugins import PluginLoadError
from socksflow.protocol import Address, Command, parse_host
from socksflow.server import Server
from socksflow.workers import STOP_SIGNALS, Group, ready_line, supervise

log = logging.getLogger("socksflow")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logs.setup(getattr(logging, args.log_level.upper()))
    try:
        return args.handler(args)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    except PluginLoadError as exc:
        print(f"socksflow: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="socksflow", description="A SOCKS5 proxy with pluggable rules.")
    parser.add_argument("--version", action="version", version=f"socksflow {socksflow.__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="least severe log lines shown",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy in the foreground")
    _config_options(run)
    run.add_argument(
        "--listen", action="append", metavar="HOST:PORT", type=_address,
        help="listen here instead of the config's addresses (repeatable; port 0 picks one)",
    )  # fmt: skip
    run.add_argument(
        "--protocols", type=_protocols, default=detect.SOCKS5_ONLY, metavar="LIST",
        help="the front doors of the --listen addresses: socks5,socks4,http or mixed (default socks5)",
    )  # fmt: skip
    run.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
        help="event loop: auto picks uvloop (installed with socksflow where it builds: CPython, not Windows), else asyncio",
    )  # fmt: skip
    run.add_argument(
        "--allow-open-proxy", action="store_true",
        help="serve a non-loopback address even though no login or rule keeps unknown clients out",
    )  # fmt: skip
    run.add_argument(
        "--workers", type=_worker_count, default="auto", metavar="N",
        help="worker processes sharing the ports (SO_REUSEPORT) and one set of limits; 'auto' (the default)"
             " = one per CPU this process may use (its affinity: taskset, cpusets; not a CFS quota),"
             " and 1 = a single process, no supervisor",
    )  # fmt: skip
    run.add_argument(
        "--shadow", metavar="FILE",
        help="decide every request by this configuration's rules too, and log where they disagree (no effect)",
    )  # fmt: skip
    run.set_defaults(handler=_run)

    check = commands.add_parser("check", help="validate a configuration file and run its tests")
    check.add_argument("config", nargs="?", help="the file (default: ./rules.yaml)")
    check.add_argument(
        "--disable-plugin", action="append", default=[], metavar="NAME", help="do not load this plugin"
    )
    check.set_defaults(handler=_check)

    explain = commands.add_parser("explain", help="show how a request would be decided, and why")
    _config_options(explain)
    explain.add_argument("destination", type=_address, metavar="HOST:PORT", help="the destination asked for")
    explain.add_argument("--from", dest="client", default="127.0.0.1", help="client IP (default 127.0.0.1)")
    explain.add_argument("--user", help="authenticated user name")
    explain.add_argument(
        "--command", default="connect", choices=list(EXPLAIN_COMMANDS), metavar="{connect,bind,udp,resolve,resolve_ptr}",
        help="SOCKS command, as rules.yaml spells it (udp_associate is udp)",
    )  # fmt: skip
    explain.add_argument(
        "--protocol", default="socks5", choices=detect.PROTOCOLS, help="the front door the client uses"
    )
    explain.set_defaults(handler=_explain)

    plugins = commands.add_parser("plugins", help="list the loaded plugins and their hooks")
    _config_options(plugins)
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument(
        "--hook", metavar="NAME", help="only the implementations of this hook, in the order they are called"
    )
    plugins.set_defaults(handler=_plugins)
    admincli.add_commands(commands)
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="configuration file (default: ./rules.yaml if present)"
    )
    parser.add_argument(
        "--disable-plugin", action="append", default=[], metavar="NAME", help="do not load this plugin"
    )


def _protocols(text: str) -> frozenset[str]:
    try:
        return detect.parse_protocols("mixed" if text == "mixed" else text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    config, pm = app.prepare(args.config, args.disable_plugin)
    if args.listen:
        config.override_listen(tuple(args.listen), (args.protocols,) * len(args.listen))
    for info in pm.plugin_info():
        log.info("plugin %s %s from %s", info.name, info.version, info.source)
    if not _exposure_allowed(exposure.assess(config, pm, args.allow_open_proxy)):
        return 1
    shadow = None
    if args.shadow:  # validated like the configuration in force, with the same plugins
        shadow = app.load_config(args.shadow)
        app.configure(pm, shadow)

    def server(worker: int | None = None, group: Group | None = None) -> Server:
        built = Server(config, pm, worker=worker, group=group)
        built.shadow = shadow
        return built

    loop, runner = _event_loop_runner(args.loop)
    if args.workers == 1:
        try:
            return runner(_serve(server(), loop))
        except KeyboardInterrupt:
            return 130
    try:
        return supervise(
            config,
            args.workers,
            lambda number, ready_fd, group: runner(_serve(server(number, group), loop, ready_fd)),
            loop,
        )
    except OSError as exc:
        print(f"socksflow: {exc.strerror}", file=sys.stderr)
        return 1


def _exposure_allowed(found: exposure.Exposure) -> bool:
    """Print the refusal, or log who can reach the listeners and what keeps strangers out."""
    if found.refusal:
        print(found.refusal, file=sys.stderr)
        return False
    if found.exposed:
        where = ", ".join(str(a) for a in found.exposed)
        if found.guards:
            log.info("%s can be reached from other hosts; kept out by: %s", where, "; ".join(found.guards))
        else:
            log.warning("%s serves anyone who reaches it: an open proxy (as configured)", where)
    return True


def _worker_count(text: str) -> int:
    if text == "auto":
        return usable_cpus()
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of processes or 'auto' (one per usable CPU)"
        )
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} processes would serve nothing: give 1 or more, or 'auto'")
    return int(text)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, cgroup cpusets), else all.

    A CFS quota (``docker --cpus``, a Kubernetes CPU limit) is not in the mask: pin ``--workers``
    there.
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _event_loop_runner(choice: str) -> tuple[str, Callable[[Coroutine[Any, Any, int]], int]]:
    """The loop's name (for the ready line) and the function that runs a coroutine on it."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    "socksflow: --loop uvloop needs the uvloop package (pip install .[fast] in socksflow's folder)"
                ) from None
        else:

            def run_uvloop(coroutine: Coroutine[Any, Any, int]) -> int:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(coroutine)

            return "uvloop", run_uvloop
    return "asyncio", asyncio.run


async def _serve(server: Server, loop_name: str, ready_fd: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; ``ready_fd`` (a worker's) gets one byte instead of the ready line."""
    if server.worker is not None:
        logs.name_worker(server.worker)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # "reopen logs": a no-op unless a plugin handles it
    try:
        await server.start()
    except OSError as exc:
        print(f"socksflow: {exc.strerror}", file=sys.stderr)
        return 1
    server.settle_heap()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def request_stop(name: str) -> None:
        received.append(name)
        stop.set()

    # Before announcing readiness: a signal sent as soon as the ready line appears must stop
    # the server gracefully, not kill it with the default action.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.spawn(server.reload()))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held while a worker started
    if ready_fd is None:
        print(ready_line(server.addresses, loop_name, 1), flush=True)
    elif ready_fd >= 0:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await stop.wait()
    log.info("%s received: stopping (sessions get up to %gs)", received[0], server.config.timeouts.shutdown)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.abort_all)  # a second signal: stop now
    await server.stop()
    log.info("stopped")
    return 0


# ---------------------------------------------------------------------------- check, plugins


def _check(args: argparse.Namespace) -> int:
    config, pm = app.prepare(args.config, args.disable_plugin)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    refusal = exposure.assess(config, pm).refusal
    if refusal:
        print(f"warning: {refusal.removeprefix('socksflow: ')}", file=sys.stderr)
    failures = run_checks(config, pm)
    for failure in failures:
        print(failure, file=sys.stderr)
    ran = config.checks_run
    if failures:
        print(f"{config.file}: {len(failures)} of {_tests(ran)} failed", file=sys.stderr)
        return 1
    print(f"{config.file}: OK, {_tests(ran)} passed" if ran else f"{config.file}: OK (it has no tests)")
    return 0


def _tests(count: int) -> str:
    return f"{count} test" if count == 1 else f"{count} tests"


DECISION_HOOKS = ("socksflow_client_connected", "socksflow_request")
# rules.yaml's spellings, and the protocol's name for UDP ASSOCIATE too
EXPLAIN_COMMANDS = {"connect": Command.CONNECT, "bind": Command.BIND, "udp": Command.UDP_ASSOCIATE,
                    "udp_associate": Command.UDP_ASSOCIATE, "resolve": Command.RESOLVE,
                    "resolve_ptr": Command.RESOLVE_PTR}  # fmt: skip


def _explain(args: argparse.Namespace) -> int:
    config, pm = app.prepare(args.config, args.disable_plugin)
    try:
        client = Address(parse_host(args.client), 0)
    except ValueError as exc:
        raise SystemExit(f"socksflow: --from: {exc}") from None
    if client.is_domain:
        raise SystemExit("socksflow: --from takes an IP address")
    query = ExplainQuery(client, args.destination, EXPLAIN_COMMANDS[args.command], args.user, args.protocol)
    lines = explain(config, pm, query)
    for line in lines:
        print(line)
    explaining = {impl.plugin for impl in pm.impls("socksflow_explain")}
    hooks = config.hooks or pm  # without the plugins this configuration leaves dormant
    deciding = {impl.plugin for hook in DECISION_HOOKS for impl in hooks.impls(hook)}
    if silent := sorted(deciding - explaining):
        verb = "decides" if len(silent) == 1 else "decide"
        print(f"not explained: {', '.join(silent)} {verb} on clients or requests without socksflow_explain")
    elif not lines:
        print("no plugin has rules for this request: it is allowed")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    config, pm = app.prepare(args.config, args.disable_plugin)
    if args.hook:
        return _hook_implementations(Hooks(config.hooks or pm, None), args.hook, args.json)
    infos = pm.plugin_info()
    if args.json:
        print(json.dumps([_as_dict(info) for info in infos], indent=2))
        return 0
    for info in infos:
        print(f"{info.name} {info.version}  ({info.source})")
        if info.unavailable:
            print(f"    dormant: {info.unavailable}")
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def _hook_implementations(hooks: Hooks, hook: str, as_json: bool) -> int:
    name = hook if hook.startswith("socksflow_") else f"socksflow_{hook}"
    if name not in hookspecs.ALL_HOOKS:
        raise SystemExit(f"socksflow: no hook named {hook!r} (see docs/reference/hooks.md)")
    impls = hooks.implementations(name)
    if as_json:
        print(json.dumps([impl.plugin for impl in impls]))
        return 0
    for impl in impls:
        print(impl.plugin)
    return 0


def _as_dict(info: Any) -> dict[str, Any]:
    return {
        "name": info.name, "version": info.version, "source": info.source, "hooks": list(info.hooks),
        "unavailable": info.unavailable,
    }  # fmt: skip
