"""Configuration: validated before any port is bound; file < environment < flags."""

from __future__ import annotations

import socket

from ferrocast_e2e.procs import REPO_ROOT, free_port, port_is_free
from ferrocast_e2e.server import run_ferrocast

EXAMPLE = REPO_ROOT / "deploy" / "ferrocast.example.toml"

BAD_CONFIG = """
[server]
ping_interval_ms = 5
max_frame_bytes = 10
"""


def test_serve_with_invalid_file_exits_nonzero_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nping_interval_ms = 5\nmax_frame_bytes = 10\n")
    port = free_port()
    out = run_ferrocast(["serve", "--config", str(bad), "--listen", f"127.0.0.1:{port}"])
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "server.ping_interval_ms" in out.stderr, out.stderr
    assert "outside 100..=3600000" in out.stderr, out.stderr
    # Every problem is reported, not just the first.
    assert "server.max_frame_bytes" in out.stderr, out.stderr
    assert port_is_free(port)


def test_invalid_config_is_reported_before_binding(tmp_path):
    """With the port already taken, a server that bound before validating would fail with
    "cannot listen"; ferrocast must report the configuration problem instead."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[namespaces.ticks]\noverflow = "sometimes"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_ferrocast(["serve", "--config", str(bad), "--listen", f"127.0.0.1:{port}"])
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "namespaces.ticks.overflow" in out.stderr, out.stderr
    assert "cannot listen" not in out.stderr, out.stderr


def test_serve_reports_unknown_keys_and_bad_toml(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('[server]\nlistn = "127.0.0.1:1"\n')
    out = run_ferrocast(["serve", "--config", str(typo), "--listen", f"127.0.0.1:{free_port()}"])
    assert out.returncode == 2
    assert "server.listn" in out.stderr and "unknown field" in out.stderr, out.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    out = run_ferrocast(["serve", "--config", str(broken)])
    assert out.returncode == 2
    assert "not valid TOML" in out.stderr, out.stderr

    out = run_ferrocast(["serve", "--config", str(tmp_path / "missing.toml")])
    assert out.returncode == 2
    assert "missing.toml" in out.stderr, out.stderr


def test_bad_listen_address_and_port_in_use(tmp_path):
    out = run_ferrocast(["serve", "--listen", "nonsense"])
    assert out.returncode == 2
    assert "server.listen" in out.stderr, out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_ferrocast(["serve", "--no-simulator", "--listen", f"127.0.0.1:{port}"])
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "cannot listen" in out.stderr, out.stderr


def test_config_check_accepts_the_example():
    out = run_ferrocast(["config", "check", str(EXAMPLE)])
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_config_check_rejects_a_bad_file_with_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIG)
    out = run_ferrocast(["config", "check", str(bad)])
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    for key in ("server.ping_interval_ms", "server.max_frame_bytes"):
        assert key in out.stderr, out.stderr
    # A value of the wrong kind names its key too.
    bad.write_text('[namespaces.ticks]\noverflow = "sometimes"\n')
    out = run_ferrocast(["config", "check", str(bad)])
    assert out.returncode == 2
    assert "namespaces.ticks.overflow" in out.stderr, out.stderr
    assert "disconnect" in out.stderr, out.stderr  # says what is allowed
    # A --set override can fix what the file breaks... and break what it does not.
    out = run_ferrocast(["config", "check", str(EXAMPLE), "--set", "server.max_connections=0"])
    assert out.returncode == 2
    assert "server.max_connections" in out.stderr


def test_config_check_reports_bad_environment_values():
    out = run_ferrocast(
        ["config", "check", str(EXAMPLE)], env={"FERROCAST_SERVER_MAX_FRAME_BYTES": "10"}
    )
    assert out.returncode == 2
    assert "server.max_frame_bytes" in out.stderr, out.stderr


async def test_environment_override_reaches_the_welcome(start_server, ws):
    server = start_server(env={"FERROCAST_SERVER_PING_INTERVAL_MS": "1234"})
    c = await ws(server)
    assert c.welcome["ping_interval_ms"] == 1234


async def test_file_then_environment_then_flags(start_server, ws, tmp_path):
    cfg = tmp_path / "ferrocast.toml"
    cfg.write_text(
        "[server]\nping_interval_ms = 1500\nmax_channels_per_request = 2\n"
        "[namespaces.prices]\nclient_publish = true\n"
    )
    # The file alone.
    server = start_server(config=cfg)
    c = await ws(server)
    assert c.welcome["ping_interval_ms"] == 1500
    reply = await c.request({"op": "subscribe", "channels": ["a.1", "a.2", "a.3"]})
    assert reply["code"] == "too_many_channels", reply
    # A namespace defined only in the file allows client publishing.
    reply = await c.request({"op": "publish", "channel": "prices.x", "data": 1})
    assert reply["type"] == "ack", reply
    # The environment wins over the file; a flag wins over both.
    env = {"FERROCAST_SERVER_PING_INTERVAL_MS": "1234"}
    server2 = start_server(config=cfg, env=env)
    assert (await ws(server2)).welcome["ping_interval_ms"] == 1234
    server3 = start_server("server.ping_interval_ms=2345", config=cfg, env=env)
    assert (await ws(server3)).welcome["ping_interval_ms"] == 2345


def test_config_show_prints_the_effective_config():
    out = run_ferrocast(
        ["config", "show", "--set", "server.max_connections=7"],
        env={"FERROCAST_SERVER_PING_INTERVAL_MS": "999"},
    )
    assert out.returncode == 0, out.stderr
    import tomllib

    shown = tomllib.loads(out.stdout)
    assert shown["server"]["max_connections"] == 7
    assert shown["server"]["ping_interval_ms"] == 999


BAD_ROUTE_VALUES = [
    ("server.ws_paths", '["/ws/:id"]', "server.ws_paths[0]"),
    ("server.ws_paths", '["/ws/*rest"]', "server.ws_paths[0]"),
    ("server.ws_paths", '["/ws/{"]', "server.ws_paths[0]"),
    ("server.ws_paths", '["/ws", "/ws/{id}"]', "server.ws_paths[1]"),
    ("socketio.path", '"/sio/:ns"', "socketio.path"),
    ("socketio.path", '"/sio/{x}"', "socketio.path"),
]


def test_route_syntax_in_paths_is_refused_by_check_and_serve(tmp_path):
    """Route patterns used to pass `config check` and then panic `serve` after binding."""
    for key, value, named in BAD_ROUTE_VALUES:
        section, field = key.split(".")
        cfg = tmp_path / "routes.toml"
        cfg.write_text(f"[{section}]\n{field} = {value}\n")
        out = run_ferrocast(["config", "check", str(cfg)])
        assert out.returncode == 2, (value, out.stdout, out.stderr)
        assert named in out.stderr and "route patterns" in out.stderr, (value, out.stderr)
        # serve refuses it before binding: with the port taken, a bind first would say
        # "cannot listen"; a panic would exit 101.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            out = run_ferrocast(["serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"])
        assert out.returncode == 2, (value, out.returncode, out.stderr)
        assert named in out.stderr, (value, out.stderr)
        assert "cannot listen" not in out.stderr and "panicked" not in out.stderr, out.stderr


async def test_literal_alias_paths_serve(start_server, ws):
    server = start_server("server.ws_paths=/ws,/v1/stream.ws,/a-b_c~d")
    for path in ("/v1/stream.ws", "/a-b_c~d"):
        c = await ws(server, path=path)
        assert c.welcome["type"] == "welcome", c.welcome


def test_misspelled_environment_variable_is_refused_with_a_suggestion():
    out = run_ferrocast(
        ["config", "check", str(EXAMPLE)], env={"FERROCAST_SERVER_PING_INTERVAL": "1000"}
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "FERROCAST_SERVER_PING_INTERVAL:" in out.stderr, out.stderr
    assert "did you mean FERROCAST_SERVER_PING_INTERVAL_MS?" in out.stderr, out.stderr
    port = free_port()
    out = run_ferrocast(
        ["serve", "--listen", f"127.0.0.1:{port}"], env={"FERROCAST_SIMULATR_ENABLED": "false"}
    )
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "FERROCAST_SIMULATOR_ENABLED" in out.stderr, out.stderr
    assert port_is_free(port)


def test_documented_non_config_variables_are_allowed(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[api]\nkey_env = "FERROCAST_PUBLISH_KEY"\n')
    out = run_ferrocast(
        ["config", "check", str(cfg)],
        env={
            "FERROCAST_BIN": "/usr/bin/ferrocast",
            "FERROCAST_TEST_SKIP": "fmt",
            "FERROCAST_E2E_ARTIFACTS": str(tmp_path),
            "FERROCAST_PUBLISH_KEY": "secret",
            "FERROCAST_API_KEY": "k",
        },
    )
    assert out.returncode == 0, out.stderr


def test_invalid_log_filter_is_refused():
    for level in ("verbose", "info,foo=bar=baz"):
        out = run_ferrocast(["config", "check", str(EXAMPLE), "--set", f"log.level={level}"])
        assert out.returncode == 2, (level, out.stdout, out.stderr)
        assert "log.level" in out.stderr and "not a log filter" in out.stderr, out.stderr
        assert repr(level).strip("'") in out.stderr, out.stderr
        port = free_port()
        out = run_ferrocast(["serve", "--listen", f"127.0.0.1:{port}", "--log-level", level])
        assert out.returncode == 2, (level, out.returncode, out.stderr)
        assert "log.level" in out.stderr, out.stderr
        assert port_is_free(port)
    out = run_ferrocast(
        ["config", "check", str(EXAMPLE), "--set", "log.level=warn,ferrocast_server=debug"]
    )
    assert out.returncode == 0, out.stderr


def test_simulate_refuses_an_invalid_rust_log():
    out = run_ferrocast(
        ["simulate", "massive", "--listen", f"127.0.0.1:{free_port()}"],
        env={"RUST_LOG": "info,foo=bar=baz"},
        timeout=10,
    )
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "RUST_LOG" in out.stderr and "not a log filter" in out.stderr, out.stderr
