"""The standard plugins use the public API only: what ``socksflow`` itself exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import socksflow

pytestmark = pytest.mark.smoke

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def imports_of_socksflow(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a socksflow module other than ``socksflow`` itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.startswith("socksflow.")]
    return found


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_standard_plugins_import_only_from_socksflow(path: Path) -> None:
    assert imports_of_socksflow(path) == []


def test_the_checker_sees_an_internal_import(tmp_path: Path) -> None:
    plugin = tmp_path / "p.py"
    plugin.write_text("import socksflow\nfrom socksflow.protocol import parse_host\nimport socksflow.udp\n")
    assert imports_of_socksflow(plugin) == [(2, "socksflow.protocol"), (3, "socksflow.udp")]


def test_what_plugins_need_is_exported() -> None:
    for name in (
        "IPAddress",
        "parse_host",
        "InvalidAddress",
        "ExplainQuery",
        "Resolver",
        "Session",
        "Server",
    ):
        assert name in socksflow.__all__
        assert getattr(socksflow, name) is not None
