"""toxfile.py: the README's ``pip install tox && tox`` finds pyenv's interpreters, as CI does."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("toxfile", ROOT / "toxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_pyenv(root: Path, *versions: str) -> None:
    for version in versions:
        bin_dir = root / "versions" / version / "bin"
        bin_dir.mkdir(parents=True)
        minor = version.rsplit(".", 1)[0]
        python = bin_dir / f"python{minor}"
        python.write_text("#!/bin/sh\n")
        python.chmod(0o755)


def test_pyenv_interpreters_go_after_the_running_python_and_before_the_shims(tmp_path):
    toxfile = load()
    fake_pyenv(tmp_path, "3.12.1", "3.13.0", "3.12.3", "3.10.13", "pypy3.10-7.3.12", "3.13-dev")
    path = os.pathsep.join(["/root/.pyenv/shims", "/usr/bin"])
    found = toxfile.search_path(path, tmp_path, running="/opt/py311/bin").split(os.pathsep)
    versions = tmp_path / "versions"
    assert found == [
        "/opt/py311/bin",
        str(versions / "3.13.0/bin"), str(versions / "3.12.3/bin"), str(versions / "3.12.1/bin"),
        str(versions / "3.10.13/bin"),
        "/root/.pyenv/shims", "/usr/bin",
    ]  # fmt: skip
    assert toxfile.missing(os.pathsep.join(found[1:5])) == ["3.11"]
    assert toxfile.search_path("", tmp_path / "nowhere") == ""  # no pyenv: PATH unchanged
