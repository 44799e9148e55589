"""Keys from `auth.jwks_url`: a JSON Web Key Set served by a local HTTP server (keys made with
`cryptography`, exported as JWKs by PyJWT), tokens signed by PyJWT naming their key by `kid`.
Every asymmetric algorithm (RS256, PS256, ES256, ES384, EdDSA) verifies by kid; a rotated-in
key is fetched on first sight of its kid; made-up kids cost at most one fetch per
`auth.jwks_min_refresh_ms`; a key removed from the set stops verifying after
`auth.jwks_refresh_ms`; a kid cannot be used to smuggle another algorithm."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ferrocast_e2e.jwks import JwksServer


@pytest.fixture
def jwks():
    server = JwksServer()
    yield server
    server.stop()


def jwk(kid: str, public_key, kind, alg: str | None = None) -> dict:
    key = kind.to_jwk(public_key, as_dict=True)
    key["kid"] = kid
    if alg:
        key["alg"] = alg
    return key


KEYS = {
    "rsa-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), RSAAlgorithm),
    "ec-256": (ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "ec-384": (ec.generate_private_key(ec.SECP384R1()), ECAlgorithm),
    "ed-1": (ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm),
}


def public(kid: str) -> dict:
    private, kind = KEYS[kid]
    return jwk(kid, private.public_key(), kind)


def sign(kid: str, alg: str, sub: str = "42", **claims) -> str:
    private, _ = KEYS[kid]
    payload = {"sub": sub, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, private, algorithm=alg, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def auth(client, token: str) -> dict:
    return await client.request({"op": "auth", "token": token})


async def wait_for_fetch(server, jwks, count: int) -> None:
    deadline = time.monotonic() + 10
    while jwks.fetches < count or server.metric("ferrocast_auth_jwks_fetches_total", result="ok") < count:
        assert time.monotonic() < deadline, f"only {jwks.fetches} fetches"
        time.sleep(0.05)


async def test_every_algorithm_verifies_by_kid(start_server, ws, jwks):
    jwks.keys = [public(kid) for kid in KEYS]
    server = start_server(f"auth.jwks_url={jwks.url}")
    await wait_for_fetch(server, jwks, 1)
    assert server.metric("ferrocast_auth_jwks_keys") == 4
    c = await ws(server)
    for kid, alg in [("rsa-1", "RS256"), ("rsa-1", "PS256"), ("rsa-1", "RS512"), ("ec-256", "ES256"),
                     ("ec-384", "ES384"), ("ed-1", "EdDSA")]:
        ack = await auth(c, sign(kid, alg))
        assert ack["type"] == "ack" and ack["result"]["user"] == "42", (kid, alg, ack)
    # The token travels on every transport, verified the same way.
    header = await ws(server, additional_headers={"Authorization": f"Bearer {sign('ed-1', 'EdDSA', sub='7')}"})
    await header.subscribe_ok("news.x")
    assert server.get("/api/users/7/connections").json()["connections"][0]["user"] == "7"


async def test_rotation_fetches_once_and_made_up_kids_are_rate_limited(start_server, ws, jwks):
    jwks.keys = [public("rsa-1")]
    server = start_server(f"auth.jwks_url={jwks.url}", "auth.jwks_min_refresh_ms=1500")
    await wait_for_fetch(server, jwks, 1)
    c = await ws(server)
    assert (await auth(c, sign("rsa-1", "RS256")))["type"] == "ack"
    time.sleep(1.6)
    # The issuer rotates in a new key: the first token naming it makes the server fetch again.
    jwks.keys = [public("rsa-1"), public("ec-256")]
    ack = await auth(c, sign("ec-256", "ES256"))
    assert ack["type"] == "ack", ack
    assert jwks.fetches == 2
    # A made-up kid right after: refused without another fetch.
    forged = sign("ec-256", "ES256").split(".")
    head = b64(json.dumps({"alg": "ES256", "kid": "made-up"}).encode())
    made_up = f"{head}.{forged[1]}.{forged[2]}"
    for _ in range(20):
        reply = await auth(c, made_up)
        assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
        assert '"made-up"' in reply["message"] and "at most every 1500 ms" in reply["message"], reply
    assert jwks.fetches == 2, "made-up kids must not each fetch the key set"
    time.sleep(1.6)
    reply = await auth(c, made_up)
    assert "even fetched again" in reply["message"], reply
    assert jwks.fetches == 3
    assert server.metric("ferrocast_auth_refused_total", reason="unknown_kid") == 21


async def test_a_kid_cannot_smuggle_another_algorithm(start_server, ws, jwks):
    rsa_private, _ = KEYS["rsa-1"]
    public_pem = rsa_private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwks.keys = [public("rsa-1"), jwk("ps-only", rsa_private.public_key(), RSAAlgorithm, alg="PS256")]
    server = start_server(f"auth.jwks_url={jwks.url}")
    await wait_for_fetch(server, jwks, 1)
    c = await ws(server)
    body = b64(json.dumps({"sub": "1", "exp": int(time.time()) + 600}).encode())
    # HS256 "signed" with the RSA public key, naming the RSA key (algorithm confusion).
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    reply = await auth(c, f"{head}.{body}.{b64(sig)}")
    assert reply["code"] == "unauthorized" and '"HS256" is not one its key "rsa-1" verifies' in reply["message"], reply
    # alg none with a kid.
    head = b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    reply = await auth(c, f"{head}.{body}.")
    assert reply["code"] == "unauthorized" and '"none"' in reply["message"], reply
    # A key published for PS256 only does not verify RS256.
    token = jwt.encode({"sub": "1"}, rsa_private, algorithm="RS256", headers={"kid": "ps-only"})
    reply = await auth(c, token)
    assert reply["code"] == "unauthorized" and "accepted: PS256" in reply["message"], reply
    token = jwt.encode({"sub": "1"}, rsa_private, algorithm="PS256", headers={"kid": "ps-only"})
    assert (await auth(c, token))["type"] == "ack"
    # A token without a kid, with only a key set configured.
    reply = await auth(c, jwt.encode({"sub": "1"}, rsa_private, algorithm="RS256"))
    assert reply["code"] == "unauthorized" and 'no "kid"' in reply["message"], reply


async def test_a_removed_key_stops_verifying_and_an_unreachable_set_keeps_the_keys(start_server, ws, jwks):
    jwks.keys = [public("rsa-1"), public("ed-1")]
    server = start_server(f"auth.jwks_url={jwks.url}", "auth.jwks_refresh_ms=1000", "auth.jwks_min_refresh_ms=60000")
    await wait_for_fetch(server, jwks, 1)
    c = await ws(server)
    assert (await auth(c, sign("ed-1", "EdDSA")))["type"] == "ack"
    jwks.keys = [public("rsa-1")]
    await wait_for_fetch(server, jwks, 3)
    reply = await auth(c, sign("ed-1", "EdDSA"))
    assert reply["code"] == "unauthorized" and '"ed-1"' in reply["message"], reply
    # The key set's server goes away: the keys known stay in use.
    jwks.stop()
    deadline = time.monotonic() + 10
    while not server.metric("ferrocast_auth_jwks_fetches_total", result="error"):
        assert time.monotonic() < deadline, "no failed fetch counted"
        time.sleep(0.1)
    assert (await auth(c, sign("rsa-1", "RS256")))["type"] == "ack"
    assert "fetching auth.jwks_url failed" in server.log()
