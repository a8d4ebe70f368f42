"""Authentication: the ``auth`` section — which methods to offer, and RFC 1929 users.

```yaml
auth:
  methods: [userpass]          # in order of preference: none, userpass, gssapi (see the gssapi plugin)
  users: users.htpasswd        # htpasswd -B (bcrypt) file; plaintext and MD5 are refused
```
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import stat
import time
from dataclasses import dataclass, field

import bcrypt

from socksflow import Config, ConfigError, Identity, Method, Node, Session, StashKey, Verdict, hookimpl

log = logging.getLogger("socksflow.auth")

METHODS = {"none": Method.NO_AUTH, "userpass": Method.USERPASS, "gssapi": Method.GSSAPI}
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
BCRYPT_MAX_BYTES = 72
CACHE_SECONDS = 300.0
CACHE_SIZE = 4096
# Unknown users are checked against this hash so a miss costs what a hit costs (no user enumeration).
_DUMMY_HASH = bcrypt.hashpw(b"socksflow-dummy", bcrypt.gensalt(rounds=10))


@dataclass
class AuthSettings:
    methods: tuple[Method, ...]
    users: dict[bytes, bytes] = field(default_factory=dict)
    # Verified (user, password) pairs, keyed by a salted digest so no password is kept in memory.
    verified: dict[bytes, float] = field(default_factory=dict)
    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))


SETTINGS = StashKey[AuthSettings]("auth")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("auth")
    if node is None:
        return False  # dormant: the core's default (no authentication) applies
    items = node.as_map({"methods", "users"})
    methods: tuple[Method, ...] = (Method.NO_AUTH,)
    if "methods" in items:
        methods = tuple(METHODS[m.as_choice(tuple(METHODS))] for m in items["methods"].as_list())
        if not methods:
            raise items["methods"].error("list at least one method")
    settings = AuthSettings(methods)
    if "users" in items:
        settings.users = load_htpasswd(items["users"])
    if Method.USERPASS in methods and "users" not in items:
        raise node.error("'userpass' needs a users file (users: FILE, made with htpasswd -B)")
    if Method.GSSAPI in methods and config.root.get("gssapi") is None:  # the gssapi plugin's section
        raise items["methods"].error("'gssapi' needs a gssapi section (gssapi: {keytab: FILE})")
    config.stash[SETTINGS] = settings


def load_htpasswd(node: Node) -> dict[bytes, bytes]:
    """``user:bcrypt-hash`` lines; blank lines and ``#`` comments are skipped."""
    path = node.as_path()
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise node.error(f"cannot read users file {str(path)!r}: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        log.warning("%s is readable by every user on this machine: chmod o-r it", path)
    users: dict[bytes, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{path}:{number}"
        if not sep or not user:
            raise ConfigError(f"{where}: expected user:hash", node.file, node.line, node.path)
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError(
                f"{where}: user {user!r} has no bcrypt hash; only htpasswd -B files are accepted",
                node.file, node.line, node.path,
            )  # fmt: skip
        users[user.encode("utf-8")] = hashed.encode("ascii")
    return users


@hookimpl
def socksflow_exposure(config: Config) -> str | None:
    settings = config.stash.get(SETTINGS)
    if settings is None or Method.NO_AUTH in settings.methods:
        return None
    how = " or ".join(
        {Method.USERPASS: "a username and password", Method.GSSAPI: "a Kerberos ticket"}[m]
        for m in settings.methods
    )
    return f"auth: every client must log in with {how}"


@hookimpl
def socksflow_select_method(session: Session, offered: tuple[int, ...]) -> int | None:
    settings = session.config.stash.get(SETTINGS)
    if settings is None:
        return None
    for method in settings.methods:  # the operator's order of preference, not the client's
        if method in offered:
            return method
    return Method.NO_ACCEPTABLE


@hookimpl
async def socksflow_authenticate(
    session: Session, username: bytes, password: bytes
) -> Identity | Verdict | None:
    settings = session.config.stash.get(SETTINGS)
    if settings is None:
        return None
    if not password:
        return Verdict.deny("empty password")
    key = hashlib.sha256(settings.salt + len(username).to_bytes(2, "big") + username + password).digest()
    now = time.monotonic()
    if settings.verified.get(key, 0.0) > now:
        return Identity(username.decode("utf-8", "backslashreplace"))
    hashed = settings.users.get(username)
    # bcrypt reads 72 bytes (as htpasswd -B did when hashing); bcrypt 5 raises on longer ones.
    ok = await asyncio.to_thread(bcrypt.checkpw, password[:BCRYPT_MAX_BYTES], hashed or _DUMMY_HASH)
    if not ok or hashed is None:
        return Verdict.deny("unknown user" if hashed is None else "wrong password")
    if len(settings.verified) >= CACHE_SIZE:
        settings.verified.clear()
    settings.verified[key] = now + CACHE_SECONDS
    return Identity(username.decode("utf-8", "backslashreplace"))
