"""A native-protocol client built on the `websockets` library (a client we did not write)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: Options for every test connection: no library-level pings (the server's heartbeat is
#: what is under test), no compression (frames go out as written), no proxy from the
#: environment, no client-side size limit (the server's limit is under test).
CONNECT_DEFAULTS: dict[str, Any] = dict(
    ping_interval=None,
    compression=None,
    proxy=None,
    max_size=None,
    open_timeout=5,
    close_timeout=5,
)

_ids = itertools.count(1)


def next_id() -> int:
    return next(_ids)


@dataclass
class Closed:
    """How a connection ended, as the client saw it."""

    code: int
    reason: str
    frames: list[Any]

    def reason_json(self) -> Any:
        return json.loads(self.reason)


class Client:
    """One WebSocket connection speaking ferrocast's native JSON protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict | None = None
        #: Server heartbeats seen and skipped by recv().
        self.pings_seen = 0

    # --- sending -------------------------------------------------------------------------

    async def send(self, frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    # --- receiving -----------------------------------------------------------------------

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def recv(self, timeout: float = 5.0, skip_pings: bool = True) -> Any:
        """The next frame, parsed; server heartbeats (`{"type":"ping"}`) are skipped unless
        `skip_pings` is false. Raises TimeoutError when nothing arrives in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = max(0.0, deadline - loop.time())
            raw = await asyncio.wait_for(self.ws.recv(), remaining)
            assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
            frame = json.loads(raw)
            if skip_pings and isinstance(frame, dict) and frame.get("type") == "ping":
                self.pings_seen += 1
                continue
            return frame

    async def recv_type(self, type_: str, timeout: float = 5.0) -> dict:
        """The next frame, which must be of `type_`."""
        frame = await self.recv(timeout)
        assert isinstance(frame, dict) and frame.get("type") == type_, (
            f"expected a {type_!r} frame, got {frame!r}"
        )
        return frame

    async def expect_silence(self, seconds: float) -> None:
        """Asserts that no frame (other than heartbeats) arrives for `seconds`."""
        try:
            frame = await self.recv(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {frame!r}")

    async def wait_closed(self, timeout: float = 10.0) -> Closed:
        """Reads (and keeps) frames until the connection closes; returns code and reason."""
        frames: list[Any] = []

        async def drain() -> None:
            try:
                while True:
                    raw = await self.ws.recv()
                    frames.append(json.loads(raw) if isinstance(raw, str) else raw)
            except ConnectionClosed:
                return

        await asyncio.wait_for(drain(), timeout)
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        code = self.ws.close_code
        assert code is not None
        return Closed(code, self.ws.close_reason or "", frames)

    # --- requests ------------------------------------------------------------------------

    async def request(self, frame: dict, timeout: float = 5.0) -> dict:
        """Sends a frame with a fresh id (unless it has one) and returns the reply, which
        must echo the id."""
        frame = dict(frame)
        frame.setdefault("id", next_id())
        await self.send(frame)
        reply = await self.recv(timeout)
        assert isinstance(reply, dict) and reply.get("id") == frame["id"], (
            f"expected the reply to id {frame['id']}, got {reply!r}"
        )
        return reply

    async def subscribe(self, *channels: str, recover: dict | None = None) -> dict:
        """Subscribes; asserts an ack and returns its per-channel `result`."""
        frame: dict[str, Any] = {"op": "subscribe", "channels": list(channels)}
        if recover is not None:
            frame["recover"] = recover
        reply = await self.request(frame)
        assert reply["type"] == "ack", reply
        assert set(reply["result"]) == set(channels), reply
        return reply["result"]

    async def subscribe_ok(self, *channels: str) -> dict:
        """Subscribes and asserts every channel succeeded with an epoch and an offset."""
        result = await self.subscribe(*channels)
        for c in channels:
            r = result[c]
            assert "error" not in r, f"subscribe {c} failed: {r}"
            assert isinstance(r["epoch"], str) and r["epoch"], r
            assert isinstance(r["offset"], int) and r["offset"] >= 0, r
        return result

    async def next_msg(self, channel: str | None = None, timeout: float = 5.0) -> dict:
        frame = await self.recv_type("msg", timeout)
        if channel is not None:
            assert frame["channel"] == channel, frame
        return frame

    async def close(self) -> None:
        await self.ws.close()


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    opts = dict(CONNECT_DEFAULTS)
    opts.update(kwargs)
    return await connect(url, **opts)


async def connect_client(url: str, welcome: bool = True, **kwargs: Any) -> Client:
    """Opens a connection; with `welcome`, reads and checks the welcome frame first."""
    client = Client(await open_ws(url, **kwargs))
    if welcome:
        frame = await client.recv(timeout=5, skip_pings=False)
        assert isinstance(frame, dict) and frame.get("type") == "welcome", frame
        client.welcome = frame
    return client


def small_rcvbuf_socket(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A connected TCP socket with a small receive buffer (set before connecting so the
    window stays small), for slow-consumer tests: the kernel absorbs less."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


def raw_ws_handshake(port: int, path: str = "/ws", timeout: float = 5.0) -> socket.socket:
    """Completes a WebSocket handshake on a plain socket and returns it, never to read or
    answer anything again: a client that ignores the server's close frame."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError(f"server closed during the handshake: {head!r}")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    assert b" 101 " in status, status
    return s
