"""History, recovery, snapshots and server-built candles over the wire, with Python's
`websockets` as the client: what a reconnecting dashboard sees."""

from __future__ import annotations

import asyncio
import json
import time

from ferrocast_e2e.attack import NonReader, frame
from ferrocast_e2e.canary import rss_bytes


async def test_recovery_replays_missed_messages_in_order_before_live(server, ws):
    client = await ws(server)
    result = await client.subscribe_ok("chat.rec")
    epoch = result["chat.rec"]["epoch"]
    for i in range(1, 4):
        server.publish("chat.rec", {"n": i})
    seen = [(await client.next_msg("chat.rec"))["offset"] for _ in range(3)]
    assert seen == [1, 2, 3]
    await client.close()

    for i in range(4, 11):
        server.publish("chat.rec", {"n": i})
    again = await ws(server)
    result = await again.subscribe("chat.rec", recover={"chat.rec": {"epoch": epoch, "offset": 3}})
    assert result["chat.rec"]["recovered"] is True, result
    assert result["chat.rec"]["replayed"] == 7, result
    server.publish("chat.rec", {"n": 11})
    frames = [await again.next_msg("chat.rec") for _ in range(8)]
    assert [f["offset"] for f in frames] == list(range(4, 12))
    assert [f["data"]["n"] for f in frames] == list(range(4, 12))
    assert all(f["epoch"] == epoch for f in frames)


async def test_history_api_returns_retained_messages_with_epoch(start_server):
    server = start_server("namespaces.hist.history_size=5")
    for i in range(1, 9):
        server.publish("hist.a", {"i": i})
    page = server.get("/api/channels/hist.a/history?since=0&limit=100").json()
    assert page["offset"] == 8 and isinstance(page["epoch"], str)
    assert [m["offset"] for m in page["messages"]] == [4, 5, 6, 7, 8]
    assert [m["data"]["i"] for m in page["messages"]] == [4, 5, 6, 7, 8]
    page = server.get("/api/channels/hist.a/history?since=6&limit=1").json()
    assert [m["offset"] for m in page["messages"]] == [7]
    assert server.get("/api/channels/nope.x/history").status == 404


async def test_gap_beyond_history_is_not_recovered_and_gets_the_snapshot(start_server, ws):
    server = start_server(
        "namespaces.snap.history_size=10",
        'namespaces.snap.snapshot="last"',
        "namespaces.snap.snapshot_size=3",
    )
    client = await ws(server)
    epoch = (await client.subscribe_ok("snap.x"))["snap.x"]["epoch"]
    await client.close()
    for i in range(1, 31):
        server.publish("snap.x", i)
    again = await ws(server)
    result = await again.subscribe("snap.x", recover={"snap.x": {"epoch": epoch, "offset": 2}})
    assert result["snap.x"]["recovered"] is False
    assert result["snap.x"]["snapshot"] == {"kind": "last", "count": 3}
    assert [(await again.next_msg("snap.x"))["data"] for _ in range(3)] == [28, 29, 30]


async def test_server_restart_gives_a_new_epoch_and_recovery_fails_with_a_snapshot(start_server, ws):
    first = start_server()
    client = await ws(first)
    old = (await client.subscribe_ok("quotes.RST"))["quotes.RST"]
    for bid in (10.0, 10.1, 10.2):
        first.publish("quotes.RST", {"sym": "RST", "bid": bid, "ask": bid + 0.01})
    last = [(await client.next_msg("quotes.RST"))["offset"] for _ in range(3)][-1]
    await client.close()
    first.process.stop(timeout=10)

    second = start_server()
    second.publish("quotes.RST", {"sym": "RST", "bid": 11.0, "ask": 11.01})
    second.publish("quotes.RST", {"sym": "RST", "bid": 11.5, "ask": 11.51})
    again = await ws(second)
    result = await again.subscribe("quotes.RST", recover={"quotes.RST": {"epoch": old["epoch"], "offset": last}})
    r = result["quotes.RST"]
    assert r["epoch"] != old["epoch"], "a restarted server must not reuse an epoch"
    assert r["recovered"] is False
    assert r["snapshot"] == {"kind": "latest", "count": 1}, r
    snap = await again.next_msg("quotes.RST")
    assert snap["data"]["bid"] == 11.5 and snap["epoch"] == r["epoch"] and snap["offset"] == 2


async def test_quote_snapshot_on_subscribe_is_the_latest_value(server, ws):
    for bid in (1.0, 2.0, 3.0):
        server.publish("quotes.LAT", {"sym": "LAT", "bid": bid})
    client = await ws(server)
    result = await client.subscribe_ok("quotes.LAT")
    assert result["quotes.LAT"]["snapshot"] == {"kind": "latest", "count": 1}
    assert (await client.next_msg("quotes.LAT"))["data"]["bid"] == 3.0
    await client.expect_silence(0.3)


def _second_boundary(ahead_s: float) -> int:
    """A whole-second Unix ms timestamp at least `ahead_s` in the future, so the server's
    clock does not close the window before the test's trades arrive."""
    return (int(time.time() + ahead_s) + 1) * 1000


async def test_candles_are_built_from_trades_with_exact_ohlcv(server, ws):
    w = _second_boundary(2.0)
    client = await ws(server)
    result = await client.subscribe_ok("candles.CDL.1s")
    assert result["candles.CDL.1s"]["snapshot"]["count"] == 0
    trades = [(w + 100, 10.0, 100), (w + 200, 12.0, 50), (w + 300, 9.0, 150), (w + 2500, 11.0, 10)]
    server.publish_batch([("ticks.CDL", {"sym": "CDL", "price": p, "size": s, "ts": t}) for t, p, s in trades])

    # The second bar closes on the server's clock, up to ~7 s from now (w + 2 s + 1 s + grace).
    closed = []
    while len(closed) < 2:
        m = await client.next_msg("candles.CDL.1s", timeout=10)
        if m.get("ephemeral"):
            assert m["data"]["forming"] is True
            continue
        closed.append(m["data"])
    first, second = closed
    assert (first["start"], first["end"]) == (w, w + 1000)
    assert (first["open"], first["high"], first["low"], first["close"]) == (10.0, 12.0, 9.0, 9.0)
    assert first["volume"] == 300 and first["trades"] == 3 and first["forming"] is False
    assert abs(first["vwap"] - (10 * 100 + 12 * 50 + 9 * 150) / 300) < 1e-9
    assert first["src"] == "server"
    # No bar for the empty window w+1000..w+2000: the next closed bar is w+2000.
    assert (second["start"], second["open"], second["trades"]) == (w + 2000, 11.0, 1)

    # A late trade for the first window re-issues it as a correction.
    server.publish("ticks.CDL", {"sym": "CDL", "price": 20.0, "size": 100, "ts": w + 400})
    while True:
        m = await client.next_msg("candles.CDL.1s", timeout=5)
        if not m.get("ephemeral"):
            break
    fixed = m["data"]
    assert fixed["correction"] is True and fixed["start"] == w
    assert (fixed["high"], fixed["close"], fixed["volume"], fixed["trades"]) == (20.0, 20.0, 400, 4)
    assert await server.ametric("ferrocast_candle_late_trades_total") >= 1


async def test_candle_subscribers_get_the_last_bars_as_a_snapshot(server, ws):
    w = _second_boundary(1.0)
    server.publish_batch(
        [("ticks.SNP", {"sym": "SNP", "price": 100.0 + i, "size": 1, "ts": w + i * 1000 + 10}) for i in range(4)]
    )
    # The last window ends at w+4 s and closes 500 ms later (the grace for late trades).
    await asyncio.sleep(w / 1000 - time.time() + 5.2)
    client = await ws(server)
    result = await client.subscribe_ok("candles.SNP.1s")
    assert result["candles.SNP.1s"]["snapshot"] == {"kind": "last", "count": 4}
    bars = [(await client.next_msg("candles.SNP.1s"))["data"] for _ in range(4)]
    assert [b["close"] for b in bars] == [100.0, 101.0, 102.0, 103.0]
    assert all(b["forming"] is False for b in bars), [(b["start"], b["forming"]) for b in bars]


async def test_slow_quote_reader_is_conflated_not_disconnected(start_server, ws):
    server = start_server("server.queue_max_bytes=8192")
    slow = await ws(server, max_queue=1)
    await slow.subscribe_ok("quotes.CF")
    publisher = server.keepalive_publisher()
    try:
        last = None
        # Far more than socket buffers and the 8 KiB queue hold, while the client reads nothing.
        for start in range(0, 40_000, 1000):
            batch = [("quotes.CF", {"sym": "CF", "bid": n, "ask": n + 1, "pad": "q" * 150}) for n in range(start, start + 1000)]
            last = (await asyncio.to_thread(publisher.publish_batch, batch))[-1]["offset"]
    finally:
        publisher.close()
    assert await server.ametric("ferrocast_queue_overflows_total", policy="conflate") > 0
    assert (await server.ametric("ferrocast_queue_overflows_total", policy="disconnect")) == 0
    # The reader catches up: still connected, offsets only grow, and it ends on the latest quote.
    offsets = []
    while not offsets or offsets[-1] != last:
        offsets.append((await slow.next_msg("quotes.CF", timeout=10))["offset"])
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert len(offsets) < 40_000, "nothing was conflated"


async def test_gap_longer_than_max_replay_is_not_recovered(start_server, ws):
    server = start_server("namespaces.mr.history_size=1000", "namespaces.mr.max_replay=50")
    client = await ws(server)
    epoch = (await client.subscribe_ok("mr.x"))["mr.x"]["epoch"]
    await client.close()
    server.publish_batch([("mr.x", i) for i in range(60)])
    again = await ws(server)
    r = await again.subscribe("mr.x", recover={"mr.x": {"epoch": epoch, "offset": 0}})
    assert r["mr.x"]["recovered"] is False
    r = await again.subscribe("mr.x", recover={"mr.x": {"epoch": epoch, "offset": 20}})
    # Already subscribed on this connection: the second subscribe reports the position only.
    assert "recovered" not in r["mr.x"]
    third = await ws(server)
    r = await third.subscribe("mr.x", recover={"mr.x": {"epoch": epoch, "offset": 20}})
    assert r["mr.x"]["recovered"] is True and r["mr.x"]["replayed"] == 40


async def test_idle_channels_expire_and_return_with_a_new_epoch(start_server):
    server = start_server("namespaces.tmp.channel_ttl_ms=200")
    first = server.publish("tmp.gone", 1)
    assert any(c["channel"] == "tmp.gone" for c in server.get("/api/channels").json()["channels"])
    # The sweeper runs every 5 s.
    deadline = time.time() + 12
    while any(c["channel"] == "tmp.gone" for c in server.get("/api/channels").json()["channels"]):
        assert time.time() < deadline, "idle channel was never expired"
        await asyncio.sleep(0.5)
    assert await server.ametric("ferrocast_channels_expired_total") >= 1
    again = server.publish("tmp.gone", 2)
    assert again["offset"] == 1 and again["epoch"] != first["epoch"]


async def test_a_recovery_larger_than_the_queue_budget_streams_as_the_reader_reads(start_server, ws):
    """A recovery of ~3.5 MB through a 64 KiB queue budget: a reader gets every message in
    order and then live ones, and clients that ask for the same recovery but never read cost
    the server a fraction of it (each replay is a cursor read as its socket drains, never a
    copy of the history)."""
    server = start_server(
        "server.queue_max_bytes=65536",
        "namespaces.big.history_size=10000",
        "namespaces.big.max_replay=10000",
    )
    publisher = server.keepalive_publisher()
    try:
        for start in range(0, 10_000, 1000):
            epoch = publisher.publish_batch(
                [("big.r", {"i": i, "pad": "x" * 300}) for i in range(start, start + 1000)]
            )[-1]["epoch"]
    finally:
        publisher.close()
    recover = {"big.r": {"epoch": epoch, "offset": 0}}

    # Ten clients that ask for all of it and never read.
    baseline = rss_bytes(server.process.pid)
    request = frame(0x1, json.dumps({"op": "subscribe", "id": 1, "channels": ["big.r"], "recover": recover}).encode())
    idle = [NonReader(server.port) for _ in range(10)]
    for c in idle:
        assert c.send(request)
    await asyncio.sleep(1.0)
    growth = rss_bytes(server.process.pid) - baseline
    # Copies of the history would take 10 x 3.5 MB; cursors and full budgets take ~1 MB.
    assert growth < 8 * 1024 * 1024, growth
    for c in idle:
        c.close()

    reader = await ws(server)
    result = await reader.subscribe("big.r", recover=recover)
    assert result["big.r"]["recovered"] is True, result
    assert result["big.r"]["replayed"] == 10_000, result
    server.publish("big.r", {"i": 10_000})
    got = [(await reader.next_msg("big.r"))["data"]["i"] for _ in range(10_001)]
    assert got == list(range(10_001))
