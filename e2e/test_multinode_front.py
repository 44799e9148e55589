"""A real nginx in front of several real `ferrocast serve` nodes.

Three nodes run with the memory broker, so each is independent: a session opened on one node
is unknown to the others, exactly what a load balancer in front of a cluster must handle.
nginx runs the site `ferrocast gen nginx --upstream A --upstream B --upstream C` writes
(checked with `nginx -t` first):

- python-socketio clients restricted to long-polling, from several client addresses
  (127.0.0.x), keep their session over many polls and exchange every message, and land on
  more than one node; an SSE stream changes its subscriptions through `/sse/control` and
  receives what it publishes; native WebSocket clients are spread evenly over the nodes
  (each node's /api/stats); `ferrocast doctor` passes its sticky-session check;
- the same site with the Socket.IO/SSE upstream turned into round robin breaks a real
  polling client, and the doctor fails with the "Session ID unknown" diagnosis and the
  fixes for nginx, HAProxy and AWS;
- a front that is sticky by a cookie it sets (as HAProxy `cookie … insert` or an AWS ALB
  is; here nginx names the node in a cookie and routes by it) passes the doctor's check,
  which sends cookies back like a browser and says that clients must keep them;
- deploy/nginx/ferrocast-nodes.conf itself, with TLS from a private CA and the example
  nodes swapped for the real ones, keeps polling sessions over HTTPS, and the doctor's
  sticky-session check passes through it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import urllib.error
import urllib.request

import aiohttp
import pytest
import socketio
from websockets.asyncio.client import connect

from ferrocast_e2e.procs import REPO_ROOT, free_port
from ferrocast_e2e.server import FerrocastServer, run_ferrocast
from ferrocast_e2e.wsclient import CONNECT_DEFAULTS
from test_doctor_nginx import NGINX, describe, doctor, make_ca_and_certificate, start_nginx

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
    pytest.mark.slow,
]

NODES = 3
DEPLOY_NODES = REPO_ROOT / "deploy" / "nginx" / "ferrocast-nodes.conf"


def start_nodes(start_server) -> list[FerrocastServer]:
    return [start_server() for _ in range(NODES)]


def gen_front(nodes: list[FerrocastServer], port: int) -> str:
    """`ferrocast gen nginx` for these nodes, listening on 127.0.0.1:port."""
    args = ["gen", "nginx", "--bind", f"127.0.0.1:{port}"]
    for n in nodes:
        args += ["--upstream", f"127.0.0.1:{n.port}"]
    r = run_ferrocast(args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def front(artifacts, track_process, nodes, edit=None, name="nginx") -> int:
    port = free_port()
    site = gen_front(nodes, port)
    if edit is not None:
        site = edit(site)
    return start_nginx(artifacts, track_process, site, port, name)


def connections(node: FerrocastServer, transport: str) -> int:
    return node.get("/api/stats").json()["connections"][transport]


def polling_client(
    source: str, ca: ssl.SSLContext | None = None
) -> tuple[socketio.AsyncClient, aiohttp.ClientSession]:
    """A python-socketio client whose requests come from the address `source`."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=ca if ca is not None else True)
    session = aiohttp.ClientSession(connector=connector)
    return socketio.AsyncClient(reconnection=False, http_session=session), session


async def polling_exchange(
    port: int, source: str, rounds: int, scheme: str = "http", ca: ssl.SSLContext | None = None
) -> None:
    """A polling-only Socket.IO client from `source`: subscribes, then publishes `rounds`
    messages one after another and receives each (every publish is a POST, every ack and
    message a long-poll GET answered by the node that holds the session)."""
    sio, session = polling_client(source, ca)
    got: asyncio.Queue = asyncio.Queue()
    sio.on("message", got.put_nowait)
    channel = f"chat.poll-{source.replace('.', '-')}"
    try:
        await sio.connect(f"{scheme}://127.0.0.1:{port}", transports=["polling"], wait_timeout=5)
        assert sio.transport() == "polling"
        ack = await sio.call("subscribe", [channel], timeout=5)
        assert channel in ack, ack
        for n in range(1, rounds + 1):
            reply = await sio.call("publish", {"channel": channel, "data": {"n": n}}, timeout=5)
            assert reply.get("offset") == n, reply
            message = await asyncio.wait_for(got.get(), 5)
            assert (message["channel"], message["data"], message["offset"]) == (channel, {"n": n}, n)
        assert sio.connected and sio.transport() == "polling"
    finally:
        await sio.disconnect()
        await session.close()


def sse_control_exchange(port: int, rounds: int) -> None:
    """An SSE stream through the front: subscribes through /sse/control (each request a new
    connection) and publishes through it; every message arrives on the stream."""
    base = f"http://127.0.0.1:{port}"
    req = urllib.request.Request(f"{base}/sse", headers={"Accept": "text/event-stream"})
    with urllib.request.urlopen(req, timeout=10) as stream:

        def next_event() -> dict:
            while True:
                line = stream.readline().decode()
                assert line, "the stream ended"
                if line.startswith("data:"):
                    return json.loads(line[5:])

        welcome = next_event()
        assert welcome["type"] == "welcome", welcome

        def control(body: dict) -> dict:
            body = {"session": welcome["session"], "token": welcome["token"], **body}
            r = urllib.request.Request(
                f"{base}/sse/control",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
            with urllib.request.urlopen(r, timeout=5) as resp:
                return json.loads(resp.read())

        assert control({"op": "subscribe", "id": 1, "channels": ["chat.ssectl"]})["type"] == "ack"
        for n in range(1, rounds + 1):
            reply = control({"op": "publish", "id": n + 1, "channel": "chat.ssectl", "data": {"n": n}})
            assert reply["type"] == "ack", reply
            while True:
                event = next_event()
                if event.get("type") == "msg":
                    assert event["data"] == {"n": n}, event
                    break


def loopback_aliases(count: int) -> list[str]:
    """127.0.0.2, 127.0.0.3, ... (the whole 127/8 is loopback on Linux)."""
    out = []
    for i in range(2, 2 + count):
        addr = f"127.0.0.{i}"
        with socket.socket() as s:
            s.bind((addr, 0))
        out.append(addr)
    return out


async def test_generated_front_pins_sessions_and_spreads_websockets(
    start_server, artifacts, track_process
):
    nodes = start_nodes(start_server)
    port = front(artifacts, track_process, nodes)

    # Socket.IO long-polling from several client addresses at once: every session holds.
    sources = loopback_aliases(8)
    await asyncio.gather(*(polling_exchange(port, s, rounds=15) for s in sources))

    # Each client address sticks to one node, and different addresses use different nodes.
    held = []
    for source in sources:
        sio, session = polling_client(source)
        await sio.connect(f"http://127.0.0.1:{port}", transports=["polling"], wait_timeout=5)
        held.append((sio, session))
    try:
        counts = [connections(n, "socketio") for n in nodes]
        assert sum(counts) == len(sources), counts
        assert sum(1 for c in counts if c > 0) >= 2, f"every address hashed to one node: {counts}"
    finally:
        for sio, session in held:
            await sio.disconnect()
            await session.close()

    # SSE and its control requests reach one node.
    await asyncio.to_thread(sse_control_exchange, port, 10)

    # WebSocket is balanced by least connections: nine clients, three per node.
    sockets = [await connect(f"ws://127.0.0.1:{port}/ws", **CONNECT_DEFAULTS) for _ in range(9)]
    try:
        for ws in sockets:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        counts = [connections(n, "ws") for n in nodes]
        assert counts == [3, 3, 3], f"WebSocket clients per node: {counts}"
    finally:
        for ws in sockets:
            await ws.close()

    code, checks, _ = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/")
    sticky = checks["sticky"]
    assert sticky["status"] == "pass", describe(checks)
    assert "reached the session's node" in sticky["summary"], sticky
    assert sticky["data"]["socketio"]["sessions"] == 4 and sticky["data"]["socketio"]["unknown"] == 0
    assert sticky["data"]["sse"]["sessions"] == 2 and sticky["data"]["sse"]["requests"] == 8
    for id_ in ("upgrade", "headers", "fallbacks"):
        assert checks[id_]["status"] == "pass", describe(checks)


def round_robin_sessions(site: str) -> str:
    """The generated site with the session upstream balanced like any other (round robin)."""
    assert "    hash $remote_addr consistent;\n" in site
    return site.replace("    hash $remote_addr consistent;\n", "")


async def test_non_sticky_front_breaks_polling_and_the_doctor_says_why(
    start_server, artifacts, track_process
):
    nodes = start_nodes(start_server)
    port = front(artifacts, track_process, nodes, edit=round_robin_sessions)

    # A real polling client cannot keep a session: the handshake lands on one node, the next
    # request on another, which answers "Session ID unknown".
    sio, session = polling_client("127.0.0.1")
    broken = None
    try:
        await sio.connect(f"http://127.0.0.1:{port}", transports=["polling"], wait_timeout=5)
        for n in range(10):
            await sio.call("ping", n, timeout=3)
    except (socketio.exceptions.ConnectionError, socketio.exceptions.TimeoutError,
            socketio.exceptions.BadNamespaceError) as e:
        broken = e
    finally:
        await sio.disconnect()
        await session.close()
    assert broken is not None, "a polling session survived a round-robin front"

    code, checks, _ = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/")
    sticky = checks["sticky"]
    assert code == 2 and sticky["status"] == "fail", describe(checks)
    assert "Socket.IO long-polling is not sticky" in sticky["summary"], sticky
    assert 'Session ID unknown' in sticky["summary"], sticky
    assert "unknown_session" in sticky["summary"], sticky  # /sse/control too
    assert sticky["data"]["socketio"]["unknown"] > 0 and sticky["data"]["socketio"]["broken_sessions"] > 0
    fixes = {f["target"]: f["snippet"] for f in sticky["fixes"]}
    assert "hash $remote_addr consistent" in fixes["nginx"], fixes
    assert "ip_hash" in fixes["nginx"], fixes
    assert "balance source" in fixes["HAProxy"], fixes
    assert "stickiness.enabled,Value=true" in fixes["AWS ALB"], fixes
    # The rest of the path is fine: only stickiness fails.
    for id_ in ("upgrade", "headers", "fallbacks"):
        assert checks[id_]["status"] == "pass", describe(checks)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_deploy_example_for_several_nodes_keeps_sessions_over_tls(
    start_server, artifacts, track_process
):
    nodes = start_nodes(start_server)
    ca, cert, key = make_ca_and_certificate(artifacts / "tls")
    tls_port, http_port = free_port(), free_port()
    site = DEPLOY_NODES.read_text()
    for i, node in enumerate(nodes, start=1):
        example = f"server 10.0.0.{i}:8080 "
        assert site.count(example) == 2, example  # in both upstreams
        site = site.replace(example, f"server 127.0.0.1:{node.port} ")
    site = site.replace("    listen [::]:443 ssl http2;\n", "").replace("    listen [::]:80;\n", "")
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    site = re.sub(r"/etc/letsencrypt/live/push\.example\.com/fullchain\.pem", str(cert), site)
    site = re.sub(r"/etc/letsencrypt/live/push\.example\.com/privkey\.pem", str(key), site)
    site = site.replace("server_name push.example.com;", "server_name 127.0.0.1 localhost;")
    start_nginx(artifacts, track_process, site, tls_port)

    context = ssl.create_default_context(cafile=str(ca))
    await asyncio.gather(
        *(polling_exchange(tls_port, s, 10, "https", context) for s in loopback_aliases(4))
    )

    code, checks, _ = await asyncio.to_thread(
        doctor, f"https://127.0.0.1:{tls_port}/", "--ca-file", str(ca)
    )
    assert checks["tls"]["status"] == "pass", describe(checks)
    assert checks["sticky"]["status"] == "pass", describe(checks)
    assert checks["sticky"]["data"]["socketio"]["requests"] >= 4 * 5, checks["sticky"]


def sticky_by_cookie(nodes: list[FerrocastServer]):
    """Edits the site so the session paths are sticky by a cookie the front sets: the first
    request goes round robin, its answer sets `fcnode=<the node's address>`, and requests
    carrying that cookie go to that node (an unknown value: round robin again)."""

    def edit(site: str) -> str:
        servers = "".join(f"    server 127.0.0.1:{n.port};\n" for n in nodes)
        known = "".join(f"    127.0.0.1:{n.port} 127.0.0.1:{n.port};\n" for n in nodes)
        head = (
            f"upstream ferrocast_rr {{\n{servers}}}\n"
            f"map $cookie_fcnode $fc_node {{\n    default ferrocast_rr;\n{known}}}\n"
        )
        assert site.count("proxy_pass http://ferrocast_sticky;") == 3
        site = site.replace(
            "proxy_pass http://ferrocast_sticky;",
            'proxy_pass http://$fc_node;\n        add_header Set-Cookie "fcnode=$upstream_addr; Path=/";',
        )
        return head + site

    return edit


async def test_cookie_sticky_front_passes_with_cookies_sent_back(
    start_server, artifacts, track_process
):
    nodes = start_nodes(start_server)
    port = front(artifacts, track_process, nodes, edit=sticky_by_cookie(nodes))

    # Without the cookie the front is round robin: a bare follow-up misses the session.
    def handshake_then_bare_polls() -> list[int]:
        base = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
        with urllib.request.urlopen(base, timeout=5) as resp:
            assert resp.headers["Set-Cookie"].startswith("fcnode=127.0.0.1:"), resp.headers
            sid = json.loads(resp.read().decode()[1:])["sid"]
        statuses = []
        for _ in range(3):
            req = urllib.request.Request(f"{base}&sid={sid}", data=b"40", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        return statuses

    assert 400 in await asyncio.to_thread(handshake_then_bare_polls)

    code, checks, _ = await asyncio.to_thread(doctor, f"http://127.0.0.1:{port}/")
    sticky = checks["sticky"]
    assert sticky["status"] == "pass", describe(checks)
    assert sticky["data"]["socketio"]["unknown"] == 0 and sticky["data"]["sse"]["unknown"] == 0
    assert any("sticky by cookie (fcnode)" in d for d in sticky.get("details", [])), sticky
