"""Resolution: static hosts, the cache, then A and AAAA asked at once, one query per name in flight."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.ttl

from socksflow import ResolveError, interleave

from .cache import AnswerCache, IPAddress, Lookup
from .settings import DnsSettings, Servers, name_is_valid

log = logging.getLogger("socksflow.dns")

FAMILIES = (dns.rdatatype.A, dns.rdatatype.AAAA)
# RFC 8305 §3: once one family has addresses, wait this much longer for the other, not more.
RESOLUTION_DELAY = 0.05
EDNS_PAYLOAD = 1232  # DNS flag day 2020: no IP fragmentation; larger answers come over TCP


@dataclass(frozen=True, slots=True)
class Failure:
    """A query that got no usable answer (time-out, SERVFAIL…): reported, never cached."""

    reason: str


Outcome = Lookup | Failure
Key = tuple[str, dns.rdatatype.RdataType]


class DnsResolver:
    """The resolver of one configuration: its settings, its cache and the queries in flight."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self.cache = AnswerCache(settings.cache)
        self._stubs: dict[Servers, dns.asyncresolver.Resolver] = {}
        self._inflight: dict[Key, asyncio.Task[Outcome]] = {}

    async def resolve(self, host: str) -> list[IPAddress]:
        """The addresses of ``host`` in the configured order of preference.

        Raises :class:`~socksflow.ResolveError` for names that do not exist, have no address,
        or could not be resolved (time-out, server failure), with the reason.
        """
        static = self.settings.hosts.get(host)
        if static is not None:
            return self._ordered(static)
        if not name_is_valid(host):
            shown = host if len(host) <= 64 else host[:64] + "…"
            raise ResolveError(f"{shown!r} is not a valid DNS name")
        outcomes: dict[dns.rdatatype.RdataType, Outcome] = {}
        pending: dict[dns.rdatatype.RdataType, asyncio.Task[Outcome]] = {}
        for rdtype in FAMILIES:
            lookup = self.cache.get((host, rdtype))
            if lookup is None:
                pending[rdtype] = self._query(host, rdtype)
            else:
                outcomes[rdtype] = lookup
        if pending:
            await _collect(pending, outcomes)
        return self._answer(host, outcomes)

    def close(self) -> None:
        """Cancel the queries in flight (server shutdown)."""
        for task in self._inflight.values():
            task.cancel()

    # ------------------------------------------------------------------ queries

    def _query(self, host: str, rdtype: dns.rdatatype.RdataType) -> asyncio.Task[Outcome]:
        """The query in flight for (host, rdtype), started if there is none: sessions share it."""
        key = (host, rdtype)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(host, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return task

    def _forget(self, key: Key, task: asyncio.Task[Outcome]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _ask(self, host: str, rdtype: dns.rdatatype.RdataType) -> Outcome:
        servers = self.settings.servers_for(host)
        name = dns.name.from_text(host)
        try:
            answer = await self._stub(servers).resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            lookup, ttl = Lookup((), nxdomain=True), _negative_ttl(exc.responses().get(name))
        except dns.resolver.LifetimeTimeout as exc:
            reason = f"no answer from {_names(servers)} within {self.settings.lifetime:g}s"
            return Failure(reason + _last_error(exc))
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or ()
            return Failure("; ".join(f"{error[0]} answered {error[3]}" for error in errors) or str(exc))
        except dns.exception.DNSException as exc:
            return Failure(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the task outlives its first asker: nobody else would see this
            log.exception("resolving %s %s failed", host, dns.rdatatype.to_text(rdtype))
            return Failure(f"internal error: {exc!r}")
        else:
            rrset = answer.rrset or ()
            lookup = Lookup(tuple(ipaddress.ip_address(rdata.address) for rdata in rrset))
            ttl = answer.chaining_result.minimum_ttl
        self.cache.put((host, rdtype), lookup, ttl)
        return lookup

    def _stub(self, servers: Servers) -> dns.asyncresolver.Resolver:
        stub = self._stubs.get(servers)
        if stub is None:
            stub = dns.asyncresolver.Resolver(configure=False)
            stub.nameservers = list(servers)
            stub.timeout = self.settings.timeout
            stub.lifetime = self.settings.lifetime
            stub.use_edns(0, 0, EDNS_PAYLOAD)
            self._stubs[servers] = stub
        return stub

    # ------------------------------------------------------------------ answers

    def _answer(self, host: str, outcomes: dict[dns.rdatatype.RdataType, Outcome]) -> list[IPAddress]:
        addresses = self._ordered(
            [ip for outcome in outcomes.values() if isinstance(outcome, Lookup) for ip in outcome.addresses]
        )
        if addresses:
            return addresses
        if any(isinstance(outcome, Lookup) and outcome.nxdomain for outcome in outcomes.values()):
            raise ResolveError(f"{host} does not exist (NXDOMAIN)")
        reasons = dict.fromkeys(o.reason for o in outcomes.values() if isinstance(o, Failure))
        if reasons:
            raise ResolveError("; ".join(reasons))
        raise ResolveError(f"{host} has no A or AAAA record")

    def _ordered(self, addresses: tuple[IPAddress, ...] | list[IPAddress]) -> list[IPAddress]:
        """IPv4 first, IPv6 first, or alternating from IPv6 (RFC 8305 §4) for ``prefer: both``."""
        v4 = [ip for ip in addresses if ip.version == 4]
        v6 = [ip for ip in addresses if ip.version == 6]
        prefer = self.settings.prefer
        if prefer == "ipv4":
            return v4 + v6
        if prefer == "ipv6":
            return v6 + v4
        return interleave(v6, v4)


async def _collect(
    pending: dict[dns.rdatatype.RdataType, asyncio.Task[Outcome]],
    outcomes: dict[dns.rdatatype.RdataType, Outcome],
) -> None:
    """Wait for the pending queries, but only RESOLUTION_DELAY more once some family has addresses.

    The queries are shared and never cancelled here: one given up on still fills the cache.
    """
    while pending:
        answered = any(isinstance(o, Lookup) and o.addresses for o in outcomes.values())
        timeout = RESOLUTION_DELAY if answered else None
        done, _ = await asyncio.wait(pending.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return
        for rdtype, task in list(pending.items()):
            if task.done():
                del pending[rdtype]
                outcomes[rdtype] = Failure("the query was cancelled") if task.cancelled() else task.result()


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: the SOA's TTL bounds how long a negative answer is kept; none given, the cap applies."""
    if response is None:
        return float(dns.ttl.MAX_TTL)
    return float(response.resolve_chaining().minimum_ttl)


def _last_error(timeout: dns.resolver.LifetimeTimeout) -> str:
    """What went wrong besides waiting (a TLS failure, a refused connection), if anything did."""
    for error in reversed(timeout.kwargs.get("errors") or ()):
        if not isinstance(error[3], dns.exception.Timeout):
            return f" (last error: {error[0]}: {error[3]})"
    return ""


def _names(servers: Servers) -> str:
    return ", ".join(str(server) for server in servers)
