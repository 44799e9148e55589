"""Who may use the HTTP API: `[[api.keys]]` with scopes (publish, read, admin) beside `api.key`
(every scope), the `Bearer` scheme in any case, read endpoints behind the read scope; with no
key, loopback trust that a forwarded address (X-Forwarded-For, Forwarded, X-Real-IP,
True-Client-IP, CF-Connecting-IP), a foreign Host (DNS rebinding) or a web page's Origin
(cross-site request) cannot borrow; and CORS that names only configured origins and never
grants credentials to an arbitrary one. Requests are made with httpx, as a browser or a proxy
would send them."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from ferrocast_e2e.server import clean_env, ferrocast_bin

KEYS = (
    'api.keys=[{name="backend",key="publish-key-0123456789",scopes=["publish"]},'
    '{name="grafana",key_env="E2E_READ_KEY",scopes=["read"]},'
    '{name="ops",key="admin-key-0123456789",scopes=["admin"]}]'
)
ALL = "every-scope-key"
READ_PATHS = ["/api/channels", "/api/stats", "/api/nodes", "/api/channels/chat.x/history"]


def bearer(key: str, scheme: str = "Bearer") -> dict:
    return {"Authorization": f"{scheme} {key}"}


@pytest.fixture
def keyed(start_server):
    server = start_server(KEYS, f"api.key={ALL}", env={"E2E_READ_KEY": "read-key-0123456789"})
    return server


async def test_scopes(keyed):
    server = keyed
    http = httpx.Client(base_url=server.base_url, timeout=5)
    body = {"channel": "chat.x", "data": 1}
    publish = lambda h: http.post("/api/publish", json=body, headers=h)  # noqa: E731
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = publish(bearer("publish-key-0123456789", scheme))
        assert r.status_code == 200, (scheme, r.text)
    for key in ("read-key-0123456789", "admin-key-0123456789"):
        r = publish(bearer(key))
        assert r.status_code == 403 and '"publish" scope' in r.json()["message"], r.text
    for headers in ({}, bearer("publish-key-012345678"), bearer("publish-key-01234567890"), bearer("x" * 5000),
                    {"Authorization": "Basic publish-key-0123456789"}):
        r = publish(headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (headers, r.text)
        assert "publish-key" not in r.text
    assert publish(bearer(ALL)).status_code == 200

    for path in READ_PATHS:
        for key in ("read-key-0123456789", "admin-key-0123456789", ALL):
            r = http.get(path, headers=bearer(key))
            assert r.status_code == 200, (path, key, r.text)
        r = http.get(path, headers=bearer("publish-key-0123456789"))
        assert r.status_code == 403 and '"read" scope' in r.json()["message"], (path, r.text)
        assert http.get(path).status_code == 401, path
    for path, post in [("/api/diagnostics", False), ("/api/users/42/connections", False),
                       ("/api/users/42/disconnect", True)]:
        send = http.post if post else http.get
        assert send(path, headers=bearer("admin-key-0123456789")).status_code == 200, path
        r = send(path, headers=bearer("read-key-0123456789"))
        assert r.status_code == 403 and '"admin" scope' in r.json()["message"], (path, r.text)
    metrics = server.metrics_text()
    assert 'ferrocast_auth_refused_total{reason="api_scope"}' in metrics
    # The first line of the log is the test's own command line.
    log = server.log().split("\n", 1)[1]
    for key in ("read-key-0123456789", "publish-key-0123456789", "admin-key-0123456789", "x" * 5000):
        assert key not in log, "an API key was logged"


def test_a_key_env_that_is_not_set_stops_serve():
    argv = [str(ferrocast_bin()), "serve", "--listen", "127.0.0.1:0", "--no-simulator", "--set", KEYS]
    proc = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert "api.keys[1].key_env" in proc.stderr and "E2E_READ_KEY" in proc.stderr, proc.stderr


async def test_loopback_trust_is_not_lent_to_forwarded_clients_foreign_hosts_or_web_pages(start_server):
    server = start_server("server.allowed_hosts=[\"ferrocast.internal\"]")
    http = httpx.Client(base_url=server.base_url, timeout=5)
    body = {"channel": "chat.x", "data": 1}
    assert http.post("/api/publish", json=body).status_code == 200
    # A proxy on this machine forwarding for a remote client, in any of the usual headers.
    for name in ("X-Forwarded-For", "X-Real-IP", "True-Client-IP", "CF-Connecting-IP"):
        r = http.post("/api/publish", json=body, headers={name: "203.0.113.9"})
        assert r.status_code == 401 and "203.0.113.9" in r.json()["message"], (name, r.text)
        assert http.get("/api/stats", headers={name: "203.0.113.9"}).status_code == 401, name
        assert http.post("/api/publish", json=body, headers={name: "127.0.0.1"}).status_code == 200, name
    r = http.post("/api/publish", json=body, headers={"Forwarded": 'for="[2001:db8::1]:4711"'})
    assert r.status_code == 401, r.text
    # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1.
    for host in ("evil.example", "evil.example:8080", "localhost.evil.example"):
        r = http.post("/api/publish", json=body, headers={"Host": host})
        assert r.status_code == 403 and "DNS rebinding" in r.json()["message"], (host, r.text)
        assert http.get("/api/channels", headers={"Host": host}).status_code == 403, host
    for host in ("localhost", "localhost:9", "127.0.0.1", "[::1]:80", "ferrocast.internal", "FERROCAST.internal:8080"):
        assert http.post("/api/publish", json=body, headers={"Host": host}).status_code == 200, host
    # A web page's request (the browser sends its Origin), even one a CORS preflight would
    # not stop (text/plain is a "simple" request): refused on every state-changing endpoint.
    for path in ("/api/publish", "/api/users/42/disconnect", "/api/users/42/subscribe"):
        r = http.post(path, content='{"channel":"chat.x","data":1}',
                      headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)
        assert "Origin" in r.json()["message"], r.text
    # Reading is not state-changing: the dashboard's own page may read.
    assert http.get("/api/stats", headers={"Origin": server.base_url}).status_code == 200
    assert server.metric("ferrocast_auth_refused_total", reason="cross_site") == 3
    assert server.metric("ferrocast_auth_refused_total", reason="host") >= 6


async def test_cross_site_with_named_origins_and_a_key(start_server):
    server = start_server('server.allowed_origins=["https://app.example"]', api_key="k3y-0123456789")
    http = httpx.Client(base_url=server.base_url, timeout=5)
    body = {"channel": "chat.x", "data": 1}
    ok = http.post("/api/publish", json=body, headers={"Origin": "https://app.example", **bearer("k3y-0123456789")})
    assert ok.status_code == 200, ok.text
    r = http.post("/api/publish", json=body, headers={"Origin": "https://evil.example", **bearer("k3y-0123456789")})
    assert r.status_code == 403 and "allowed_origins" in r.json()["message"], r.text
    r = http.post("/api/publish", json=body, headers={"Origin": "null", **bearer("k3y-0123456789")})
    assert r.status_code == 403, r.text


async def test_cors_names_configured_origins_only(start_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, x-evil"}

    server = start_server()
    http = httpx.Client(base_url=server.base_url, timeout=5)
    r = http.options("/api/publish", headers={"Origin": "https://any.example", **preflight})
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["access-control-allow-headers"] == "authorization, content-type, last-event-id, x-ferrocast-stream-token"
    r = http.get("/api/feeds", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in r.headers

    server = start_server('server.allowed_origins=["https://app.example"]')
    http = httpx.Client(base_url=server.base_url, timeout=5)
    r = http.options("/sse", headers={"Origin": "https://app.example", **preflight})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "origin" in r.headers["vary"].lower()
    r = http.options("/api/publish", headers={"Origin": "https://evil.example", **preflight})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = http.get("/api/feeds", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = http.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"

    server = start_server('server.allowed_origins=["*"]')
    r = httpx.get(f"{server.base_url}/api/feeds", headers={"Origin": "https://evil.example"})
    assert r.headers["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in r.headers


async def test_public_read_opens_reading_but_not_protected_history(start_server):
    server = start_server("api.public_read=true", "namespaces.vault.history=key", api_key="k3y-0123456789")
    server.publish("news.x", {"a": 1})
    server.publish("vault.x", {"secret": 1})
    server.publish("inbox.x#42", {"secret": 2})
    remote = {"X-Forwarded-For": "203.0.113.9", "Authorization": ""}
    http = httpx.Client(base_url=server.base_url, timeout=5)
    for path in ("/api/channels", "/api/stats", "/api/nodes", "/api/channels/news.x/history"):
        assert http.get(path, headers=remote).status_code == 200, path
    for path in ("/api/channels/vault.x/history", "/api/channels/inbox.x%2342/history"):
        r = http.get(path, headers=remote)
        assert r.status_code == 401 and "secret" not in r.text, (path, r.text)
    assert http.post("/api/publish", json={"channel": "news.x", "data": 2}, headers=remote).status_code == 401
