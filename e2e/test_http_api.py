"""The HTTP API: publish, channels, history, health; with urllib as the client."""

from __future__ import annotations

import asyncio
import re
import time

import httpx


def channel_table(server) -> dict[str, dict]:
    r = server.get("/api/channels")
    assert r.status == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return {ch["channel"]: ch for ch in r.json()["channels"]}


async def test_publish_single_message(server, ws):
    c = await ws(server)
    sub = await c.subscribe_ok("chat.api")
    r = server.post_publish({"channel": "chat.api", "data": {"price": 1.5, "tags": ["a"]}})
    assert r.status == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    results = r.json()["results"]
    assert len(results) == 1
    assert {k: results[0][k] for k in ("channel", "offset", "epoch")} == {
        "channel": "chat.api",
        "offset": 1,
        "epoch": sub["chat.api"]["epoch"],
    }
    msg = await c.next_msg("chat.api")
    assert (msg["offset"], msg["data"]) == (1, {"price": 1.5, "tags": ["a"]})


async def test_publish_batch(server, ws):
    c = await ws(server)
    await c.subscribe_ok("chat.b1", "chat.b2")
    r = server.post_publish(
        {
            "messages": [
                {"channel": "chat.b1", "data": 1},
                {"channel": "chat.b2", "data": "two"},
                {"channel": "chat.b1", "data": None},
                {"channel": "chat.b1", "data": [3]},
            ]
        }
    )
    assert r.status == 200, r.text
    results = r.json()["results"]
    assert [(x["channel"], x["offset"]) for x in results] == [
        ("chat.b1", 1),
        ("chat.b2", 1),
        ("chat.b1", 2),
        ("chat.b1", 3),
    ]
    assert all({"channel", "offset", "epoch"} <= set(x) for x in results)
    assert results[0]["epoch"] == results[2]["epoch"] == results[3]["epoch"]
    got = [await c.next_msg() for _ in range(4)]
    assert [(m["channel"], m["offset"], m["data"]) for m in got] == [
        ("chat.b1", 1, 1),
        ("chat.b2", 1, "two"),
        ("chat.b1", 2, None),
        ("chat.b1", 3, [3]),
    ]


async def test_publish_invalid_channel_is_400_and_publishes_nothing(server, ws):
    c = await ws(server)
    await c.subscribe_ok("chat.valid")
    r = server.post_publish({"channel": "bad channel", "data": 1})
    assert r.status == 400, r.text
    assert r.json()["error"] == "invalid_channel"
    # One bad channel in a batch rejects the whole batch.
    r = server.post_publish(
        {
            "messages": [
                {"channel": "chat.valid", "data": 1},
                {"channel": "chat/invalid", "data": 2},
            ]
        }
    )
    assert r.status == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_channel"
    assert "message 1" in body["message"], body
    await c.expect_silence(0.3)
    table = channel_table(server)
    assert table["chat.valid"]["offset"] == 0
    assert "bad channel" not in table and "chat/invalid" not in table
    # The next good publish gets offset 1: nothing was consumed.
    assert server.publish("chat.valid", "ok")["offset"] == 1


async def test_publish_bad_json_and_bad_shape_are_400(server):
    for body in (b"{nope", b"", b"[]", b'"text"'):
        r = server.post_publish(body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (body, r.status, r.text)
        assert r.json()["error"] == "bad_request", (body, r.text)
    for body in (
        {"channel": "chat.x"},  # no data
        {"data": 1},  # no channel
        {"channel": "chat.x", "data": 1, "messages": []},  # both forms
        {"messages": [{"channel": "chat.x"}]},  # item without data
    ):
        r = server.post_publish(body)
        assert r.status == 400, (body, r.status, r.text)
        assert r.json()["error"] == "bad_request", (body, r.text)
    assert "chat.x" not in channel_table(server)


async def test_publish_body_limit(start_server):
    server = start_server("api.max_body_bytes=1024")
    r = server.post_publish({"channel": "chat.big", "data": "x" * 2000})
    assert r.status == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert server.post_publish({"channel": "chat.big", "data": "x" * 500}).status == 200


async def test_api_key_is_required_when_configured(start_server, ws):
    server = start_server(api_key="s3cret")
    c = await ws(server)
    await c.subscribe_ok("chat.auth")
    body = {"channel": "chat.auth", "data": 1}
    for headers in (
        {"Authorization": ""},  # none
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "Bearer s3cre"},
        {"Authorization": "s3cret"},  # no scheme
        {"Authorization": "Basic s3cret"},
    ):
        r = server.post_publish(body, headers=headers)
        assert r.status == 401, (headers, r.status, r.text)
        assert r.json()["error"] == "unauthorized"
    await c.expect_silence(0.2)
    r = server.post_publish(body, headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200, r.text
    assert r.json()["results"][0]["offset"] == 1
    assert (await c.next_msg("chat.auth"))["data"] == 1
    rejected = server.metric("ferrocast_http_publish_rejected_total")
    assert rejected == 6, rejected
    # Reading is behind the key too (api.key has every scope).
    assert server.get("/api/channels", headers={"Authorization": ""}).status == 401
    assert server.get("/api/channels").status == 200


async def test_a_flood_of_refused_publishes_is_counted_exactly_and_logged_a_few_a_second(start_server):
    """Bad JSON, a bad channel, a wrong key, too deep, too large, from many connections at
    once: each gets its answer and is counted, the log gets at most five full lines a second
    and summary lines that account for every one it left out."""
    server = start_server("api.max_body_bytes=4096", "server.max_data_depth=8", api_key="flood-key-0123456789")
    key = {"Authorization": "Bearer flood-key-0123456789"}
    bad = [
        (b"{nope", key, 400),
        (b'{"channel":"bad name","data":1}', key, 400),
        (b'{"channel":"chat.flood","data":1}', {"Authorization": "Bearer wrong"}, 401),
        (b'{"channel":"chat.flood","data":' + b"[" * 20 + b"]" * 20 + b"}", key, 400),
        (b'{"channel":"chat.flood","data":"' + b"x" * 5000 + b'"}', key, 413),
    ]
    total = 1000
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=20,
                                 limits=httpx.Limits(max_connections=16)) as http:
        async def send(i: int) -> None:
            body, headers, status = bad[i % len(bad)]
            r = await http.post("/api/publish", content=body,
                                headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == status, (i, r.text)

        await asyncio.gather(*(send(i) for i in range(total)))
        flood_s = time.monotonic() - started
        assert server.metric("ferrocast_http_publish_rejected_total") == total
        # A good publish goes through, and is neither refused nor logged as one.
        r = await http.post("/api/publish", json={"channel": "chat.flood", "data": 1}, headers=key)
        assert r.status_code == 200, r.text

    refusal = re.compile(r"publish refused:|request body .*refused: too large")
    summary = re.compile(r"(\d+) more refused HTTP API requests not logged")
    deadline = time.monotonic() + 10
    while True:
        lines = server.log().splitlines()
        logged = sum(1 for line in lines if refusal.search(line))
        summarized = sum(int(m.group(1)) for line in lines if (m := summary.search(line)))
        if logged + summarized == total:
            break
        assert time.monotonic() < deadline, (logged, summarized, server.log()[-3000:])
        await asyncio.sleep(0.2)
    assert summarized > 0, "the flood was never throttled"
    # Five a second while it lasted (windows start at the first refusal after the last one).
    assert logged <= 5 * (int(flood_s) + 2), (logged, flood_s)
    assert server.metric("ferrocast_http_publish_rejected_total") == total


async def test_api_key_from_environment_variable(start_server):
    server = start_server("api.key_env=E2E_PUBLISH_KEY", env={"E2E_PUBLISH_KEY": "from-env"})
    body = {"channel": "chat.env", "data": 1}
    assert server.post_publish(body).status == 401
    ok = server.post_publish(body, headers={"Authorization": "Bearer from-env"})
    assert ok.status == 200, ok.text


async def test_channels_list_subscribers_and_offsets(server, ws):
    a = await ws(server)
    b = await ws(server)
    await a.subscribe_ok("chat.x", "chat.y")
    await b.subscribe_ok("chat.x")
    server.publish_batch([("chat.x", i) for i in range(3)] + [("chat.z", "no one listens")])
    table = channel_table(server)
    assert {k: (v["subscribers"], v["offset"]) for k, v in table.items()} == {
        "chat.x": (2, 3),
        "chat.y": (1, 0),
        "chat.z": (0, 1),
    }
    assert all(isinstance(v["epoch"], str) and v["epoch"] for v in table.values())
    await b.close()
    # The count follows disconnects.
    import asyncio

    for _ in range(100):
        if channel_table(server)["chat.x"]["subscribers"] == 1:
            break
        await asyncio.sleep(0.02)
    assert channel_table(server)["chat.x"]["subscribers"] == 1


async def test_history_returns_retained_messages_in_order(server):
    results = server.publish_batch([("chat.hist", {"n": i}) for i in range(1, 11)])
    epoch = results[0]["epoch"]
    r = server.get("/api/channels/chat.hist/history?since=0&limit=100")
    assert r.status == 200, r.text
    page = r.json()
    assert page["channel"] == "chat.hist"
    assert page["epoch"] == epoch
    assert page["offset"] == 10
    assert page["messages"] == [{"offset": i, "data": {"n": i}} for i in range(1, 11)]
    page = server.get("/api/channels/chat.hist/history?since=4&limit=3").json()
    assert [m["offset"] for m in page["messages"]] == [5, 6, 7]
    assert [m["data"]["n"] for m in page["messages"]] == [5, 6, 7]
    assert server.get("/api/channels/chat.hist/history?since=10").json()["messages"] == []
    # Defaults: since=0, limit=100.
    assert len(server.get("/api/channels/chat.hist/history").json()["messages"]) == 10


async def test_history_is_bounded_by_history_size(start_server):
    server = start_server("namespaces.chat.history_size=5")
    server.publish_batch([("chat.short", i) for i in range(1, 11)])
    page = server.get("/api/channels/chat.short/history?since=0&limit=100").json()
    assert [m["offset"] for m in page["messages"]] == [6, 7, 8, 9, 10]
    assert [m["data"] for m in page["messages"]] == [6, 7, 8, 9, 10]


async def test_history_errors(server):
    r = server.get("/api/channels/chat.never/history")
    assert r.status == 404, r.text
    assert r.json()["error"] == "unknown_channel"
    r = server.get("/api/channels/bad%20name/history")
    assert r.status == 400, r.text
    assert r.json()["error"] == "invalid_channel"


async def test_health_and_readiness(server):
    r = server.get("/healthz")
    assert (r.status, r.json()) == (200, {"status": "ok"})
    r = server.get("/readyz")
    assert r.status == 200
    assert r.json()["ready"] is True


async def test_stats_summary_counts(server, ws):
    c = await ws(server)
    await c.subscribe_ok("chat.s1", "chat.s2")
    server.publish_batch([("chat.s1", 1), ("chat.s2", 2)])
    await c.next_msg()
    await c.next_msg()
    stats = server.get("/api/stats").json()
    assert stats["connections"]["ws"] == 1
    assert stats["subscriptions"] == 2
    assert stats["messages_in"] == 2
    assert stats["messages_out"] == 2
