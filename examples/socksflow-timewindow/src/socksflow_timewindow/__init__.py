"""socksflow-timewindow: allow a user or a network only on given weekdays and hours.

```yaml
timewindow:
  timezone: Europe/Berlin
  windows:
    - {user: alice, days: [mon-fri], hours: "08:00-18:00"}
    - {from: 10.0.0.0/8, days: [sat, sun], hours: "10:00-16:00"}
```

A session that a window names (by ``user`` or by client network, ``from``) is denied with
reply 0x02 while none of the windows naming it is open.  Otherwise this plugin has no
opinion: inside its window a session still goes through ``rules:`` and the other plugins.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from socksflow import Config, Request, StashKey, Verdict, hookimpl

from .windows import Settings, Window, read_settings

if TYPE_CHECKING:
    from socksflow.explain import ExplainQuery

__version__ = "0.1.0"

SETTINGS = StashKey[Settings]("timewindow.settings")


def now() -> datetime:
    """The current time (time zone aware).  Tests replace this function to travel in time."""
    return datetime.now(UTC)


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("timewindow")
    if node is None:
        return False  # dormant: no windows, and socksflow_request is not called at all
    config.stash[SETTINGS] = read_settings(node, config)
    return None


@hookimpl
def socksflow_request(session, request: Request) -> Verdict | None:
    settings = session.config.stash.get(SETTINGS)
    if settings is None:
        return None
    windows = settings.naming(session.identity.user, session.client.host)
    if not windows:
        return None
    moment = settings.local(now())
    if any(window.is_open(moment) for window in windows):
        return None
    return Verdict.deny(
        f"outside its time windows at {_when(moment)} ({_list(windows)})", rule=windows[0].where
    )


@hookimpl
def socksflow_explain(config: Config, query: ExplainQuery) -> list[str] | None:
    settings = config.stash.get(SETTINGS)
    if settings is None:
        return None
    windows = settings.naming(query.user, query.client.host)
    if not windows:
        return ["timewindow: no window names this client or user: no opinion"]
    moment = settings.local(now())
    lines = [
        f"timewindow: {window} is {'open' if window.is_open(moment) else 'closed'}" for window in windows
    ]
    if any(window.is_open(moment) for window in windows):
        return [*lines, f"timewindow: at {_when(moment)} inside a window: no opinion"]
    return [*lines, f"timewindow: at {_when(moment)} outside every window: deny (reply 0x02)"]


def _when(moment: datetime) -> str:
    return moment.strftime("%a %H:%M %Z")


def _list(windows: list[Window]) -> str:
    return "; ".join(map(str, windows))
