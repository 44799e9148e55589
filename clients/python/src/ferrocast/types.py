"""Values the ferrocast client hands to applications: messages, publish results, events, errors."""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Connection states, in the order a healthy client usually visits them (the JS client's
#: names, without its SSE-only ``fallback``).
STATES: tuple[str, ...] = ("connecting", "connected", "reconnecting", "disconnected")

#: Close codes after which the client stops instead of reconnecting: origin not allowed,
#: unauthorized, forbidden.
TERMINAL_CLOSE_CODES: frozenset[int] = frozenset({1008, 4001, 4003})
#: The connection's token expired: get a new token, then reconnect.
TOKEN_EXPIRED_CLOSE_CODE = 4011

_MAX_BACKOFF_EXPONENT = 30


class FerrocastError(Exception):
    """An error with the server's (or the client's) machine-readable ``code``.

    ``code`` is a server error code (``forbidden``, ``invalid_channel``, ...) or one of the
    client's own: ``timeout``, ``dropped``, ``connection_lost``, ``closed``. ``close_code``
    is the WebSocket close code when the error comes from a closed connection.
    """

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class PublishError(FerrocastError):
    """``POST /api/publish`` answered an error status.

    ``status`` is the HTTP status; ``code`` and ``message`` come from the server's JSON body
    (``{"error": code, "message": ...}``), or are ``http_<status>`` and the body text when
    something else (a proxy) answered.
    """

    def __init__(self, status: int, code: str, message: str, body: str = "") -> None:
        super().__init__(code, message)
        self.status = status
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Message:
    """One channel message. ``offset`` is ``None`` only when the server sent none;
    ephemeral messages carry the offset of the channel's last retained message."""

    channel: str
    data: Any
    offset: int | None
    epoch: str | None
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a published message landed: its channel, offset and the channel's epoch."""

    channel: str
    offset: int
    epoch: str

    @classmethod
    def from_json(cls, value: Mapping[str, Any], channel: str | None = None) -> PublishResult:
        return cls(
            channel=str(value.get("channel", channel)),
            offset=int(value["offset"]),
            epoch=str(value["epoch"]),
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of ``channel`` were missed and the application should resynchronise it
    (for example from ``GET /api/channels/{channel}/history``).

    ``reason`` is ``"offset"`` (a retained message skipped offsets: ``expected``,
    ``received``), ``"not_recovered"`` (after a reconnect the server could not replay what
    was missed: ``epoch``, ``previous_epoch``), ``"epoch"`` (a message came with a new epoch
    under a live subscription) or ``"overflow"`` (a subscription's buffer was full and its
    oldest message was dropped).
    """

    channel: str
    reason: str
    expected: int | None = None
    received: int | None = None
    epoch: str | None = None
    previous_epoch: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An ``error`` frame the server sent for a subscribe or another op that had no
    caller waiting for it; ``channels`` are the channels of the request, if known."""

    code: str
    message: str
    id: int | None = None
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect backoff, in seconds: delay = uniform(0, min(max, base * 2**attempt))."""

    base: float = 0.5
    max: float = 30.0


#: The default reconnect backoff: base 0.5 s, at most 30 s.
DEFAULT_BACKOFF = Backoff()


def backoff_delay(
    attempt: int, backoff: Backoff = DEFAULT_BACKOFF, random: Callable[[], float] = _random.random
) -> float:
    """Reconnect delay with full jitter, in seconds: a uniform value in
    ``[0, min(backoff.max, backoff.base * 2**attempt))``; ``attempt`` counts consecutive
    failures from zero."""
    exponent = min(max(0, attempt), _MAX_BACKOFF_EXPONENT)
    cap = min(backoff.max, backoff.base * 2**exponent)
    return float(random() * cap)


@dataclass(slots=True)
class Stats:
    """Counters of one client, for dashboards and tests."""

    state: str
    session: str | None
    channels: int
    subscriptions: int
    server_subscriptions: int
    pending_requests: int
    queued: int
    messages: int = 0
    duplicates: int = 0
    gaps: int = 0
    reconnects: int = 0
    dropped: int = 0
    rtt: float | None = None
