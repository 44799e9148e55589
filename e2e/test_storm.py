"""Reconnect storm: 100 clients (50 Python `websockets`, 50 of our Rust client) drop their
connections at random points while 10,000 messages are published; every client must end
with every message exactly once and in order, recovering each gap from history."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import websockets

CHANNEL = "storm.prices"
MESSAGES = 10_000
PY_CLIENTS = 50
RUST_CLIENTS = 50
DROPS_PER_CLIENT = 3


def storm_bin() -> Path:
    root = Path(__file__).resolve().parent.parent
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    path = target / "debug" / "examples" / "storm"
    assert path.exists(), f"{path} is missing: build it with `cargo build -p ferrocast-client --examples`"
    return path


async def python_participant(url: str, ready: asyncio.Event, counter: list[int]) -> dict:
    drop_at = sorted(random.randrange(1, MESSAGES) for _ in range(DROPS_PER_CLIENT))
    last, epoch, in_order, reconnects, recovered = 0, None, True, 0, True
    announced = False
    while last < MESSAGES:
        async with websockets.connect(url, max_queue=None) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome"
            frame = {"op": "subscribe", "id": 1, "channels": [CHANNEL]}
            if epoch is not None:
                frame["recover"] = {CHANNEL: {"epoch": epoch, "offset": last}}
            await ws.send(json.dumps(frame))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == "ack" and msg.get("id") == 1:
                    result = msg["result"][CHANNEL]
                    if epoch is None:
                        epoch, last = result["epoch"], result["offset"]
                    else:
                        recovered &= result.get("recovered") is True
                    break
                if msg.get("type") == "ping":
                    await ws.send('{"op":"pong"}')
            if not announced:
                announced = True
                counter[0] += 1
                if counter[0] == PY_CLIENTS:
                    ready.set()
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "ping":
                    await ws.send('{"op":"pong"}')
                    continue
                if msg.get("type") != "msg":
                    continue
                in_order &= msg["offset"] == last + 1 and msg["data"] == msg["offset"]
                last = msg["offset"]
                if last >= MESSAGES:
                    break
                if drop_at and last >= drop_at[0]:
                    drop_at.pop(0)
                    reconnects += 1
                    break
    return {"received": last, "in_order": in_order, "reconnects": reconnects, "recovered": recovered}


async def test_reconnect_storm_loses_nothing(start_server):
    server = start_server(
        f"namespaces.storm.history_size={MESSAGES * 2}",
        f"namespaces.storm.max_replay={MESSAGES * 2}",
        "namespaces.storm.history_ttl_ms=0",
    )
    url = server.ws_url()
    rust = await asyncio.create_subprocess_exec(
        str(storm_bin()), url, CHANNEL, str(RUST_CLIENTS), str(MESSAGES), str(DROPS_PER_CLIENT),
        stdout=asyncio.subprocess.PIPE,
    )
    ready = asyncio.Event()
    counter = [0]
    python_clients = [asyncio.create_task(python_participant(url, ready, counter)) for _ in range(PY_CLIENTS)]
    assert (await asyncio.wait_for(rust.stdout.readline(), 30)).strip() == b"ready"
    await asyncio.wait_for(ready.wait(), 30)

    # Publish 10,000 messages whose data equals their offset, in batches, while clients drop.
    publisher = server.keepalive_publisher()
    try:
        for start in range(1, MESSAGES + 1, 100):
            batch = [(CHANNEL, n) for n in range(start, min(start + 100, MESSAGES + 1))]
            results = await asyncio.to_thread(publisher.publish_batch, batch)
            assert [r["offset"] for r in results] == [n for _, n in batch]
            await asyncio.sleep(0.01)
    finally:
        publisher.close()

    py_results = await asyncio.wait_for(asyncio.gather(*python_clients), 120)
    out, _ = await asyncio.wait_for(rust.communicate(), 120)
    rust_results = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert rust.returncode == 0, out.decode()[-2000:]
    assert len(rust_results) == RUST_CLIENTS

    for r in py_results + rust_results:
        assert r["received"] == MESSAGES, r
        assert r["in_order"] is True, r
        assert r["recovered"] is True, r
    total_reconnects = sum(r["reconnects"] for r in py_results + rust_results)
    assert total_reconnects >= (PY_CLIENTS + RUST_CLIENTS) * DROPS_PER_CLIENT // 2, total_reconnects
    assert await server.ametric("ferrocast_recoveries_total", outcome="recovered") >= total_reconnects
