"""/metrics: Prometheus text whose values follow what the test did."""

from __future__ import annotations

import asyncio
import time

from ferrocast_e2e.server import parse_metrics


async def wait_metric(server, expected, name, timeout=5.0, **labels):
    deadline = time.monotonic() + timeout
    while True:
        value = await server.ametric(name, **labels)
        if value == expected:
            return
        assert time.monotonic() < deadline, f"{name}{labels} is {value}, expected {expected}"
        await asyncio.sleep(0.05)


async def test_metrics_exposition_is_well_formed(server):
    r = server.get("/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(r.text)  # raises on a malformed line
    names = {n for n, _, _ in samples}
    for required in (
        "ferrocast_connections",
        "ferrocast_messages_out_total",
        "ferrocast_messages_in_total",
        "ferrocast_delivery_latency_seconds_bucket",
        "ferrocast_delivery_latency_seconds_count",
    ):
        assert required in names, required
    # Every family has a TYPE line.
    types = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE ")}
    for n in names:
        base = n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        assert n in types or base in types, n


async def test_connection_gauge_follows_connections(server, ws):
    assert server.metric("ferrocast_connections", transport="ws") == 0
    clients = [await ws(server) for _ in range(3)]
    await wait_metric(server, 3, "ferrocast_connections", transport="ws")
    assert server.metric("ferrocast_connections_total", transport="ws") == 3
    await clients[0].close()
    await wait_metric(server, 2, "ferrocast_connections", transport="ws")
    assert server.metric("ferrocast_connections_total", transport="ws") == 3
    assert server.metric("ferrocast_closes_total", code="1000") == 1


async def test_message_counters_and_latency_histogram(server, ws):
    before = {
        "out": server.metric("ferrocast_messages_out_total", transport="ws"),
        "in": server.metric("ferrocast_messages_in_total"),
        "lat": server.metric("ferrocast_delivery_latency_seconds_count"),
        "inf": server.metric("ferrocast_delivery_latency_seconds_bucket", le="+Inf"),
        "req": server.metric("ferrocast_http_publish_requests_total"),
    }
    assert before == {"out": 0, "in": 0, "lat": 0, "inf": 0, "req": 0}, before
    a = await ws(server)
    b = await ws(server)
    await a.subscribe_ok("chat.m")
    await b.subscribe_ok("chat.m")
    server.publish_batch([("chat.m", i) for i in range(5)])
    for c in (a, b):
        for _ in range(5):
            await c.next_msg("chat.m")
    # 5 messages in, each written to 2 subscribers.
    await wait_metric(server, 10, "ferrocast_messages_out_total", transport="ws")
    text = server.metrics_text()
    from ferrocast_e2e.server import metric

    assert metric(text, "ferrocast_messages_in_total") == 5
    assert metric(text, "ferrocast_http_publish_requests_total") == 1
    assert metric(text, "ferrocast_delivery_latency_seconds_count") == 10
    assert metric(text, "ferrocast_delivery_latency_seconds_bucket", le="+Inf") == 10
    # Buckets are cumulative and end at the count.
    buckets = [
        (labels["le"], v)
        for n, labels, v in parse_metrics(text)
        if n == "ferrocast_delivery_latency_seconds_bucket"
    ]
    values = [v for _, v in buckets]
    assert values == sorted(values), buckets
    assert buckets[-1] == ("+Inf", 10)
    # On loopback every message is delivered well within 5 s.
    assert metric(text, "ferrocast_delivery_latency_seconds_bucket", le="5") == 10
    assert metric(text, "ferrocast_delivery_latency_seconds_sum") < 10 * 5
    assert metric(text, "ferrocast_subscriptions") == 2
    # Control frames (acks) are not counted as messages.
    assert metric(text, "ferrocast_bytes_out_total", transport="ws") > 0


async def test_close_codes_are_counted(server, ws):
    assert server.metric("ferrocast_closes_total", code="1009") is None
    c = await ws(server)
    await c.send_raw("x" * 70_000)
    closed = await c.wait_closed()
    assert closed.code == 1009
    await wait_metric(server, 1, "ferrocast_closes_total", code="1009")
    assert server.metric("ferrocast_frame_errors_total", code="frame_too_big") == 1
    c2 = await ws(server)
    await c2.send_raw(b"\x00binary")
    assert (await c2.wait_closed()).code == 1003
    await wait_metric(server, 1, "ferrocast_closes_total", code="1003")
    assert server.metric("ferrocast_closes_total", code="1009") == 1


async def test_publish_ack_histogram_counts_http_and_websocket_publishes(server, ws):
    """ferrocast_publish_ack_seconds counts each answered publish under its source: one
    per message of a `POST /api/publish` (single or batch), one per client `publish`."""
    name = "ferrocast_publish_ack_seconds"
    for source in ("http", "ws", "sse", "socketio", "feed"):
        assert server.metric(f"{name}_count", source=source) == 0, source
    server.publish("chat.ack", {"n": 1})
    server.publish_batch([("chat.ack", 2), ("chat.ack", 3)])
    publisher = await ws(server)
    for n in range(3):
        reply = await publisher.request({"op": "publish", "channel": "chat.ack", "data": n})
        assert reply["type"] == "ack", reply
    # A refused publish is answered but not counted.
    refused = await publisher.request({"op": "publish", "channel": "locked.x", "data": 0})
    assert refused["type"] == "error", refused
    text = server.metrics_text()
    from ferrocast_e2e.server import metric

    # Two requests over HTTP, three acks over the WebSocket.
    assert metric(text, f"{name}_count", source="http") == 2
    assert metric(text, f"{name}_count", source="ws") == 3
    assert metric(text, f"{name}_bucket", source="ws", le="+Inf") == 3
    assert metric(text, f"{name}_count", source="sse") == 0
    # Buckets are cumulative and end at the count.
    for source, count in (("http", 2), ("ws", 3)):
        buckets = [
            (float(labels["le"]), value)
            for n, labels, value in parse_metrics(text)
            if n == f"{name}_bucket" and labels.get("source") == source and labels["le"] != "+Inf"
        ]
        assert len(buckets) >= 10 and buckets == sorted(buckets), buckets
        assert buckets[-1][1] <= count
        assert metric(text, f"{name}_sum", source=source) >= 0
