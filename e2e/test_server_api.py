"""The server API (a key with the `admin` scope): list a user's connections, subscribe them to a
channel, unsubscribe them, disconnect them with a close code — on every transport (native
`/ws`, SSE, python-socketio), on one node (memory broker) and across two nodes sharing a real
redis-server, where a request made on one node reaches the user's connections on the other.
Another user's connection is never touched."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jwt
import pytest
import socketio

from ferrocast_e2e.redis import RedisServer

SECRET = "server-api-e2e-secret-0123456789abcdef"
ADMIN = "admin-key-0123456789"
SETS = (f"auth.hmac_secret={SECRET}", f'api.keys=[{{name="ops",key="{ADMIN}",scopes=["admin"]}}]')


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def api(server, method: str, path: str, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=10)


async def aapi(server, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return await asyncio.to_thread(api, server, method, path, body)


def publish(server, channel: str, data) -> None:
    r = api(server, "POST", "/api/publish", {"channel": channel, "data": data})
    assert r.status_code == 403, "the admin key has no publish scope"
    r = httpx.post(f"{server.base_url}/api/publish", json={"channel": channel, "data": data},
                   headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10)
    assert r.status_code == 200, r.text


class SseClient:
    """An SSE stream read in the background into a queue of events."""

    def __init__(self, server, url: str) -> None:
        self.events: asyncio.Queue = asyncio.Queue()
        self.http = httpx.AsyncClient(base_url=server.base_url, timeout=None)
        self.task = asyncio.create_task(self._read(url))

    async def _read(self, url: str) -> None:
        async with self.http.stream("GET", url) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    await self.events.put(json.loads(line[5:]))

    async def next(self, kind: str, timeout: float = 5) -> dict:
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event.get("type") == kind:
                return event

    async def close(self) -> None:
        self.task.cancel()
        await self.http.aclose()


class SioClient:
    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue = asyncio.Queue()
        for name in ("subscribed", "unsubscribed", "message", "close"):
            self.sio.on(name, lambda data, name=name: self.events.put_nowait((name, data)))

    async def connect(self, server, sub: str) -> "SioClient":
        await self.sio.connect(server.base_url, auth={"token": token(sub)}, transports=["websocket"], wait_timeout=5)
        return self

    async def next(self, kind: str, timeout: float = 5) -> dict:
        while True:
            name, data = await asyncio.wait_for(self.events.get(), timeout)
            if name == kind:
                return data


async def connect_all(server, ws, sub: str):
    native = await ws(server, additional_headers={"Authorization": f"Bearer {token(sub)}"})
    sse = SseClient(server, f"/sse?token={token(sub)}")
    await sse.next("welcome")
    sio = await SioClient().connect(server, sub)
    return native, sse, sio


async def wait_connections(server, user: str, count: int, nodes: int = 1) -> dict:
    deadline = time.monotonic() + 15
    while True:
        listed = (await aapi(server, "GET", f"/api/users/{user}/connections")).json()
        if len(listed["connections"]) == count and len(listed["nodes"]["answered"]) == nodes:
            return listed
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.2)


async def test_list_subscribe_unsubscribe_disconnect_on_every_transport(start_server, ws):
    server = start_server(*SETS, api_key="publisher-key-0123456789")
    native, sse, sio = await connect_all(server, ws, "42")
    other = await ws(server, additional_headers={"Authorization": f"Bearer {token('43')}"})
    await other.subscribe_ok("news.flash")
    try:
        listed = await wait_connections(server, "42", 3)
        assert sorted(c["transport"] for c in listed["connections"]) == ["socketio", "sse", "ws"], listed
        assert all(c["user"] == "42" and c["node"] for c in listed["connections"]), listed

        r = await aapi(server, "POST", "/api/users/42/subscribe", {"channel": "news.flash"})
        assert r.json()["subscribed"] == 3 and r.json()["nodes"]["missing"] == [], r.text
        notice = await native.recv_type("subscribed")
        assert notice["channel"] == "news.flash" and "epoch" in notice["result"], notice
        assert (await sse.next("subscribed"))["channel"] == "news.flash"
        assert (await sio.next("subscribed"))["channel"] == "news.flash"
        listed = (await aapi(server, "GET", "/api/users/42/connections")).json()
        assert all(c["channels"] == ["news.flash"] for c in listed["connections"]), listed

        await asyncio.to_thread(publish, server, "news.flash", {"n": 1})
        assert (await native.next_msg("news.flash"))["data"] == {"n": 1}
        assert (await sse.next("msg"))["data"] == {"n": 1}
        assert (await sio.next("message"))["data"] == {"n": 1}
        assert (await other.next_msg("news.flash"))["data"] == {"n": 1}

        r = await aapi(server, "POST", "/api/users/42/unsubscribe", {"channel": "news.flash"})
        assert r.json()["unsubscribed"] == 3, r.text
        assert (await native.recv_type("unsubscribed"))["channel"] == "news.flash"
        assert (await sse.next("unsubscribed"))["channel"] == "news.flash"
        assert (await sio.next("unsubscribed"))["channel"] == "news.flash"
        await asyncio.to_thread(publish, server, "news.flash", {"n": 2})
        assert (await other.next_msg("news.flash"))["data"] == {"n": 2}
        await native.expect_silence(0.3)

        r = await aapi(server, "POST", "/api/users/42/disconnect", {"code": 4000, "reason": "session revoked"})
        assert r.json()["disconnected"] == 3, r.text
        closed = await native.wait_closed()
        assert (closed.code, closed.reason) == (4000, "session revoked"), closed
        close = await sse.next("close")
        assert (close["code"], close["reason"]) == (4000, "session revoked"), close
        close = await sio.next("close")
        assert close == {"code": 4000, "reason": "session revoked"}, close
        await wait_connections(server, "42", 0)
        # The other user keeps its connection.
        assert (await other.request({"op": "ping"}))["type"] == "pong"
        assert server.metric("ferrocast_closes_total", code="4000") == 3
        assert server.metric("ferrocast_server_api_requests_total", action="disconnected") == 1
    finally:
        await sse.close()
        await sio.sio.disconnect()

    # Bad requests are refused precisely.
    for path, body, code in [
        ("/api/users/42/disconnect", {"code": 1006}, "bad_request"),
        ("/api/users/42/disconnect", {"reason": "x" * 200}, "bad_request"),
        ("/api/users/42/subscribe", {"channel": "bad name"}, "invalid_channel"),
        ("/api/users/42/subscribe", {"channels": ["a"]}, "bad_request"),
        ("/api/users/42/explode", {}, "not_found"),
    ]:
        r = await aapi(server, "POST", path, body)
        assert r.status_code in (400, 404) and r.json()["error"] == code, (path, body, r.text)


@pytest.fixture
def redis(artifacts, track_process):
    server = RedisServer(artifacts).start()
    track_process(server.process)
    yield server
    server.stop()


async def test_a_request_on_one_node_reaches_the_users_connections_on_every_node(start_server, ws, redis):
    def node():
        return start_server(*SETS, "broker.kind=redis", f"broker.url={redis.url}", "broker.timeout_ms=1000",
                            api_key="publisher-key-0123456789")

    a, b = node(), node()
    on_a = await ws(a, additional_headers={"Authorization": f"Bearer {token('42')}"})
    on_b = await ws(b, additional_headers={"Authorization": f"Bearer {token('42')}"})
    sio_b = await SioClient().connect(b, "42")
    bystander = await ws(b, additional_headers={"Authorization": f"Bearer {token('43')}"})
    try:
        listed = await wait_connections(a, "42", 3, nodes=2)
        assert {c["node"] for c in listed["connections"]} == set(listed["nodes"]["answered"]), listed

        r = await aapi(a, "POST", "/api/users/42/subscribe", {"channel": "news.cluster"})
        assert r.json()["subscribed"] == 3 and len(r.json()["nodes"]["answered"]) == 2, r.text
        for client in (on_a, on_b):
            assert (await client.recv_type("subscribed"))["channel"] == "news.cluster"
        assert (await sio_b.next("subscribed"))["channel"] == "news.cluster"
        # A publish on node B reaches the server-made subscriptions on both nodes.
        await asyncio.to_thread(publish, b, "news.cluster", {"n": 1})
        assert (await on_a.next_msg("news.cluster"))["data"] == {"n": 1}
        assert (await on_b.next_msg("news.cluster"))["data"] == {"n": 1}
        assert (await sio_b.next("message"))["data"] == {"n": 1}

        r = await aapi(b, "POST", "/api/users/42/unsubscribe", {"channel": "news.cluster"})
        assert r.json()["unsubscribed"] == 3, r.text

        r = await aapi(b, "POST", "/api/users/42/disconnect", {})
        assert r.json()["disconnected"] == 3, r.text
        for client in (on_a, on_b):
            closed = await client.wait_closed()
            assert (closed.code, closed.reason) == (4003, "disconnected by the server"), closed
        assert (await sio_b.next("close"))["code"] == 4003
        await wait_connections(a, "42", 0, nodes=2)
        assert (await bystander.request({"op": "ping"}))["type"] == "pong"
    finally:
        await sio_b.sio.disconnect()
