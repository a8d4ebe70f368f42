"""Fill in the generated parts of the reference pages from the code itself.

A page marks each generated region with ``<!-- generated: NAME -->`` … ``<!-- end generated -->``;
this script replaces the region's content with what ``GENERATORS[NAME]`` makes from the code:
the hook reference from ``socksflow/hookspecs.py`` (signatures and docstrings) and the
command-line reference from the argparse parser.  The prose around the regions is written
by hand.

    python docs/gen_reference.py           # rewrite the regions
    python docs/gen_reference.py --check   # exit 1 if a page is out of date (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from socksflow import cli, hookspecs

DOCS = Path(__file__).resolve().parent
PAGES = ("reference/hooks.md", "reference/cli.md")
REGION = re.compile(r"(<!-- generated: (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)

# Where each name in a hook signature comes from, for the table under the hooks.
TYPES = {
    "Config": ("socksflow.Config", "the loaded configuration: `section(name)`, `stash`, `errors`, `file`"),
    "ConfigError": (
        "socksflow.ConfigError",
        "a located configuration error (`node.error(message)` makes one)",
    ),
    "Server": (
        "socksflow.server.Server",
        "the running server: `config`, `stash`, `addresses`, `sessions`, `resolver(config=None)`, "
        "`end_session(session, reason)`",
    ),
    "Session": ("socksflow.session.Session", "one client connection (see [Sessions](#sessions))"),
    "AuthChannel": (
        "socksflow.session.AuthChannel",
        "`await read(n)`, `await readexactly(n)`, `write(data)`",
    ),
    "Request": ("socksflow.Request", "`command` (a `socksflow.Command`) and `destination` (an `Address`)"),
    "Address": ("socksflow.Address", "`host` (an `ipaddress` object or a domain name) and `port`"),
    "IPAddress": ("ipaddress.IPv4Address | ipaddress.IPv6Address", "a resolved address"),
    "Verdict": (
        "socksflow.Verdict",
        "`Verdict.allow()`, `Verdict.deny(reason, reply=…)`, `Verdict.rewrite(address)`",
    ),
    "Identity": ("socksflow.Identity", "who authenticated: `user`, `groups`"),
    "Protected": (
        "socksflow.Protected",
        "`Protected(identity, protection)`: authenticated, and the rest of the session goes through"
        " `protection.wrap(data)` / `protection.unwrap(data)` (see `socksflow.protection`)",
    ),
    "Limiter": (
        "socksflow.Limiter",
        "any object with `delay(direction, nbytes) -> float` (seconds to pause)",
    ),
    "Direction": ("socksflow.Direction", "`Direction.UP` (client to destination) or `Direction.DOWN`"),
    "ExplainQuery": ("socksflow.explain.ExplainQuery", "`client`, `user`, `command`, `destination`"),
    "Resolver": ("socksflow.explain.Resolver", "`await resolve(host, port)` → addresses, through the hooks"),
    "socket.socket": ("socket.socket", "a connected, non-blocking socket"),
}
BUILTINS = {"None", "bool", "bytes", "int", "str", "list", "tuple", "frozenset", "Exception"}


# ---------------------------------------------------------------------------- hooks


def hook_functions() -> dict[str, Callable[..., object]]:
    """Every hook spec, by name, in the order of ``hookspecs.py``."""
    return {name: getattr(hookspecs, name) for name in hookspecs.ALL_HOOKS}


def signature(function: Callable[..., object]) -> str:
    """``name(param: Type, ...) -> Return``, as the spec declares it (annotations as written)."""
    sig = inspect.signature(function)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{function.__name__}({params}) -> {sig.return_annotation}"


def _sections() -> list[tuple[int, str]]:
    """The banners of ``hookspecs.py`` (``# ==== title``) with their line numbers."""
    lines = Path(inspect.getsourcefile(hookspecs) or "").read_text(encoding="utf-8").splitlines()
    return [
        (number, line.lstrip("# =").strip())
        for number, line in enumerate(lines, 1)
        if line.startswith("# ====")
    ]


def rst_to_markdown(text: str) -> str:
    """The docstrings' reST roles and field lists, as Markdown."""
    text = re.sub(r":func:`(socksflow_\w+)`", r"[`\1`](#\1)", text)
    text = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"`\1`", text)
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    out: list[str] = []
    for line in text.splitlines():
        param = re.match(r":param (\w+): (.*)", line)
        if param:
            if out and out[-1] and not out[-1].startswith("- "):
                out.append("")
            out.append(f"- `{param[1]}`: {param[2]}")
        elif line.startswith("    ") and out and out[-1].startswith("- "):
            out[-1] += " " + line.strip()  # a parameter's continuation line
        else:
            if line and out and out[-1].startswith("- ") and not line.startswith("* "):
                out.append("")  # a paragraph after the parameter list
            out.append(line)
    return "\n".join(out)


def _traits(name: str) -> str:
    spec = getattr(getattr(hookspecs, name), "socksflow_spec", {}) or {}
    calls = "first result" if spec.get("firstresult") else "every implementation is called"
    mode = "must be sync" if name in hookspecs.SYNC_ONLY_HOOKS else "may be async"
    return f"*{calls} · {mode}*"


def hooks_region() -> str:
    functions = hook_functions()
    sections = _sections()
    out = []
    current = ""
    for name, function in functions.items():
        line = function.__code__.co_firstlineno
        title = next(title for number, title in reversed(sections) if number < line)
        if title != current:
            current = title
            out += [f"## {title[0].upper()}{title[1:]}", ""]
        doc = rst_to_markdown(inspect.getdoc(function) or "")
        out += [f"### {name}", "", "```python", signature(function), "```", "", _traits(name), "", doc, ""]
    out += ["## Types in the signatures", "", "| name | import | what |", "|---|---|---|"]
    for type_name, (where, what) in TYPES.items():
        out.append(f"| `{type_name}` | `{where}` | {what} |")
    missing = {t for f in functions.values() for t in type_names(signature(f))} - set(TYPES)
    if missing:
        raise SystemExit(f"gen_reference.py: add {sorted(missing)} to TYPES")
    return "\n".join(out) + "\n"


def type_names(sig: str) -> set[str]:
    """The type names a signature's annotations mention."""
    annotations = re.findall(r": ([^,()]+)|-> (.+)$", sig)
    words = {word for pair in annotations for part in pair for word in re.findall(r"[A-Za-z_][\w.]*", part)}
    return words - BUILTINS


# ---------------------------------------------------------------------------- the command line


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """``socksflow`` itself (as ``""``) and each of its commands."""
    parser = cli._parser()
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            yield action


def _option_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    value = ""
    if action.nargs != 0:
        value = " " + (
            action.metavar
            or ("{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper())
        )
    return ", ".join(f"`{name}{value}`" for name in action.option_strings)


def _option_help(action: argparse.Action) -> str:
    parts = [(action.help or "").replace("|", "\\|")]
    if action.choices and action.metavar:
        parts.append(f"one of {', '.join(action.choices)}")
    shown = action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in parts[0]
    if shown and action.option_strings:
        parts.append(f"default `{action.default}`")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in parts[0]:
        parts.append("repeatable")
    return "; ".join(part for part in parts if part)


def cli_region(command: str) -> str:
    parser = subcommands()[command]
    out = ["| option | meaning |", "|---|---|"]
    out += [f"| {_option_name(action)} | {_option_help(action)} |" for action in options(parser)]
    return "\n".join(out) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "hooks": hooks_region,
    **{f"cli:{name or 'socksflow'}": (lambda name=name: cli_region(name)) for name in subcommands()},
}


# ---------------------------------------------------------------------------- pages


def render(text: str) -> str:
    """``text`` with every generated region made anew."""

    def fill(match: re.Match[str]) -> str:
        name = match[2]
        if name not in GENERATORS:
            raise SystemExit(f"gen_reference.py: no generator named {name!r}")
        return f"{match[1]}\n{GENERATORS[name]()}\n{match[4]}"

    return REGION.sub(fill, text)


def main(argv: list[str]) -> int:
    stale = []
    for page in PAGES:
        path = DOCS / page
        text = path.read_text(encoding="utf-8")
        fresh = render(text)
        if fresh != text:
            stale.append(page)
            if "--check" not in argv:
                path.write_text(fresh, encoding="utf-8")
    if stale and "--check" in argv:
        print(f"out of date (run python docs/gen_reference.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
