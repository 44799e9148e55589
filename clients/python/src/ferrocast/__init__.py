"""Python client for the ferrocast push gateway.

- :class:`Client`: async native-protocol client on ``/ws`` (subscribe, publish, ping),
  reconnecting with recovery.
- :class:`SyncClient`: the same for scripts, on a background thread.
- :class:`Publisher` / :class:`AsyncPublisher`: ``POST /api/publish`` for backends.
"""

from .client import Client, Subscription, resolve_ws_url
from .publisher import AsyncPublisher, BatchItem, Publisher
from .sync import SyncClient, SyncSubscription
from .types import (
    DEFAULT_BACKOFF,
    STATES,
    TERMINAL_CLOSE_CODES,
    TOKEN_EXPIRED_CLOSE_CODE,
    Backoff,
    ErrorEvent,
    FerrocastError,
    Gap,
    Message,
    PublishError,
    PublishResult,
    Stats,
    backoff_delay,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKOFF",
    "STATES",
    "TERMINAL_CLOSE_CODES",
    "TOKEN_EXPIRED_CLOSE_CODE",
    "AsyncPublisher",
    "Backoff",
    "BatchItem",
    "Client",
    "ErrorEvent",
    "FerrocastError",
    "Gap",
    "Message",
    "PublishError",
    "PublishResult",
    "Publisher",
    "Stats",
    "Subscription",
    "SyncClient",
    "SyncSubscription",
    "backoff_delay",
    "resolve_ws_url",
]
