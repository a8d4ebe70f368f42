"""socksflow-timewindow against a real socksflow server (the ``socksflow_server`` fixture).

The plugin is not passed to the fixture: it is loaded from its entry point, as an installed
plugin is, so these tests need the package installed (``pip install ./examples/socksflow-timewindow``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import bcrypt
import pytest
from socksflow.testing import socks5_handshake

import socksflow_timewindow
from socksflow_timewindow.windows import parse_days, parse_hours

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2025, 6, 2, tzinfo=BERLIN)  # a Monday in summer time (UTC+2)
WEEKDAYS_FROM_LOOPBACK = """
timewindow:
  timezone: Europe/Berlin
  windows:
    - {from: 127.0.0.0/8, days: [mon-fri], hours: "08:00-18:00"}
"""


def at(day: int, hour: int, minute: int = 0, zone: ZoneInfo = BERLIN) -> datetime:
    """``day`` days after Monday 2 June 2025, at hour:minute in ``zone``."""
    return datetime(2025, 6, 2 + day, hour, minute, tzinfo=zone)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[datetime]]:
    """Set ``clock[0]`` to the time the plugin sees."""
    moment = [MONDAY]
    monkeypatch.setattr(socksflow_timewindow, "now", lambda: moment[0])
    yield moment


@pytest.fixture
def target() -> Iterator[str]:
    """A TCP listener on loopback: a destination a CONNECT can reach."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def reply_for(server, target: str, **credentials: str) -> int:
    code, client = socks5_handshake(server.address, target, **credentials)
    client.close()
    return code


# ---------------------------------------------------------------------------- end to end


def test_allowed_inside_the_window_and_denied_outside(socksflow_server, clock, target):
    server = socksflow_server(WEEKDAYS_FROM_LOOPBACK)
    clock[0] = at(0, 9, 30)  # Monday 09:30
    assert reply_for(server, target) == 0x00
    clock[0] = at(0, 18, 0)  # the end is excluded
    assert reply_for(server, target) == 0x02
    clock[0] = at(5, 12, 0)  # Saturday noon
    assert reply_for(server, target) == 0x02


@pytest.mark.parametrize(
    ("zone", "expected"),
    [("Europe/Berlin", 0x00), ("UTC", 0x02)],
)
def test_hours_are_read_in_the_configured_zone(socksflow_server, clock, target, zone, expected):
    server = socksflow_server(WEEKDAYS_FROM_LOOPBACK.replace("Europe/Berlin", zone))
    clock[0] = at(0, 7, 30, ZoneInfo("UTC"))  # 09:30 in Berlin, 07:30 in UTC
    assert reply_for(server, target) == expected


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (at(4, 22, 0), 0x00),  # Friday 22:00: the window opens
        (at(4, 23, 59), 0x00),
        (at(5, 5, 59), 0x00),  # Saturday early morning still belongs to Friday's window
        (at(5, 6, 0), 0x02),  # closed
        (at(5, 22, 30), 0x02),  # Saturday night: not a listed day
        (at(4, 5, 0), 0x02),  # Friday early morning belongs to Thursday, not listed
    ],
)
def test_an_overnight_window_belongs_to_the_day_it_starts(socksflow_server, clock, target, moment, expected):
    config = WEEKDAYS_FROM_LOOPBACK.replace("[mon-fri]", "[fri]").replace("08:00-18:00", "22:00-06:00")
    server = socksflow_server(config)
    clock[0] = moment
    assert reply_for(server, target) == expected


def test_users_named_by_a_window_and_others(socksflow_server, clock, target, tmp_path: Path):
    users = tmp_path / "users.htpasswd"
    users.write_text(
        "".join(
            f"{name}:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n" for name in ("alice", "bob")
        )
    )
    users.chmod(0o600)
    server = socksflow_server(
        "auth: {methods: [userpass], users: users.htpasswd}\n"
        "timewindow:\n"
        "  timezone: Europe/Berlin\n"
        "  windows: [{user: alice, days: [mon-fri], hours: '08:00-18:00'}]\n"
    )
    clock[0] = at(6, 12, 0)  # Sunday
    assert reply_for(server, target, username="alice", password="secret") == 0x02
    assert reply_for(server, target, username="bob", password="secret") == 0x00  # no window names bob
    clock[0] = at(2, 12, 0)  # Wednesday
    assert reply_for(server, target, username="alice", password="secret") == 0x00


def test_sessions_no_window_names_are_left_alone(socksflow_server, clock, target):
    server = socksflow_server(WEEKDAYS_FROM_LOOPBACK.replace("127.0.0.0/8", "10.0.0.0/8"))
    clock[0] = at(6, 3, 0)  # Sunday 03:00: closed for 10.0.0.0/8, but we come from 127.0.0.1
    assert reply_for(server, target) == 0x00


# ---------------------------------------------------------------------------- as an operator sees it


def socksflow_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socksflow", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_listed_by_socksflow_plugins(tmp_path: Path):
    result = socksflow_cmd("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "timewindow 0.1.0  (" in result.stdout
    assert "    socksflow_request" in result.stdout


def test_bad_config_is_reported_with_file_line_and_key(tmp_path: Path):
    (tmp_path / "rules.yaml").write_text(
        "timewindow:\n"  # 1
        "  timezone: Europe/Berln\n"  # 2
        "  windows:\n"  # 3
        "    - user: alice\n"  # 4
        "      hours: '25:00-18:00'\n"  # 5
        "    - {from: 10.0.0.0/33, days: [mon-fir]}\n"  # 6
        "    - {days: [sat]}\n"  # 7
    )
    result = socksflow_cmd("check", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rules.yaml:2: timewindow.timezone: 'Europe/Berln' is not a time zone"
        " (an IANA name such as Europe/Berlin)",
        "rules.yaml:5: timewindow.windows[0].hours: '25:00-18:00' is not a time range",
        "rules.yaml:6: timewindow.windows[1].from: '10.0.0.0/33' is not a network or an IP address",
        "rules.yaml:7: timewindow.windows[2]: name whom the window is for: user, from, or both",
    ]


def test_explain_shows_the_windows(tmp_path: Path):
    (tmp_path / "rules.yaml").write_text(
        "timewindow:\n  windows:\n    - {user: alice}\n    - {from: 10.0.0.0/8, hours: '00:00-24:00'}\n"
    )
    result = socksflow_cmd("explain", "--user", "alice", "127.0.0.1:80", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "timewindow: rules.yaml:3: every day 00:00-24:00 is open" in result.stdout
    assert "timewindow: at " in result.stdout and "inside a window: no opinion" in result.stdout


# ---------------------------------------------------------------------------- parsing


def test_days_and_ranges():
    assert parse_days("mon-fri") == {0, 1, 2, 3, 4}
    assert parse_days("fri-mon") == {4, 5, 6, 0}  # wraps around the week
    assert parse_days("SUN") == {6}
    with pytest.raises(ValueError, match="'mon-fir' is not a day or a range of days"):
        parse_days("mon-fir")


@pytest.mark.parametrize("text", ["25:00-18:00", "08:60-18:00", "08:00-24:01", "8-18", "08:00"])
def test_bad_time_ranges(text):
    with pytest.raises(ValueError, match="is not a time range"):
        parse_hours(text)


def test_time_ranges():
    assert (parse_hours("08:00-18:00").start, parse_hours("08:00-18:00").end) == (480, 1080)
    assert parse_hours("22:00-06:00").overnight
    assert not parse_hours("00:00-24:00").overnight
    with pytest.raises(ValueError, match="empty time range"):
        parse_hours("08:00-08:00")
