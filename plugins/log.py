"""Access log: the ``log`` section — one line per session, whatever became of it.

```yaml
log:
  access:
    format: json          # json (one object per line) | text (key=value, for people and grep)
    file: access.log      # a path (relative to this file), "-" for stdout, or stderr
```

Each line: ``time`` (when the session was accepted, ISO 8601 UTC), ``session``, ``client``,
``protocol`` (the front door: socks5, socks4 or http; unknown for bytes of no protocol; none
when the client sent nothing),
``user`` (the user name given, also when the login failed; never a password), ``command``,
``destination`` (as requested), ``remote`` (the address actually connected to), ``verdict``
(allow / deny / - when the session ended before a request), ``rule`` and ``plugin`` (what
decided), ``reply`` (the SOCKS reply code), ``bytes_up``, ``bytes_down``, ``duration`` (seconds),
``authenticated`` and ``reason`` (why the session closed), and ``outbound`` for a session
routed through an outbound other than direct (``corp``; for a group, with the member it used:
``pool,pool=b``).

Non-ASCII and control characters in JSON (and in quoted text values) are escaped, so a user
name cannot forge or split lines.  Files are opened for appending.  Lines are written in
batches, at most 0.1 s after their session ended: one ``write(2)`` into the page cache per
batch, cheap enough to do on the event loop (a killed process loses at most that last 0.1 s;
a stopping one writes everything first).  SIGUSR1 reopens the file (after logrotate moved it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import json.encoder
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from socksflow import ROUTE, Address, Command, Config, Server, Session, StashKey, hookimpl, timestamp

log = logging.getLogger("socksflow.log")

STDOUT = "-"
STDERR = "stderr"
FORMATS = ("json", "text")
FLUSH_AFTER = 0.1  # seconds a line may wait to be written with the ones after it


@dataclass(frozen=True, slots=True)
class AccessSettings:
    format: str = "text"
    target: str = STDOUT  # STDOUT, STDERR or a file path


SETTINGS = StashKey[AccessSettings]("log.access")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("log")
    access = node.as_map({"access"}).get("access") if node is not None else None
    if access is None:
        return False  # dormant: no access log
    items = access.as_map({"format", "file"})
    settings = AccessSettings()
    if "format" in items:
        settings = AccessSettings(items["format"].as_choice(FORMATS), settings.target)
    if "file" in items:
        name = items["file"].as_str()
        target = name if name in (STDOUT, STDERR) else str(items["file"].as_path())
        if target not in (STDOUT, STDERR) and not os.access(Path(target).parent, os.W_OK):
            raise items["file"].error(f"cannot write in {str(Path(target).parent)!r}")
        settings = AccessSettings(settings.format, target)
    config.stash[SETTINGS] = settings


# ---------------------------------------------------------------------------- the output


class AccessLog:
    """Where access lines go: a file (reopened on demand), stdout or stderr.

    Finished sessions wait up to :data:`FLUSH_AFTER` and are then formatted and written
    together: one ``write(2)`` per batch instead of one per session, and the formatting code
    runs hot in a loop rather than once between every two sessions' work.  Closing and
    reopening write what is pending first.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: TextIO | None = None
        self._pending: list[tuple[Any, str]] = []  # (session, format)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._open()

    def _open(self) -> None:
        if self.target not in (STDOUT, STDERR):
            self._file = open(self.target, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def add(self, session: Session, format: str) -> None:
        """Log ``session`` (ended: its fields no longer change) in ``format``."""
        self._pending.append((session, format))
        if self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop to flush later (a script, a test): now
                self.flush()
                return
            self._flush_timer = loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        """Write the pending lines now."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        # Looked up late: stdout and stderr may be replaced.
        stream = self._file or (sys.stdout if self.target == STDOUT else sys.stderr)
        try:
            stream.write(
                "".join(
                    [
                        (json_text(session) if format == "json" else line(session, format)) + "\n"
                        for session, format in pending
                    ]
                )
            )
            stream.flush()
        except Exception as exc:  # a full disk, a closed stream: say so, keep serving
            log.error("access log %s: %d lines lost: %r", self.target, len(pending), exc)

    def reopen(self) -> None:
        """Close and reopen the file (logrotate moved it); nothing to do for stdout/stderr."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
            self._open()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


OUTPUT = StashKey[AccessLog]("log.output")


def output(server: Server, settings: AccessSettings) -> AccessLog:
    """The server's open access log, (re)opened for ``settings`` (a reload may have moved it)."""
    current = server.stash.get(OUTPUT)
    if current is not None and current.target == settings.target:
        return current
    if current is not None:
        current.close()
    server.stash[OUTPUT] = current = AccessLog(settings.target)
    return current


def reopen(server: Server) -> None:
    """Reopen the access log file: what SIGUSR1 does."""
    current = server.stash.get(OUTPUT)
    if current is not None:
        try:
            current.reopen()
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s", current.target, exc.strerror)
            del server.stash[OUTPUT]  # the next line tries again
        else:
            log.info("access log %s reopened", current.target)


@hookimpl
def socksflow_startup(server: Server) -> None:
    settings = server.config.stash.get(SETTINGS)
    if settings is not None:
        output(server, settings)
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, reopen, server)
    except (RuntimeError, ValueError):  # not the main thread (tests, embedding): no signals here
        log.debug("SIGUSR1 is not handled by this server: it does not run in the main thread")


@hookimpl
def socksflow_shutdown(server: Server) -> None:
    with contextlib.suppress(RuntimeError, ValueError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
    current = server.stash.get(OUTPUT)
    if current is not None:
        current.close()
        del server.stash[OUTPUT]


# ---------------------------------------------------------------------------- the lines


@hookimpl
def socksflow_session_end(session: Session) -> None:
    settings = session.server.config.stash.get(SETTINGS)
    if settings is None:
        return
    current = session.server.stash.get(OUTPUT)  # output()'s usual answer, without the call
    if current is None or current.target != settings.target:
        current = output(session.server, settings)
    current.add(session, settings.format)


def line(session: Session, format: str) -> str:
    """The access log line of a finished session, in ``format``."""
    fields = record(session)
    return json_line(fields) if format == "json" else text_line(fields)


def record(session: Session) -> dict[str, Any]:
    """The access log fields of a finished session."""
    request = session.request
    verdict = session.verdict
    fields = {
        "time": timestamp(session.started),
        "session": session.id,
        "client": client_text(session.client),
        "protocol": session.protocol or None,
        "user": session.identity.user or None,
        "command": COMMAND_NAMES[request.command] if request else None,
        "destination": address_text(request.destination) if request else None,
        "remote": address_text(session.remote) if session.remote else None,
        "verdict": session.outcome,
        "rule": (verdict.rule or None) if verdict else None,
        "plugin": (session.decided_by or None) if verdict else None,
        "reply": int(session.reply) if session.reply is not None else None,
        "bytes_up": session.bytes_up,
        "bytes_down": session.bytes_down,
        "duration": round(session.duration, 3),
        "authenticated": session.authenticated,
        "reason": session.close_reason or None,
    }
    route = session.stash.get(ROUTE)
    if route is not None:
        fields["outbound"] = route
    return fields


COMMAND_NAMES = {command: command.name.lower() for command in Command}
MAX_TEXTS = 4096
_texts: dict[tuple[Any, ...], str] = {}


def address_text(address: Address) -> str:
    """``str(address)``, remembered per host and port: sessions go to few destinations, and an
    IP address is written by five Python calls (the client's, whose port changes every time, is not)."""
    host = address.host
    key = (host, address.port) if isinstance(host, str) else (host.__class__, int(host), address.port)
    text = _texts.get(key)
    if text is None:
        if len(_texts) >= MAX_TEXTS:
            _texts.clear()
        text = _texts[key] = str(address)
    return text


_hosts: dict[tuple[Any, ...], str] = {}


def client_text(address: Address) -> str:
    """``str(address)`` for a client: its host's text remembered (few clients, a new port each
    time), the port added: an IP address's own ``str`` is five Python calls."""
    host = address.host
    if isinstance(host, str):
        return str(address)
    key = (host.__class__, int(host))
    text = _hosts.get(key)
    if text is None:
        if len(_hosts) >= MAX_TEXTS:
            _hosts.clear()
        text = _hosts[key] = f"[{host}]" if host.version == 6 else str(host)
    return f"{text}:{address.port}"


_JSON = json.JSONEncoder(check_circular=False)  # a record holds no containers: nothing to check
# json's C encoder, made once: JSONEncoder.encode makes one per line.  Same output, same options.
_encode = (
    json.encoder.c_make_encoder(
        None, _JSON.default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def json_line(fields: dict[str, Any]) -> str:
    """``fields`` as one line of JSON, as ``json.dumps`` writes it (ASCII only: escapes the rest)."""
    return "".join(_encode(fields, 0)) if _encode is not None else _JSON.encode(fields)


_quote = json.encoder.encode_basestring_ascii  # the C function json.dumps uses, when there is one


def json_text(session: Session) -> str:
    """``json_line(record(session))``, byte for byte, written in one f-string: no dict, no encoder.

    The fields of unusual types (a plugin's subclass, a counter that is not an ``int``) take
    the general way.
    """
    session_id = session.id
    up = session.bytes_up
    down = session.bytes_down
    duration = round(session.duration, 3)
    route = session.stash.get(ROUTE)
    if (
        type(session_id) is not str
        or type(up) is not int
        or type(down) is not int
        or type(duration) is not float
        or not -1e300 < duration < 1e300  # json writes NaN and Infinity its own way
        or (route is not None and type(route) is not str)
    ):
        return json_line(record(session))
    try:  # a value of another type than the usual (a user name that is not a str): the general way
        q = _quote
        request = session.request
        verdict = session.verdict
        protocol = session.protocol
        user = session.identity.user
        remote = session.remote
        outcome = session.outcome
        reply = session.reply
        authenticated = session.authenticated
        reason = session.close_reason
        if request is not None:
            command = q(COMMAND_NAMES[request.command])
            destination = q(address_text(request.destination))
        else:
            command = destination = "null"
        if verdict is not None:
            rule = q(verdict.rule) if verdict.rule else "null"
            plugin = q(session.decided_by) if session.decided_by else "null"
        else:
            rule = plugin = "null"
        return (
            f'{{"time": {q(timestamp(session.started))}, "session": {q(session_id)}, '
            f'"client": {q(client_text(session.client))}, "protocol": {q(protocol) if protocol else "null"}, '
            f'"user": {q(user) if user else "null"}, "command": {command}, "destination": {destination}, '
            f'"remote": {q(address_text(remote)) if remote else "null"}, '
            f'"verdict": {"null" if outcome is None else q(outcome)}, "rule": {rule}, "plugin": {plugin}, '
            f'"reply": {"null" if reply is None else int(reply)}, "bytes_up": {up}, "bytes_down": {down}, '
            f'"duration": {duration!r}, '
            f'"authenticated": {"null" if authenticated is None else "true" if authenticated else "false"}, '
            f'"reason": {q(reason) if reason else "null"}'
            + ("}" if route is None else f', "outbound": {q(route)}}}')
        )
    except TypeError:
        return json_line(record(session))


def text_line(fields: dict[str, Any]) -> str:
    """``time key=value …``: values with spaces, quotes or control characters are JSON-quoted."""
    parts = [fields["time"]]
    for key, value in fields.items():
        if key == "time":
            continue
        if key == "reply" and value is not None:
            text = f"0x{value:02x}"
        elif value is None:
            text = "-"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = str(value)
        if not text or not text.isprintable() or any(c in text for c in ' "=\\'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)
