"""Graceful shutdown on SIGTERM: 1001 with a jittered reconnect hint, readiness 503, exit 0."""

from __future__ import annotations

import asyncio
import collections
import signal
import time

from ferrocast_e2e.server import http_request
from ferrocast_e2e.wsclient import raw_ws_handshake


async def test_sigterm_closes_every_client_with_1001_and_jittered_hint(start_server, ws):
    server = start_server("server.shutdown_grace_ms=8000", "server.reconnect_after_ms=1000")
    clients = [await ws(server) for _ in range(20)]
    for c in clients:
        await c.subscribe_ok("chat.drain")
    assert server.metric("ferrocast_connections", transport="ws") == 20
    started = time.monotonic()
    server.process.signal(signal.SIGTERM)
    closed = await asyncio.gather(*(c.wait_closed(timeout=10) for c in clients))
    codes = collections.Counter(c.code for c in closed)
    assert codes == {1001: 20}, codes  # in particular, no 1006
    delays = []
    for c in closed:
        hint = c.reason_json()
        assert hint["reconnect"] is True, hint
        assert isinstance(hint["after_ms"], int), hint
        assert 1000 <= hint["after_ms"] <= 2000, hint
        delays.append(hint["after_ms"])
    assert len(set(delays)) > 1, f"reconnect hints are not jittered: {delays}"
    rc = await asyncio.to_thread(server.process.wait, 8)
    elapsed = time.monotonic() - started
    assert rc == 0, f"exit code {rc}"
    assert elapsed < 8, elapsed
    log = server.log()
    assert "SIGTERM received" in log
    assert "drained; exiting" in log


async def test_reconnect_hint_follows_config(start_server, ws):
    server = start_server("server.reconnect_after_ms=50")
    clients = [await ws(server) for _ in range(10)]
    server.process.signal(signal.SIGTERM)
    closed = await asyncio.gather(*(c.wait_closed(timeout=10) for c in clients))
    for c in closed:
        assert c.code == 1001
        assert 50 <= c.reason_json()["after_ms"] <= 100, c.reason
    assert await asyncio.to_thread(server.process.wait, 8) == 0


async def test_drain_waits_for_a_client_that_ignores_the_close(start_server, ws):
    server = start_server("server.shutdown_grace_ms=8000")
    stuck = raw_ws_handshake(server.port)
    try:
        polite = await ws(server)
        started = time.monotonic()
        server.process.signal(signal.SIGTERM)
        assert (await polite.wait_closed(timeout=5)).code == 1001
        rc = await asyncio.to_thread(server.process.wait, 9)
        elapsed = time.monotonic() - started
        assert rc == 0
        # The stuck client kept the drain going for a moment, but not past the grace.
        assert 0.5 < elapsed < 8, elapsed
    finally:
        stuck.close()


async def test_grace_period_bounds_the_drain(start_server):
    server = start_server("server.shutdown_grace_ms=300")
    stuck = [raw_ws_handshake(server.port) for _ in range(3)]
    try:
        started = time.monotonic()
        server.process.signal(signal.SIGTERM)
        rc = await asyncio.to_thread(server.process.wait, 8)
        elapsed = time.monotonic() - started
        assert rc == 0
        assert elapsed < 1.5, elapsed
    finally:
        for s in stuck:
            s.close()


async def test_readyz_is_503_while_draining(start_server, ws):
    server = start_server("server.shutdown_grace_ms=8000")
    # A client that never answers the close frame holds the drain open for a while.
    stuck = raw_ws_handshake(server.port)
    try:
        clients = [await ws(server) for _ in range(3)]
        assert server.get("/readyz").status == 200

        def poll_readyz() -> list:
            seen = []
            deadline = time.monotonic() + 10
            while server.process.poll() is None and time.monotonic() < deadline:
                try:
                    r = http_request(server.base_url + "/readyz", timeout=1)
                    seen.append((r.status, r.text))
                except OSError as e:
                    seen.append((None, type(e).__name__))
                time.sleep(0.01)
            return seen

        server.process.signal(signal.SIGTERM)
        seen = await asyncio.to_thread(poll_readyz)
        for c in clients:
            assert (await c.wait_closed(timeout=5)).code == 1001
        assert server.process.wait(5) == 0
        summary = collections.Counter(status for status, _ in seen)
        drained = [text for status, text in seen if status == 503]
        assert drained, (
            "GET /readyz never answered 503 while the server drained; answers seen after "
            f"SIGTERM: {dict(summary)} (None = connection refused/reset)"
        )
        assert "draining" in drained[0], drained[0]
        # The signal takes a moment to arrive: a 200 may precede the first 503, never follow it.
        statuses = [status for status, _ in seen]
        first_503 = statuses.index(503)
        assert 200 not in statuses[first_503:], summary
    finally:
        stuck.close()
