"""Socket.IO interop with `python-socketio`'s AsyncClient (a client we did not write), over
long-polling only, websocket only and the default polling-then-upgrade: subscribe with an
ack, `message` and per-namespace events, publish where allowed (refused elsewhere), recovery,
a clean disconnect that the server's metrics see, a drain after which the library reconnects
by itself to the next server, the Socket.IO connect timeout, and the first Engine.IO ping
coming one pingInterval after the handshake."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import socketio

#: The namespace `prices` also emits each message's data as `price_update`, the event name
#: apps written for another Socket.IO server listen to.
SETS = ("namespaces.prices.socketio_event=price_update", "server.ping_interval_ms=2000")


class SioClient:
    """An AsyncClient whose `message`, `price_update` and `close` events go to queues."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.messages: asyncio.Queue = asyncio.Queue()
        self.prices: asyncio.Queue = asyncio.Queue()
        self.closes: asyncio.Queue = asyncio.Queue()
        self.sio.on("message", self.messages.put_nowait)
        self.sio.on("price_update", self.prices.put_nowait)
        self.sio.on("close", self.closes.put_nowait)

    async def connect(self, url: str, transports: list[str] | None) -> None:
        await self.sio.connect(url, transports=transports, wait_timeout=5)

    async def call(self, event: str, data) -> dict:
        return await self.sio.call(event, data, timeout=5)

    async def next_message(self, timeout: float = 5.0) -> dict:
        return await asyncio.wait_for(self.messages.get(), timeout)


@pytest.fixture
async def sio_clients():
    clients: list[SioClient] = []

    def make() -> SioClient:
        c = SioClient()
        clients.append(c)
        return c

    yield make
    for c in clients:
        if c.sio.connected:
            await c.sio.disconnect()


async def wait_for_metric(server, name: str, value: float, timeout: float = 5.0, **labels) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        current = await server.ametric(name, **labels)
        if current == value:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} = {current}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "transports, expect",
    [(["polling"], "polling"), (["websocket"], "websocket"), (None, "websocket")],
    ids=["polling", "websocket", "upgrade"],
)
async def test_python_socketio_subscribe_receive_publish_disconnect(
    start_server, sio_clients, transports, expect
):
    server = start_server(*SETS)
    client = sio_clients()
    await client.connect(server.base_url, transports)
    if transports is None:
        # The default client starts with polling and upgrades.
        for _ in range(100):
            if client.sio.transport() == "websocket":
                break
            await asyncio.sleep(0.05)
    assert client.sio.transport() == expect

    chat = f"chat.py{uuid.uuid4().hex[:6]}"
    price = f"prices.P{uuid.uuid4().hex[:4].upper()}"
    results = await client.call("subscribe", [chat, price])
    assert results[chat]["offset"] == 0 and isinstance(results[chat]["epoch"], str), results
    assert results[price]["offset"] == 0, results

    published = await server.apublish(chat, {"text": "hello"})
    msg = await client.next_message()
    assert msg == {
        "channel": chat,
        "offset": published["offset"],
        "epoch": published["epoch"],
        "data": {"text": "hello"},
    }

    await server.apublish(price, {"p": 101.25})
    assert (await client.next_message())["channel"] == price
    assert await asyncio.wait_for(client.prices.get(), 5) == {"p": 101.25}

    ack = await client.call("publish", {"channel": chat, "data": {"from": "python"}})
    assert ack == {"channel": chat, "offset": 2, "epoch": published["epoch"]}
    assert (await client.next_message())["data"] == {"from": "python"}
    refused = await client.call("publish", {"channel": price, "data": 1})
    assert refused["error"]["code"] == "forbidden", refused

    bad = await client.call("subscribe", {"nope": True})
    assert bad["error"]["code"] == "bad_request", bad

    assert await client.call("unsubscribe", [chat]) == {"unsubscribed": [chat]}
    await server.apublish(chat, "after")
    with pytest.raises(TimeoutError):
        await client.next_message(timeout=0.3)

    await wait_for_metric(server, "ferrocast_connections", 1, transport="socketio")
    await client.sio.disconnect()
    await wait_for_metric(server, "ferrocast_connections", 0, transport="socketio")


async def test_python_socketio_recovers_after_reconnect(start_server, sio_clients):
    server = start_server()
    first = sio_clients()
    await first.connect(server.base_url, ["websocket"])
    await first.call("subscribe", "chat.pyrec")
    await server.apublish("chat.pyrec", 1)
    seen = await first.next_message()
    await first.sio.disconnect()

    for n in (2, 3, 4):
        await server.apublish("chat.pyrec", n)
    again = sio_clients()
    await again.connect(server.base_url, None)
    results = await again.call(
        "subscribe",
        {
            "channels": ["chat.pyrec"],
            "recover": {"chat.pyrec": {"epoch": seen["epoch"], "offset": seen["offset"]}},
        },
    )
    assert results["chat.pyrec"]["recovered"] is True, results
    assert results["chat.pyrec"]["replayed"] == 3, results
    assert [(await again.next_message())["data"] for _ in range(3)] == [2, 3, 4]
    await server.apublish("chat.pyrec", 5)
    assert (await again.next_message())["data"] == 5


async def test_python_socketio_is_refused_over_the_connection_limit(start_server, sio_clients):
    server = start_server("server.max_connections=1")
    first = sio_clients()
    await first.connect(server.base_url, ["websocket"])
    second = sio_clients()
    errors: asyncio.Queue = asyncio.Queue()
    second.sio.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await second.connect(server.base_url, ["websocket"])
    # The middleware's refusal reaches the client's connect_error handler, naming the code.
    refusal = await asyncio.wait_for(errors.get(), 5)
    assert "1013" in refusal["message"], refusal
    assert (await first.call("subscribe", "chat.pylimit"))["chat.pylimit"]["offset"] == 0


# --- drain, connect timeout and heartbeat timing -------------------------------------------


def start_on_port(port: int, sets, artifacts, track_process, name: str):
    """A new server at the address of one that drained: what a restart looks like."""
    from ferrocast_e2e.procs import ManagedProcess, http_status
    from ferrocast_e2e.server import FerrocastServer, clean_env, serve_argv

    argv = serve_argv(port, sets)
    proc = ManagedProcess("ferrocast", argv, artifacts / f"{name}.log", clean_env()).start()
    track_process(proc)
    server = FerrocastServer(port, proc, argv, None, list(sets))
    proc.wait_until(
        lambda: http_status(server.base_url + "/healthz", timeout=0.5) == 200,
        20,
        f"/healthz on port {port} answered 200",
    )
    return server


class ReconnectingClient:
    """A python-socketio AsyncClient with its library's own reconnection on, which (like an
    app) subscribes in its connect handler."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.sio = socketio.AsyncClient(reconnection_delay=0.2, reconnection_delay_max=0.5)
        self.subscribed: asyncio.Queue = asyncio.Queue()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.closes: asyncio.Queue = asyncio.Queue()
        self.disconnects: asyncio.Queue = asyncio.Queue()
        self.sio.on("message", self.messages.put_nowait)
        self.sio.on("close", self.closes.put_nowait)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self.disconnects.put_nowait)

    async def _on_connect(self) -> None:
        async def subscribe() -> None:
            self.subscribed.put_nowait(await self.sio.call("subscribe", self.channel, timeout=5))

        # The connect handler must return before the library handles the ack.
        asyncio.get_running_loop().create_task(subscribe())


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_python_socketio_reconnects_by_itself_after_a_drain(
    start_server, artifacts, track_process, transport
):
    """python-socketio reads an Engine.IO close packet or a Socket.IO DISCONNECT as "the
    server meant it" and never reconnects; a drain must drop the transport instead."""
    import signal

    sets = ("server.reconnect_after_ms=200",)
    server = start_server(*sets)
    channel = f"chat.pydrain{transport}"
    client = ReconnectingClient(channel)
    await client.sio.connect(server.base_url, transports=[transport], wait_timeout=5)
    try:
        assert client.sio.transport() == transport
        await asyncio.wait_for(client.subscribed.get(), 5)
        await server.apublish(channel, {"n": 1})
        assert (await asyncio.wait_for(client.messages.get(), 5))["data"] == {"n": 1}

        server.process.signal(signal.SIGTERM)
        close = await asyncio.wait_for(client.closes.get(), 5)
        assert close["code"] == 1001 and '"reconnect":true' in close["reason"], close
        reason = await asyncio.wait_for(client.disconnects.get(), 5)
        # Not "server disconnect": the library keeps trying.
        assert reason == client.sio.reason.TRANSPORT_ERROR, reason
        assert await asyncio.to_thread(server.process.wait, 10) == 0

        nxt = start_on_port(server.port, sets, artifacts, track_process, "next")
        # Only the library's own reconnect subscribes a second time.
        again = await asyncio.wait_for(client.subscribed.get(), 10)
        assert again[channel]["offset"] == 0, again
        assert client.sio.transport() == transport
        await nxt.apublish(channel, {"n": 2})
        assert (await asyncio.wait_for(client.messages.get(), 5))["data"] == {"n": 2}
    finally:
        await client.sio.shutdown()


def eio_poll(server, path: str, method: str = "GET", body: bytes | None = None):
    from ferrocast_e2e.server import http_request

    return http_request(server.base_url + path, method, body, None, 10)


async def test_a_session_that_never_connects_is_closed_after_connect_timeout(start_server):
    """A raw Engine.IO client that opens a session and never sends the Socket.IO CONNECT
    (`40`) is closed after socketio.connect_timeout_ms."""
    import json as jsonlib
    import time

    server = start_server("socketio.connect_timeout_ms=600", "server.ping_interval_ms=5000")
    # Taken before the handshake, so the time measured here is never shorter than the
    # server's own timer.
    started = time.monotonic()
    opened = await asyncio.to_thread(eio_poll, server, "/socket.io/?EIO=4&transport=polling")
    assert opened.status == 200 and opened.text.startswith("0{"), opened.text
    sid = jsonlib.loads(opened.text[1:])["sid"]
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    # Long-polls until the session ends: a `1` close packet, or an error for an unknown sid.
    ended = None
    while time.monotonic() - started < 5:
        r = await asyncio.to_thread(eio_poll, server, path)
        if r.status != 200:
            ended = f"status {r.status}"
            break
        packets = r.text.split("\x1e")
        if "1" in packets:
            ended = "close packet"
            break
        assert all(p in ("2", "6") for p in packets), packets
    elapsed = time.monotonic() - started
    assert ended is not None, "the session stayed open"
    assert elapsed >= 0.5, elapsed  # not closed at once: the timeout applies
    # A client that did send CONNECT within the timeout stays.
    opened = await asyncio.to_thread(eio_poll, server, "/socket.io/?EIO=4&transport=polling")
    sid = jsonlib.loads(opened.text[1:])["sid"]
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert (await asyncio.to_thread(eio_poll, server, path, "POST", b"40")).status == 200
    await asyncio.sleep(1.0)
    r = await asyncio.to_thread(eio_poll, server, path)
    assert r.status == 200 and "1" not in r.text.split("\x1e"), r.text
    assert any(p.startswith("40{") for p in r.text.split("\x1e")), r.text


async def test_first_engineio_ping_comes_after_ping_interval_over_websocket(start_server):
    import time

    import websockets

    interval = 1.5
    server = start_server(f"server.ping_interval_ms={int(interval * 1000)}")
    url = f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket"
    # Taken before the handshake, so a slow client cannot make the ping look early.
    started = time.monotonic()
    async with websockets.connect(url) as ws:
        opened = await asyncio.wait_for(ws.recv(), 5)
        assert opened.startswith("0{") and '"pingInterval":1500' in opened, opened
        await ws.send("40")
        seen = []
        pings = []
        while len(pings) < 2:
            packet = await asyncio.wait_for(ws.recv(), 5)
            if packet == "2":
                pings.append(time.monotonic() - started)
                await ws.send("3")
            else:
                seen.append(packet)
        assert any(p.startswith("40{") for p in seen), seen
    # The first ping one interval after the handshake (not at it), the next one about an
    # interval later (loose: a late first delivery on a busy machine shortens the gap).
    assert pings[0] >= 0.8 * interval, pings
    assert pings[1] - pings[0] >= 0.4 * interval, pings


async def test_first_engineio_ping_comes_after_ping_interval_over_polling(start_server):
    import json as jsonlib
    import time

    interval = 1.5
    server = start_server(f"server.ping_interval_ms={int(interval * 1000)}")
    started = time.monotonic()
    opened = await asyncio.to_thread(eio_poll, server, "/socket.io/?EIO=4&transport=polling")
    sid = jsonlib.loads(opened.text[1:])["sid"]
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert (await asyncio.to_thread(eio_poll, server, path, "POST", b"40")).status == 200
    seen = []
    first_ping = None
    while first_ping is None and time.monotonic() - started < 5:
        r = await asyncio.to_thread(eio_poll, server, path)
        assert r.status == 200, r.text
        for packet in r.text.split("\x1e"):
            if packet == "2":
                first_ping = time.monotonic() - started
            else:
                seen.append(packet)
    assert any(p.startswith("40{") for p in seen), seen
    assert first_ping is not None and first_ping >= 0.8 * interval, first_ping
    # Answering it keeps the session open.
    assert (await asyncio.to_thread(eio_poll, server, path, "POST", b"3")).status == 200


@pytest.mark.parametrize(
    "transports", [["polling"], ["websocket"], None], ids=["polling", "websocket", "upgrade"]
)
async def test_python_socketio_sees_the_first_ping_after_ping_interval(start_server, transports):
    """The same timing through python-socketio's own Engine.IO client, including its
    polling-then-upgrade path (which upgrades before its first poll)."""
    import time

    from engineio import packet as eio_packet

    interval = 1.5
    server = start_server(f"server.ping_interval_ms={int(interval * 1000)}")
    sio = socketio.AsyncClient(reconnection=False)
    pings: list[float] = []
    started = time.monotonic()
    receive = sio.eio._receive_packet

    async def spy(pkt):
        if pkt.packet_type == eio_packet.PING:
            pings.append(time.monotonic() - started)
        await receive(pkt)

    sio.eio._receive_packet = spy
    await sio.connect(server.base_url, transports=transports, wait_timeout=5)
    try:
        deadline = time.monotonic() + 3 * interval + 2
        while len(pings) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if transports is None:
            assert sio.transport() == "websocket"
        assert len(pings) >= 2, pings
        assert pings[0] >= 0.8 * interval, pings
        # Not a regular ping taken for the early one (which would put the first at 2x).
        assert pings[0] < 1.9 * interval, pings
        assert sio.connected, "the held-back first ping was answered: no heartbeat timeout"
    finally:
        await sio.disconnect()


async def test_ping_echoes_small_payloads_and_refuses_large_ones(start_server, sio_clients):
    """`ping` echoes its payload (ack and `pong` event) up to 1 KiB; a larger one would let a
    client that never reads fill the engine's buffer with its own bytes, so it is refused."""
    server = start_server(*SETS)
    client = sio_clients()
    pongs: asyncio.Queue = asyncio.Queue()
    client.sio.on("pong", pongs.put_nowait)
    await client.connect(server.base_url, ["websocket"])
    small = {"t": "x" * 500}
    assert await client.call("ping", small) == small
    assert await asyncio.wait_for(pongs.get(), 5) == small
    reply = await client.call("ping", {"t": "x" * 2000})
    assert reply["error"]["code"] == "bad_request", reply
    assert "1024" in reply["error"]["message"], reply
    assert pongs.empty()


async def test_websocket_only_sockets_are_spliced_in_order_and_polling_ones_are_not(
    start_server, sio_clients
):
    """A session that starts on websocket gets its frames written by ferrocast itself
    (ferrocast_socketio_spliced_frames_total counts them); one on polling goes through the
    library. Spliced, the subscribe ack still comes before the replay it starts, and a few
    thousand messages arrive whole, in order, none lost, with the namespace's own event."""
    server = start_server(*SETS)
    spliced = "ferrocast_socketio_spliced_frames_total"

    polling = sio_clients()
    await polling.connect(server.base_url, ["polling"])
    await polling.call("subscribe", "chat.pysplicepoll")
    await server.apublish("chat.pysplicepoll", 1)
    assert (await polling.next_message())["data"] == 1
    assert await server.ametric(spliced) == 0
    await polling.sio.disconnect()

    channel = "chat.pysplice"
    first = [await server.apublish(channel, n) for n in range(1, 6)]
    client = sio_clients()
    order: list = []
    client.sio.on("message", lambda m: order.append(("message", m["offset"], m["data"])))
    await client.connect(server.base_url, ["websocket"])
    assert client.sio.transport() == "websocket"
    acked = asyncio.get_running_loop().create_future()

    def on_ack(results):
        order.append(("ack",))
        acked.set_result(results)

    recover = {channel: {"epoch": first[0]["epoch"], "offset": 2}}
    await client.sio.emit("subscribe", {"channels": [channel], "recover": recover}, callback=on_ack)
    results = await asyncio.wait_for(acked, 5)
    assert results[channel]["recovered"] is True and results[channel]["replayed"] == 3, results

    total = 2000
    for start in range(6, 6 + total, 100):
        await server.apublish_batch([(channel, n) for n in range(start, min(start + 100, 6 + total))])
    deadline = asyncio.get_running_loop().time() + 20
    while len(order) < 1 + 3 + total and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert order[0] == ("ack",), order[:5]
    got = [entry[2] for entry in order[1:]]
    assert got == list(range(3, 6 + total)), f"{len(got)} messages, first {got[:5]}"
    assert [entry[1] for entry in order[1:]] == list(range(3, 6 + total))

    price = "prices.PYSPL"
    await client.call("subscribe", price)
    await server.apublish(price, {"p": 7})
    assert await asyncio.wait_for(client.prices.get(), 5) == {"p": 7}
    # The ack, 2003 messages, a second ack, a message and its `price_update`.
    assert await server.ametric(spliced) >= 1 + 3 + total + 1 + 2


async def test_upgraded_sockets_are_spliced_without_loss_or_a_stray_event(start_server, sio_clients):
    """A default client (polling, then upgrade) is spliced once its upgrade is done: messages
    published across the switch all arrive, once, in order; the writer's barrier event never
    reaches the client; afterwards each message is spliced, and a recovering subscribe's ack
    still comes before its replay."""
    server = start_server(*SETS)
    spliced = "ferrocast_socketio_spliced_frames_total"
    channel = "chat.pyupgrade"
    client = sio_clients()
    stray: list = []
    # Events with no handler of their own (the barrier would be one).
    client.sio.on("*", lambda event, *args: stray.append(event))
    await client.connect(server.base_url, None)
    await client.call("subscribe", channel)

    total = 1500

    async def publish() -> None:
        for start in range(1, total + 1, 50):
            await server.apublish_batch([(channel, n) for n in range(start, min(start + 50, total + 1))])
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while client.sio.transport() != "websocket":
        assert loop.time() < deadline, "the client did not upgrade"
        await asyncio.sleep(0.01)
    await publisher
    got = [await client.next_message() for _ in range(total)]
    assert [m["data"] for m in got] == list(range(1, total + 1))
    assert [m["offset"] for m in got] == list(range(1, total + 1))

    # Spliced now: each message counts as a spliced frame.
    before = await server.ametric(spliced)
    await server.apublish(channel, "after")
    assert (await client.next_message())["data"] == "after"
    assert await server.ametric(spliced) == before + 1

    replayed = "chat.pyupgradereplay"
    first = [await server.apublish(replayed, n) for n in range(1, 6)]
    order: list = []
    client.sio.on("message", lambda m: order.append(("message", m["data"])))
    acked = loop.create_future()

    def on_ack(results):
        order.append(("ack",))
        acked.set_result(results)

    recover = {replayed: {"epoch": first[0]["epoch"], "offset": 2}}
    await client.sio.emit("subscribe", {"channels": [replayed], "recover": recover}, callback=on_ack)
    results = await asyncio.wait_for(acked, 5)
    assert results[replayed]["replayed"] == 3, results
    deadline = loop.time() + 5
    while len(order) < 4 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert order == [("ack",), ("message", 3), ("message", 4), ("message", 5)], order
    assert client.sio.connected
    assert stray == [], stray
