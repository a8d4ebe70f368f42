"""The configuration layer: YAML with positions, the core's sections, quantities; exact error texts."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from socksflow.config import Config, Node, default_config, parse_yaml
from socksflow.errors import ConfigError, ConfigErrors
from socksflow.protocol import Address
from socksflow.proxy_protocol import Version
from socksflow.units import parse_duration, parse_rate, parse_size

pytestmark = pytest.mark.smoke

MiB = 1024 * 1024
# The messages' fixed tails, so the tables below stay readable.
AS_BOOL = "is read as a boolean by YAML 1.1; write true/false, or quote it"
AMBIGUOUS = "is an ambiguous number in YAML (octal, sexagesimal…); quote it"
NOT_DURATION = "is not a duration (like 500ms, 10s, 5m, 1h)"
BAD_PORT = "port must be a number from 0 to 65535"
UNKNOWN_SECTION = "unknown section (no loaded plugin reads it)"


def load(text: str, file: str = "rules.yaml") -> Config:
    """A configuration whose errors (if any) were raised."""
    config = Config.from_text(text, file)
    config.raise_errors()
    return config


def errors_of(text: str, file: str = "rules.yaml", *, unclaimed: bool = False) -> list[str]:
    """Every error the file gives, as ``socksflow check`` prints them."""
    with pytest.raises(ConfigErrors) as caught:
        config = Config.from_text(text, file)
        if unclaimed:
            config.check_unclaimed()
        config.raise_errors()
    return [str(error) for error in caught.value.errors]


# ============================================================================ YAML


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: [127.0.0.1:1080]\ntimeouts: {}\nauth: {methods: [none]}\nauth: {users: x}\n",
            "rules.yaml:4: auth: duplicate key (first given on line 3)",
        ),
        (  # a block value is located at its key, not at the block's first line
            "listen: [127.0.0.1:1080]\nauth:\n  methods: [none]\nauth:\n  users: x\n",
            "rules.yaml:4: auth: duplicate key (first given on line 2)",
        ),
        (
            "auth:\n  methods: [none]\n  users: a\n  methods:\n    - userpass\n",
            "rules.yaml:4: auth.methods: duplicate key (first given on line 2)",
        ),
        (
            "timeouts:\n  idle: 5s\n  idle: 6s\n",
            "rules.yaml:3: timeouts.idle: duplicate key (first given on line 2)",
        ),
    ],
)
def test_duplicate_keys(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_duplicate_key_keeps_the_first_value() -> None:
    config = Config.from_text("timeouts:\n  idle: 5s\n  idle: 6s\n", "rules.yaml")
    assert config.timeouts.idle == 5.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no", f"'no' {AS_BOOL}"),
        ("yes", f"'yes' {AS_BOOL}"),
        ("on", f"'on' {AS_BOOL}"),
        ("Off", f"'Off' {AS_BOOL}"),
        ("0755", f"'0755' {AMBIGUOUS}"),
        ("0x1F", f"'0x1F' {AMBIGUOUS}"),
        ("1_000", f"'1_000' {AMBIGUOUS}"),
        ("8:30", f"'8:30' {AMBIGUOUS}"),
        ("190:20:30.15", "'190:20:30.15' is read as a sexagesimal number by YAML 1.1; quote it"),
    ],
)
def test_yaml_11_surprises_are_errors_unless_quoted(value: str, message: str) -> None:
    # Only the YAML error is reported: the validator's complaint about the same value is dropped.
    assert errors_of(f"plugins:\n  disable: [acl, {value}]\n") == [
        f"rules.yaml:2: plugins.disable[1]: {message}"
    ]
    for quoted in (f"'{value}'", f'"{value}"'):
        assert load(f"plugins:\n  disable: [acl, {quoted}]\n").plugins.disable == ["acl", value]
    assert load(f"plugins:\n  disable:\n    - |\n      {value}\n").plugins.disable == [f"{value}\n"]


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("a: true\nb: False\nc: TRUE\n", {"a": True, "b": False, "c": True}),
        ("a: 0\nb: -12\nc: +5\nd: 1080\n", {"a": 0, "b": -12, "c": 5, "d": 1080}),
        ("a: 1.5\nb: .5\nc: 1.0e+3\n", {"a": 1.5, "b": 0.5, "c": 1000.0}),
        ("a: ~\nb: null\nc:\n", {"a": None, "b": None, "c": None}),
        (
            "a: .inf\nb: 2024-01-01\nc: 127.0.0.1:1080\n",
            {"a": ".inf", "b": "2024-01-01", "c": "127.0.0.1:1080"},
        ),
        ("a: &x [1, 2]\nb: *x\n", {"a": [1, 2], "b": [1, 2]}),
        ("", {}),
        ("# nothing but a comment\n", {}),
    ],
)
def test_scalars_as_yaml_12_reads_them(text: str, plain: dict) -> None:
    root, errors = parse_yaml(text, "rules.yaml")
    assert errors == []
    assert root.plain() == plain


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: [127.0.0.1:1080]\nauth:\n  methods: [none\ntimeouts: {}\n",
            "rules.yaml:4: YAML syntax error: expected ',' or ']', but got ':'",
        ),
        (
            "auth:\n\tmethods: x\n",
            "rules.yaml:2: YAML syntax error: found character '\\t' that cannot start any token",
        ),
        ("a: b\n  c: d\n", "rules.yaml:2: YAML syntax error: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "rules.yaml:2: YAML syntax error: but found another document"),
        ("a: *nope\n", "rules.yaml:1: YAML syntax error: found undefined alias 'nope'"),
        ("listen: [::1]:1080\n", "rules.yaml:1: YAML syntax error: expected the node content, but found ':'"),
        ("a: 1\nb: c\x00\n", "rules.yaml:2: YAML syntax error: character #x0000 is not allowed in YAML"),
        ("a: 1\n\nb: \x07\n", "rules.yaml:3: YAML syntax error: character #x0007 is not allowed in YAML"),
    ],
)
def test_syntax_errors_name_the_line(text: str, error: str) -> None:
    assert errors_of(text) == [error]


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ("- listen\n", ["rules.yaml:1: the file must be a mapping of sections"]),
        ("just text\n", ["rules.yaml:1: the file must be a mapping of sections"]),
        ("? [a]\n: b\n", ["rules.yaml:1: keys must be plain text"]),
        ("a: &x [*x]\n", ["rules.yaml:1: a[0]: recursive alias (the value contains itself)"]),
        (
            "a: 1\nb: &x\n  c: *x\n",
            ["rules.yaml:3: b.c: recursive alias (the value contains itself)"],
        ),
    ],
)
def test_structure_errors(text: str, errors: list[str]) -> None:
    assert errors_of(text) == errors


def test_unknown_section() -> None:
    text = "listen: [127.0.0.1:1080]\nacl:\n  - deny: all\nlogg: {}\n"
    assert errors_of(text, unclaimed=True) == [
        f"rules.yaml:2: acl: {UNKNOWN_SECTION}",
        f"rules.yaml:4: logg: {UNKNOWN_SECTION}",
    ]
    config = Config.from_text(text, "rules.yaml")
    acl = config.section("acl")
    assert acl is not None and acl.plain() == [{"deny": "all"}]
    assert config.section("log") is None
    config.check_unclaimed()
    assert [str(e) for e in config.errors.errors] == [f"rules.yaml:4: logg: {UNKNOWN_SECTION}"]


def test_errors_sorted_by_line_and_deduplicated() -> None:
    text = (
        "listen: [x]\ntimeouts:\n  idle: yes\n  connect: 0755\nplugins:\n  autoload: no\nextra: 1\nextra: 2\n"
    )
    assert errors_of(text, unclaimed=True) == [
        "rules.yaml:1: listen[0]: 'x' is not HOST:PORT",
        f"rules.yaml:3: timeouts.idle: 'yes' {AS_BOOL}",
        f"rules.yaml:4: timeouts.connect: '0755' {AMBIGUOUS}",
        f"rules.yaml:6: plugins.autoload: 'no' {AS_BOOL}",
        f"rules.yaml:7: extra: {UNKNOWN_SECTION}",
        "rules.yaml:8: extra: duplicate key (first given on line 7)",
    ]


def test_config_error_rendering() -> None:
    assert str(ConfigError("bad", "rules.yaml", 14, "rules[3].to")) == "rules.yaml:14: rules[3].to: bad"
    assert str(ConfigError("bad", "rules.yaml", 0, "")) == "rules.yaml: bad"
    assert str(ConfigError("bad")) == "bad"
    many = ConfigErrors([ConfigError("b", "f", 2), ConfigError("a", "f", 1), ConfigError("a again", "f", 1)])
    assert str(many) == "f:1: a\nf:2: b"


# ============================================================================ files


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("listen: ['[::1]:0']\nplugins:\n  paths: [local.py, /opt/p]\n", encoding="utf-8")
    config = Config.from_file(path)
    assert config.file == str(path)
    assert config.listen == (Address.parse("[::1]:0"),)
    # Relative plugin paths are relative to the configuration file, not to the working directory.
    assert config.plugins.paths == [tmp_path / "local.py", Path("/opt/p")]


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigErrors) as caught:
        Config.from_file(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    bad = tmp_path / "rules.yaml"
    bad.write_text("timeouts:\n  idle: soon\n", encoding="utf-8")
    with pytest.raises(ConfigErrors) as caught:
        Config.from_file(bad).raise_errors()
    assert str(caught.value) == f"{bad}:2: timeouts.idle: 'soon' {NOT_DURATION}"


# ============================================================================ core sections


def test_defaults() -> None:
    config = default_config()
    assert config.listen == (Address.parse("127.0.0.1:1080"),)
    assert (config.timeouts.handshake, config.timeouts.connect, config.timeouts.idle) == (10.0, 10.0, 300.0)
    assert (config.timeouts.hook, config.timeouts.shutdown) == (5.0, 30.0)
    assert (config.plugins.paths, config.plugins.disable, config.plugins.autoload) == ([], [], True)
    assert not config.errors


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("listen: 127.0.0.1:1080", ["127.0.0.1:1080"]),
        ("listen: [127.0.0.1:1080]", ["127.0.0.1:1080"]),
        ("listen: ['[::1]:1080']", ["[::1]:1080"]),
        ("listen:\n  - 127.0.0.1:0\n  - '[::1]:1081'", ["127.0.0.1:0", "[::1]:1081"]),
        ("listen: [0.0.0.0:1080]", ["0.0.0.0:1080"]),
        ("listen: ['[::]:1080']", ["[::]:1080"]),
    ],
)
def test_listen(text: str, listen: list[str]) -> None:
    assert load(text).listen == tuple(Address.parse(a) for a in listen)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listen: [127.0.0.1]", "rules.yaml:1: listen[0]: '127.0.0.1' is not HOST:PORT"),
        ("listen: [1080]", "rules.yaml:1: listen[0]: '1080' is not HOST:PORT"),
        (
            "listen: [127.0.0.1:99999]",
            f"rules.yaml:1: listen[0]: '127.0.0.1:99999': {BAD_PORT}",
        ),
        (
            "listen: ['127.0.0.1:']",
            f"rules.yaml:1: listen[0]: '127.0.0.1:': {BAD_PORT}",
        ),
        ("listen: ['::1:1080']", "rules.yaml:1: listen[0]: '::1:1080': write IPv6 addresses as [addr]:port"),
        ("listen: ['[]:1080']", "rules.yaml:1: listen[0]: '[]:1080': host name of 0 characters"),
        (
            "listen: ['no such host:1080']",
            "rules.yaml:1: listen[0]: 'no such host:1080': "
            "'no such host' has characters not allowed in a host name",
        ),
        ("listen: []", "rules.yaml:1: listen: give at least one address to listen on"),
        ("listen:", "rules.yaml:1: listen: expected a list, got nothing"),
        ("listen: {a: b}", "rules.yaml:1: listen.a: unknown key (expected one of: addresses, open_proxy)"),
        ("listen: [[127.0.0.1:1]]", "rules.yaml:1: listen[0]: expected a single value, got a list"),
    ],
)
def test_listen_errors(text: str, error: str) -> None:
    assert errors_of(text) == [error]


@pytest.mark.parametrize(
    ("text", "protocols"),
    [
        ("listen: [127.0.0.1:1]", [{"socks5"}]),
        ("listen: [{address: 127.0.0.1:1, protocols: mixed}]", [{"socks5", "socks4", "http"}]),
        ("listen: [{address: 127.0.0.1:1, protocols: http}, 127.0.0.1:2]", [{"http"}, {"socks5"}]),
        ("listen: [{address: 127.0.0.1:1}]", [{"socks5"}]),
        (
            "listen: {addresses: [{address: '[::1]:1', protocols: [socks4, socks5]}], open_proxy: true}",
            [{"socks4", "socks5"}],
        ),
    ],
)
def test_listen_front_doors(text: str, protocols: list[set[str]]) -> None:
    config = load(text)
    assert [set(p) for p in config.listen_protocols] == protocols
    assert config.protocols_at(len(protocols)) == {"socks5"}  # an address --listen added


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen:\n  - {address: 127.0.0.1:1, protocols: [socks5, htp]}",
            "rules.yaml:2: listen[0].protocols[1]: 'htp' is not one of: socks5, socks4, http",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:1, protocols: all}",
            "rules.yaml:2: listen[0].protocols: 'all' is not one of: socks5, socks4, http, mixed",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:1, protocols: []}",
            "rules.yaml:2: listen[0].protocols: give at least one protocol (socks5, socks4, http) or mixed",
        ),
        (
            "listen:\n  - {protocols: mixed}",
            "rules.yaml:2: listen[0]: give the address to listen on (address: HOST:PORT)",
        ),
        (
            "listen:\n  - {address: 127.0.0.1:1, door: http}",
            "rules.yaml:2: listen[0].door: unknown key (expected one of: address, protocols, proxy_protocol, trusted)",
        ),
        (
            "doors: {tor_resolve: yes}",
            "rules.yaml:1: doors.tor_resolve: 'yes' is read as a boolean by YAML 1.1; write true/false, or quote it",
        ),
    ],
)
def test_front_door_errors_are_located(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_timeouts() -> None:
    config = load("timeouts:\n  handshake: 1.5\n  connect: 250ms\n  idle: 0\n  hook: 2\n  shutdown: 5m\n")
    timeouts = config.timeouts
    assert (timeouts.handshake, timeouts.connect, timeouts.idle, timeouts.hook, timeouts.shutdown) == (
        1.5,
        0.25,
        0.0,
        2.0,
        300.0,
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "timeouts:\n  idel: 5s",
            "rules.yaml:2: timeouts.idel: "
            "unknown key (expected one of: connect, handshake, hook, idle, shutdown)",
        ),
        ("timeouts: 5s", "rules.yaml:1: timeouts: expected a mapping, got '5s'"),
        ("timeouts:\n  idle: -1", "rules.yaml:2: timeouts.idle: -1 is negative"),
        (
            "timeouts:\n  idle: soon",
            f"rules.yaml:2: timeouts.idle: 'soon' {NOT_DURATION}",
        ),
        (
            "timeouts:\n  idle: true",
            f"rules.yaml:2: timeouts.idle: True {NOT_DURATION}",
        ),
        ("timeouts:\n  idle: [5s]", "rules.yaml:2: timeouts.idle: expected a single value, got a list"),
        ("timeouts:\n  idle:", "rules.yaml:2: timeouts.idle: expected a single value, got nothing"),
    ],
)
def test_timeout_errors(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_every_bad_timeout_is_reported() -> None:
    text = "timeouts:\n  idle: soon\n  connect: 5s\n  hook: later\n"
    assert errors_of(text) == [
        f"rules.yaml:2: timeouts.idle: 'soon' {NOT_DURATION}",
        f"rules.yaml:4: timeouts.hook: 'later' {NOT_DURATION}",
    ]
    assert Config.from_text(text, "rules.yaml").timeouts.connect == 5.0


def test_plugins_section() -> None:
    config = load(
        "plugins:\n  paths: extra.py\n  disable: [acl, log]\n  autoload: false\n", "/etc/socksflow/rules.yaml"
    )
    assert config.plugins.paths == [Path("/etc/socksflow/extra.py")]
    assert config.plugins.disable == ["acl", "log"]
    assert config.plugins.autoload is False


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "plugins:\n  bogus: 1",
            "rules.yaml:2: plugins.bogus: unknown key (expected one of: autoload, disable, paths)",
        ),
        ("plugins:\n  disable: 5", "rules.yaml:2: plugins.disable: expected text, got 5"),
        ("plugins:\n  autoload: 'no'", "rules.yaml:2: plugins.autoload: expected true or false, got 'no'"),
        ("plugins:\n  paths: [{a: b}]", "rules.yaml:2: plugins.paths[0]: expected text, got a mapping"),
        ("plugins: [acl]", "rules.yaml:1: plugins: expected a mapping, got a list"),
    ],
)
def test_plugins_errors(text: str, error: str) -> None:
    assert errors_of(text) == [error]


# ============================================================================ Node accessors


def node_of(text: str) -> Node:
    root, errors = parse_yaml(text, "rules.yaml")
    assert errors == []
    value = root.get("v")
    assert value is not None
    return value


def test_node_accessors() -> None:
    assert node_of("v: 5").as_int(minimum=1, maximum=10) == 5
    assert node_of("v: b").as_choice(("a", "b")) == "b"
    assert [n.value for n in node_of("v: x").as_list()] == ["x"]
    assert node_of("v: {a: 1}").as_map({"a"})["a"].value == 1
    assert node_of("v: 10MiB").as_size() == 10 * MiB
    assert node_of("v: 10MiB/s").as_rate() == 10 * MiB
    assert node_of("v:\n  - a\n  - b").value[1].location == "rules.yaml:3"
    assert repr(node_of("v: [1]")) == "<Node rules.yaml:1 v=[1]>"


@pytest.mark.parametrize(
    ("text", "call", "error"),
    [
        ("v: 0", lambda n: n.as_int(minimum=1), "rules.yaml:1: v: 0 is below the minimum 1"),
        ("v: 11", lambda n: n.as_int(maximum=10), "rules.yaml:1: v: 11 is above the maximum 10"),
        ("v: true", lambda n: n.as_int(), "rules.yaml:1: v: expected a whole number, got True"),
        ("v: 1.5", lambda n: n.as_int(), "rules.yaml:1: v: expected a whole number, got 1.5"),
        ("v: c", lambda n: n.as_choice(("a", "b")), "rules.yaml:1: v: 'c' is not one of: a, b"),
        ("v: {a: 1}", lambda n: n.as_list(), "rules.yaml:1: v: expected a list, got a mapping"),
        ("v: x", lambda n: n.as_list(scalar_ok=False), "rules.yaml:1: v: expected a list, got 'x'"),
        ("v:\n  b: 1", lambda n: n.as_map({"a"}), "rules.yaml:2: v.b: unknown key (expected one of: a)"),
        ("v: 5", lambda n: n.as_str(), "rules.yaml:1: v: expected text, got 5"),
        ("v: 1", lambda n: n.as_bool(), "rules.yaml:1: v: expected true or false, got 1"),
        ("v: 10XB", lambda n: n.as_size(), "rules.yaml:1: v: '10XB' is not a size (like 512KiB, 10MiB, 1GB)"),
        ("v: 10MiB", lambda n: n.as_rate(), "rules.yaml:1: v: '10MiB' is not a rate (like 10MiB/s or 100/s)"),
    ],
)
def test_node_errors(text: str, call, error: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        call(node_of(text))
    assert str(caught.value) == error


def test_error_collector_captures_several() -> None:
    config = Config.from_text("a: 1\nb: x\n", "rules.yaml")
    for key in ("a", "b"):
        with config.errors.capture():
            node = config.section(key)
            assert node is not None
            node.as_str() if key == "a" else node.as_int()
    assert [str(e) for e in config.errors.errors] == [
        "rules.yaml:1: a: expected text, got 1",
        "rules.yaml:2: b: expected a whole number, got 'x'",
    ]


# ============================================================================ quantities


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("10 s", 10.0),
        (" 5M ", 300.0),
        ("0s", 0.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", f"'5' {NOT_DURATION}"),
        ("soon", f"'soon' {NOT_DURATION}"),
        ("-5s", f"'-5s' {NOT_DURATION}"),
        ("5 weeks", f"'5 weeks' {NOT_DURATION}"),
        ("1h30m", f"'1h30m' {NOT_DURATION}"),
        ("", f"'' {NOT_DURATION}"),
        (True, f"True {NOT_DURATION}"),
        (-1, "-1 is negative"),
    ],
)
def test_bad_durations(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MiB", 10 * MiB),
        ("64KiB", 64 * 1024),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        ("10MB", 10_000_000),
        ("10M", 10_000_000),
        ("2k", 2000),
        ("1gb", 1_000_000_000),
        ("512", 512),
        ("512b", 512),
        ("10 mib", 10 * MiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10XB", "'10XB' is not a size (like 512KiB, 10MiB, 1GB)"),
        ("lots", "'lots' is not a size (like 512KiB, 10MiB, 1GB)"),
        ("-1KiB", "'-1KiB' is not a size (like 512KiB, 10MiB, 1GB)"),
        ("", "'' is not a size (like 512KiB, 10MiB, 1GB)"),
        ("10TiB", "'10TiB' is not a size (like 512KiB, 10MiB, 1GB)"),
        (True, "True is not a size (like 512KiB, 10MiB, 1GB)"),
        (-1, "-1 is negative"),
    ],
)
def test_bad_sizes(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10MiB/s", 10 * MiB),
        ("100/s", 100.0),
        ("600/m", 10.0),
        ("600/min", 10.0),
        ("3600/h", 1.0),
        ("1KiB/sec", 1024.0),
        ("60/minute", 1.0),
        ("5/second", 5.0),
        (" 10 MiB/S ", 10 * MiB),
        ("/s", 1.0),
    ],
)
def test_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10MiB", "'10MiB' is not a rate (like 10MiB/s or 100/s)"),
        ("100", "'100' is not a rate (like 10MiB/s or 100/s)"),
        ("100/d", "'100/d' is not a rate (like 10MiB/s or 100/s)"),
        ("100/", "'100/' is not a rate (like 10MiB/s or 100/s)"),
        ("fast/s", "'fast' is not a size (like 512KiB, 10MiB, 1GB)"),
        (100, "100 is not a rate (like 10MiB/s or 100/s)"),
    ],
)
def test_bad_rates(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_an_unknown_key_does_not_hide_the_errors_beside_it(tmp_path: Path) -> None:
    """Issue #13: ``timeouts.conect`` hid a bad ``idle``; a typo'd key hid a bad CIDR in the same rule."""
    (tmp_path / "rules.yaml").write_text(
        "timeouts: {conect: 5s, idle: soon}\n"
        "rules:\n"
        "  - deny: {to: 10.0.0.0/33, prot: 80}\n"
        "    reasn: typo\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "check", "rules.yaml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "rules.yaml:1: timeouts.conect: unknown key" in "\n".join(lines)
    assert f"rules.yaml:1: timeouts.idle: 'soon' {NOT_DURATION}" in lines
    assert any(line.startswith("rules.yaml:3: rules[0].deny.prot: unknown key") for line in lines), lines
    assert any(
        line.startswith("rules.yaml:3: rules[0].deny.to: ") and "10.0.0.0/33" in line for line in lines
    )
    assert any(line.startswith("rules.yaml:4: rules[0].reasn: unknown key") for line in lines), lines


def test_a_missing_plugin_path_is_located_and_the_other_errors_still_shown(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "plugins:\n  paths: [here.py, nowhere.py]\ntimeouts: {idle: soon}\n", encoding="utf-8"
    )
    (tmp_path / "here.py").write_text("", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "check", "rules.yaml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rules.yaml:2: plugins.paths[1]: plugin path 'nowhere.py' does not exist",
        f"rules.yaml:3: timeouts.idle: 'soon' {NOT_DURATION}",
    ]


def test_listen_proxy_protocol() -> None:
    config = load(
        "listen:\n"
        "  - {address: 127.0.0.1:1, proxy_protocol: v2, trusted: [10.0.0.0/24, '::1/128']}\n"
        "  - {address: 127.0.0.1:2, proxy_protocol: [v1, v2], trusted: 127.0.0.1/32}\n"
        "  - 127.0.0.1:3\n"
    )
    first, second = config.proxy_protocol_at(0), config.proxy_protocol_at(1)
    assert first is not None and second is not None
    assert first.versions == {Version.V2} and second.versions == {Version.V1, Version.V2}
    assert first.trusts(ipaddress.ip_address("10.0.0.7")) and first.trusts(ipaddress.ip_address("::1"))
    assert not first.trusts(ipaddress.ip_address("10.0.1.7"))
    assert config.proxy_protocol_at(2) is None and config.proxy_protocol_at(3) is None
    config.override_listen((Address.parse("127.0.0.1:9"),))  # run --listen: a direct listener
    assert config.proxy_protocol_at(0) is None


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            "{address: 127.0.0.1:1, proxy_protocol: v2}",
            "rules.yaml:1: listen[0]: proxy_protocol needs trusted: [CIDR, ...]",
        ),
        (
            "{address: 127.0.0.1:1, trusted: [10.0.0.0/8]}",
            "rules.yaml:1: listen[0].trusted: trusted applies to a listener with proxy_protocol",
        ),
        (
            "{address: 127.0.0.1:1, proxy_protocol: v3, trusted: [10.0.0.0/8]}",
            "rules.yaml:1: listen[0].proxy_protocol: 'v3' is not one of: v1, v2",
        ),
        (
            "{address: 127.0.0.1:1, proxy_protocol: v1,\n  trusted: [10.0.0.1/8]}",
            "rules.yaml:2: listen[0].trusted[0]: 10.0.0.1/8 has host bits set",
        ),
        (
            "{address: 127.0.0.1:1, proxy_protocol: [], trusted: [10.0.0.0/8]}",
            "rules.yaml:1: listen[0].proxy_protocol: give v1, v2 or [v1, v2]",
        ),
    ],
)
def test_listen_proxy_protocol_errors(entry: str, error: str) -> None:
    (message,) = errors_of(f"listen: [{entry}]")
    assert message.startswith(error), message
