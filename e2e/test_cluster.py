"""Several `ferrocast serve` nodes sharing channels through a real Redis (the Redis broker):
one offset sequence and one history per channel across nodes, recovery on any node, honest
`recovered: false` when Redis lost the data, bounded failures while Redis is away, and gaps
in pub/sub filled from history. Each test starts its own redis-server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time

import pytest
import socketio

from ferrocast_e2e.procs import REPO_ROOT, ManagedProcess, http_status
from ferrocast_e2e.redis import RedisCluster, RedisSentinels, RedisServer, make_tls_files
from ferrocast_e2e.server import FerrocastServer, clean_env, run_ferrocast
from test_doctor_nginx import NGINX
from test_multinode_front import front
from test_feeds import KEY, massive_config, upstream  # noqa: F401 (a fixture)


@pytest.fixture
def redis(artifacts, track_process):
    server = RedisServer(artifacts).start()
    track_process(server.process)
    yield server
    server.stop()


@pytest.fixture
def start_node(start_server, redis):
    def start(*sets: str, **kwargs):
        return start_server(
            "broker.kind=redis",
            f"broker.url={redis.url}",
            "broker.timeout_ms=500",
            "broker.position_check_ms=500",
            "broker.ready_grace_ms=500",
            *sets,
            **kwargs,
        )

    return start


async def collect(client, channel: str, count: int, timeout: float = 10.0) -> list[dict]:
    frames = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(frames)} of {count} messages: {frames[-3:]}"
        frames.append(await client.next_msg(channel, timeout=left))
    return frames


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def pubsub_cut_off(redis):
    """Kills every pub/sub connection on the Redis side and keeps them from coming back
    (`maxclients` lowered below the connections left) until the block ends; command
    connections already open go on working."""
    with redis.connect() as admin:
        info = admin.command("INFO", "clients")
        connected = int(info.split("connected_clients:")[1].split()[0])
        killed = admin.command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1, killed
        admin.command("CONFIG", "SET", "maxclients", connected - killed)
        try:
            yield
        finally:
            admin.command("CONFIG", "SET", "maxclients", 10000)


async def test_publishes_through_any_node_reach_every_node_once_in_order(start_node, ws):
    nodes = [start_node() for _ in range(3)]
    channel = "chat.cluster"
    subscribers = [await ws(node) for node in nodes]
    epochs = set()
    for sub in subscribers:
        result = await sub.subscribe_ok(channel)
        epochs.add(result[channel]["epoch"])
        assert result[channel]["offset"] == 0, result
    assert len(epochs) == 1, f"nodes disagree on the epoch: {epochs}"
    (epoch,) = epochs
    publishers = [await ws(node) for node in nodes]

    total = 60
    acks = []
    for i in range(total):
        node = i % 3
        data = {"i": i, "via": node}
        if i % 2 == 0:
            acks.append(await nodes[node].apublish(channel, data))
        else:
            reply = await publishers[node].request(
                {"op": "publish", "channel": channel, "data": data}
            )
            assert reply["type"] == "ack", reply
            acks.append(reply["result"])
    assert [a["offset"] for a in acks] == list(range(1, total + 1)), acks
    assert {a["epoch"] for a in acks} == {epoch}

    for n, sub in enumerate(subscribers):
        frames = await collect(sub, channel, total)
        assert [f["offset"] for f in frames] == list(range(1, total + 1)), f"node {n}"
        assert [f["data"]["i"] for f in frames] == list(range(total)), f"node {n}"
        assert {f["epoch"] for f in frames} == {epoch}, f"node {n}"
        await sub.expect_silence(0.3)

    # Each node holds the same history, and reports the same position.
    for node in nodes:
        page = node.get(f"/api/channels/{channel}/history?since=0&limit=1000").json()
        assert page["epoch"] == epoch and page["offset"] == total, page
        assert [m["data"]["i"] for m in page["messages"]] == list(range(total))


async def test_history_api_and_snapshots_answer_from_redis_on_any_node(start_node, ws):
    a, b = start_node("namespaces.hist.history_size=5"), start_node("namespaces.hist.history_size=5")
    for i in range(1, 9):
        a.publish("hist.shared", {"i": i})
    # Node b has never seen the channel: no subscriber, nothing local.
    page = b.get("/api/channels/hist.shared/history?since=0&limit=100").json()
    assert page["offset"] == 8, page
    assert [m["offset"] for m in page["messages"]] == [4, 5, 6, 7, 8]
    assert [m["data"]["i"] for m in page["messages"]] == [4, 5, 6, 7, 8]
    again = b.get("/api/channels/hist.shared/history?since=6&limit=1").json()
    assert [m["offset"] for m in again["messages"]] == [7]
    assert again["epoch"] == page["epoch"] == a.publish("hist.shared", 9)["epoch"]
    assert b.get("/api/channels/hist.never/history").status == 404
    assert b.get("/api/stats").json()["broker"] == "redis"

    # Snapshots come from Redis too: quotes send the latest value to a new subscriber.
    for price in (1, 2, 3):
        a.publish("quotes.SNAP", {"price": price})
    client = await ws(b)
    result = await client.subscribe("quotes.SNAP")
    assert result["quotes.SNAP"]["snapshot"] == {"kind": "latest", "count": 1}, result
    latest = await client.next_msg("quotes.SNAP")
    assert latest["offset"] == 3 and latest["data"] == {"price": 3}, latest


async def test_recovery_on_another_node_is_exact_then_live(start_node, ws):
    # 500 missed messages need a history of at least 500 (chat keeps 100 by default).
    a, b, c = (start_node("namespaces.chat.history_size=1000") for _ in range(3))
    channel = "chat.recover"
    first = await ws(a)
    result = await first.subscribe_ok(channel)
    epoch = result[channel]["epoch"]
    a.publish(channel, {"n": 0})
    assert (await first.next_msg(channel))["offset"] == 1
    await first.close()

    missed = 500
    pub_b, pub_c = b.keepalive_publisher(), c.keepalive_publisher()
    sent = 0
    while sent < missed:
        batch = [(channel, {"n": sent + k + 1}) for k in range(50)]
        results = (pub_b if (sent // 50) % 2 == 0 else pub_c).publish_batch(batch)
        assert [r["offset"] for r in results] == list(range(sent + 2, sent + 52))
        sent += 50
    pub_b.close()
    pub_c.close()

    again = await ws(c)
    result = await again.subscribe(channel, recover={channel: {"epoch": epoch, "offset": 1}})
    r = result[channel]
    assert r["recovered"] is True and r["replayed"] == missed, r
    assert r["epoch"] == epoch and r["offset"] == missed + 1, r
    frames = await collect(again, channel, missed)
    assert [f["offset"] for f in frames] == list(range(2, missed + 2))
    assert [f["data"]["n"] for f in frames] == list(range(1, missed + 1))
    b.publish(channel, {"n": "live"})
    live = await again.next_msg(channel)
    assert live["offset"] == missed + 2 and live["data"] == {"n": "live"}, live
    await again.expect_silence(0.3)


def sse_messages(port: int, channel: str, last_event_id: str, count: int) -> list[dict]:
    """Opens `/sse` on `channel` resuming from `last_event_id` and returns the first `count`
    `msg` events (their data, and the event id)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "GET", f"/sse?channels={channel}", headers={"Last-Event-ID": last_event_id}
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    out: list[dict] = []
    event_id = None
    try:
        while len(out) < count:
            line = resp.readline().decode().rstrip("\r\n")
            assert line or not resp.isclosed(), "stream ended"
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                frame = json.loads(line[5:])
                if frame.get("type") == "msg":
                    out.append({**frame, "event_id": event_id})
            elif line == "":
                event_id = None
    finally:
        conn.close()
    return out


async def test_recovery_on_another_node_over_sse_and_socketio(start_node):
    a, b, c = (start_node("namespaces.chat.history_size=1000") for _ in range(3))
    channel, missed = "chat.transports", 500
    epoch = a.publish(channel, {"n": 0})["epoch"]
    # A client saw offset 1 on node a, then 500 messages went through nodes b and c.
    for start in range(1, missed + 1, 50):
        node = b if (start // 50) % 2 == 0 else c
        node.publish_batch([(channel, {"n": n}) for n in range(start, start + 50)])

    # SSE: a browser that was on node a comes back to node c with its Last-Event-ID.
    frames = await asyncio.to_thread(
        sse_messages, c.port, channel, f"{channel}={epoch}:1", missed
    )
    assert [f["offset"] for f in frames] == list(range(2, missed + 2))
    assert [f["data"]["n"] for f in frames] == list(range(1, missed + 1))
    assert all(f["epoch"] == epoch for f in frames)

    # Socket.IO (python-socketio): subscribe with recover on node c, then live from node b.
    sio = socketio.AsyncClient(reconnection=False)
    inbox: asyncio.Queue = asyncio.Queue()
    sio.on("message", inbox.put_nowait)
    await sio.connect(c.base_url, transports=["websocket"], wait_timeout=5)
    try:
        reply = await sio.call(
            "subscribe",
            {"channels": [channel], "recover": {channel: {"epoch": epoch, "offset": 1}}},
            timeout=5,
        )
        assert reply[channel]["recovered"] is True and reply[channel]["replayed"] == missed
        got = [await asyncio.wait_for(inbox.get(), 5) for _ in range(missed)]
        assert [m["data"]["n"] for m in got] == list(range(1, missed + 1))
        b.publish(channel, {"n": "live"})
        live = await asyncio.wait_for(inbox.get(), 5)
        assert live["data"] == {"n": "live"} and live["offset"] == missed + 2, live
    finally:
        await sio.disconnect()


async def test_redis_restarted_empty_gives_a_new_epoch_and_bounded_failures(
    start_node, redis, ws
):
    a, b = start_node(), start_node()
    patient = start_node("broker.ready_grace_ms=3000")
    channel = "chat.restart"
    sub = await ws(a)
    old = (await sub.subscribe_ok(channel))[channel]["epoch"]
    for i in range(3):
        b.publish(channel, {"i": i})
    assert [f["offset"] for f in await collect(sub, channel, 3)] == [1, 2, 3]
    assert a.get("/readyz").status == 200

    redis.stop()
    down = time.monotonic()
    # Readiness tolerates a short outage (broker.ready_grace_ms), then turns 503.
    assert patient.get("/readyz").status == 200, "503 before the grace period ended"
    started = time.monotonic()
    r = await asyncio.to_thread(b.post_publish, {"channel": channel, "data": {"i": "lost"}})
    elapsed = time.monotonic() - started
    assert r.status == 503, r.text
    assert r.json()["error"] == "unavailable", r.text
    assert elapsed < 3.0, f"a publish during the outage took {elapsed:.1f}s"
    await wait_for(lambda: a.get("/readyz").status == 503, 5, "/readyz 503 while Redis is down")
    assert "Redis" in a.get("/readyz").text
    await wait_for(lambda: patient.get("/readyz").status == 503, 8, "503 after the grace period")
    assert time.monotonic() - down >= 2.5, "the grace period was cut short"
    # Over /ws too: a client publish and a subscribe fail with `unavailable`, in bounded time,
    # and the connected subscriber stays connected.
    client = await ws(b)
    started = time.monotonic()
    reply = await client.request(
        {"op": "publish", "channel": channel, "data": {"i": "lost"}}, timeout=5
    )
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
    result = await client.subscribe("chat.other")
    assert result["chat.other"]["error"]["code"] == "unavailable", result
    assert time.monotonic() - started < 4.0

    redis.start()
    await wait_for(lambda: a.get("/readyz").status == 200, 10, "/readyz 200 after Redis is back")
    await wait_for(lambda: b.get("/readyz").status == 200, 10, "/readyz 200 on node b")
    published = b.publish(channel, {"i": "after"})
    assert published["offset"] == 1 and published["epoch"] != old, published
    live = await sub.next_msg(channel, timeout=5)
    assert live["data"] == {"i": "after"} and live["epoch"] == published["epoch"], live

    again = await ws(b)
    result = await again.subscribe(channel, recover={channel: {"epoch": old, "offset": 3}})
    r = result[channel]
    assert r["recovered"] is False and r["epoch"] == published["epoch"], r
    assert r["offset"] == 1, r


async def test_a_lost_pubsub_message_is_filled_from_history(start_node, redis, ws):
    # No periodic position check during the test: the fill must come from the reconnect.
    a, b = start_node("broker.position_check_ms=60000"), start_node()
    channel = "chat.gap"
    sub = await ws(a)
    await sub.subscribe_ok(channel)
    b.publish(channel, {"i": 1})
    assert (await sub.next_msg(channel))["offset"] == 1
    before = a.metric("ferrocast_broker_gaps_filled_total") or 0

    # Node a misses these on pub/sub (node b publishes on its command connection, which
    # stays) and must take them from history once it is back.
    with pubsub_cut_off(redis):
        for i in range(2, 12):
            b.publish(channel, {"i": i})
        await sub.expect_silence(0.3)
    frames = await collect(sub, channel, 10)
    assert [f["offset"] for f in frames] == list(range(2, 12))
    assert [f["data"]["i"] for f in frames] == list(range(2, 12))
    await sub.expect_silence(0.3)
    await wait_for(
        lambda: (a.metric("ferrocast_broker_gaps_filled_total") or 0) > before,
        5,
        "the filled-gaps metric to count the fill",
    )
    assert (a.metric("ferrocast_broker_pubsub_reconnects_total") or 0) >= 1


async def test_the_position_check_delivers_what_pubsub_lost_while_it_is_down(
    start_node, redis, ws
):
    a, b = start_node(), start_node()
    channel = "chat.check"
    sub = await ws(a)
    await sub.subscribe_ok(channel)
    b.publish(channel, {"i": 1})
    assert (await sub.next_msg(channel))["offset"] == 1
    with pubsub_cut_off(redis):
        for i in range(2, 5):
            b.publish(channel, {"i": i})
        # Node a's pub/sub cannot reconnect; its command connection still works, and the
        # periodic position check (every 500 ms here) brings the messages.
        frames = await collect(sub, channel, 3, timeout=5)
        assert [f["offset"] for f in frames] == [2, 3, 4]
        assert (a.metric("ferrocast_broker_pubsub_reconnects_total") or 0) == 0
        assert (a.metric("ferrocast_broker_position_checks_total") or 0) >= 1
    b.publish(channel, {"i": 5})
    assert (await sub.next_msg(channel))["offset"] == 5
    await sub.expect_silence(0.3)


async def test_messages_history_cannot_supply_close_exact_subscribers_and_not_feeds(
    start_node, redis, ws
):
    # A history of 3 and no periodic check: the node learns of the loss at its reconnect.
    sets = ("namespaces.chat.history_size=3", "namespaces.quotes.history_size=3",
            "broker.position_check_ms=60000")
    a, b = start_node(*sets), start_node(*sets)
    chat, quotes = await ws(a), await ws(a)
    epoch = (await chat.subscribe_ok("chat.short"))["chat.short"]["epoch"]
    await quotes.subscribe_ok("quotes.SHORT")
    b.publish_batch([("chat.short", 1), ("quotes.SHORT", 1)])
    assert (await chat.next_msg())["offset"] == 1 and (await quotes.next_msg())["offset"] == 1
    with pubsub_cut_off(redis):
        b.publish_batch([("chat.short", n) for n in range(2, 11)])
        b.publish_batch([("quotes.SHORT", n) for n in range(2, 11)])
    # 2..7 are gone from Redis: the chat subscriber (overflow = disconnect: nothing may be
    # skipped) is closed with 4008 and told the truth when it recovers; the quotes subscriber
    # (conflate) just goes on with what is left.
    closed = await chat.wait_closed(timeout=10)
    assert closed.code == 4008, closed
    assert [f["offset"] for f in closed.frames if f.get("type") == "msg"] == []
    frames = await collect(quotes, "quotes.SHORT", 3)
    assert [f["offset"] for f in frames] == [8, 9, 10]
    # Node b lost its pub/sub connection too (every node keeps one): a subscribe answers
    # `unavailable` until it is back, and a client retries.
    again = await ws(b)
    recover = {"chat.short": {"epoch": epoch, "offset": 1}}
    deadline = time.monotonic() + 10
    while "error" in (result := (await again.subscribe("chat.short", recover=recover))["chat.short"]):
        assert result["error"]["code"] == "unavailable" and time.monotonic() < deadline, result
        await asyncio.sleep(0.2)
    assert result["recovered"] is False and result["offset"] == 10, result
    assert (a.metric("ferrocast_broker_gaps_filled_total") or 0) >= 1


async def test_redis_paused_publishes_fail_in_bounded_time_and_nothing_acked_is_lost(
    start_node, start_server, redis, ws
):
    import signal

    a, b = start_node(), start_node()
    # broker.timeout_ms unset: the 1 s default.
    default = start_server("broker.kind=redis", f"broker.url={redis.url}")
    channel = "chat.pause"
    subs = [await ws(a), await ws(b)]
    for sub in subs:
        await sub.subscribe_ok(channel)

    acked: list[int] = []
    failed = 0
    slowest = 0.0

    def publish_for(seconds: float, tag: str) -> None:
        nonlocal failed, slowest
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.monotonic()
            r = b.post_publish({"channel": channel, "data": {"tag": tag, "n": n}})
            slowest = max(slowest, time.monotonic() - started)
            if r.status == 200:
                acked.append(r.json()["results"][0]["offset"])
            else:
                assert r.status == 503 and r.json()["error"] == "unavailable", r.text
                failed += 1
            time.sleep(0.02)

    await asyncio.to_thread(publish_for, 0.5, "before")
    redis.process.signal(signal.SIGSTOP)
    try:
        waited = asyncio.to_thread(default.post_publish, {"channel": channel, "data": "late"})
        await asyncio.to_thread(publish_for, 2.0, "paused")
        r = await waited
        assert r.status == 503 and "within 1000 ms (broker.timeout_ms)" in r.text, r.text
    finally:
        redis.process.signal(signal.SIGCONT)
    await asyncio.to_thread(publish_for, 1.0, "after")

    assert failed >= 1, "no publish failed while Redis was paused"
    assert slowest < 2.5, f"a publish took {slowest:.1f}s (broker.timeout_ms is 500)"
    # Visible in /metrics: errors by kind, and the publish latency histogram.
    assert (b.metric("ferrocast_broker_errors_total", kind="timeout") or 0) >= 1
    assert (b.metric("ferrocast_broker_publish_latency_seconds_count") or 0) >= len(acked)
    assert (b.metric("ferrocast_broker_publish_latency_seconds_bucket", le="1") or 0) >= 1
    # The offsets Redis assigned are contiguous (late successes included), and every
    # subscriber on every node receives each of them once, in order.
    top = b.publish(channel, {"tag": "last"})["offset"]
    assert set(acked) <= set(range(1, top))
    for sub in subs:
        frames = await collect(sub, channel, top, timeout=15)
        assert [f["offset"] for f in frames] == list(range(1, top + 1))
        await sub.expect_silence(0.3)


async def test_clients_of_a_killed_node_recover_on_another_without_loss(start_node, ws):
    import signal

    a, b, c = (start_node("namespaces.chat.history_size=5000") for _ in range(3))
    channel = "chat.failover"
    clients = [await ws(a) for _ in range(100)]
    epoch = None
    for client in clients:
        epoch = (await client.subscribe_ok(channel))[channel]["epoch"]

    stop = asyncio.Event()
    published: list[int] = []

    def publish_until_stopped() -> None:
        pub = b.keepalive_publisher()
        n, started = 0, time.monotonic()
        try:
            while not stop.is_set():
                n += 1
                published.append(pub.publish_batch([(channel, {"n": n})])[0]["offset"])
                time.sleep(max(0.0, started + n / 200 - time.monotonic()))  # 200 msg/s
        finally:
            pub.close()

    publisher = asyncio.create_task(asyncio.to_thread(publish_until_stopped))
    await asyncio.sleep(0.5)
    # Each client has read some messages when its node dies.
    positions = []
    for client in clients:
        last = (await client.next_msg(channel))["offset"]
        positions.append(last)
    a.process.signal(signal.SIGKILL)
    await asyncio.sleep(0.3)
    survivors = []
    for i, last in enumerate(positions):
        node = (b, c)[i % 2]
        again = await ws(node)
        result = await again.subscribe(channel, recover={channel: {"epoch": epoch, "offset": last}})
        assert result[channel]["recovered"] is True, result
        survivors.append((again, last))
    await asyncio.sleep(0.3)
    stop.set()
    await publisher
    top = published[-1]
    assert top > 50, f"only {top} messages were published"
    for again, last in survivors:
        frames = await collect(again, channel, top - last, timeout=15)
        assert [f["offset"] for f in frames] == list(range(last + 1, top + 1))
    await survivors[0][0].expect_silence(0.3)


def restart(node, artifacts, track_process):
    """Starts `node` again, same port and flags (after it stopped); returns the new one."""
    proc = ManagedProcess("ferrocast", node.argv, artifacts / f"ferrocast-{node.port}-again.log",
                          clean_env()).start()
    track_process(proc)
    again = FerrocastServer(node.port, proc, node.argv, node.api_key, list(node.sets))
    proc.wait_until(lambda: http_status(again.base_url + "/readyz", timeout=0.5) == 200, 20,
                    "the restarted node to be ready")
    return again


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
@pytest.mark.timeout(180)
async def test_a_rolling_restart_loses_nothing_for_clients_of_the_js_client(
    start_node, artifacts, track_process
):
    """Three nodes behind the nginx front `ferrocast gen nginx` writes; 30 clients of the
    project's JS client (on Node) subscribed through it; every node restarted in turn
    (SIGTERM, then started again) while messages are published: every client receives every
    message once, in order, and each resubscription recovers."""
    channel, count = "chat.rolling", 30
    nodes = [start_node("namespaces.chat.history_size=10000", "server.reconnect_after_ms=200")
             for _ in range(3)]
    # nginx skips a node that refused connections for fail_timeout (10 s): a rolling restart
    # waits that long between nodes (docs/cluster.md). Without failure accounting nginx
    # just tries the next node, which keeps this test short.
    port = front(artifacts, track_process, nodes,
                 edit=lambda site: site.replace("max_fails=3 fail_timeout=10s", "max_fails=0"))
    script = REPO_ROOT / "e2e" / "node" / "lib" / "cluster-clients.mjs"
    clients_proc = NodeClients(script, f"http://127.0.0.1:{port}", channel, count, artifacts)
    stop = threading.Event()
    up = [True] * 3
    acked: list[int] = []

    def publish_until_stopped() -> None:
        n = 0
        while not stop.is_set():
            live = [node for i, node in enumerate(nodes) if up[i]]
            n += 1
            result = live[n % len(live)].publish(channel, {"n": n})
            assert result["offset"] == n, result
            acked.append(n)
            time.sleep(0.01)

    try:
        assert (await clients_proc.next_line(20))["event"] == "ready"
        publisher = asyncio.create_task(asyncio.to_thread(publish_until_stopped))
        await asyncio.sleep(0.5)
        for i in range(3):
            up[i] = False
            nodes[i].process.stop(timeout=10)  # SIGTERM: drain (1001 + reconnect hint), exit
            await asyncio.sleep(0.3)
            nodes[i] = await asyncio.to_thread(restart, nodes[i], artifacts, track_process)
            up[i] = True
            await asyncio.sleep(1.5)
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        total = acked[-1]
        assert total > 200, f"only {total} messages were published"

        deadline = time.monotonic() + 15
        while behind := [
            {k: c[k] for k in ("subscribed", "gaps", "reconnects", "sessions", "states")}
            | {"got": len(c["n"]), "last": c["n"][-3:]}
            for c in await clients_proc.report()
            if len(c["n"]) < total
        ]:
            assert time.monotonic() < deadline, f"clients never caught up to {total}: {behind}"
            await asyncio.sleep(0.3)
        clients = await clients_proc.report()
        for i, c in enumerate(clients):
            assert c["n"] == list(range(1, total + 1)), f"client {i}: lost or repeated messages"
            assert c["offsets"] == list(range(1, total + 1)), f"client {i}"
            assert len(c["epochs"]) == 1 and c["gaps"] == [] and c["duplicates"] == 0, c["gaps"]
            assert c["reconnects"] >= 1, f"client {i} never lost its node"
            again = c["subscribed"][1:]
            assert again and all(s["recovered"] is True for s in again), c["subscribed"]
        listed = nodes[0].get("/api/nodes").json()["nodes"]
        assert sum(n["connections"]["ws"] for n in listed) == count, listed
    finally:
        stop.set()
        clients_proc.close()


class NodeClients:
    """e2e/node/lib/cluster-clients.mjs in a child process: its JSON lines on a queue."""

    def __init__(self, script, url: str, channel: str, count: int, artifacts) -> None:
        import subprocess

        self.child = subprocess.Popen(
            ["node", str(script), url, channel, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(artifacts / "node-clients.log", "w"), text=True,
        )
        self.lines: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def read() -> None:
            for line in self.child.stdout:
                loop.call_soon_threadsafe(self.lines.put_nowait, json.loads(line))

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    async def next_line(self, timeout: float) -> dict:
        return await asyncio.wait_for(self.lines.get(), timeout)

    async def report(self) -> list[dict]:
        self.child.stdin.write("report\n")
        self.child.stdin.flush()
        line = await self.next_line(10)
        assert line["event"] == "report", line
        return line["clients"]

    def close(self) -> None:
        import subprocess

        try:
            self.child.stdin.close()
            self.child.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.child.kill()


async def test_the_simulator_runs_on_one_node_and_moves_when_it_dies(start_node, ws):
    import signal

    sets = ("simulator.rate=40", "simulator.symbols=[\"AAPL\"]", "simulator.backfill_bars=0")
    nodes = [start_node(*sets, simulator=True) for _ in range(3)]

    def publishers() -> list[int]:
        return [
            i
            for i, node in enumerate(nodes)
            if node.alive() and (node.metric("ferrocast_broker_published_total") or 0) > 0
        ]

    await wait_for(lambda: len(publishers()) >= 1, 10, "a node to take the simulator lease")
    await asyncio.sleep(1.0)
    running = publishers()
    assert len(running) == 1, f"the simulator runs on nodes {running}"
    (holder,) = running
    states = [n.get("/api/feeds").json()["feeds"] for n in nodes]
    assert sum(1 for f in states for s in f if s["name"] == "sim" and s["state"] == "live") == 1

    others = [n for i, n in enumerate(nodes) if i != holder]
    watcher = await ws(others[0])
    await watcher.subscribe_ok("ticks.AAPL")
    first = (await watcher.next_msg("ticks.AAPL"))["offset"]
    nodes[holder].process.signal(signal.SIGKILL)

    await wait_for(
        lambda: any((n.metric("ferrocast_broker_published_total") or 0) > 0 for n in others),
        12,
        "another node to take the simulator over",
    )
    # One stream throughout: offsets go on from where they were, +1 each, no duplicate.
    frames = await collect(watcher, "ticks.AAPL", 20, timeout=15)
    offsets = [f["offset"] for f in frames]
    assert offsets == list(range(first + 1, first + 21)), offsets
    await asyncio.sleep(1.0)
    assert len([n for n in others if (n.metric("ferrocast_broker_published_total") or 0) > 0]) == 1


async def test_a_node_shutting_down_hands_the_simulator_over_at_once(start_node, ws):
    sets = ("simulator.rate=40", "simulator.symbols=[\"AAPL\"]", "simulator.backfill_bars=0")
    nodes = [start_node(*sets, simulator=True) for _ in range(2)]

    def publishing(node) -> bool:
        return (node.metric("ferrocast_broker_published_total") or 0) > 0

    await wait_for(lambda: any(publishing(n) for n in nodes), 10, "a simulator holder")
    holder = next(n for n in nodes if publishing(n))
    other = next(n for n in nodes if n is not holder)
    watcher = await ws(other)
    await watcher.subscribe_ok("ticks.AAPL")
    first = (await watcher.next_msg("ticks.AAPL"))["offset"]
    stopped = time.monotonic()
    holder.process.stop(timeout=10)  # SIGTERM: drains, then releases its lease
    # Released, the lease is taken at the other node's next attempt (every 2 s), well before
    # the 6 s it would take to expire.
    await wait_for(lambda: publishing(other), 3.5, "the other node to take the simulator")
    assert time.monotonic() - stopped < 4.0
    frames = await collect(watcher, "ticks.AAPL", 10, timeout=10)
    assert [f["offset"] for f in frames] == list(range(first + 1, first + 11))
    assert "leases released" in holder.log()
    assert [n["listen"] for n in other.get("/api/nodes").json()["nodes"]] == [
        f"127.0.0.1:{other.port}"
    ], "the stopped node left the list at once"


def ingest_holders(nodes) -> list:
    """The live nodes that say they run the cluster's ingestion (`/api/nodes`)."""
    holders = []
    for node in nodes:
        if node.alive():
            mine = [n for n in node.get("/api/nodes").json()["nodes"]
                    if n["listen"] == f"127.0.0.1:{node.port}"]
            if mine and mine[0]["ingest"]:
                holders.append(node)
    return holders


async def test_a_feed_runs_on_one_node_for_every_node_s_clients_and_moves_when_it_dies(
    start_node, ws, upstream, artifacts
):
    import signal

    up = upstream("massive", "--api-key", KEY, "--rate", "40")
    config = massive_config(artifacts / "feeds.toml", up.port, linger_ms="2000")
    nodes = [start_node(config=config, env={"MASSIVE_API_KEY": KEY}) for _ in range(3)]

    def feed_states(among) -> list[str]:
        return sorted(
            next(f["state"] for f in n.get("/api/feeds").json()["feeds"] if f["name"] == "stocks")
            for n in among
        )

    await wait_for(lambda: feed_states(nodes) == ["live", "standby", "standby"], 10,
                   "one node running the feed, two standing by")
    (holder,) = ingest_holders(nodes)
    assert all(n.get("/readyz").status == 200 for n in nodes), "a standby feed is not a fault"
    assert up.subscriptions() == set() and len(up.state()["connections"]) == 1

    # A client on another node is the only one to watch AAPL: the holder subscribes upstream.
    watcher_node = next(n for n in nodes if n is not holder)
    watcher = await ws(watcher_node)
    await watcher.subscribe_ok("ticks.AAPL")
    await wait_for(lambda: up.subscriptions() == {"T.AAPL"}, 5, "T.AAPL upstream")
    frames = await collect(watcher, "ticks.AAPL", 5)
    assert all(f["data"]["src"] == "massive" for f in frames)
    offsets = [f["offset"] for f in frames]
    assert offsets == list(range(offsets[0], offsets[0] + 5)), offsets

    holder.process.signal(signal.SIGKILL)
    survivors = [n for n in nodes if n is not holder]
    await wait_for(lambda: feed_states(survivors) == ["live", "standby"], 12,
                   "another node to run the feed")
    await wait_for(lambda: up.subscriptions() == {"T.AAPL"} and len(up.state()["connections"]) == 1,
                   5, "the new holder to subscribe T.AAPL upstream")
    # One stream throughout: the offsets go on, +1 each, from where they were.
    frames = await collect(watcher, "ticks.AAPL", 10, timeout=15)
    assert [f["offset"] for f in frames] == list(range(offsets[-1] + 1, offsets[-1] + 11))

    # The last watcher leaves: the upstream subscription follows (after the linger).
    await watcher.close()
    await wait_for(lambda: up.subscriptions() == set(), 10, "nothing upstream")


async def test_candles_are_built_once_per_cluster_from_every_node_s_trades(start_node, ws):
    a, b = start_node(), start_node()
    await wait_for(lambda: len(ingest_holders([a, b])) == 1, 5, "one node building candles")
    watcher = await ws(a)
    await watcher.subscribe_ok("candles.ZZZ.1s")

    def trades_through_both(count: int) -> int:
        """Publishes `count` trades of size 1 in one second window, alternately through
        each node; returns the window's start."""
        now = int(time.time() * 1000)
        start = now - now % 1000 + (1000 if now % 1000 > 500 else 0)
        while int(time.time() * 1000) < start:
            time.sleep(0.01)
        for i in range(count):
            (a, b)[i % 2].publish("ticks.ZZZ", {"sym": "ZZZ", "price": 10 + i, "size": 1,
                                                "ts": start + 10 * i})
        return start

    def closed_bars(start: int) -> list[dict]:
        page = a.get("/api/channels/candles.ZZZ.1s/history?since=0&limit=100").json()
        return [m["data"] for m in page["messages"] if m["data"]["start"] == start]

    start = await asyncio.to_thread(trades_through_both, 10)
    await wait_for(lambda: closed_bars(start), 5, "the window's closed bar")
    await asyncio.sleep(1.5)  # a second builder would close the same window by now
    (bar,) = closed_bars(start)
    assert (bar["trades"], bar["volume"], bar["open"], bar["close"]) == (10, 10, 10, 19), bar

    # The node building them stops (SIGTERM): the other takes over and builds the next ones.
    (holder,) = ingest_holders([a, b])
    other = b if holder is a else a
    holder.process.stop(timeout=10)
    await wait_for(lambda: ingest_holders([other]) == [other], 5, "the other node to take over")
    a = b = other
    start = await asyncio.to_thread(trades_through_both, 4)
    await wait_for(lambda: closed_bars(start), 5, "a bar built by the new holder")
    (bar,) = closed_bars(start)
    assert bar["trades"] == 4 and bar["volume"] == 4, bar


async def test_nodes_share_channels_over_tls_and_refuse_an_untrusted_certificate(
    artifacts, track_process, start_server, ws
):
    ca, cert, key = make_tls_files(artifacts)
    tls_redis = RedisServer(artifacts, tls=(cert, key)).start()
    track_process(tls_redis.process)
    common = ("broker.kind=redis", f"broker.url={tls_redis.url}", "broker.timeout_ms=500",
              "broker.ready_grace_ms=500")
    a = start_server(*common, f"broker.tls_ca_file={ca}")
    b = start_server(*common, f"broker.tls_ca_file={ca}")
    sub = await ws(a)
    await sub.subscribe_ok("chat.tls")
    published = b.publish("chat.tls", {"secret": True})
    msg = await sub.next_msg("chat.tls")
    assert msg["offset"] == published["offset"] == 1 and msg["data"] == {"secret": True}
    assert a.get("/readyz").status == 200

    # Without the CA, the system's roots do not trust the private certificate.
    untrusting = start_server(*common)
    await wait_for(lambda: untrusting.get("/readyz").status == 503, 5, "/readyz 503")
    r = untrusting.post_publish({"channel": "chat.tls", "data": 1})
    assert r.status == 503 and r.json()["error"] == "unavailable", r.text
    assert "certificate" in r.json()["message"], r.text


async def test_api_nodes_lists_the_live_nodes_with_their_connections(start_node, start_server, ws):
    import signal

    alone = start_server().get("/api/nodes").json()["nodes"]
    assert len(alone) == 1 and alone[0]["connections"]["ws"] == 0, alone

    a, b, c = start_node(), start_node(), start_node()
    for _ in range(2):
        await (await ws(b)).subscribe_ok("chat.nodes")

    def listed() -> dict[str, dict]:
        return {n["listen"]: n for n in a.get("/api/nodes").json()["nodes"]}

    def addr(node) -> str:
        return f"127.0.0.1:{node.port}"

    await wait_for(
        lambda: len(listed()) == 3 and listed()[addr(b)]["connections"]["ws"] == 2,
        6,
        "three nodes, two WebSocket clients on node b",
    )
    nodes = listed()
    assert nodes[addr(b)]["subscriptions"] == 2
    assert nodes[addr(a)]["connections"]["ws"] == 0
    assert len({n["node"] for n in nodes.values()}) == 3

    c.process.signal(signal.SIGKILL)
    await wait_for(lambda: addr(c) not in listed(), 10, "the killed node to leave the list")
    assert set(listed()) == {addr(a), addr(b)}


async def test_channels_and_stats_on_any_node_count_every_node(start_node, redis, ws):
    a, b, c = start_node(), start_node(), start_node()
    clients = {}
    for node, channel, count in ((a, "chat.shared", 2), (b, "chat.shared", 3), (c, "chat.solo", 1)):
        clients[node.port] = [await ws(node) for _ in range(count)]
        for client in clients[node.port]:
            await client.subscribe_ok(channel)

    def nodes_subscribed(channel: str) -> int:
        return redis.command("PUBSUB", "NUMSUB", f"ferrocast:p:{channel}")[1]

    # Redis carries each channel once per node that has subscribers, not once per client.
    assert nodes_subscribed("chat.shared") == 2 and nodes_subscribed("chat.solo") == 1
    for i in range(4):
        (a, b)[i % 2].publish("chat.shared", {"i": i})
    for node in (a, b, c):
        page = node.get("/api/channels").json()
        assert page["nodes"] == 3 and page["total"] == 2 and page["next"] is None, page
        listed = {ch["channel"]: ch for ch in page["channels"]}
        assert listed["chat.shared"]["subscribers"] == 5 and listed["chat.shared"]["offset"] == 4
        assert listed["chat.solo"]["subscribers"] == 1, listed
        stats = node.get("/api/stats").json()
        assert stats["nodes"] == 3 and stats["broker"] == "redis", stats
        assert stats["connections"]["ws"] == 6 and stats["subscriptions"] == 6, stats
        assert stats["messages_in"] == 4, "each publish counted once, by the node it came through"
    # Pages: one channel at a time, in name order, across the nodes.
    first = c.get("/api/channels?limit=1").json()
    assert [ch["channel"] for ch in first["channels"]] == ["chat.shared"]
    assert first["next"] == "chat.shared"
    second = c.get("/api/channels?limit=1&after=chat.shared").json()
    assert [ch["channel"] for ch in second["channels"]] == ["chat.solo"]
    assert second["next"] is None

    # The last client on node b leaves: node b gives the channel up (after broker.timeout_ms).
    for client in clients[b.port]:
        await client.close()
    await wait_for(lambda: nodes_subscribed("chat.shared") == 1, 5, "node b to unsubscribe")


async def test_bench_spreads_subscribers_over_nodes_and_recovers_across_them(start_node):
    sets = ("namespaces.bench.history_size=2000", "namespaces.bench.max_replay=2000")
    a, b = start_node(*sets), start_node(*sets)
    nodes = ["--url", a.ws_url(), "--url", b.ws_url()]
    pids = ["--server-pid", str(a.process.proc.pid), "--server-pid", str(b.process.proc.pid)]
    out = await asyncio.to_thread(run_ferrocast, [
        "bench", *nodes, *pids, "--subscribers", "20", "--channels", "1", "--rate", "300",
        "--duration", "1", "--warmup", "0.5", "--json"], timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["config"]["url"] == [a.ws_url(), b.ws_url()]
    assert report["config"]["publish_url"] == [a.base_url, b.base_url]
    delivery = report["delivery"]
    assert delivery["delivered"] > 0 and delivery["lost"] == 0 and delivery["duplicates"] == 0
    assert report["server"]["pid"] == [a.process.proc.pid, b.process.proc.pid]

    # Recovery: published through the first node, replayed from Redis on the second.
    out = await asyncio.to_thread(run_ferrocast, ["bench", *nodes, "--recovery", "1500", "--json"],
                                  timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["messages"] == 1500 and report["out_of_order"] == 0, report


async def test_publishes_survive_redis_forgetting_its_scripts(start_node, redis, ws):
    a = start_node()
    sub = await ws(a)
    await sub.subscribe_ok("chat.scripts")
    assert a.publish("chat.scripts", 1)["offset"] == 1
    # What a restart behind a transparent reconnect looks like to the node: the script
    # cache is empty. The next publish still succeeds, in order.
    assert redis.command("SCRIPT", "FLUSH") == "OK"
    results = a.publish_batch([("chat.scripts", n) for n in (2, 3, 4)])
    assert [r["offset"] for r in results] == [2, 3, 4]
    frames = await collect(sub, "chat.scripts", 4)
    assert [f["data"] for f in frames] == [1, 2, 3, 4]


async def test_a_batch_run_to_one_channel_gets_consecutive_offsets_across_nodes(start_node):
    nodes = [start_node("namespaces.chat.history_size=2000") for _ in range(2)]
    channel = "chat.runs"

    def publish_batches(node, tag: str) -> list[list[int]]:
        pub = node.keepalive_publisher()
        try:
            batches = []
            for b in range(10):
                # A run to the channel, one message elsewhere, a second run.
                msgs = [(channel, {"t": tag, "b": b, "k": k}) for k in range(20)]
                msgs += [("chat.elsewhere", {"t": tag})]
                msgs += [(channel, {"t": tag, "b": b, "k": 20 + k}) for k in range(20)]
                results = pub.publish_batch(msgs)
                offsets = [r["offset"] for r in results if r["channel"] == channel]
                batches.append(offsets[:20])
                batches.append(offsets[20:])
            return batches
        finally:
            pub.close()

    got = await asyncio.gather(
        asyncio.to_thread(publish_batches, nodes[0], "a"),
        asyncio.to_thread(publish_batches, nodes[1], "b"),
    )
    runs = [run for batches in got for run in batches]
    for run in runs:
        assert run == list(range(run[0], run[0] + 20)), f"a run was interleaved: {run}"
    assert sorted(o for run in runs for o in run) == list(range(1, 801))
    page = nodes[1].get(f"/api/channels/{channel}/history?since=0&limit=1000").json()
    assert [m["offset"] for m in page["messages"]] == list(range(1, 801))


async def test_nodes_over_a_redis_cluster_deliver_and_recover_on_every_slot(
    artifacts, track_process, start_server, ws
):
    cluster = RedisCluster(artifacts).start(track_process)
    sets = ("broker.kind=redis", f"broker.cluster_urls={json.dumps(cluster.urls)}",
            "broker.timeout_ms=1000")
    a, b = start_server(*sets), start_server(*sets)
    # Channels whose keys land on all three masters.
    channels = [f"chat.slot{i}" for i in range(12)]
    sub = await ws(a)
    await sub.subscribe_ok(*channels)
    epochs = {}
    for round_ in range(3):
        results = b.publish_batch([(c, {"r": round_}) for c in channels])
        for r in results:
            epochs[r["channel"]] = r["epoch"]
            assert r["offset"] == round_ + 1, r
    got: dict[str, list[int]] = {c: [] for c in channels}
    for _ in range(3 * len(channels)):
        msg = await sub.next_msg()
        got[msg["channel"]].append(msg["offset"])
    assert all(offsets == [1, 2, 3] for offsets in got.values()), got
    masters_used = 0
    for server in cluster.servers:
        if int(server.command("DBSIZE")) > 0:
            masters_used += 1
    assert masters_used == 3, "the channels did not spread over the masters"

    again = await ws(b)
    recover = {c: {"epoch": epochs[c], "offset": 1} for c in channels}
    result = await again.subscribe(*channels, recover=recover)
    assert all(result[c]["recovered"] is True and result[c]["replayed"] == 2 for c in channels)
    replayed: dict[str, list[int]] = {c: [] for c in channels}
    for _ in range(2 * len(channels)):
        msg = await again.next_msg()
        replayed[msg["channel"]].append(msg["offset"])
    assert all(offsets == [2, 3] for offsets in replayed.values()), replayed
    assert len(a.get("/api/nodes").json()["nodes"]) == 2


async def test_nodes_follow_a_sentinel_failover_and_say_where_it_lost_writes(
    artifacts, track_process, start_server, ws
):
    import signal

    redis = RedisSentinels(artifacts).start(track_process)
    common = ("broker.kind=redis", "broker.timeout_ms=500", "broker.position_check_ms=500")
    # Both spellings: the list with a master name, and the redis+sentinel:// URL.
    a = start_server(*common, f"broker.sentinels={json.dumps(redis.sentinel_urls)}",
                     "broker.sentinel_master=mymaster")
    hosts = ",".join(u.removeprefix("redis://") for u in redis.sentinel_urls)
    b = start_server(*common, f"broker.url=redis+sentinel://{hosts}/mymaster/0")
    kept, lost = "chat.kept", "chat.lost"
    sub = await ws(a)
    epoch = (await sub.subscribe_ok(kept, lost))[kept]["epoch"]
    leaver = await ws(a)
    await leaver.subscribe_ok(kept, lost)
    for i in range(1, 4):
        b.publish_batch([(kept, {"i": i}), (lost, {"i": i})])
    assert redis.primary.command("WAIT", 1, 2000) == 1, "the replica has the first three"
    # The replica is frozen (SIGSTOP) and cut off (the primary drops its link, so nothing
    # more reaches even its socket buffer); two more messages of one channel are
    # acknowledged by the primary alone, delivered, then lost with it.
    redis.replica.process.signal(signal.SIGSTOP)
    try:
        assert redis.primary.command("CLIENT", "KILL", "TYPE", "replica") == 1
        for i in (4, 5):
            assert b.publish(lost, {"i": i})["offset"] == i
        for client in (sub, leaver):
            frames = [await client.next_msg() for _ in range(8)]
            got = sorted((f["channel"], f["offset"]) for f in frames)
            assert got == sorted([(kept, o) for o in (1, 2, 3)] + [(lost, o) for o in range(1, 6)])
        await leaver.close()
        redis.primary.process.signal(signal.SIGKILL)
    finally:
        redis.replica.process.signal(signal.SIGCONT)
    await wait_for(lambda: redis.primary_port() == redis.replica.port, 20, "the failover")

    def publish_ok() -> bool:
        return b.post_publish({"channel": lost, "data": {"i": "after"}}).status == 200

    await wait_for(publish_ok, 15, "publishes to succeed on the promoted replica")
    # Offsets 4 and 5 were given anew: the subscriber is moved to a new epoch that goes on
    # from the last message both histories share, and receives the new message.
    live = await sub.next_msg(lost, timeout=15)
    assert live["data"] == {"i": "after"} and live["offset"] == 4, live
    fenced = live["epoch"]
    assert fenced != epoch, "the channel that lost writes has a new epoch"
    b.publish(kept, {"i": 4})
    live = await sub.next_msg(kept, timeout=15)
    assert live["offset"] == 4 and live["epoch"] == epoch, "the channel that lost nothing goes on"
    assert sum(n.metric("ferrocast_broker_fences_total") or 0 for n in (a, b)) >= 1

    # A client that had everything recovers on the other node: exact where nothing was lost,
    # an honest `recovered: false` (with the new epoch) where it was.
    await wait_for(lambda: b.get("/readyz").status == 200, 15, "node b ready")
    again = await ws(b)
    result = await again.subscribe(
        kept, lost, recover={kept: {"epoch": epoch, "offset": 3}, lost: {"epoch": epoch, "offset": 5}}
    )
    assert result[kept].get("recovered") is True and result[kept]["replayed"] == 1, result
    assert result[lost].get("recovered") is False, result
    assert result[lost]["epoch"] == fenced and result[lost]["offset"] == 4, result
    frame = await again.next_msg(kept)
    assert frame["offset"] == 4 and frame["data"] == {"i": 4}, frame
