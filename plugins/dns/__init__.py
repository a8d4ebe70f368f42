"""DNS: the ``dns`` section — resolve domain destinations with dnspython, not the system resolver.

```yaml
dns:
  servers: [127.0.0.1:5353]          # system (resolv.conf) | IP[:port] | tls://IP[:853] | https://IP/dns-query
                                     # or {address: tls://IP, tls_name: dns.example, ca: ca.pem}
                                     # or {address: https://dns.example/dns-query, bootstrap: IP, ca: ca.pem}
  hosts: {printer.lan: 192.0.2.10}   # static names (one address or a list); they override the servers
  hosts_file: /etc/hosts             # optional, /etc/hosts format
  policy: {"*.corp.example": [127.0.0.1:5354]}   # per-domain servers (exact name or *.suffix)
  prefer: ipv4                       # ipv4 | ipv6 | both (alternate, IPv6 first)
  timeout: 2s                        # per try
  retries: 1                         # further tries after a time-out
  cache: {size: 10000, min_ttl: 0s, max_ttl: 1h, negative_ttl: 30s}
```

DNS over TLS needs nothing more; DNS over HTTPS needs dnspython's extra (``pip install
'dnspython[doh]'``), and a server named by host name needs ``bootstrap: IP`` so that finding
it does not ask the system resolver.  UDP queries fall back to TCP when an answer is truncated.

A and AAAA are asked at once; each answer is cached for its TTL (clamped), NXDOMAIN and empty
answers for at most ``negative_ttl``, and concurrent sessions asking for the same name share
one query.  NXDOMAIN, SERVFAIL and time-outs raise :class:`~socksflow.ResolveError`: the client
gets REP 0x04 and the log the reason.  Without a ``dns`` section this plugin has no opinion
and the core asks the system resolver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from socksflow import Config, StashKey, hookimpl

from .resolver import DnsResolver
from .settings import read_settings

if TYPE_CHECKING:
    from socksflow import IPAddress, Server

RESOLVER = StashKey[DnsResolver]("dns")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("dns")
    if node is None:
        return False  # dormant: the system resolver answers
    settings = read_settings(node)
    if settings.lifetime > config.timeouts.hook:
        config.warnings.append(node.error(
            f"a look-up may take {settings.lifetime:g}s (timeout × (retries + 1)) but the core gives "
            f"resolution {config.timeouts.hook:g}s (timeouts.hook): the later tries never happen"
        ))  # fmt: skip
    config.stash[RESOLVER] = DnsResolver(settings)


@hookimpl
async def socksflow_resolve(config: Config, host: str) -> list[IPAddress] | None:
    resolver = config.stash.get(RESOLVER)
    if resolver is None:
        return None
    return await resolver.resolve(host)


@hookimpl
def socksflow_shutdown(server: Server) -> None:
    resolver = server.config.stash.get(RESOLVER)
    if resolver is not None:
        resolver.close()
