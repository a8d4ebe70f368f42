"""A short soak in CI: ``bench/soak.py`` for 30 s (the documented long run: ``--minutes 10``).

Mixed CONNECT downloads and uploads of random sizes, UDP echoes, BIND and abandoned downloads
through ``socksflow run``: every completed transfer verified by SHA-256, and afterwards the
server's open descriptors, asyncio tasks and sessions back to their baseline, its memory
within a few MiB of it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hardening import report

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_soak_verifies_every_transfer_and_leaks_nothing(loop):
    soak = load_soak()
    result = soak.soak(seconds=15, concurrency=12, server_args=("--loop", loop))
    report(
        f"soak-{loop}", seconds=result["seconds"], sessions=result["sessions"], mib_verified=result["mib_verified"],
        datagrams=result["datagrams_verified"], errors=result["error_count"], before=result["before"],
        after=result["after"],
    )  # fmt: skip
    assert result["errors"] == []
    assert result["leaks"] == []
    assert result["exit_code"] == 0
    assert all(result["sessions"].get(kind, 0) > 0 for kind in soak.OPERATIONS), result["sessions"]
    assert result["after"]["fds"] == result["before"]["fds"]
    assert result["after"]["tasks"] == result["before"]["tasks"]
