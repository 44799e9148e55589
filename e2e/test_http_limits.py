"""Abuse of plain HTTP connections, each over real sockets against the real binary, with a
well-behaved canary subscriber watching throughout (issue 10, section 4):

- slow requests: bodies trickled a byte a second are answered 408 and closed at
  `server.body_read_timeout_ms`, headers trickled the same way at
  `server.header_read_timeout_ms`, and memory stays bounded;
- every TCP connection counts toward `server.max_connections`: beyond it plain HTTP gets
  `503 overloaded` while health checks answer; at the process's file-descriptor limit the
  reserve descriptor keeps `/healthz` answering, new clients get a clear 503, the log holds
  a few rate-limited warnings, and everything recovers when the flood leaves;
- `api.max_body_bytes` is honoured above axum's 2 MiB default, with a JSON 413;
- `server.max_data_depth` refuses deeply nested `data` on every ingress.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import resource
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import socketio
import websockets

from ferrocast_e2e.canary import rss_bytes
from ferrocast_e2e.server import http_request


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------
# 1. Slow requests

#: Runs in its own process (so its sockets and loop do not slow the canary): opens the given
#: connections, trickles one byte a second on each, and reports when and how each ended.
SLOWLORIS = textwrap.dedent(
    """
    import json, select, socket, sys, time
    port, plan, give_up = int(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
    socks = {}
    start = time.monotonic()
    for kind, head, count in plan:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head.encode())
            s.setblocking(False)
            socks[s] = {"kind": kind, "data": b"", "closed": None}
    opened = time.monotonic() - start
    next_byte = time.monotonic()
    while time.monotonic() - start < give_up:
        open_socks = [s for s, st in socks.items() if st["closed"] is None]
        if not open_socks:
            break
        if time.monotonic() >= next_byte:
            for s in open_socks:
                try:
                    s.send(b"x" if socks[s]["kind"] != "header" else b"X")
                except OSError:
                    pass
            next_byte += 1.0
        readable, _, _ = select.select(open_socks, [], [], 0.1)
        for s in readable:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                socks[s]["data"] += chunk
            else:
                socks[s]["closed"] = time.monotonic() - start
    out = []
    for s, st in socks.items():
        out.append({"kind": st["kind"], "closed": st["closed"],
                    "response": st["data"].decode("latin-1")})
        s.close()
    print(json.dumps({"opened_after": opened, "connections": out}))
    """
)


async def test_slow_bodies_and_headers_are_timed_out(start_server, canary, ws):
    timeout_s = 2.0
    server = start_server(
        f"server.body_read_timeout_ms={int(timeout_s * 1000)}",
        f"server.header_read_timeout_ms={int(timeout_s * 1000)}",
    )
    bird = await canary(server)
    # 200 bodies trickled a byte a second (to the publish API and the SSE control endpoint,
    # whose bodies never complete, so no session is needed), and 20 request heads.
    plan = [
        ["publish", "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
         "Content-Length: 100000\r\n\r\n{", 170],
        ["control", "POST /sse/control HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{", 30],
        ["header", "GET /api/stats HTTP/1.1\r\n", 20],
    ]
    rss_before = rss_bytes(server.process.pid) // 1024
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOWLORIS, str(server.port), json.dumps(plan), "20",
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(timeout_s / 2)
    rss_during = rss_bytes(server.process.pid) // 1024
    out, _ = await asyncio.wait_for(flood.communicate(), 30)
    report = json.loads(out)
    conns = report["connections"]
    assert len(conns) == 220
    slack = 3.0
    for c in conns:
        assert c["closed"] is not None, f"a {c['kind']} connection was never closed"
        # Each connection's clock started when it was opened, at most `opened_after` in.
        assert c["closed"] < report["opened_after"] + timeout_s + slack, c
        assert c["closed"] > timeout_s * 0.9, f"closed before the timeout: {c}"
    by_kind = {k: [c for c in conns if c["kind"] == k] for k, _, _ in plan}
    for c in by_kind["publish"] + by_kind["control"]:
        head, _, body = c["response"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408"), c
        assert "connection: close" in head.lower(), c
        reply = json.loads(body)
        code = reply["error"] if c["kind"] == "publish" else reply["code"]
        assert code == "request_timeout", reply
        assert "server.body_read_timeout_ms" in reply["message"], reply
    # A client trickling its headers gets no answer, only the close.
    assert all(not c["response"].startswith("HTTP/1.1 2") for c in by_kind["header"])
    # The flood held a few MiB while it lasted, not the 100 kB each publish declared (17 MB).
    assert rss_during - rss_before < 12 * 1024, (rss_before, rss_during)
    assert await server.ametric("ferrocast_http_timeouts_total", phase="body") == 200
    assert await server.ametric("ferrocast_http_timeouts_total", phase="header") >= 20
    log = server.log()
    assert log.count("request body still incomplete") == 200
    assert re.search(r"request body still incomplete.*peer=127\.0\.0\.1:\d+", log), log[-2000:]
    # Nothing was published by the flood, and the server still serves.
    channels = server.get("/api/channels").json()["channels"]
    assert [c["channel"] if isinstance(c, dict) else c for c in channels] == [bird.CHANNEL]
    await bird.check()


async def test_idle_keepalive_connections_are_closed(start_server, canary):
    server = start_server("server.header_read_timeout_ms=1500")
    bird = await canary(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read()
    assert resp.getheader("connection", "").lower() != "close"
    sock = conn.sock
    started = time.monotonic()
    sock.settimeout(10)
    assert await asyncio.to_thread(sock.recv, 1) == b"", "the server sent bytes on an idle connection"
    waited = time.monotonic() - started
    assert 1.2 < waited < 5, waited
    conn.close()
    await bird.check()


# ------------------------------------------------------------------------------------------
# 2. Every connection counts


async def test_plain_http_connections_count_toward_max_connections(start_server, canary, ws):
    max_conns, headroom = 20, 64
    server = start_server(f"server.max_connections={max_conns}")
    bird = await canary(server)  # 2 connections: the canary and its publisher
    # A Socket.IO websocket keeps counting after its upgrade, like the canary's WebSocket.
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.base_url, transports=["websocket"], wait_timeout=5)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(max_conns - 3)]

    async def wait_open(count: int) -> None:
        deadline = time.monotonic() + 5
        while True:
            # The metrics request's own connection is counted too.
            now = await server.ametric("ferrocast_http_connections")
            if now == count + 1:
                return
            assert time.monotonic() < deadline, f"{now} connections open, expected {count}"
            await asyncio.sleep(0.05)

    await wait_open(max_conns)
    # At the limit: a new WebSocket client is refused with 1013; plain HTTP still works
    # (it has headroom).
    refused = await ws(server, welcome=False)
    assert (await refused.wait_closed(timeout=10)).code == 1013
    assert server.get("/api/channels").status == 200
    # Fill the headroom: plain HTTP is answered 503 overloaded, health checks still 200.
    idle += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(headroom + 5)]
    await wait_open(max_conns + headroom + 5)
    r = server.get("/api/channels")
    assert r.status == 503, r.text
    assert r.json()["error"] == "overloaded" and "server.max_connections" in r.json()["message"]
    assert r.headers["retry-after"] == "1"
    for path in ("/healthz", "/readyz"):
        assert server.get(path, timeout=2).status == 200
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        await websockets.connect(server.ws_url(), open_timeout=5)
    assert e.value.response.status_code == 503
    assert await server.ametric("ferrocast_http_overloaded_total", reason="max_connections") >= 2
    # The flood leaves: everyone gets in again.
    for s in idle:
        s.close()
    await wait_open(3)
    await sio.disconnect()
    await wait_open(2)
    again = await ws(server)
    assert again.welcome["type"] == "welcome"
    assert server.get("/api/channels").status == 200
    warnings = server.log().count("connection limit reached")
    assert 1 <= warnings <= 3, warnings
    await bird.check()


async def test_at_the_fd_limit_health_answers_and_clients_get_a_clear_refusal(
    start_server, canary
):
    fd_limit = 300
    server = start_server("server.max_connections=100000")
    resource.prlimit(server.process.pid, resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
    bird = await canary(server)
    flood: list = []
    refusal = None
    started = time.monotonic()
    for _ in range(fd_limit + 50):
        try:
            flood.append(await websockets.connect(server.ws_url(), open_timeout=5))
        except websockets.exceptions.InvalidStatus as e:
            refusal = e.response
            break
    assert refusal is not None, f"{len(flood)} clients connected under a limit of {fd_limit}"
    assert refusal.status_code == 503, refusal
    assert json.loads(refusal.body)["error"] == "overloaded"
    assert refusal.headers["Retry-After"] == "1"
    assert fd_limit - 60 < len(flood) < fd_limit, len(flood)
    # Still at the limit: health checks answer promptly; new clients are refused clearly.
    for _ in range(5):
        r = await asyncio.to_thread(http_request, server.base_url + "/healthz", timeout=2)
        assert r.status == 200, r.text
        assert r.json() == {"status": "ok"}
    r = await asyncio.to_thread(http_request, server.base_url + "/api/channels", timeout=2)
    assert r.status == 503 and r.json()["error"] == "overloaded", r.text
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await websockets.connect(server.ws_url(), open_timeout=5)
    # The clients that got in are served.
    assert json.loads(await asyncio.wait_for(flood[0].recv(), 5))["type"] == "welcome"
    elapsed = time.monotonic() - started
    await asyncio.gather(*(c.close() for c in flood))
    # Everything recovers.
    deadline = time.monotonic() + 10
    while (await asyncio.to_thread(server.get, "/api/channels")).status != 200:
        assert time.monotonic() < deadline, "the server did not recover"
        await asyncio.sleep(0.1)
    async with websockets.connect(server.ws_url(), open_timeout=5) as again:
        assert json.loads(await asyncio.wait_for(again.recv(), 5))["type"] == "welcome"
    log = server.log()
    warnings = log.count("accept failed")
    # One warning per 5 s at most (the first one at once).
    assert 1 <= warnings <= 2 + int(elapsed / 5), (warnings, elapsed)
    assert "out of file descriptors" in log
    assert await server.ametric("ferrocast_accept_errors_total") >= 1
    assert await server.ametric("ferrocast_http_overloaded_total", reason="fd_limit") >= 2
    await bird.check()


# ------------------------------------------------------------------------------------------
# 3. api.max_body_bytes


def publish_body(size: int) -> bytes:
    """A publish request body of exactly `size` bytes."""
    head, tail = b'{"channel":"chat.big","data":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("limit", [None, 4 * 1024 * 1024, 8 * 1024 * 1024], ids=["default", "4MiB", "8MiB"])
async def test_max_body_bytes_is_honoured(start_server, canary, limit):
    sets = () if limit is None else (f"api.max_body_bytes={limit}",)
    server = start_server(*sets)
    bird = await canary(server)
    limit = limit or 4 * 1024 * 1024
    ok = await asyncio.to_thread(server.post_publish, publish_body(limit))
    assert ok.status == 200, ok.text[:300]
    assert ok.json()["results"][0]["channel"] == "chat.big"
    too_big = await asyncio.to_thread(server.post_publish, publish_body(limit + 1))
    assert too_big.status == 413, too_big.text[:300]
    reply = too_big.json()
    assert reply["error"] == "payload_too_large"
    assert f"limit is {limit} bytes (api.max_body_bytes)" in reply["message"], reply

    # Without a Content-Length (chunked), the limit applies while reading.
    def chunked(size: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        body = publish_body(size)
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        try:
            conn.request("POST", "/api/publish", body=chunks, encode_chunked=True,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (BrokenPipeError, ConnectionResetError):
            return None, b""
        finally:
            conn.close()

    status, body = await asyncio.to_thread(chunked, limit + 70_000)
    assert status == 413, body[:300]
    assert json.loads(body)["error"] == "payload_too_large"
    status, _ = await asyncio.to_thread(chunked, limit - 10)
    assert status == 200
    assert await server.ametric("ferrocast_http_payload_too_large_total") == 2
    assert await server.ametric("ferrocast_http_publish_rejected_total") == 2
    assert re.search(r"request body.*refused: too large.*peer=127\.0\.0\.1", server.log())
    await bird.check()


# ------------------------------------------------------------------------------------------
# 4. Nesting depth

DEPTH_SETS = ("server.max_frame_bytes=1048576",)


def open_sse(port: int, channel: str):
    """An open event stream and its (session, token) from the welcome."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/sse?channels={channel}")
    resp = conn.getresponse()
    assert resp.status == 200
    while True:
        line = resp.fp.readline().decode()
        if line.startswith("data: "):
            welcome = json.loads(line[6:])
            assert welcome["type"] == "welcome", welcome
            return conn, welcome["session"], welcome["token"]


async def test_http_publish_refuses_deep_data(start_server, canary):
    server = start_server(*DEPTH_SETS)
    bird = await canary(server)

    def post(body: str):
        return server.post_publish(body.encode(), {"Content-Type": "application/json"})

    ok = await asyncio.to_thread(post, f'{{"channel":"chat.deep","data":{nested(64)}}}')
    assert ok.status == 200, ok.text
    for depth in (65, 100_000):
        r = await asyncio.to_thread(post, f'{{"channel":"chat.deep","data":{nested(depth)}}}')
        assert r.status == 400, r.text[:300]
        assert r.json()["error"] == "bad_request"
        assert "deeper than 64 levels (server.max_data_depth)" in r.json()["message"]
    # A batch with one deep message publishes nothing and names the message.
    batch = (
        '{"messages":[{"channel":"chat.deep","data":1},'
        f'{{"channel":"chat.deep","data":{nested(65)}}}]}}'
    )
    r = await asyncio.to_thread(post, batch)
    assert r.status == 400 and r.json()["message"].startswith("message 1:"), r.text
    history = server.get("/api/channels/chat.deep/history").json()["messages"]
    assert [json.dumps(m["data"]).count("[") for m in history] == [64]
    assert await server.ametric("ferrocast_data_too_deep_total") == 3
    await bird.check()


async def test_ws_publish_refuses_deep_data(start_server, canary, ws):
    server = start_server(*DEPTH_SETS)
    bird = await canary(server)
    sub = await ws(server)
    await sub.subscribe_ok("chat.deepws")
    pub = await ws(server)
    for depth, accepted in ((64, True), (65, False), (100_000, False)):
        await pub.send_raw(
            f'{{"op":"publish","id":{depth},"channel":"chat.deepws","data":{nested(depth)}}}'
        )
        reply = await pub.recv(timeout=10)
        assert reply["id"] == depth, reply
        if accepted:
            assert reply["type"] == "ack", reply
        else:
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
            assert "server.max_data_depth" in reply["message"], reply
    # Only the accepted message was fanned out; the publisher's connection is still open.
    msg = await sub.next_msg("chat.deepws")
    assert msg["data"] == json.loads(nested(64))
    await sub.expect_silence(0.3)
    assert (await pub.request({"op": "ping"}))["type"] == "pong"
    assert await server.ametric("ferrocast_frame_errors_total", code="bad_request") == 2
    await bird.check()


async def test_sse_control_publish_refuses_deep_data(start_server, canary):
    server = start_server(*DEPTH_SETS)
    bird = await canary(server)
    conn, session, token = await asyncio.to_thread(open_sse, server.port, "chat.deepsse")
    try:
        for depth, accepted in ((64, True), (65, False), (100_000, False)):
            body = (
                f'{{"session":"{session}","token":"{token}","op":"publish","id":{depth},'
                f'"channel":"chat.deepsse","data":{nested(depth)}}}'
            )
            r = await asyncio.to_thread(
                http_request, server.base_url + "/sse/control", "POST", body
            )
            reply = r.json()
            # Like a /ws request, a refused one is answered with an error frame.
            assert r.status == 200, r.text[:300]
            if accepted:
                assert reply["type"] == "ack", r.text
            else:
                assert reply["type"] == "error", reply
                assert reply["code"] == "bad_request" and reply["id"] == depth, reply
                assert "server.max_data_depth" in reply["message"], reply
    finally:
        conn.close()
    assert await server.ametric("ferrocast_data_too_deep_total") == 2
    await bird.check()


async def test_socketio_publish_refuses_deep_data(start_server, canary):
    server = start_server(*DEPTH_SETS)
    bird = await canary(server)
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.base_url, transports=["websocket"], wait_timeout=5)
    try:
        ok = await sio.call(
            "publish", {"channel": "chat.deepsio", "data": json.loads(nested(64))}, timeout=5
        )
        assert ok["channel"] == "chat.deepsio" and ok["offset"] == 1, ok
        refused = await sio.call(
            "publish", {"channel": "chat.deepsio", "data": json.loads(nested(65))}, timeout=5
        )
        assert refused["error"]["code"] == "bad_request", refused
        assert "server.max_data_depth" in refused["error"]["message"], refused
    finally:
        await sio.disconnect()
    # 100,000 levels cannot be built by a Python JSON encoder: send the packet by hand.
    url = server.ws_url("/socket.io/?EIO=4&transport=websocket")
    async with websockets.connect(url, max_size=None, open_timeout=5) as raw:

        async def packet() -> str:
            while True:
                p = await asyncio.wait_for(raw.recv(), 10)
                if p != "2":
                    return p
                await raw.send("3")  # Engine.IO pong

        assert (await packet()).startswith("0")
        await raw.send("40")
        assert (await packet()).startswith("40")
        await raw.send(f'421["publish",{{"channel":"chat.deepsio","data":{nested(100_000)}}}]')
        reply = await packet()
        assert reply.startswith("431"), reply[:300]
        ack = json.loads(reply[3:])[0]
        assert ack["error"]["code"] == "bad_request", ack
        # The socket still serves.
        await raw.send('422["ping",7]')
        assert (await packet()) == '42["pong",7]'
    history = server.get("/api/channels/chat.deepsio/history").json()["messages"]
    assert len(history) == 1
    await bird.check()
