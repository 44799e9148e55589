"""The Python client (clients/python, imported as `ferrocast`) against real ferrocast
processes: subscribe and publish (socket and HTTP, sync and async), typed publish errors,
batched frames, recovery across an abrupt disconnect and across a server restart on the same
port (a gap without shared history; every message with history in Redis), a graceful drain
with the 1001 hint (and full recovery through it with Redis), a terminal close code, the heartbeat and the
liveness timeout (through a TCP relay that can freeze), the blocking SyncClient, and
connection tokens (PyJWT): a fixed token, get_token() refreshing short-lived ones, 4011 and
4001 ending the client without a reconnect loop."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from ferrocast_e2e.procs import REPO_ROOT, ManagedProcess, free_port, http_status
from ferrocast_e2e.redis import RedisServer
from ferrocast_e2e.server import FerrocastServer, clean_env, serve_argv

# Test the client next to this file even when the venv's editable install (from
# e2e/requirements.txt) points at another checkout, as a venv shared by worktrees may.
sys.path.insert(0, str(REPO_ROOT / "clients" / "python" / "src"))

import ferrocast  # noqa: E402

FAST = ferrocast.Backoff(base=0.1, max=1.0)


class Events:
    """Records a client's events with their arrival time."""

    def __init__(self, client: ferrocast.Client) -> None:
        self.states: list[tuple[float, str, dict]] = []
        self.gaps: list[ferrocast.Gap] = []
        self.errors: list[ferrocast.ErrorEvent] = []
        self.subscribed: list[tuple[str, dict]] = []
        self._changed = asyncio.Event()
        client.on("state", self._on_state)
        client.on("gap", lambda gap: self._add(self.gaps, gap))
        client.on("error", lambda err: self._add(self.errors, err))
        client.on("subscribed", lambda channel, result: self._add(self.subscribed, (channel, result)))

    def _on_state(self, state: str, detail: dict) -> None:
        self._add(self.states, (time.monotonic(), state, dict(detail)))

    def _add(self, bucket: list, item: Any) -> None:
        bucket.append(item)
        self._changed.set()

    def names(self) -> list[str]:
        return [s for _, s, _ in self.states]

    async def until(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what}; states {self.names()}, gaps {self.gaps}, "
                f"errors {self.errors}, subscribed {self.subscribed}"
            ) from None


async def received(sub: ferrocast.Subscription, count: int, timeout: float = 5.0) -> list[ferrocast.Message]:
    return [await sub.get(timeout) for _ in range(count)]


@pytest.fixture
async def clients():
    """Makes `ferrocast.Client`s and closes them at teardown."""
    made: list[ferrocast.Client] = []

    def make(target: FerrocastServer | str, **options: Any) -> ferrocast.Client:
        url = target.base_url if isinstance(target, FerrocastServer) else target
        options.setdefault("backoff", FAST)
        client = ferrocast.Client(url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def restart_on(artifacts, track_process):
    """Starts another `ferrocast serve` on the port of a server that has exited."""
    count = 0

    def restart(old: FerrocastServer, *sets: str) -> FerrocastServer:
        nonlocal count
        count += 1
        assert old.process.wait(10) is not None, "the old server is still running"
        argv = serve_argv(old.port, sets)
        proc = ManagedProcess("ferrocast", argv, artifacts / f"ferrocast-restart-{count}.log", clean_env())
        track_process(proc.start())
        new = FerrocastServer(old.port, proc, argv, None, list(sets))
        proc.wait_until(lambda: http_status(new.base_url + "/healthz", timeout=0.5) == 200, 20, "/healthz")
        return new

    return restart


# ---- subscribe and publish ----------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_subscribe_receives_http_publishes_in_order(server, clients):
    client = clients(server)
    await client.connect(timeout=5)
    assert client.state == "connected" and client.session
    sub = client.subscribe("chat.order")
    ready = await sub.ready(5)
    assert ready["offset"] == 0 and isinstance(ready["epoch"], str), ready

    with ferrocast.Publisher(server.base_url) as publisher:
        singles = [await asyncio.to_thread(publisher.publish, "chat.order", {"n": n}) for n in range(1, 4)]
        batch = await asyncio.to_thread(
            publisher.publish_batch,
            [("chat.order", {"n": 4}), {"channel": "chat.order", "data": {"n": 5}}],
        )
    results = singles + batch
    assert [r.offset for r in results] == [1, 2, 3, 4, 5]
    assert all(isinstance(r, ferrocast.PublishResult) and r.epoch == ready["epoch"] for r in results)

    got = []
    async for msg in sub:
        got.append(msg)
        if len(got) == 5:
            break
    assert [(m.offset, m.data["n"], m.channel, m.epoch) for m in got] == [
        (n, n, "chat.order", ready["epoch"]) for n in range(1, 6)
    ]
    stats = client.stats()
    assert (stats.messages, stats.gaps, stats.duplicates) == (5, 0, 0), stats


@pytest.mark.timeout(30)
async def test_socket_and_async_http_publish_reach_a_callback_subscriber(server, clients):
    client = clients(server)
    await client.connect(timeout=5)
    seen: list[ferrocast.Message] = []
    arrived = asyncio.Event()

    def on_message(msg: ferrocast.Message) -> None:
        seen.append(msg)
        if len(seen) == 6:
            arrived.set()

    sub = client.subscribe("chat.mixed", on_message)
    await sub.ready(5)
    by_socket = await client.publish("chat.mixed", {"via": "socket"})
    assert by_socket.channel == "chat.mixed" and by_socket.offset == 1, by_socket
    async with ferrocast.AsyncPublisher(server.base_url) as publisher:
        one = await publisher.publish("chat.mixed", {"via": "http"})
        many = await publisher.publish_batch([("chat.mixed", {"via": "batch", "i": i}) for i in range(3)])
    assert [one.offset] + [r.offset for r in many] == [2, 3, 4, 5]
    last = await client.publish("chat.mixed", {"via": "socket", "last": True})
    assert last.offset == 6
    async with asyncio.timeout(5):
        await arrived.wait()
    assert [m.offset for m in seen] == [1, 2, 3, 4, 5, 6]
    assert [m.data["via"] for m in seen] == ["socket", "http", "batch", "batch", "batch", "socket"]

    # ticks.* does not allow client publishing: the server's error code, typed.
    with pytest.raises(ferrocast.FerrocastError) as refused:
        await client.publish("ticks.PYC", {"price": 1})
    assert refused.value.code == "forbidden", refused.value
    rtt = await client.ping(timeout=5)
    assert 0 < rtt < 5 and client.rtt == rtt
    assert client.state == "connected"


@pytest.mark.timeout(30)
async def test_batched_server_frames_are_unpacked_in_order(start_server, clients, ws):
    server = start_server("server.batch=true")
    raw = await ws(server)
    await raw.subscribe_ok("chat.batched")
    client = clients(server)
    await client.connect(timeout=5)
    sub = client.subscribe("chat.batched")
    await sub.ready(5)
    await server.apublish_batch([("chat.batched", i) for i in range(300)])

    # The same stream, read raw: the server did send JSON arrays of messages.
    arrays, offsets = 0, []
    while len(offsets) < 300:
        frame = json.loads(await raw.recv_raw(timeout=5))
        frames = frame if isinstance(frame, list) else [frame]
        arrays += isinstance(frame, list)
        offsets += [f["offset"] for f in frames if f.get("type") == "msg"]
    assert offsets == list(range(1, 301))
    assert arrays > 0, "the server sent no batched frame"

    got = await received(sub, 300)
    assert [m.offset for m in got] == list(range(1, 301))
    assert [m.data for m in got] == list(range(300))


# ---- HTTP publisher errors -------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_publisher_raises_typed_errors_with_the_server_code(start_server):
    server = start_server(api_key="right-key")
    with ferrocast.Publisher(server.base_url, key="wrong-key") as wrong:
        with pytest.raises(ferrocast.PublishError) as e:
            wrong.publish("chat.err", 1)
    assert (e.value.status, e.value.code) == (401, "unauthorized"), e.value
    assert "API key" in e.value.message
    with ferrocast.Publisher(server.base_url) as keyless, pytest.raises(ferrocast.PublishError) as e:
        keyless.publish("chat.err", 1)
    assert (e.value.status, e.value.code) == (401, "unauthorized"), e.value

    with ferrocast.Publisher(server.base_url, key="right-key") as publisher:
        with pytest.raises(ferrocast.PublishError) as e:
            publisher.publish("bad channel", 1)
        assert (e.value.status, e.value.code) == (400, "invalid_channel"), e.value
        # A batch with one bad channel publishes nothing.
        with pytest.raises(ferrocast.PublishError) as e:
            publisher.publish_batch([("chat.err", 1), ("no spaces", 2)])
        assert (e.value.status, e.value.code) == (400, "invalid_channel"), e.value
        assert "message 1" in e.value.message
        ok = publisher.publish("chat.err", "first")
        assert ok.offset == 1, ok

    async with ferrocast.AsyncPublisher(server.base_url, key="wrong-key") as apub:
        with pytest.raises(ferrocast.PublishError) as e:
            await apub.publish("chat.err", 1)
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    assert isinstance(e.value, ferrocast.FerrocastError)

    # Nothing listens on a freshly freed port: a connection failure, still a FerrocastError.
    with ferrocast.Publisher(f"http://127.0.0.1:{free_port()}", timeout=2) as nowhere:
        with pytest.raises(ferrocast.FerrocastError) as e:
            nowhere.publish("chat.err", 1)
    assert e.value.code == "connection_failed" and not isinstance(e.value, ferrocast.PublishError)


# ---- reconnecting and recovery -----------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_abrupt_disconnect_recovers_every_missed_message_exactly_once(server, clients):
    # A reconnect delay of 0.99 s (random() = 0.99, base 1 s) leaves time to publish while
    # the client is away.
    client = clients(server, backoff=ferrocast.Backoff(base=1.0, max=2.0), random=lambda: 0.99)
    events = Events(client)
    await client.connect(timeout=5)
    first_session = client.session
    sub = client.subscribe("chat.rec")
    await sub.ready(5)
    for n in range(1, 4):
        server.publish("chat.rec", n)
    assert [m.offset for m in await received(sub, 3)] == [1, 2, 3]

    client.websocket.transport.abort()  # TCP gone, no close frame
    await events.until(lambda: "reconnecting" in events.names(), 5, "reconnecting")
    _, _, detail = events.states[-1]
    assert detail["code"] == 1006, detail
    assert 0.9 < detail["delay"] < 1.0, detail
    for n in range(4, 9):
        server.publish("chat.rec", n)  # missed while disconnected

    await events.until(lambda: len(events.subscribed) == 2, 10, "the resubscribe ack")
    channel, result = events.subscribed[-1]
    assert channel == "chat.rec"
    assert result["recovered"] is True and result.get("replayed") == 5, result
    await client.wait_connected(5)
    assert client.session != first_session
    for n in range(9, 11):
        server.publish("chat.rec", n)
    got = await received(sub, 7)
    assert [m.offset for m in got] == list(range(4, 11))
    assert [m.data for m in got] == list(range(4, 11))
    assert events.gaps == []
    stats = client.stats()
    assert (stats.gaps, stats.duplicates, stats.reconnects) == (0, 0, 1), stats


@pytest.mark.timeout(40)
async def test_restart_on_the_same_port_surfaces_a_not_recovered_gap(start_server, restart_on, clients):
    first = start_server("server.reconnect_after_ms=100")
    client = clients(first)
    events = Events(client)
    await client.connect(timeout=5)
    sub = client.subscribe("chat.restart")
    old_epoch = (await sub.ready(5))["epoch"]
    for n in range(1, 4):
        first.publish("chat.restart", n)
    assert [m.offset for m in await received(sub, 3)] == [1, 2, 3]

    first.process.signal(signal.SIGTERM)
    await events.until(lambda: "reconnecting" in events.names(), 10, "reconnecting")
    second = await asyncio.to_thread(restart_on, first)
    await events.until(lambda: len(events.gaps) == 1, 15, "the not_recovered gap")
    gap = events.gaps[0]
    assert gap.channel == "chat.restart" and gap.reason == "not_recovered", gap
    assert gap.previous_epoch == old_epoch and gap.epoch and gap.epoch != old_epoch, gap
    await client.wait_connected(5)

    # The channel starts a fresh sequence in the new epoch, with no further gap.
    second.publish("chat.restart", "fresh")
    second.publish("chat.restart", "fresher")
    got = await received(sub, 2)
    assert [(m.offset, m.data, m.epoch) for m in got] == [(1, "fresh", gap.epoch), (2, "fresher", gap.epoch)]
    assert len(events.gaps) == 1, events.gaps
    assert client.stats().duplicates == 0


@pytest.mark.timeout(40)
async def test_graceful_drain_honours_after_ms_then_reconnects_to_the_new_server(
    start_server, restart_on, clients
):
    first = start_server("server.reconnect_after_ms=1500", "server.shutdown_grace_ms=5000")
    client = clients(first)
    events = Events(client)
    await client.connect(timeout=5)
    first_session = client.session
    sub = client.subscribe("chat.drain")
    await sub.ready(5)

    first.process.signal(signal.SIGTERM)
    await events.until(lambda: "reconnecting" in events.names(), 10, "reconnecting")
    index = events.names().index("reconnecting")
    left_at, _, detail = events.states[index]
    assert detail["code"] == 1001, detail
    hint = json.loads(detail["reason"])
    assert hint["reconnect"] is True and 1500 <= hint["after_ms"] <= 3000, hint
    # after_ms plus a jitter of at most the backoff base (0.1 s).
    assert hint["after_ms"] / 1000 <= detail["delay"] <= hint["after_ms"] / 1000 + 0.1, detail
    assert await asyncio.to_thread(first.process.wait, 10) == 0
    second = await asyncio.to_thread(restart_on, first)

    await events.until(lambda: "connected" in events.names()[index + 1 :], 15, "connected again")
    # The next state change (connected, or reconnecting after a failed attempt) comes after
    # the first attempt, which waited for after_ms.
    next_at, _, _ = events.states[index + 1]
    assert next_at - left_at >= hint["after_ms"] / 1000, "tried to reconnect before after_ms"
    assert client.session != first_session
    await events.until(lambda: len(events.subscribed) == 2, 5, "resubscribed")
    second.publish("chat.drain", "after the drain")
    assert (await sub.get(5)).data == "after the drain"


@pytest.fixture
def redis(artifacts, track_process):
    server = RedisServer(artifacts).start()
    track_process(server.process)
    yield server
    server.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["restart", "drain"])
async def test_recovery_across_a_restart_and_a_drain_with_history_in_redis(
    how, start_server, restart_on, redis, clients
):
    """With history kept in Redis, a server that goes away (killed, or drained with the 1001
    hint) and comes back on the same port loses nothing: the client resumes from its
    position and gets exactly what was published meanwhile (through another node), once, in
    order, in the same epoch, with no gap."""
    cluster = ("broker.kind=redis", f"broker.url={redis.url}", "server.reconnect_after_ms=300")
    a = start_server(*cluster)
    b = start_server(*cluster)
    client = clients(a)
    events = Events(client)
    await client.connect(timeout=5)
    sub = client.subscribe("chat.pyredis")
    epoch = (await sub.ready(5))["epoch"]
    with ferrocast.Publisher(b.base_url) as publisher:
        publisher.publish_batch([("chat.pyredis", n) for n in range(1, 4)])
        assert [(m.offset, m.data) for m in await received(sub, 3)] == [(1, 1), (2, 2), (3, 3)]

        a.process.signal(signal.SIGKILL if how == "restart" else signal.SIGTERM)
        await events.until(lambda: "reconnecting" in events.names(), 10, "reconnecting")
        _, _, detail = events.states[events.names().index("reconnecting")]
        assert detail["code"] == (1006 if how == "restart" else 1001), detail
        await asyncio.to_thread(a.process.wait, 10)
        missed = publisher.publish_batch([("chat.pyredis", n) for n in range(4, 9)])
        assert [r.offset for r in missed] == [4, 5, 6, 7, 8] and {r.epoch for r in missed} == {epoch}
        a2 = await asyncio.to_thread(restart_on, a, *cluster)

        await events.until(lambda: len(events.subscribed) == 2, 15, "the resubscribe ack")
        channel, result = events.subscribed[-1]
        assert channel == "chat.pyredis" and result["recovered"] is True, result
        assert result.get("replayed") == 5 and result["epoch"] == epoch, result
        a2.publish("chat.pyredis", 9)
        got = await received(sub, 6)
    assert [(m.offset, m.data, m.epoch) for m in got] == [(n, n, epoch) for n in range(4, 10)]
    assert events.gaps == []
    stats = client.stats()
    assert (stats.gaps, stats.duplicates, stats.reconnects) == (0, 0, 1), stats


@pytest.mark.timeout(30)
async def test_origin_refusal_1008_is_terminal_and_does_not_loop(start_server, clients):
    server = start_server('server.allowed_origins=["https://good.example"]')
    good = clients(server, origin="https://good.example")
    await good.connect(timeout=5)
    assert good.state == "connected"

    bad = clients(server, origin="https://evil.example")
    events = Events(bad)
    with pytest.raises(ferrocast.FerrocastError) as e:
        await bad.connect(timeout=5)
    assert e.value.code == "closed" and e.value.close_code == 1008, e.value
    assert bad.state == "disconnected" and bad.state_detail["code"] == 1008, bad.state_detail
    await asyncio.sleep(1.0)  # with a 0.1 s backoff a retry loop would show by now
    assert events.names() == ["connecting", "disconnected"], events.names()
    assert bad.stats().reconnects == 0
    with pytest.raises(ferrocast.FerrocastError) as e:
        await bad.publish("chat.x", 1)
    assert e.value.code == "closed"
    assert good.state == "connected"


@pytest.mark.timeout(30)
async def test_without_a_server_it_backs_off_queues_publishes_and_close_stops_it(clients):
    client = clients(
        f"http://127.0.0.1:{free_port()}", backoff=ferrocast.Backoff(base=0.2, max=0.4), max_queue=1
    )
    events = Events(client)
    await client.connect(wait=False)
    first = asyncio.ensure_future(client.publish("chat.q", 1))
    second = asyncio.ensure_future(client.publish("chat.q", 2))
    with pytest.raises(ferrocast.FerrocastError) as e:
        await asyncio.wait_for(first, 5)
    assert e.value.code == "dropped", e.value  # max_queue=1: the oldest gives way
    await events.until(lambda: events.names().count("reconnecting") >= 3, 10, "three failed attempts")
    attempts = [d for _, s, d in events.states if s == "reconnecting"]
    assert all(d["code"] is None and "Error" in d["reason"] for d in attempts), attempts
    assert [d["attempt"] for d in attempts[:3]] == [1, 2, 3], attempts
    assert all(0 <= d["delay"] < 0.4 for d in attempts), attempts
    assert client.stats().queued == 1
    await client.close()
    with pytest.raises(ferrocast.FerrocastError) as e:
        await asyncio.wait_for(second, 1)
    assert e.value.code == "closed", e.value
    assert client.state == "disconnected" and client.stats().queued == 0
    count = len(events.states)
    await asyncio.sleep(0.6)
    assert len(events.states) == count, events.names()[count:]


# ---- heartbeat and liveness ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_server_heartbeats_are_answered_and_the_connection_stays(start_server, clients, ws):
    server = start_server("server.ping_interval_ms=200", "server.pong_timeout_ms=300")
    client = clients(server, ping_grace=1.0)
    events = Events(client)
    await client.connect(timeout=5)
    session = client.session
    sub = client.subscribe("chat.hb")
    await sub.ready(5)
    # A raw connection that never answers is closed with 4009 meanwhile: the check is live.
    silent = await ws(server)
    closed = await silent.wait_closed(timeout=5)
    assert closed.code == 4009, closed
    await asyncio.sleep(2.0)  # ten ping intervals
    assert client.state == "connected" and client.session == session
    assert events.names() == ["connecting", "connected"], events.names()
    server.publish("chat.hb", "still here")
    assert (await sub.get(5)).data == "still here"


class FreezingRelay:
    """A TCP relay to a server whose connections can be frozen: bytes are no longer passed
    on, but nothing is closed, as with a dead network path."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: set[int] = set()
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FreezingRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze_all(self) -> None:
        self.frozen.update(range(1, self.connections + 1))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if number not in self.frozen:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


@pytest.mark.timeout(30)
async def test_silent_connection_is_replaced_after_ping_interval_plus_grace(start_server, clients):
    server = start_server("server.ping_interval_ms=300", "server.pong_timeout_ms=5000")
    relay = await FreezingRelay(server.port).start()
    try:
        client = clients(f"http://127.0.0.1:{relay.port}", ping_grace=0.5)
        events = Events(client)
        await client.connect(timeout=5)
        sub = client.subscribe("chat.live")
        await sub.ready(5)
        relay.freeze_all()
        frozen_at = time.monotonic()
        await events.until(lambda: "reconnecting" in events.names(), 10, "reconnecting")
        at, _, detail = events.states[events.names().index("reconnecting")]
        assert detail["reason"] == "heartbeat timeout" and detail["code"] is None, detail
        # 0.3 s interval + 0.5 s grace, counted from the last frame (a ping at most 0.3 s before).
        assert at - frozen_at >= 0.8 - 0.3 - 0.05, "replaced before ping_interval + grace"
        await client.wait_connected(5)
        assert relay.connections == 2
        await events.until(lambda: len(events.subscribed) == 2, 5, "resubscribed")
        _, result = events.subscribed[-1]
        assert result["recovered"] is True, result
        server.publish("chat.live", "through the new connection")
        assert (await sub.get(5)).data == "through the new connection"
    finally:
        await relay.close()


# ---- the blocking wrapper ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sync_client_iterates_publishes_and_closes(server):
    with ferrocast.SyncClient(server.base_url, backoff=FAST) as client:
        assert client.state == "connected"
        sub = client.subscribe("chat.sync")
        assert sub.ready(5)["offset"] == 0
        called: list[ferrocast.Message] = []
        got_callback = threading.Event()

        def on_message(msg: ferrocast.Message) -> None:
            called.append(msg)
            if len(called) == 4:
                got_callback.set()

        client.subscribe("chat.sync", on_message).ready(5)
        with ferrocast.Publisher(server.base_url) as publisher:
            for n in range(1, 4):
                assert publisher.publish("chat.sync", n).offset == n
        ack = client.publish("chat.sync", {"from": "sync"})
        assert ack.offset == 4, ack
        got = []
        for msg in sub:
            got.append(msg)
            if len(got) == 4:
                break
        assert [m.offset for m in got] == [1, 2, 3, 4]
        assert [m.data for m in got] == [1, 2, 3, {"from": "sync"}]
        assert got_callback.wait(5) and [m.offset for m in called] == [1, 2, 3, 4]
        assert 0 < client.ping() < 5
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.2)
        ending = threading.Thread(target=lambda: got.extend(sub))
        ending.start()
    # close() ended the blocked iteration.
    ending.join(5)
    assert not ending.is_alive()
    assert client.state == "disconnected"
    assert len(got) == 4


# ---- refusals and pure helpers -----------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_refused_channel_fails_its_ready_and_emits_error(start_server, clients):
    server = start_server("server.max_subscriptions=1")
    client = clients(server)
    events = Events(client)
    await client.connect(timeout=5)
    first = client.subscribe("chat.one")
    await first.ready(5)
    second = client.subscribe("chat.two")
    with pytest.raises(ferrocast.FerrocastError) as e:
        await second.ready(5)
    assert e.value.code == "limit_exceeded", e.value
    assert [(err.code, err.channels) for err in events.errors] == [("limit_exceeded", ("chat.two",))]
    with pytest.raises(ValueError):
        client.subscribe("no spaces allowed")
    server.publish("chat.one", "kept")
    assert (await first.get(5)).data == "kept"
    assert client.state == "connected"


def readme_python_blocks() -> list[str]:
    """The Python code blocks of clients/python/README.md from "## Quick start" to the next
    section's first block that is not a subscriber (the quick start and its asyncio twin)."""
    text = (REPO_ROOT / "clients" / "python" / "README.md").read_text()
    quick = text[text.index("## Quick start") :]
    quick = quick[: quick.index("In a FastAPI")]
    return [block.split("```", 1)[0] for block in quick.split("```python\n")[1:]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", [0, 1], ids=["quick-start", "asyncio"])
def test_the_readme_quick_starts_run_as_written(block, server):
    """Each quick start, with only the address changed, prints what is published."""
    code = readme_python_blocks()[block].replace("http://127.0.0.1:8080", server.base_url)
    assert block != 0 or len(code.strip().splitlines()) == 5, f"the quick start is five lines:\n{code}"
    env = {**clean_env(), "PYTHONPATH": str(REPO_ROOT / "clients" / "python" / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 15
        while not any(
            c["channel"] == "chat.lobby" and c["subscribers"] == 1 for c in server.get("/api/channels").json()["channels"]
        ):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the quick start did not subscribe"
            time.sleep(0.05)
        offset = server.publish("chat.lobby", {"text": "again"})["offset"]
        # The five-line quick start published "hi" first: that was offset 1.
        assert offset == (2 if block == 0 else 1)
        assert proc.stdout.readline().strip() == f"{offset} {{'text': 'again'}}"
    finally:
        proc.kill()
        proc.communicate(timeout=5)


# ---- connection tokens ----------------------------------------------------------------------

TOKEN_SECRET = "python-client-e2e-secret-0123456789ab"


def user_token(sub: str, seconds: float = 600, secret: str = TOKEN_SECRET) -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time() + seconds)}, secret, algorithm="HS256")


@pytest.mark.timeout(40)
async def test_tokens_open_user_channels_and_get_token_refreshes_them(start_server, clients):
    server = start_server(f"auth.hmac_secret={TOKEN_SECRET}", "auth.leeway_ms=0", "auth.expiry_grace_ms=200",
                          "namespaces.payments.subscribe=authenticated")
    fixed = clients(server, token=user_token("42"))
    await fixed.connect(timeout=5)
    sub = fixed.subscribe("payments.eu#42")
    await sub.ready(5)
    server.publish("payments.eu#42", {"amount": 1})
    assert (await sub.get(5)).data == {"amount": 1}

    calls = 0

    def short_lived() -> str:
        nonlocal calls
        calls += 1
        return user_token("42", seconds=2)

    refreshed = clients(server, get_token=short_lived, token_refresh_margin=1.0)
    events = Events(refreshed)
    await refreshed.connect(timeout=5)
    sub = refreshed.subscribe("payments.eu#42")
    await sub.ready(5)
    await asyncio.sleep(5)  # two and a half token lifetimes
    assert calls >= 3, calls
    assert events.names() == ["connecting", "connected"], events.names()
    server.publish("payments.eu#42", {"amount": 2})
    assert (await sub.get(5)).data == {"amount": 2}

    expiring = clients(server, token=user_token("42", seconds=1))
    events = Events(expiring)
    await expiring.connect(timeout=5)
    await events.until(lambda: expiring.state == "disconnected", 10, "the 4011 close")
    assert expiring.state_detail["code"] == ferrocast.TOKEN_EXPIRED_CLOSE_CODE, expiring.state_detail
    await asyncio.sleep(1.0)
    assert events.names() == ["connecting", "connected", "disconnected"], events.names()


@pytest.mark.timeout(30)
async def test_a_refused_token_ends_with_4001_without_a_loop(start_server, clients):
    server = start_server(f"auth.hmac_secret={TOKEN_SECRET}", "auth.anonymous=false", "auth.auth_timeout_ms=500")
    calls = 0

    async def forged() -> str:
        nonlocal calls
        calls += 1
        return user_token("42", secret="not-the-servers-secret-0123456789")

    client = clients(server, get_token=forged)
    events = Events(client)
    # The welcome comes first; the refused token is answered `unauthorized`, and with
    # auth.anonymous = false the connection is closed with 4001 after auth_timeout_ms.
    await client.connect(timeout=5)
    await events.until(lambda: client.state == "disconnected", 10, "the 4001 close")
    assert client.state_detail["code"] == 4001, client.state_detail
    assert [e.code for e in events.errors] == ["unauthorized"], events.errors
    await asyncio.sleep(1.0)
    assert calls == 1, "get_token() called again: a reconnect loop"


def test_url_resolution_and_backoff_bounds():
    assert ferrocast.resolve_ws_url("http://h:1") == "ws://h:1/ws"
    assert ferrocast.resolve_ws_url("https://h/feed/") == "wss://h/feed/ws"
    assert ferrocast.resolve_ws_url("ws://h:1/ws/price") == "ws://h:1/ws/price"
    assert ferrocast.resolve_ws_url("ws://h:1", params={"token": "a b"}) == "ws://h:1/ws?token=a+b"
    with pytest.raises(ValueError):
        ferrocast.resolve_ws_url("ftp://h")
    backoff = ferrocast.Backoff(base=0.5, max=4.0)
    assert ferrocast.backoff_delay(0, backoff, lambda: 0.999) < 0.5
    assert ferrocast.backoff_delay(3, backoff, lambda: 0.5) == 2.0
    assert ferrocast.backoff_delay(50, backoff, lambda: 0.5) == 2.0  # capped at max
    assert ferrocast.backoff_delay(2, backoff, lambda: 0.0) == 0.0


def test_the_client_under_test_is_this_checkout():
    assert ferrocast.__file__ == str(REPO_ROOT / "clients" / "python" / "src" / "ferrocast" / "__init__.py")
