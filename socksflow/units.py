"""Quantities written as humans write them: ``250ms``, ``5m``, ``10MiB``, ``10MiB/s``, ``100/s``."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}  # fmt: skip
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile(rf"{_NUMBER}\s*(ms|s|m|h|d)")
_SIZE_RE = re.compile(rf"{_NUMBER}\s*([a-z]*)")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a bare number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return float(text)
    match = _DURATION_RE.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 500ms, 10s, 5m, 1h)")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_size(text: str | int) -> int:
    """Bytes from ``"64KiB"``, ``"10MB"``, ``"1GiB"`` or a bare number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return text
    match = _SIZE_RE.fullmatch(str(text).strip().lower())
    if not match or match[2] not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (like 512KiB, 10MiB, 1GB)")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def parse_rate(text: str) -> float:
    """Units per second from ``"10MiB/s"`` (bytes) or ``"100/s"``, ``"600/m"`` (counts)."""
    amount, slash, per = str(text).strip().lower().partition("/")
    if not slash or per not in _PER:
        raise ValueError(f"{text!r} is not a rate (like 10MiB/s or 100/s)")
    return parse_size(amount or "1") / _PER[per]
