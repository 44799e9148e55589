"""TLS served by ferrocast itself (`[server.tls]`), with Python clients we did not write.

Certificates come from a private CA made with openssl in the test's directory; the clients
trust that CA only (no verification is switched off):

- `websockets` over wss://, http.client over https:// (publish, SSE) and python-socketio
  (polling and websocket, through aiohttp) all work, and the handshakes are counted;
- a client speaking plain HTTP to the TLS port is refused by the handshake and counted;
- SIGHUP reloads both files: connections opened before keep working on the old
  certificate, new handshakes get the new one; a broken pair is refused, logged and counted,
  and the previous one stays;
- a missing file, a file that is not PEM, a key that does not match the certificate, or one
  file without the other stop `serve` (and `config check`) with exit 2, naming the key.

Node's clients, HTTP/2 and Chromium are in e2e/node/tls.test.mjs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
import socketio
from websockets.asyncio.client import connect

from ferrocast_e2e.certs import client_context, issue, make_ca
from ferrocast_e2e.procs import free_port
from ferrocast_e2e.server import run_ferrocast
from ferrocast_e2e.wsclient import CONNECT_DEFAULTS

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


class Pki:
    """A private CA, with server certificates issued on demand into one directory."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.ca = make_ca(dir)
        self.context = client_context(self.ca[0])

    def issue(self, stem: str) -> tuple[Path, Path]:
        return issue(self.dir, self.ca, stem, cn=f"ferrocast {stem}")


@pytest.fixture
def pki(artifacts) -> Pki:
    return Pki(artifacts / "pki")


def tls_sets(cert: Path, key: Path) -> tuple[str, str]:
    return (f"server.tls.cert_file={cert}", f"server.tls.key_file={key}")


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new handshake gets (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


async def recv_type(ws, type_: str) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame.get("type") == type_:
            return frame


class SseStream:
    """An SSE stream over https, read line by line in a thread (http.client)."""

    def __init__(self, server, channels: str) -> None:
        import http.client

        self.conn = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=5, context=server.tls
        )
        self.conn.request("GET", f"/sse?channels={channels}")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.status

    def next_frame(self) -> dict:
        while True:
            line = self.resp.fp.readline().decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                return json.loads(line[6:])

    def next_type(self, type_: str) -> dict:
        while True:
            frame = self.next_frame()
            if frame.get("type") == type_:
                return frame

    def close(self) -> None:
        self.conn.close()


async def test_python_clients_over_wss_and_https(start_server, pki):
    cert, key = pki.issue("server")
    server = start_server(*tls_sets(cert, key), tls=pki.context)
    assert "listening on https://" in server.log()

    # Native WebSocket: websockets with an SSL context that trusts only the private CA.
    async with connect(server.ws_url(), ssl=pki.context, **CONNECT_DEFAULTS) as ws:
        assert (await recv_type(ws, "welcome"))["version"] == 1
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channels": ["chat.tls"]}))
        await recv_type(ws, "ack")
        sse = await asyncio.to_thread(SseStream, server, "chat.tls")
        await asyncio.to_thread(sse.next_type, "ack")
        # Published over https; received over wss and over the SSE stream.
        published = await server.apublish("chat.tls", {"n": 1})
        msg = await recv_type(ws, "msg")
        assert (msg["offset"], msg["data"]) == (published["offset"], {"n": 1}), msg
        msg = await asyncio.to_thread(sse.next_type, "msg")
        assert msg["data"] == {"n": 1}, msg
        sse.close()

    # Socket.IO, polling then websocket, through aiohttp with the same context.
    for transports in (["polling"], ["websocket"]):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.context))
        sio = socketio.AsyncClient(reconnection=False, http_session=session)
        try:
            await sio.connect(server.base_url, transports=transports, wait_timeout=5)
            assert sio.transport() == transports[0]
            result = await sio.call("subscribe", "chat.tls", timeout=5)
            assert "chat.tls" in result and "epoch" in result["chat.tls"], result
        finally:
            await sio.disconnect()
            await session.close()

    # Plain HTTP to the TLS port: the handshake refuses it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/"), answer

    assert (await server.ametric("ferrocast_tls_handshakes_total", result="ok") or 0) >= 4
    assert (await server.ametric("ferrocast_tls_handshakes_total", result="failed") or 0) >= 1
    assert (await server.ametric("ferrocast_tls_websockets_total", http="1.1") or 0) >= 1
    expiry = await server.ametric("ferrocast_tls_certificate_expiry_timestamp_seconds")
    assert expiry is not None and expiry > 0, expiry


async def wait_metric(server, name: str, value: float, **labels) -> None:
    for _ in range(100):
        if await server.ametric(name, **labels) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {value}: {await server.ametric(name, **labels)}")


def replace(path: Path, text: str) -> None:
    """Replaces a file the way deployment tools do: write aside, then rename over it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_sighup_reloads_the_certificate_and_open_connections_stay(start_server, pki):
    old_cert, old_key = pki.issue("old")
    new_cert, new_key = pki.issue("new")
    live_cert, live_key = pki.dir / "live.pem", pki.dir / "live.key"
    shutil.copy(old_cert, live_cert)
    shutil.copy(old_key, live_key)
    server = start_server(*tls_sets(live_cert, live_key), tls=pki.context)
    assert served_certificate(server.port, pki.context) == der(old_cert)

    async with connect(server.ws_url(), ssl=pki.context, **CONNECT_DEFAULTS) as ws:
        await recv_type(ws, "welcome")
        peer = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert peer == der(old_cert)
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channels": ["chat.reload"]}))
        await recv_type(ws, "ack")
        sse = await asyncio.to_thread(SseStream, server, "chat.reload")
        await asyncio.to_thread(sse.next_type, "ack")

        replace(live_cert, new_cert.read_text())
        replace(live_key, new_key.read_text())
        server.process.signal(signal.SIGHUP)
        await wait_metric(server, "ferrocast_tls_reloads_total", 1, result="ok")
        assert served_certificate(server.port, pki.context) == der(new_cert)

        # The connections opened before keep working, on the old certificate.
        await server.apublish("chat.reload", {"after": "reload"})
        msg = await recv_type(ws, "msg")
        assert msg["data"] == {"after": "reload"}, msg
        assert (await asyncio.to_thread(sse.next_type, "msg"))["data"] == {"after": "reload"}
        await ws.send(json.dumps({"op": "ping", "id": 2}))
        assert (await recv_type(ws, "pong"))["id"] == 2

        # A broken pair is refused: the current one stays, the failure is logged and counted.
        replace(live_cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        server.process.signal(signal.SIGHUP)
        await wait_metric(server, "ferrocast_tls_reloads_total", 1, result="failed")
        assert served_certificate(server.port, pki.context) == der(new_cert)
        assert "TLS reload failed, still serving the previous certificate" in server.log()
        assert "server.tls.cert_file" in server.log()
        await server.apublish("chat.reload", {"after": "failed reload"})
        assert (await recv_type(ws, "msg"))["data"] == {"after": "failed reload"}
        sse.close()
    assert server.alive()


def serve_exit(*sets: str) -> tuple[int, str]:
    r = run_ferrocast(
        ["serve", "--listen", f"127.0.0.1:{free_port()}", "--no-simulator"]
        + [arg for s in sets for arg in ("--set", s)],
        timeout=30,
    )
    return r.returncode, r.stderr


def test_bad_tls_configuration_stops_serve_with_exit_2_naming_the_key(pki, artifacts):
    cert, key = pki.issue("good")
    _, other_key = pki.issue("other")
    garbage = artifacts / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    missing = artifacts / "missing.pem"
    cases = [
        (tls_sets(missing, key), "server.tls.cert_file", "cannot read"),
        (tls_sets(cert, missing), "server.tls.key_file", "cannot read"),
        (tls_sets(garbage, key), "server.tls.cert_file", "no PEM certificate"),
        (tls_sets(cert, garbage), "server.tls.key_file", "private key"),
        (tls_sets(cert, other_key), "server.tls.key_file", "does not match"),
        ((f"server.tls.cert_file={cert}",), "server.tls.key_file", "must be set"),
    ]
    for sets, key_name, reason in cases:
        code, stderr = serve_exit(*sets)
        assert code == 2, (sets, code, stderr)
        assert key_name in stderr and reason in stderr, (sets, stderr)
    # `config check` runs the same checks.
    config = artifacts / "ferrocast.toml"
    config.write_text(f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{other_key}"\n')
    r = run_ferrocast(["config", "check", str(config)])
    assert r.returncode == 2 and "does not match" in r.stderr, r.stderr
    config.write_text(f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    r = run_ferrocast(["config", "check", str(config)])
    assert r.returncode == 0, r.stderr
