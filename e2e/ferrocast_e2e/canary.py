"""A well-behaved subscriber that watches a server while something attacks it.

A background thread publishes to the canary's channel every 20 ms over one kept-alive HTTP
connection; the canary, a `websockets` client, records when each message arrives. `check()`
asserts that it got every message, in order, and that no two deliveries were further apart
than `MAX_GAP`. The `canary` fixture (conftest.py) makes one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from .server import FerrocastServer, KeepAlivePublisher
from .wsclient import Client

#: Largest gap allowed between two deliveries to the canary.
MAX_GAP = 0.25
INTERVAL = 0.02


def rss_bytes(pid: int) -> int:
    """A process's resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Canary:
    CHANNEL = "chat.canary"

    def __init__(self, server: FerrocastServer, client: Client) -> None:
        self.server = server
        self.client = client
        self.arrivals: list[tuple[float, int]] = []
        self.published = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, daemon=True)
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        await self.client.subscribe_ok(self.CHANNEL)
        self._reader = asyncio.create_task(self._read())
        self._thread.start()
        await self.wait_for(5)

    def _publish(self) -> None:
        publisher = KeepAlivePublisher(self.server.port, self.server.api_key)
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    publisher.publish_batch([(self.CHANNEL, {"seq": self.published})])
                except Exception as e:  # noqa: BLE001 - reported by check()
                    self.errors.append(repr(e))
                    return
                self.published += 1
                next_at += INTERVAL
                time.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            publisher.close()

    async def _read(self) -> None:
        while True:
            msg = await self.client.next_msg(self.CHANNEL, timeout=30)
            self.arrivals.append((time.monotonic(), msg["data"]["seq"]))

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            assert time.monotonic() < deadline, f"canary got {len(self.arrivals)} of {count}"
            assert self._reader is not None and not self._reader.done(), self._reader
            await asyncio.sleep(0.02)

    async def check(self, min_published: int = 20) -> float:
        """Stops publishing and asserts; returns the largest gap between two deliveries."""
        # Watch for at least half a second, however quick the test was.
        deadline = time.monotonic() + 5
        while self.published < 25 and not self.errors and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 10)
        assert not self.errors, f"the canary's publisher failed: {self.errors}"
        await self.wait_for(self.published)
        assert self._reader is not None
        self._reader.cancel()
        seqs = [s for _, s in self.arrivals]
        assert seqs == list(range(self.published)), "canary messages missing or out of order"
        gaps = [b[0] - a[0] for a, b in zip(self.arrivals, self.arrivals[1:])]
        print(f"canary: {self.published} messages, largest gap {max(gaps):.3f} s")
        assert max(gaps) < MAX_GAP, f"canary delivery gap of {max(gaps):.3f} s"
        assert self.published >= min_published, self.published
        assert self.server.alive(), "server exited"
        return max(gaps)
