"""The admin API and dashboard: an aiohttp application on the server's own event loop.

JSON under ``/api/``; the dashboard (static files, no build step) under ``/``.  Every
``/api/`` request needs the token when one is configured (``Authorization: Bearer TOKEN``;
``?token=`` too, for the browser's EventSource, which cannot set headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from socksflow import ConfigErrors, Server, __version__, app

from .settings import SETTINGS as SETTINGS_KEY
from .settings import AdminSettings
from .state import Observed
from .views import CLOSED_BY_ADMIN, FILTERS, masked, select

log = logging.getLogger("socksflow.admin")

DEFAULT_PAGE = 100
MAX_PAGE = 1000
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
SERVER = web.AppKey("server", object)
OBSERVED = web.AppKey("observed", Observed)
SETTINGS = web.AppKey("settings", AdminSettings)
TRUE = ("1", "true", "yes")


def application(
    server: Any,  # Any: the routes reach server.pm, reload and shadow, beyond socksflow.Server
    observed: Observed,
    settings: AdminSettings,
    workers: Any = None,
) -> web.Application:
    """The routes, bound to one server; with ``workers`` (a :class:`~.fanout.Workers`), for all of them."""
    api = web.Application(middlewares=[_authorize], client_max_size=64 * 1024)
    api[SERVER], api[OBSERVED], api[SETTINGS] = server, observed, settings
    routes = {
        ("GET", "/"): _static, ("GET", "/static/{name}"): _static,
        ("GET", "/api/health"): _health, ("GET", "/api/ready"): _ready,
        ("GET", "/api/sessions"): _sessions, ("POST", "/api/sessions/close"): _close_matching,
        ("POST", "/api/sessions/{id}/close"): _close_one,
        ("GET", "/api/totals"): _totals, ("GET", "/api/traffic"): _traffic, ("GET", "/api/stream"): _stream,
        ("GET", "/api/rules"): _rules, ("GET", "/api/users"): _users, ("GET", "/api/events"): _events,
        ("GET", "/api/udp"): _udp, ("GET", "/api/bind"): _bind,
        ("GET", "/api/config"): _config, ("GET", "/api/plugins"): _plugins,
        ("POST", "/api/reload"): _reload,
        ("GET", "/api/shadow"): _shadow, ("POST", "/api/shadow"): _set_shadow, ("DELETE", "/api/shadow"): _unset_shadow,
    }  # fmt: skip
    if workers is not None:
        from . import fanout

        api[fanout.WORKERS] = workers
        routes.update({(method, path): handler for method, path, handler in fanout.ROUTES})
    api.add_routes([web.route(method, path, handler) for (method, path), handler in routes.items()])
    return api


@web.middleware
async def _authorize(request: web.Request, handler: Any) -> web.StreamResponse:
    refusal = foreign(request)
    if refusal:
        return web.json_response({"error": refusal}, status=403)
    if request.path.startswith("/api/"):
        settings = request.app[SETTINGS]
        if not settings.authorized(request.headers.get("Authorization"), request.query.get("token")):
            return web.json_response(
                {"error": "a bearer token is required"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
    return await handler(request)


def foreign(request: web.Request) -> str | None:
    """Why a request comes from another web site (the API has no cookies, but needs no token on loopback).

    A page on any site the operator visits could otherwise POST to ``127.0.0.1`` (close every
    session, reload), or read the API through a name rebound to ``127.0.0.1``: so the ``Host``
    must be an address (or ``localhost``), and a browser's ``Origin``, when sent, this listener.
    """
    host = request.host.rsplit(":", 1)[0].strip("[]") if request.host else ""
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"Host {request.host!r}: use the listener's address"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"Origin {origin!r} is another site"
    return None


def _acl(request: web.Request) -> Any:
    """The acl plugin, when loaded: its rule hits, decisions and shadow comparison."""
    return request.app[SERVER].pm.get_plugin("acl")


# ---------------------------------------------------------------------------- dashboard


async def _static(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "index.html")
    if name not in STATIC:
        raise web.HTTPNotFound()
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=STATIC[name], headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------- sessions


def _filters(request: web.Request) -> dict[str, str]:
    return {name: request.query[name] for name in FILTERS if request.query.get(name)}


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    try:
        return max(0, min(int(request.query.get(name, default)), maximum))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: not a number") from None


async def _sessions(request: web.Request) -> web.Response:
    server, observed = request.app[SERVER], request.app[OBSERVED]
    rows = select(server.sessions, _filters(request), observed.rates)
    offset = _int(request, "offset", 0, 1 << 30)
    limit = _int(request, "limit", DEFAULT_PAGE, MAX_PAGE)
    return web.json_response({
        "total": len(server.sessions), "matched": len(rows), "offset": offset, "limit": limit,
        "sessions": rows[offset : offset + limit],
    })  # fmt: skip


def _close(server: Server, ids: set[str]) -> list[str]:
    closed = []
    for session in list(server.sessions):
        if session.id in ids and server.end_session(session, CLOSED_BY_ADMIN):
            closed.append(session.id)
    return closed


async def _close_one(request: web.Request) -> web.Response:
    closed = _close(request.app[SERVER], {request.match_info["id"]})
    if not closed:
        return web.json_response({"error": "no such session"}, status=404)
    return web.json_response({"closed": closed})


async def _close_matching(request: web.Request) -> web.Response:
    filters = _filters(request)
    if not filters and request.query.get("all") not in TRUE:
        return web.json_response({"error": "give a filter, or all=1 to close every session"}, status=400)
    server = request.app[SERVER]
    rows = select(server.sessions, filters, {})
    return web.json_response({"closed": _close(server, {r["id"] for r in rows})})


async def _udp(request: web.Request) -> web.Response:
    rows = select(request.app[SERVER].sessions, {"state": "udp"}, request.app[OBSERVED].rates)
    for item, session in zip(rows, _by_id(request, rows), strict=True):
        association = session.association
        item["datagrams_up"] = association.datagrams_up if association else 0
        item["datagrams_down"] = association.datagrams_down if association else 0
    return web.json_response({"associations": rows})


async def _bind(request: web.Request) -> web.Response:
    return web.json_response({"listeners": select(request.app[SERVER].sessions, {"state": "bind"}, {})})


def _by_id(request: web.Request, rows: list[dict[str, Any]]) -> list[Any]:
    sessions = {s.id: s for s in request.app[SERVER].sessions}
    return [sessions[r["id"]] for r in rows]


# ---------------------------------------------------------------------------- numbers


async def _totals(request: web.Request) -> web.Response:
    return web.json_response(request.app[OBSERVED].totals())


async def _traffic(request: web.Request) -> web.Response:
    return web.json_response({"samples": list(request.app[OBSERVED].traffic)})


async def _stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``data:`` line per second with the traffic sample and the totals."""
    observed = request.app[OBSERVED]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=16)
    observed.subscribers.add(queue)
    try:
        await response.write(b"retry: 2000\n\n")
        while (point := await queue.get()) is not None:
            payload = json.dumps({"traffic": point, "totals": observed.totals()})
            await response.write(f"data: {payload}\n\n".encode())
    except (ConnectionError, RuntimeError):  # the reader left (RuntimeError: aiohttp's closed transport)
        pass
    finally:
        observed.subscribers.discard(queue)
    return response


async def _rules(request: web.Request) -> web.Response:
    acl = _acl(request)
    server = request.app[SERVER]
    hits = acl.rule_hits(server.config) if acl is not None else None
    return web.json_response({"file": server.config.file, "hits": hits})


async def _users(request: web.Request) -> web.Response:
    return web.json_response({"users": request.app[OBSERVED].user_table()})


async def _events(request: web.Request) -> web.Response:
    observed = request.app[OBSERVED]
    return web.json_response({
        "auth_failures": list(observed.auth_failures)[::-1], "refusals": list(observed.refusals)[::-1],
    })  # fmt: skip


# ---------------------------------------------------------------------------- the server


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def _ready(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    ready = bool(server.addresses)
    body = {"ready": ready, "listen": [str(a) for a in server.addresses], "worker": server.worker}
    return web.json_response(body, status=200 if ready else 503)


async def _config(request: web.Request) -> web.Response:
    config = request.app[SERVER].config
    return web.json_response({"file": config.file, "config": masked(config.root.plain() or {})})


async def _plugins(request: web.Request) -> web.Response:
    infos = request.app[SERVER].pm.plugin_info()
    return web.json_response({
        "socksflow": __version__,
        "plugins": [{"name": i.name, "version": i.version, "source": i.source, "hooks": list(i.hooks)} for i in infos],
    })  # fmt: skip


async def validated(
    server: Any, path: str
) -> tuple[Any, list[str]]:  # Any: server.pm, beyond socksflow.Server
    """The configuration at ``path``, checked as ``socksflow check`` does; or None and its errors."""
    try:
        config = app.load_config(path)
        app.configure(server.pm, config)
    except ConfigErrors as exc:
        return None, [str(e) for e in exc.errors]
    results = await server.pm.call_all("socksflow_check", None, config=config, resolve=server.resolver())
    failures = [str(e) for result in results for e in result]
    return (None, failures) if failures else (config, [])


async def _reload(request: web.Request) -> web.Response:
    """Validate the configuration file; report what the last decisions would become; apply unless dry_run."""
    server = request.app[SERVER]
    dry_run = request.query.get("dry_run", "").lower() in TRUE
    config, errors = await validated(server, server.config.file)
    if config is None:
        return web.json_response(
            {"ok": False, "applied": False, "file": server.config.file, "errors": errors}, status=422
        )
    acl = _acl(request)
    diff = await acl.replay_decisions(server, config) if acl is not None else None
    applied = False if dry_run else await server.reload(config)
    warnings = [str(w) for w in config.warnings]
    if config.stash.get(SETTINGS_KEY) != request.app[SETTINGS]:
        warnings.append(
            f"{config.file}: admin: changes to this section (listen, token, recent) apply at the next restart"
        )
    return web.json_response({
        "ok": True, "applied": applied, "file": config.file, "errors": [],
        "warnings": warnings, "diff": diff,
    })  # fmt: skip


async def _shadow(request: web.Request) -> web.Response:
    acl, shadow = _acl(request), request.app[SERVER].shadow
    report = acl.shadow_report(shadow) if acl is not None else None
    return web.json_response({"shadow": shadow.file if shadow is not None else None, "report": report})


async def _set_shadow(request: web.Request) -> web.Response:
    try:
        path = (await request.json())["file"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'send {"file": "path/to/rules.yaml"}'}, status=400)
    server = request.app[SERVER]
    config, errors = await validated(server, str(path))
    if config is None:
        return web.json_response({"ok": False, "errors": errors}, status=422)
    server.shadow = config
    log.info("shadow rules from %s: requests are decided by them too, with no effect", config.file)
    return web.json_response({"ok": True, "shadow": config.file, "errors": []})


async def _unset_shadow(request: web.Request) -> web.Response:
    request.app[SERVER].shadow = None
    return web.json_response({"ok": True, "shadow": None})


# ---------------------------------------------------------------------------- listening


class Listener:
    """The running application(s): started and stopped with the server.

    A single server listens on the configured address.  A worker (``--workers N``) serves
    its own sessions on a private unix socket, and worker 0 also answers on the configured
    address for all the workers (see :mod:`.fanout`).
    """

    # server: Any, as the routes reach server.pm, reload and shadow, beyond socksflow.Server.
    def __init__(self, server: Any, observed: Observed, settings: AdminSettings) -> None:
        self.server, self.observed, self.settings = server, observed, settings
        self.runners: list[web.AppRunner] = []
        self.workers: Any = None
        self.socket: Path | None = None
        self.address = ""

    async def _serve(self, app_: web.Application, site: Any, *args: Any) -> web.AppRunner:
        runner = web.AppRunner(app_, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self.runners.append(runner)
        await site(runner, *args).start()
        return runner

    async def start(self, host: str, port: int) -> None:
        server = self.server
        if server.worker is not None:
            from . import fanout

            directory = fanout.socket_directory()
            self.socket = directory / fanout.SOCKET.format(server.worker)
            self.socket.unlink(missing_ok=True)  # left by this worker's previous life
            await self._serve(
                application(server, self.observed, self.settings), web.UnixSite, str(self.socket)
            )
            if server.worker != 0:
                self.address = f"unix:{self.socket}"
                self.observed.start()
                return
            self.workers = fanout.Workers(directory)
        front = application(server, self.observed, self.settings, self.workers)
        runner = await self._serve(front, web.TCPSite, host, port)
        sockname = runner.addresses[0]
        self.address = (
            f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"
        )
        self.observed.start()

    async def stop(self) -> None:
        await self.observed.stop()
        if self.workers is not None:
            await self.workers.close()
        for runner in self.runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the last worker out removes the directory
                self.socket.parent.rmdir()


__all__ = ["Listener", "validated"]
