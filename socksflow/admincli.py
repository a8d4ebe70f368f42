"""``socksflow sessions``, ``top`` and ``reload``: clients of a running server's admin API.

The API's address and token come from ``--admin URL`` and ``--token``, else from the
configuration file's ``admin:`` section (``listen``, ``token`` or ``token_file``).  Standard
library only: the commands work where the admin plugin's own dependency is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from socksflow import app
from socksflow.protocol import Address

DEFAULT_ADMIN = "127.0.0.1:9180"
FILTERS = ("client", "user", "destination", "rule", "command", "state")
TIMEOUT = 30.0
COLUMNS = (
    ("id", "ID"), ("client", "CLIENT"), ("user", "USER"), ("command", "CMD"), ("destination", "DESTINATION"),
    ("address", "ADDRESS"), ("rule", "RULE"), ("bytes_up", "UP"), ("bytes_down", "DOWN"), ("age", "AGE"),
)  # fmt: skip


def add_commands(commands: Any) -> None:
    """Add ``sessions``, ``top`` and ``reload`` to the command line's subcommands."""
    sessions = commands.add_parser("sessions", help="list a running server's sessions (admin API)")
    _admin_options(sessions)
    sessions.add_argument("--json", action="store_true", help="the API's JSON, as is")
    for name in FILTERS:  # dest: not "command", which names the subcommand
        sessions.add_argument(
            f"--{name}", dest=f"filter_{name}", help=f"only sessions whose {name} contains this"
        )
    sessions.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    sessions.add_argument("--close", action="store_true", help="close the sessions that match the filters")
    sessions.set_defaults(handler=_sessions)

    top = commands.add_parser("top", help="a live view of a running server: totals and the busiest sessions")
    _admin_options(top)
    top.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)"
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(handler=_top)

    reload = commands.add_parser("reload", help="validate and apply the rules file of a running server")
    _admin_options(reload)
    reload.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and show which recent decisions would flip; apply nothing",
    )
    reload.set_defaults(handler=_reload)


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="where to find the admin: section (default ./rules.yaml)"
    )
    parser.add_argument(
        "--admin", metavar="HOST:PORT", help="the admin API's address (default: from the config)"
    )
    parser.add_argument("--token", help="the admin API's token (default: from the config)")


class AdminError(Exception):
    """The API could not be reached or refused the request."""


def endpoint(args: argparse.Namespace) -> tuple[str, str | None]:
    """The API's base URL and token: from the flags, else the config's ``admin:`` section."""
    listen, token = args.admin, args.token
    if listen is None or token is None:
        config = app.load_config(args.config)
        section = config.root.value.get("admin") if isinstance(config.root.value, dict) else None
        items = section.value if section is not None and isinstance(section.value, dict) else {}
        if listen is None:
            listen = str(items["listen"].value) if "listen" in items else DEFAULT_ADMIN
        if token is None and "token" in items:
            token = str(items["token"].value)
        elif token is None and "token_file" in items:
            token = items["token_file"].as_path().read_text(encoding="utf-8").strip()
    address = Address.parse(listen)
    host = f"[{address.host}]" if ":" in str(address.host) else str(address.host)
    return f"http://{host}:{address.port}", token


def call(args: argparse.Namespace, method: str, path: str, ok: tuple[int, ...] = (200,)) -> tuple[int, Any]:
    """``method path`` on the API; its status and JSON body."""
    base, token = endpoint(args)
    request = urllib.request.Request(base + path, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return exc.code, json.load(exc)
        raise AdminError(f"{base}{path}: {exc.code} {exc.read().decode(errors='replace').strip()}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {base}: {reason}") from None


def _query(args: argparse.Namespace) -> str:
    pairs = {name: getattr(args, f"filter_{name}") for name in FILTERS if getattr(args, f"filter_{name}")}
    return urllib.parse.urlencode(pairs)


def _sessions(args: argparse.Namespace) -> int:
    try:
        if args.close:
            query = _query(args)
            if not query:
                print("socksflow: --close needs a filter (--client, --user, …)", file=sys.stderr)
                return 2
            _, body = call(args, "POST", f"/api/sessions/close?{query}")
            print(json.dumps(body) if args.json else f"closed {len(body['closed'])} sessions")
            return 0
        _, body = call(args, "GET", f"/api/sessions?limit={args.limit}&{_query(args)}")
    except AdminError as exc:
        print(f"socksflow: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [[_cell(key, s.get(key)) for key, _ in COLUMNS] for s in body["sessions"]]
    print(table([title for _, title in COLUMNS], rows))
    shown = len(body["sessions"])
    more = f" ({shown} shown)" if shown < body["matched"] else ""
    print(f"{body['matched']} of {body['total']} sessions{more}")
    return 0


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("bytes_up", "bytes_down"):
        return human_bytes(value)
    if key in ("rate_up", "rate_down"):
        return human_bytes(value) + "/s"
    if key == "age":
        return f"{value:.0f}s"
    return str(value)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return str(count)


def table(titles: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in column) for column in zip(titles, *rows, strict=False)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [titles, *rows]
    )


def _top(args: argparse.Namespace) -> int:
    """Totals and the 20 sessions moving the most bytes now, redrawn every ``--interval``."""
    try:
        while True:
            _, totals = call(args, "GET", "/api/totals")
            _, page = call(args, "GET", "/api/sessions?limit=1000")
            busiest = sorted(page["sessions"], key=lambda s: s["rate_up"] + s["rate_down"], reverse=True)[:20]
            columns = [*COLUMNS[:7], ("rate_up", "UP/S"), ("rate_down", "DOWN/S"), ("age", "AGE")]
            rows = [[_cell(key, s.get(key)) for key, _ in columns] for s in busiest]
            frame = (
                f"{totals['sessions']} open, {totals['ended']} ended, {totals['denied']} denied; "
                f"up {human_bytes(totals['rate_up'])}/s, down {human_bytes(totals['rate_down'])}/s\n\n"
                + table([title for _, title in columns], rows)
            )
            if args.once:
                print(frame)
                return 0
            print("\x1b[H\x1b[2J" + frame, flush=True)  # home, clear: one frame per screen
            time.sleep(args.interval)
    except AdminError as exc:
        print(f"socksflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _reload(args: argparse.Namespace) -> int:
    path = "/api/reload?dry_run=1" if args.dry_run else "/api/reload"
    try:
        status, body = call(args, "POST", path, ok=(200, 422))
    except AdminError as exc:
        print(f"socksflow: {exc}", file=sys.stderr)
        return 1
    for error in body.get("errors", []):
        print(error, file=sys.stderr)
    if status != 200:
        print(f"socksflow: {body['file']} rejected; the running configuration is unchanged", file=sys.stderr)
        return 1
    for warning in body.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    diff = body.get("diff")
    if diff is not None:
        print(f"replayed the last {diff['replayed']} decisions: {diff['flipped']} would change")
        for flip in diff["flips"]:
            who = flip["client"] + (f" ({flip['user']})" if flip["user"] else "")
            print(f"  {who} {flip['command']} {flip['destination']}: {flip['before']} -> {flip['after']}")
    print(f"{body['file']}: {'applied' if body['applied'] else 'valid, not applied (dry run)'}")
    return 0
