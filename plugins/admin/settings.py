"""The ``admin:`` section: where the admin API listens and the token it asks for."""

from __future__ import annotations

import hmac
import importlib.util
from dataclasses import dataclass

from socksflow import Address, Config, StashKey

DEFAULT_LISTEN = "127.0.0.1:9180"
DEFAULT_RECENT = 1000  # decisions kept to replay against a new rule file before a reload
MAX_RECENT = 100_000


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address
    token: str | None  # required by every API request when set
    recent: int

    def authorized(self, header: str | None, query: str | None) -> bool:
        """Whether a request carried the token (``Authorization: Bearer``, or ``?token=`` for EventSource)."""
        if self.token is None:
            return True
        given = query or ""
        if header and header.lower().startswith("bearer "):
            given = header[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())


SETTINGS = StashKey[AdminSettings]("admin")


def read_settings(config: Config) -> AdminSettings | None:
    """The section's settings, or None when there is no ``admin:`` section (the plugin is dormant)."""
    node = config.section("admin")
    if node is None:
        return None
    if importlib.util.find_spec("aiohttp") is None:
        raise node.error("the admin API needs aiohttp: pip install 'socksflow[admin]'")
    items = node.as_map({"listen", "token", "token_file", "recent"}) if node.value is not None else {}
    where = items.get("listen", node)
    listen = items["listen"].as_address() if "listen" in items else Address.parse(DEFAULT_LISTEN)
    if listen.is_domain:
        raise where.error("listen on an IP address (127.0.0.1:9180, [::1]:9180)")
    if "token" in items and "token_file" in items:
        raise items["token_file"].error("give token or token_file, not both")
    token = None
    if "token" in items:
        token = items["token"].as_str()
    elif "token_file" in items:
        path = items["token_file"].as_path()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise items["token_file"].error(f"cannot read {str(path)!r}: {exc.strerror}") from None
    if token is not None and len(token) < 16:
        raise items.get("token", items.get("token_file", node)).error(
            "the token is too short: use 16 characters or more"
        )
    if not listen.host.is_loopback and token is None:  # type: ignore[union-attr]
        raise where.error(
            f"{listen} is not a loopback address: set a token (or token_file) to expose the admin API"
        )
    recent = items["recent"].as_int(0, MAX_RECENT) if "recent" in items else DEFAULT_RECENT
    return AdminSettings(listen, token, recent)
