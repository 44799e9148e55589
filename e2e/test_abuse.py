"""Clients that send but never read cannot grow the server or slow anyone else.

Each attack runs against a server with the default limits for FERROCAST_ABUSE_SECONDS
(default 20) from a raw socket that never reads (tiny receive buffer), in a process of its
own (`ferrocast_e2e.attack`). When the server closes the attacker, it reconnects and starts
again, so the attack lasts the whole time. Meanwhile a well-behaved canary subscriber gets a
message every 20 ms. Each test asserts:

- the server's RSS never grows by more than about 2 x `queue_max_bytes` (plus a fixed
  allowance for allocator noise) above its level before the attack;
- the attacker is closed, with 4008 in the metrics and a log line naming the connection;
- the canary got every message, in order, and its largest gap stayed under 250 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from functools import partial

import pytest

from ferrocast_e2e import attack
from ferrocast_e2e.attack import frame
from ferrocast_e2e.canary import rss_bytes
from ferrocast_e2e.server import FerrocastServer

ATTACK_SECONDS = float(os.environ.get("FERROCAST_ABUSE_SECONDS", "20"))
#: The default `server.queue_max_bytes`.
BUDGET = 1024 * 1024
#: RSS noise that is not the attacker's doing (allocator arenas, the canary's traffic).
RSS_ALLOWANCE = 6 * 1024 * 1024
#: The request limit off: these tests are about what a connection's queue lets it cost.
NO_REQUEST_LIMIT = "limits.commands_per_s=0"

pytestmark = pytest.mark.timeout(ATTACK_SECONDS + 60)


async def run_attack(
    server: FerrocastServer,
    canary,
    step,
    loop: attack.Loop = attack.attack_loop,
    expect_closed: bool = True,
) -> dict:
    """Runs `loop(port, step, deadline, stats)` in an attacker process with a canary
    watching; returns the attacker's figures and the server's growth."""
    bird = await canary(server)
    await asyncio.sleep(1.0)
    pid = server.process.pid
    baseline = rss_bytes(pid)
    peak = baseline
    closes_before = await server.ametric("ferrocast_closes_total", code="4008") or 0
    attacker = attack.AttackProcess(loop, server.port, step, ATTACK_SECONDS)
    while not attacker.done():
        peak = max(peak, rss_bytes(pid))
        await asyncio.sleep(0.1)
    stats = await asyncio.to_thread(attacker.stats)
    stats["growth"] = peak - baseline
    stats["closes_4008"] = (
        await server.ametric("ferrocast_closes_total", code="4008") or 0
    ) - closes_before
    print("attack figures:", stats)
    assert server.alive(), "server exited"
    assert stats["connections"] >= 1, stats
    assert stats["growth"] < 2 * BUDGET + RSS_ALLOWANCE, stats
    if expect_closed:
        assert stats["closed"] >= 1, f"the attacker was never closed: {stats}"
        assert stats["closes_4008"] >= 1, stats
        # Logged with the connection's id.
        assert re.search(r" INFO .*4008.* conn=\d+", server.log()), "no log line for the 4008"
    # The canary was published to every 20 ms for the whole attack.
    await bird.check(min_published=int(ATTACK_SECONDS / 0.02 / 4))
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


def frames(*requests: dict) -> bytes:
    return b"".join(frame(0x1, json.dumps(r).encode()) for r in requests)


async def test_repeated_recovering_subscribes_from_a_non_reader(start_server, canary):
    server = start_server(NO_REQUEST_LIMIT)
    epoch = publish_history(server, "ticks.ABUSE", 1000, 300)
    step = partial(
        attack.send_bytes,
        frames(
            {
                "op": "subscribe",
                "id": 1,
                "channels": ["ticks.ABUSE"],
                "recover": {"ticks.ABUSE": {"epoch": epoch, "offset": 0}},
            },
            {"op": "unsubscribe", "id": 2, "channels": ["ticks.ABUSE"]},
        ),
    )
    await run_attack(server, canary, step)
    assert "does not read the replies" in server.log() or "replies exceed" in server.log()


async def test_ping_op_flood_from_a_non_reader(start_server, canary):
    """Thousands of tiny requests a second: the flooding connection yields its worker after
    a bounded amount of work however the bytes arrive, so tokio keeps polling everyone
    else's sockets and timers (this canary's gaps reached 0.45 s when the limit counted per
    read and a steady flood of short reads never let the task yield)."""
    server = start_server(NO_REQUEST_LIMIT)
    await run_attack(server, canary, attack.ping_ops)
    assert "does not read the replies; closing with 4008" in server.log()


async def test_blind_pongs_do_not_keep_a_non_reader_alive(start_server, canary):
    """A client that answers heartbeats it never read, and floods pings, is still closed."""
    server = start_server(NO_REQUEST_LIMIT)
    await run_attack(server, canary, attack.pong_and_ping_op)


async def test_candle_snapshot_churn_from_a_non_reader(start_server, canary):
    server = start_server(NO_REQUEST_LIMIT)
    publish_history(server, "candles.ABUSE.1m", 500, 150)
    step = partial(
        attack.send_bytes,
        frames(
            {"op": "subscribe", "id": 1, "channels": ["candles.ABUSE.1m"]},
            {"op": "unsubscribe", "id": 2, "channels": ["candles.ABUSE.1m"]},
        ),
    )
    await run_attack(server, canary, step)


async def test_websocket_ping_flood_from_a_non_reader(start_server, canary):
    server = start_server(NO_REQUEST_LIMIT)
    step = partial(attack.send_bytes, frame(0x9, b"p" * 125) * 20)
    await run_attack(server, canary, step)
    # Closed because it stopped being read (its pongs piled up), not by chance.
    assert "does not read the replies; closing with 4008" in server.log()


async def test_sse_control_flood_onto_a_stream_never_read(start_server, canary):
    server = start_server(NO_REQUEST_LIMIT)
    epoch = publish_history(server, "ticks.ABUSE", 1000, 300)
    loop = partial(attack.sse_recovery_flood, "ticks.ABUSE", epoch)
    stats = await run_attack(server, canary, None, loop=loop)
    statuses = stats["statuses"]
    assert statuses.get(503, 0) >= 1, f"control was never refused for backpressure: {statuses}"


async def test_conflating_publishes_into_a_full_queue_do_not_freeze_the_feed(start_server, canary):
    """A non-reader on 50 quote channels keeps a full queue while quotes flood in: every
    publish conflates into that queue, and must not stall the hub for anyone else."""
    server = start_server(NO_REQUEST_LIMIT)
    channels = [f"quotes.Q{i}" for i in range(50)]
    conflated_before = await server.ametric("ferrocast_queue_overflows_total", policy="conflate") or 0
    loop = partial(attack.conflating_flood, channels)
    stats = await run_attack(server, canary, None, loop=loop, expect_closed=False)
    conflated = (await server.ametric("ferrocast_queue_overflows_total", policy="conflate") or 0) - conflated_before
    # The non-reader's queue was full for most of the flood: most publishes conflated there.
    assert conflated > stats["published"] / 4, (conflated, stats)


async def test_subscribe_churn_mints_no_channels(start_server, ws, canary):
    """Subscribe/unsubscribe churn over fresh channel names leaves nothing behind: a channel
    that was never published to is forgotten when its last subscriber leaves."""
    server = start_server(NO_REQUEST_LIMIT)
    bird = await canary(server)
    baseline = rss_bytes(server.process.pid)
    c = await ws(server)
    for batch in range(200):
        channels = [f"churn.b{batch}c{i}" for i in range(100)]
        reply = await c.request({"op": "subscribe", "channels": channels})
        assert all("epoch" in r for r in reply["result"].values()), reply
        await c.request({"op": "unsubscribe", "channels": channels})
    # Only the canary's channel is left of the 20,001.
    assert await server.ametric("ferrocast_channels") == 1
    listed = server.get("/api/channels").json()
    assert [ch["channel"] for ch in listed["channels"]] == [bird.CHANNEL], listed
    # Kept, 20,000 channels would take ~24 MB.
    assert rss_bytes(server.process.pid) - baseline < 8 * 1024 * 1024
    await bird.check()


def sse_ack(port: int, channels: str) -> dict:
    """Opens `/sse?channels=...` and returns the stream's first ack (its subscribe results)."""
    s = attack.connect(port)
    try:
        s.sendall(
            f"GET /sse?channels={channels} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        data = b""
        while True:
            for line in data.split(b"\n"):
                if line.startswith(b"data:") and b'"type":"ack"' in line:
                    return json.loads(line[5:])
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    finally:
        s.close()


async def test_the_channel_limit_ends_minting_on_every_ingress(start_server, ws, canary):
    """With `server.max_channels` held, no ingress creates another channel: /ws publish and
    subscribe, HTTP batches, SSE streams; each gets `channel_limit` naming the option, and
    existing channels keep working."""
    server = start_server("server.max_channels=500", NO_REQUEST_LIMIT)
    bird = await canary(server)
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
    # The canary's channel is the 500th.
    assert i == 499, i
    # One HTTP batch cannot mint channels past the limit either.
    resp = await asyncio.to_thread(
        server.post_publish,
        {"messages": [{"channel": f"chat.batch{i}", "data": i} for i in range(5000)]},
    )
    assert resp.status == 503, resp.text
    assert resp.json()["error"] == "channel_limit", resp.text
    # A subscribe that would create channels gets the error per channel; existing ones work.
    result = await c.subscribe("chat.sub-new", "chat.mint0")
    assert result["chat.sub-new"]["error"]["code"] == "channel_limit", result
    assert "error" not in result["chat.mint0"], result
    # So does a stream's subscribe.
    ack = await asyncio.to_thread(sse_ack, server.port, "chat.sse-new,chat.mint1")
    assert ack["result"]["chat.sse-new"]["error"]["code"] == "channel_limit", ack
    assert "error" not in ack["result"]["chat.mint1"], ack
    # Existing channels keep working, the limit is counted, and the listing pages.
    assert server.publish("chat.mint0", "again")["offset"] == 2
    assert (await server.ametric("ferrocast_channels_refused_total") or 0) >= 4
    assert await server.ametric("ferrocast_channels") == 500
    first = server.get("/api/channels?limit=100").json()
    assert len(first["channels"]) == 100 and first["total"] == 500, first["total"]
    second = server.get(f"/api/channels?limit=100&after={first['next']}").json()
    assert second["channels"][0]["channel"] > first["channels"][-1]["channel"]
    await bird.check()


async def test_a_namespace_can_refuse_channel_creation_by_subscribe(start_server, ws):
    """`create_on_subscribe = false`: a client's subscribe (over /ws or SSE) to a channel
    nobody published to creates nothing and gets `unknown_channel`; once published to, the
    channel can be subscribed."""
    server = start_server("namespaces.feed.create_on_subscribe=false")
    c = await ws(server)
    result = await c.subscribe("feed.nobody", "chat.free")
    error = result["feed.nobody"]["error"]
    assert error["code"] == "unknown_channel", result
    assert "create_on_subscribe" in error["message"], error
    assert "error" not in result["chat.free"], result
    ack = sse_ack(server.port, "feed.sse-nobody")
    assert ack["result"]["feed.sse-nobody"]["error"]["code"] == "unknown_channel", ack
    listed = [ch["channel"] for ch in server.get("/api/channels").json()["channels"]]
    assert listed == ["chat.free"], listed
    server.publish("feed.nobody", {"first": True})
    again = await ws(server)
    assert (await again.subscribe_ok("feed.nobody"))["feed.nobody"]["offset"] == 1


async def test_publish_churn_ends_at_the_limit_with_bounded_memory(start_server, canary):
    """100,000 fresh channel names published over HTTP against a limit of 10,000: the churn
    stops at the limit with `channel_limit`, and the server holds what 10,000 channels take
    (100,000 would take ~120 MB)."""
    server = start_server("server.max_channels=10000")
    bird = await canary(server)
    baseline = rss_bytes(server.process.pid)
    statuses: dict[int, int] = {}

    def churn() -> None:
        publisher = server.keepalive_publisher()
        try:
            for b in range(100):
                messages = [
                    {"channel": f"chat.m{b}x{i}", "data": {"pad": "y" * 50}} for i in range(1000)
                ]
                publisher.conn.request(
                    "POST", "/api/publish", json.dumps({"messages": messages}), publisher.headers
                )
                resp = publisher.conn.getresponse()
                reply = json.loads(resp.read())
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status != 200:
                    assert (resp.status, reply["error"]) == (503, "channel_limit"), reply
        finally:
            publisher.close()

    # In a thread: the canary reads on this event loop meanwhile.
    await asyncio.to_thread(churn)
    assert statuses == {200: 9, 503: 91}, statuses
    assert await server.ametric("ferrocast_channels") == 10_000
    growth = rss_bytes(server.process.pid) - baseline
    assert growth < 40 * 1024 * 1024, growth
    await bird.check()


async def test_memory_freed_by_a_sweep_is_reused(start_server):
    """50,000 channels published once and expired by the sweeper: their memory goes back to
    the allocator, so a second wave of 50,000 new ones takes none more (glibc keeps the freed
    pages mapped for reuse rather than returning them, so RSS does not fall).

    Eight runtime workers, whatever the machine: glibc gives each thread its own arena, and
    when publishes were handled by whichever worker ran the connection, the second wave's
    allocations landed in arenas the first wave's frees had not gone back to (CI: +27 MB on a
    larger machine). Publishes are handled on the one ingress thread now, so the wave reuses
    its own arena however many workers there are."""
    server = start_server(
        "namespaces.tmp.channel_ttl_ms=200", env={"TOKIO_WORKER_THREADS": "8"}
    )
    pid = server.process.pid
    publisher = server.keepalive_publisher()

    async def wave(n: int) -> int:
        for b in range(50):
            publisher.publish_batch(
                [(f"tmp.w{n}b{b}x{i}", {"i": i, "pad": "y" * 50}) for i in range(1000)]
            )
        after = rss_bytes(pid)
        assert await server.ametric("ferrocast_channels") == 50_000
        # The sweeper runs every 5 s.
        deadline = asyncio.get_running_loop().time() + 15
        while await server.ametric("ferrocast_channels") != 0:
            assert asyncio.get_running_loop().time() < deadline, "the channels never expired"
            await asyncio.sleep(0.5)
        return after

    try:
        before = rss_bytes(pid)
        first = await wave(1)
        second = await wave(2)
    finally:
        publisher.close()
    assert await server.ametric("ferrocast_channels_expired_total") == 100_000
    assert server.get("/api/channels").json()["total"] == 0
    # Leaked, the second wave would add as much as the first (~60 MB).
    assert second - first < (first - before) / 3, (before, first, second)


async def test_socketio_event_flood_from_a_non_reader(start_server, canary):
    """A client that floods events with acks but never reads is ended with 4008 (its memory
    freed). This raw client starts on websocket, so its acks are spliced through the session's
    queue like `/ws` replies and overflow its byte budget; a client that stays on polling
    fills the engine's per-socket buffer instead (1,024 packets, and a `ping` over 1 KiB is not
    echoed)."""
    server = start_server(NO_REQUEST_LIMIT)
    step = partial(attack.socketio_events, json.dumps({"pad": "s" * 900}))
    await run_attack(server, canary, step, loop=attack.socketio_attack_loop, expect_closed=False)
    assert "does not read the replies; closing with 4008" in server.log()
    closed = await server.ametric("ferrocast_closes_total", code="4008")
    assert closed and closed >= 1, closed


async def test_socketio_event_flood_from_a_non_reader_after_an_upgrade(start_server, canary):
    """The same flood from a client that opened its session on polling, subscribed to the
    canary's channel there, then upgraded and stopped reading: its writer switches to the
    splice (or waits for it behind the unread bytes) while the acks pile up, and it is still
    ended with 4008, its memory bounded, the canary unharmed."""
    server = start_server(NO_REQUEST_LIMIT)
    step = partial(attack.socketio_events, json.dumps({"pad": "s" * 900}))
    await run_attack(
        server, canary, step, loop=attack.upgraded_socketio_attack_loop, expect_closed=False
    )
    assert "does not read the replies; closing with 4008" in server.log()
    closed = await server.ametric("ferrocast_closes_total", code="4008")
    assert closed and closed >= 1, closed
    # Its sessions were spliced once upgraded (the canary is on /ws).
    assert await server.ametric("ferrocast_socketio_spliced_frames_total") > 0
