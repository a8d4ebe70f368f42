"""The fuzz targets (``fuzz/``): a short coverage-guided run, the seeds, and every crash ever found.

A longer run is a documented command: ``python fuzz/run.py --seconds 3600 --corpus DIR``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import traceback
from pathlib import Path
from types import ModuleType

import pytest

from socksflow.config import Config
from socksflow.errors import ConfigErrors

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look the module up
    spec.loader.exec_module(module)
    return module


targets = load("targets")
runner = load("run")


def inputs() -> list[tuple[str, bytes, str]]:
    """(target, input, label): the seeds, then every saved crash (``fuzz/regressions/<target>/``)."""
    found = [
        (name, seed, f"seed-{i}") for name, seeds in runner.SEEDS.items() for i, seed in enumerate(seeds)
    ]
    for path in sorted((FUZZ / "regressions").glob("*/*")):
        found.append((path.parent.name, path.read_bytes(), path.name))
    return found


@pytest.mark.smoke
@pytest.mark.parametrize(("target", "data", "label"), inputs(), ids=[label for _, _, label in inputs()])
def test_saved_inputs_pass_their_target(target, data, label):
    targets.TARGETS[target](data)


@pytest.mark.smoke
def test_every_target_has_seeds():
    assert set(runner.SEEDS) == set(targets.TARGETS) == set(runner.TARGET_NAMES)


def test_short_fuzz_run_finds_no_crash(tmp_path):
    pytest.importorskip("atheris", reason="fuzzing needs atheris (pip install atheris)")
    result = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--seconds", "20", "--corpus", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + replay_crashes(result.stdout) + result.stderr[-3000:]
    rows = dict(re.findall(r"^(\w+)\s+(\d+)\s+\d+\s+\d+\s+none$", result.stdout, re.M))
    assert set(rows) == set(runner.TARGET_NAMES), result.stdout
    assert all(int(runs) > 1000 for runs in rows.values()), result.stdout
    print(result.stdout)


def replay_crashes(report: str, root: Path = FUZZ.parent) -> str:
    """Each crash ``fuzz/run.py`` reported, replayed here: the assertion or exception it ends in."""
    found = []
    for path, target in re.findall(r"(fuzz/crashes/(\w+?)-crash-[0-9a-f]+)", report):
        try:
            targets.TARGETS[target]((root / path).read_bytes())
        except Exception:
            found.append(f"\n--- {path} replayed ---\n{traceback.format_exc()}")
        else:
            found.append(f"\n--- {path} replayed: no crash in this process ---\n")
    return "".join(found)


def test_a_crash_report_shows_the_replayed_assertion(tmp_path, monkeypatch):
    crash = tmp_path / "fuzz/crashes/address-crash-0123abcd"
    crash.parent.mkdir(parents=True)
    crash.write_bytes(b"\x00boom")

    def address(data: bytes) -> None:
        assert data != b"\x00boom", "an address does not survive encode → decode"

    monkeypatch.setitem(targets.TARGETS, "address", address)
    report = "address        1000    500   12  fuzz/crashes/address-crash-0123abcd\n"
    shown = replay_crashes(report, tmp_path)
    assert "--- fuzz/crashes/address-crash-0123abcd replayed ---" in shown
    assert "AssertionError: an address does not survive encode → decode" in shown


# ---------------------------------------------------------------------------- crashes the fuzzer found


@pytest.mark.smoke
def test_ipv6_zone_ids_are_refused_wherever_an_address_is_given():
    """fuzz/regressions/address/ipv6-zone-id-in-a-domain: ``::%e`` as a domain decoded to an
    ``IPv6Address('::%e')`` that re-encoded as ``::``; ``Address.parse`` took ``[::1%lo]:8000``."""
    from socksflow import app
    from socksflow.protocol import Address, InvalidAddress, decode_address

    with pytest.raises(InvalidAddress, match="zone ids"):
        decode_address(b"\x03\x04::%e\x00\x50", 0)
    with pytest.raises(ValueError, match="zone ids"):
        Address.parse("[::1%lo]:8000")
    for text, where, why in [
        ("listen: ['[::1%lo]:1080']\n", "listen[0]", "zone id"),
        ("rules: [{deny: {to: 'fe80::1%eth0'}}]\n", "rules[0].deny.to", "zone id"),
        ("rules: [{deny: {to: 'fe80::%eth0/64'}}]\n", "rules[0].deny.to", "zone id"),
        ("limits: [{match: {from: 'fe80::%eth0/64'}, max_sessions: 1}]\n", "limits[0].match.from", "zone id"),
        ("dns: {servers: ['::1%lo']}\n", "dns.servers[0]", "is not an IP address"),
    ]:
        config = Config.from_text(text, "rules.yaml")
        with pytest.raises(ConfigErrors) as caught:
            app.configure(app.build_plugin_manager(config), config)
        assert len(caught.value.errors) == 1, text
        message = str(caught.value.errors[0])
        assert message.startswith(f"rules.yaml:1: {where}") and why in message, message


@pytest.mark.smoke
def test_a_rule_test_answer_that_is_no_address_is_a_located_error():
    """fuzz/regressions/config/test-answer-not-a-host-name: the ACL raised InvalidAddress, not a ConfigError."""
    from socksflow import app

    config = Config.from_text(
        "rules: [{allow: all}]\ntests:\n  - {to: 'example.com:443', answers: [192.0\ufffd.2.1], expect: allow}\n",
        "rules.yaml",
    )
    pm = app.build_plugin_manager(config)
    with pytest.raises(ConfigErrors) as caught:
        app.configure(pm, config)
    assert [str(e) for e in caught.value.errors] == [
        "rules.yaml:3: tests[0].answers[0]: '192.0\ufffd.2.1' is not a valid host name"
    ]


@pytest.mark.smoke
def test_explain_from_an_impossible_host_is_one_line(tmp_path):
    """Same defect, on the command line: ``explain --from 'a b'`` ended in a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "explain", "--from", "a b", "192.0.2.1:80"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == "socksflow: --from: 'a b' has characters not allowed in a host name\n"


@pytest.mark.smoke
def test_a_path_in_an_unknown_users_home_is_a_located_error():
    """fuzz/regressions/config/path-of-unknown-user: ``~name`` made Path.expanduser raise RuntimeError."""
    from socksflow import app

    config = Config.from_text("log: {access: {file: ~nosuchuser/access.log}}\n", "rules.yaml")
    with pytest.raises(ConfigErrors) as caught:
        app.configure(app.build_plugin_manager(config), config)
    assert [str(e) for e in caught.value.errors] == [
        "rules.yaml:1: log.access.file: '~nosuchuser/access.log': no such user's home folder"
    ]
