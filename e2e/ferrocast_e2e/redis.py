"""A real `redis-server` on a free loopback port, for the multi-node (Redis broker) tests.

Started without persistence (`--save '' --appendonly no`) unless a test asks otherwise, so a
restart comes back empty, which is what the "Redis lost everything" tests need. Commands
are sent with a minimal RESP client over a socket of its own (no client library needed).
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from .procs import ManagedProcess, free_port, tcp_connectable


def redis_server_bin() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError(
            "redis-server is not installed (apt-get install redis-server; scripts/test "
            "installs it from e2e/system-packages.txt)"
        )
    return path


class RedisServer:
    """One redis-server process; `restart()` brings it back empty on the same port."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_dir = log_dir
        self.starts = 0
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.starts += 1
        argv = [
            redis_server_bin(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.log_dir),
            "--loglevel", "notice",
        ]
        self.process = ManagedProcess(
            f"redis-{self.starts}", argv, self.log_dir / f"redis-{self.starts}.log"
        ).start()
        self.process.wait_until(lambda: self.ping(), timeout=10, what="PING answered")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=5)

    def ping(self) -> bool:
        if not tcp_connectable(self.port):
            return False
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def command(self, *args: str | int | bytes, timeout: float = 5.0) -> Any:
        """Sends one command on a new connection and returns its decoded reply (errors
        raise RedisError)."""
        with self.connect(timeout) as conn:
            return conn.command(*args)

    def connect(self, timeout: float = 5.0) -> "RedisConnection":
        """A connection kept open (for commands that must not need a new one, e.g. while
        `maxclients` is lowered)."""
        return RedisConnection(socket.create_connection(("127.0.0.1", self.port), timeout=timeout))


class RedisConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def command(self, *args: str | int | bytes) -> Any:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(out)
        return _read_reply(self.reader)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> "RedisConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisError(RuntimeError):
    pass


def _read_reply(f) -> Any:
    line = f.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisError(f"unexpected reply {line!r}")
