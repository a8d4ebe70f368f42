"""Fuzz targets: plain functions of ``bytes`` that raise only on a defect.

Each target feeds its input to one parser and checks what must hold for *any* input: only the
documented errors escape (:class:`~socksflow.protocol.ProtocolError` from the wire,
:class:`~socksflow.errors.ConfigErrors` from configuration), and what parses re-encodes to
the same value.  Anything else raised is a crash.  ``fuzz/run.py`` runs them under atheris
(coverage-guided); ``tests/test_fuzz.py`` replays the seed corpus and every crash ever found.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path

from socksflow import app, detect
from socksflow.config import Config
from socksflow.errors import ConfigError, ConfigErrors
from socksflow.httpproxy import HttpProxyConnection
from socksflow.plugins import PluginManager
from socksflow.protocol import (
    NEED_DATA,
    Address,
    Greeting,
    Method,
    Phase,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    UserPassAuth,
    build_request,
    build_udp_header,
    decode_address,
    encode_address,
    parse_request,
    parse_udp_header,
)
from socksflow.socks4 import Socks4Connection

PRIVATE_METHOD = 0x80


# ---------------------------------------------------------------------------- the handshake


def protocol_stream(data: bytes) -> None:
    """A client byte stream, whole and in random chunks: the same events, errors and leftovers.

    ``data[0]`` picks the server's answers (method, auth result, reply), ``data[1]`` seeds the
    chunking, the rest is what the client sends.
    """
    if len(data) < 2:
        return
    policy, seed, stream = data[0], data[1], data[2:]
    whole = drive_handshake([stream], policy)
    rng = random.Random(seed)
    cuts = (
        sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12)))) if stream else []
    )
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    chunked = drive_handshake(chunks, policy)
    assert whole == chunked, f"chunking changed the outcome:\n{whole}\n{chunked}"


def drive_handshake(chunks: list[bytes], policy: int) -> list[object]:
    """Feed ``chunks`` to a ServerConnection, answering as ``policy`` says; the transcript."""
    conn = ServerConnection()
    transcript: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.phase is not Phase.CLOSED:
            if conn.phase is Phase.SUBNEGOTIATION:  # a plugin's method reads a message of its own size
                size = (policy >> 4) + 1
                if conn.buffered < size:
                    break
                transcript.append(("subnegotiation", conn.take_subnegotiation_data(size)))
                conn.finish_subnegotiation(bool(policy & 0x08))
                continue
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                transcript.append(("error", type(exc).__name__, exc.response))
                return transcript
            if event is NEED_DATA:
                break
            transcript.append(event)
            transcript.append(_answer(conn, event, policy))
    if conn.phase is Phase.DONE:
        transcript.append(("trailing", conn.trailing_data))
    transcript.append(("phase", conn.phase, conn.buffered))
    return transcript


def _answer(conn: ServerConnection, event: object, policy: int) -> bytes:
    """The server's answer to ``event``, with the round-trip checks each message allows."""
    if isinstance(event, Greeting):
        assert 1 <= len(event.methods) <= 255
        choices = (Method.NO_AUTH, Method.USERPASS, PRIVATE_METHOD, Method.NO_ACCEPTABLE)
        wanted = choices[policy & 0x03]
        return conn.send_method(wanted if wanted in event.methods else Method.NO_ACCEPTABLE)
    if isinstance(event, UserPassAuth):
        assert len(event.username) <= 255 and len(event.password) <= 255
        if len(event.password) >= 4 and event.password not in event.username:
            assert repr(event.password) not in repr(event), "repr shows the password"
        return conn.send_auth_status(bool(policy & 0x04))
    assert isinstance(event, Request)
    encoded = build_request(event.command, event.destination)
    assert parse_request(encoded) == (event, len(encoded)), "a request does not survive build → parse"
    reply = Reply.SUCCEEDED if policy & 0x08 else Reply(1 + policy % 8)
    return conn.send_reply(
        reply, event.destination if not event.destination.is_domain else Address.parse("0.0.0.0:0")
    )


# ---------------------------------------------------------------------------- addresses and UDP


def udp_header(data: bytes) -> None:
    """A datagram from a UDP client: a header or MalformedMessage/RequestError, never a crash."""
    try:
        header = parse_udp_header(data)
    except ProtocolError:
        return
    assert 4 <= header.offset <= len(data)
    assert header.frag == data[2]
    rebuilt = build_udp_header(header.destination, header.frag)
    again = parse_udp_header(rebuilt + b"payload")
    assert (again.destination, again.frag, again.offset) == (header.destination, header.frag, len(rebuilt))


def address(data: bytes) -> None:
    """``decode_address`` at any offset, and ``Address.parse`` of any text."""
    if not data:
        return
    offset = data[0] % 8
    try:
        decoded = decode_address(data[1:], offset)
    except ProtocolError:
        decoded = None
    if decoded is not None:
        found, end = decoded
        assert offset < end <= len(data) - 1
        encoded = encode_address(found)
        assert decode_address(encoded, 0) == (found, len(encoded)), (
            "an address does not survive encode → decode"
        )
    text = data[1:].decode("utf-8", "replace")
    try:
        parsed = Address.parse(text)
    except ValueError:
        return
    assert Address.parse(str(parsed)) == parsed, f"{text!r} → {parsed} does not parse back"


# ---------------------------------------------------------------------------- configuration


_DIRECTORY = Path(tempfile.mkdtemp(prefix="socksflow-fuzz-"))  # relative paths resolve in an empty folder
_PLUGINS: list[PluginManager] = []
_UNSAFE_PATHS = ("/dev", "/proc", "/sys")  # endless or blocking files: not a parser's problem


def config(data: bytes) -> None:
    """A rules file through the core and every standard plugin: ConfigErrors or a valid config."""
    text = data.decode("utf-8", "replace")
    if any(path in text for path in _UNSAFE_PATHS):
        return
    if not _PLUGINS:
        pm = PluginManager()
        pm.load_entry_points()
        _PLUGINS.append(pm)
    try:
        loaded = Config.from_text(text, str(_DIRECTORY / "rules.yaml"))
        app.configure(_PLUGINS[0], loaded)
    except ConfigErrors as exc:
        for error in exc.errors:
            _check_located(error)
        return
    except ConfigError as exc:  # raised outside the collector: still a located error
        _check_located(exc)
        return


def _check_located(error: ConfigError) -> None:
    # app.configure turns a plugin's unexpected exception into an error; for a fuzzer it is a crash.
    assert not (error.message.startswith("plugin ") and " failed: " in error.message), error.message
    assert error.file, f"an error without its file: {error}"


# ---------------------------------------------------------------------------- the other front doors


def front_door(data: bytes) -> None:
    """A SOCKS4/4a or HTTP proxy request (by its first byte), whole and in random chunks: the same
    request or the same ProtocolError, and a granted reply hands the same bytes to the relay."""
    if len(data) < 2:
        return
    seed, stream = data[0], data[1:]
    name = detect.protocol_of(stream[0])
    if name not in (detect.SOCKS4, detect.HTTP):
        return
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _drive_door(name, [stream]) == _drive_door(name, chunks)


def _drive_door(name: str, chunks: list[bytes]) -> tuple[object, ...]:
    conn = Socks4Connection() if name == detect.SOCKS4 else HttpProxyConnection()
    try:
        for index, chunk in enumerate(chunks):
            conn.receive_data(chunk)
            event = conn.next_event()
            if event is not NEED_DATA:
                if getattr(event, "tunnel", True):
                    conn.send_reply(Reply.SUCCEEDED)
                    rest = conn.trailing_data
                else:  # an absolute-form request is never granted raw: its body stays buffered
                    rest = bytes(conn._buffer)
                return event, rest + b"".join(chunks[index + 1 :])
    except ProtocolError as error:
        assert conn.phase is Phase.CLOSED
        return type(error), error.response
    return (NEED_DATA,)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "protocol": protocol_stream,
    "front_door": front_door,
    "udp_header": udp_header,
    "address": address,
    "config": config,
}
