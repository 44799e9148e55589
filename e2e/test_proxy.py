"""The app's own login: a real Flask app (docs/examples/flask_proxy.py, served by Werkzeug on a
free port) with its own session-cookie login, used by ferrocast as the connect, subscribe and
publish proxy on every transport (native `/ws`, SSE, python-socketio): the cookie decides who a
connection is, the server subscribes the app's `channels`, `info` reaches the server API, the
app refuses subscribes and rewrites publishes, a `disconnect` answer closes with its code; its
500 and timeout paths are a clear `unavailable` (close 1013) within `proxy.timeout_ms`, never a
hang, counted in /metrics, with a canary client unaffected, even while many Socket.IO and
SSE requests wait on a slow app at once. The FastAPI example
(docs/examples/fastapi_proxy.py) runs under uvicorn and decides by an OAuth bearer header."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import socketio
from werkzeug.serving import make_server

from ferrocast_e2e.procs import ManagedProcess, free_port, http_status

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FlaskApp:
    """The docs' Flask example on a free port, plus routes that fail on purpose."""

    def __init__(self) -> None:
        self.example = load_example("flask_proxy")
        self.app = self.example.create_app("e2e-flask-secret")
        self.calls: list[tuple[str, dict]] = []

        @self.app.before_request
        def record():
            from flask import request

            if request.path.startswith("/realtime/") or request.path.startswith("/broken"):
                self.calls.append((request.path, request.get_json(silent=True) or {}))

        def broken():
            return "database is down", 500

        def slow():
            time.sleep(5)
            return {"result": {"user": "late"}}

        self.app.add_url_rule("/broken/500", "broken", broken, methods=["POST"])
        self.app.add_url_rule("/broken/slow", "slow", slow, methods=["POST"])
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def login(self, user: str) -> str:
        """Logs in through the app's own form; returns the Cookie header a browser would send."""
        r = httpx.post(f"{self.url}/login", data={"user": user})
        assert r.status_code == 200, r.text
        return f"session={r.cookies['session']}"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def flask_app():
    app = FlaskApp()
    yield app
    app.stop()


def proxy_sets(app: FlaskApp, connect="/realtime/connect", subscribe="/realtime/subscribe",
               publish="/realtime/publish", timeout_ms=1000) -> tuple[str, ...]:
    return (
        f"proxy.connect_url={app.url}{connect}",
        f"proxy.subscribe_url={app.url}{subscribe}",
        f"proxy.publish_url={app.url}{publish}",
        f"proxy.timeout_ms={timeout_ms}",
        "namespaces.payments.subscribe=proxy",
        "namespaces.payments.snapshot=latest",
        "namespaces.chat.publish=proxy",
        "auth.expiry_grace_ms=300",
        "auth.leeway_ms=0",
    )


class Canary:
    """A connection of a logged-in user that must keep receiving whatever others do."""

    def __init__(self, server, client) -> None:
        self.server, self.client, self.n = server, client, 0

    async def check(self) -> None:
        self.n += 1
        await self.server.apublish("news.canary", {"n": self.n})
        msg = await self.client.next_msg("news.canary")
        assert msg["data"] == {"n": self.n}


async def canary(server, ws, cookie: str) -> Canary:
    c = await ws(server, additional_headers={"Cookie": cookie})
    await c.recv_type("subscribed")
    await c.subscribe_ok("news.canary")
    return Canary(server, c)


async def sse_events(http: httpx.AsyncClient, url: str, count: int, **kwargs) -> tuple[int, list[dict]]:
    events: list[dict] = []
    async with http.stream("GET", url, **kwargs) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.json()]
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == count or events[-1].get("type") == "close":
                    break
    return 200, events


# ------------------------------------------------------------------------------------------
# The session cookie decides, on every transport


async def test_flask_session_cookie_decides_on_every_transport(start_server, ws, flask_app):
    server = start_server(*proxy_sets(flask_app))
    cookie = flask_app.login("42")

    # Native: the app's answer is the identity; its `channels` are subscribed at once.
    c = await ws(server, additional_headers={"Cookie": cookie})
    notice = await c.recv_type("subscribed")
    assert notice["channel"] == "notices.inbox#42" and "epoch" in notice["result"], notice
    published = await server.apublish("notices.inbox#42", {"hello": "Ada"})
    msg = await c.next_msg("notices.inbox#42")
    assert msg["data"] == {"hello": "Ada"} and msg["offset"] == published["offset"]
    connect_call = next(body for path, body in flask_app.calls if path == "/realtime/connect")
    assert connect_call["transport"] == "websocket" and connect_call["client"] == "127.0.0.1"
    assert connect_call["headers"]["Cookie"] == cookie

    # Subscribe: the app admits team members only, and says why it refuses.
    result = await c.subscribe("payments.eu", "payments.us")
    assert "error" not in result["payments.eu"], result
    err = result["payments.us"]["error"]
    assert err == {"code": "forbidden", "message": "not a member of team us"}, result
    sub_call = [body for path, body in flask_app.calls if path == "/realtime/subscribe"][-1]
    assert sub_call["user"] == "42" and sub_call["channel"] == "payments.us", sub_call

    # Publish: the app rewrites what is published.
    reply = await c.request({"op": "publish", "channel": "chat.room", "data": {"text": "hi", "admin": True}})
    assert reply["type"] == "ack", reply
    history = server.get("/api/channels/chat.room/history").json()
    assert history["messages"][-1]["data"] == {"text": "hi", "by": "Ada"}, history
    reply = await c.request({"op": "publish", "channel": "chat.room", "data": 5})
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply

    # The server API sees the user and the app's `info`.
    listed = server.get("/api/users/42/connections").json()
    assert [conn["info"] for conn in listed["connections"]] == [{"name": "Ada"}], listed

    # SSE: the cookie, the same answers.
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        status, events = await asyncio.wait_for(
            sse_events(http, "/sse?channels=payments.eu,payments.us", 3, headers={"Cookie": cookie}), 10
        )
        assert status == 200, events
        welcome, ack, notice = events
        assert "error" not in ack["result"]["payments.eu"], ack
        assert ack["result"]["payments.us"]["error"]["code"] == "forbidden", ack
        assert notice["type"] == "subscribed" and notice["channel"] == "notices.inbox#42", notice
        # Without the cookie the app says "log in first": 401, which EventSource does not retry.
        status, (body,) = await sse_events(http, "/sse?channels=news.x", 1)
        assert status == 401 and body == {"error": "unauthorized", "message": "log in first"}, body

    # Socket.IO: the handshake's cookie reaches the app; a refusal is a CONNECT_ERROR.
    sio = socketio.AsyncClient(reconnection=False)
    notices: asyncio.Queue = asyncio.Queue()
    sio.on("subscribed", notices.put_nowait)
    await sio.connect(server.base_url, headers={"Cookie": cookie}, transports=["websocket"], wait_timeout=5)
    try:
        notice = await asyncio.wait_for(notices.get(), 5)
        assert notice["channel"] == "notices.inbox#42", notice
        result = await sio.call("subscribe", {"channels": ["payments.eu", "payments.us"]}, timeout=5)
        assert "error" not in result["payments.eu"] and result["payments.us"]["error"]["code"] == "forbidden"
        published = await sio.call("publish", {"channel": "chat.room", "data": {"text": "from sio"}}, timeout=5)
        assert "offset" in published, published
    finally:
        await sio.disconnect()
    anonymous = socketio.AsyncClient(reconnection=False)
    errors: asyncio.Queue = asyncio.Queue()
    anonymous.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await anonymous.connect(server.base_url, transports=["websocket"], wait_timeout=5)
    refusal = await asyncio.wait_for(errors.get(), 5)
    assert refusal["message"] == "unauthorized: log in first (4001)", refusal
    assert server.metric("ferrocast_proxy_requests_total", kind="connect", result="ok") >= 3
    assert server.metric("ferrocast_proxy_requests_total", kind="subscribe", result="error") >= 3


async def test_refusals_disconnects_and_grants_that_run_out(start_server, ws, flask_app, monkeypatch):
    server = start_server(*proxy_sets(flask_app))
    watch = await canary(server, ws, flask_app.login("44"))
    # No cookie: the app's error, then 4001.
    anon = await ws(server)
    closed = await anon.wait_closed()
    assert closed.code == 4001, closed
    assert closed.frames[0] == {"type": "error", "id": None, "code": "unauthorized", "message": "log in first"}
    # A suspended account: the app's disconnect, with its code and reason.
    banned = await ws(server, additional_headers={"Cookie": flask_app.login("666")})
    closed = await banned.wait_closed()
    assert (closed.code, closed.reason) == (4003, "this account is suspended"), closed
    await watch.check()
    assert server.metric("ferrocast_auth_refused_total", reason="proxy_disconnect") == 1

    # A grant that runs out closes with 4011, as an expired token does.
    monkeypatch.setattr(flask_app.example, "GRANT_SECONDS", 1)
    short = await ws(server, additional_headers={"Cookie": flask_app.login("43")})
    await short.recv_type("subscribed")
    closed = await short.wait_closed(timeout=6)
    assert closed.code == 4011, closed
    await watch.check()


# ------------------------------------------------------------------------------------------
# The app's 500 and timeout paths


async def test_app_errors_and_timeouts_are_unavailable_not_hangs(start_server, ws, flask_app):
    # The connect proxy answers 500: every transport is told `unavailable` with close 1013
    # (try again later), so clients retry rather than give up.
    server = start_server(*proxy_sets(flask_app, connect="/broken/500"))
    c = await ws(server, additional_headers={"Cookie": flask_app.login("42")})
    closed = await c.wait_closed()
    assert closed.code == 1013, closed
    err = closed.frames[0]
    assert err["code"] == "unavailable" and "HTTP 500" in err["message"], err
    assert "database is down" not in err["message"], "the app's error page leaked"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        status, events = await sse_events(http, "/sse?channels=news.x", 2)
        assert status == 200 and events[-1]["type"] == "close" and events[-1]["code"] == 1013, events
        assert events[0]["code"] == "unavailable", events
    sio = socketio.AsyncClient(reconnection=False)
    errors: asyncio.Queue = asyncio.Queue()
    sio.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(server.base_url, transports=["websocket"], wait_timeout=5)
    refusal = await asyncio.wait_for(errors.get(), 5)
    assert refusal["message"].startswith("unavailable: the connect proxy answered HTTP 500"), refusal
    assert refusal["message"].endswith("(1013)"), refusal
    assert server.metric("ferrocast_proxy_requests_total", kind="connect", result="unavailable") == 3

    # The app takes 5 s; proxy.timeout_ms is 300: the client hears within the timeout.
    server = start_server(*proxy_sets(flask_app, connect="/broken/slow", timeout_ms=300))
    started = time.monotonic()
    c = await ws(server)
    closed = await c.wait_closed()
    assert time.monotonic() - started < 4, "the connection waited for the app instead of the timeout"
    assert closed.code == 1013 and "within 300 ms" in closed.frames[0]["message"], closed

    # Subscribe and publish proxies failing: the request fails, the connection stays.
    server = start_server(*proxy_sets(flask_app, subscribe="/broken/500", publish="/broken/slow", timeout_ms=300))
    watch = await canary(server, ws, flask_app.login("42"))
    c = await ws(server, additional_headers={"Cookie": flask_app.login("42")})
    await c.recv_type("subscribed")
    result = await c.subscribe("payments.eu")
    assert result["payments.eu"]["error"]["code"] == "unavailable", result
    reply = await c.request({"op": "publish", "channel": "chat.room", "data": {"text": "x"}})
    assert reply["code"] == "unavailable" and "within 300 ms" in reply["message"], reply
    assert (await c.request({"op": "ping"}))["type"] == "pong"
    await watch.check()
    assert server.metric("ferrocast_proxy_requests_total", kind="publish", result="unavailable") == 1


async def test_requests_waiting_on_a_slow_proxy_stall_nothing_else(start_server, ws, flask_app):
    # A Socket.IO event or an SSE control request holds its session while it waits for the
    # publish proxy. Its socket's writer, woken by traffic meanwhile, once blocked on that
    # session with the runtime's only worker: the proxy's answer, its timeout and every other
    # connection then waited forever. One worker makes that certain on any machine.
    server = start_server(
        *proxy_sets(flask_app, publish="/broken/slow", timeout_ms=1500),
        env={"TOKIO_WORKER_THREADS": "1"},
    )
    cookie = flask_app.login("42")
    watch = await canary(server, ws, cookie)
    sockets = []
    for _ in range(4):
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(server.base_url, headers={"Cookie": cookie}, transports=["websocket"], wait_timeout=5)
        sockets.append(sio)
        result = await sio.call("subscribe", {"channels": ["news.busy"]}, timeout=5)
        assert "error" not in result["news.busy"], result
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        async with http.stream("GET", "/sse?channels=news.busy", headers={"Cookie": cookie}) as resp:
            # Held for the stream's life: a line iterator left to the garbage collector is
            # closed, and the stream with it.
            lines = resp.aiter_lines()
            welcome = None
            async for line in lines:
                if line.startswith("data:"):
                    welcome = json.loads(line[5:])
                    break
            assert welcome["type"] == "welcome", welcome
            control = http.post(
                "/sse/control",
                json={"session": welcome["session"], "op": "publish", "id": 1,
                      "channel": "chat.room", "data": {"text": "sse"}},
                headers={"X-Ferrocast-Stream-Token": welcome["token"]},
            )
            started = time.monotonic()
            pending = [
                asyncio.ensure_future(sio.call("publish", {"channel": "chat.room", "data": {"text": "x"}}, timeout=10))
                for sio in sockets
            ] + [asyncio.ensure_future(control)]
            # While they wait for the app, traffic wakes their writers; the canary hears on.
            while time.monotonic() - started < 1.2:
                await server.apublish("news.busy", {"t": time.monotonic()})
                await asyncio.wait_for(watch.check(), 2)
                await asyncio.sleep(0.1)
            replies = await asyncio.wait_for(asyncio.gather(*pending), 8)
            elapsed = time.monotonic() - started
    for reply in replies[:-1]:
        assert reply["error"]["code"] == "unavailable", reply
        assert "within 1500 ms" in reply["error"]["message"], reply
    sse_reply = replies[-1].json()
    assert sse_reply["type"] == "error" and sse_reply["code"] == "unavailable", sse_reply
    assert elapsed < 5, f"the proxy's timeout took {elapsed:.1f} s to answer"
    await watch.check()
    for sio in sockets:
        await sio.disconnect()
    assert server.metric("ferrocast_proxy_requests_total", kind="publish", result="unavailable") == 5


# ------------------------------------------------------------------------------------------
# The FastAPI example: an OAuth bearer header


async def test_fastapi_example_decides_by_the_bearer_header(start_server, ws, artifacts, track_process):
    port = free_port()
    uvicorn = ManagedProcess(
        "uvicorn",
        [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_proxy:app",
         "--host", "127.0.0.1", "--port", str(port)],
        artifacts / "uvicorn.log",
    ).start()
    track_process(uvicorn)
    uvicorn.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/docs") == 200, 20, "uvicorn")
    base = f"http://127.0.0.1:{port}"
    server = start_server(
        f"proxy.connect_url={base}/realtime/connect",
        f"proxy.subscribe_url={base}/realtime/subscribe",
        "namespaces.orders.subscribe=proxy",
    )
    c = await ws(server, additional_headers={"Authorization": "Bearer alice-token"})
    result = await c.subscribe("orders.1001", "orders.2002")
    assert "error" not in result["orders.1001"], result
    assert result["orders.2002"]["error"] == {"code": "forbidden", "message": "not your order"}
    listed = server.get("/api/users/alice/connections").json()
    assert listed["connections"][0]["info"] == {"via": "websocket"}, listed
    nobody = await ws(server, additional_headers={"Authorization": "Bearer stolen"})
    closed = await nobody.wait_closed()
    assert closed.code == 4001 and "access token" in closed.frames[0]["message"], closed
