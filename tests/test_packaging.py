"""The packages' metadata: what setuptools and a newcomer reading pyproject.toml see."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "project", [ROOT, ROOT / "examples/socksflow-timewindow"], ids=["socksflow", "example"]
)
def test_license_is_an_spdx_expression(project):
    """The ``license = {text = ...}`` table is deprecated in setuptools, with a hard date (2027-02-18)."""
    data = tomllib.loads((project / "pyproject.toml").read_text())
    assert data["project"]["license"] == "MIT"
    setuptools = next(r for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    assert setuptools == "setuptools>=77"  # the first to take an SPDX expression


def test_each_test_dependency_carries_its_own_comment():
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    (atheris,) = [line for line in lines if line.strip().startswith('"atheris')]
    (uvloop,) = [line for line in lines if line.strip().startswith('"uvloop') and "compare" in line]
    assert "fuzzing" in atheris and "fuzzing" not in uvloop
