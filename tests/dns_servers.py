"""Real DNS servers on loopback for the DNS plugin's tests: dnsmasq, unbound (DNS over TLS) and a
scripted server (dnspython) that counts queries and can be slow, silent, failing or truncating.

Every server is started on 127.0.0.1 and stopped by its PID; none of them forwards a query.
Test modules use the fixtures with ``pytest_plugins = ["dns_servers"]``.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import require_tool

READY_TIMEOUT = 10.0
# Names every dnsmasq started by the fixture serves (--host-record: name,IPv4[,IPv6],TTL).
RECORDS = ("dual.test,127.0.0.1,::1,300", "v4only.test,127.0.0.1,300", "short.test,127.0.0.1,::1,1")


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP, for servers that cannot take port 0."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_until_answering(
    process: subprocess.Popen[bytes], port: int, name: str, *, tls: bool = False
) -> None:
    """Query ``name`` until the server answers; fail if it exits or stays silent."""
    deadline = time.monotonic() + READY_TIMEOUT
    query = dns.message.make_query(name, "A")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"DNS server exited with {process.returncode}: {_output(process)}")
        try:
            if tls:
                dns.query.tls(query, "127.0.0.1", port=port, timeout=0.5, verify=False)
            else:
                dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"DNS server on port {port} did not answer within {READY_TIMEOUT}s")


def _output(process: subprocess.Popen[bytes]) -> str:
    if process.stdout is None:
        return ""
    return process.stdout.read().decode(errors="replace")[-2000:]


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate by PID, then kill if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if process.stdout is not None:
        process.stdout.close()


class Dnsmasq:
    """dnsmasq answering only from its command line, logging every query to a file.

    ``records`` are ``--host-record`` values (``name,ip[,ip6][,ttl]``); every other name under
    the ``.test`` domain is NXDOMAIN, names elsewhere are REFUSED.
    """

    def __init__(self, directory: Path, records: Sequence[str]) -> None:
        self.log = directory / f"dnsmasq-{id(self)}.log"
        self.port = free_port()
        args = [
            require_tool("dnsmasq"), "--no-daemon", f"--port={self.port}", "--listen-address=127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/test/", "--pid-file=",
            "--user=root", "--log-queries", f"--log-facility={self.log}",
            "--host-record=ready.test,127.0.0.1,0",
            *(f"--host-record={record}" for record in records),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_until_answering(self.process, self.port, "ready.test")
        except BaseException:
            stop(self.process)
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queries(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for ``name`` (of ``rdtype``, or any type) the server received."""
        kinds = (rdtype,) if rdtype else ("A", "AAAA")
        text = self.log.read_text() if self.log.exists() else ""
        return sum(text.count(f"query[{kind}] {name} from ") for kind in kinds)

    def stop(self) -> None:
        stop(self.process)


class Unbound:
    """unbound serving one local zone over DNS over TLS and DNS over HTTPS (and plain DNS)."""

    def __init__(self, directory: Path, zone: str, records: Sequence[str], cert: Path, key: Path) -> None:
        self.port = free_port()
        self.tls_port = free_port()
        self.https_port = free_port()
        data = "\n".join(f'  local-data: "{record}"' for record in records)
        conf = directory / f"unbound-{self.port}.conf"
        conf.write_text(
            f"""server:
  interface: 127.0.0.1@{self.port}
  interface: 127.0.0.1@{self.tls_port}
  interface: 127.0.0.1@{self.https_port}
  tls-port: {self.tls_port}
  https-port: {self.https_port}
  http-endpoint: "/dns-query"
  tls-service-key: "{key}"
  tls-service-pem: "{cert}"
  port: {self.port}
  do-ip6: no
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{directory}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 1
  num-threads: 1
  so-reuseport: no
  module-config: "iterator"
  access-control: 127.0.0.0/8 allow
  local-zone: "." refuse
  local-zone: "{zone}." static
{data}
"""
        )
        checkconf = subprocess.run(
            [require_tool("unbound-checkconf"), str(conf)], capture_output=True, text=True, check=False
        )
        assert checkconf.returncode == 0, checkconf.stdout + checkconf.stderr
        self.process = subprocess.Popen(
            [require_tool("unbound"), "-d", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            wait_until_answering(self.process, self.tls_port, f"ready.{zone}", tls=True)
        except BaseException:
            stop(self.process)
            raise

    def stop(self) -> None:
        stop(self.process)


def make_tls_certificate(directory: Path, names: Sequence[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and ``names``: returns the (ca, cert, key) paths."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _x509_name("socksflow test CA")
    ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), *(x509.DNSName(name) for name in names)]
    cert = _certificate(_x509_name(names[0]), ca_name, key.public_key(), ca_key, [
        (x509.SubjectAlternativeName(sans), False),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])  # fmt: skip
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    return paths


def _x509_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


# ---------------------------------------------------------------------------- a scripted server


class ScriptedDns:
    """An authoritative server written with dnspython, on UDP and TCP of one loopback port.

    ``records[(name, type)] = ["127.0.0.1", …]``; other names are NXDOMAIN.  ``mode`` is
    ``"answer"``, ``"silent"`` (never replies), ``"servfail"`` or ``"truncate"`` (UDP replies
    carry TC and no records, so the client must ask again over TCP).  ``delay`` slows every
    answer (of the ``delayed`` types); ``queries`` counts (name, type, transport).
    """

    def __init__(
        self, mode: str = "answer", ttl: int = 300, delay: float = 0.0, delayed: Sequence[str] = ("A", "AAAA")
    ) -> None:
        self.mode = mode
        self.ttl = ttl
        self.delay = delay
        self.delayed = delayed
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._lock = threading.Lock()
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while header := self.rfile.read(2):
                    data = self.rfile.read(struct.unpack("!H", header)[0])
                    reply = server.answer(data, "tcp")
                    if reply is None:
                        return
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)

        self.udp, self.tcp = _bind_pair(Udp, Tcp)
        self.port = self.udp.server_address[1]
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self.udp, self.tcp)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, name: str, rdtype: str | None = None, transport: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (q_name, q_type, q_transport), n in self.queries.items()
                if q_name == name and rdtype in (None, q_type) and transport in (None, q_transport)
            )  # fmt: skip

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(name, rdtype, transport)] += 1
        if self.delay and rdtype in self.delayed:
            time.sleep(self.delay)
        if self.mode == "silent":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif self.mode == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
        elif (name, rdtype) in self.records:
            response.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN", rdtype,
                                                            self.records[(name, rdtype)]))  # fmt: skip
        elif not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _bind_pair(
    udp_handler: type[socketserver.BaseRequestHandler], tcp_handler: type[socketserver.BaseRequestHandler]
) -> tuple[_UdpServer, _TcpServer]:
    """A UDP and a TCP server on the same loopback port (the UDP one picks it)."""
    for _ in range(50):
        udp = _UdpServer(("127.0.0.1", 0), udp_handler)
        try:
            return udp, _TcpServer(("127.0.0.1", udp.server_address[1]), tcp_handler)
        except OSError:
            udp.server_close()
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``dnsmasq(*host_records)`` starts a dnsmasq serving ``RECORDS`` and these."""
    started: list[Dnsmasq] = []

    def start(*records: str) -> Dnsmasq:
        server = Dnsmasq(tmp_path, RECORDS + records)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def scripted() -> Iterator[Any]:
    """Factory: ``scripted(mode, ttl=…, delay=…)`` starts a :class:`ScriptedDns`."""
    started: list[ScriptedDns] = []

    def start(*args: Any, **kwargs: Any) -> ScriptedDns:
        server = ScriptedDns(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def unbound_dot(tmp_path: Path) -> Iterator[tuple[Unbound, Path]]:
    """unbound serving ``www.dot.test`` (127.0.0.9) over TLS: yields the server and its CA file."""
    ca, cert, key = make_tls_certificate(tmp_path, ["dns.test"])
    records = ["ready.dot.test. 60 IN A 127.0.0.1", "www.dot.test. 300 IN A 127.0.0.9"]
    server = Unbound(tmp_path, "dot.test", records, cert, key)
    try:
        yield server, ca
    finally:
        server.stop()
