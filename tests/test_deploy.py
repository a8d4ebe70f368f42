"""The deployment files in deploy/ are valid for the tools that read them (issue #16).

HAProxy checks its configuration (``haproxy -c``), systemd verifies the unit, the Kubernetes
objects fit together, the Dockerfile's instructions are well formed and what it copies builds
socksflow, every socksflow command line in them parses, every rules file passes
``socksflow check``, and docs/howto/deploy.md shows each file as it is.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import require_tool

from socksflow.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SOCKSFLOW = Path(sys.executable).parent / "socksflow"


def socksflow_check(path: Path) -> None:
    result = subprocess.run([str(SOCKSFLOW), "check", str(path)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{path}: OK (it has no tests)\n"), result.stderr


def parses_as_run(args: list[str]) -> None:
    """``socksflow ARGS`` is a valid ``run`` command line."""
    namespace = _parser().parse_args(args)
    assert namespace.command == "run"


# ---------------------------------------------------------------------------- HAProxy


def test_haproxy_cfg_is_valid_and_balances_as_documented():
    haproxy = require_tool("haproxy")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout
    words = (DEPLOY / "haproxy.cfg").read_text().split()
    for needed in ("tcp", "leastconn", "send-proxy-v2", "check", "check-send-proxy"):
        assert needed in words


def test_the_instances_rules_trust_the_balancer_and_share_redis(tmp_path):
    rules = yaml.safe_load((DEPLOY / "rules.yaml").read_text())
    (listener,) = rules["listen"]
    assert listener["proxy_protocol"] == "v2"  # what send-proxy-v2 sends
    assert rules["state"]["redis"].startswith("redis://")
    servers = re.findall(r"^\s*server \S+ ([\d.]+):(\d+)", (DEPLOY / "haproxy.cfg").read_text(), re.M)
    assert servers and all(port == listener["address"].rsplit(":", 1)[1] for _, port in servers)
    assert rules["udp"]["advertise"] == servers[0][0]  # the first instance's own file
    socksflow_check(DEPLOY / "rules.yaml")


# ---------------------------------------------------------------------------- systemd


def test_the_systemd_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze")
    text = (DEPLOY / "socksflow.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    program, *args = shlex.split(exec_start)
    parses_as_run(args)
    # systemd verifies that the program exists: point at this environment's socksflow.
    unit = tmp_path / "socksflow.service"
    unit.write_text(text.replace(f"ExecStart={program}", f"ExecStart={SOCKSFLOW}"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "socksflow.service" not in result.stderr, result.stderr  # no warning about the unit


# ---------------------------------------------------------------------------- the image


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, as (INSTRUCTION, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            found.append((instruction, arguments.strip()))
    return found


KNOWN = {"FROM", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL"}


def test_the_dockerfile_is_well_formed_and_its_command_parses():
    instructions = dockerfile()
    assert instructions[0][0] == "FROM"
    assert {name for name, _ in instructions} <= KNOWN
    exec_form = {name: json.loads(args) for name, args in instructions if name in {"ENTRYPOINT", "CMD"}}
    command = exec_form["ENTRYPOINT"] + exec_form["CMD"]
    assert command[0] == "socksflow"
    parses_as_run(command[1:])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, args in instructions:
        if name == "RUN" and "pip install" in args:
            (wanted,) = re.findall(r"'\.\[([\w,]+)\]'", args)
            assert set(wanted.split(",")) <= set(extras)
    exposed = {int(port) for name, args in instructions if name == "EXPOSE" for port in args.split()}
    assert exposed == {1080, 9150}


def test_what_the_dockerfile_copies_builds_socksflow(tmp_path):
    """The COPY lines bring everything the package build needs (a wheel built as pip in the image builds it)."""
    context = tmp_path / "src"
    context.mkdir()
    for name, args in dockerfile():
        if name == "COPY":
            *sources, destination = args.split()
            for source in sources:
                target = context / destination if destination != "./" else context
                if (ROOT / source).is_dir():
                    subprocess.run(["cp", "-r", str(ROOT / source), str(target)], check=True)
                else:
                    subprocess.run(["cp", str(ROOT / source), str(context)], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("socksflow-*.whl")
    listing = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True, check=True
    ).stdout
    assert "socksflow/proxied.py" in listing and "socksflow_plugins/metrics.py" in listing


# ---------------------------------------------------------------------------- Kubernetes


def test_the_kubernetes_objects_fit_together(tmp_path):
    objects = {item["kind"]: item for item in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}
    config_map, deployment, service = objects["ConfigMap"], objects["Deployment"], objects["Service"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics"
    rules_text = config_map["data"]["rules.yaml"]
    rules = yaml.safe_load(rules_text)
    assert ports[probe["port"]] == int(rules["metrics"]["listen"].rsplit(":", 1)[1])
    assert ports["socks"] == int(rules["listen"]["addresses"][0].rsplit(":", 1)[1])
    (volume,) = spec["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    image_command = dict(
        (name, json.loads(args)) for name, args in dockerfile() if name in {"ENTRYPOINT", "CMD"}
    )
    assert f"{mount['mountPath']}/rules.yaml" in image_command["ENTRYPOINT"]
    parses_as_run(image_command["ENTRYPOINT"][1:] + container["args"])
    (tmp_path / "rules.yaml").write_text(rules_text)
    socksflow_check(tmp_path / "rules.yaml")


def test_the_kubernetes_pods_run_as_many_workers_as_their_cpu_limit():
    """A CPU limit is a CFS quota, which ``--workers auto`` does not see (it counts the node's
    CPUs): the example pins the count to the limit."""
    objects = {item["kind"]: item for item in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    entrypoint = dict((name, json.loads(args)) for name, args in dockerfile() if name == "ENTRYPOINT")
    run = _parser().parse_args(entrypoint["ENTRYPOINT"][1:] + container["args"])
    assert run.workers == int(container["resources"]["limits"]["cpu"])


# ---------------------------------------------------------------------------- the guide


@pytest.mark.parametrize(
    "name", ["haproxy.cfg", "rules.yaml", "socksflow.service", "Dockerfile", "kubernetes.yaml"]
)
def test_the_deployment_guide_shows_each_file_as_it_is(name):
    guide = (ROOT / "docs/howto/deploy.md").read_text()
    blocks = re.findall(r"^```\w*\n(.*?)^```", guide, re.S | re.M)
    assert (DEPLOY / name).read_text() in blocks, f"deploy/{name} differs from its copy in the guide"
