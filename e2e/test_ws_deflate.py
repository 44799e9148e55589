"""permessage-deflate (RFC 7692) on /ws, with Python's `websockets` as the client.

The client's own extension decodes every frame; a thin subclass of it records each frame's
RSV1 bit before decoding, so the tests see what went over the wire: compressed frames for
messages of a compressing namespace at or above `compress_min_bytes`, plain frames for the
rest, and plain frames for a client that did not offer the extension.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib

from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)

from ferrocast_e2e.wsclient import next_id

ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
COMPRESS = (
    "namespaces.docs.compress=true",
    "namespaces.docs.compress_min_bytes=256",
    "namespaces.docs.client_publish=true",
)


class RecordingDeflate(PerMessageDeflate):
    """The library's extension, noting the RSV1 bit of every data frame it decodes."""

    seen: list[bool]

    def decode(self, frame, *, max_size=None):
        if frame.opcode.name in ("TEXT", "BINARY"):
            self.seen.append(frame.rsv1)
        return super().decode(frame, max_size=max_size)


class RecordingFactory(ClientPerMessageDeflateFactory):
    def __init__(self) -> None:
        # What compression="deflate" offers.
        super().__init__(client_max_window_bits=True, compress_settings={"memLevel": 5})
        self.extension: RecordingDeflate | None = None

    def process_response_params(self, params, accepted_extensions):
        ext = super().process_response_params(params, accepted_extensions)
        ext.__class__ = RecordingDeflate
        ext.seen = []
        self.extension = ext
        return ext


def doc(n: int) -> dict:
    """A JSON document of about 2 KiB, like an order book or a news item."""
    rows = [{"price": 100 + i * 0.25, "size": 10 * i, "side": "bid" if i % 2 else "ask"} for i in range(40)]
    return {"n": n, "symbol": "AAPL", "rows": rows}


async def open_deflate(ws, server, channel):
    factory = RecordingFactory()
    c = await ws(server, extensions=[factory])
    await c.subscribe_ok(channel)
    assert factory.extension is not None, "permessage-deflate was not negotiated"
    return c, factory.extension


async def test_compressing_namespace_sends_large_messages_compressed_once_for_everyone(
    start_server, ws
):
    server = start_server(*COMPRESS)
    c1, ext1 = await open_deflate(ws, server, "docs.a")
    c2, ext2 = await open_deflate(ws, server, "docs.a")
    assert c1.ws.response.headers["Sec-WebSocket-Extensions"] == ANSWER
    plain = await ws(server)  # offers nothing
    assert "Sec-WebSocket-Extensions" not in plain.ws.response.headers
    await plain.subscribe_ok("docs.a")
    for ext in (ext1, ext2):
        ext.seen.clear()

    small = {"p": 1.5}
    await server.apublish("docs.a", small)
    for i in range(3):
        await server.apublish("docs.a", doc(i))
    for c, ext in ((c1, ext1), (c2, ext2)):
        got = [await c.next_msg("docs.a") for _ in range(4)]
        assert [m["data"] for m in got] == [small, doc(0), doc(1), doc(2)]
        assert ext.seen == [False, True, True, True], ext.seen
    got = [await plain.next_msg("docs.a") for _ in range(4)]
    assert [m["data"] for m in got] == [small, doc(0), doc(1), doc(2)]

    metrics = server.get("/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("ferrocast_ws_deflate")
    }
    # Three large messages, two subscribers each: three compressions, six compressed frames.
    assert values["ferrocast_ws_deflate_compressions_total"] == 3, values
    assert values["ferrocast_ws_deflate_frames_total"] == 6, values
    assert values["ferrocast_ws_deflate_connections_total"] == 2, values
    wire = values['ferrocast_ws_deflate_bytes_total{form="wire"}']
    assert 0 < wire < values['ferrocast_ws_deflate_bytes_total{form="plain"}'] / 3, values


async def test_other_namespaces_and_replies_stay_plain(start_server, ws):
    server = start_server(*COMPRESS)
    c, ext = await open_deflate(ws, server, "chat.room")
    ext.seen.clear()
    await server.apublish("chat.room", doc(7))
    assert (await c.next_msg("chat.room"))["data"] == doc(7)
    reply = await c.request({"op": "ping", "id": next_id()})
    assert reply["type"] == "pong", reply
    assert ext.seen == [False, False], ext.seen


async def test_compressed_client_messages_are_decompressed(start_server, ws):
    server = start_server(*COMPRESS)
    sender, _ = await open_deflate(ws, server, "docs.elsewhere")
    reader = await ws(server)
    await reader.subscribe_ok("docs.in")
    # websockets compresses what it sends once the extension is negotiated.
    await sender.send({"op": "publish", "id": next_id(), "channel": "docs.in", "data": doc(1)})
    ack = await sender.recv_type("ack")
    assert "error" not in ack, ack
    assert (await reader.next_msg("docs.in"))["data"] == doc(1)


async def test_no_compressing_namespace_means_no_extension(server, ws):
    factory = RecordingFactory()
    c = await ws(server, extensions=[factory])
    assert factory.extension is None
    assert "Sec-WebSocket-Extensions" not in c.ws.response.headers


async def test_a_message_that_inflates_past_the_limit_is_closed_with_1009(start_server, ws):
    server = start_server(*COMPRESS, "server.max_frame_bytes=4096")
    c, _ = await open_deflate(ws, server, "docs.big")
    # 40 KB of JSON that compresses to a few hundred bytes: small on the wire, too big inside.
    await c.send({"op": "publish", "id": next_id(), "channel": "docs.big", "data": "a" * 40_000})
    closed = await c.wait_closed()
    assert closed.code == 1009, closed
    assert "decompresses" in closed.reason, closed


def raw_deflate_client(port: int, offer: bool) -> socket.socket:
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if offer else ""
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{ext}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    assert (b"permessage-deflate" in head) == offer, head
    return s


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([first_byte, 0x80 | len(payload)]) + mask + body


def read_until_close(s: socket.socket, until_text: bytes | None = None) -> tuple[int, list[bytes]]:
    """Reads server frames until the close frame (or a text frame containing `until_text`,
    then returning code 0); returns the code and the text payloads before it (plain:
    nothing here offers the server anything worth compressing)."""
    texts = []
    buf = b""
    while True:
        while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
            chunk = s.recv(65536)
            assert chunk, f"closed without a close frame: {buf!r}"
            buf += chunk
        n = buf[1] & 0x7F
        if n == 126:
            while len(buf) < 4:
                buf += s.recv(65536)
            n = struct.unpack(">H", buf[2:4])[0]
            start = 4
        else:
            start = 2
        while len(buf) < start + n:
            buf += s.recv(65536)
        opcode, payload, buf = buf[0] & 0x0F, buf[start : start + n], buf[start + n :]
        if opcode == 0x8:
            return struct.unpack(">H", payload[:2])[0], texts
        if opcode == 0x1:
            texts.append(payload)
            if until_text is not None and until_text in payload:
                return 0, texts


def test_malformed_compressed_frames_get_their_close_codes(start_server):
    server = start_server(*COMPRESS)
    ping = zlib.compressobj(wbits=-15)
    good = ping.compress(b'{"op":"ping"}') + ping.flush(zlib.Z_SYNC_FLUSH)
    assert good.endswith(b"\x00\x00\xff\xff")
    cases = [
        # Not deflate data: 1007.
        (True, masked_frame(0x80 | 0x40 | 0x1, b"\xff\xfe\xfd\xfc\xfb"), 1007),
        # RSV1 on a control frame: 1002.
        (True, masked_frame(0x80 | 0x40 | 0x9, b""), 1002),
        # RSV1 without the extension negotiated: 1002.
        (False, masked_frame(0x80 | 0x40 | 0x1, good[:-4]), 1002),
    ]
    for offer, frame, code in cases:
        s = raw_deflate_client(server.port, offer)
        try:
            s.sendall(frame)
            assert read_until_close(s)[0] == code, (offer, frame)
        finally:
            s.close()
    # The same compressed ping is answered when the extension was negotiated.
    s = raw_deflate_client(server.port, True)
    try:
        s.sendall(masked_frame(0x80 | 0x40 | 0x1, good[:-4]))
        _, texts = read_until_close(s, until_text=b'"pong"')
        types = [json.loads(t)["type"] for t in texts]
        assert types == ["welcome", "pong"], texts
        s.sendall(masked_frame(0x88, struct.pack(">H", 1000)))
        assert read_until_close(s)[0] == 1000
    finally:
        s.close()


def test_bench_compress_receives_every_message_compressed(start_server):
    """`ferrocast bench --compress`: its lean subscribers offer the extension and inflate
    what arrives; nothing is lost, and the server compressed each message once."""
    from ferrocast_e2e.server import run_ferrocast

    server = start_server("namespaces.bench.compress=true", "namespaces.bench.compress_min_bytes=0")
    args = ["bench", "--url", server.ws_url(), "--subscribers", "4", "--channels", "1",
            "--rate", "100", "--payload", "1500", "--duration", "1", "--warmup", "0.3",
            "--drain", "2", "--processes", "1", "--compress", "--json"]
    out = run_ferrocast(args, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    delivery = report["delivery"]
    assert delivery["lost"] == 0 and delivery["delivered"] > 0, report
    assert delivery["delivered"] == delivery["expected"], report
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in server.get("/metrics").text.splitlines()
        if line.startswith("ferrocast_ws_deflate")
    }
    # Every delivery went compressed (bench has a probe subscriber besides the four), and
    # each message was compressed once.
    assert values["ferrocast_ws_deflate_frames_total"] >= delivery["delivered"], values
    compressions = values["ferrocast_ws_deflate_compressions_total"]
    assert 0 < compressions * 4 <= values["ferrocast_ws_deflate_frames_total"], values


def read_gzip_events(resp, decoder, want: int) -> tuple[bytes, list[dict]]:
    """Reads the raw (still gzip-encoded) body until `want` msg events decoded; returns the
    raw bytes read and the JSON of every data line so far."""
    raw = b""
    text = b""
    while True:
        chunk = resp.read1(65536)
        assert chunk, "stream ended early"
        raw += chunk
        text += decoder.decompress(chunk)
        events = [json.loads(line[6:]) for line in text.split(b"\n") if line.startswith(b"data: ")]
        if sum(1 for e in events if e.get("type") == "msg") >= want:
            return raw, events


def test_sse_is_gzip_encoded_when_accepted_sharing_the_compressed_messages(start_server):
    import gzip
    import http.client
    import signal

    server = start_server(*COMPRESS)
    zipped = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    zipped.request("GET", "/sse?channels=docs.s", headers={"Accept-Encoding": "gzip, deflate"})
    resp = zipped.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Encoding") == "gzip"
    assert resp.getheader("Vary") == "accept-encoding"
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    plain.request("GET", "/sse?channels=docs.s")
    plain_resp = plain.getresponse()
    assert plain_resp.getheader("Content-Encoding") is None

    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)  # Python's zlib, gzip framing
    raw, _ = read_gzip_events(resp, decoder, 0)  # the welcome and the ack
    server.publish("docs.s", {"p": 1})  # small: plain, in a stored block
    for i in range(3):
        server.publish("docs.s", doc(i))
    more, events = read_gzip_events(resp, decoder, 4)
    raw += more
    msgs = [e for e in events if e.get("type") == "msg"]
    assert [m["data"] for m in msgs] == [{"p": 1}, doc(0), doc(1), doc(2)]
    # The three documents took a fraction of their size on the wire.
    doc_bytes = sum(len(json.dumps(m, separators=(",", ":"))) for m in msgs[1:])
    assert len(more) * 2 < doc_bytes, (len(more), doc_bytes)
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in server.get("/metrics").text.splitlines()
        if line.startswith("ferrocast_ws_deflate")
    }
    assert values["ferrocast_ws_deflate_compressions_total"] == 3, values

    # A stream the server ends gets the trailer: the whole body is valid gzip (CRC, length).
    server.process.signal(signal.SIGTERM)
    while chunk := resp.read1(65536):
        raw += chunk
    body = gzip.decompress(raw).decode()
    assert '"type":"close"' in body and '"code":1001' in body, body[-300:]
    zipped.close()
    plain.close()
