"""Blocking wrapper for scripts: the async :class:`~ferrocast.Client` on a background thread.

The wrapper owns one thread running its own event loop; every call is handed to that loop
and waited for. Callbacks (``on`` listeners and subscription callbacks) run on that thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, Self, TypeVar, cast

from .client import Client, Subscription
from .types import FerrocastError, Message, PublishResult, Stats

__all__ = ["SyncClient", "SyncSubscription"]

T = TypeVar("T")
_END = object()


async def _cancel_tasks() -> None:
    """Cancels what is left on the loop (listener tasks) so it can close cleanly."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class SyncSubscription:
    """A channel subscription of a :class:`SyncClient`.

    Without a callback, ``for msg in sub`` blocks for each message (iteration ends when the
    subscription is dropped or the client stops) and ``sub.get(timeout)`` waits for one.
    """

    def __init__(self, owner: SyncClient, channel: str, max_buffer: int) -> None:
        self.channel = channel
        self._owner = owner
        self._queue: queue.Queue[Any] = queue.Queue()
        self._max_buffer = max(1, max_buffer)
        self._inner: Subscription | None = None
        self._ended = False

    def _put(self, item: Any) -> None:
        # Runs on the client thread; keeps at most max_buffer messages (oldest dropped).
        self._queue.put(item)
        while self._queue.qsize() > self._max_buffer:
            try:
                dropped = self._queue.get_nowait()
            except queue.Empty:
                break
            if dropped is _END:
                self._queue.put(_END)
                break

    def _end(self) -> None:
        self._queue.put(_END)

    @property
    def result(self) -> dict[str, Any] | None:
        """The latest subscribe result (``epoch``, ``offset``, ``recovered``...), or ``None``."""
        return None if self._inner is None else self._inner.result

    def ready(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Blocks until the server acknowledged the channel; returns its result (raises
        :class:`FerrocastError` when refused, :class:`TimeoutError` on timeout)."""
        assert self._inner is not None
        return self._owner._run(self._inner.ready(timeout))

    def get(self, timeout: float | None = None) -> Message:
        """The next message; :class:`TimeoutError` after ``timeout`` seconds,
        :class:`FerrocastError` (``closed``) once the subscription has ended."""
        if self._ended:
            raise FerrocastError("closed", f"subscription to {self.channel} ended")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message on {self.channel} within {timeout} s") from None
        if item is _END:
            self._ended = True
            raise FerrocastError("closed", f"subscription to {self.channel} ended")
        return cast(Message, item)

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.get()
            except FerrocastError as e:
                if e.code == "closed":
                    return
                raise

    def unsubscribe(self) -> None:
        """Drops this subscription (idempotent) and ends its iteration."""
        inner = self._inner
        if inner is not None and inner.active and not self._owner._closed:
            self._owner._call(inner.unsubscribe)
        self._end()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()


class SyncClient:
    """A blocking ferrocast client for scripts.

    ``SyncClient(url, **options)`` takes the options of :class:`ferrocast.Client` and
    connects at once (``connect=False`` to call :meth:`connect` later). Use it as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, url: str, *, connect: bool = True, timeout: float = 10.0, **options: Any) -> None:
        self._client = Client(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ferrocast-sync", daemon=True)
        self._thread.start()
        self._subs: list[SyncSubscription] = []
        self._closed = False
        self._call(self._client.on, "disconnected", lambda _detail: self._end_all())
        if connect:
            try:
                self.connect(timeout)
            except BaseException:
                self.close()
                raise

    # ---- plumbing ----

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)

        return self._run(call())

    def _end_all(self) -> None:
        for sub in self._subs:
            sub._end()

    # ---- API ----

    @property
    def client(self) -> Client:
        """The underlying async client (use it only on its own thread)."""
        return self._client

    @property
    def state(self) -> str:
        """``connecting``, ``connected``, ``reconnecting`` or ``disconnected``."""
        return self._client.state

    @property
    def session(self) -> str | None:
        return self._client.session

    def connect(self, timeout: float | None = 10.0) -> None:
        """Connects and waits until connected (see :meth:`ferrocast.Client.connect`)."""
        self._run(self._client.connect(timeout=timeout))

    def subscribe(
        self,
        channel: str,
        callback: Callable[[Message], Any] | None = None,
        *,
        max_buffer: int = 10_000,
    ) -> SyncSubscription:
        """Listens to ``channel``: ``callback(message)`` on the client thread, or without a
        callback a blocking iterator (``for msg in sub``)."""
        sub = SyncSubscription(self, channel, max_buffer)
        deliver = callback if callback is not None else sub._put
        sub._inner = self._call(self._client.subscribe, channel, deliver)
        self._subs.append(sub)
        return sub

    def publish(self, channel: str, data: Any, timeout: float | None = 10.0) -> PublishResult:
        """Publishes over the socket and returns the server's ack."""
        return self._run(self._client.publish(channel, data, timeout=timeout))

    def ping(self, timeout: float | None = 10.0) -> float:
        """Round-trip time to the server, in seconds."""
        return self._run(self._client.ping(timeout))

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[[], None]:
        """Adds an event listener (run on the client thread); returns its remover."""
        remove = self._call(self._client.on, event, callback)
        return lambda: self._call(remove)

    def stats(self) -> Stats:
        return self._call(self._client.stats)

    def close(self) -> None:
        """Closes the connection and stops the background thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.close(), timeout=10)
            self._run(_cancel_tasks(), timeout=10)
        finally:
            self._end_all()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
