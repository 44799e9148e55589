"""The attack list on every transport: tokens made by PyJWT (keys from a JWKS served over HTTP,
chosen by `kid`), presented at connect on native `/ws` (header), SSE (`?token=`) and
python-socketio (the CONNECT packet's `auth`). Each attack is answered precisely — the error
code, a message naming the check, the close code that tells the client what to do — with the
token never logged and a canary subscriber on the same server unaffected. Then, on SSE and
Socket.IO: a user-42 token on `payments.eu#43` (subscribe, recover, snapshot), subscription
tokens for another channel or another user, and a refresh with another user's token."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest
import socketio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ferrocast_e2e.jwks import JwksServer

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
AUD, ISS = "ferrocast-e2e", "https://app.example"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str = "42", key=KEY, kid: str = "k1", **overrides) -> str:
    now = int(time.time())
    claims = {"sub": sub, "aud": AUD, "iss": ISS, "iat": now, "exp": now + 600, **overrides}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def attacks() -> dict[str, tuple[str, str, str, int]]:
    """name -> (token, error code, words of the message, close code)."""
    now = int(time.time())
    good = token()
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    confusion_head = b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    confusion_sig = hmac.new(PUBLIC_PEM, f"{confusion_head}.{body}".encode(), hashlib.sha256).digest()
    none_head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    tampered = b64(json.dumps({**claims, "sub": "1"}).encode())
    return {
        "alg none": (f"{none_head}.{body}.", "unauthorized", '"none"', 4001),
        "algorithm confusion": (f"{confusion_head}.{body}.{b64(confusion_sig)}", "unauthorized", '"HS256"', 4001),
        "expired": (token(exp=now - 3600), "token_expired", '"exp"', 4011),
        "nbf in the future": (token(nbf=now + 3600), "unauthorized", '"nbf"', 4001),
        "wrong aud": (token(aud="someone-else"), "unauthorized", '"aud"', 4001),
        "wrong iss": (token(iss="https://evil.example"), "unauthorized", '"iss"', 4001),
        "unknown kid": (token(key=ATTACKER, kid="evil"), "unauthorized", '"evil"', 4001),
        "tampered payload": (f"{head}.{tampered}.{sig}", "unauthorized", "signature", 4001),
    }


@pytest.fixture
def server(start_server):
    keys = JwksServer()
    jwk = RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    keys.keys = [{**jwk, "kid": "k1"}]
    srv = start_server(
        f"auth.jwks_url={keys.url}",
        f"auth.audience={AUD}",
        f"auth.issuer={ISS}",
        "auth.leeway_ms=1000",
        "namespaces.payments.subscribe=authenticated",
        "namespaces.payments.snapshot=latest",
        "namespaces.secure.subscribe=token",
    )
    yield srv
    keys.stop()


class Canary:
    def __init__(self, server, client) -> None:
        self.server, self.client, self.n = server, client, 0

    async def check(self) -> None:
        self.n += 1
        await self.server.apublish("canary.watch", {"n": self.n})
        assert (await self.client.next_msg("canary.watch"))["data"] == {"n": self.n}


async def canary(server, ws) -> Canary:
    c = await ws(server)
    await c.subscribe_ok("canary.watch")
    return Canary(server, c)


async def sse_events(http: httpx.AsyncClient, params: dict, count: int, linger: float = 0.3) -> tuple[int, list[dict]]:
    """The first `count` events, and whatever else comes within `linger` seconds after them
    (to catch what should not come)."""
    events: list[dict] = []
    async with http.stream("GET", "/sse", params=params) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.json()]

        async def read() -> None:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + 5
        while len(events) < count and time.monotonic() < deadline and not reader.done():
            await asyncio.sleep(0.02)
        await asyncio.sleep(linger)
        reader.cancel()
    return 200, events


async def test_every_attack_on_every_transport(server, ws):
    watch = await canary(server, ws)
    cases = attacks()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        for name, (bad, code, words, close) in cases.items():
            # Native: the error, then the close code.
            c = await ws(server, additional_headers={"Authorization": f"Bearer {bad}"})
            closed = await c.wait_closed()
            assert closed.code == close, (name, closed)
            err = closed.frames[0]
            assert err["type"] == "error" and err["code"] == code and words in err["message"], (name, err)
            # SSE: a 401 that says why (EventSource does not retry a non-200 answer).
            r = await http.get("/sse", params={"channels": "payments.eu#42", "token": bad})
            assert r.status_code == 401, (name, r.text)
            assert r.json()["error"] == code and words in r.json()["message"], (name, r.text)
            # Socket.IO: a CONNECT_ERROR carrying the reason and the close code.
            sio = socketio.AsyncClient(reconnection=False)
            errors: asyncio.Queue = asyncio.Queue()
            sio.on("connect_error", errors.put_nowait)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await sio.connect(server.base_url, auth={"token": bad}, transports=["websocket"], wait_timeout=5)
            message = (await asyncio.wait_for(errors.get(), 5))["message"]
            assert message.startswith(f"{code}: ") and words in message and message.endswith(f"({close})"), (name, message)
            await watch.check()
    log = server.log()
    for bad, *_ in cases.values():
        signature = bad.split(".")[2]
        assert bad not in log and (not signature or signature not in log), "a token was logged"
    for reason in ("algorithm", "expired", "not_yet_valid", "audience", "issuer", "unknown_kid", "signature"):
        assert server.metric("ferrocast_auth_refused_total", reason=reason) >= 3, reason


async def test_another_users_channel_over_sse_and_socketio(server, ws):
    watch = await canary(server, ws)
    first = await server.apublish("payments.eu#43", {"secret": 1})
    await server.apublish("payments.eu#43", {"secret": 2})
    recover = f"payments.eu#43={first['epoch']}:0"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        # Subscribe (the namespace sends a `latest` snapshot) and recover from offset 0.
        for params in ({"channels": "payments.eu#43"}, {"lastEventId": recover}):
            status, events = await sse_events(http, {**params, "token": token("42")}, 2)
            assert status == 200, events
            ack = events[1]
            assert ack["result"]["payments.eu#43"]["error"]["code"] == "forbidden", ack
            assert len(events) == 2 and "secret" not in json.dumps(events), events
        status, events = await sse_events(http, {"channels": "payments.eu#43", "token": token("43")}, 3)
        assert events[2]["type"] == "msg" and events[2]["data"] == {"secret": 2}, events

    sio = socketio.AsyncClient(reconnection=False)
    messages: list = []
    sio.on("message", messages.append)
    await sio.connect(server.base_url, auth={"token": token("42")}, transports=["websocket"], wait_timeout=5)
    try:
        for request in (
            {"channels": ["payments.eu#43"]},
            {"channels": ["payments.eu#43"], "recover": {"payments.eu#43": {"epoch": first["epoch"], "offset": 0}}},
        ):
            result = await sio.call("subscribe", request, timeout=5)
            assert result["payments.eu#43"]["error"]["code"] == "forbidden", result
        await server.apublish("payments.eu#43", {"secret": 3})
        await asyncio.sleep(0.3)
        assert messages == [], messages
        await watch.check()
    finally:
        await sio.disconnect()


async def test_subscription_tokens_and_refreshes_over_sse_control_and_socketio(server, ws):
    def sub_token(sub: str, channel: str) -> str:
        return token(sub, channel=channel)

    cases = [
        (sub_token("42", "secure.other"), "forbidden", '"channel"'),
        (sub_token("43", "secure.vault"), "forbidden", '"sub"'),
        (sub_token("42", "secure.vault")[:-4] + "AAAA", "unauthorized", "signature"),
    ]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        async with http.stream("GET", "/sse", params={"token": token("42")}) as resp:
            lines = resp.aiter_lines()
            welcome = None
            async for line in lines:
                if line.startswith("data:"):
                    welcome = json.loads(line[5:])
                    break
            assert welcome["type"] == "welcome", welcome

            async def control(frame: dict) -> dict:
                # The stream's secret as a header: an auth frame's `token` is its own.
                body = {"session": welcome["session"], "token": welcome["token"], **frame}
                r = await http.post("/sse/control", json=body, headers={"X-Ferrocast-Stream-Token": welcome["token"]})
                return r.json()

            for bad, code, words in cases:
                reply = await control({"op": "subscribe", "channels": ["secure.vault"], "tokens": {"secure.vault": bad}})
                err = reply["result"]["secure.vault"]["error"]
                assert err["code"] == code and words in err["message"], (words, reply)
            good = {"secure.vault": sub_token("42", "secure.vault")}
            reply = await control({"op": "subscribe", "channels": ["secure.vault"], "tokens": good})
            assert "error" not in reply["result"]["secure.vault"], reply
            # A refresh with another user's token: refused; the stream keeps its user.
            reply = await control({"op": "auth", "token": token("43")})
            assert reply["type"] == "error" and reply["code"] == "forbidden", reply
            reply = await control({"op": "subscribe", "channels": ["payments.eu#43", "payments.eu#42"]})
            assert reply["result"]["payments.eu#43"]["error"]["code"] == "forbidden", reply
            assert "error" not in reply["result"]["payments.eu#42"], reply

    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.base_url, auth={"token": token("42")}, transports=["websocket"], wait_timeout=5)
    try:
        for bad, code, words in cases:
            result = await sio.call("subscribe", {"channels": ["secure.vault"], "tokens": {"secure.vault": bad}}, timeout=5)
            err = result["secure.vault"]["error"]
            assert err["code"] == code and words in err["message"], (words, result)
        result = await sio.call("subscribe", {"channels": ["secure.vault"], "tokens": good}, timeout=5)
        assert "error" not in result["secure.vault"], result
        refused = await sio.call("auth", {"token": token("43")}, timeout=5)
        assert refused["error"]["code"] == "forbidden", refused
        result = await sio.call("subscribe", {"channels": ["payments.eu#43"]}, timeout=5)
        assert result["payments.eu#43"]["error"]["code"] == "forbidden", result
    finally:
        await sio.disconnect()
    assert server.metric("ferrocast_auth_refused_total", reason="other_user") == 2
