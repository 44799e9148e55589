"""Certificates for the TLS tests, made with `openssl` in the test's own directory: a private
CA, and server certificates it signs for 127.0.0.1 and localhost."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _run(argv: list) -> None:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


def make_ca(dir: Path, name: str = "ferrocast e2e CA") -> tuple[Path, Path]:
    """A self-signed CA: its certificate and key."""
    dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = dir / "ca.pem", dir / "ca.key"
    _run(
        ["openssl", "req", "-x509", *_EC, "-days", "30", "-subj", f"/CN={name}"]
        + ["-keyout", ca_key, "-out", ca_cert]
    )
    return ca_cert, ca_key


def issue(
    dir: Path, ca: tuple[Path, Path], stem: str = "cert", cn: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by `ca`: `STEM.pem` and
    `STEM.key` in `dir`."""
    ca_cert, ca_key = ca
    cert, key = dir / f"{stem}.pem", dir / f"{stem}.key"
    csr, ext = dir / f"{stem}.csr", dir / f"{stem}.cnf"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _run(["openssl", "req", *_EC, "-subj", f"/CN={cn}", "-keyout", key, "-out", csr])
    _run(
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key]
        + ["-CAcreateserial", "-days", "30", "-extfile", ext, "-out", cert]
    )
    return cert, key


def make_ca_and_certificate(dir: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1 and localhost: returns
    the CA certificate, the server certificate and its key."""
    ca = make_ca(dir)
    cert, key = issue(dir, ca)
    return ca[0], cert, key


def client_context(ca_cert: Path) -> ssl.SSLContext:
    """A client context that trusts only `ca_cert`."""
    return ssl.create_default_context(cafile=str(ca_cert))
