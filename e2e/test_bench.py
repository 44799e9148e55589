"""`ferrocast bench` publishing as applications do: one message per request, several
concurrent publishers (issue 13). Short real runs that check the report, not speed."""

from __future__ import annotations

import json

from ferrocast_e2e.server import run_ferrocast


def test_single_message_requests_from_concurrent_publishers(start_server):
    server = start_server()
    out = run_ferrocast(
        ["bench", "--url", server.ws_url(), "--subscribers", "20", "--channels", "2",
         "--rate", "max", "--publish-batch", "1", "--publishers", "3", "--duration", "1",
         "--warmup", "0.5", "--drain", "3", "--processes", "1", "--json"],
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["config"]["publishers"] == 3, report["config"]
    publish = report["publish"]
    assert publish["batch"] == 1, publish
    assert publish["errors"] == 0, publish
    # One message per request.
    assert publish["published"] > 0
    assert publish["requests"] == publish["published"], publish
    rt = publish["round_trip_ms"]
    assert 0 < rt["p50"] <= rt["p99"] <= rt["max"], rt
    delivery = report["delivery"]
    assert delivery["lost"] == 0 and delivery["duplicates"] == 0, delivery
    # Every subscriber of a channel got every message of it: 10 per channel.
    assert delivery["delivered"] == delivery["expected"] == 10 * publish["published"], delivery
    # The server timed the answer to every one of those requests.
    assert server.metric("ferrocast_publish_ack_seconds_count", source="http") == publish["requests"]


def test_batch_is_still_accepted_as_the_old_name(start_server):
    server = start_server()
    out = run_ferrocast(
        ["bench", "--url", server.ws_url(), "--subscribers", "2", "--channels", "1",
         "--rate", "100", "--batch", "4", "--duration", "0.5", "--warmup", "0.2",
         "--drain", "2", "--processes", "1", "--json"],
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["publish"]["batch"] == 4, report["publish"]
    assert report["delivery"]["lost"] == 0, report["delivery"]
