"""Real processes for end-to-end tests: free ports, start, wait until ready, logs, stop.

Every component a test needs (ferrocast itself, and later nginx, Redis, Chromium...) is
started by the test on a free loopback port, waited for, and stopped at teardown. Nothing
is assumed to be running already.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

E2E_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = E2E_DIR.parent
ARTIFACTS_DIR = Path(os.environ.get("FERROCAST_E2E_ARTIFACTS", E2E_DIR / "artifacts"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind :0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `port`: we can bind it ourselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def tcp_connectable(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 1.0, context=None) -> int | None:
    """The HTTP status of GET `url` (https with the `ssl.SSLContext` given), or None when
    nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    """One child process with its combined stdout/stderr captured to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"$ {' '.join(self.argv)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        if self.proc is None:
            return self.returncode
        rc = self.proc.poll()
        if rc is not None:
            self.returncode = rc
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `ready` until it is true; fails early (with the log) if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            rc = self.poll()
            if rc is not None:
                raise ProcessFailed(
                    f"{self.name} exited with {rc} before {what}; log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} did not become ready ({what}) within {timeout}s; log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)  # type: ignore[union-attr]

    def wait(self, timeout: float) -> int | None:
        """Waits for exit; None if still running after `timeout`."""
        if self.proc is None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL (of the whole process group) after `timeout` seconds."""
        if self.proc is None:
            return self.returncode
        if self.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait(5)
                with open(self.log_path, "ab") as log:
                    log.write(f"[e2e] {self.name} killed after {timeout}s\n".encode())
        return self.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
