"""ferrocast's connect and subscribe proxy in a FastAPI app whose users send an OAuth bearer
token (an `Authorization: Bearer ...` header), not a cookie.

The browser (or a mobile app) connects to ferrocast with the same Authorization header it
sends to this API; ferrocast forwards it (proxy.forward_headers) and this app decides. See
docs/security.md ("The app's own login").

Run it:

    pip install fastapi uvicorn
    uvicorn docs.examples.fastapi_proxy:app --port 8000

and ferrocast next to it:

    ferrocast serve \\
      --set proxy.connect_url=http://127.0.0.1:8000/realtime/connect \\
      --set proxy.subscribe_url=http://127.0.0.1:8000/realtime/subscribe \\
      --set namespaces.orders.subscribe=proxy
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel

# A stand-in for the app's OAuth token introspection.
ACCESS_TOKENS = {"alice-token": "alice", "bob-token": "bob"}
ORDERS = {"alice": {"orders.1001"}, "bob": {"orders.2002"}}

app = FastAPI()


class ProxyCall(BaseModel):
    """What ferrocast sends (fields this app does not use are ignored)."""

    transport: str
    client: str = ""
    user: str | None = None
    channel: str | None = None
    data: Any = None


def current_user(authorization: str | None = Header(default=None)) -> str | None:
    """The same dependency the app's other endpoints use: ferrocast forwards the header."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return ACCESS_TOKENS.get(authorization.split(" ", 1)[1])


@app.post("/realtime/connect")
def realtime_connect(call: ProxyCall, user: str | None = Depends(current_user)) -> dict:
    if user is None:
        return {"error": {"code": "unauthorized", "message": "a valid access token is needed"}}
    return {"result": {"user": user, "info": {"via": call.transport}}}


@app.post("/realtime/subscribe")
def realtime_subscribe(call: ProxyCall, user: str | None = Depends(current_user)) -> dict:
    if user is None or call.channel not in ORDERS.get(user, set()):
        return {"error": {"code": "forbidden", "message": "not your order"}}
    return {"result": {}}
