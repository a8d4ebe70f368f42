"""tox's inline plugin (tox 4 loads ``toxfile.py``): find the interpreters pyenv installed.

pyenv's shims answer only for the selected version, so a plain ``pip install tox && tox`` on a
machine with pyenv skipped py312 and py313 and still ended in "congratulations".  Before tox
looks for interpreters, this puts each installed pyenv CPython on ``PATH`` (after the Python
running tox), as CI does, and says at once which environments will be skipped because their
interpreter is still missing (``TOX_SKIP_MISSING_INTERPRETERS=false`` makes that a failure).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

WANTED = ("3.11", "3.12", "3.13")  # the versions tox.ini's environments name


def pyenv_bins(root: Path) -> list[str]:
    """The ``bin`` folder of each CPython 3.x pyenv installed, newest patch level first."""
    versions = []
    for entry in (root / "versions").glob("3.*"):
        match = re.fullmatch(r"3\.(\d+)\.(\d+)", entry.name)
        if match and (entry / "bin").is_dir():
            versions.append((int(match[1]), int(match[2]), str(entry / "bin")))
    return [path for *_, path in sorted(versions, reverse=True)]


def search_path(path: str, root: Path, running: str = os.path.dirname(sys.executable)) -> str:
    """``path`` with pyenv's interpreters after the running Python's folder and before the rest."""
    extra = [bin_dir for bin_dir in pyenv_bins(root) if bin_dir not in path.split(os.pathsep)]
    return os.pathsep.join([running, *extra, path]) if extra else path


def missing(path: str) -> list[str]:
    """The wanted versions with no ``pythonX.Y`` on ``path``."""
    return [version for version in WANTED if shutil.which(f"python{version}", path=path) is None]


try:
    from tox.plugin import impl
except ImportError:  # imported by the tests, or by a tox 3
    impl = None

if impl is not None:

    @impl
    def tox_add_core_config(core_conf, state) -> None:
        root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
        os.environ["PATH"] = search_path(os.environ.get("PATH", ""), root)
        for version in missing(os.environ["PATH"]):
            print(
                f"toxfile: no python{version} on PATH or in {root}/versions: the py{version.replace('.', '')}"
                " environments will be SKIPPED (install it, e.g. pyenv install " + version + ")",
                file=sys.stderr,
            )
