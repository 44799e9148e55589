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

    def __init__(
        self, log_dir: Path, port: int | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        """`tls` = (certificate, key) PEM files: then the port speaks TLS only."""
        self.port = port or free_port()
        self.log_dir = log_dir
        self.tls = tls
        self.starts = 0
        self.process: ManagedProcess | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.starts += 1
        if self.tls:
            cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-auth-clients", "no"]
        else:
            listen = ["--port", str(self.port)]
        argv = [
            redis_server_bin(),
            *listen,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.log_dir),
            "--loglevel", "notice",
            *self.extra_args,
        ]
        name = f"redis-{self.port}-{self.starts}"
        self.process = ManagedProcess(name, argv, self.log_dir / f"{name}.log").start()
        ready = (lambda: tcp_connectable(self.port)) if self.tls else self.ping
        self.process.wait_until(ready, timeout=10, what="listening")
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


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 signed by it (openssl): (ca, cert, key)."""
    import subprocess

    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "redis.key", directory / "redis.csr", directory / "redis.pem"
    ext = directory / "redis.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def run(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
        "-days", "2", "-subj", "/CN=ferrocast test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "2", "-extfile", ext)
    return ca, cert, key


def cluster_port() -> int:
    """A free port P <= 55535 whose bus port P + 10000 is free too."""
    import random

    from .procs import port_is_free

    for _ in range(200):
        port = random.randint(20000, 55535)
        if port_is_free(port) and port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """A Redis Cluster of `masters` redis-server processes (no replicas), created with
    `redis-cli --cluster create` and waited for until every node reports `cluster_state:ok`."""

    def __init__(self, log_dir: Path, masters: int = 3) -> None:
        # A cluster node also listens on its port + 10000 (the cluster bus).
        self.servers = [RedisServer(log_dir, port=cluster_port()) for _ in range(masters)]
        self.log_dir = log_dir

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, track) -> "RedisCluster":
        import subprocess
        import time

        for s in self.servers:
            s.extra_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.log_dir / f"nodes-{s.port}.conf"),
                "--cluster-node-timeout", "2000",
            ]
            s.start()
            track(s.process)
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (Debian's redis-tools)")
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.servers],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in s.command("CLUSTER", "INFO") for s in self.servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self


class RedisSentinels:
    """A primary, one replica and three sentinels (`redis-sentinel`) watching the primary as
    `mymaster`, failing over one second after it stops answering."""

    MASTER = "mymaster"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.primary = RedisServer(log_dir)
        self.replica = RedisServer(log_dir)
        self.sentinel_ports = [free_port() for _ in range(3)]

    @property
    def sentinel_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{p}" for p in self.sentinel_ports]

    def sentinel(self, *args: str) -> Any:
        return RedisServer(self.log_dir, port=self.sentinel_ports[0]).command("SENTINEL", *args)

    def primary_port(self) -> int:
        host, port = self.sentinel("get-master-addr-by-name", self.MASTER)
        return int(port)

    def start(self, track) -> "RedisSentinels":
        import time

        self.primary.start()
        track(self.primary.process)
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        track(self.replica.process)
        _wait(lambda: "master_link_status:up" in self.replica.command("INFO", "replication"),
              "the replica to sync")
        sentinel_bin = shutil.which("redis-sentinel")
        if sentinel_bin is None:
            raise FileNotFoundError("redis-sentinel is not installed (apt-get install redis-sentinel)")
        for port in self.sentinel_ports:
            conf = self.log_dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.log_dir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 3000\n"
            )
            proc = ManagedProcess(f"sentinel-{port}", [sentinel_bin, str(conf)],
                                  self.log_dir / f"sentinel-{port}.log").start()
            track(proc)
            proc.wait_until(lambda p=port: tcp_connectable(p), timeout=10, what="listening")
        # Every sentinel must know the replica and the two other sentinels before a failover.
        def known() -> bool:
            for port in self.sentinel_ports:
                s = RedisServer(self.log_dir, port=port)
                if len(s.command("SENTINEL", "replicas", self.MASTER)) < 1:
                    return False
                if len(s.command("SENTINEL", "sentinels", self.MASTER)) < 2:
                    return False
            return True

        _wait(known, "the sentinels to discover each other and the replica", timeout=20)
        return self


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)
