"""The native protocol over /ws, driven by Python's `websockets` client."""

from __future__ import annotations

import asyncio
import re

from ferrocast_e2e.wsclient import next_id


async def test_welcome_frame_fields(server, ws):
    c = await ws(server)
    w = c.welcome
    # The contract's fields (PROTOCOL.md allows adding more).
    assert {"type", "session", "version", "ping_interval_ms"} <= set(w), w
    assert w["type"] == "welcome"
    assert w["version"] == 1
    assert w["ping_interval_ms"] == 25000  # the default
    assert isinstance(w["session"], str) and re.fullmatch(r"[a-z0-9]{8,}", w["session"]), w
    other = await ws(server)
    assert other.welcome["session"] != w["session"], "session ids must be unique"


async def test_subscribe_ack_reports_epoch_and_offset_per_channel(server, ws):
    # A channel with history: its ack offset is the last published offset.
    for i in range(3):
        server.publish("chat.busy", {"i": i})
    c = await ws(server)
    req = next_id()
    await c.send({"op": "subscribe", "id": req, "channels": ["chat.busy", "chat.fresh"]})
    ack = await c.recv_type("ack")
    assert ack["id"] == req
    result = ack["result"]
    assert set(result) == {"chat.busy", "chat.fresh"}
    assert result["chat.busy"]["offset"] == 3
    assert result["chat.fresh"]["offset"] == 0
    for r in result.values():
        assert isinstance(r["epoch"], str) and r["epoch"]
        assert "error" not in r
    # The epoch is the channel's: the HTTP API reports the same one.
    channels = {ch["channel"]: ch for ch in server.get("/api/channels").json()["channels"]}
    assert channels["chat.busy"]["epoch"] == result["chat.busy"]["epoch"]
    # Nothing follows a plain subscribe (chat.* has no snapshot).
    await c.expect_silence(0.3)


async def test_published_messages_arrive_in_order_with_offsets_growing_by_one(server, ws):
    c = await ws(server)
    sub = await c.subscribe_ok("chat.room1")
    epoch, start = sub["chat.room1"]["epoch"], sub["chat.room1"]["offset"]
    results = []
    for i in range(20):
        results.append(await server.apublish("chat.room1", {"n": i, "text": f"hello {i}"}))
    assert [r["offset"] for r in results] == list(range(start + 1, start + 21))
    assert {r["epoch"] for r in results} == {epoch}
    for i in range(20):
        msg = await c.next_msg("chat.room1")
        assert msg["type"] == "msg"
        assert msg["offset"] == start + 1 + i, msg
        assert msg["epoch"] == epoch
        assert msg["data"] == {"n": i, "text": f"hello {i}"}
    # Channels are independent: another channel's offsets start at 1.
    other = await server.apublish("chat.room2", {"x": 1})
    assert other["offset"] == 1


async def test_batch_publish_arrives_in_order(server, ws):
    c = await ws(server)
    await c.subscribe_ok("chat.a", "chat.b")
    results = await server.apublish_batch(
        [("chat.a", 1), ("chat.b", 2), ("chat.a", 3), ("chat.a", {"four": 4})]
    )
    assert [(r["channel"], r["offset"]) for r in results] == [
        ("chat.a", 1),
        ("chat.b", 1),
        ("chat.a", 2),
        ("chat.a", 3),
    ]
    got = [await c.next_msg() for _ in range(4)]
    assert [(m["channel"], m["offset"], m["data"]) for m in got] == [
        ("chat.a", 1, 1),
        ("chat.b", 1, 2),
        ("chat.a", 2, 3),
        ("chat.a", 3, {"four": 4}),
    ]


async def test_unsubscribe_acks_and_stops_delivery(server, ws):
    c = await ws(server)
    await c.subscribe_ok("chat.u", "chat.keep")
    await server.apublish("chat.u", "before")
    assert (await c.next_msg("chat.u"))["data"] == "before"

    req = next_id()
    await c.send({"op": "unsubscribe", "id": req, "channels": ["chat.u"]})
    ack = await c.recv_type("ack")
    assert ack == {"type": "ack", "id": req}

    await server.apublish("chat.u", "after")
    await server.apublish("chat.keep", "still here")
    # The next frame is the message on the channel still subscribed, not "after".
    msg = await c.next_msg()
    assert (msg["channel"], msg["data"]) == ("chat.keep", "still here")
    await c.expect_silence(0.3)
    # The server no longer counts the subscription.
    channels = {ch["channel"]: ch for ch in server.get("/api/channels").json()["channels"]}
    assert channels["chat.u"]["subscribers"] == 0
    assert channels["chat.keep"]["subscribers"] == 1


async def test_client_publish_allowed_on_chat(server, ws):
    publisher = await ws(server)
    subscriber = await ws(server)
    sub = await subscriber.subscribe_ok("chat.lobby")
    reply = await publisher.request(
        {"op": "publish", "channel": "chat.lobby", "data": {"from": "py", "text": "hi"}}
    )
    assert reply["type"] == "ack", reply
    result = reply["result"]
    assert result["channel"] == "chat.lobby"
    assert result["offset"] == sub["chat.lobby"]["offset"] + 1
    assert result["epoch"] == sub["chat.lobby"]["epoch"]
    msg = await subscriber.next_msg("chat.lobby")
    assert msg["offset"] == result["offset"]
    assert msg["data"] == {"from": "py", "text": "hi"}
    # The publisher is not subscribed, so it gets nothing more.
    await publisher.expect_silence(0.3)


async def test_client_publish_forbidden_on_ticks(server, ws):
    watcher = await ws(server)
    await watcher.subscribe_ok("ticks.AAPL")
    c = await ws(server)
    req = next_id()
    await c.send({"op": "publish", "id": req, "channel": "ticks.AAPL", "data": {"price": 1}})
    err = await c.recv_type("error")
    assert err["id"] == req
    assert err["code"] == "forbidden", err
    assert isinstance(err["message"], str) and "ticks" in err["message"]
    # Nothing was published.
    await watcher.expect_silence(0.3)
    channels = {ch["channel"]: ch for ch in server.get("/api/channels").json()["channels"]}
    assert channels["ticks.AAPL"]["offset"] == 0
    # And the connection stays usable.
    pong = await c.request({"op": "ping"})
    assert pong["type"] == "pong"


async def test_ping_gets_pong_with_the_same_id(server, ws):
    c = await ws(server)
    for req in (7, 123456789, 0):
        await c.send({"op": "ping", "id": req})
        assert await c.recv() == {"type": "pong", "id": req}
    await c.send({"op": "ping"})
    assert await c.recv() == {"type": "pong", "id": None}


async def test_ws_path_aliases_all_serve_the_protocol(start_server, ws):
    server = start_server('server.ws_paths=["/ws","/ws/price","/api/socket"]')
    clients = {}
    for path in ("/ws", "/ws/price", "/api/socket"):
        c = await ws(server, path)
        assert c.welcome["type"] == "welcome"
        await c.subscribe_ok("chat.alias")
        clients[path] = c
    published = await server.apublish("chat.alias", {"v": 42})
    for path, c in clients.items():
        msg = await c.next_msg("chat.alias")
        assert (msg["offset"], msg["data"]) == (published["offset"], {"v": 42}), path
    # A path that is not configured is not a WebSocket endpoint.
    assert server.get("/ws/other").status == 404


async def test_resubscribe_recovers_missed_messages(server, ws):
    c = await ws(server)
    sub = await c.subscribe_ok("chat.rec")
    epoch = sub["chat.rec"]["epoch"]
    await server.apublish("chat.rec", "m1")
    first = await c.next_msg("chat.rec")
    await c.close()
    for m in ("m2", "m3", "m4"):
        await server.apublish("chat.rec", m)
    c2 = await ws(server)
    result = await c2.subscribe(
        "chat.rec", recover={"chat.rec": {"epoch": epoch, "offset": first["offset"]}}
    )
    assert result["chat.rec"]["recovered"] is True, result
    assert result["chat.rec"]["offset"] == first["offset"] + 3
    replay = [await c2.next_msg("chat.rec") for _ in range(3)]
    assert [(m["offset"], m["data"]) for m in replay] == [
        (first["offset"] + 1, "m2"),
        (first["offset"] + 2, "m3"),
        (first["offset"] + 3, "m4"),
    ]
    # A wrong epoch cannot be recovered.
    c3 = await ws(server)
    result = await c3.subscribe("chat.rec", recover={"chat.rec": {"epoch": "nope", "offset": 1}})
    assert result["chat.rec"]["recovered"] is False, result


async def test_many_subscribers_each_get_every_message(server, ws):
    clients = [await ws(server) for _ in range(10)]
    for c in clients:
        await c.subscribe_ok("chat.fan")
    await server.apublish_batch([("chat.fan", i) for i in range(50)])

    async def collect(c):
        return [(await c.next_msg("chat.fan"))["data"] for _ in range(50)]

    got = await asyncio.gather(*(collect(c) for c in clients))
    for g in got:
        assert g == list(range(50))
