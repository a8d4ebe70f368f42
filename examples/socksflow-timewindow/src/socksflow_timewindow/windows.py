"""Time windows: reading the ``timewindow:`` section and telling whether a window is open."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from socksflow import Config, Node

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
EVERY_DAY = frozenset(range(7))
MINUTES_PER_DAY = 24 * 60
_TIME_RANGE = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Hours:
    """Minutes since midnight, ``start`` included and ``end`` excluded; ``end <= start`` runs overnight."""

    start: int
    end: int

    @property
    def overnight(self) -> bool:
        return self.end <= self.start

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


WHOLE_DAY = Hours(0, MINUTES_PER_DAY)


@dataclass(frozen=True, slots=True)
class Window:
    """Whom a window is for (``users`` and/or ``networks``) and when it is open."""

    users: frozenset[str] | None
    networks: tuple[Network, ...] | None
    days: frozenset[int]
    hours: tuple[Hours, ...]
    where: str  # "rules.yaml:5", for reasons and explanations
    days_text: str

    def names(self, user: str | None, client: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether this window is about a session of ``user`` from ``client``."""
        if self.users is not None and user not in self.users:
            return False
        if self.networks is not None:
            if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
                client = client.ipv4_mapped
            return any(client in network for network in self.networks)
        return True

    def is_open(self, moment: datetime) -> bool:
        """Whether ``moment`` (a local time in the window's zone) falls inside the window."""
        minute = moment.hour * 60 + moment.minute
        today, yesterday = moment.weekday(), (moment.weekday() - 1) % 7
        for hours in self.hours:
            if hours.overnight:  # it belongs to the day it starts on
                if (today in self.days and minute >= hours.start) or (
                    yesterday in self.days and minute < hours.end
                ):
                    return True
            elif today in self.days and hours.start <= minute < hours.end:
                return True
        return False

    def __str__(self) -> str:
        return f"{self.where}: {self.days_text} {', '.join(map(str, self.hours))}"


@dataclass(frozen=True, slots=True)
class Settings:
    zone: ZoneInfo | None  # None: the server's local time
    windows: tuple[Window, ...]

    def naming(self, user: str | None, client: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Window]:
        return [window for window in self.windows if window.names(user, client)]

    def local(self, moment: datetime) -> datetime:
        """``moment`` (time zone aware) in the zone the hours are written in."""
        return moment.astimezone(self.zone)


# ---------------------------------------------------------------------------- parsing


def parse_hours(value: object) -> Hours:
    """``"08:00-18:00"``; ``24:00`` may end a range; ``"22:00-06:00"`` runs overnight."""
    match = _TIME_RANGE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a time range (HH:MM-HH:MM)")
    h1, m1, h2, m2 = map(int, match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"{value!r} is not a time range")
    hours = Hours(h1 * 60 + m1, h2 * 60 + m2)
    if hours.start == hours.end:
        raise ValueError(f"{value!r} is an empty time range (for the whole day, leave hours out)")
    return hours


def parse_days(value: object) -> frozenset[int]:
    """``mon`` or a range ``mon-fri``; a range may wrap around the week (``fri-mon``)."""
    first, _, last = str(value).lower().partition("-")
    if first not in DAYS or (last and last not in DAYS):
        raise ValueError(f"{value!r} is not a day or a range of days ({', '.join(DAYS)})")
    start, end = DAYS.index(first), DAYS.index(last or first)
    return frozenset((start + offset) % 7 for offset in range((end - start) % 7 + 1))


def parse_network(value: object) -> Network:
    try:
        return ipaddress.ip_network(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a network or an IP address") from None


def load_zone(value: object) -> ZoneInfo:
    try:
        return ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a time zone (an IANA name such as Europe/Berlin)") from None


def read_settings(node: Node, config: Config) -> Settings:
    """The ``timewindow:`` section; every mistake is collected in ``config.errors``."""
    items = node.as_map({"timezone", "windows"})
    zone = None
    if "timezone" in items:
        with config.errors.capture():
            zone = items["timezone"].convert(load_zone)
    if "windows" not in items:
        raise node.error("list the windows: windows: [{user: NAME, days: [mon-fri], hours: 08:00-18:00}]")
    windows = []
    for item in items["windows"].as_list(scalar_ok=False):
        with config.errors.capture():
            windows.append(read_window(item))
    return Settings(zone, tuple(windows))


def read_window(node: Node) -> Window:
    items = node.as_map({"user", "from", "days", "hours"})
    if "user" not in items and "from" not in items:
        raise node.error("name whom the window is for: user, from, or both")
    users = frozenset(user.as_str() for user in items["user"].as_list()) if "user" in items else None
    networks = (
        tuple(net.convert(parse_network) for net in items["from"].as_list()) if "from" in items else None
    )
    days, days_text = EVERY_DAY, "every day"
    if "days" in items:
        listed = items["days"].as_list()
        if not listed:
            raise items["days"].error("list at least one day (leave days out for every day)")
        days = frozenset().union(*(day.convert(parse_days) for day in listed))
        days_text = ",".join(str(day.value).lower() for day in listed)
    hours = (WHOLE_DAY,)
    if "hours" in items:
        hours = tuple(span.convert(parse_hours) for span in items["hours"].as_list())
        if not hours:
            raise items["hours"].error("list at least one time range (leave hours out for the whole day)")
    return Window(users, networks, days, hours, node.location, days_text)
