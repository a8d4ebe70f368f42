"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The tool's path, or a visible skip (in CI, where every tool is installed, a failure)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, and CI must install it (.ci/run)")
        pytest.skip(f"{name} is not installed")
    return path
