"""Server heartbeats: `{"type":"ping"}` every ping_interval_ms, 4009 without a pong."""

from __future__ import annotations

import asyncio
import time

from websockets.protocol import State

FAST = ("server.ping_interval_ms=300", "server.pong_timeout_ms=300")


async def test_welcome_announces_the_configured_interval(start_server, ws):
    server = start_server(*FAST)
    c = await ws(server)
    assert c.welcome["ping_interval_ms"] == 300


async def test_client_that_answers_pongs_stays_open(start_server, ws):
    server = start_server(*FAST)
    c = await ws(server)
    pings = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while (remaining := deadline - loop.time()) > 0:
        try:
            frame = await c.recv(timeout=remaining, skip_pings=False)
        except TimeoutError:
            break
        assert frame == {"type": "ping"}, frame
        pings += 1
        await c.send({"op": "pong"})
    # 2 s at one ping per 300 ms: about 6; allow for scheduling.
    assert 4 <= pings <= 8, pings
    assert c.ws.state is State.OPEN
    # Still fully usable.
    assert (await c.request({"op": "ping"}))["type"] == "pong"
    assert await server.ametric("ferrocast_closes_total", code="4009") is None


async def test_client_that_never_answers_is_closed_with_4009(start_server, ws):
    server = start_server(*FAST)
    c = await ws(server)
    started = time.monotonic()
    closed = await c.wait_closed(timeout=5)
    elapsed = time.monotonic() - started
    assert closed.code == 4009, closed
    # It did get a ping before being dropped, and was not dropped before the timeout.
    assert {"type": "ping"} in closed.frames, closed.frames
    assert elapsed >= 0.5, elapsed
    assert elapsed < 3.0, elapsed
    assert await server.ametric("ferrocast_closes_total", code="4009") == 1


async def test_pong_keeps_one_client_alive_while_silent_one_dies(start_server, ws):
    server = start_server(*FAST)
    silent = await ws(server)
    talker = await ws(server)
    await talker.subscribe_ok("chat.hb")

    async def answer_pings(seconds: float) -> list:
        msgs = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            try:
                frame = await talker.recv(timeout=remaining, skip_pings=False)
            except TimeoutError:
                break
            if frame == {"type": "ping"}:
                await talker.send({"op": "pong"})
            else:
                msgs.append(frame)
        return msgs

    answering = asyncio.create_task(answer_pings(2.0))
    closed = await silent.wait_closed(timeout=5)
    assert closed.code == 4009
    await server.apublish("chat.hb", {"alive": True})
    msgs = await answering
    assert [m["data"] for m in msgs if m.get("type") == "msg"] == [{"alive": True}]
    assert talker.ws.state is State.OPEN
    # The close reason says what happened.
    assert "pong" in closed.reason.lower() or "heartbeat" in closed.reason.lower(), closed
