"""A well-behaved subscriber that watches a server while another client misbehaves: a
message is published to it every 20 ms (over a kept-alive HTTP connection, from a thread),
and afterwards every message must have arrived, in order, with no gap between two arrivals
over `MAX_GAP`."""

from __future__ import annotations

import asyncio
import threading
import time

#: Time between two canary messages.
INTERVAL = 0.02
#: The largest gap between two arrivals the canary tolerates.
MAX_GAP = 0.25


class Canary:
    def __init__(self, server, channel: str = "chat.canary") -> None:
        self.server = server
        self.channel = channel
        self.arrivals: list[float] = []
        self.offsets: list[int] = []
        self.sent = 0
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self._listener: asyncio.Task | None = None

    async def start(self, ws) -> None:
        """Subscribes a client from the `ws` fixture and starts publishing."""
        client = await ws(self.server)
        await client.subscribe_ok(self.channel)
        self._listener = asyncio.create_task(self._listen(client))
        self._publisher = threading.Thread(target=self._publish, daemon=True)
        self._publisher.start()

    def _publish(self) -> None:
        publisher = self.server.keepalive_publisher()
        try:
            while not self._stop.is_set():
                publisher.publish_batch([(self.channel, {"n": self.sent})])
                self.sent += 1
                time.sleep(INTERVAL)
        finally:
            publisher.close()

    async def _listen(self, client) -> None:
        while True:
            msg = await client.next_msg(self.channel, timeout=30)
            self.arrivals.append(time.monotonic())
            self.offsets.append(msg["offset"])

    async def stop_and_check(self, min_seconds: float) -> None:
        """Stops publishing and asserts the canary noticed nothing over at least
        `min_seconds` of publishing."""
        self._stop.set()
        assert self._publisher is not None and self._listener is not None
        await asyncio.to_thread(self._publisher.join, 5)
        await asyncio.sleep(0.5)
        self._listener.cancel()
        assert self.sent > min_seconds / INTERVAL / 4, self.sent
        assert len(self.offsets) == self.sent, (len(self.offsets), self.sent)
        first = self.offsets[0]
        assert self.offsets == list(range(first, first + len(self.offsets)))
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        assert max(gaps) < MAX_GAP, f"canary's largest gap {max(gaps):.3f}s"
