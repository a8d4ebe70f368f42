"""Prometheus metrics: the ``metrics`` section — an HTTP endpoint serving ``/metrics``.

```yaml
metrics:
  listen: 127.0.0.1:9150      # loopback only, unless:
  allow_remote: false         # true to listen on another address (the endpoint has no auth)
```

Series (sessions are counted when they end):

* ``socksflow_sessions_total{command, verdict}``: command ``connect|bind|udp_associate|none``
  (none: ended before a request), verdict ``allow|deny|none``.
* ``socksflow_sessions_active``: open sessions now.
* ``socksflow_relayed_bytes_total{direction}``: ``up`` (client to destination) and ``down``.
* ``socksflow_handshake_seconds``, ``socksflow_connect_seconds``, ``socksflow_dns_seconds``:
  histograms of the time from accept to the request, of dialling, of name resolution.
* ``socksflow_rule_hits_total{rule, verdict}``: decisions by the rule (``file:line``) that made them.
* ``socksflow_denials_total{plugin, stage}``: sessions refused, by the plugin that refused and
  the stage (``accept``, ``auth``, ``request``); limit rejections are ``plugin="limits"``.
* ``socksflow_plugin_errors_total{plugin, hook}``: plugin faults.

With ``socksflow run --workers N`` every worker counts its own sessions and serves them on
``listen`` port + its number (9150, 9151, …): scrape each, or sum them in Prometheus.

Each server has its own registry (never prometheus-client's global one), served by an
asyncio listener on the server's own loop, so metric callbacks never race the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from socksflow import Address, Config, PluginError, StashKey, hookimpl

log = logging.getLogger("socksflow.metrics")

DEFAULT_LISTEN = "127.0.0.1:9150"
REQUEST_TIMEOUT = 10.0
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


class Metrics:
    """One server's registry and series."""

    def __init__(self, server: Any) -> None:
        self.registry = registry = CollectorRegistry()

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(f"socksflow_{name}", documentation, labels, registry=registry)

        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(f"socksflow_{name}", documentation, registry=registry)

        self.sessions = counter("sessions", "Sessions ended, by command and verdict", "command", "verdict")
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
        self.listener: asyncio.Server | None = None
        self.address: Address | None = None

    def observe(self, session: Any) -> None:
        """Account a finished session."""
        request, verdict = session.request, session.verdict
        verdict_label = session.outcome or "none"
        self.sessions.labels(request.command.name.lower() if request else "none", verdict_label).inc()
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

    def _response(self, head: str) -> tuple[str, str, bytes]:
        """Status, content type and body for a request head (request line and headers)."""
        request_line, *header_lines = head.split("\r\n")
        method, _, rest = request_line.partition(" ")
        if method != "GET" or rest.partition(" ")[0].partition("?")[0] != "/metrics":
            return "404 Not Found", "text/plain", b"try /metrics\n"
        fields = (line.partition(":") for line in header_lines)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        # Prometheus text 0.0.4 by default; the newer text or OpenMetrics when the scraper asks.
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return "200 OK", content_type, encoder(self.registry)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.x exchange: ``GET /metrics`` gets the exposition, anything else a 404."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = self._response(head.decode("latin-1"))
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


METRICS = StashKey[Metrics]("metrics")


# ---------------------------------------------------------------------------- hooks


@hookimpl
async def socksflow_startup(server: Any) -> None:
    settings = server.config.stash.get(SETTINGS)
    if settings is None:
        return
    metrics = Metrics(server)
    try:
        listen = settings.listen
        if server.worker is not None and listen.port:  # --workers N: worker i serves port + i
            listen = Address(listen.host, listen.port + server.worker)
        await metrics.serve(listen)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics: cannot listen on {settings.listen}: {exc.strerror}") from None
    server.stash[METRICS] = metrics
    log.info("metrics on http://%s/metrics", metrics.address)


@hookimpl
async def socksflow_shutdown(server: Any) -> None:
    metrics = server.stash.get(METRICS)
    if metrics is not None:
        with contextlib.suppress(OSError):
            await metrics.close()


@hookimpl
def socksflow_session_end(session: Any) -> None:
    metrics = session.server.stash.get(METRICS)
    if metrics is not None:
        metrics.observe(session)


@hookimpl
def socksflow_session_error(session: Any, error: Exception) -> None:
    metrics = session.server.stash.get(METRICS)
    if metrics is not None and isinstance(error, PluginError):
        metrics.plugin_errors.labels(error.plugin, error.hook).inc()
