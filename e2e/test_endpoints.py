"""Requests that knock on the wrong door get an answer that says so; assets are served."""

from __future__ import annotations

from ferrocast_e2e.server import socketio_off_sets


async def test_ws_without_upgrade_is_426_with_a_json_explanation(start_server):
    server = start_server('server.ws_paths=["/ws","/ws/price"]')
    for path in ("/ws", "/ws/price"):
        r = server.get(path)
        assert r.status == 426, (path, r.status)
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers.get("upgrade", "").lower() == "websocket"
        body = r.json()
        assert body["error"] == "upgrade_required"
        assert "Upgrade" in body["message"], body
        assert body["websocket"] == path
    assert server.metric("ferrocast_upgrade_rejected_total") == 2


async def test_ws_with_wrong_websocket_version_is_426(server):
    r = server.get(
        "/ws",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "8",
        },
    )
    assert r.status == 426
    assert "13" in r.json()["message"]


async def test_socketio_path_is_404_pointing_to_ws(start_server):
    server = start_server(*socketio_off_sets())
    r = server.get("/socket.io/?EIO=4&transport=polling")
    assert r.status == 404, (r.status, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "/ws" in body["message"], body
    assert body["error"] == "socketio_disabled"
    assert server.metric("ferrocast_wrong_endpoint_total", path="/socket.io/") == 1


async def test_dashboard_and_client_are_served(server):
    r = server.get("/")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
    r = server.get("/client.js")
    assert r.status == 200
    assert "javascript" in r.headers["content-type"]
    assert len(r.body) > 100


async def test_dashboard_can_be_turned_off(start_server):
    server = start_server("server.dashboard=false")
    assert server.get("/").status == 404
    assert server.get("/client.js").status == 404
    assert server.get("/healthz").status == 200


async def test_unknown_path_is_404(server):
    assert server.get("/nope").status == 404
