"""What the admin API remembers beyond the live sessions: totals, users, recent refusals, traffic.

Ended sessions are added up by ``socksflow_session_end`` (a few integer additions); live ones
are read from ``server.sessions`` when asked.  A sampler looks at every live session once a
second for the rates (and the traffic stream), so the cost per session is nothing on the
session's own path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from socksflow import Server, Session

MAX_EVENTS = 200  # recent auth failures, and recent limit refusals, each
TRAFFIC_SAMPLES = 300  # seconds of traffic history (the sparkline)
SAMPLE_EVERY = 1.0
LIMITS_PLUGIN = "limits"


class UserTotals:
    __slots__ = ("bytes_down", "bytes_up", "denied", "sessions")

    def __init__(self) -> None:
        self.sessions = self.denied = self.bytes_up = self.bytes_down = 0


class Observed:
    """One server's admin state."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.started = time.time()
        self.ended = 0
        self.denied = 0
        self.bytes_up = 0  # of ended sessions
        self.bytes_down = 0
        self.users: dict[str, UserTotals] = collections.defaultdict(UserTotals)
        self.auth_failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.refusals: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.traffic: collections.deque[dict[str, Any]] = collections.deque(maxlen=TRAFFIC_SAMPLES)
        self.rates: dict[str, tuple[float, float]] = {}  # session id: bytes/s up, down
        self._last: dict[str, tuple[int, int]] = {}
        self._last_total: tuple[float, int, int] | None = None
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._sampler: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ ended sessions

    def ended_session(self, session: Session) -> None:
        up, down = session.bytes_up, session.bytes_down
        self.ended += 1
        self.bytes_up += up
        self.bytes_down += down
        verdict = session.verdict
        denied = verdict is not None and not verdict.allowed
        self.denied += denied
        user = session.identity.user
        if user:
            totals = self.users[user]
            totals.sessions += 1
            totals.denied += denied
            totals.bytes_up += up
            totals.bytes_down += down
        if session.authenticated is False:
            self.auth_failures.append(event(session))
        elif denied and session.decided_by == LIMITS_PLUGIN:
            self.refusals.append(event(session))

    # ------------------------------------------------------------------ now

    def totals(self) -> dict[str, Any]:
        sessions = self.server.sessions
        live_up = sum(s.bytes_up for s in sessions)
        live_down = sum(s.bytes_down for s in sessions)
        last = self.traffic[-1] if self.traffic else {"up": 0.0, "down": 0.0}
        return {
            "time": time.time(), "uptime": time.time() - self.started,
            "sessions": len(sessions), "ended": self.ended, "denied": self.denied,
            "bytes_up": self.bytes_up + live_up, "bytes_down": self.bytes_down + live_down,
            "rate_up": last["up"], "rate_down": last["down"],
        }  # fmt: skip

    def user_table(self) -> list[dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {
            user: {"user": user, "sessions": t.sessions, "open": 0, "denied": t.denied,
                   "bytes_up": t.bytes_up, "bytes_down": t.bytes_down}
            for user, t in self.users.items()
        }  # fmt: skip
        for session in self.server.sessions:
            user = session.identity.user
            if not user:
                continue
            row = table.setdefault(
                user, {"user": user, "sessions": 0, "open": 0, "denied": 0, "bytes_up": 0, "bytes_down": 0}
            )
            row["open"] += 1
            row["bytes_up"] += session.bytes_up
            row["bytes_down"] += session.bytes_down
        return sorted(table.values(), key=lambda r: r["user"])

    # ------------------------------------------------------------------ the sampler

    def start(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def stop(self) -> None:
        for queue in self.subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)  # the stream ends
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            self.sample()

    def sample(self) -> None:
        """Per-session and total rates since the last sample; push them to the streams."""
        now = time.monotonic()
        last, current, rates = self._last, {}, {}
        up = down = 0
        for session in self.server.sessions:
            b_up, b_down = session.bytes_up, session.bytes_down
            up += b_up
            down += b_down
            current[session.id] = (b_up, b_down)
            before = last.get(session.id)
            if before is not None and self._last_total is not None:
                elapsed = now - self._last_total[0]
                rates[session.id] = ((b_up - before[0]) / elapsed, (b_down - before[1]) / elapsed)
        up += self.bytes_up
        down += self.bytes_down
        self._last, self.rates = current, rates
        if self._last_total is not None:
            elapsed = now - self._last_total[0]
            point = {
                "time": time.time(), "sessions": len(current),
                "up": max(0.0, (up - self._last_total[1]) / elapsed),
                "down": max(0.0, (down - self._last_total[2]) / elapsed),
            }  # fmt: skip
            self.traffic.append(point)
            for queue in self.subscribers:
                with contextlib.suppress(asyncio.QueueFull):  # a slow reader skips samples
                    queue.put_nowait(point)
        self._last_total = (now, up, down)


def event(session: Session) -> dict[str, Any]:
    """An auth failure or a refusal, for the recent-events lists."""
    return {
        "time": session.started, "session": session.id, "client": str(session.client),
        "user": session.identity.user or None, "plugin": session.decided_by or None,
        "reason": session.close_reason,
    }  # fmt: skip
