"""Hostile clients for the abuse tests, run in a process of their own.

An attacker is a raw socket that sends as fast as the server takes it and never reads (tiny
receive buffer). It runs in a separate process, as a real attacker would: in the test's own
process its Python loop would compete with the canary for the interpreter lock, and the
canary's delivery gaps would measure Python's thread switching rather than the server.

`run_in_process(loop, port, step, seconds)` runs `loop(port, step, deadline, stats)` in a
spawned process and returns `stats`. Loops and steps are module-level functions (or
`functools.partial`s of them) so they can be sent to the child.
"""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import os
import socket
import struct
import time
from typing import Any, Callable

from .server import KeepAlivePublisher

Stats = dict[str, Any]
#: `step(attacker, n)`: the bytes to send for the attacker's n-th round.
Step = Callable[["NonReader", int], bytes]
#: `loop(port, step, deadline, stats)`: attacks until `deadline` (time.monotonic).
Loop = Callable[[int, Any, float, Stats], None]


def new_stats() -> Stats:
    return {"connections": 0, "closed": 0, "blocked": 0}


def connect(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Tiny buffers: the server sees a client that does not read as soon as possible.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def read_head(s: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    return head


def frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame. The masking key is all zeros (valid: the server unmasks whatever
    key it gets), so frames can be built once and the attacker spends its time sending."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + b"\x00\x00\x00\x00" + payload


class NonReader:
    """A WebSocket client that completes the handshake and then only sends."""

    def __init__(self, port: int, path: str = "/ws") -> None:
        self.sock = connect(port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = read_head(self.sock)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock.settimeout(0.5)

    def send(self, data: bytes) -> bool:
        """Sends; False when the server stopped reading us (the send timed out)."""
        try:
            self.sock.sendall(data)
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def attack_loop(
    port: int,
    step: Step,
    deadline: float,
    stats: Stats,
    path: str = "/ws",
    hello: bytes = b"",
    opener: Callable[[int], NonReader] | None = None,
) -> None:
    """Sends `step(attacker, n)` as fast as the server takes it, reconnecting whenever the
    server closes the attacker, until `deadline`. `hello` is sent first on each connection;
    `opener(port)`, when given, opens each connection instead."""
    n = 0
    while time.monotonic() < deadline:
        try:
            if opener is not None:
                attacker = opener(port)
            else:
                attacker = NonReader(port, path)
                if hello:
                    attacker.send(frame(0x1, hello))
        except (OSError, AssertionError, ValueError, http.client.HTTPException):
            time.sleep(0.05)
            continue
        stats["connections"] += 1
        try:
            while time.monotonic() < deadline:
                n += 1
                if not attacker.send(step(attacker, n)):
                    stats["blocked"] += 1
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            stats["closed"] += 1
        finally:
            attacker.close()


def socketio_attack_loop(port: int, step: Step, deadline: float, stats: Stats) -> None:
    """`attack_loop` over a raw Engine.IO websocket that joins the main namespace first."""
    attack_loop(
        port, step, deadline, stats, path="/socket.io/?EIO=4&transport=websocket", hello=b"40"
    )


def upgraded_socketio_non_reader(port: int, channel: str = "chat.canary") -> NonReader:
    """A Socket.IO session opened on long-polling that joins the main namespace and subscribes
    to `channel` there, then upgrades to a websocket (probe, upgrade) on which it only sends."""
    base = "/socket.io/?EIO=4&transport=polling"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    text = {"Content-Type": "text/plain;charset=UTF-8"}
    try:
        conn.request("GET", base)
        sid = json.loads(conn.getresponse().read().decode()[1:])["sid"]
        polled = f"{base}&sid={sid}"
        conn.request("POST", polled, body="40", headers=text)
        conn.getresponse().read()
        conn.request("GET", polled)
        answer = conn.getresponse().read()
        assert answer.startswith(b"40"), answer
        conn.request("POST", polled, body=f'42["subscribe",{json.dumps(channel)}]', headers=text)
        conn.getresponse().read()
    finally:
        conn.close()
    attacker = NonReader(port, f"/socket.io/?EIO=4&transport=websocket&sid={sid}")
    attacker.send(frame(0x1, b"2probe"))
    answer = b""
    while b"3probe" not in answer:
        chunk = attacker.sock.recv(256)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        answer += chunk
    attacker.send(frame(0x1, b"5"))
    return attacker


def upgraded_socketio_attack_loop(port: int, step: Step, deadline: float, stats: Stats) -> None:
    """`attack_loop` over [`upgraded_socketio_non_reader`] connections."""
    attack_loop(port, step, deadline, stats, opener=upgraded_socketio_non_reader)


# --- steps -------------------------------------------------------------------------------


def send_bytes(data: bytes, attacker: NonReader, n: int) -> bytes:
    """The same frames every round (`functools.partial(send_bytes, frames)`)."""
    return data


def ping_ops(attacker: NonReader, n: int) -> bytes:
    """Ten `{"op":"ping"}` requests with fresh ids."""
    return b"".join(frame(0x1, b'{"op":"ping","id":%d}' % (n * 10 + i)) for i in range(10))


def pong_and_ping_op(attacker: NonReader, n: int) -> bytes:
    """A blind `{"op":"pong"}` (a heartbeat answer never read) and a ping request."""
    return frame(0x1, b'{"op":"pong"}') + frame(0x1, b'{"op":"ping","id":%d}' % n)


def socketio_events(payload: str, attacker: NonReader, n: int) -> bytes:
    """Ten Socket.IO `ping` events asking for acks."""
    return b"".join(
        frame(0x1, f'42{n * 10 + i}["ping",{payload}]'.encode()) for i in range(10)
    )


# --- SSE ---------------------------------------------------------------------------------


class SseNonReader:
    """An SSE stream that is opened and never read, and a control connection that floods it."""

    def __init__(self, port: int, channel: str) -> None:
        self.stream = connect(port)
        self.stream.sendall(
            f"GET /sse?channels={channel} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        data = b""
        while b'"type":"welcome"' not in data or not data.rstrip(b"\r\n").endswith(b"}"):
            chunk = self.stream.recv(4096)
            if not chunk:
                raise ConnectionError("stream closed before its welcome")
            data += chunk
        line = next(x for x in data.split(b"\n") if b'"type":"welcome"' in x)
        info = json.loads(line.split(b"data:", 1)[1])
        self.session, self.token = info["session"], info["token"]
        self.control = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def post(self, request: dict) -> int:
        body = json.dumps({"session": self.session, "token": self.token, **request})
        self.control.request("POST", "/sse/control", body=body)
        resp = self.control.getresponse()
        resp.read()
        return resp.status

    def close(self) -> None:
        self.stream.close()
        self.control.close()


def sse_recovery_flood(
    channel: str, epoch: str, port: int, step: None, deadline: float, stats: Stats
) -> None:
    """Recovering subscribes over `POST /sse/control` onto a stream that is never read;
    `stats["statuses"]` counts the control answers by status."""
    statuses: dict[int, int] = stats.setdefault("statuses", {})
    subscribe = {
        "op": "subscribe",
        "id": 1,
        "channels": [channel],
        "recover": {channel: {"epoch": epoch, "offset": 0}},
    }
    unsubscribe = {"op": "unsubscribe", "id": 2, "channels": [channel]}
    while time.monotonic() < deadline:
        try:
            attacker = SseNonReader(port, channel)
        except (OSError, ConnectionError, StopIteration):
            time.sleep(0.05)
            continue
        stats["connections"] += 1
        try:
            while time.monotonic() < deadline:
                status = attacker.post(subscribe)
                statuses[status] = statuses.get(status, 0) + 1
                attacker.post(unsubscribe)
                if status == 404:
                    stats["closed"] += 1
                    break
        except OSError:
            stats["closed"] += 1
        finally:
            attacker.close()


# --- publishing into a backlog -----------------------------------------------------------


def conflating_flood(
    channels: list[str], port: int, step: None, deadline: float, stats: Stats
) -> None:
    """A non-reader subscribed to `channels` while quotes flood in over HTTP; counts what was
    published in `stats["published"]`."""
    attacker = NonReader(port)
    stats["connections"] += 1
    subscribe = {"op": "subscribe", "id": 1, "channels": channels}
    attacker.send(frame(0x1, json.dumps(subscribe).encode()))
    publisher = KeepAlivePublisher(port)
    pad = "q" * 100
    try:
        n = 0
        while time.monotonic() < deadline:
            publisher.publish_batch([(c, {"bid": n, "pad": pad}) for c in channels])
            n += 1
        stats["published"] = n * len(channels)
    finally:
        publisher.close()
        attacker.close()


# --- the separate process ----------------------------------------------------------------


def _child(loop: Loop, port: int, step: Any, seconds: float, results) -> None:
    stats = new_stats()
    try:
        loop(port, step, time.monotonic() + seconds, stats)
    except BaseException as e:  # reported to the test, which fails on it
        stats["error"] = repr(e)
    results.send(stats)
    results.close()


class AttackProcess:
    """`loop` running in a spawned process for `seconds`."""

    def __init__(self, loop: Loop, port: int, step: Any, seconds: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._results, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child, args=(loop, port, step, seconds, child_end), daemon=True
        )
        self.process.start()
        child_end.close()
        self.seconds = seconds

    def done(self) -> bool:
        return self._results.poll() or not self.process.is_alive()

    def stats(self, timeout: float = 30.0) -> Stats:
        """The attacker's figures; fails if it crashed or outlives its time."""
        try:
            if not self._results.poll(timeout):
                raise EOFError
            stats = self._results.recv()
        except EOFError:
            self.process.kill()
            self.process.join(5)
            raise AssertionError(
                f"the attacker process sent no figures (exit {self.process.exitcode})"
            ) from None
        self.process.join(timeout)
        assert "error" not in stats, f"the attacker failed: {stats['error']}"
        return stats
