"""The limit table shared by forked workers: real processes, real shared memory."""

from __future__ import annotations

import os
import signal
import time

import pytest
from socksflow_plugins.limits.state import LeasedBucket, State, rate_lease

from socksflow.sharedstate import PROBE_WINDOW, SharedTable

pytestmark = pytest.mark.smoke


def _in_child(table: SharedTable, worker: int, action) -> int:  # type: ignore[no-untyped-def]
    """Run ``action`` in a forked worker; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            table.worker = worker
            code = action()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_counts_made_in_one_worker_hold_in_the_other_and_are_given_back_when_it_dies() -> None:
    table = SharedTable(workers=2, slots=1024)
    now = time.monotonic()

    def hold_three() -> int:
        return 0 if all(table.acquire("alice", 5, now) for _ in range(3)) else 1

    assert _in_child(table, 1, hold_three) == 0
    assert table.count("alice") == 3
    assert [table.acquire("alice", 5, now) for _ in range(3)] == [True, True, False]
    assert table.count("alice") == 5
    assert table.release_worker(1) == 3  # the supervisor, after waitpid
    assert table.count("alice") == 2
    table.release("alice")
    table.release("alice")
    table.release("alice")  # more releases than acquisitions change nothing
    assert table.count("alice") == 0


def test_two_workers_racing_for_a_limit_get_exactly_the_limit_between_them() -> None:
    table = SharedTable(workers=2, slots=1024)
    now = time.monotonic()
    read_fd, write_fd = os.pipe()

    def grab() -> int:
        granted = sum(table.acquire("k", 700, now) for _ in range(1000))
        os.write(write_fd, str(granted).encode())
        return 0

    pid = os.fork()
    if pid == 0:
        try:
            table.worker = 1
            grab()
        finally:
            os._exit(0)
    mine = sum(table.acquire("k", 700, now) for _ in range(1000))
    os.waitpid(pid, 0)
    theirs = int(os.read(read_fd, 100))
    os.close(read_fd)
    os.close(write_fd)
    assert mine + theirs == 700
    assert table.count("k") == 700


def test_a_worker_killed_while_holding_the_lock_does_not_wedge_the_others() -> None:
    table = SharedTable(workers=2, slots=1024)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        with table:  # killed in here, holding the mutex
            os.write(write_fd, b"locked")
            time.sleep(60)
        os._exit(0)
    assert os.read(read_fd, 6) == b"locked"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_fd)
    os.close(write_fd)
    assert table.acquire("after", 1, time.monotonic())  # would hang forever on a plain mutex


def test_a_bucket_is_shared_and_refills_at_its_rate() -> None:
    table = SharedTable(workers=2, slots=1024)
    assert _in_child(table, 1, lambda: 0 if table.take("rate", 10.0, 3.0, 100.0) else 1) == 0
    assert [table.take("rate", 10.0, 3.0, 100.0) for _ in range(3)] == [True, True, False]
    assert table.take("rate", 10.0, 3.0, 100.15)  # a token and a half back after 0.15 s at 10/s
    assert not table.take("rate", 10.0, 3.0, 100.15)
    # Bandwidth: charges go into debt, and the debt says how long to pause.
    assert table.charge("bytes", 1000.0, 1000.0, 1500, 200.0) == pytest.approx(0.5)
    assert table.charge("bytes", 1000.0, 1000.0, 500, 200.5) == pytest.approx(0.5)
    # A reload that changes the rate starts the bucket afresh.
    assert table.charge("bytes", 2000.0, 2000.0, 1000, 200.5) == 0.0


def test_an_admission_takes_its_tokens_in_order_and_counts_all_or_nothing() -> None:
    table = SharedTable(workers=2, slots=1024)
    rate = ("take", "rate", 10.0, 2.0, 0.0)
    assert table.admit([rate], [("a", 2), ("b", 1)], 100.0) == -1
    assert (table.count("a"), table.count("b")) == (1, 1)
    assert table.admit([rate], [("a", 2), ("b", 1)], 100.0) == 2  # b is full: a is given back
    assert (table.count("a"), table.count("b")) == (1, 1)
    assert table.admit([rate], [], 100.0) == 0  # the refused admission's token stayed taken
    assert table.admit([("within", "b", 1), rate], [], 100.25) == -1  # b counts 1, at most 1: passes
    assert table.admit([("within", "b", 0), rate], [], 100.5) == 0  # refused before the rate is asked
    assert table.take("rate", 10.0, 2.0, 100.5)
    # A take may lease whole tokens beyond its own, while the bucket holds them, for later.
    leased: list = []
    assert table.admit([("take", "big", 1000.0, 10.0, 4.0)], [], 200.0, leased) == -1
    assert leased == [("big", 4.0)]
    assert table.admit([("take", "big", 1000.0, 10.0, 9.0)], [], 200.0, leased) == -1
    assert leased[1] == ("big", 4.0)  # 5 left: one taken, 4 leased, never into debt
    assert table.admit([("take", "big", 1000.0, 10.0, 9.0)], [], 200.0, leased) == 0


def test_leased_tokens_never_add_to_what_the_shared_bucket_gives() -> None:
    table = SharedTable(workers=2, slots=1024)
    # Two workers' buckets over one shared bucket of 100 tokens, leasing 10 at a time.
    one, two = (LeasedBucket(table, "bw", 1000.0, 100.0) for _ in range(2))
    assert one.lease == 10.0
    passed = 0
    for bucket in [one, two] * 100:
        if bucket.charge(1, 50.0) > 0:
            break
        passed += 1
    assert 100 - 2 * one.lease <= passed <= 100  # unspent leases, at most one per worker, held back
    assert table.lease("bw", 1000.0, 100.0, 0, 10.0, 50.0)[0] == 0.0  # nothing left to lease
    assert one.charge(500, 50.0) > 0.4  # beyond its lease: the shared bucket goes into debt
    assert one.charge(0, 50.0) == pytest.approx(table.charge("bw", 1000.0, 100.0, 0, 50.0))  # and it waits
    spent = 0
    while two.charge(1, 50.0) == 0.0:
        spent += 1
    assert spent <= two.lease  # the other worker spends what it leased, then waits as well


def test_leased_session_rate_tokens_never_admit_more_than_the_shared_bucket_holds() -> None:
    table = SharedTable(workers=2, slots=1024)
    one, two = State(table), State(table)  # two workers' views of one table
    check = ("take", "rate", 1000.0, 40.0, rate_lease(1000.0, 40.0))
    assert check[4] == 9.0  # 10 ms of the rate, less the token taken
    admitted = [state.admit([check], [], 50.0) == -1 for _ in range(60) for state in (one, two)]
    assert 40 - 2 * 9 <= sum(admitted) <= 40  # what the leases hold unspent is held back, never added
    assert rate_lease(100.0, 100.0) == 0.0  # below 200/s every session asks the shared bucket


def test_events_within_a_window_and_blocks_logged_once() -> None:
    table = SharedTable(workers=2, slots=1024)
    assert _in_child(table, 1, lambda: 0 if table.record("ip", 60.0, 1000.0) == 1 else 1) == 0
    assert table.record("ip", 60.0, 1001.0) == 2
    # Half of the previous window is still covered: 2 * 0.5 + 1.
    assert table.record("ip", 60.0, 1090.0) == pytest.approx(2.0)
    assert table.record("ip", 60.0, 1300.0) == 1  # long after: starts over
    assert table.block("ip", 1400.0, 1300.0) is True
    assert table.block("ip", 1450.0, 1310.0) is False  # already blocked: no second log line
    assert table.blocked_until("ip", 1320.0) == 1450.0
    assert table.blocked_until("ip", 1450.0) == 0.0
    table.forget_events("ip")
    assert table.record("ip", 60.0, 1301.0) == 1


def test_slots_without_information_are_reused_and_a_full_window_refuses_admission() -> None:
    table = SharedTable(workers=1, slots=PROBE_WINDOW)
    for key in range(PROBE_WINDOW):
        assert table.acquire(key, 1, 0.0)
    assert not table.acquire("one too many", 1, 0.0)  # refused, not unlimited
    assert table.charge("unpaced", 1.0, 1.0, 10, 0.0) == 0.0
    table.release(0)
    assert table.acquire("one too many", 1, 0.0)  # key 0's slot held nothing any more
