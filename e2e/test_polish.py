"""Everyday polish end to end (issue 14, items 8-12): a configured feed turns the demo
simulator off by itself, `ferrocast --listen ...` serves without naming `serve`, logs carry
no colour codes off a terminal, `bench --json` stays machine-readable, and candle channels
start with a backfilled past."""

from __future__ import annotations

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


# --- item 10: no colour codes off a terminal ------------------------------------------------


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


# --- item 12: bench's live line only on a terminal -----------------------------------------


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
    import os
    import pty
    import subprocess

    server = start_server()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(ferrocast_bin()), "bench", "--url", server.ws_url(), *BENCH],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=clean_env(),
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0, seen
    assert b"\r\x1b[2K" in seen, seen
    assert b"measuring" in seen and b"conns 3" in seen and b"msgs " in seen, seen
    assert seen.endswith(b"\r\x1b[2K"), "the line is cleared at the end"
    assert stdout, "the report still goes to stdout"
