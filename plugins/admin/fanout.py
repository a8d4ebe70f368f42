"""``--workers N``: one admin API for the whole server.

Each worker serves its own API on a private unix socket, ``worker-I.sock`` in a directory
only this user can enter, named after the supervisor's pid (every worker computes the same
name).  Worker 0 also listens on the configured address and answers there for the whole
server: it asks every worker's socket (its own included) and merges the answers — sessions
concatenated (ids become ``WORKER:ID``), counters summed, rule hits summed rule by rule,
events interleaved by time.  A worker that does not answer (restarting) is left out and
named in ``missing_workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

SOCKET = "worker-{}.sock"
TIMEOUT = aiohttp.ClientTimeout(total=10)
SUMMED = ("sessions", "ended", "denied", "bytes_up", "bytes_down", "rate_up", "rate_down")


def socket_directory() -> Path:
    """The workers' private directory (created 0700, or refused if someone else made it)."""
    path = Path(tempfile.gettempdir()) / f"socksflow-admin-{os.getppid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")
    return path


class Workers:
    """Worker 0's view of every worker's API."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def numbers(self) -> list[int]:
        found = []
        for path in self.directory.glob("worker-*.sock"):
            with contextlib.suppress(ValueError):
                found.append(int(path.stem.removeprefix("worker-")))
        return sorted(found)

    def _client(self, number: int) -> aiohttp.ClientSession:
        client = self._sessions.get(number)
        if client is None or client.closed:
            connector = aiohttp.UnixConnector(path=str(self.directory / SOCKET.format(number)))
            client = self._sessions[number] = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)
        return client

    async def ask(
        self, request: web.Request, path: str | None = None, only: int | None = None, **query: Any
    ) -> tuple[dict[int, Any], list[int]]:
        """The same request to every worker (or ``only`` one): the answers by worker, and those that failed."""
        path = path or request.path
        params = {**request.query, **{k: str(v) for k, v in query.items()}}
        body = await request.read() if request.can_read_body else None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}

        async def one(number: int) -> tuple[int, Any]:
            client = self._client(number)
            async with client.request(
                request.method, f"http://localhost{path}", params=params, data=body, headers=headers
            ) as answer:
                return answer.status, await answer.json()

        numbers = self.numbers() if only is None else [only]
        results = await asyncio.gather(*(one(n) for n in numbers), return_exceptions=True)
        answers, missing = {}, []
        for number, result in zip(numbers, results, strict=True):
            if isinstance(result, BaseException):
                missing.append(number)
            else:
                answers[number] = result
        return answers, missing

    async def close(self) -> None:
        for client in self._sessions.values():
            await client.close()


WORKERS = web.AppKey("workers", Workers)


def _reply(answers: dict[int, Any], missing: list[int], body: dict[str, Any]) -> web.Response:
    statuses = {status for status, _ in answers.values()}
    status = 200 if statuses <= {200} else max(statuses)
    return web.json_response(body | {"missing_workers": missing}, status=status)


def _tag(number: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["id"] = f"{number}:{row['id']}"
        row["worker"] = number
    return rows


async def sessions(request: web.Request) -> web.Response:
    offset = int(request.query.get("offset", 0))
    limit = int(request.query.get("limit", 100))
    answers, missing = await request.app[WORKERS].ask(request, offset=0, limit=offset + limit)
    rows = [row for n, (_, body) in answers.items() for row in _tag(n, body["sessions"])]
    rows.sort(key=lambda r: r["started"], reverse=True)
    return _reply(answers, missing, {
        "total": sum(b["total"] for _, b in answers.values()),
        "matched": sum(b["matched"] for _, b in answers.values()),
        "offset": offset, "limit": limit, "sessions": rows[offset : offset + limit],
    })  # fmt: skip


async def close_one(request: web.Request) -> web.Response:
    number, _, local = request.match_info["id"].partition(":")
    if not number.isdigit() or not local:
        return web.json_response({"error": "no such session (ids are WORKER:ID)"}, status=404)
    workers = request.app[WORKERS]
    try:
        status, body = (await workers.ask(request, f"/api/sessions/{local}/close", only=int(number)))[0][
            int(number)
        ]
    except KeyError:
        return web.json_response({"error": f"worker {number} does not answer"}, status=502)
    if status == 200:
        body["closed"] = [f"{number}:{i}" for i in body["closed"]]
    return web.json_response(body, status=status)


async def close_matching(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    if any(status != 200 for status, _ in answers.values()):
        status, body = next(a for a in answers.values() if a[0] != 200)
        return web.json_response(body, status=status)
    return _reply(
        answers, missing, {"closed": [f"{n}:{i}" for n, (_, b) in answers.items() for i in b["closed"]]}
    )


async def listed(request: web.Request) -> web.Response:
    """Lists to concatenate (UDP associations, BIND listeners)."""
    answers, missing = await request.app[WORKERS].ask(request)
    key = "associations" if request.path.endswith("/udp") else "listeners"
    return _reply(answers, missing, {key: [r for n, (_, b) in answers.items() for r in _tag(n, b[key])]})


def summed_totals(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    totals = {key: sum(b[key] for b in bodies) for key in SUMMED}
    return totals | {"time": time.time(), "uptime": max((b["uptime"] for b in bodies), default=0.0)}


async def totals(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    return _reply(answers, missing, summed_totals([b for _, b in answers.values()]))


async def traffic(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    series = [b["samples"] for _, b in answers.values()]
    length = min((len(s) for s in series), default=0)
    merged = []
    for i in range(-length, 0):  # aligned from the newest sample back
        points = [s[i] for s in series]
        merged.append(
            {
                "time": max(p["time"] for p in points),
                **{k: sum(p[k] for p in points) for k in ("sessions", "up", "down")},
            }
        )
    return _reply(answers, missing, {"samples": merged})


async def stream(request: web.Request) -> web.StreamResponse:
    """The whole server's stream: every second, the workers' totals summed."""
    workers = request.app[WORKERS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError, asyncio.CancelledError):
        await response.write(b"retry: 2000\n\n")
        while True:
            await asyncio.sleep(1.0)
            answers, _ = await workers.ask(request, "/api/totals")
            merged = summed_totals([b for status, b in answers.values() if status == 200])
            point = {
                "time": merged["time"],
                "sessions": merged["sessions"],
                "up": merged["rate_up"],
                "down": merged["rate_down"],
            }
            await response.write(f"data: {json.dumps({'traffic': point, 'totals': merged})}\n\n".encode())
    return response


async def rules(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    bodies = [b for _, b in answers.values()]
    merged = None
    for body in bodies:
        hits = body["hits"]
        if hits is None:
            continue
        if merged is None:
            merged = {"since": hits["since"], "rules": [dict(r) for r in hits["rules"]], "unmatched": 0}
        elif [r["rule"] for r in merged["rules"]] != [r["rule"] for r in hits["rules"]]:
            continue  # a worker between two reloads: its rules are not these
        else:
            for total, rule in zip(merged["rules"], hits["rules"], strict=True):
                total["hits"] += rule["hits"]
            merged["since"] = min(merged["since"], hits["since"])
        merged["unmatched"] += hits["unmatched"]
    return _reply(answers, missing, {"file": bodies[0]["file"] if bodies else None, "hits": merged})


async def users(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    merged: dict[str, dict[str, Any]] = {}
    for _, body in answers.values():
        for row in body["users"]:
            total = merged.setdefault(row["user"], dict.fromkeys(row, 0) | {"user": row["user"]})
            for key, value in row.items():
                if key != "user":
                    total[key] += value
    return _reply(answers, missing, {"users": sorted(merged.values(), key=lambda r: r["user"])})


async def events(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    merged = {}
    for key in ("auth_failures", "refusals"):
        rows = [
            dict(r, session=f"{n}:{r['session']}", worker=n) for n, (_, b) in answers.items() for r in b[key]
        ]
        merged[key] = sorted(rows, key=lambda r: r["time"], reverse=True)
    return _reply(answers, missing, merged)


async def ready(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    ok = not missing and all(status == 200 for status, _ in answers.values())
    return web.json_response(
        {"ready": ok, "workers": sorted(answers), "missing_workers": missing}, status=200 if ok else 503
    )


async def reload(request: web.Request) -> web.Response:
    """Every worker validates and (unless a dry run) applies; the diffs are added up."""
    answers, missing = await request.app[WORKERS].ask(request)
    bodies = [b for _, b in answers.values()]
    if not bodies:
        return web.json_response({"error": "no worker answers", "missing_workers": missing}, status=502)
    first = bodies[0]
    diffs = [b["diff"] for b in bodies if b.get("diff")]
    diff = None
    if diffs:
        flips = [f for d in diffs for f in d["flips"]]
        diff = {"replayed": sum(d["replayed"] for d in diffs), "flipped": len(flips), "flips": flips}
    applied = all(b.get("applied") for b in bodies)
    return _reply(answers, missing, first | {"applied": applied, "diff": diff})


async def shadow(request: web.Request) -> web.Response:
    answers, missing = await request.app[WORKERS].ask(request)
    bodies = [b for _, b in answers.values()]
    if request.method != "GET" or not bodies:
        return _reply(answers, missing, bodies[0] if bodies else {})
    reports = [b["report"] for b in bodies if b.get("report")]
    report = None
    if reports:
        report = {key: sum(r[key] for r in reports) for key in ("compared", "disagreed", "undecided")}
        report |= {"file": reports[0]["file"], "since": min(r["since"] for r in reports),
                   "recent": sorted((x for r in reports for x in r["recent"]), key=lambda x: x["time"], reverse=True)}  # fmt: skip
    return _reply(answers, missing, {"shadow": bodies[0]["shadow"], "report": report})


ROUTES = [
    ("GET", "/api/sessions", sessions), ("POST", "/api/sessions/close", close_matching),
    ("POST", "/api/sessions/{id}/close", close_one), ("GET", "/api/udp", listed), ("GET", "/api/bind", listed),
    ("GET", "/api/totals", totals), ("GET", "/api/traffic", traffic), ("GET", "/api/stream", stream),
    ("GET", "/api/rules", rules), ("GET", "/api/users", users), ("GET", "/api/events", events),
    ("GET", "/api/ready", ready), ("POST", "/api/reload", reload),
    ("GET", "/api/shadow", shadow), ("POST", "/api/shadow", shadow), ("DELETE", "/api/shadow", shadow),
]  # fmt: skip
