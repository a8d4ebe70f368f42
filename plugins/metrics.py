"""Prometheus metrics: the ``metrics`` section — an HTTP endpoint serving ``/metrics``.

```yaml
metrics:
  listen: 127.0.0.1:9150      # loopback only, unless:
  allow_remote: false         # true to listen on another address (the endpoint has no auth)
```

Series (sessions are counted when they end):

* ``socksflow_sessions_total{command, verdict, protocol}``: command
  ``connect|bind|udp_associate|resolve|resolve_ptr|none`` (none: ended before a request),
  verdict ``allow|deny|none``, protocol (the front door) ``socks5|socks4|http|unknown|none``
  (unknown: bytes of no protocol; none: the client sent nothing).
* ``socksflow_sessions_active``: open sessions now.
* ``socksflow_relayed_bytes_total{direction}``: ``up`` (client to destination) and ``down``.
* ``socksflow_handshake_seconds``, ``socksflow_connect_seconds``, ``socksflow_dns_seconds``:
  histograms of the time from accept to the request, of dialling, of name resolution.
* ``socksflow_rule_hits_total{rule, verdict}``: decisions by the rule (``file:line``) that made them.
* ``socksflow_denials_total{plugin, stage}``: sessions refused, by the plugin that refused and
  the stage (``accept``, ``auth``, ``request``); limit rejections are ``plugin="limits"``.
* ``socksflow_plugin_errors_total{plugin, hook}``: plugin faults.
* ``socksflow_descriptor_exhaustion_total``: times the process ran out of file descriptors
  (each logged once); ``socksflow_descriptor_refused_total``: clients closed unserved meanwhile.
* ``socksflow_outbound_sessions_total{outbound, member, reply}``: sessions routed through an
  outbound other than direct, by the group member used (``-`` for none) and the reply
  (``0x00`` when the stream opened; a failure's code otherwise).
* ``socksflow_outbound_bytes_total{outbound, direction}``: bytes those sessions relayed.
* ``socksflow_outbound_member_up{outbound, member}`` (1 or 0) and
  ``socksflow_outbound_member_latency_seconds{outbound, member}``: the health of each group's
  members, read at scrape time.

With ``socksflow run --workers N`` one scrape shows the whole server: worker 0 serves
``listen``, asks the other workers for their series over their private sockets, and answers
with the sums (``_created`` series: the earliest; gauges other than the open sessions, such as
a member's health, the highest).  A worker that does not answer in time
(restarting) is left out of that scrape and logged.

Each server has its own registry (never prometheus-client's global one), served by an
asyncio listener on the server's own loop, so metric callbacks never race the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from socksflow import OUTBOUNDS, ROUTE, Address, Config, PluginError, Server, Session, StashKey, hookimpl

log = logging.getLogger("socksflow.metrics")

DEFAULT_LISTEN = "127.0.0.1:9150"
REQUEST_TIMEOUT = 10.0
PEER_TIMEOUT = 2.0  # a worker's own series, asked for by the worker being scraped
MAX_REQUEST_HEAD = 8192


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: Address


SETTINGS = StashKey[MetricsSettings]("metrics")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("metrics")
    if node is None:
        return False  # dormant: nothing is exported
    items = node.as_map({"listen", "allow_remote"}) if node.value is not None else {}
    listen = items["listen"].as_address() if "listen" in items else Address.parse(DEFAULT_LISTEN)
    allow_remote = items["allow_remote"].as_bool() if "allow_remote" in items else False
    where = items.get("listen", node)
    if listen.is_domain:
        raise where.error("listen on an IP address (127.0.0.1:9150, [::1]:9150)")
    if not listen.host.is_loopback and not allow_remote:  # type: ignore[union-attr]
        raise where.error(f"{listen} is not a loopback address; set allow_remote: true to expose metrics")
    config.stash[SETTINGS] = MetricsSettings(listen)


# ---------------------------------------------------------------------------- the series


class _GroupHealth:
    """Member health of the groups of the configuration in force, collected when scraped."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["outbound", "member"]
        up = GaugeMetricFamily(
            "socksflow_outbound_member_up", "Group members up (1) or down (0)", labels=labels
        )
        latency = GaugeMetricFamily(
            "socksflow_outbound_member_latency_seconds",
            "Latency of a member's last passing check",
            labels=labels,
        )
        registry = self.server.config.stash.get(OUTBOUNDS)
        for name in registry.names if registry is not None else ():
            health = getattr(registry[name], "member_health", None)
            for member, (is_up, seconds) in (health() if health is not None else {}).items():
                up.add_metric([name, member], 1.0 if is_up else 0.0)
                if seconds is not None:
                    latency.add_metric([name, member], seconds)
        yield up
        yield latency


class Metrics:
    """One server's registry and series."""

    def __init__(self, server: Any) -> None:  # Any: server.peers, beyond socksflow.Server
        self.peers = server.peers
        self.registry = registry = CollectorRegistry()

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(f"socksflow_{name}", documentation, labels, registry=registry)

        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(f"socksflow_{name}", documentation, registry=registry)

        self.sessions = counter(
            "sessions", "Sessions ended, by command, verdict and front door", "command", "verdict", "protocol"
        )
        self.active = Gauge("socksflow_sessions_active", "Sessions open now", registry=registry)
        self.active.set_function(lambda: len(server.sessions))
        self.bytes = counter("relayed_bytes", "Bytes relayed by ended sessions", "direction")
        self.timings = {
            "handshake": histogram("handshake_seconds", "Time from accept to the request"),
            "connect": histogram("connect_seconds", "Time to dial the destination"),
            "resolve": histogram("dns_seconds", "Time to resolve the destination"),
        }
        self.rule_hits = counter("rule_hits", "Decisions by the rule that made them", "rule", "verdict")
        self.denials = counter("denials", "Sessions refused, by plugin and stage", "plugin", "stage")
        self.plugin_errors = counter("plugin_errors", "Plugin faults, by plugin and hook", "plugin", "hook")
        registry.register(_DescriptorCollector(server))
        self.outbound_sessions = counter(
            "outbound_sessions",
            "Sessions routed through an outbound, by member and reply",
            "outbound",
            "member",
            "reply",
        )
        self.outbound_bytes = counter(
            "outbound_bytes", "Bytes relayed through an outbound", "outbound", "direction"
        )
        registry.register(_GroupHealth(server))
        self.listener: asyncio.Server | None = None
        self.address: Address | None = None

    def observe(self, session: Session) -> None:
        """Account a finished session."""
        request, verdict = session.request, session.verdict
        verdict_label = session.outcome or "none"
        command = request.command.name.lower() if request else "none"
        self.sessions.labels(command, verdict_label, session.protocol or "none").inc()
        self.bytes.labels("up").inc(session.bytes_up)
        self.bytes.labels("down").inc(session.bytes_down)
        for phase, seconds in session.timings.items():
            if phase in self.timings:
                self.timings[phase].observe(seconds)
        if verdict is not None and verdict.rule:
            self.rule_hits.labels(verdict.rule, verdict_label).inc()
        if verdict_label == "deny":
            stage = "request" if request else "auth" if session.method is not None else "accept"
            self.denials.labels(session.decided_by or "-", stage).inc()
        route = session.stash.get(ROUTE)
        if route is not None:
            self.observe_route(route, session)

    def observe_route(self, route: str, session: Session) -> None:
        """``pool,pool=b``: the outbound, then the member each group on the way picked."""
        outbound, *choices = route.split(",")
        member = ",".join(choice.partition("=")[2] for choice in choices) or "-"
        reply = f"0x{session.reply:02x}" if session.reply is not None else "-"
        self.outbound_sessions.labels(outbound, member, reply).inc()
        self.outbound_bytes.labels(outbound, "up").inc(session.bytes_up)
        self.outbound_bytes.labels(outbound, "down").inc(session.bytes_down)

    async def serve(self, listen: Address) -> None:
        self.listener = await asyncio.start_server(
            self._answer, str(listen.host), listen.port, limit=MAX_REQUEST_HEAD
        )
        self.address = Address.from_sockaddr(self.listener.sockets[0].getsockname())

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
            self.listener = None

    def exposition(self) -> bytes:
        """This worker's series, in the text format the workers exchange."""
        return generate_latest(self.registry)

    async def _registry(self) -> CollectorRegistry:
        """What a scrape shows: this server's registry, or with workers the sum of theirs."""
        if self.peers is None:
            return self.registry
        answers = await self.peers.ask("metrics", PEER_TIMEOUT)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(Sum([self.exposition(), *answers]))
        return merged

    async def _response(self, head: str) -> tuple[str, str, bytes]:
        """Status, content type and body for a request head (request line and headers)."""
        request_line, *header_lines = head.split("\r\n")
        method, _, rest = request_line.partition(" ")
        if method != "GET" or rest.partition(" ")[0].partition("?")[0] != "/metrics":
            return "404 Not Found", "text/plain", b"try /metrics\n"
        fields = (line.partition(":") for line in header_lines)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        # Prometheus text 0.0.4 by default; the newer text or OpenMetrics when the scraper asks.
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return "200 OK", content_type, encoder(await self._registry())

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.x exchange: ``GET /metrics`` gets the exposition, anything else a 404."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = await self._response(head.decode("latin-1"))
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scraper that hung up or sent nonsense gets nothing
        finally:
            writer.close()


class _DescriptorCollector:
    """The server's own account of running out of descriptors, read at each scrape."""

    def __init__(self, server: Any) -> None:  # Any: server.descriptors, beyond socksflow.Server
        self.server = server

    def collect(self) -> Iterator[CounterMetricFamily]:
        account = self.server.descriptors
        yield CounterMetricFamily(
            "socksflow_descriptor_exhaustion", "Times the process ran out of file descriptors",
            value=account.episodes if account else 0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "socksflow_descriptor_refused", "Clients closed unserved for lack of file descriptors",
            value=account.refused if account else 0,
        )  # fmt: skip


SUMMED_GAUGES = frozenset({"socksflow_sessions_active"})  # the other gauges are states (member up, latency)


class Sum:
    """A collector of the series of several expositions added up, sample by sample."""

    def __init__(self, texts: Iterable[bytes]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.texts:
            for family in text_string_to_metric_families(text.decode()):
                families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                samples = values.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in samples:
                        samples[key] = sample.value
                    elif sample.name.endswith("_created"):  # when the series started: the first worker's
                        samples[key] = min(samples[key], sample.value)
                    elif family.type == "gauge" and family.name not in SUMMED_GAUGES:
                        samples[key] = max(samples[key], sample.value)  # a state each worker sees alike
                    else:
                        samples[key] += sample.value
        for name, metric in families.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


METRICS = StashKey[Metrics]("metrics")


# ---------------------------------------------------------------------------- hooks


@hookimpl
async def socksflow_startup(server: Any) -> None:  # Any: server.peers, beyond socksflow.Server
    settings = server.config.stash.get(SETTINGS)
    if settings is None:
        return
    metrics = Metrics(server)
    server.stash[METRICS] = metrics
    if server.peers is not None:
        server.peers.answer("metrics", metrics.exposition)
        if server.worker != 0:
            return  # worker 0 answers scrapes for all
    try:
        await metrics.serve(settings.listen)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics: cannot listen on {settings.listen}: {exc.strerror}") from None
    log.info("metrics on http://%s/metrics", metrics.address)


@hookimpl
async def socksflow_shutdown(server: Server) -> None:
    metrics = server.stash.get(METRICS)
    if metrics is not None:
        with contextlib.suppress(OSError):
            await metrics.close()


@hookimpl
def socksflow_session_end(session: Session) -> None:
    metrics = session.server.stash.get(METRICS)
    if metrics is not None:
        metrics.observe(session)


@hookimpl
def socksflow_session_error(session: Session, error: Exception) -> None:
    metrics = session.server.stash.get(METRICS)
    if metrics is not None and isinstance(error, PluginError):
        metrics.plugin_errors.labels(error.plugin, error.hook).inc()
