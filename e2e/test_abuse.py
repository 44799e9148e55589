"""Clients that send but never read cannot grow the server or slow anyone else.

Each attack runs against a server with the default limits for FERROCAST_ABUSE_SECONDS
(default 20) from a raw socket that never reads (tiny receive buffer). When the server
closes the attacker, it reconnects and starts again, so the attack lasts the whole time.
Meanwhile a well-behaved canary subscriber gets a message every 20 ms. Each test asserts:

- the server's RSS never grows by more than about 2 x `queue_max_bytes` (plus a fixed
  allowance for allocator noise) above its level before the attack;
- the attacker is closed (more than once: it keeps coming back), with 4008 in the metrics
  and a log line naming the connection;
- the canary got every message, in order, and its largest gap stayed under 250 ms.

These attacks exercise the outbound queue's defences, so the per-connection request limit
(`limits.commands_per_s`, which closes such a flood with 4029 long before; see
test_limits.py) is turned off for them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from ferrocast_e2e.server import FerrocastServer

ATTACK_SECONDS = float(os.environ.get("FERROCAST_ABUSE_SECONDS", "20"))
#: The default `server.queue_max_bytes`.
BUDGET = 1024 * 1024
#: RSS noise that is not the attacker's doing (allocator arenas, the canary's traffic).
RSS_ALLOWANCE = 6 * 1024 * 1024
CANARY_CHANNEL = "chat.canary"
CANARY_INTERVAL = 0.02
MAX_CANARY_GAP = 0.25

#: The request limit off: these tests are about what a connection's queue lets it cost.
NO_REQUEST_LIMIT = "limits.commands_per_s=0"

pytestmark = pytest.mark.timeout(ATTACK_SECONDS + 60)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _connect(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Tiny buffers: the server sees a client that does not read as soon as possible.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def _read_head(s: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    return head


class NonReader:
    """A WebSocket client that completes the handshake and then only sends."""

    def __init__(self, port: int, path: str = "/ws") -> None:
        self.sock = _connect(port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = _read_head(self.sock)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock.settimeout(0.5)

    def frame(self, opcode: int, payload: bytes) -> bytes:
        # An all-zero masking key (valid: the server unmasks whatever key it gets) keeps the
        # attacker's thread in `sendall`, not in Python byte loops that hold the GIL and
        # would starve the canary in this same process.
        mask = b"\x00\x00\x00\x00"
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return header + mask + payload

    def send(self, data: bytes) -> bool:
        """Sends; False when the server stopped reading us (the send timed out)."""
        try:
            self.sock.sendall(data)
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def attack_loop(
    port: int, step, deadline: float, stats: dict, path: str = "/ws", hello: bytes = b""
) -> None:
    """Runs `step(attacker, n)` as fast as the server takes it, reconnecting whenever the
    server closes the attacker, until `deadline`. `hello` is sent first on each connection."""
    n = 0
    while time.monotonic() < deadline:
        try:
            attacker = NonReader(port, path)
            if hello:
                attacker.send(attacker.frame(0x1, hello))
        except (OSError, AssertionError):
            time.sleep(0.05)
            continue
        stats["connections"] += 1
        try:
            while time.monotonic() < deadline:
                n += 1
                if not attacker.send(step(attacker, n)):
                    stats["blocked"] += 1
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            stats["closed"] += 1
        finally:
            attacker.close()


class Canary:
    """A subscriber that should not notice anything: a message every 20 ms, all in order."""

    def __init__(self, server: FerrocastServer) -> None:
        self.server = server
        self.arrivals: list[float] = []
        self.offsets: list[int] = []
        self.stop = threading.Event()
        self.sent = 0

    def publish_forever(self) -> None:
        publisher = self.server.keepalive_publisher()
        try:
            while not self.stop.is_set():
                publisher.publish_batch([(CANARY_CHANNEL, {"n": self.sent})])
                self.sent += 1
                time.sleep(CANARY_INTERVAL)
        finally:
            publisher.close()

    async def listen(self, client) -> None:
        while True:
            msg = await client.next_msg(CANARY_CHANNEL, timeout=30)
            self.arrivals.append(time.monotonic())
            self.offsets.append(msg["offset"])

    def check(self) -> None:
        assert self.sent > ATTACK_SECONDS / CANARY_INTERVAL / 4, self.sent
        assert len(self.offsets) == self.sent, (len(self.offsets), self.sent)
        first = self.offsets[0]
        assert self.offsets == list(range(first, first + len(self.offsets)))
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        assert max(gaps) < MAX_CANARY_GAP, f"canary's largest gap {max(gaps):.3f}s"


async def run_attack(
    server: FerrocastServer, ws, step, loop=attack_loop, expect_closed: bool = True
) -> dict:
    """Runs `loop(port, step, deadline, stats)` with a canary watching; returns the figures."""
    canary = Canary(server)
    client = await ws(server)
    await client.subscribe_ok(CANARY_CHANNEL)
    listener = asyncio.create_task(canary.listen(client))
    publisher = threading.Thread(target=canary.publish_forever, daemon=True)
    publisher.start()
    await asyncio.sleep(1.0)
    pid = server.process.pid
    baseline = rss(pid)
    closes_before = await server.ametric("ferrocast_closes_total", code="4008") or 0
    stats = {"connections": 0, "closed": 0, "blocked": 0, "peak": baseline}
    deadline = time.monotonic() + ATTACK_SECONDS
    attacker = threading.Thread(
        target=loop, args=(server.port, step, deadline, stats), daemon=True
    )
    attacker.start()
    while attacker.is_alive():
        stats["peak"] = max(stats["peak"], rss(pid))
        await asyncio.sleep(0.1)
    canary.stop.set()
    publisher.join(timeout=5)
    await asyncio.sleep(0.5)
    listener.cancel()
    stats["growth"] = stats["peak"] - baseline
    stats["closes_4008"] = (
        await server.ametric("ferrocast_closes_total", code="4008") or 0
    ) - closes_before
    print("attack figures:", stats)
    assert server.alive(), "server exited"
    assert stats["growth"] < 2 * BUDGET + RSS_ALLOWANCE, stats
    if expect_closed:
        assert stats["closed"] >= 1, f"the attacker was never closed: {stats}"
        assert stats["closes_4008"] >= 1, stats
    canary.check()
    return stats


def publish_history(server: FerrocastServer, channel: str, count: int, size: int) -> str:
    """Fills `channel`'s history; returns its epoch."""
    pad = "x" * size
    publisher = server.keepalive_publisher()
    try:
        epoch = ""
        for start in range(0, count, 100):
            results = publisher.publish_batch(
                [(channel, {"i": i, "pad": pad}) for i in range(start, min(count, start + 100))]
            )
            epoch = results[-1]["epoch"]
        return epoch
    finally:
        publisher.close()


async def test_repeated_recovering_subscribes_from_a_non_reader(start_server, ws):
    server = start_server(NO_REQUEST_LIMIT)
    epoch = publish_history(server, "ticks.ABUSE", 1000, 300)
    subscribe = json.dumps(
        {
            "op": "subscribe",
            "id": 1,
            "channels": ["ticks.ABUSE"],
            "recover": {"ticks.ABUSE": {"epoch": epoch, "offset": 0}},
        }
    ).encode()
    unsubscribe = json.dumps({"op": "unsubscribe", "id": 2, "channels": ["ticks.ABUSE"]}).encode()

    def step(a: NonReader, n: int) -> bytes:
        return a.frame(0x1, subscribe) + a.frame(0x1, unsubscribe)

    await run_attack(server, ws, step)
    assert "does not read the replies" in server.log() or "replies exceed" in server.log()


@pytest.mark.xfail(
    reason="open (issue 10): since the broker merge the canary's largest gap during this flood "
    "is sometimes 0.37-0.45 s (RSS stays bounded and the attacker is still closed with 4008)",
    strict=False,
)
async def test_ping_op_flood_from_a_non_reader(start_server, ws):
    server = start_server(NO_REQUEST_LIMIT)

    def step(a: NonReader, n: int) -> bytes:
        return b"".join(a.frame(0x1, b'{"op":"ping","id":%d}' % (n * 10 + i)) for i in range(10))

    await run_attack(server, ws, step)


async def test_blind_pongs_do_not_keep_a_non_reader_alive(start_server, ws):
    """A client that answers heartbeats it never read, and floods pings, is still closed."""
    server = start_server(NO_REQUEST_LIMIT)

    def step(a: NonReader, n: int) -> bytes:
        return a.frame(0x1, b'{"op":"pong"}') + a.frame(0x1, b'{"op":"ping","id":%d}' % n)

    await run_attack(server, ws, step)


async def test_candle_snapshot_churn_from_a_non_reader(start_server, ws):
    server = start_server(NO_REQUEST_LIMIT)
    publish_history(server, "candles.ABUSE.1m", 500, 150)
    sub = b'{"op":"subscribe","id":1,"channels":["candles.ABUSE.1m"]}'
    unsub = b'{"op":"unsubscribe","id":2,"channels":["candles.ABUSE.1m"]}'

    def step(a: NonReader, n: int) -> bytes:
        return a.frame(0x1, sub) + a.frame(0x1, unsub)

    await run_attack(server, ws, step)


async def test_websocket_ping_flood_from_a_non_reader(start_server, ws):
    server = start_server(NO_REQUEST_LIMIT)
    payload = b"p" * 125

    def step(a: NonReader, n: int) -> bytes:
        return a.frame(0x9, payload) * 20

    await run_attack(server, ws, step)
    # Closed because it stopped being read (its pongs piled up), not by chance.
    assert "does not read the replies; closing with 4008" in server.log()


class SseNonReader:
    """An SSE stream that is opened and never read, and a control connection that floods it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream = _connect(port)
        self.stream.sendall(
            f"GET /sse?channels=ticks.ABUSE HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        data = b""
        while b'"type":"welcome"' not in data or not data.rstrip(b"\r\n").endswith(b"}"):
            chunk = self.stream.recv(4096)
            if not chunk:
                raise ConnectionError("stream closed before its welcome")
            data += chunk
        line = next(x for x in data.split(b"\n") if b'"type":"welcome"' in x)
        info = json.loads(line.split(b"data:", 1)[1])
        self.session, self.token = info["session"], info["token"]
        import http.client

        self.control = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def post(self, frame: dict) -> int:
        body = json.dumps({"session": self.session, "token": self.token, **frame})
        self.control.request("POST", "/sse/control", body=body)
        resp = self.control.getresponse()
        resp.read()
        return resp.status

    def close(self) -> None:
        self.stream.close()
        self.control.close()


async def test_sse_control_flood_onto_a_stream_never_read(start_server, ws):
    server = start_server(NO_REQUEST_LIMIT)
    epoch = publish_history(server, "ticks.ABUSE", 1000, 300)
    statuses: dict[int, int] = {}

    def sse_attack_loop(port: int, step, deadline: float, stats: dict) -> None:
        while time.monotonic() < deadline:
            try:
                attacker = SseNonReader(port)
            except (OSError, ConnectionError, StopIteration):
                time.sleep(0.05)
                continue
            stats["connections"] += 1
            try:
                while time.monotonic() < deadline:
                    status = attacker.post(
                        {
                            "op": "subscribe",
                            "id": 1,
                            "channels": ["ticks.ABUSE"],
                            "recover": {"ticks.ABUSE": {"epoch": epoch, "offset": 0}},
                        }
                    )
                    statuses[status] = statuses.get(status, 0) + 1
                    attacker.post({"op": "unsubscribe", "id": 2, "channels": ["ticks.ABUSE"]})
                    if status == 404:
                        stats["closed"] += 1
                        break
            except OSError:
                stats["closed"] += 1
            finally:
                attacker.close()

    await run_attack(server, ws, None, loop=sse_attack_loop)
    assert statuses.get(503, 0) >= 1, f"control was never refused for backpressure: {statuses}"


async def test_conflating_publishes_into_a_full_queue_do_not_freeze_the_feed(start_server, ws):
    """A non-reader on 50 quote channels keeps a full queue while quotes flood in: every
    publish conflates into that queue, and must not stall the hub for anyone else."""
    server = start_server(NO_REQUEST_LIMIT)
    channels = [f"quotes.Q{i}" for i in range(50)]
    subscribe = json.dumps({"op": "subscribe", "id": 1, "channels": channels}).encode()
    pad = "q" * 100

    def flood(port: int, step, deadline: float, stats: dict) -> None:
        attacker = NonReader(port)
        stats["connections"] += 1
        attacker.send(attacker.frame(0x1, subscribe))
        publisher = server.keepalive_publisher()
        try:
            n = 0
            while time.monotonic() < deadline:
                publisher.publish_batch([(c, {"bid": n, "pad": pad}) for c in channels])
                n += 1
            stats["published"] = n * len(channels)
        finally:
            publisher.close()
            attacker.close()

    conflated_before = await server.ametric("ferrocast_queue_overflows_total", policy="conflate") or 0
    stats = await run_attack(server, ws, None, loop=flood, expect_closed=False)
    conflated = (await server.ametric("ferrocast_queue_overflows_total", policy="conflate") or 0) - conflated_before
    # The non-reader's queue was full for most of the flood: most publishes conflated there.
    assert conflated > stats["published"] / 4, (conflated, stats)


async def test_subscribe_churn_mints_no_channels(start_server, ws, healthy):
    """Subscribe/unsubscribe churn over fresh channel names leaves nothing behind: a channel
    that was never published to is forgotten when its last subscriber leaves."""
    server = start_server(NO_REQUEST_LIMIT)
    good = await healthy(server)
    baseline = rss(server.process.pid)
    c = await ws(server)
    for batch in range(200):
        channels = [f"churn.b{batch}c{i}" for i in range(100)]
        reply = await c.request({"op": "subscribe", "channels": channels})
        assert all("epoch" in r for r in reply["result"].values()), reply
        await c.request({"op": "unsubscribe", "channels": channels})
    held = await server.ametric("ferrocast_channels")
    # Only the canary's channel (and none of the 20,000 churned ones) is left.
    assert held is not None and held <= 2, held
    assert rss(server.process.pid) - baseline < 32 * 1024 * 1024
    await good.check()


async def test_the_channel_limit_ends_publish_churn_with_a_precise_error(start_server, ws, healthy):
    server = start_server("server.max_channels=500", NO_REQUEST_LIMIT)
    good = await healthy(server)
    c = await ws(server)
    refused = None
    for i in range(1000):
        reply = await c.request({"op": "publish", "channel": f"chat.mint{i}", "data": i})
        if reply["type"] == "error":
            refused = (i, reply)
            break
    assert refused is not None, "500 channels were allowed past the limit"
    i, reply = refused
    assert reply["code"] == "channel_limit", reply
    assert "server.max_channels" in reply["message"], reply
    assert 490 <= i <= 500, i
    # One HTTP batch cannot mint channels past the limit either.
    resp = server.post_publish(
        {"messages": [{"channel": f"chat.batch{i}", "data": i} for i in range(5000)]}
    )
    assert resp.status == 503, resp.text
    assert resp.json()["error"] == "channel_limit", resp.text
    # Existing channels keep working, the limit is counted, and the listing pages.
    assert server.publish("chat.mint0", "again")["offset"] == 2
    assert (await server.ametric("ferrocast_channels_refused_total") or 0) >= 2
    first = server.get("/api/channels?limit=100").json()
    assert len(first["channels"]) == 100 and first["total"] <= 501, first["total"]
    second = server.get(f"/api/channels?limit=100&after={first['next']}").json()
    assert second["channels"][0]["channel"] > first["channels"][-1]["channel"]
    await good.check()


async def test_socketio_event_flood_from_a_non_reader(start_server, ws):
    """Socket.IO acks go to the engine's per-socket buffer: a client that floods events with
    acks but never reads fills it, and its session is ended with 4008 (its memory freed).
    socketioxide offers no way to drop one socket's transport, so the Engine.IO connection
    itself lingers until the library's heartbeat gives up on it; the buffer stays bounded
    meanwhile (1,024 packets, and a `ping` over 1 KiB is not echoed)."""
    server = start_server(NO_REQUEST_LIMIT)
    payload = json.dumps({"pad": "s" * 900})

    def step(a: NonReader, n: int) -> bytes:
        return b"".join(
            a.frame(0x1, f'42{n * 10 + i}["ping",{payload}]'.encode()) for i in range(10)
        )

    def loop(port: int, step, deadline: float, stats: dict) -> None:
        attack_loop(
            port, step, deadline, stats, path="/socket.io/?EIO=4&transport=websocket", hello=b"40"
        )

    await run_attack(server, ws, step, loop=loop, expect_closed=False)
    assert "does not read the replies; closing with 4008" in server.log()
    closed = await server.ametric("ferrocast_closes_total", code="4008")
    assert closed and closed >= 1, closed
