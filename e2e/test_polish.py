"""Everyday polish end to end (issue 14, items 8-12): a configured feed turns the demo
simulator off by itself, `ferrocast --listen ...` serves without naming `serve`, logs carry
no colour codes off a terminal, `bench` and `sub` draw a live status line on a terminal and
nothing on a pipe or with `--json`, and candle channels start with a backfilled past (the
demo simulator's made-up one, the Massive REST aggregates of the Massive simulator)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

from ferrocast_e2e.procs import ManagedProcess, free_port, http_status
from ferrocast_e2e.server import clean_env, ferrocast_bin, run_ferrocast

KEY = "e2e-key"


def wait_http(proc: ManagedProcess, url: str, what: str, timeout: float = 20.0) -> None:
    proc.wait_until(lambda: http_status(url, timeout=0.5) == 200, timeout, what)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def run_with_terminal_stderr(argv: list[str], while_running=None, env=None) -> tuple[int, bytes, bytes]:
    """Runs `argv` with stderr on a pseudo-terminal and stdout on a pipe; `while_running(proc,
    shown)` is called once it started, with what the terminal showed so far. Returns (exit
    code, what the terminal showed, stdout)."""
    import os
    import pty
    import subprocess
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env or clean_env()
    )
    os.close(slave)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        if while_running is not None:
            while_running(proc, shown)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(5)
        os.close(master)
    return proc.returncode, bytes(shown), stdout


def until(what: str, cond, timeout: float = 10.0):
    """Polls `cond` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def massive_upstream(artifacts, track_process):
    """Starts `ferrocast simulate massive` on a free port; returns its port."""

    def start(*args: str) -> int:
        port = free_port()
        argv = [
            str(ferrocast_bin()), "simulate", "massive",
            "--listen", f"127.0.0.1:{port}", "--api-key", KEY, *args,
        ]
        proc = track_process(
            ManagedProcess("simulate-massive", argv, artifacts / "simulate.log", clean_env())
        ).start()
        wait_http(proc, f"http://127.0.0.1:{port}/debug/subscriptions", "the simulator answered")
        return port

    return start


def feed_config(path: Path, upstream_port: int, extra: str = "") -> Path:
    """A config with one Massive feed and no [simulator] table at all."""
    path.write_text(
        f"""[[feeds]]
name = "stocks"
kind = "massive"
url = "ws://127.0.0.1:{upstream_port}/stocks"
api_key_env = "MASSIVE_API_KEY"
events = ["T", "Q", "AM"]
backoff_initial_ms = 100
backoff_max_ms = 500
{extra}
"""
    )
    return path


# --- item 8: a configured feed turns the default simulator off -----------------------------


def test_a_feed_turns_the_default_simulator_off(massive_upstream, start_server, artifacts):
    up = massive_upstream()
    # simulator=True: no --no-simulator flag, so the simulator is on only by default.
    server = start_server(
        simulator=True,
        config=feed_config(artifacts / "ferrocast.toml", up),
        env={"MASSIVE_API_KEY": KEY},
    )
    until("the note in the log", lambda: "demo simulator turned off" in server.log())
    assert server.log().count("demo simulator turned off") == 1, server.log()
    time.sleep(1.0)
    feeds = {f["name"] for f in server.get("/api/feeds").json()["feeds"]}
    assert feeds == {"stocks"}, feeds
    # The demo simulator would have filled ticks.* and quotes.* by now; the Massive feed is
    # demand-driven and nobody subscribed.
    channels = server.get("/api/channels").json()["channels"]
    names = [c["channel"] if isinstance(c, dict) else c for c in channels]
    assert not [n for n in names if n.startswith(("ticks.", "quotes."))], names
    assert "demo market simulator publishing" not in server.log()


@pytest.mark.parametrize(
    "how",
    ["file", "env", "set"],
)
def test_an_explicit_simulator_with_feeds_still_fails(how, artifacts):
    extra, env, args = "", {}, []
    if how == "file":
        extra = "[simulator]\nenabled = true\n"
    elif how == "env":
        env = {"FERROCAST_SIMULATOR_ENABLED": "true"}
    else:
        args = ["--set", "simulator.enabled=true"]
    config = artifacts / "ferrocast.toml"
    config.write_text(
        extra
        + '[[feeds]]\nname = "stocks"\nkind = "massive"\n'
        + 'url = "ws://127.0.0.1:9/stocks"\nevents = ["T"]\n'
    )
    out = run_ferrocast(["config", "check", str(config), *args], env=env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "simulator.enabled: must be false when [[feeds]] are configured" in out.stderr


# --- item 9: serve flags without the subcommand --------------------------------------------


def test_top_level_serve_flags(artifacts, track_process):
    port = free_port()
    argv = [str(ferrocast_bin()), "--listen", f"127.0.0.1:{port}", "--no-simulator"]
    proc = track_process(ManagedProcess("ferrocast", argv, artifacts / "top.log", clean_env()))
    proc.start()
    wait_http(proc, f"http://127.0.0.1:{port}/healthz", "/healthz answered on the given port")
    assert get_json(f"http://127.0.0.1:{port}/api/feeds")["feeds"] == [], "--no-simulator applied"

    help_text = run_ferrocast(["--help"]).stdout
    for flag in ("--listen", "--config", "--set", "--no-simulator"):
        assert flag in help_text, help_text
    bad = run_ferrocast(["--listen", "127.0.0.1:1", "pub", "x", "{}"])
    assert bad.returncode == 2 and "cannot be used with" in bad.stderr, bad.stderr


# --- item 10: no colour codes off a terminal or with NO_COLOR ------------------------------


def test_logs_have_no_colour_codes_off_a_terminal(artifacts, track_process):
    port = free_port()
    env = clean_env()
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    argv = [str(ferrocast_bin()), "serve", "--listen", f"127.0.0.1:{port}", "--no-simulator"]
    log = artifacts / "plain.log"
    proc = track_process(ManagedProcess("ferrocast", argv, log, env)).start()
    wait_http(proc, f"http://127.0.0.1:{port}/healthz", "/healthz answered")
    until("the listening line", lambda: "listening on" in log.read_text())
    proc.stop(10)
    text = log.read_bytes()
    assert b" INFO " in text or b"INFO" in text, text[:500]
    assert b"\x1b[" not in text, text[:500]

    # On a terminal: colour, unless NO_COLOR says otherwise.
    for no_color, coloured in ((None, True), ("1", False)):
        term_env = {**env, **({"NO_COLOR": no_color} if no_color else {})}

        def stop_once_listening(proc, shown) -> None:
            until("the listening line", lambda: b"listening on" in shown)
            proc.terminate()

        argv = [str(ferrocast_bin()), "serve", "--listen", f"127.0.0.1:{free_port()}", "--no-simulator"]
        code, shown, _ = run_with_terminal_stderr(argv, stop_once_listening, env=term_env)
        assert code == 0, shown
        assert (b"\x1b[" in shown) is coloured, (no_color, shown[:300])

    # FORCE_COLOR asks for colour even into a file, so the check above can fail.
    port = free_port()
    forced = artifacts / "forced.log"
    argv = [str(ferrocast_bin()), "serve", "--listen", f"127.0.0.1:{port}", "--no-simulator"]
    proc = track_process(ManagedProcess("ferrocast", argv, forced, {**env, "FORCE_COLOR": "1"}))
    proc.start()
    wait_http(proc, f"http://127.0.0.1:{port}/healthz", "/healthz answered")
    until("the listening line", lambda: "listening on" in forced.read_text())
    proc.stop(10)
    assert b"\x1b[" in forced.read_bytes()


# --- item 12: the live status line of bench and sub only on a terminal ---------------------


BENCH = ["--subscribers", "3", "--channels", "1", "--rate", "200", "--duration", "1",
         "--warmup", "0.5", "--drain", "1", "--processes", "1"]


def test_bench_json_and_piped_stderr_stay_clean(start_server):
    server = start_server()
    url = server.ws_url()
    out = run_ferrocast(["bench", "--url", url, *BENCH, "--json"], timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["setup"]["connected"] == 3, report
    assert out.stderr == "", repr(out.stderr)

    # Human report, stderr still a pipe: no status line either.
    out = run_ferrocast(["bench", "--url", url, *BENCH], timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b[" not in out.stderr, repr(out.stderr)
    assert out.stderr == "", repr(out.stderr)


def test_bench_draws_a_live_line_on_a_terminal(start_server):
    server = start_server()
    code, seen, stdout = run_with_terminal_stderr([str(ferrocast_bin()), "bench", "--url", server.ws_url(), *BENCH])
    assert code == 0, seen
    assert b"\r\x1b[2K" in seen, seen
    assert b"measuring" in seen and b"conns 3" in seen and b"msgs " in seen, seen
    assert seen.endswith(b"\r\x1b[2K"), "the line is cleared at the end"
    assert stdout, "the report still goes to stdout"


def test_sub_counts_on_a_terminal_while_its_messages_go_to_a_pipe(start_server):
    server = start_server()
    channel = "chat.progress"

    def publish_slowly(*_) -> None:
        until(
            "the subscription",
            lambda: any(c["channel"] == channel and c["subscribers"] == 1
                        for c in server.get("/api/channels").json()["channels"]),
        )
        for n in range(1, 6):
            server.publish(channel, {"n": n})
            time.sleep(0.4)  # the line is redrawn every 0.5 s

    code, shown, stdout = run_with_terminal_stderr(
        [str(ferrocast_bin()), "sub", server.ws_url(), channel, "--count", "5"], publish_slowly
    )
    assert code == 0, shown
    lines = stdout.decode().splitlines()
    assert [json.loads(line)["data"]["n"] for line in lines] == [1, 2, 3, 4, 5], stdout
    assert b"\r" not in stdout and b"\x1b[" not in stdout, "the messages stay machine-readable"
    assert b"\r\x1b[2K" in shown and b"receiving" in shown and b" received" in shown, shown

    # stderr not a terminal: not a byte of status.
    import subprocess

    proc = subprocess.Popen(
        [str(ferrocast_bin()), "sub", server.ws_url(), channel, "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )
    publish_slowly()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and stderr == b"", stderr
    assert len(stdout.splitlines()) == 2


# --- item 11: candle backfill -----------------------------------------------------------------


def history(server, channel: str) -> list[dict]:
    r = server.get(f"/api/channels/{channel}/history?limit=1000")
    assert r.status == 200, (r.status, r.text)
    return [m["data"] for m in r.json()["messages"]]


def assert_aligned_past(bars: list[dict], interval_ms: int, src: str, at_least: int) -> None:
    past = [b for b in bars if b["src"] == src]
    assert len(past) >= at_least, (len(past), bars[:3])
    # The backfill comes first, then live bars: one time-ordered series.
    assert bars[: len(past)] == past, "backfilled bars precede live ones"
    starts = [b["start"] for b in bars]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), starts[:10]
    for b in past:
        assert b["start"] % interval_ms == 0 and b["end"] - b["start"] == interval_ms, b
        assert b["forming"] is False, b
        assert b["low"] <= min(b["open"], b["close"]) <= max(b["open"], b["close"]) <= b["high"], b
    assert past[-1]["end"] <= time.time() * 1000 + 1, "only closed windows"


async def test_demo_candles_start_with_a_past(start_server, ws):
    server = start_server(simulator=True)
    # Right after start: the history endpoint and a subscribe's snapshot both have a past.
    for channel, step in (("candles.AAPL.1m", 60_000), ("candles.AAPL.1s", 1_000)):
        bars = history(server, channel)
        assert_aligned_past(bars, step, "sim", at_least=300)
        # The past joins the live walk: the newest backfilled close is the starting price.
        assert [b for b in bars if b["src"] == "sim"][-1]["close"] == 230.0

    client = await ws(server)
    await client.send({"op": "subscribe", "id": 1, "channels": ["candles.MSFT.1m"]})
    snapshot = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(snapshot) < 300:
        frame = await client.recv(timeout=5)
        frames = frame if isinstance(frame, list) else [frame]
        # Closed bars only: a forming bar of the live minute may arrive meanwhile.
        snapshot += [
            f["data"] for f in frames if f.get("type") == "msg" and not f["data"]["forming"]
        ]
    assert len(snapshot) >= 300, len(snapshot)
    assert_aligned_past(snapshot, 60_000, "sim", at_least=300)
    assert server.metric("ferrocast_candle_backfill_bars_total") == 20 * 2 * 300


def test_no_demo_backfill_when_turned_off(start_server):
    server = start_server("simulator.backfill_bars=0", simulator=True)
    r = server.get("/api/channels/candles.AAPL.1m/history?limit=1000")
    bars = r.json()["messages"] if r.status == 200 else []
    assert not [m for m in bars if m["data"]["src"] == "sim"], bars[:3]
    assert server.metric("ferrocast_candle_backfill_bars_total") == 0


async def test_massive_feed_backfills_from_rest(massive_upstream, start_server, ws, artifacts):
    up = massive_upstream()
    server = start_server(
        config=feed_config(
            # REST is found at the WebSocket's host; SPY is always subscribed upstream.
            artifacts / "ferrocast.toml", up, 'backfill_bars = 120\nalways = ["SPY"]'

        ),
        env={"MASSIVE_API_KEY": KEY},
    )
    client = await ws(server)
    await client.subscribe_ok("candles.AAPL.1m")
    until("the backfill", lambda: len(history(server, "candles.AAPL.1m")) >= 120, timeout=10)
    bars = history(server, "candles.AAPL.1m")
    assert_aligned_past(bars, 60_000, "massive", at_least=120)
    assert len([b for b in bars if b["src"] == "massive"]) == 120
    assert server.metric("ferrocast_candle_backfill_bars_total") >= 120
    # `always` symbols are backfilled at startup, with no subscriber.
    until("SPY's backfill", lambda: len(history(server, "candles.SPY.1s")) >= 120, timeout=10)
    for channel, step in (("candles.SPY.1m", 60_000), ("candles.SPY.1s", 1_000)):
        assert_aligned_past(history(server, channel), step, "massive", at_least=120)
    aggs = get_json(f"http://127.0.0.1:{up}/debug/subscriptions")["counters"]["rest_aggs"]
    assert aggs == 3, aggs
    # Once per channel: a second subscriber does not fetch again.
    other = await ws(server)
    await other.subscribe_ok("candles.AAPL.1m")
    await asyncio.sleep(0.3)
    assert get_json(f"http://127.0.0.1:{up}/debug/subscriptions")["counters"]["rest_aggs"] == 3
    assert server.metric("ferrocast_candle_backfill_bars_total") == 3 * 120


async def test_massive_backfill_errors_are_logged_and_counted(
    massive_upstream, start_server, ws, artifacts
):
    up = massive_upstream()
    # REST unreachable (nothing listens there); the WebSocket still goes live.
    rest_port = free_port()  # nothing listens there
    server = start_server(
        config=feed_config(artifacts / "ferrocast.toml", up, f'rest_url = "http://127.0.0.1:{rest_port}"'),
        env={"MASSIVE_API_KEY": KEY},
    )
    client = await ws(server)
    await client.subscribe_ok("candles.AAPL.1m", "ticks.AAPL")
    until("the error counted", lambda: server.metric("ferrocast_candle_backfill_errors_total") == 1)
    assert "candle backfill failed" in server.log()
    # Live data flows regardless.
    frame = await client.recv(timeout=10)
    frames = frame if isinstance(frame, list) else [frame]
    assert any(f.get("type") == "msg" for f in frames), frames
