"""`ferrocast doctor` and `ferrocast gen nginx` against a real nginx.

Each test starts ferrocast and an nginx (from a generated site, in a temp dir, on a free
port, `nginx -p DIR -c nginx.conf -g 'daemon off;'`), then runs the doctor and independent
clients (Python's `websockets`, urllib) through the proxy:

- behind the generated site (plain and TLS), every doctor check passes and clients connect
  on every transport (native WebSocket, SSE, Socket.IO polling and WebSocket);
- without the Upgrade/Connection headers, the doctor fails the upgrade with that diagnosis;
- with `proxy_read_timeout 5s`, the idle probe reports a kill at about 5 s and names the
  heartbeat rule, and a server pinging every 2 s keeps its clients through the same proxy;
- with a buffering /sse location, the doctor reports the buffering.

nginx comes from apt (scripts/test installs it via e2e/system-packages.txt); these tests are
skipped only when no nginx binary exists.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ferrocast_e2e.certs import client_context, make_ca_and_certificate
from ferrocast_e2e.procs import REPO_ROOT, ManagedProcess, free_port, tcp_connectable
from ferrocast_e2e.server import FerrocastServer, http_request, run_ferrocast
from ferrocast_e2e.wsclient import CONNECT_DEFAULTS

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")

DEPLOY_NGINX = REPO_ROOT / "deploy" / "nginx" / "ferrocast.conf"


# --- nginx ---------------------------------------------------------------------------------


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """A minimal nginx.conf that keeps every path (pid, logs, temp files) inside `prefix`."""
    tmp = prefix / "tmp"
    return f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {site};
}}
"""


def start_nginx(artifacts: Path, track_process, site_text: str, port: int, name: str = "nginx") -> int:
    """Writes the site, checks it with `nginx -t`, starts nginx and waits for its port."""
    prefix = artifacts / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    # Workers may run as an unprivileged user; they must write temp files.
    (prefix / "tmp").chmod(0o777)
    site = prefix / "site.conf"
    site.write_text(site_text)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_conf(prefix, site))
    check = subprocess.run(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-t"], capture_output=True, text=True
    )
    assert check.returncode == 0, f"nginx -t refused the config:\n{check.stderr}\n{site_text}"
    proc = track_process(
        ManagedProcess(
            name, [NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"], prefix / "nginx.log"
        ).start()
    )
    proc.wait_until(lambda: tcp_connectable(port), 10, f"nginx listens on {port}")
    return port


def gen_nginx(server: FerrocastServer, port: int, *extra: str) -> str:
    """`ferrocast gen nginx` for this server's settings, listening on 127.0.0.1:port."""
    args = ["gen", "nginx", "--listen", f"127.0.0.1:{server.port}", "--bind", f"127.0.0.1:{port}"]
    for s in server.sets:
        args += ["--set", s]
    r = run_ferrocast([*args, *extra])
    assert r.returncode == 0, r.stderr
    return r.stdout


def proxied(artifacts, track_process, server: FerrocastServer, edit=None, name="nginx") -> int:
    """nginx in front of `server` with the generated site, optionally edited; its port."""
    port = free_port()
    site = gen_nginx(server, port)
    if edit is not None:
        site = edit(site)
    return start_nginx(artifacts, track_process, site, port, name)


# --- the doctor ----------------------------------------------------------------------------


def doctor(url: str, *args: str, timeout: float = 90) -> tuple[int, dict, dict]:
    """Runs `ferrocast doctor --json`; returns the exit code, the checks by id, the document."""
    r = run_ferrocast(["doctor", url, "--json", "--timeout", "5s", *args], timeout=timeout)
    assert r.stdout.strip(), f"doctor printed nothing (exit {r.returncode}): {r.stderr}"
    doc = json.loads(r.stdout)
    checks = {c["id"]: c for c in doc["checks"]}
    assert doc["exit_code"] == r.returncode, doc
    return r.returncode, checks, doc


def describe(checks: dict) -> str:
    return "\n".join(
        f"{c['id']}: {c['status']} {c['summary']} {c.get('cause', '')}" for c in checks.values()
    )


# --- independent clients through the proxy -------------------------------------------------


async def native_roundtrip(port: int) -> None:
    """Native WebSocket through the proxy: welcome, subscribe, publish, receive."""
    async with connect(f"ws://127.0.0.1:{port}/ws", **CONNECT_DEFAULTS) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["type"] == "welcome", welcome
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channels": ["chat.viaproxy"]}))
        await ws.send(
            json.dumps({"op": "publish", "id": 2, "channel": "chat.viaproxy", "data": {"n": 1}})
        )
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame.get("type") == "msg":
                assert frame["channel"] == "chat.viaproxy" and frame["data"] == {"n": 1}, frame
                return


def sse_receives(port: int, server: FerrocastServer) -> None:
    """SSE through the proxy: a message published on the server arrives on the stream."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/sse?channels=chat.ssecheck",
        headers={"Accept": "text/event-stream"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        resp.readline()  # the stream has started: the subscription is in place
        server.publish("chat.ssecheck", {"via": "nginx"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = resp.readline().decode()
            if line.startswith("data:") and '"via":"nginx"' in line.replace(" ", ""):
                return
    raise AssertionError("the published message did not arrive over SSE through nginx")


async def socketio_roundtrip(port: int) -> None:
    """Socket.IO through the proxy: the Engine.IO polling handshake, then the WebSocket
    transport opening a Socket.IO session (packets spoken by hand over `websockets`)."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling", timeout=5
    ) as resp:
        body = resp.read().decode()
    assert body.startswith("0{") and '"sid"' in body, body
    async with connect(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", **CONNECT_DEFAULTS
    ) as ws:
        open_packet = await asyncio.wait_for(ws.recv(), 5)
        assert open_packet.startswith("0{"), open_packet
        await ws.send("40")
        while True:
            packet = await asyncio.wait_for(ws.recv(), 5)
            if packet == "2":  # an Engine.IO ping: answer it
                await ws.send("3")
                continue
            assert packet.startswith("40"), packet  # the Socket.IO CONNECT answer
            return


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_generated_site_passes_every_check_and_carries_every_transport(
    start_server, artifacts, track_process
):
    server = start_server()
    port = proxied(artifacts, track_process, server)

    code, checks, doc = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/", "--idle", "3s")
    assert checks["tls"]["status"] == "skip", checks["tls"]  # plain http: no TLS hop
    for id_, check in checks.items():
        if id_ != "tls":
            assert check["status"] == "pass", describe(checks)
    assert code == 0, describe(checks)
    headers = checks["headers"]
    assert headers["data"]["via_proxy"] is True, headers
    assert "x-forwarded-for" in headers["summary"], headers
    assert checks["max_message"]["data"]["largest_passing_bytes"] == 65536, checks["max_message"]

    await native_roundtrip(port)
    await asyncio.to_thread(sse_receives, port, server)
    await socketio_roundtrip(port)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_deploy_example_with_tls_passes_every_check(start_server, artifacts, track_process):
    """deploy/nginx/ferrocast.conf itself (TLS), with ports and certificate paths swapped
    for test ones: every check passes, the certificate included."""
    server = start_server()
    ca, cert, key = make_ca_and_certificate(artifacts / "tls")
    tls_port, http_port = free_port(), free_port()
    site = DEPLOY_NGINX.read_text()
    site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{server.port};")
    site = site.replace("    listen [::]:443 ssl http2;\n", "").replace("    listen [::]:80;\n", "")
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    site = re.sub(r"/etc/letsencrypt/live/push\.example\.com/fullchain\.pem", str(cert), site)
    site = re.sub(r"/etc/letsencrypt/live/push\.example\.com/privkey\.pem", str(key), site)
    site = site.replace("server_name push.example.com;", "server_name 127.0.0.1 localhost;")
    start_nginx(artifacts, track_process, site, tls_port)

    code, checks, _ = await asyncio.to_thread(
        doctor, f"wss://127.0.0.1:{tls_port}/ws", "--ca-file", str(ca), "--idle", "3s"
    )
    assert all(c["status"] == "pass" for c in checks.values()), describe(checks)
    assert code == 0
    assert "valid until" in checks["tls"]["summary"], checks["tls"]
    # nginx offers browsers HTTP/2, but not WebSockets on its streams (RFC 8441).
    assert checks["tls"]["data"]["alpn"] == "h2", checks["tls"]
    assert checks["tls"]["data"]["websocket_over_http2"] is False, checks["tls"]
    assert checks["headers"]["data"]["via_proxy"] is True
    assert "x-forwarded-proto: https" in checks["headers"]["summary"], checks["headers"]

    # Without the CA the chain is untrusted: the doctor says so and stops there.
    code, checks, _ = await asyncio.to_thread(doctor, f"wss://127.0.0.1:{tls_port}/ws")
    assert code == 2
    assert checks["tls"]["status"] == "fail", checks["tls"]
    assert "trusted root" in checks["tls"]["summary"], checks["tls"]
    assert checks["upgrade"]["status"] == "skip"

    # The redirect server answers plain HTTP with a redirect, which WebSocket clients
    # do not follow: the doctor names it.
    code, checks, _ = await asyncio.to_thread(doctor, f"ws://127.0.0.1:{http_port}/ws")
    assert checks["upgrade"]["status"] == "fail", describe(checks)
    assert "redirect" in checks["upgrade"]["summary"], checks["upgrade"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_doctor_reports_tls_and_http2_of_ferrocast_serving_tls_itself(
    start_server, artifacts
):
    """ferrocast with [server.tls] and no proxy: the doctor passes every check and reports
    TLS 1.3, ALPN h2 and WebSockets over HTTP/2 (RFC 8441)."""
    ca, cert, key = make_ca_and_certificate(artifacts / "tls")
    server = start_server(
        f"server.tls.cert_file={cert}", f"server.tls.key_file={key}", tls=client_context(ca)
    )
    code, checks, _ = await asyncio.to_thread(
        doctor, f"wss://127.0.0.1:{server.port}/ws", "--ca-file", str(ca)
    )
    assert all(c["status"] in ("pass", "skip") for c in checks.values()), describe(checks)
    assert code == 0
    tls = checks["tls"]
    assert tls["summary"].startswith("TLSv1.3"), tls
    assert (tls["data"]["alpn"], tls["data"]["http2"]) == ("h2", True), tls
    assert tls["data"]["websocket_over_http2"] is True, tls
    assert any("RFC 8441): accepted" in d for d in tls["details"]), tls
    # The same for a Socket.IO endpoint: its WebSocket transport runs on an HTTP/2 stream.
    code, checks, _ = await asyncio.to_thread(
        doctor, f"https://127.0.0.1:{server.port}/socket.io/", "--ca-file", str(ca)
    )
    assert checks["tls"]["data"]["websocket_over_http2"] is True, checks["tls"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_generated_site_reencrypts_to_ferrocast_serving_tls(
    start_server, artifacts, track_process
):
    """`gen nginx` for a ferrocast with [server.tls], with nginx terminating TLS for clients
    and checking ferrocast's certificate (--upstream-ca): every check passes through it, and
    the hop to ferrocast is TLS (ferrocast counts the handshakes)."""
    ca, cert, key = make_ca_and_certificate(artifacts / "tls")
    server = start_server(
        f"server.tls.cert_file={cert}", f"server.tls.key_file={key}", tls=client_context(ca)
    )
    port = free_port()
    site = gen_nginx(
        server, port, "--server-name", "localhost",
        "--tls-cert", str(cert), "--tls-key", str(key), "--upstream-ca", str(ca),
    )
    assert "proxy_pass http://" not in site and "proxy_ssl_verify on;" in site, site
    start_nginx(artifacts, track_process, site, port)
    code, checks, _ = await asyncio.to_thread(
        doctor, f"wss://localhost:{port}/ws", "--ca-file", str(ca)
    )
    assert all(c["status"] in ("pass", "skip") for c in checks.values()), describe(checks)
    assert code == 0
    assert checks["headers"]["data"]["via_proxy"] is True
    assert (await server.ametric("ferrocast_tls_handshakes_total", result="ok") or 0) >= 1
    assert (await server.ametric("ferrocast_tls_handshakes_total", result="failed") or 0) == 0

    # Checking against another CA, nginx refuses ferrocast's certificate: 502, not a
    # silently unverified hop.
    other_ca, _, _ = make_ca_and_certificate(artifacts / "other")
    port = free_port()
    site = gen_nginx(
        server, port, "--server-name", "localhost",
        "--tls-cert", str(cert), "--tls-key", str(key), "--upstream-ca", str(other_ca),
    )
    start_nginx(artifacts, track_process, site, port, name="nginx-wrong-ca")
    r = await asyncio.to_thread(
        http_request, f"https://localhost:{port}/healthz", "GET", None, None, 10,
        client_context(ca),
    )
    assert r.status == 502, (r.status, r.text)


def strip_upgrade_headers(site: str) -> str:
    out = re.sub(r"\n\s*proxy_set_header (Upgrade|Connection) [^\n]*;", "", site)
    assert "proxy_set_header Upgrade" not in out and "proxy_set_header Connection" not in out
    return out


@pytest.mark.slow
async def test_without_upgrade_headers_the_upgrade_check_fails_with_the_cause(
    start_server, artifacts, track_process
):
    server = start_server()
    port = proxied(artifacts, track_process, server, edit=strip_upgrade_headers)

    code, checks, _ = await asyncio.to_thread(doctor, f"ws://127.0.0.1:{port}/ws")
    assert code == 2, describe(checks)
    upgrade = checks["upgrade"]
    assert upgrade["status"] == "fail", upgrade
    assert upgrade["data"]["status"] == 426, upgrade
    assert "received a plain request" in upgrade["summary"], upgrade
    assert "does not forward the Upgrade and Connection headers" in upgrade["cause"], upgrade
    snippets = "\n".join(f["snippet"] for f in upgrade["fixes"])
    assert "proxy_set_header Upgrade $http_upgrade;" in snippets, snippets
    assert any(f["target"] == "HAProxy" for f in upgrade["fixes"]), upgrade["fixes"]
    # What ferrocast actually received backs the diagnosis.
    assert any("Upgrade: (missing)" in d for d in upgrade["details"]), upgrade["details"]
    headers = checks["headers"]
    assert headers["status"] == "fail", headers
    assert "the Upgrade header was removed" in headers["summary"], headers
    # The path itself is right: this is no protocol mismatch.
    assert checks["protocol"]["status"] == "pass", checks["protocol"]

    # A client we did not write sees the same: no WebSocket through this proxy.
    with pytest.raises(Exception) as refused:
        await native_roundtrip(port)
    assert "426" in str(refused.value), refused.value


def short_read_timeout(site: str) -> str:
    out = re.sub(r"proxy_read_timeout \d+s;", "proxy_read_timeout 5s;", site)
    assert "proxy_read_timeout 5s;" in out
    return out


async def answering_client_survives(port: int, seconds: float) -> int:
    """A native client that answers every heartbeat; returns how many it answered, and
    fails if the connection ends before `seconds`."""
    answered = 0
    async with connect(f"ws://127.0.0.1:{port}/ws", **CONNECT_DEFAULTS) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["type"] == "welcome", welcome
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
            except TimeoutError:
                break
            except ConnectionClosed as e:
                raise AssertionError(f"cut after {seconds - remaining:.1f} s: {e!r}") from e
            if frame.get("type") == "ping":
                await ws.send(json.dumps({"op": "pong"}))
                answered += 1
        await ws.send(json.dumps({"op": "ping", "id": 99}))
        pong = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert pong == {"type": "pong", "id": 99} or pong.get("type") == "ping", pong
    return answered


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_idle_probe_finds_the_proxy_timeout_and_the_heartbeat_rule(
    start_server, artifacts, track_process
):
    # Default heartbeat (25 s) behind a 5 s proxy timeout: every client is cut at ~5 s.
    slow = start_server()
    port = proxied(artifacts, track_process, slow, edit=short_read_timeout, name="nginx-slow")
    code, checks, _ = await asyncio.to_thread(doctor, f"ws://127.0.0.1:{port}/ws", "--idle", "9s")
    idle = checks["idle"]
    assert idle["status"] == "fail", describe(checks)
    assert code == 2
    assert 4.0 <= idle["data"]["silent_ended_after_s"] <= 7.5, idle["data"]
    assert 4.0 <= idle["data"]["responsive_ended_after_s"] <= 7.5, idle["data"]
    assert "1006" in idle["data"]["silent_ended_how"], idle["data"]
    assert "heartbeat 25 s > proxy timeout ~5" in idle["cause"], idle["cause"]
    assert any(d.startswith("rule: the server heartbeat (server.ping_interval_ms)") for d in idle["details"])
    fixes = {f["target"]: f["snippet"] for f in idle["fixes"]}
    assert "server.ping_interval_ms=2500" in fixes["ferrocast"], fixes
    assert "proxy_read_timeout 75s;" in fixes["nginx"], fixes

    # A 2 s heartbeat through the same 5 s proxy: clients that answer pings stay up.
    fast = start_server("server.ping_interval_ms=2000")
    port = proxied(artifacts, track_process, fast, edit=short_read_timeout, name="nginx-fast")
    answered = await answering_client_survives(port, 8.5)
    assert answered >= 3, answered
    code, checks, _ = await asyncio.to_thread(doctor, f"ws://127.0.0.1:{port}/ws", "--idle", "9s")
    idle = checks["idle"]
    assert idle["status"] == "pass", describe(checks)
    assert "your proxy kills idle connections after ~5" in idle["summary"], idle["summary"]
    assert "ferrocast pings every 2.0 s, so clients that answer pings stay up" in idle["summary"]
    assert 4.0 <= idle["data"]["silent_ended_after_s"] <= 7.5, idle["data"]
    assert idle["data"]["responsive_ended_after_s"] is None, idle["data"]


def buffered_sse(site: str) -> str:
    """The /sse location as a naive config has it: buffered, HTTP/1.0 to the upstream (nginx's
    defaults), and ignoring the upstream's X-Accel-Buffering: no."""
    unbuffered = "        proxy_buffering off;\n        proxy_cache off;\n        gzip off;\n"
    assert unbuffered in site
    return site.replace(
        unbuffered,
        "        proxy_buffering on;\n        proxy_http_version 1.0;\n"
        '        proxy_set_header Connection "";\n        proxy_ignore_headers X-Accel-Buffering;\n',
        1,
    )


@pytest.mark.slow
async def test_buffering_proxy_is_detected_on_sse(start_server, artifacts, track_process):
    server = start_server()
    port = proxied(artifacts, track_process, server, edit=buffered_sse)
    code, checks, _ = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/")
    sse = checks["sse"]
    assert sse["status"] == "fail", describe(checks)
    assert code == 2
    assert "bursts" in sse["summary"] or "held back" in sse["summary"], sse
    assert "buffer" in sse["cause"], sse
    assert any("proxy_buffering off;" in f["snippet"] for f in sse["fixes"]), sse["fixes"]
    # Everything else through this proxy is fine.
    for id_ in ("upgrade", "headers", "protocol", "rtt", "max_message"):
        assert checks[id_]["status"] == "pass", describe(checks)


@pytest.mark.slow
async def test_socketio_client_against_native_only_server_is_a_protocol_mismatch(
    start_server, artifacts, track_process
):
    """The /socket.io/ 404 flood: a Socket.IO client against a server that only speaks
    native WebSocket (ferrocast with Socket.IO off), through the proxy."""
    from ferrocast_e2e.server import socketio_off_sets

    sets = socketio_off_sets()
    if not sets:
        pytest.skip("this build has no switch to turn Socket.IO off")
    server = start_server(*sets)
    port = proxied(artifacts, track_process, server)
    code, checks, _ = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/socket.io/")
    protocol = checks["protocol"]
    assert protocol["status"] == "fail", describe(checks)
    assert "Socket.IO turned off" in protocol["summary"], protocol
    assert any("new WebSocket(" in f["snippet"] for f in protocol["fixes"]), protocol["fixes"]
    assert code == 2
