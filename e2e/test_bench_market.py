"""`ferrocast bench --market` at a small scale: the real `ferrocast simulate massive` as the
upstream, a real server running the shipped `deploy/examples/bench-market.toml`, and the
bench's subscribers watching trades and 1-second candles. Checks the report, not speed."""

from __future__ import annotations

import json

from ferrocast_e2e.procs import REPO_ROOT
from ferrocast_e2e.server import run_ferrocast

from test_feeds import upstream  # noqa: F401  (the simulator fixture)

KEY = "bench"


def test_market_shape_is_delivered_without_loss(upstream, start_server, artifacts):  # noqa: F811
    up = upstream("massive", "--api-key", KEY, "--rate", "2000")
    text = (REPO_ROOT / "deploy/examples/bench-market.toml").read_text()
    text = text.replace('url = "ws://127.0.0.1:9100/stocks"', f'url = "ws://127.0.0.1:{up.port}/stocks"')
    assert f"127.0.0.1:{up.port}" in text
    config = artifacts / "bench-market.toml"
    config.write_text(text)
    server = start_server(config=config, env={"MASSIVE_API_KEY": KEY})

    # Subscribers arrive while the feed is still connecting: brand-new channels whose first
    # messages race the subscribe acks.
    out = run_ferrocast(
        ["bench", "--market", "--url", server.ws_url(), "--subscribers", "50",
         "--symbols", "50", "--symbols-per-subscriber", "10", "--duration", "3",
         "--warmup", "1.5", "--drain", "5", "--server-pid", str(server.process.pid), "--json"],
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["setup"]["connected"] == 50, report["setup"]
    assert report["feed"]["trades"] > 0, report["feed"]
    delivery = report["delivery"]
    kinds = delivery["by_kind"]
    assert delivery["delivered"] > 0, delivery
    assert kinds["trades"] > 0 and kinds["closed_candles"] > 0 and kinds["forming_candles"] > 0, kinds
    assert delivery["lost"] == 0, delivery
    assert delivery["duplicates"] == 0, delivery
    assert kinds["before_ack"] == 0 and kinds["unexpected"] == 0, kinds
    assert delivery["disconnects"] == {} and delivery["server_errors"] == 0, delivery
    # Every subscriber reached the offsets its channels had when the window closed.
    assert delivery["expected"] > 0
    assert report["latency_ms"]["samples"] > 0, report["latency_ms"]
    assert report["server"]["cpu_secs_per_million_deliveries"] > 0, report["server"]
