"""Fixtures for ferrocast's end-to-end tests.

Each test starts the real `ferrocast serve` binary ($FERROCAST_BIN, else
target/debug/ferrocast) on a free loopback port, talks to it with independent clients
(Python's `websockets`, urllib), and stops it at teardown. Logs of every process a test
started go to e2e/artifacts/<test>/ and are attached to the report when the test fails.

Fixtures:
- `start_server(*sets, simulator=False, api_key=None, env=None, config=None)`: starts one
  more server (`--no-simulator` unless simulator=True); `sets` are `--set KEY=VALUE` overrides.
- `server`: one server with the defaults.
- `ws(server_or_url, path="/ws", welcome=True, **connect_kwargs)`: an open native client
  (`ferrocast_e2e.wsclient.Client`), closed at teardown.
- `healthy(server)`: a second connection subscribed to a channel of its own, whose
  `await check()` proves it still receives published messages in order.
- `canary(server)`: a started `ferrocast_e2e.canary.Canary`, a subscriber published to every
  20 ms whose `await check()` asserts every message arrived in order with no long gap.
- `track_process(proc)`: registers any other `ManagedProcess` (nginx, Redis, ...) so it is
  stopped at teardown and its log attached on failure.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ferrocast_e2e.canary import Canary  # noqa: E402
from ferrocast_e2e.procs import ARTIFACTS_DIR, ManagedProcess  # noqa: E402
from ferrocast_e2e.server import FerrocastServer, start_ferrocast  # noqa: E402
from ferrocast_e2e.wsclient import Client, connect_client  # noqa: E402

PROCS_KEY = pytest.StashKey[list]()


def _test_dir(item: pytest.Item) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")
    return ARTIFACTS_DIR / name[:150]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in item.stash.get(PROCS_KEY, []):
            report.sections.append(
                (f"{proc.name} log ({proc.log_path})", proc.log_tail(150) or "(empty)")
            )


@pytest.fixture
def artifacts(request) -> Path:
    """A fresh directory for this test's logs and files."""
    d = _test_dir(request.node)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


@pytest.fixture
def track_process(request):
    procs: list[ManagedProcess] = request.node.stash.setdefault(PROCS_KEY, [])
    mine: list[ManagedProcess] = []

    def track(proc: ManagedProcess) -> ManagedProcess:
        procs.append(proc)
        mine.append(proc)
        return proc

    yield track
    for proc in reversed(mine):
        proc.stop(timeout=10)


@pytest.fixture
def start_server(artifacts, track_process):
    count = 0

    def start(
        *sets: str,
        simulator: bool = False,
        api_key: str | None = None,
        env: dict | None = None,
        config: Path | None = None,
        extra_args: tuple[str, ...] = (),
        test_defaults: bool = True,
        tls=None,
    ) -> FerrocastServer:
        nonlocal count
        count += 1
        log_path = artifacts / f"ferrocast-{count}.log"
        server = start_ferrocast(
            log_path,
            sets=sets,
            simulator=simulator,
            api_key=api_key,
            env=env,
            config=config,
            extra_args=extra_args,
            test_defaults=test_defaults,
            tls=tls,
        )
        track_process(server.process)
        return server

    return start


@pytest.fixture
def server(start_server) -> FerrocastServer:
    return start_server()


@pytest.fixture
async def ws():
    clients: list[Client] = []

    async def open_client(
        target: FerrocastServer | str, path: str = "/ws", welcome: bool = True, **kwargs
    ) -> Client:
        url = target.ws_url(path) if isinstance(target, FerrocastServer) else target
        client = await connect_client(url, welcome=welcome, **kwargs)
        clients.append(client)
        return client

    yield open_client

    async def close(c: Client) -> None:
        # A client whose library paused reading (a full receive queue) would wait its whole
        # close_timeout for the server's close frame: keep teardown short.
        c.ws.close_timeout = 0.5
        try:
            await c.ws.close()
        except Exception:
            pass

    await asyncio.gather(*(close(c) for c in clients))


class Healthy:
    """A well-behaved subscriber on a channel of its own, used to show that whatever a
    misbehaving client did left the server serving everyone else."""

    CHANNEL = "chat.healthcheck"

    def __init__(self, server: FerrocastServer, client: Client, offset: int) -> None:
        self.server = server
        self.client = client
        self.offset = offset
        self.probes = 0

    async def check(self, count: int = 3) -> None:
        for _ in range(count):
            self.probes += 1
            probe = {"probe": self.probes}
            published = await self.server.apublish(self.CHANNEL, probe)
            assert published["offset"] == self.offset + 1, published
            msg = await self.client.next_msg(self.CHANNEL, timeout=5)
            assert msg["data"] == probe, msg
            assert msg["offset"] == self.offset + 1, msg
            self.offset += 1
        assert self.server.alive(), "server exited"


@pytest.fixture
def healthy(ws):
    async def make(server: FerrocastServer) -> Healthy:
        client = await ws(server)
        result = await client.subscribe_ok(Healthy.CHANNEL)
        return Healthy(server, client, result[Healthy.CHANNEL]["offset"])

    return make


@pytest.fixture
def canary(ws):
    async def make(server: FerrocastServer) -> Canary:
        c = Canary(server, await ws(server))
        await c.start()
        return c

    return make
