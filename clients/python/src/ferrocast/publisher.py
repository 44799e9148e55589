"""HTTP publishers for backends: ``POST /api/publish`` on ``httpx``, blocking and async.

This is what a Flask, Django or FastAPI app calls after a database write: one request per
publish (or per batch) on a kept-alive connection, the API key as a Bearer token, the
server's answer as typed results, and its refusals as :class:`~ferrocast.PublishError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Self

import httpx

from .types import FerrocastError, PublishError, PublishResult

__all__ = ["AsyncPublisher", "BatchItem", "Publisher"]

#: One message of a batch: ``(channel, data)`` or ``{"channel": C, "data": D, "ephemeral": bool}``.
BatchItem = tuple[str, Any] | Mapping[str, Any]


def _publish_url(url: str) -> str:
    base = url.rstrip("/")
    if base.startswith("ws://"):
        base = "http://" + base[len("ws://") :]
    elif base.startswith("wss://"):
        base = "https://" + base[len("wss://") :]
    return base if base.endswith("/api/publish") else base + "/api/publish"


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _one(channel: str, data: Any, ephemeral: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel, "data": data}
    if ephemeral:
        body["ephemeral"] = True
    return body


def _batch(messages: Iterable[BatchItem]) -> dict[str, Any]:
    items = []
    for item in messages:
        if isinstance(item, Mapping):
            if "channel" not in item or "data" not in item:
                raise ValueError(f"ferrocast: a batch item needs 'channel' and 'data': {item!r}")
            items.append(_one(item["channel"], item["data"], bool(item.get("ephemeral"))))
        else:
            channel, data = item
            items.append(_one(channel, data, False))
    return {"messages": items}


def _results(response: httpx.Response, expected: int) -> list[PublishResult]:
    if response.status_code != 200:
        code, message = f"http_{response.status_code}", response.text or response.reason_phrase
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code = body["error"]
            message = str(body.get("message") or message)
        raise PublishError(response.status_code, code, message, response.text)
    try:
        results = [PublishResult.from_json(r) for r in response.json()["results"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(200, "bad_reply", f"unexpected publish answer: {e}", response.text) from e
    if len(results) != expected:
        raise PublishError(200, "bad_reply", f"{len(results)} results for {expected} messages", response.text)
    return results


def _transport_error(url: str, error: httpx.HTTPError) -> FerrocastError:
    return FerrocastError("connection_failed", f"POST {url} failed: {type(error).__name__}: {error}")


class Publisher:
    """Publishes through ``POST /api/publish``, blocking.

    ``url`` is the server's base URL (``http://127.0.0.1:8080``); ``key`` the API key
    (``api.key``), sent as ``Authorization: Bearer``. Pass ``client`` to reuse an
    ``httpx.Client`` (it is then not closed by :meth:`close`). Errors:
    :class:`PublishError` for a refusal (``status``, ``code``, ``message``),
    :class:`FerrocastError` ``connection_failed`` when the server could not be reached.
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = _publish_url(url)
        self._headers = _headers(key)
        self._own = client is None
        self._http = client if client is not None else httpx.Client(timeout=timeout)

    def publish(self, channel: str, data: Any, *, ephemeral: bool = False) -> PublishResult:
        """Publishes one message; returns its channel, offset and epoch."""
        return self._post(_one(channel, data, ephemeral), 1)[0]

    def publish_batch(self, messages: Iterable[BatchItem]) -> list[PublishResult]:
        """Publishes several messages in one request, in order. The server checks every
        channel first, so a refused batch publishes nothing."""
        body = _batch(messages)
        return self._post(body, len(body["messages"]))

    def _post(self, body: dict[str, Any], expected: int) -> list[PublishResult]:
        try:
            response = self._http.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as e:
            raise _transport_error(self.url, e) from e
        return _results(response, expected)

    def close(self) -> None:
        """Closes the HTTP connection pool (unless it was passed in)."""
        if self._own:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """:class:`Publisher` for asyncio apps (FastAPI, aiohttp...): the same API, awaited."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = _publish_url(url)
        self._headers = _headers(key)
        self._own = client is None
        self._http = client if client is not None else httpx.AsyncClient(timeout=timeout)

    async def publish(self, channel: str, data: Any, *, ephemeral: bool = False) -> PublishResult:
        """Publishes one message; returns its channel, offset and epoch."""
        return (await self._post(_one(channel, data, ephemeral), 1))[0]

    async def publish_batch(self, messages: Iterable[BatchItem]) -> list[PublishResult]:
        """Publishes several messages in one request, in order (all or nothing)."""
        body = _batch(messages)
        return await self._post(body, len(body["messages"]))

    async def _post(self, body: dict[str, Any], expected: int) -> list[PublishResult]:
        try:
            response = await self._http.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as e:
            raise _transport_error(self.url, e) from e
        return _results(response, expected)

    async def aclose(self) -> None:
        """Closes the HTTP connection pool (unless it was passed in)."""
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
