"""A real `ferrocast serve` process on a free port, and HTTP helpers to talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .procs import REPO_ROOT, ManagedProcess, ProcessFailed, free_port, http_status

EXAMPLE_CONFIG = REPO_ROOT / "deploy" / "ferrocast.example.toml"

#: Log filter for servers started by tests: the server's own debug lines (connection ids,
#: close codes) without the HTTP stack's noise.
TEST_LOG_LEVEL = "info,ferrocast_server=debug,ferrocast_hub=debug"


def ferrocast_bin() -> Path:
    """The binary under test: $FERROCAST_BIN, else target/debug/ferrocast."""
    explicit = os.environ.get("FERROCAST_BIN")
    if explicit:
        path = Path(explicit)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
        path = target / "debug" / "ferrocast"
    if not path.is_file():
        raise FileNotFoundError(
            f"ferrocast binary not found at {path}: run `cargo build -p ferrocast` "
            "(scripts/test does) or set FERROCAST_BIN"
        )
    return path


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child ferrocast: ours without FERROCAST_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROCAST_")}
    env["NO_COLOR"] = "1"
    env.setdefault("RUST_BACKTRACE", "1")
    if extra:
        env.update(extra)
    return env


def socketio_off_sets() -> list[str]:
    """`--set` flags that turn Socket.IO off, if the binary under test has a switch for it.

    Socket.IO is being added behind configuration: read the effective configuration of the
    binary (`ferrocast config show`) and turn off whatever enable switch it has.
    """
    import subprocess

    out = subprocess.run(
        [str(ferrocast_bin()), "config", "show", "--no-simulator"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    config = tomllib.loads(out.stdout)
    sets = []
    for table_path in (("socketio",), ("socket_io",), ("server", "socketio")):
        node: Any = config
        for part in table_path:
            node = node.get(part) if isinstance(node, dict) else None
        prefix = ".".join(table_path)
        if isinstance(node, bool):
            sets.append(f"{prefix}=false")
        elif isinstance(node, dict):
            for key in ("enabled", "enable"):
                if isinstance(node.get(key), bool):
                    sets.append(f"{prefix}.{key}=false")
    return sets


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | str | Any | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    context=None,
) -> Response:
    """One HTTP/1.1 request on a new connection (http.client, which sends the headers given
    as they are; https with the `ssl.SSLContext` given); any status is returned, not raised."""
    import http.client
    from urllib.parse import urlsplit

    hdrs = dict(headers or {})
    data: bytes | None
    if body is None:
        data = None
    elif isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, target, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


class KeepAlivePublisher:
    """Publishes over one kept-alive HTTP connection: fast enough for flood tests."""

    def __init__(self, port: int, api_key: str | None = None) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.headers = {"Content-Type": "application/json"}
        if api_key is not None:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def publish_batch(self, messages: Sequence[tuple[str, Any]]) -> list[dict]:
        body = json.dumps({"messages": [{"channel": c, "data": d} for c, d in messages]})
        self.conn.request("POST", "/api/publish", body=body, headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.status == 200, f"batch publish answered {resp.status}: {data[:300]!r}"
        return json.loads(data)["results"]

    def close(self) -> None:
        self.conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"unparseable metrics line: {line!r}")
        labels = dict(_LABEL.findall(m.group(3) or ""))
        samples.append((m.group(1), labels, float(m.group(4))))
    return samples


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, or None."""
    for n, lbls, value in parse_metrics(text):
        if n == name and all(lbls.get(k) == v for k, v in labels.items()):
            return value
    return None


@dataclass
class FerrocastServer:
    """A running `ferrocast serve`."""

    port: int
    process: ManagedProcess
    argv: list[str]
    api_key: str | None = None
    sets: list[str] = field(default_factory=list)
    #: With TLS ([server.tls]): an `ssl.SSLContext` trusting the server's certificate; the
    #: URLs are then https:// and wss://.
    tls: Any = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws") -> str:
        scheme = "wss" if self.tls is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    # --- HTTP --------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, headers=None, timeout=10.0):
        return http_request(self.base_url + path, method, body, headers, timeout, self.tls)

    def get(self, path: str, headers=None, timeout: float = 10.0) -> Response:
        """GET with the server's API key (if any) unless headers override it."""
        return self.request("GET", path, None, self._auth(headers), timeout)

    def _auth(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        h = dict(headers or {})
        if self.api_key is not None:
            h.setdefault("Authorization", f"Bearer {self.api_key}")
        return h

    def post_publish(self, body: Any, headers: Mapping[str, str] | None = None) -> Response:
        """POST /api/publish with the server's API key (if any) unless headers override it."""
        return self.request("POST", "/api/publish", body, self._auth(headers))

    def publish(self, channel: str, data: Any) -> dict:
        """Publishes one message; asserts 200 and returns its result entry."""
        r = self.post_publish({"channel": channel, "data": data})
        assert r.status == 200, f"publish to {channel} answered {r.status}: {r.text}"
        results = r.json()["results"]
        assert len(results) == 1 and results[0]["channel"] == channel, results
        return results[0]

    def publish_batch(self, messages: Iterable[tuple[str, Any]]) -> list[dict]:
        msgs = [{"channel": c, "data": d} for c, d in messages]
        r = self.post_publish({"messages": msgs})
        assert r.status == 200, f"batch publish answered {r.status}: {r.text[:500]}"
        results = r.json()["results"]
        assert len(results) == len(msgs), results
        return results

    async def apublish(self, channel: str, data: Any) -> dict:
        return await asyncio.to_thread(self.publish, channel, data)

    async def apublish_batch(self, messages: Iterable[tuple[str, Any]]) -> list[dict]:
        return await asyncio.to_thread(self.publish_batch, list(messages))

    async def aget(self, path: str, timeout: float = 10.0) -> Response:
        return await asyncio.to_thread(self.get, path, None, timeout)

    def keepalive_publisher(self) -> KeepAlivePublisher:
        return KeepAlivePublisher(self.port, self.api_key)

    def metrics_text(self) -> str:
        r = self.get("/metrics")
        assert r.status == 200, r.status
        return r.text

    def metric(self, name: str, **labels: str) -> float | None:
        return metric(self.metrics_text(), name, **labels)

    async def ametric(self, name: str, **labels: str) -> float | None:
        return await asyncio.to_thread(self.metric, name, **labels)

    # --- process -------------------------------------------------------------------------

    def log(self) -> str:
        return self.process.log()

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)


def serve_argv(
    port: int,
    sets: Sequence[str] = (),
    simulator: bool = False,
    api_key: str | None = None,
    config: Path | None = None,
    extra_args: Sequence[str] = (),
    test_defaults: bool = True,
) -> list[str]:
    argv = [str(ferrocast_bin()), "serve", "--listen", f"127.0.0.1:{port}"]
    if config is not None:
        argv += ["--config", str(config)]
    if not simulator:
        argv.append("--no-simulator")
    if api_key is not None:
        argv += ["--api-key", api_key]
    if test_defaults:
        # Short drain so teardown is quick; tests that need more override it (later wins).
        for s in ("server.shutdown_grace_ms=3000", f"log.level={TEST_LOG_LEVEL}"):
            argv += ["--set", s]
    for s in sets:
        argv += ["--set", s]
    argv += list(extra_args)
    return argv


def start_ferrocast(
    log_path: Path,
    sets: Sequence[str] = (),
    simulator: bool = False,
    api_key: str | None = None,
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
    extra_args: Sequence[str] = (),
    test_defaults: bool = True,
    ready_timeout: float = 20.0,
    tls: Any = None,
) -> FerrocastServer:
    """Starts `ferrocast serve` on a free port and waits until /healthz answers 200 (over
    TLS with `tls`, an `ssl.SSLContext` trusting the certificate the sets configure)."""
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        argv = serve_argv(port, sets, simulator, api_key, config, extra_args, test_defaults)
        proc = ManagedProcess("ferrocast", argv, log_path, clean_env(env)).start()
        server = FerrocastServer(port, proc, argv, api_key, list(sets), tls)
        try:
            proc.wait_until(
                lambda: http_status(server.base_url + "/healthz", timeout=0.5, context=tls)
                == 200,
                ready_timeout,
                f"/healthz on port {port} answered 200",
            )
            return server
        except ProcessFailed as e:
            proc.stop(2)
            last_error = e
            # Another process took the port between our probe and its bind: try another.
            if "cannot listen" in proc.log():
                continue
            raise
    raise ProcessFailed(f"could not start ferrocast on a free port: {last_error}")


def run_ferrocast(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30.0
):
    """Runs a short-lived ferrocast command; returns the CompletedProcess (text mode)."""
    import subprocess

    return subprocess.run(
        [str(ferrocast_bin()), *args],
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
