"""The default `ferrocast serve` runs the demo market simulator and the dashboard."""

from __future__ import annotations

import asyncio
import time

TICK_FIELDS = {"sym", "price", "size", "ts"}
QUOTE_FIELDS = {"sym", "bid", "ask", "bid_size", "ask_size", "ts"}


async def test_default_serve_publishes_ticks_and_quotes(start_server, ws):
    # No flags but --listen: the out-of-the-box experience.
    server = start_server(simulator=True, test_defaults=False)
    assert server.argv[1:] == ["serve", "--listen", f"127.0.0.1:{server.port}"]
    c = await ws(server)
    await c.subscribe_ok("ticks.AAPL", "quotes.AAPL")
    seen: dict[str, list[dict]] = {"ticks.AAPL": [], "quotes.AAPL": []}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not all(seen.values()):
        assert loop.time() < deadline, {k: len(v) for k, v in seen.items()}
        msg = await c.next_msg(timeout=deadline - loop.time())
        seen[msg["channel"]].append(msg)
    now_ms = time.time() * 1000
    tick = seen["ticks.AAPL"][0]["data"]
    assert TICK_FIELDS <= set(tick), tick
    assert tick["sym"] == "AAPL"
    assert tick["price"] > 0 and tick["size"] > 0, tick
    assert abs(tick["ts"] - now_ms) < 60_000, tick
    quote = seen["quotes.AAPL"][0]["data"]
    assert QUOTE_FIELDS <= set(quote), quote
    assert quote["sym"] == "AAPL"
    assert 0 < quote["bid"] <= quote["ask"], quote
    assert quote["bid_size"] > 0 and quote["ask_size"] > 0, quote
    assert abs(quote["ts"] - now_ms) < 60_000, quote
    # Offsets of a channel grow by one.
    ticks = [m["offset"] for m in seen["ticks.AAPL"]]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))


async def test_default_serve_serves_the_dashboard(start_server):
    server = start_server(simulator=True, test_defaults=False)
    r = server.get("/")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
    stats = server.get("/api/stats").json()
    assert stats["uptime_s"] >= 0


async def test_simulator_can_be_limited_to_given_symbols(start_server, ws):
    server = start_server(
        "simulator.symbols=ZZTEST", "simulator.rate=200", simulator=True
    )
    c = await ws(server)
    await c.subscribe_ok("ticks.ZZTEST")
    msg = await c.next_msg("ticks.ZZTEST", timeout=10)
    assert msg["data"]["sym"] == "ZZTEST"
    # Only that symbol is simulated.
    await asyncio.sleep(0.5)
    names = {ch["channel"] for ch in server.get("/api/channels").json()["channels"]}
    assert not any(n.startswith(("ticks.", "quotes.")) and "ZZTEST" not in n for n in names)


async def test_simulated_trades_build_candles(start_server, ws):
    server = start_server("simulator.symbols=CNDL", "simulator.rate=200", simulator=True)
    c = await ws(server)
    await c.subscribe_ok("candles.CNDL.1s")
    msg = await c.next_msg("candles.CNDL.1s", timeout=10)
    bar = msg["data"]
    assert bar["sym"] == "CNDL"
    for k in ("open", "high", "low", "close", "volume", "start", "end"):
        assert k in bar, bar
    assert bar["low"] <= min(bar["open"], bar["close"]) <= max(bar["open"], bar["close"]) <= bar["high"]
    assert bar["end"] - bar["start"] == 1000
