"""Socket.IO interop with `python-socketio`'s AsyncClient (a client we did not write), over
long-polling only, websocket only and the default polling-then-upgrade: subscribe with an
ack, `message` and per-namespace events, publish where allowed (refused elsewhere), recovery,
and a clean disconnect that the server's metrics see."""

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
