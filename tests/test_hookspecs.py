"""Every hook spec is documented the same way: plugin authors read these docstrings as the API."""

from __future__ import annotations

import inspect
import re

import pytest

from socksflow import hookspecs
from socksflow.plugins import PluginManager

pytestmark = pytest.mark.smoke


def doc_of(name: str) -> str:
    """The docstring with its line breaks folded, so phrases wrapped across lines still match."""
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc, f"{name} has no docstring"
    return " ".join(doc.split())


def test_all_hooks_lists_every_spec() -> None:
    pm = PluginManager()
    specified = {name for name, caller in vars(pm.hook).items() if caller.has_spec()}
    assert set(hookspecs.ALL_HOOKS) == specified
    assert hookspecs.SYNC_ONLY_HOOKS.issubset(specified)


@pytest.mark.parametrize("name", hookspecs.ALL_HOOKS)
def test_docstring_names_every_parameter(name: str) -> None:
    parameters = set(inspect.signature(getattr(hookspecs, name)).parameters)
    documented = re.findall(r":param (\w+):", doc_of(name))
    assert sorted(documented) == sorted(parameters)  # each once, and none that no longer exists


@pytest.mark.parametrize("name", hookspecs.ALL_HOOKS)
def test_docstring_says_whether_it_may_be_async(name: str) -> None:
    doc = doc_of(name).lower()
    may_be_async = "may be async" in doc
    must_be_sync = "must be sync" in doc
    assert may_be_async != must_be_sync, "say exactly one of 'may be async' / 'must be sync'"
    assert must_be_sync == (name in hookspecs.SYNC_ONLY_HOOKS)  # what the plugin manager enforces


@pytest.mark.parametrize("name", hookspecs.ALL_HOOKS)
def test_docstring_says_what_raising_does(name: str) -> None:
    assert re.search(r"\brais(e|es|ing)\b", doc_of(name), re.IGNORECASE)


@pytest.mark.parametrize("name", hookspecs.ALL_HOOKS)
def test_docstring_shape(name: str) -> None:
    """One-line summary, when it is called, the return contract; first-result hooks say so."""
    raw = inspect.getdoc(getattr(hookspecs, name)) or ""
    summary, _, rest = raw.partition("\n\n")
    assert "\n" not in summary and summary.endswith("."), f"{name}: the summary is one sentence on one line"
    assert "When:" in rest
    assert "Returns" in rest
    first_result = getattr(hookspecs, name).socksflow_spec["firstresult"]
    assert ("*First result*" in doc_of(name)) == first_result
