"""Async client for ferrocast's native WebSocket protocol (``/ws``), built on ``websockets``.

It mirrors the browser client (clients/js/ferrocast.js): shared channel subscriptions whose
positions (epoch and offset) survive reconnects and are sent back in ``recover``, gaps
reported as events, full-jitter exponential backoff, the server's 1001 drain hint honoured,
terminal close codes that stop reconnecting, heartbeat answers and a liveness timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random as _random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed

from .types import (
    DEFAULT_BACKOFF,
    TERMINAL_CLOSE_CODES,
    TOKEN_EXPIRED_CLOSE_CODE,
    Backoff,
    ErrorEvent,
    FerrocastError,
    Gap,
    Message,
    PublishResult,
    Stats,
    backoff_delay,
)

try:  # websockets >= 13: the asyncio implementation
    from websockets.asyncio.client import connect as _ws_connect

    _HEADERS_ARG = "additional_headers"
except ImportError:  # websockets 12: the legacy implementation
    from websockets.legacy.client import connect as _ws_connect  # type: ignore[assignment,no-redef,unused-ignore]

    _HEADERS_ARG = "extra_headers"

__all__ = ["Client", "Subscription", "resolve_ws_url"]

# A name, and for a user channel (`payments.eu#42,43`) the users it belongs to.
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]+(#[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*)?")
_DEFAULT_PING_INTERVAL = 25.0
_log = logging.getLogger("ferrocast")

#: A message listener: ``callback(message)``; it may return an awaitable, which is run as a task.
MessageCallback = Callable[[Message], Any]


def resolve_ws_url(url: str, ws_path: str = "/ws", params: Mapping[str, str] | None = None) -> str:
    """The WebSocket URL for a base URL.

    ``http(s)://host[/prefix]`` becomes ``ws(s)://host[/prefix]/ws`` (``ws_path``). A
    ``ws(s)://`` URL with a path is used as it is (it already names the endpoint); one
    without a path gets ``ws_path``. ``params`` are added as the query string.
    """
    parts = urlsplit(url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"ferrocast: expected an http(s):// or ws(s):// URL, got {url!r}")
    path = parts.path.rstrip("/")
    if parts.scheme.lower() in ("http", "https") or not path:
        path = path + ws_path
    query = urlencode(dict(params)) if params else parts.query
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def _validate_channel(channel: str) -> None:
    if not isinstance(channel, str) or len(channel) > 255 or not _CHANNEL_RE.fullmatch(channel):
        raise ValueError(f"ferrocast: invalid channel name {channel!r}")


def _close_info(exc: ConnectionClosed) -> tuple[int, str]:
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is None:
        return 1006, ""  # no close frame: the connection was lost
    return int(rcvd.code), str(rcvd.reason or "")


def _reconnect_hint(reason: str) -> dict[str, Any] | None:
    try:
        hint = json.loads(reason) if reason else None
    except ValueError:
        return None
    return hint if isinstance(hint, dict) else None


class Subscription:
    """One listener on a channel, returned by :meth:`Client.subscribe`.

    Without a callback it buffers messages for ``await sub.get()`` or ``async for msg in
    sub`` (iteration ends when the subscription is dropped or the client stops). Listeners
    of one channel share one server subscription; the last :meth:`unsubscribe` ends it.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        callback: MessageCallback | None,
        max_buffer: int,
    ) -> None:
        self.channel = channel
        self._client = client
        self._callback = callback
        self._max_buffer = max(1, max_buffer)
        self._buffer: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._ready = asyncio.Event()
        self._result: dict[str, Any] | None = None
        self._error: FerrocastError | None = None
        self._ended = False
        self.active = True

    # ---- called by the client ----

    def _deliver(self, message: Message) -> None:
        if self._callback is not None:
            self._client._run_callback(self._callback, message, f"listener for {self.channel}")
            return
        self._buffer.append(message)
        if len(self._buffer) > self._max_buffer:
            self._buffer.popleft()
            self._client._gap(Gap(self.channel, "overflow"))
        self._arrived.set()

    def _on_result(self, result: dict[str, Any]) -> None:
        self._result = result
        self._error = None
        self._ready.set()

    def _on_error(self, error: FerrocastError) -> None:
        if self._result is None:
            self._error = error
            self._ready.set()

    def _end(self) -> None:
        self._ended = True
        self._arrived.set()

    def _resume(self) -> None:
        self._ended = not self.active

    # ---- public ----

    @property
    def result(self) -> dict[str, Any] | None:
        """The latest subscribe result for this channel (``epoch``, ``offset``, and after a
        reconnect ``recovered``, ``replayed``), or ``None`` before the first ack."""
        return self._result

    async def ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Waits until the server has acknowledged the channel; returns its result.

        Raises :class:`FerrocastError` with the server's code when the channel was refused
        (``invalid_channel``, ``limit_exceeded``, ...), :class:`TimeoutError` on timeout.
        """
        async with asyncio.timeout(timeout):
            await self._ready.wait()
        if self._result is not None:
            return self._result
        assert self._error is not None
        raise self._error

    async def get(self, timeout: float | None = None) -> Message:
        """The next buffered message. Raises :class:`TimeoutError` after ``timeout``
        seconds, and :class:`FerrocastError` (``closed``) once the subscription has ended
        and the buffer is empty."""
        if self._callback is not None:
            raise TypeError("ferrocast: this subscription delivers to its callback")
        async with asyncio.timeout(timeout):
            while not self._buffer:
                if self._ended:
                    raise FerrocastError("closed", f"subscription to {self.channel} ended")
                self._arrived.clear()
                await self._arrived.wait()
        return self._buffer.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except FerrocastError as e:
            if e.code == "closed":
                raise StopAsyncIteration from None
            raise

    def unsubscribe(self) -> None:
        """Removes this listener (idempotent); the last one of a channel unsubscribes on the
        server. Buffered messages can still be read; iteration then ends."""
        if not self.active:
            return
        self.active = False
        self._client._remove(self)
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.unsubscribe()


class _Channel:
    """What the client knows about one channel it listens to."""

    __slots__ = ("ack_offset", "epoch", "last", "recovering", "result", "subs")

    def __init__(self) -> None:
        self.subs: dict[Subscription, None] = {}
        self.epoch: str | None = None
        self.last: int | None = None
        self.ack_offset: int | None = None
        self.recovering = False
        self.result: dict[str, Any] | None = None

    def position(self) -> dict[str, Any] | None:
        offset = self.last if self.last is not None else self.ack_offset
        if self.epoch is None or offset is None:
            return None
        return {"epoch": self.epoch, "offset": offset}


class _Pending:
    __slots__ = ("channels", "future", "kind", "sent_at", "timer")

    def __init__(self, kind: str, future: asyncio.Future[Any] | None, channels: list[str]) -> None:
        self.kind = kind
        self.future = future
        self.channels = channels
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = time.monotonic()


class Client:
    """The ferrocast native-protocol client.

    ``url`` is the server's base URL (``http://host:8080``) or its WebSocket URL
    (``ws://host:8080/ws``). Times are in seconds. Use it as ``async with Client(url) as
    client:`` or call :meth:`connect` and :meth:`close`. Every method must be called from
    the event loop the client was connected on (see :class:`ferrocast.SyncClient` for
    threads).

    Options: ``token`` (a connection token, sent in an ``auth`` op right after the welcome,
    before any subscribe) or ``get_token`` (a function, sync or async, returning one: called
    at every connect, again ``token_refresh_margin`` seconds before the token's expiry, and
    after close code 4011; a fixed ``token`` that expires ends the client, as 4001 and 4003
    always do), ``ws_path`` (for http URLs), ``params`` (query string),
    ``headers`` (extra handshake headers), ``origin``, ``backoff`` (:class:`Backoff`),
    ``handshake_timeout`` (connect until the server's welcome), ``ping_grace`` (silence
    tolerated beyond the server's ``ping_interval_ms`` before the connection is replaced),
    ``request_timeout`` (publish, ping), ``max_queue`` (publishes kept while disconnected),
    ``max_buffer`` (messages buffered per subscription without a callback; the oldest is
    dropped with a ``gap`` event), ``max_frame_bytes``, ``close_timeout``, ``random``
    (jitter source), ``logger``.
    """

    def __init__(
        self,
        url: str,
        *,
        ws_path: str = "/ws",
        token: str | None = None,
        get_token: Callable[[], str | Awaitable[str]] | None = None,
        token_refresh_margin: float = 30.0,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        handshake_timeout: float = 10.0,
        ping_grace: float = 10.0,
        request_timeout: float = 10.0,
        max_queue: int = 1000,
        max_buffer: int = 10_000,
        max_frame_bytes: int = 16 * 1024 * 1024,
        close_timeout: float = 2.0,
        random: Callable[[], float] = _random.random,
        logger: logging.Logger | None = None,
    ) -> None:
        self.url = resolve_ws_url(url, ws_path, params)
        self._token = token
        self._get_token = get_token
        self._token_refresh_margin = token_refresh_margin
        self._refresh: asyncio.TimerHandle | None = None
        self._headers = dict(headers or {})
        self._origin = origin
        self._backoff = backoff
        self._handshake_timeout = handshake_timeout
        self._ping_grace = ping_grace
        self._request_timeout = request_timeout
        self._max_queue = max_queue
        self._max_buffer = max_buffer
        self._max_frame_bytes = max_frame_bytes
        self._close_timeout = close_timeout
        self._random = random
        self._log = logger or _log

        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "disconnected"
        self._detail: dict[str, Any] = {}
        self._state_changed = asyncio.Event()
        self._stopped = True
        self._retry_now = False
        self._wake = asyncio.Event()
        self._attempt = 0
        self._ws: Any = None
        self._welcome: dict[str, Any] | None = None
        self._outbox: asyncio.Queue[str] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._ping_interval = _DEFAULT_PING_INTERVAL

        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[tuple[dict[str, Any], asyncio.Future[Any]]] = deque()
        self._channels: dict[str, _Channel] = {}
        self._server_subs: set[str] = set()
        self._reconcile_queued = False
        self._events: dict[str, list[Callable[..., Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counters = {"messages": 0, "duplicates": 0, "gaps": 0, "reconnects": 0, "dropped": 0}
        self._rtt: float | None = None

    # ---- properties ----

    @property
    def state(self) -> str:
        """``connecting``, ``connected``, ``reconnecting`` or ``disconnected``."""
        return self._state

    @property
    def state_detail(self) -> dict[str, Any]:
        """The detail of the last state change (for ``disconnected``: ``code``, ``reason``)."""
        return self._detail

    @property
    def session(self) -> str | None:
        """The session id from the server's welcome, ``None`` while not connected."""
        return None if self._welcome is None else self._welcome.get("session")

    @property
    def rtt(self) -> float | None:
        """The last round-trip time measured by :meth:`ping`, in seconds."""
        return self._rtt

    @property
    def websocket(self) -> Any:
        """The current ``websockets`` connection, or ``None``: for diagnostics and tests."""
        return self._ws

    def stats(self) -> Stats:
        """Sizes of the client's collections and its counters."""
        return Stats(
            state=self._state,
            session=self.session,
            channels=len(self._channels),
            subscriptions=sum(len(c.subs) for c in self._channels.values()),
            server_subscriptions=len(self._server_subs),
            pending_requests=len(self._pending),
            queued=len(self._queue),
            rtt=self._rtt,
            **self._counters,
        )

    # ---- lifecycle ----

    async def connect(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Starts connecting (a no-op while running). With ``wait``, returns once connected;
        raises :class:`FerrocastError` (``closed``, with ``close_code``) if the client stops
        first (a terminal close code), or :class:`TimeoutError`."""
        if self._stopped:
            self._start()
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Waits until the state is ``connected``; raises :class:`FerrocastError`
        (``closed``) if the client stops instead, :class:`TimeoutError` on timeout."""
        async with asyncio.timeout(timeout):
            while self._state != "connected":
                if self._stopped:
                    raise FerrocastError(
                        "closed",
                        f"client disconnected: {self._detail.get('reason') or 'closed'}",
                        close_code=self._detail.get("code"),
                    )
                event = self._state_changed
                await event.wait()

    def retry(self) -> None:
        """Reconnects now: drops the current connection and resets the backoff. Also
        restarts a client that stopped on a terminal close code."""
        if self._stopped:
            self._start()
            return
        self._retry_now = True
        self._wake.set()
        if self._ws is not None:
            self._spawn(self._ws.close(1000, "client retry"))

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._attempt = 0
        for entry in self._channels.values():
            for sub in entry.subs:
                sub._resume()
        self._set_state("connecting", {})
        self._task = self._loop.create_task(self._run(), name="ferrocast-client")

    async def close(self) -> None:
        """Closes with code 1000 and stops reconnecting. Pending and queued publishes fail
        with ``closed``; subscriptions stay registered for a later :meth:`connect`."""
        if self._stopped and self._state == "disconnected":
            return
        self._stopped = True
        self._wake.set()
        ws = self._ws
        task = self._task
        if ws is not None:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await ws.close(1000, "client closed")
            except Exception:  # noqa: BLE001 - a dead peer: drop the transport
                ws.transport.abort()
        if task is not None and task is not asyncio.current_task():
            # Connected: the session ends with the close handshake. Otherwise (connecting or
            # waiting to reconnect) nothing is lost by cancelling at once.
            done, _ = await asyncio.wait({task}, timeout=self._close_timeout if ws is not None else 0)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._halt(1000, "client closed")

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- events ----

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[[], None]:
        """Adds a listener; returns a function that removes it.

        Events: ``state`` ``(state, detail)``; each state by name (``connecting``,
        ``connected``, ``reconnecting``, ``disconnected``) ``(detail)``; ``gap``
        ``(Gap)``; ``error`` ``(ErrorEvent)``; ``subscribed`` ``(channel, result)`` after
        each subscribe ack; ``unsubscribed`` ``(channel, reason)`` when the server ends a
        subscription. A listener may be a coroutine function; it then runs as a task.
        """
        if not callable(callback):
            raise TypeError("ferrocast: listener must be callable")
        self._events.setdefault(event, []).append(callback)
        return lambda: self.off(event, callback)

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        """Removes a listener added with :meth:`on`."""
        listeners = self._events.get(event)
        if listeners and callback in listeners:
            listeners.remove(callback)
            if not listeners:
                del self._events[event]

    # ---- subscriptions and requests ----

    def subscribe(
        self,
        channel: str,
        callback: MessageCallback | None = None,
        *,
        max_buffer: int | None = None,
    ) -> Subscription:
        """Listens to ``channel``: ``callback(message)`` for each :class:`Message`, or
        without a callback a buffered :class:`Subscription` to iterate. The server
        subscription is made at once when connected (subscribes of the same loop turn go
        out in one frame), else after the next welcome."""
        _validate_channel(channel)
        entry = self._channels.get(channel)
        if entry is None:
            entry = _Channel()
            self._channels[channel] = entry
            self._schedule_reconcile()
        sub = Subscription(self, channel, callback, max_buffer or self._max_buffer)
        entry.subs[sub] = None
        if entry.result is not None and channel in self._server_subs:
            sub._on_result(entry.result)
        return sub

    async def publish(self, channel: str, data: Any, *, timeout: float | None = None) -> PublishResult:
        """Publishes ``data`` on ``channel`` over the socket (where the namespace allows
        client publishing); returns the server's :class:`PublishResult`. While the client
        reconnects the publish waits in a bounded queue. Raises :class:`FerrocastError`:
        the server's code (``forbidden``, ...), ``timeout``, ``dropped``,
        ``connection_lost`` or ``closed``."""
        _validate_channel(channel)
        json.dumps(data)  # fail here, in the caller, on data that is not JSON
        frame = {"op": "publish", "channel": channel, "data": data}
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        if self._welcome is not None:
            self._request(frame, "publish", future)
        elif self._stopped:
            raise FerrocastError("closed", "client is not connected")
        else:
            self._queue.append((frame, future))
            if len(self._queue) > self._max_queue:
                self._counters["dropped"] += 1
                _, oldest = self._queue.popleft()
                if not oldest.done():
                    oldest.set_exception(
                        FerrocastError("dropped", "outgoing queue full: oldest publish dropped")
                    )
        async with asyncio.timeout(timeout):
            return await future

    async def ping(self, timeout: float | None = None) -> float:
        """Sends ``{"op":"ping"}`` and returns the round-trip time in seconds."""
        if self._welcome is None:
            raise FerrocastError("closed", "client is not connected")
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._request({"op": "ping"}, "ping", future)
        async with asyncio.timeout(timeout):
            return await future

    # ---- internals: connection lifecycle ----

    async def _run(self) -> None:
        while not self._stopped:
            code, reason, welcomed = await self._session()
            if self._stopped:
                return
            if self._retry_now:
                self._retry_now = False
                self._attempt = 0
                self._set_state("connecting", {})
                continue
            if welcomed:
                self._counters["reconnects"] += 1
            self._log.info("ferrocast: connection ended (code %s, reason %r)", code, reason)
            if code in TERMINAL_CLOSE_CODES:
                self._halt(code, reason or "terminated by server")
                return
            if code == TOKEN_EXPIRED_CLOSE_CODE and self._get_token is None:
                # A fixed token would only expire again: stop, as the JS client does.
                self._halt(code, reason or "token expired")
                return
            hint = _reconnect_hint(reason) if code == 1001 else None
            if hint is not None and hint.get("reconnect") is False:
                self._halt(code, reason)
                return
            after_ms = hint.get("after_ms") if hint is not None else None
            if isinstance(after_ms, (int, float)) and not isinstance(after_ms, bool):
                delay = max(0.0, after_ms / 1000) + backoff_delay(0, self._backoff, self._random)
            else:
                delay = backoff_delay(self._attempt, self._backoff, self._random)
                self._attempt += 1
            self._set_state(
                "reconnecting",
                {"attempt": self._attempt, "delay": delay, "code": code, "reason": reason},
            )
            self._wake = asyncio.Event()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._retry_now:
                self._retry_now = False
                self._attempt = 0

    async def _session(self) -> tuple[int | None, str, bool]:
        """One connection, from connect to its end: (close code, reason, welcomed)."""
        kwargs: dict[str, Any] = {
            "ping_interval": None,  # ferrocast's own heartbeat and our liveness check instead
            "max_size": self._max_frame_bytes,
            "open_timeout": None,
            "close_timeout": self._close_timeout,
        }
        if self._origin is not None:
            kwargs["origin"] = self._origin
        if self._headers:
            kwargs[_HEADERS_ARG] = self._headers
        ws: Any = None
        try:
            async with asyncio.timeout(self._handshake_timeout):
                if self._get_token is not None:
                    self._token = await self._call_get_token()
                ws = await _ws_connect(self.url, **kwargs)
                rest: list[dict[str, Any]] = []
                welcome: dict[str, Any] | None = None
                while welcome is None:
                    frames = self._parse(await ws.recv())
                    for i, frame in enumerate(frames):
                        if frame.get("type") == "welcome":
                            welcome, rest = frame, frames[i + 1 :]
                            break
                        self._log.warning("ferrocast: ignoring a frame before the welcome: %s", frame)
        except ConnectionClosed as e:
            code, reason = _close_info(e)
            return code, reason, False
        except asyncio.CancelledError:  # close() while connecting
            if ws is not None:
                ws.transport.abort()
            raise
        except Exception as e:  # noqa: BLE001 - any failure to connect is retried
            if ws is not None:
                ws.transport.abort()
            if isinstance(e, TimeoutError):
                return None, "handshake timeout", False
            return None, f"{type(e).__name__}: {e}", False
        if self._stopped:
            await ws.close(1000, "client closed")
            return 1000, "client closed", False
        self._on_welcome(ws, welcome)
        try:
            for frame in rest:
                self._on_frame(frame)
            return await self._read(ws)
        finally:
            if self._stopped:
                self._teardown(FerrocastError("closed", "client closed"))
            else:
                self._teardown(FerrocastError("connection_lost", "connection lost"))

    async def _read(self, ws: Any) -> tuple[int | None, str, bool]:
        limit = self._ping_interval + self._ping_grace
        while True:
            try:
                async with asyncio.timeout(limit):
                    raw = await ws.recv()
            except TimeoutError:
                self._log.warning("ferrocast: nothing received for %.1f s, reconnecting", limit)
                ws.transport.abort()
                return None, "heartbeat timeout", True
            except ConnectionClosed as e:
                code, reason = _close_info(e)
                return code, reason, True
            for frame in self._parse(raw):
                if self._ws is not ws:
                    break
                self._on_frame(frame)

    def _on_welcome(self, ws: Any, welcome: dict[str, Any]) -> None:
        self._ws = ws
        self._welcome = welcome
        self._attempt = 0
        self._retry_now = False
        interval = welcome.get("ping_interval_ms")
        self._ping_interval = (
            interval / 1000 if isinstance(interval, (int, float)) and interval > 0 else _DEFAULT_PING_INTERVAL
        )
        self._outbox = asyncio.Queue()
        self._writer = self._spawn(self._write(ws, self._outbox))
        # The token goes first, so the server knows the user before any subscribe.
        if self._token:
            self._request({"op": "auth", "token": self._token}, "auth")
        self._reconcile()
        while self._queue:
            frame, future = self._queue.popleft()
            if not future.done():
                self._request(frame, "publish", future)
        self._set_state("connected", {"session": welcome.get("session")})

    async def _write(self, ws: Any, outbox: asyncio.Queue[str]) -> None:
        try:
            while True:
                await ws.send(await outbox.get())
        except ConnectionClosed:
            pass

    async def _call_get_token(self) -> str | None:
        assert self._get_token is not None
        token = self._get_token()
        if inspect.isawaitable(token):
            token = await token
        return token

    def _schedule_refresh(self, expires_at: Any) -> None:
        """With ``get_token``, sends a fresh token ``token_refresh_margin`` before
        ``expires_at`` (seconds since the epoch)."""
        if self._get_token is None or not isinstance(expires_at, (int, float)) or self._loop is None:
            return
        if self._refresh is not None:
            self._refresh.cancel()
        lifetime = expires_at - time.time()
        delay = max(0.0, lifetime - min(self._token_refresh_margin, lifetime / 2))
        ws = self._ws

        async def refresh() -> None:
            try:
                token = await self._call_get_token()
            except Exception as e:  # noqa: BLE001 - reported, the connection goes on
                self._emit("error", ErrorEvent("token_error", f"get_token() failed: {e}", None, ()))
                return
            if token and self._ws is ws and self._welcome is not None:
                self._token = token
                self._request({"op": "auth", "token": token}, "auth")

        self._refresh = self._loop.call_later(delay, lambda: self._spawn(refresh()))

    def _teardown(self, err: FerrocastError) -> None:
        """Forgets the connection and what the server knew about this client; pending
        requests fail with ``err`` (queued publishes keep waiting)."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._outbox = None
        self._ws = None
        self._welcome = None
        self._server_subs.clear()
        for entry in self._channels.values():
            entry.recovering = False
        pending, self._pending = self._pending, {}
        for req in pending.values():
            if req.timer is not None:
                req.timer.cancel()
            if req.future is not None and not req.future.done():
                req.future.set_exception(err)

    def _halt(self, code: int | None, reason: str) -> None:
        self._stopped = True
        err = FerrocastError("closed", f"disconnected: {reason}", close_code=code)
        self._teardown(err)
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(err)
        for entry in self._channels.values():
            for sub in entry.subs:
                sub._end()
        self._set_state("disconnected", {"code": code, "reason": reason})

    def _set_state(self, state: str, detail: dict[str, Any]) -> None:
        self._state = state
        self._detail = detail
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
        self._emit(state, detail)
        self._emit("state", state, detail)

    # ---- internals: frames ----

    def _parse(self, raw: str | bytes) -> list[dict[str, Any]]:
        text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
        try:
            parsed = json.loads(text)
        except ValueError:
            self._log.warning("ferrocast: ignoring a frame that is not JSON")
            return []
        frames = parsed if isinstance(parsed, list) else [parsed]
        return [f for f in frames if isinstance(f, dict)]

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "msg":
            self._on_message(frame)
        elif kind == "ping":
            self._send({"op": "pong"})
        elif kind in ("ack", "error", "pong"):
            self._on_reply(frame)
        elif kind == "unsubscribed":
            self._emit("unsubscribed", frame.get("channel"), frame.get("reason"))
        else:
            self._log.debug("ferrocast: ignoring frame %s", frame)

    def _on_reply(self, frame: dict[str, Any]) -> None:
        frame_id = frame.get("id")
        req = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
        if req is not None and req.timer is not None:
            req.timer.cancel()
        err = None
        if frame.get("type") == "error":
            err = FerrocastError(
                str(frame.get("code") or "error"), str(frame.get("message") or "server error")
            )
        if req is not None and req.kind == "auth":
            if err is not None:
                self._emit("error", ErrorEvent(err.code, err.message, frame_id, ()))
            else:
                self._schedule_refresh((frame.get("result") or {}).get("expires_at"))
            return
        if req is not None and req.kind in ("publish", "ping"):
            future = req.future
            if future is None or future.done():
                return
            if err is not None:
                future.set_exception(err)
            elif req.kind == "ping":
                self._rtt = time.monotonic() - req.sent_at
                future.set_result(self._rtt)
            else:
                try:
                    future.set_result(PublishResult.from_json(frame.get("result") or frame))
                except (KeyError, TypeError, ValueError) as e:
                    future.set_exception(FerrocastError("bad_reply", f"unexpected publish ack {frame}: {e}"))
            return
        if err is not None:
            channels = tuple(req.channels) if req is not None else ()
            self._emit("error", ErrorEvent(err.code, err.message, frame_id, channels))
            for channel in channels:
                entry = self._channels.get(channel)
                for sub in entry.subs if entry is not None else ():
                    sub._on_error(err)
        elif isinstance(frame.get("result"), dict):
            # Per-channel results answer a subscribe, even one whose request timed out here.
            for channel, result in frame["result"].items():
                self._apply_subscribe_result(channel, result)
        for channel in req.channels if req is not None else ():
            entry = self._channels.get(channel)
            if entry is not None:
                entry.recovering = False

    def _apply_subscribe_result(self, channel: str, result: Any) -> None:
        entry = self._channels.get(channel)
        if entry is None or not isinstance(result, dict):
            return
        recovering, entry.recovering = entry.recovering, False
        error = result.get("error")
        if error is not None:
            error = error if isinstance(error, dict) else {}
            err = FerrocastError(
                str(error.get("code") or "error"), str(error.get("message") or "subscribe failed")
            )
            self._emit("error", ErrorEvent(err.code, err.message, None, (channel,)))
            for sub in entry.subs:
                sub._on_error(err)
            return
        if recovering and result.get("recovered") is False:
            self._gap(Gap(channel, "not_recovered", epoch=result.get("epoch"), previous_epoch=entry.epoch))
            entry.last = None
        if isinstance(result.get("epoch"), str):
            entry.epoch = result["epoch"]
        if isinstance(result.get("offset"), int):
            entry.ack_offset = result["offset"]
        entry.result = result
        for sub in entry.subs:
            sub._on_result(result)
        self._emit("subscribed", channel, result)

    def _on_message(self, frame: dict[str, Any]) -> None:
        channel = frame.get("channel")
        if not isinstance(channel, str):
            return
        entry = self._channels.get(channel)
        if entry is None:
            return
        offset = frame.get("offset")
        offset = offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        ephemeral = frame.get("ephemeral") is True
        epoch = frame.get("epoch")
        if (
            isinstance(epoch, str)
            and entry.epoch is not None
            and epoch != entry.epoch
            and not entry.recovering
        ):
            # The channel's history was reset under a live subscription: a new sequence starts.
            self._gap(Gap(channel, "epoch", epoch=epoch, previous_epoch=entry.epoch))
            entry.epoch = epoch
            entry.last = None
        if not ephemeral and offset is not None:
            if entry.recovering or entry.last is None:
                entry.last = offset
            elif offset <= entry.last:
                self._counters["duplicates"] += 1
                return
            else:
                if offset != entry.last + 1:
                    self._gap(Gap(channel, "offset", expected=entry.last + 1, received=offset))
                entry.last = offset
        self._counters["messages"] += 1
        message = Message(
            channel=channel,
            data=frame.get("data"),
            offset=offset,
            epoch=epoch if isinstance(epoch, str) else entry.epoch,
            ephemeral=ephemeral,
        )
        for sub in list(entry.subs):
            sub._deliver(message)

    def _gap(self, gap: Gap) -> None:
        self._counters["gaps"] += 1
        self._emit("gap", gap)

    # ---- internals: subscriptions and requests ----

    def _remove(self, sub: Subscription) -> None:
        entry = self._channels.get(sub.channel)
        if entry is None or sub not in entry.subs:
            return
        del entry.subs[sub]
        if not entry.subs:
            del self._channels[sub.channel]
            self._schedule_reconcile()

    def _schedule_reconcile(self) -> None:
        if self._reconcile_queued or self._loop is None or self._welcome is None:
            return
        self._reconcile_queued = True
        self._loop.call_soon(self._reconcile)

    def _reconcile(self) -> None:
        """Brings the server's subscriptions in line with the channels that have listeners."""
        self._reconcile_queued = False
        if self._welcome is None:
            return
        stale = [c for c in self._server_subs if c not in self._channels]
        if stale:
            self._server_subs.difference_update(stale)
            self._request({"op": "unsubscribe", "channels": stale}, "unsubscribe", None, stale)
        wanted = [c for c in self._channels if c not in self._server_subs]
        if not wanted:
            return
        recover: dict[str, Any] = {}
        for channel in wanted:
            self._server_subs.add(channel)
            entry = self._channels[channel]
            position = entry.position()
            if position is not None:
                recover[channel] = position
                entry.recovering = True
        frame: dict[str, Any] = {"op": "subscribe", "channels": wanted}
        if recover:
            frame["recover"] = recover
        self._request(frame, "subscribe", None, wanted)

    def _request(
        self,
        frame: dict[str, Any],
        kind: str,
        future: asyncio.Future[Any] | None = None,
        channels: list[str] | None = None,
    ) -> None:
        request_id = self._next_id
        self._next_id += 1
        req = _Pending(kind, future, channels or [])
        assert self._loop is not None
        req.timer = self._loop.call_later(self._request_timeout, self._on_timeout, request_id)
        self._pending[request_id] = req
        self._send({**frame, "id": request_id})

    def _on_timeout(self, request_id: int) -> None:
        req = self._pending.pop(request_id, None)
        if req is None:
            return
        if req.future is not None and not req.future.done():
            req.future.set_exception(
                FerrocastError("timeout", f"no reply to {req.kind} within {self._request_timeout} s")
            )
        else:
            self._log.warning("ferrocast: no reply to %s %d", req.kind, request_id)

    def _send(self, frame: dict[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(json.dumps(frame, separators=(",", ":")))

    # ---- internals: callbacks ----

    def _spawn(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _run_callback(self, callback: Callable[..., Any], arg: Any, what: str) -> None:
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                self._spawn(result)
        except Exception:  # noqa: BLE001 - one listener must not break the others
            self._log.exception("ferrocast: %s raised", what)

    def _emit(self, event: str, *args: Any) -> None:
        for listener in list(self._events.get(event, ())):
            try:
                result = listener(*args)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:  # noqa: BLE001 - one listener must not break the others
                self._log.exception("ferrocast: %s listener raised", event)
