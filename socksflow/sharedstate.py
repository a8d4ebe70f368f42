"""Limit state that every worker of one machine shares: counts, token buckets, blocks.

``socksflow run --workers N`` forks N servers; a limit written once in ``rules.yaml`` must hold
for all of them together.  The supervisor makes one :class:`SharedTable` before it forks: an
anonymous shared mapping holding a fixed-size hash table and a process-shared *robust* mutex
(a worker killed while holding it does not wedge the others: the next locker is told the
owner died and carries on).  Each operation is one short critical section — a lock, a few
field updates, an unlock — about a microsecond, so a session pays for sharing once or twice.
A table for one worker (one process serving alone) is that process's own and takes no lock.

Keys are hashed with Python's ``hash``: forked workers share the supervisor's hash seed, so a
key hashes alike in all of them (this table is for one machine; Redis is for many).  Each slot
keeps the concurrency count per worker as well as the total, so the supervisor can give back
what a dead worker held (:meth:`SharedTable.release_worker`).

A slot that carries no information (no count, a full bucket, no block, no recent event) is
reused; a key finds its slot within a window of :data:`PROBE_WINDOW` slots.  When a window is
full of live slots the operation cannot record anything: admission then refuses (an attacker
who fills the table must not escape the limits) and bandwidth goes unpaced; both are logged
once.  Size the table above the number of keys live at once (``slots``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
from collections.abc import Hashable, Sequence

log = logging.getLogger("socksflow.sharedstate")

PROBE_WINDOW = 32
DEFAULT_SLOTS = 65536
_MUTEX_BYTES = 64  # pthread_mutex_t is 40 bytes on x86-64 glibc, 48 on arm64
_ATTR_BYTES = 16
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

_libc = ctypes.CDLL(None, use_errno=True)

Check = tuple[str, Hashable, int] | tuple[str, Hashable, float, float, float]  # see SharedTable.admit


def _slot_type(workers: int) -> type[ctypes.Structure]:
    class Slot(ctypes.Structure):
        _fields_ = (
            ("key", ctypes.c_int64),  # hash(key); 0 = free
            ("total", ctypes.c_int64),  # concurrency count, all workers
            ("tokens", ctypes.c_double),  # token bucket
            ("stamp", ctypes.c_double),
            ("rate", ctypes.c_double),
            ("burst", ctypes.c_double),
            ("until", ctypes.c_double),  # blocked until (monotonic)
            ("window", ctypes.c_double),  # start of the current event window
            ("current", ctypes.c_int64),  # events in the current window
            ("previous", ctypes.c_int64),  # events in the window before it
            ("span", ctypes.c_double),  # the windows' length
            ("counts", ctypes.c_int32 * workers),  # concurrency count per worker
        )

    return Slot


class SharedTable:
    """A hash table of limit state in memory shared by forked workers (make it before forking)."""

    def __init__(self, workers: int, slots: int = DEFAULT_SLOTS) -> None:
        if workers < 1 or slots < PROBE_WINDOW:
            raise ValueError("a shared table needs at least one worker and PROBE_WINDOW slots")
        self.workers = workers
        self.worker = 0  # this process's column: set by each worker after the fork
        slot_type = _slot_type(workers)
        size = _MUTEX_BYTES + ctypes.sizeof(slot_type) * slots
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._mutex = ctypes.byref(ctypes.c_char.from_buffer(self._map, 0))
        self._slots = (slot_type * slots).from_buffer(self._map, _MUTEX_BYTES)
        self._size = slots
        self._full_logged = False
        self._known: dict[Hashable, tuple[int, ctypes.Structure]] = {}  # see _remember
        attr = ctypes.create_string_buffer(_ATTR_BYTES)
        for call, argument in (
            (_libc.pthread_mutexattr_init, None),
            (_libc.pthread_mutexattr_setpshared, _PTHREAD_PROCESS_SHARED),
            (_libc.pthread_mutexattr_setrobust, _PTHREAD_MUTEX_ROBUST),
        ):
            rc = call(attr) if argument is None else call(attr, argument)
            if rc:
                raise OSError(rc, f"{call.__name__}: {errno.errorcode.get(rc, rc)}")
        rc = _libc.pthread_mutex_init(self._mutex, attr)
        if rc:
            raise OSError(rc, f"pthread_mutex_init: {errno.errorcode.get(rc, rc)}")

    # ------------------------------------------------------------------ locking

    def __enter__(self) -> SharedTable:
        """Hold the table's mutex: one short critical section per operation.

        A table for one worker is that process's alone (a supervisor touches it only once the
        worker is dead): it takes no lock.
        """
        if self.workers == 1:
            return self
        rc = _libc.pthread_mutex_lock(self._mutex)
        if rc == errno.EOWNERDEAD:  # a worker died inside a critical section: its update may be half done
            _libc.pthread_mutex_consistent(self._mutex)
        elif rc:
            raise OSError(rc, "pthread_mutex_lock failed")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.workers != 1:
            _libc.pthread_mutex_unlock(self._mutex)

    # ------------------------------------------------------------------ slots

    def _slot(self, key: Hashable, now: float, create: bool) -> ctypes.Structure | None:
        """The key's slot (caller holds the lock); a new one if ``create``; None if there is none
        (and, creating, when the probe window is full of live slots: logged once)."""
        known = self._known.get(key)
        if known is not None and known[1].key == known[0]:  # still this key's: no probing
            return known[1]
        wanted = _mix(hash(key))
        slots = self._slots
        start = wanted % self._size
        reusable = None
        for probe in range(PROBE_WINDOW):
            slot = slots[(start + probe) % self._size]
            if slot.key == wanted:
                self._remember(key, wanted, slot)
                return slot
            if reusable is None and (slot.key == 0 or _forgettable(slot, now)):
                reusable = slot
        if not create:
            return None
        if reusable is None:
            if not self._full_logged:
                self._full_logged = True
                log.error(
                    "shared limit table full (%d slots): new keys are refused; raise its size", self._size
                )
            return None
        ctypes.memset(ctypes.addressof(reusable), 0, ctypes.sizeof(reusable))
        reusable.key = wanted
        reusable.window = now
        self._remember(key, wanted, reusable)
        return reusable

    def _remember(self, key: Hashable, wanted: int, slot: ctypes.Structure) -> None:
        """Note where ``key`` lives, for this process: a key has one slot, which stays its own
        until it carries no information and another key takes it (then its ``key`` differs)."""
        if len(self._known) >= self._size:
            self._known.clear()
        self._known[key] = (wanted, slot)

    # ------------------------------------------------------------------ concurrency counts

    def acquire(self, key: Hashable, limit: int, now: float) -> bool:
        """Count one more session under ``key`` unless ``limit`` are already counted."""
        with self:
            return self._acquire(key, limit, now)

    def _acquire(self, key: Hashable, limit: int, now: float) -> bool:
        slot = self._slot(key, now, True)
        if slot is None or slot.total >= limit:
            return False
        slot.total += 1
        counts = slot.counts  # each read of a ctypes array field makes an object
        counts[self.worker] += 1
        return True

    def release(self, key: Hashable) -> None:
        """Give back one session counted by this worker under ``key``."""
        with self:
            self._release(key)

    def _release(self, key: Hashable) -> None:
        slot = self._slot(key, 0.0, False)
        if slot is None:
            return
        counts, worker = slot.counts, self.worker
        if counts[worker] > 0:
            counts[worker] -= 1
            slot.total -= 1

    def count(self, key: Hashable) -> int:
        """Sessions counted under ``key`` by every worker."""
        with self:
            return self._count(key)

    def _count(self, key: Hashable) -> int:
        slot = self._slot(key, 0.0, False)
        return 0 if slot is None else slot.total

    def admit(
        self, checks: Sequence[Check], acquires: Sequence[tuple[Hashable, int]], now: float,
        leased: list[tuple[Hashable, float]] | None = None,
    ) -> int:  # fmt: skip
        """A new session's admission in one critical section instead of one per limit.

        ``checks`` run in order, up to the first that fails: ``("take", key, rate, burst,
        extra)`` takes a token as :meth:`take`, and up to ``extra`` more while the bucket holds
        them, for the caller to spend later (each ``(key, tokens)`` granted goes to ``leased``);
        ``("within", key, limit)`` passes while ``key`` counts at most ``limit`` (a session counted
        already, checked against a further limit).  Then each ``(key, limit)`` of ``acquires`` is
        counted as :meth:`acquire`, all or none.  Returns -1 when everything passed, else the
        index of what refused: ``checks`` first, then ``acquires`` (``len(checks) + i``).  Tokens
        taken before a refusal stay taken.
        """
        with self:
            for index, check in enumerate(checks):
                if check[0] == "take":
                    granted = self._take(check[1], check[2], check[3], now, check[4])  # type: ignore[misc]
                    if granted > 0 and leased is not None:
                        leased.append((check[1], granted))
                    passed = granted >= 0
                else:
                    passed = self._count(check[1]) <= check[2]  # type: ignore[operator]
                if not passed:
                    return index
            for index, (key, limit) in enumerate(acquires):
                if not self._acquire(key, limit, now):
                    for earlier, _ in acquires[:index]:
                        self._release(earlier)
                    return len(checks) + index
            return -1

    def release_worker(self, worker: int) -> int:
        """Give back everything ``worker`` held (it died); the number of sessions released."""
        released = 0
        with self:
            for slot in self._slots:
                held = slot.counts[worker]
                if held:
                    slot.counts[worker] = 0
                    slot.total -= held
                    released += held
        return released

    # ------------------------------------------------------------------ token buckets

    def take(self, key: Hashable, rate: float, burst: float, now: float) -> bool:
        """Take one token from the bucket ``key`` (``rate``/s, at most ``burst``; starts full)."""
        with self:
            return self._take(key, rate, burst, now) >= 0

    def _take(self, key: Hashable, rate: float, burst: float, now: float, extra: float = 0) -> float:
        """:meth:`take`, and up to ``extra`` tokens more while there are: how many more, -1 if none was."""
        slot = self._bucket(key, rate, burst, now)
        if slot is None or slot.tokens < 1:
            return -1
        tokens = slot.tokens - 1
        granted = min(extra, float(int(tokens))) if extra and tokens >= 1 else 0
        slot.tokens = tokens - granted
        return granted

    def charge(self, key: Hashable, rate: float, burst: float, amount: float, now: float) -> float:
        """Take ``amount`` tokens, into debt if need be; the seconds until the debt is paid."""
        return self.lease(key, rate, burst, amount, 0.0, now)[1]

    def lease(
        self, key: Hashable, rate: float, burst: float, amount: float, extra: float, now: float
    ) -> tuple[float, float]:
        """As :meth:`charge`, also taking up to ``extra`` more tokens while the bucket holds them
        (never into debt): for a worker to spend on later chunks without the lock.  Returns the
        extra tokens granted and the seconds until the debt is paid."""
        with self:
            slot = self._bucket(key, rate, burst, now)
            if slot is None:
                return 0.0, 0.0
            tokens = slot.tokens - amount
            granted = min(extra, tokens) if tokens > 0 else 0.0
            tokens -= granted
            slot.tokens = tokens
            return granted, (-tokens / rate if tokens < 0 else 0.0)

    def _bucket(self, key: Hashable, rate: float, burst: float, now: float) -> ctypes.Structure | None:
        slot = self._slot(key, now, True)
        if slot is None:
            return None
        if slot.rate != rate or slot.burst != burst:  # new, or a reload changed the limit
            slot.rate, slot.burst, slot.tokens, slot.stamp = rate, burst, burst, now
        else:
            slot.tokens = min(burst, slot.tokens + (now - slot.stamp) * rate)
            slot.stamp = now
        return slot

    # ------------------------------------------------------------------ events and blocks

    def record(self, key: Hashable, within: float, now: float) -> float:
        """Count one event (a failed login) under ``key``; the events in the last ``within`` seconds.

        A sliding window estimated from two fixed ones: the previous window's count weighted
        by how much of it the sliding window still covers, plus the current window's.
        """
        with self:
            slot = self._slot(key, now, True)
            if slot is None:
                return float("inf")
            slot.span = within
            _roll(slot, within, now)
            slot.current += 1
            covered = 1.0 - (now - slot.window) / within
            return slot.previous * covered + slot.current

    def forget_events(self, key: Hashable) -> None:
        """Start counting ``key``'s events afresh (after a block)."""
        with self:
            slot = self._slot(key, 0.0, False)
            if slot is not None:
                slot.current = slot.previous = 0

    def block(self, key: Hashable, until: float, now: float) -> bool:
        """Block ``key`` until ``until``; True if it was not blocked already (log it once)."""
        with self:
            slot = self._slot(key, now, True)
            if slot is None:
                return False
            fresh = slot.until <= now
            slot.until = max(slot.until, until)
            return fresh

    def blocked_until(self, key: Hashable, now: float) -> float:
        """When ``key``'s block ends, or 0.0 if it is not blocked."""
        with self:
            slot = self._slot(key, now, False)
            return slot.until if slot is not None and slot.until > now else 0.0


def _mix(value: int) -> int:
    """Spread ``hash`` values (small ints hash to themselves) over a non-zero signed 64-bit key."""
    mixed = (value * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    mixed ^= mixed >> 32
    if mixed >= 1 << 63:
        mixed -= 1 << 64
    return mixed or 1


def _roll(slot: ctypes.Structure, within: float, now: float) -> None:
    elapsed = now - slot.window
    if elapsed >= 2 * within:
        slot.previous = slot.current = 0
        slot.window = now
    elif elapsed >= within:
        slot.previous, slot.current = slot.current, 0
        slot.window += within


def _forgettable(slot: ctypes.Structure, now: float) -> bool:
    if slot.total or slot.until > now:
        return False
    if (slot.current or slot.previous) and now - slot.window < 2 * slot.span:
        return False
    return slot.rate == 0 or slot.tokens + (now - slot.stamp) * slot.rate >= slot.burst
