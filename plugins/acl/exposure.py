"""Whether the rules keep unknown clients out: for ``socksflow run`` on a non-loopback address."""

from __future__ import annotations

from .matchers import AddressMatcher, NetworkSet
from .rules import Rule, RuleSet
from .special import special_networks


def _local_networks() -> NetworkSet:
    """Clients from these networks are this machine or its own networks, not the whole Internet."""
    local = NetworkSet()
    for name in ("loopback", "private", "link-local"):
        for network in special_networks(name):
            local.add(network, f"special:{name}")
    return local


_LOCAL = _local_networks()


def client_restriction(ruleset: RuleSet) -> str | None:
    """One line on how the rules keep strangers out, or None when some rule lets anyone in."""
    allows = [rule for rule in ruleset.rules if rule.allow]
    if not allows:
        return "rules: no rule allows a request"
    if all(_restricts_clients(rule) for rule in allows):
        return "rules: every allow rule names users or groups, or clients on local networks only"
    return None


def _restricts_clients(rule: Rule) -> bool:
    return bool(rule.users or rule.groups) or (rule.clients is not None and _local_only(rule.clients))


def _local_only(clients: AddressMatcher) -> bool:
    # special:self (the proxy's own addresses) is this machine too.
    return _LOCAL.covers(clients.networks)
