"""Upstream feeds end to end: the real `ferrocast simulate` (Massive, Binance) as the
upstream, the real `ferrocast serve --config` with [[feeds]] pointing at it, and Python
WebSocket clients downstream.

What is asserted from the simulator's side (GET /debug/subscriptions) and from the
gateway's (/readyz, /api/feeds, /metrics, client messages): demand-driven subscribe and
unsubscribe, upstream bars taking precedence, an upstream killed with SIGKILL and restarted
(clients keep their subscriptions and get data again), a rejected key (failed, 503, no
reconnect storm), malformed frames and a stalled upstream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from ferrocast_e2e.procs import REPO_ROOT, ManagedProcess, free_port, http_status
from ferrocast_e2e.server import clean_env, ferrocast_bin

KEY = "e2e-key"


class Upstream:
    """A `ferrocast simulate` process and its control API."""

    def __init__(self, proc: ManagedProcess, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict:
        with urllib.request.urlopen(self.base + "/debug/subscriptions", timeout=5) as r:
            return json.loads(r.read())

    def subscriptions(self) -> set[str]:
        return set(self.state()["subscriptions"])

    def counter(self, name: str) -> int:
        return self.state()["counters"].get(name, 0)

    def control(self, path: str) -> dict:
        req = urllib.request.Request(self.base + path, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())


@pytest.fixture
def upstream(artifacts, track_process):
    """Starts `ferrocast simulate PROTOCOL` on a port (a free one unless given)."""
    count = 0

    def start(protocol: str = "massive", *args: str, port: int | None = None) -> Upstream:
        nonlocal count
        count += 1
        port = port or free_port()
        argv = [str(ferrocast_bin()), "simulate", protocol, "--listen", f"127.0.0.1:{port}", *args]
        proc = ManagedProcess(
            f"simulate-{protocol}", argv, artifacts / f"simulate-{count}.log", clean_env()
        ).start()
        track_process(proc)
        proc.wait_until(
            lambda: http_status(f"http://127.0.0.1:{port}/debug/subscriptions") == 200,
            20,
            "the simulator's control API answered",
        )
        return Upstream(proc, port)

    return start


def massive_config(path: Path, port: int, **overrides: str) -> Path:
    """A server config with one Massive stocks feed at the simulator on `port`."""
    keys = {
        "linger_ms": "300",
        "ping_interval_ms": "300",
        "read_timeout_ms": "1500",
        "backoff_initial_ms": "100",
        "backoff_max_ms": "500",
        "events": '["T", "Q", "AM"]',
    }
    keys.update(overrides)
    body = "\n".join(f"{k} = {v}" for k, v in keys.items())
    path.write_text(
        f"""[simulator]
enabled = false

[[feeds]]
name = "stocks"
kind = "massive"
url = "ws://127.0.0.1:{port}/stocks"
api_key_env = "MASSIVE_API_KEY"
required = true
{body}
"""
    )
    return path


async def until(what: str, cond, timeout: float = 10.0):
    """Polls `cond` (sync or async) until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def collect(client, seconds: float) -> list[dict]:
    """Every `msg` frame received within `seconds`."""
    out: list[dict] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await client.recv(timeout=left)
        except (asyncio.TimeoutError, TimeoutError):
            break
        if isinstance(frame, dict) and frame.get("type") == "msg":
            out.append(frame)
        elif isinstance(frame, list):
            out.extend(f for f in frame if f.get("type") == "msg")
    return out


async def unsubscribe(client, *channels: str) -> None:
    """Unsubscribes, skipping the data frames that may arrive before the ack."""
    await client.send({"op": "unsubscribe", "id": 9_000, "channels": list(channels)})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        frame = await client.recv(timeout=5)
        if isinstance(frame, dict) and frame.get("id") == 9_000:
            assert frame["type"] == "ack", frame
            return
    raise AssertionError("no ack for unsubscribe")


async def test_demand_driven_massive_feed(upstream, start_server, ws, artifacts):
    up = upstream("massive", "--api-key", KEY, "--rate", "100", "--minute-bar-every-ms", "300")
    server = start_server(
        config=massive_config(artifacts / "ferrocast.toml", up.port),
        env={"MASSIVE_API_KEY": KEY},
    )
    await until("ready", lambda: server.get("/readyz").status == 200)
    assert up.subscriptions() == set(), "nothing subscribed upstream before a client asks"

    client = await ws(server)
    await client.subscribe_ok("ticks.AAPL", "candles.AAPL.1m")
    await until("T.AAPL and AM.AAPL upstream", lambda: up.subscriptions() == {"T.AAPL", "AM.AAPL"})
    # A second client on the same channel shares the one upstream subscription.
    other = await ws(server)
    await other.subscribe_ok("ticks.AAPL")

    msgs = await collect(client, 2.0)
    channels = {m["channel"] for m in msgs}
    assert channels == {"ticks.AAPL", "candles.AAPL.1m"}, channels
    assert all(m["data"]["src"] == "massive" for m in msgs), "every candle is Massive's own"
    bars = [m["data"] for m in msgs if m["channel"] == "candles.AAPL.1m"]
    assert all(b["forming"] is False and b["end"] - b["start"] == 60_000 for b in bars), bars
    assert up.subscriptions() == {"T.AAPL", "AM.AAPL"}

    await unsubscribe(client, "ticks.AAPL", "candles.AAPL.1m")
    await asyncio.sleep(0.6)
    assert up.subscriptions() == {"T.AAPL"}, "the other client still watches ticks.AAPL"
    await unsubscribe(other, "ticks.AAPL")
    await until("nothing upstream", lambda: up.subscriptions() == set())

    feeds = server.get("/api/feeds").json()["feeds"]
    stocks = next(f for f in feeds if f["name"] == "stocks")
    assert (stocks["state"], stocks["required"]) == ("live", True), stocks
    assert server.metric("ferrocast_feed_state", feed="stocks", kind="massive", state="live") == 1
    assert server.metric("ferrocast_feed_messages_in_total", feed="stocks") > 0
    assert server.metric("ferrocast_feed_latency_seconds_count", feed="stocks") > 0


async def test_upstream_killed_and_restarted(upstream, start_server, ws, artifacts):
    up = upstream("massive", "--api-key", KEY, "--rate", "50")
    port = up.port
    server = start_server(
        config=massive_config(artifacts / "ferrocast.toml", port),
        env={"MASSIVE_API_KEY": KEY},
    )
    await until("ready", lambda: server.get("/readyz").status == 200)
    client = await ws(server)
    await client.subscribe_ok("ticks.MSFT", "quotes.MSFT")
    await until("data", lambda: up.subscriptions() == {"T.MSFT", "Q.MSFT"})
    assert await collect(client, 1.0), "data before the kill"

    up.proc.signal(signal.SIGKILL)
    up.proc.wait(5)
    await until("not ready while the upstream is gone", lambda: server.get("/readyz").status == 503)
    reason = server.get("/readyz").json()["reason"]
    assert "stocks" in reason and "backing_off" in reason, reason
    await collect(client, 1.0)  # drain what was in flight

    up2 = upstream("massive", "--api-key", KEY, "--rate", "50", port=port)
    await until("resubscribed", lambda: up2.subscriptions() == {"T.MSFT", "Q.MSFT"}, 15)
    # Same client connection, no resubscribe: data flows again.
    msgs = await until("data again", lambda: collect(client, 0.5), 10)
    assert {m["channel"] for m in msgs} <= {"ticks.MSFT", "quotes.MSFT"}
    assert server.get("/readyz").status == 200
    assert server.metric("ferrocast_feed_reconnects_total", feed="stocks") >= 1


async def test_rejected_key_fails_without_a_reconnect_storm(upstream, start_server, artifacts):
    up = upstream("massive", "--api-key", "the-right-key")
    server = start_server(
        config=massive_config(artifacts / "ferrocast.toml", up.port),
        env={"MASSIVE_API_KEY": "a-wrong-key"},
    )
    await until("unready", lambda: "failed" in server.get("/readyz").text)
    r = server.get("/readyz")
    assert r.status == 503
    assert "auth_failed" in r.json()["reason"], r.text
    # With a 100 ms backoff a retrying connector would have made dozens of attempts.
    await asyncio.sleep(3)
    assert up.counter("auth_failed") == 1
    assert up.counter("connections") == 1
    assert server.metric("ferrocast_feed_state", feed="stocks", kind="massive", state="failed") == 1
    assert "rejected the API key" in server.log()


async def test_malformed_frames_and_a_stalled_upstream(upstream, start_server, ws, artifacts):
    up = upstream("massive", "--api-key", KEY, "--rate", "200")
    server = start_server(
        config=massive_config(artifacts / "ferrocast.toml", up.port, read_timeout_ms="1000"),
        env={"MASSIVE_API_KEY": KEY},
    )
    await until("ready", lambda: server.get("/readyz").status == 200)
    client = await ws(server)
    await client.subscribe_ok("ticks.NVDA")
    await until("subscribed", lambda: up.subscriptions() == {"T.NVDA"})

    up.control("/debug/malformed?every=2")
    await until(
        "parse errors counted",
        lambda: (server.metric("ferrocast_feed_parse_errors_total", feed="stocks") or 0) >= 3,
    )
    assert await collect(client, 1.0), "good events still arrive between malformed frames"
    assert server.metric("ferrocast_feed_reconnects_total", feed="stocks") == 0
    up.control("/debug/malformed?every=0")

    up.control("/debug/stall")
    await until(
        "read timeout",
        lambda: server.metric("ferrocast_feed_disconnects_total", feed="stocks", reason="read_timeout"),
    )
    await until("a new connection subscribed", lambda: any(
        c["id"] > 1 and "T.NVDA" in c["subscriptions"] for c in up.state()["connections"]
    ))
    await collect(client, 0.3)
    assert await until("data again", lambda: collect(client, 0.5), 10)


async def test_binance_example_config(upstream, start_server, ws, artifacts):
    """The shipped Binance example, pointed at the Binance simulator."""
    up = upstream("binance", "--rate", "50", "--ping-interval-ms", "500")
    text = (REPO_ROOT / "deploy/examples/binance.toml").read_text()
    text = text.replace(
        'url = "wss://data-stream.binance.vision/stream"', f'url = "ws://127.0.0.1:{up.port}/stream"'
    )
    # The example lingers 30 s after the last client leaves; a test has less patience.
    text = text.replace("linger_ms = 30000", "linger_ms = 300")
    assert f"127.0.0.1:{up.port}" in text and "linger_ms = 300\n" in text
    config = artifacts / "binance.toml"
    config.write_text(text)
    server = start_server(config=config)
    await until("ready", lambda: server.get("/readyz").status == 200)
    await until("always symbol", lambda: up.subscriptions() == {"btcusdt@trade", "btcusdt@bookTicker"})

    client = await ws(server)
    await client.subscribe_ok("ticks.ETHUSDT", "quotes.ETHUSDT", "candles.ETHUSDT.1s")
    await until("ETHUSDT topics", lambda: "ethusdt@trade" in up.subscriptions())
    msgs = await until("data", lambda: collect(client, 1.5), 10)
    by_channel = {m["channel"]: m["data"] for m in msgs}
    assert by_channel["ticks.ETHUSDT"]["src"] == "binance"
    assert by_channel["quotes.ETHUSDT"]["bid"] > 0
    # Candles built by the server from Binance trades (the one-second bar closes soon).
    async def server_candle():
        return [m for m in await collect(client, 0.5) if m["channel"] == "candles.ETHUSDT.1s"]

    candles = await until("a server-built candle", server_candle, 10)
    assert candles[0]["data"]["src"] == "server", candles[0]
    await unsubscribe(client, "ticks.ETHUSDT", "quotes.ETHUSDT", "candles.ETHUSDT.1s")
    await until("ETHUSDT unsubscribed", lambda: "ethusdt@trade" not in up.subscriptions(), 15)
    assert up.counter("rate_limited") == 0
    assert up.counter("pong_timeouts") == 0


async def test_a_silent_upstream_turns_the_feed_stale_then_live_again(
    upstream, start_server, ws, artifacts
):
    """An upstream that authenticates and answers pings but sends no data used to stay
    `live` (and /readyz 200) forever."""
    up = upstream("massive", "--api-key", KEY, "--rate", "100", "--silent")
    server = start_server(
        config=massive_config(artifacts / "ferrocast.toml", up.port, stale_after_ms="800"),
        env={"MASSIVE_API_KEY": KEY},
    )
    # Nothing subscribed yet: a quiet upstream is not stale.
    await until("ready", lambda: server.get("/readyz").status == 200)
    await asyncio.sleep(1.2)
    assert server.get("/readyz").status == 200
    assert up.counter("connections") == 1

    client = await ws(server)
    await client.subscribe_ok("ticks.AAPL")
    await until("subscribed upstream", lambda: up.subscriptions() == {"T.AAPL"})

    def stocks() -> dict:
        return next(f for f in server.get("/api/feeds").json()["feeds"] if f["name"] == "stocks")

    feed = await until("stale in /api/feeds", lambda: (f := stocks())["state"] == "stale" and f)
    # The first reason, or the one after an already-made reconnect that is still silent.
    assert (
        "no market data for 800 ms" in feed["reason"]
        or "reconnected after going stale" in feed["reason"]
    ), feed
    # (Each reconnect passes through connecting for a moment, hence the polling.)
    ready = await until(
        "readyz 503 naming the stale feed",
        lambda: (r := server.get("/readyz")).status == 503 and "is stale" in r.text and r,
    )
    assert "stocks" in ready.json()["reason"], ready.text
    await until(
        "the state gauge",
        lambda: server.metric("ferrocast_feed_state", feed="stocks", kind="massive", state="stale")
        == 1,
    )
    assert server.metric("ferrocast_feed_state", feed="stocks", kind="massive", state="live") == 0
    # It reconnects by itself (the simulator sees a new connection, subscribed again).
    await until("a reconnect", lambda: up.counter("connections") >= 2)
    await until("the new connection subscribed", lambda: any(
        c["id"] > 1 and "T.AAPL" in c["subscriptions"] for c in up.state()["connections"]
    ))
    await until(
        "counted as a stale disconnect",
        lambda: server.metric("ferrocast_feed_disconnects_total", feed="stocks", reason="stale"),
    )
    assert "no market data for 800 ms" in server.log()

    up.control("/debug/silent?on=0")
    await until("live again", lambda: stocks()["state"] == "live", 10)
    assert server.get("/readyz").status == 200
    assert await until("data reaches the client", lambda: collect(client, 0.5), 10)
