"""How socksflow's own log lines look: the access log's timestamps, and which worker wrote them.

``2026-11-24T23:34:05.576Z [worker 1] WARNING socksflow.limits: ...``: ISO 8601 UTC to the
millisecond, as the access log's ``time`` field, so the two logs sort and join on one clock;
with ``run --workers N`` each worker names itself.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s %(worker)s%(levelname)s %(name)s: %(message)s"
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def timestamp(when: float) -> str:
    """``when`` in ISO 8601 UTC to the millisecond: ``2026-11-24T23:34:05.576Z``."""
    global _second
    whole = int(when)
    if whole != _second[0]:  # formatting the date once per second saves a µs per line
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    millis = min(999, round((when - whole) * 1_000_000) // 1000)  # as datetime rounds: µs first
    return f"{_second[1]}.{millis:03d}Z"


class Formatter(logging.Formatter):
    """socksflow's log lines: :func:`timestamp` times and the worker's name, if any."""

    worker = ""  # "[worker N] " in a worker process

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        record.worker = self.worker
        return super().format(record)


def setup(level: int) -> None:
    """Log to stderr at ``level`` in socksflow's format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter())
    logging.basicConfig(level=level, handlers=[handler])


def name_worker(number: int) -> None:
    """From now on, this process's log lines say they come from worker ``number``."""
    Formatter.worker = f"[worker {number}] "
