"""The dashboard in headless Chromium, driven over the DevTools protocol (aiohttp's WebSocket client).

A real server with real sessions (curl through the proxy, logged in), the page loaded from the
admin listener: the test sees its session's row, closes it with the row's button, watches a
rule's hit count go up, and takes a screenshot whose size and pixels must show a drawn page.
``SOCKSFLOW_DASHBOARD_PNG=docs/admin.png`` also writes the screenshot there (the README's).
The page in headless Firefox (Debian's firefox-esr), driven over WebDriver BiDi, Firefox's own
remote agent (no geckodriver): the session's row shows, its close button works, and the
screenshot passes the same checks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import aiohttp
import httpx
import pytest
from helpers import require_tool, write_htpasswd
from test_admin import Curl, access_lines, admin_url, sessions, trickle  # noqa: F401

from socksflow.testing import socks5_handshake, wait_until

PASSWORD = "correct horse"
WIDTH, HEIGHT = 1280, 860


class Page:
    """One browser page over a WebSocket protocol: commands by id, answers matched by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = 0

    async def send(self, method: str, **params: object) -> dict:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=30)).data)
            if message.get("id") == self.ids:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']} {message.get('message', '')}")
                return message["result"]

    async def eval(self, expression: str) -> object:
        raise NotImplementedError

    async def until(self, expression: str, timeout: float = 10.0) -> object:
        """Evaluate ``expression`` until it is truthy (an exception counts as not yet: the page may be loading)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.eval(
                f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
            )
            if value or asyncio.get_running_loop().time() > deadline:
                return value
            await asyncio.sleep(0.1)


class DevTools(Page):
    """One page of a headless Chromium, over the DevTools protocol."""

    async def eval(self, expression: str) -> object:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


class BiDi(Page):
    """One tab of a headless Firefox, over WebDriver BiDi (Firefox's own remote agent, no driver)."""

    context = ""

    async def open(self) -> None:
        await self.send("session.new", capabilities={})
        self.context = (await self.send("browsingContext.getTree"))["contexts"][0]["context"]

    async def eval(self, expression: str) -> object:
        result = await self.send(
            "script.evaluate",
            expression=expression,
            target={"context": self.context},
            awaitPromise=True,
            resultOwnership="none",
        )
        if result["type"] == "exception":
            raise AssertionError(f"{expression}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")  # a number, string or boolean; none for null


def start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Headless Chromium on a DevTools port it picks; the process and the port's HTTP address."""
    chromium = require_tool("chromium")
    process = subprocess.Popen(
        [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in process.stderr:
        match = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if match:
            return process, f"http://{match[1]}"
    process.kill()
    raise AssertionError("chromium printed no DevTools address")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) bytes of an 8-bit PNG (what Chromium's and Firefox's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 3 if color == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, [b"".join(row[i : i + 3] for i in range(0, stride, channels)) for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][x * 3 : x * 3 + 3])  # type: ignore[return-value]


@pytest.fixture
def chromium(tmp_path):
    process, address = start_chromium(tmp_path / "profile")
    yield address
    process.kill()
    process.wait(10)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_the_dashboard_shows_closes_and_counts(socksflow_server, trickle, echo_target, tmp_path, chromium):  # noqa: F811
    write_htpasswd(tmp_path / "users.htpasswd", {"alice": PASSWORD, "bob": PASSWORD})
    host, echo_port = echo_target
    running = socksflow_server(
        "listen: [127.0.0.1:0]\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "auth: {methods: [userpass], users: users.htpasswd}\n"
        "log: {access: {format: json, file: access.log}}\n"
        "rules:\n"
        "  - deny: {to: [special:private]}\n"  # line 6: never matched
        f"  - allow: {{user: [alice], port: [{trickle[1]}]}}\n"  # line 7
        f"  - allow: {{port: [{echo_port}]}}\n"  # line 8
        "  - deny: all\n"
    )  # fmt: skip
    proxy = f"{running.host}:{running.port}"
    curls = [Curl(f"alice:{PASSWORD.replace(' ', '%20')}@{proxy}", trickle) for _ in range(3)]
    try:
        assert wait_until(lambda: len(sessions(running, state="relay")) == 3, 10)
        code, client = socks5_handshake(
            running.address, f"{host}:{echo_port}", username="mallory", password="x"
        )
        client.close()
        assert code == 1  # an auth failure
        victim = sorted(s["id"] for s in sessions(running))[0]
        png = asyncio.run(drive(chromium, admin_url(running), running, victim, host, echo_port))
    finally:
        for curl in curls:
            curl.kill()
    assert wait_until(lambda: any(line["session"] == victim for line in access_lines(tmp_path)), 5)
    closed = next(line for line in access_lines(tmp_path) if line["session"] == victim)
    assert closed["reason"] == "closed by admin" and closed["user"] == "alice"

    (tmp_path / "dashboard.png").write_bytes(png)
    assert_drawn(png)
    if os.environ.get("SOCKSFLOW_DASHBOARD_PNG"):
        Path(os.environ["SOCKSFLOW_DASHBOARD_PNG"]).write_bytes(png)


def assert_drawn(png: bytes) -> None:
    """The screenshot is the page's size and shows the dashboard drawn, not a blank page."""
    width, height, rows = png_pixels(png)
    assert (width, height) == (WIDTH, HEIGHT)
    assert pixel(rows, 5, 5) == (0x1D, 0x23, 0x2B)  # the header bar
    assert pixel(rows, 3, height - 3) == (0xF6, 0xF7, 0xF9)  # the page background
    colors = {pixel(rows, x, y) for y in range(0, height, 7) for x in range(0, width, 7)}
    assert len(colors) > 40, "the page looks blank"


async def drive(devtools: str, url: str, running, victim: str, host: str, echo_port: int) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{devtools}/json/new?about:blank") as response:
            target = await response.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
            page = DevTools(ws)
            await page.send("Page.enable")
            await page.send(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.send("Page.navigate", url=url + "/")
            row = f"document.querySelector('#sessions tr[data-id=\"{victim}\"]')"
            assert await page.until(f"{row} !== null"), "the session's row never appeared"
            assert await page.eval(f"{row}.cells[2].textContent") == "alice"
            assert await page.until("document.querySelectorAll('#sessions tbody tr').length === 3")
            assert await page.until("document.getElementById('status').textContent === 'live'")
            assert await page.until("document.querySelector('#users tbody tr') !== null")
            assert await page.until("document.querySelector('#auth-failures tbody tr') !== null")

            hits = "Number(document.querySelector('#rules tr[data-rule$=\":8\"]').cells[2].textContent)"
            assert (
                await page.until(f"document.querySelector('#rules tr[data-rule$=\":8\"]') && {hits} + 1") == 1
            )
            await page.eval(f"{row}.querySelector('button.close').click()")
            assert await page.until(f"{row} === null"), "the closed session's row stayed"
            assert await page.until("document.querySelectorAll('#sessions tbody tr').length === 2")

            await asyncio.to_thread(login_and_connect, running.address, f"{host}:{echo_port}")
            assert await page.until(f"{hits} === 1"), "the rule's hit count did not go up"
            assert (
                await page.eval("document.querySelector('#rules tr[data-rule$=\":6\"]').className") == "never"
            )
            # Two more traffic samples (for the README's picture, half a minute of them).
            history = 30 if os.environ.get("SOCKSFLOW_DASHBOARD_PNG") else 2.5
            await page.until("false", timeout=history)
            shot = await page.send("Page.captureScreenshot", format="png")
            return base64.b64decode(shot["data"])


def login_and_connect(proxy, destination: str) -> None:
    code, client = socks5_handshake(proxy, destination, username="bob", password=PASSWORD)
    client.close()
    assert code == 0


# Firefox's remote agent resolves no names and fetches nothing: the test must not reach the
# machine's resolver, nor Mozilla's services (the machine may be offline).
FIREFOX_PREFS = {
    "network.dns.disabled": True,
    "app.update.disabledForTesting": True,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "ui.prefersReducedMotion": 1,
}


@pytest.fixture
def firefox(tmp_path):
    """Headless Firefox (Debian's firefox-esr) with a fresh profile; its WebDriver BiDi address."""
    binary = require_tool("firefox-esr")
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    (profile / "user.js").write_text(
        "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in FIREFOX_PREFS.items())
    )
    with open(tmp_path / "firefox.log", "wb") as log:
        process = subprocess.Popen(
            [binary, "--headless", "--no-remote", "--profile", str(profile),
             "--remote-debugging-port=0", "--remote-allow-hosts=127.0.0.1", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        server = profile / "WebDriverBiDiServer.json"
        assert wait_until(server.exists, 30), (tmp_path / "firefox.log").read_text(errors="replace")
        assert wait_until(lambda: server.read_text().strip().endswith("}"), 5)
        yield "ws://127.0.0.1:{ws_port}/session".format(**json.loads(server.read_text()))
    finally:
        process.terminate()  # Firefox ends its content processes on the way out
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # its process group: the session it started
            process.wait(10)


def test_the_dashboard_in_firefox(socksflow_server, trickle, firefox, tmp_path):  # noqa: F811
    running = socksflow_server(
        "listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0}\nrules:\n  - allow: all\n"
    )
    curl = Curl(f"{running.host}:{running.port}", trickle)
    try:
        assert wait_until(lambda: len(sessions(running, state="relay")) == 1, 10)
        [session] = sessions(running)
        png = asyncio.run(asyncio.wait_for(browse_in_firefox(firefox, admin_url(running), session), 90))
        assert wait_until(lambda: sessions(running) == [], 5), "closing from Firefox left the session open"
    finally:
        curl.kill()
    (tmp_path / "dashboard-firefox.png").write_bytes(png)
    assert_drawn(png)


async def browse_in_firefox(bidi: str, url: str, session: dict) -> bytes:
    async with aiohttp.ClientSession() as http, http.ws_connect(bidi, max_msg_size=64 << 20) as ws:
        page = BiDi(ws)
        await page.open()
        await page.send(
            "browsingContext.setViewport",
            context=page.context,
            viewport={"width": WIDTH, "height": HEIGHT},
            devicePixelRatio=1,
        )
        await page.send("browsingContext.navigate", context=page.context, url=url + "/", wait="complete")
        row = f"document.querySelector('#sessions tr[data-id=\"{session['id']}\"]')"
        assert await page.until(f"{row} !== null"), "the session's row never appeared"
        assert await page.eval(f"{row}.cells[1].textContent") == session["client"]
        assert await page.until("document.getElementById('status').textContent === 'live'")
        assert await page.until("document.querySelector('#rules tbody tr') !== null")
        await page.until("false", timeout=2.5)  # two traffic samples in the sparkline
        shot = await page.send("browsingContext.captureScreenshot", context=page.context)
        await page.eval(f"{row}.querySelector('button.close').click()")
        assert await page.until(f"{row} === null"), "the closed session's row stayed"
        return base64.b64decode(shot["data"])


MANY = 5000


@pytest.mark.slow
def test_the_dashboard_stays_responsive_with_5000_sessions(socksflow_server, chromium):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * MANY + 1000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: {MANY} sessions need {2 * MANY + 1000} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * MANY + 1000), hard))
    running = socksflow_server(
        "listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0}\ntimeouts: {handshake: 120s}\n"
    )
    clients = []
    try:
        for _ in range(MANY):  # greeted, no request yet: sessions held in the handshake, cheaply
            sock = socket.create_connection((running.host, running.port), timeout=10)
            sock.sendall(b"\x05\x01\x00")
            clients.append(sock)
        assert wait_until(lambda: len(running.server.sessions) == MANY, 20)
        began = time.monotonic()
        response = httpx.get(admin_url(running) + "/api/sessions?limit=100", timeout=10)
        api_seconds = time.monotonic() - began
        assert response.json()["total"] == MANY and len(response.json()["sessions"]) == 100
        assert api_seconds < 1.0, f"one page of {MANY} sessions took {api_seconds:.2f}s"
        timings = asyncio.run(browse_many(chromium, admin_url(running), clients[1234].getsockname()[1]))
        print(f"\n{MANY} sessions: API page {api_seconds * 1000:.0f} ms, dashboard {timings}")
        assert timings["refresh_ms"] < 2000, timings
    finally:
        for sock in clients:
            sock.close()


async def browse_many(devtools: str, url: str, client_port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{devtools}/json/new?about:blank") as response:
            target = await response.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
            page = DevTools(ws)
            await page.send("Page.navigate", url=url + "/")
            assert await page.until(f"document.getElementById('page').textContent === '1–100 of {MANY}'", 20)
            assert await page.eval("document.querySelectorAll('#sessions tbody tr').length") == 100
            refresh_ms = await page.eval(
                "(async () => { const t = performance.now(); await Promise.all([refreshSessions(), refreshRules(), refreshUsers(), refreshEvents()]); return performance.now() - t; })()"
            )
            await page.eval("document.getElementById('next').click()")
            assert await page.until(f"document.getElementById('page').textContent === '101–200 of {MANY}'")
            await page.eval(
                "(() => { const input = document.querySelector('#filters input[name=client]');"
                f" input.value = ':{client_port}'; input.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
            )
            assert await page.until("document.getElementById('page').textContent === '1–1 of 1'")
            row = await page.eval("document.querySelector('#sessions tbody tr').cells[1].textContent")
            assert row == f"127.0.0.1:{client_port}"
            return {"refresh_ms": round(refresh_ms)}
