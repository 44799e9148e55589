"""Misbehaving clients get the exact error or close code, and nobody else notices.

Every test here keeps a second, healthy connection subscribed to a channel of its own and
checks afterwards that it still receives published messages in order.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.protocol import State

from ferrocast_e2e.wsclient import next_id, small_rcvbuf_socket


async def test_malformed_json_gets_bad_request_and_connection_stays_open(server, ws, healthy):
    good = await healthy(server)
    c = await ws(server)
    for junk in ("{nope", "not json at all", '{"op":"subscribe"', "[1,2,3]", '"just a string"'):
        await c.send_raw(junk)
        err = await c.recv_type("error")
        assert err["code"] == "bad_request", (junk, err)
        assert err["id"] is None, (junk, err)
        assert {"type", "id", "code", "message"} <= set(err), err
        assert isinstance(err["message"], str) and err["message"], err
    assert c.ws.state is State.OPEN
    # The same connection still works normally.
    assert (await c.request({"op": "ping"}))["type"] == "pong"
    await c.subscribe_ok("chat.after-junk")
    await good.check()
    errors = await server.ametric("ferrocast_frame_errors_total", code="bad_request")
    assert errors == 5, errors


async def test_bad_request_variants_echo_the_id_when_readable(server, ws, healthy):
    good = await healthy(server)
    c = await ws(server)
    cases = [
        ({"op": "subscribe", "id": 11}, "bad_request", 11),  # no channels
        ({"op": "subscribe", "id": 12, "channels": "chat.x"}, "bad_request", 12),  # not a list
        ({"op": "publish", "id": 13, "channel": "chat.x"}, "bad_request", 13),  # no data
        ({"id": 14}, "bad_request", 14),  # no op
        ({"op": "ping", "id": "abc"}, "bad_request", None),  # id not an integer
    ]
    for frame, code, echoed in cases:
        await c.send(frame)
        err = await c.recv_type("error")
        assert (err["code"], err["id"]) == (code, echoed), (frame, err)
    await good.check()


async def test_unknown_op_gets_unknown_op_with_id(server, ws, healthy):
    good = await healthy(server)
    c = await ws(server)
    await c.send({"op": "dance", "id": 77, "channels": ["chat.x"]})
    err = await c.recv_type("error")
    assert err["code"] == "unknown_op", err
    assert err["id"] == 77
    assert "dance" in err["message"]
    # Without an id, the id is null.
    await c.send({"op": "teleport"})
    err = await c.recv_type("error")
    assert (err["code"], err["id"]) == ("unknown_op", None), err
    assert c.ws.state is State.OPEN
    await good.check()


INVALID_CHANNELS = [
    "bad name",  # space
    "",  # empty
    "x" * 256,  # too long
    "ticks/AAPL",  # slash
    "ticks.ÄÖ",  # non-ASCII
    "chat.lobby\n",  # control character
]


async def test_invalid_channel_names_fail_per_channel_in_the_ack(server, ws, healthy):
    good = await healthy(server)
    c = await ws(server)
    longest_ok = "c" * 255
    channels = ["chat.ok", longest_ok, *INVALID_CHANNELS]
    req = next_id()
    await c.send({"op": "subscribe", "id": req, "channels": channels})
    ack = await c.recv_type("ack")
    assert ack["id"] == req
    result = ack["result"]
    assert set(result) == set(channels)
    for ch in ("chat.ok", longest_ok):
        assert "error" not in result[ch] and result[ch]["offset"] == 0, (ch, result[ch])
    for ch in INVALID_CHANNELS:
        err = result[ch].get("error")
        assert err is not None, (ch, result[ch])
        assert err["code"] == "invalid_channel", (ch, err)
        assert isinstance(err["message"], str) and err["message"]
        assert "epoch" not in result[ch]
    # The valid subscriptions work; the invalid ones created nothing.
    await server.apublish("chat.ok", "fine")
    assert (await c.next_msg("chat.ok"))["data"] == "fine"
    names = {ch["channel"] for ch in server.get("/api/channels").json()["channels"]}
    assert not names & set(INVALID_CHANNELS)
    # Publishing from the client to an invalid channel is an error too.
    reply = await c.request({"op": "publish", "channel": "chat.bad name", "data": 1})
    assert (reply["type"], reply["code"]) == ("error", "invalid_channel"), reply
    await good.check()


async def test_too_many_channels_in_one_subscribe(start_server, ws, healthy):
    server = start_server("server.max_channels_per_request=3")
    good = await healthy(server)
    c = await ws(server)
    four = [f"chat.many{i}" for i in range(4)]
    req = next_id()
    await c.send({"op": "subscribe", "id": req, "channels": four})
    err = await c.recv_type("error")
    assert (err["code"], err["id"]) == ("too_many_channels", req), err
    assert "3" in err["message"]
    # None of them was subscribed.
    await server.apublish("chat.many0", "x")
    await c.expect_silence(0.3)
    # Unsubscribe has the same limit.
    await c.send({"op": "unsubscribe", "id": req + 1000, "channels": four})
    err = await c.recv_type("error")
    assert (err["code"], err["id"]) == ("too_many_channels", req + 1000), err
    # Three at once are fine.
    await c.subscribe_ok(*four[:3])
    await good.check()


async def test_oversized_frame_closes_with_1009(server, ws, healthy):
    good = await healthy(server)
    before = await server.ametric("ferrocast_closes_total", code="1009")
    assert before is None
    # Exactly at the limit (65536 bytes by default) is accepted...
    at_limit = await ws(server)
    frame = {"op": "ping", "id": 5, "pad": ""}
    frame["pad"] = "p" * (65536 - len(json.dumps(frame)))
    text = json.dumps(frame)
    assert len(text.encode()) == 65536
    await at_limit.send_raw(text)
    assert await at_limit.recv() == {"type": "pong", "id": 5}
    # ...one byte more is not.
    c = await ws(server)
    await c.send_raw(text[:-2] + 'p"}')
    closed = await c.wait_closed(timeout=10)
    assert closed.code == 1009, closed
    assert "65536" in closed.reason, closed
    assert closed.frames == []
    await good.check()
    assert at_limit.ws.state is State.OPEN
    assert await server.ametric("ferrocast_closes_total", code="1009") == 1


async def test_oversized_frame_limit_is_configurable(start_server, ws, healthy):
    server = start_server("server.max_frame_bytes=1024")
    good = await healthy(server)
    c = await ws(server)
    await c.send({"op": "publish", "id": 1, "channel": "chat.big", "data": "x" * 1100})
    closed = await c.wait_closed(timeout=10)
    assert closed.code == 1009, closed
    await good.check()


async def test_binary_frame_closes_with_1003(server, ws, healthy):
    good = await healthy(server)
    c = await ws(server)
    await c.send_raw(json.dumps({"op": "ping", "id": 1}).encode())
    closed = await c.wait_closed(timeout=10)
    assert closed.code == 1003, closed
    assert closed.frames == []
    await good.check()
    assert await server.ametric("ferrocast_closes_total", code="1003") == 1


async def test_disallowed_origin_closes_with_1008(start_server, ws, healthy):
    server = start_server('server.allowed_origins=["https://good.example"]')
    good = await healthy(server)  # no Origin header: a non-browser client, allowed
    bad = await ws(server, welcome=False, origin="https://evil.example")
    closed = await bad.wait_closed(timeout=10)
    assert closed.code == 1008, closed
    assert not any(isinstance(f, dict) and f.get("type") == "welcome" for f in closed.frames)
    ok = await ws(server, origin="https://good.example")
    assert ok.welcome["type"] == "welcome"
    await ok.subscribe_ok("chat.origin")
    await server.apublish("chat.origin", 1)
    assert (await ok.next_msg("chat.origin"))["data"] == 1
    await good.check()


async def test_connection_limit_closes_the_extra_one_with_1013(start_server, ws, healthy):
    server = start_server("server.max_connections=2")
    good = await healthy(server)  # connection 1
    second = await ws(server)  # connection 2
    third = await ws(server, welcome=False)
    closed = await third.wait_closed(timeout=10)
    assert closed.code == 1013, closed
    assert closed.frames == []
    await good.check()
    # Room again once one leaves.
    await second.close()
    deadline = time.monotonic() + 5
    while await server.ametric("ferrocast_connections", transport="ws") != 1:
        assert time.monotonic() < deadline, "connection count did not drop"
        await asyncio.sleep(0.05)
    fourth = await ws(server)
    assert fourth.welcome["type"] == "welcome"
    assert await server.ametric("ferrocast_closes_total", code="1013") == 1


@pytest.mark.slow
async def test_reader_that_stops_reading_is_closed_with_4008(start_server, ws, healthy):
    server = start_server("server.queue_max_bytes=16384")
    good = await healthy(server)
    # A reader that keeps up, on the same channel as the slow one.
    fast = await ws(server)
    await fast.subscribe_ok("ticks.flood")
    fast_offsets: list[int] = []

    async def read_fast() -> None:
        while True:
            msg = await fast.next_msg("ticks.flood", timeout=30)
            fast_offsets.append(msg["offset"])

    # A client with a small socket buffer whose library stops reading after a few frames
    # (max_queue) while the test does not call recv().
    slow = await ws(server, sock=small_rcvbuf_socket(server.port), max_queue=4)
    sub = await slow.subscribe_ok("ticks.flood")
    assert sub["ticks.flood"]["offset"] == 0

    reader = asyncio.create_task(read_fast())
    publisher = server.keepalive_publisher()
    pad = "x" * 1000
    published = 0
    overflowed = None
    deadline = time.monotonic() + 40
    try:
        # Small paced batches (4 messages of 1 KB every 5 ms) are easy for a reader that
        # keeps up, even with a 16 KB queue; the one that does not read fills the kernel's
        # socket buffers and then its queue overflows.
        while not overflowed:
            assert time.monotonic() < deadline, (
                f"no slow-consumer overflow after publishing {published} messages of 1 KB"
            )
            for _ in range(20):
                batch = [("ticks.flood", {"seq": published + i, "pad": pad}) for i in range(4)]
                results = await asyncio.to_thread(publisher.publish_batch, batch)
                assert results[-1]["offset"] == published + 4
                published += 4
                await asyncio.sleep(0.005)
            overflowed = await server.ametric(
                "ferrocast_queue_overflows_total", policy="disconnect"
            )
            assert not reader.done(), reader
    finally:
        publisher.close()
    assert overflowed == 1, "only the slow reader may overflow"
    # Everyone else is fine meanwhile: the fast reader got everything, in order.
    loop_deadline = time.monotonic() + 10
    while len(fast_offsets) < published:
        assert time.monotonic() < loop_deadline, (len(fast_offsets), published)
        assert not reader.done(), reader
        await asyncio.sleep(0.05)
    reader.cancel()
    assert fast_offsets == list(range(1, published + 1))
    assert fast.ws.state is State.OPEN
    await good.check()
    # When the slow client reads again it finds what was sent, in order and without gaps,
    # then the close code telling it to recover from history.
    closed = await slow.wait_closed(timeout=30)
    assert closed.code == 4008, (closed.code, closed.reason, len(closed.frames))
    msgs = [f for f in closed.frames if isinstance(f, dict) and f.get("type") == "msg"]
    assert len(msgs) == len(closed.frames), "only messages were expected"
    offsets = [m["offset"] for m in msgs]
    assert offsets == list(range(1, len(offsets) + 1)), "messages must not skip"
    assert 0 < len(msgs) < published
    assert [m["data"]["seq"] for m in msgs[:3]] == [0, 1, 2]
    await good.check()
    assert await server.ametric("ferrocast_closes_total", code="4008") == 1
    assert await server.ametric("ferrocast_connections", transport="ws") == 2
    # The channel went on: its top offset is everything published.
    page = server.get("/api/channels/ticks.flood/history?limit=1").json()
    assert page["offset"] == published


@pytest.mark.slow
async def test_reader_that_never_reads_again_is_dropped_soon_after_overflow(start_server, ws):
    """A client that stopped reading for good (a frozen tab, a dead peer whose TCP stays up)
    must not keep its connection, socket buffers and slot until the heartbeat notices: once
    its queue overflows on a disconnect-policy channel, the server closes it (4008) within a
    few seconds, whether or not the close frame can still reach it."""
    server = start_server("server.queue_max_bytes=16384")
    slow = await ws(server, sock=small_rcvbuf_socket(server.port), max_queue=4)
    await slow.subscribe_ok("ticks.stuck")
    publisher = server.keepalive_publisher()
    pad = "x" * 1000
    published = 0
    deadline = time.monotonic() + 40
    try:
        # Paced so that the socket fills first and the queue overflows afterwards, as with a
        # real feed (a burst that overflows the queue at once is a different case).
        while not await server.ametric("ferrocast_queue_overflows_total", policy="disconnect"):
            assert time.monotonic() < deadline, f"no overflow after {published} messages"
            for _ in range(20):
                batch = [("ticks.stuck", {"seq": published + i, "pad": pad}) for i in range(4)]
                await asyncio.to_thread(publisher.publish_batch, batch)
                published += 4
                await asyncio.sleep(0.005)
    finally:
        publisher.close()
    overflow_at = time.monotonic()
    # The client never reads again. Within a few seconds the server must have let go.
    while await server.ametric("ferrocast_connections", transport="ws") != 0:
        waited = time.monotonic() - overflow_at
        assert waited < 6, (
            f"the connection is still open {waited:.1f}s after its queue overflowed "
            f"({published} messages published; the client stopped reading)"
        )
        await asyncio.sleep(0.1)
    assert await server.ametric("ferrocast_closes_total", code="4008") == 1
