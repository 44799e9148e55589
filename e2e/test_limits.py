"""Limits against abuse (`[limits]`) over real sockets, with Python clients we did not write
(websockets, http.client, python-socketio, PyJWT for tokens):

- `connections_per_ip` counts WebSockets, SSE streams and Socket.IO sockets of one address
  together; beyond it: WebSocket close 1013 with a JSON reconnect hint naming the limit, SSE
  429 with Retry-After, Socket.IO connect_error ending in (1013);
- `new_connections_per_ip_per_s` is a token bucket, answered the same way with the delay until
  the next token;
- behind a trusted proxy the address is the forwarded client's; from an untrusted peer the
  forwarded header is ignored; the per-address table forgets idle addresses;
- `connections_per_user` counts the users of accepted tokens (at connect or by `auth`);
- `commands_per_s` / `commands_burst`: a flooding client gets `rate_limited` errors, then,
  if it keeps going, close 4029, on every transport (native, SSE control, Socket.IO), while
  a canary subscriber notices nothing; a client within the rate is never refused.

Every refusal is counted in /metrics and logged with the connection id.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections import Counter

import jwt
import pytest
import socketio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ferrocast_e2e.canary import INTERVAL as CANARY_INTERVAL
from ferrocast_e2e.server import http_request
from ferrocast_e2e.wsclient import CONNECT_DEFAULTS

#: How long each flood lasts (the attacker reconnects whenever it is closed).
FLOOD_SECONDS = float(os.environ.get("FERROCAST_FLOOD_SECONDS", "6"))
SECRET = "e2e-limits-secret-0123456789abcdef0123456789"


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def ws_outcome(
    url: str, headers: dict | None = None, settle: float = 0.0
) -> tuple[str, object]:
    """Opens a WebSocket: ("welcome", the connection) or ("closed", (code, reason, frames)).
    With `settle`, a welcome counts only if the connection stays open that long after it
    (a token presented with the upgrade is checked after the welcome)."""
    ws = await connect(url, additional_headers=headers or {}, **CONNECT_DEFAULTS)
    frames = []
    try:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame["type"] == "welcome":
                try:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), settle)))
                except asyncio.TimeoutError:
                    return "welcome", ws
                continue
            frames.append(frame)
    except ConnectionClosed:
        rcvd = ws.close_code, ws.close_reason
        return "closed", (*rcvd, frames)


async def welcomed(url: str, headers: dict | None = None):
    kind, value = await ws_outcome(url, headers)
    assert kind == "welcome", value
    return value


async def refused_1013(url: str, limit: str, headers: dict | None = None) -> dict:
    """Asserts the WebSocket is closed with 1013 and a JSON hint naming `limit`."""
    kind, value = await ws_outcome(url, headers)
    assert kind == "closed", "admitted beyond the limit"
    code, reason, _ = value
    assert code == 1013, value
    hint = json.loads(reason)
    assert hint["reconnect"] is True and hint["limit"] == f"limits.{limit}", hint
    assert hint["after_ms"] >= 1, hint
    return hint


def sse_status(server, headers: dict | None = None) -> tuple[int, dict, socket.socket | None]:
    """Opens an SSE stream; returns the status, the headers and, if it is open, the socket
    holding it (the caller closes it)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(
        f"GET /sse?channels=chat.lim HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    if status != 200:
        sock.close()
        return status, hdrs, None
    return status, hdrs, sock


async def sio_refusal(server, auth: dict | None = None) -> str:
    """Connects python-socketio; asserts it is refused; returns the connect_error message."""
    sio = socketio.AsyncClient(reconnection=False)
    errors: asyncio.Queue = asyncio.Queue()
    sio.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(server.base_url, auth=auth, transports=["websocket"], wait_timeout=5)
    return (await asyncio.wait_for(errors.get(), 5))["message"]


async def sio_connected(server, auth: dict | None = None) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.base_url, auth=auth, transports=["websocket"], wait_timeout=5)
    return sio


async def until(check, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --- per address ---------------------------------------------------------------------------


async def test_connections_per_ip_counts_every_transport(start_server):
    server = start_server("limits.connections_per_ip=3")
    url = server.ws_url()
    a = await welcomed(url)
    status, _, stream = await asyncio.to_thread(sse_status, server)
    assert status == 200
    sio = await sio_connected(server)
    # The address holds three: a WebSocket, an SSE stream and a Socket.IO socket.
    hint = await refused_1013(url, "connections_per_ip")
    assert hint["after_ms"] >= 1000, hint  # server.reconnect_after_ms, jittered up to twice
    status, headers, _ = await asyncio.to_thread(sse_status, server)
    assert status == 429 and int(headers["retry-after"]) >= 1, (status, headers)
    message = await sio_refusal(server)
    assert "limits.connections_per_ip" in message and message.endswith("(1013)"), message
    # Plain HTTP is not a client connection: the API still answers this address.
    assert (await server.aget("/api/stats")).status == 200

    # Leaving frees a place (noticed when the server sees the close).
    await a.close()

    async def admitted():
        kind, value = await ws_outcome(url)
        if kind == "welcome":
            await value.close()
            return True
        return False

    await until(admitted, what="a place freed by the closed WebSocket")
    stream.close()
    await sio.disconnect()
    refused = await server.ametric("ferrocast_limits_refused_total", limit="connections_per_ip")
    assert refused is not None and refused >= 3, refused
    log = server.log()
    assert 'limit="connections_per_ip"' in log and "refusing websocket" in log
    line = next(l for l in log.splitlines() if "refusing websocket" in l)
    assert "conn=" in line, line


async def test_new_connections_per_ip_follow_a_token_bucket(start_server):
    # One token every five seconds: the second connection inside that is refused, whatever
    # the machine's load.
    server = start_server("limits.new_connections_per_ip_per_s=0.2")
    url = server.ws_url()
    first = await welcomed(url)
    await first.close()
    hint = await refused_1013(url, "new_connections_per_ip_per_s")
    assert 1 <= hint["after_ms"] <= 10_000, hint
    status, headers, _ = await asyncio.to_thread(sse_status, server)
    assert status == 429, status
    assert 1 <= int(headers["retry-after"]) <= 10, headers
    message = await sio_refusal(server)
    assert "limits.new_connections_per_ip_per_s" in message, message
    # Another (forwarded, through the trusted loopback proxy) address has its own bucket.
    other = await welcomed(url, {"X-Forwarded-For": "198.51.100.20"})
    await other.close()
    refused = await server.ametric(
        "ferrocast_limits_refused_total", limit="new_connections_per_ip_per_s"
    )
    assert refused is not None and refused >= 3, refused


async def test_forwarded_addresses_count_only_from_trusted_proxies(start_server):
    server = start_server("limits.connections_per_ip=1")
    url = server.ws_url()
    # From loopback (trusted by default), X-Forwarded-For names the client.
    a = await welcomed(url, {"X-Forwarded-For": "203.0.113.1"})
    b = await welcomed(url, {"X-Forwarded-For": "198.51.100.1, 203.0.113.2"})
    await refused_1013(url, "connections_per_ip", {"X-Forwarded-For": "203.0.113.1"})
    # IPv6 clients are counted per /64.
    c = await welcomed(url, {"X-Forwarded-For": "2001:db8:1:2::1"})
    await refused_1013(url, "connections_per_ip", {"X-Forwarded-For": "2001:db8:1:2::99"})
    for ws in (a, b, c):
        await ws.close()

    # Trusting no proxy, the header is the client's own claim and is ignored.
    server = start_server("limits.connections_per_ip=1", "limits.trusted_proxies=[]")
    url = server.ws_url()
    a = await welcomed(url, {"X-Forwarded-For": "203.0.113.1"})
    await refused_1013(url, "connections_per_ip", {"X-Forwarded-For": "203.0.113.2"})
    await a.close()


def open_and_close_streams(port: int, count: int) -> None:
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                f"GET /sse HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.{i // 256}.{i % 256}"
                "\r\n\r\n".encode()
            )
            assert s.recv(64).startswith(b"HTTP/1.1 200"), i


async def test_idle_addresses_are_forgotten(start_server):
    """Memory stays bounded: every address seen is tracked only while it holds a connection
    or its bucket refills (here a second), then swept."""
    server = start_server("limits.new_connections_per_ip_per_s=5")
    await asyncio.to_thread(open_and_close_streams, server.port, 300)
    tracked = await server.ametric("ferrocast_limits_tracked_addresses")
    assert tracked is not None and tracked >= 250, tracked

    async def forgotten():
        return await server.ametric("ferrocast_limits_tracked_addresses") == 0

    await until(forgotten, timeout=15, what="the address table to empty")


# --- per user ------------------------------------------------------------------------------


async def test_connections_per_user(start_server):
    server = start_server(f"auth.hmac_secret={SECRET}", "limits.connections_per_user=1")
    url = server.ws_url()
    first = await welcomed(f"{url}?token={token('42')}")
    # A second connection of user 42: the token is refused, then close 1013.
    kind, value = await ws_outcome(f"{url}?token={token('42')}", settle=2)
    assert kind == "closed", value
    code, _, frames = value
    assert code == 1013, value
    assert frames[0]["code"] == "limit_exceeded", frames
    assert "limits.connections_per_user" in frames[0]["message"], frames
    # By an `auth` op: refused, and the connection stays, anonymous.
    anon = await welcomed(url)
    await anon.send(json.dumps({"op": "auth", "id": 1, "token": token("42")}))
    reply = json.loads(await asyncio.wait_for(anon.recv(), 5))
    assert (reply["type"], reply["code"]) == ("error", "limit_exceeded"), reply
    await anon.send(json.dumps({"op": "ping", "id": 2}))
    assert json.loads(await asyncio.wait_for(anon.recv(), 5))["type"] == "pong"
    # SSE and Socket.IO.
    r = await asyncio.to_thread(
        http_request, f"{server.base_url}/sse?token={token('42')}", "GET", None, None, 5
    )
    assert r.status == 429 and r.json()["error"] == "limit_exceeded", (r.status, r.text)
    message = await sio_refusal(server, {"token": token("42")})
    assert message.startswith("limit_exceeded") and message.endswith("(1013)"), message
    # Another user is not affected; user 42 may connect again once the first has left.
    other = await welcomed(f"{url}?token={token('43')}")
    await first.close()

    async def admitted():
        kind, value = await ws_outcome(f"{url}?token={token('42')}", settle=0.3)
        if kind == "welcome":
            await value.close()
            return True
        return False

    await until(admitted, what="user 42's place freed")
    await other.close()
    await anon.close()
    refused = await server.ametric("ferrocast_limits_refused_total", limit="connections_per_user")
    assert refused is not None and refused >= 4, refused

    async def no_users():
        return await server.ametric("ferrocast_limits_tracked_users") == 0

    await until(no_users, what="every user's count released")


# --- requests per connection ---------------------------------------------------------------


class Flood:
    """What a flooding client saw across its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.closes: Counter = Counter()
        self.errors: Counter = Counter()
        self.allowed = 0
        self.messages: list[str] = []

    def error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        if len(self.messages) < 3:
            self.messages.append(message)


def in_thread(coro_fn, *args) -> threading.Thread:
    """Runs an attacker in a thread with its own event loop, apart from the canary's."""
    t = threading.Thread(target=lambda: asyncio.run(coro_fn(*args)), daemon=True)
    t.start()
    return t


async def flood_native(url: str, deadline: float, flood: Flood) -> None:
    while time.monotonic() < deadline:
        async with connect(url, **CONNECT_DEFAULTS) as ws:
            flood.connections += 1

            async def read() -> None:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "error":
                        flood.error(frame["code"], frame["message"])
                    elif frame["type"] == "pong":
                        flood.allowed += 1

            reader = asyncio.create_task(read())
            try:
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    await ws.send(f'{{"op":"ping","id":{n}}}')
                    if n % 50 == 0:
                        await asyncio.sleep(0)
            except ConnectionClosed:
                pass
            try:
                await asyncio.wait_for(reader, 5)
            except (ConnectionClosed, asyncio.TimeoutError):
                reader.cancel()
            if ws.close_code is not None:
                flood.closes[ws.close_code] += 1


async def flood_sse_control(server, deadline: float, flood: Flood) -> None:
    import http.client

    while time.monotonic() < deadline:
        stream = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        stream.request("GET", "/sse")
        resp = stream.getresponse()
        welcome = None
        while welcome is None:
            line = resp.fp.readline().decode()
            if line.startswith("data: "):
                welcome = json.loads(line[6:])
        flood.connections += 1
        control = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        auth = {"session": welcome["session"], "token": welcome["token"]}
        n = 0
        ended = False
        while time.monotonic() < deadline and not ended:
            n += 1
            control.request("POST", "/sse/control", json.dumps({**auth, "op": "ping", "id": n}))
            r = control.getresponse()
            body = json.loads(r.read())
            if r.status == 429:
                flood.error(body["code"], body["message"])
            elif r.status == 200:
                flood.allowed += 1
            else:
                ended = True  # 404: the stream has ended
        # The stream's last event says why it ended.
        while ended:
            line = resp.fp.readline().decode()
            if not line:
                break
            if line.startswith("data: ") and '"type":"close"' in line:
                flood.closes[json.loads(line[6:])["code"]] += 1
                ended = False
        stream.close()
        control.close()


async def flood_socketio(server, deadline: float, flood: Flood) -> None:
    while time.monotonic() < deadline:
        sio = socketio.AsyncClient(reconnection=False)
        closed: asyncio.Queue = asyncio.Queue()
        sio.on("close", closed.put_nowait)

        def ack(reply) -> None:
            if isinstance(reply, dict) and "error" in reply:
                flood.error(reply["error"]["code"], reply["error"]["message"])
            else:
                flood.allowed += 1

        await sio.connect(server.base_url, transports=["websocket"], wait_timeout=5)
        flood.connections += 1
        n = 0
        while sio.connected and closed.empty() and time.monotonic() < deadline:
            n += 1
            await sio.emit("ping", n, callback=ack)
            if n % 50 == 0:
                await asyncio.sleep(0.001)
        try:
            event = await asyncio.wait_for(closed.get(), 5)
            flood.closes[event["code"]] += 1
        except asyncio.TimeoutError:
            pass
        await sio.disconnect()


@pytest.mark.parametrize("transport", ["native", "sse", "socketio"])
async def test_a_flood_is_rate_limited_then_closed_with_4029(start_server, canary, transport):
    server = start_server()
    bird = await canary(server)
    await asyncio.sleep(0.5)
    flood = Flood()
    deadline = time.monotonic() + FLOOD_SECONDS
    attacker = {
        "native": lambda: in_thread(flood_native, server.ws_url(), deadline, flood),
        "sse": lambda: in_thread(flood_sse_control, server, deadline, flood),
        "socketio": lambda: in_thread(flood_socketio, server, deadline, flood),
    }[transport]()
    while attacker.is_alive():
        await asyncio.sleep(0.1)
    print("flood figures:", vars(flood))
    await bird.check(min_published=int(FLOOD_SECONDS / CANARY_INTERVAL / 4))
    assert server.alive()
    # Refused with the limit's name, then closed: every connection the attacker opened.
    assert flood.errors["rate_limited"] >= 1, vars(flood)
    assert "limits.commands_per_s" in flood.messages[0], flood.messages
    assert flood.closes[4029] >= 1, vars(flood)
    assert flood.closes[4029] >= flood.connections - 1, vars(flood)
    # What each connection got done stays within one burst plus the rate.
    assert flood.allowed <= flood.connections * 200 + 50 * FLOOD_SECONDS + 50, vars(flood)
    closes = await server.ametric("ferrocast_closes_total", code="4029")
    assert closes is not None and closes >= flood.closes[4029], closes
    assert (await server.ametric("ferrocast_limits_rate_closed_total") or 0) >= flood.closes[4029]
    refused = await server.ametric("ferrocast_limits_refused_total", limit="commands_per_s")
    assert refused is not None and refused >= flood.errors["rate_limited"], refused
    line = next(l for l in server.log().splitlines() if "closing with 4029" in l)
    assert "conn=" in line, line


async def test_a_client_within_the_rate_is_never_refused(start_server, ws):
    server = start_server("limits.commands_per_s=50", "limits.commands_burst=20")
    client = await ws(server)
    # 40 a second for two seconds (bursts of 10 every quarter second): under 50.
    for burst in range(8):
        replies = [await client.request({"op": "ping"}) for _ in range(10)]
        assert all(r["type"] == "pong" for r in replies), replies
        await asyncio.sleep(0.25)
    assert (await server.ametric("ferrocast_limits_refused_total", limit="commands_per_s")) == 0
