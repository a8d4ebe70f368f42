"""A real MIT Kerberos KDC on loopback, in a temporary directory, for the GSSAPI tests.

:func:`start_kdc` builds a realm (``kdb5_util create -s``), adds principals and a service
keytab (``kadmin.local``), runs ``krb5kdc -n`` on a loopback port the kernel picks, and
``kinit``\\ s each user into a credential cache of its own.  Nothing reaches the machine's
resolver: the configuration names the KDC by IP literal and turns off every DNS look-up
(``dns_lookup_*``, ``rdns``, ``dns_canonicalize_hostname``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REALM = "EXAMPLE.TEST"
SERVICE = "rcmd/localhost"  # in the proxy's keytab (rcmd: the service curl and Dante ask for)
OTHER_SERVICE = "HTTP/localhost"  # a real principal of the realm, not in the proxy's keytab
USERS = {"alice": "alice-secret", "bob": "bob-secret"}
TOOLS = ("krb5kdc", "kdb5_util", "kadmin.local", "kinit")
START_SECONDS = 20.0


@dataclass
class Kdc:
    """A running KDC: where its files are and how a process talks to it."""

    directory: Path
    port: int
    pid: int
    keytab: Path
    env: dict[str, str] = field(default_factory=dict)  # KRB5_CONFIG, KRB5CCNAME… for this realm

    def ccache(self, user: str) -> Path:
        """The credential cache ``kinit`` filled for ``user``."""
        return self.directory / f"{user}.ccache"

    @property
    def log(self) -> str:
        return (self.directory / "kdc.log").read_text(errors="replace")


def _run(*args: str, env: dict[str, str], stdin: str | None = None) -> None:
    result = subprocess.run(
        args, env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")


def _listening_port(pid: int) -> int | None:
    """The TCP port ``pid`` listens on (the KDC was told port 0, and does not log the one it got)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return None
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def _write_krb5_conf(directory: Path, port: int | None) -> None:
    kdc = f"  kdc = 127.0.0.1:{port}\n" if port else ""
    (directory / "krb5.conf").write_text(
        "[libdefaults]\n"
        f" default_realm = {REALM}\n"
        " dns_lookup_kdc = false\n dns_lookup_realm = false\n"
        " rdns = false\n dns_canonicalize_hostname = false\n"
        " udp_preference_limit = 1\n"  # TCP only: the KDC's UDP port is not looked up
        "[realms]\n"
        f" {REALM} = {{\n{kdc} }}\n"
        "[domain_realm]\n"
        f" localhost = {REALM}\n"
    )


@contextmanager
def start_kdc(directory: Path) -> Iterator[Kdc]:
    """Run a KDC for realm ``EXAMPLE.TEST`` in ``directory`` until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    keytab = directory / "proxy.keytab"
    env = {
        **os.environ,
        "KRB5_CONFIG": str(directory / "krb5.conf"),
        "KRB5_KDC_PROFILE": str(directory / "kdc.conf"),
        "KRB5_KTNAME": f"FILE:{keytab}",
        "KRB5CCNAME": f"FILE:{directory / 'alice.ccache'}",
        "KRB5RCACHEDIR": str(directory),  # the acceptor's replay cache, not /var/tmp
    }
    (directory / "kdc.conf").write_text(
        "[kdcdefaults]\n"
        " kdc_listen = 127.0.0.1:0\n kdc_tcp_listen = 127.0.0.1:0\n"
        "[realms]\n"
        f" {REALM} = {{\n"
        f"  database_name = {directory / 'principal'}\n"
        f"  key_stash_file = {directory / 'stash'}\n"
        f"  acl_file = {directory / 'kadm5.acl'}\n"
        "  max_life = 1h\n }\n"
        "[logging]\n"
        f" kdc = FILE:{directory / 'kdc.log'}\n"
    )
    _write_krb5_conf(directory, None)
    _run("kdb5_util", "create", "-s", "-r", REALM, "-P", "master-secret", env=env)
    for user, password in USERS.items():
        _run("kadmin.local", "-r", REALM, "-q", f"addprinc -pw {password} {user}", env=env)
    for service in (SERVICE, OTHER_SERVICE):
        _run("kadmin.local", "-r", REALM, "-q", f"addprinc -randkey {service}", env=env)
    _run("kadmin.local", "-r", REALM, "-q", f"ktadd -k {keytab} {SERVICE}", env=env)
    out = open(directory / "krb5kdc.out", "wb")  # noqa: SIM115 - open while the KDC runs
    kdc = subprocess.Popen(["krb5kdc", "-n"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = None
        deadline = time.monotonic() + START_SECONDS
        while port is None and time.monotonic() < deadline and kdc.poll() is None:
            time.sleep(0.05)
            port = _listening_port(kdc.pid)
        if port is None:
            raise RuntimeError(
                f"krb5kdc did not start: {(directory / 'krb5kdc.out').read_text(errors='replace')}"
            )
        _write_krb5_conf(directory, port)
        for user, password in USERS.items():
            cache = {**env, "KRB5CCNAME": f"FILE:{directory / f'{user}.ccache'}"}
            _run("kinit", f"{user}@{REALM}", env=cache, stdin=password + "\n")
        yield Kdc(directory, port, kdc.pid, keytab, {k: env[k] for k in env if k.startswith("KRB5")})
    finally:
        if kdc.poll() is None:
            os.kill(kdc.pid, signal.SIGTERM)
            try:
                kdc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(kdc.pid, signal.SIGKILL)
                kdc.wait(10)
        out.close()
