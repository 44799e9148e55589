"""The deployment examples in deploy/ and `ferrocast gen systemd|container`.

(deploy/nginx is exercised for real, behind a running nginx, by test_doctor_nginx.py.)

- deploy/systemd/ferrocast.service: `systemd-analyze verify` accepts it with no warning,
  `systemd-analyze security --offline` rates it well, and its hardening is all there; without
  systemd-analyze, the structural checks still run.
- deploy/container/Dockerfile: checked structurally (no container engine here): a pinned
  multi-stage build, an unprivileged user, the port exposed and listened on, a health check,
  exec-form entrypoint, nothing secret baked in.
- Both are what `ferrocast gen` writes for the defaults, and follow changed settings.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ferrocast_e2e.procs import REPO_ROOT
from ferrocast_e2e.server import ferrocast_bin, run_ferrocast

UNIT = REPO_ROOT / "deploy" / "systemd" / "ferrocast.service"
DOCKERFILE = REPO_ROOT / "deploy" / "container" / "Dockerfile"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def gen(*args: str) -> str:
    r = run_ferrocast(["gen", *args])
    assert r.returncode == 0, r.stderr
    return r.stdout


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_the_generated_one_and_hardened():
    text = UNIT.read_text()
    assert gen("systemd") == text, "deploy/systemd/ferrocast.service differs from `ferrocast gen systemd`"
    unit = parse_unit(text)
    service = unit["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["ExecStart"] == "/usr/local/bin/ferrocast serve --config /etc/ferrocast/ferrocast.toml"
    assert one["ExecStartPre"].endswith("config check /etc/ferrocast/ferrocast.toml")
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
    }.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, expected {value!r}"
    assert int(one["LimitNOFILE"]) >= 100_000  # server.max_connections defaults to 100000
    assert int(one["TimeoutStopSec"]) > 10  # longer than server.shutdown_grace_ms (10 s)
    assert "@system-service" in service["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]


def test_systemd_unit_follows_the_settings():
    text = gen("systemd", "--set", "server.listen=0.0.0.0:443", "--set", "server.max_connections=300000")
    one = {k: v[-1] for k, v in parse_unit(text)["Service"].items()}
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"  # a port below 1024
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["LimitNOFILE"] == "301024"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path):
    # verify checks that the binary exists, so point the unit at the one under test.
    unit = tmp_path / "ferrocast.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ferrocast", str(ferrocast_bin())))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify:\n{r.stderr}"
    # Exposure on systemd's 0-100 scale (shown as 0.0-10.0): keep it in the "OK" band.
    r = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
    )
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("this systemd-analyze cannot rate unit files offline")
    assert r.returncode == 0, f"exposure too high:\n{r.stdout[-2000:]}{r.stderr}"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def test_dockerfile_is_the_generated_one_and_sound():
    text = DOCKERFILE.read_text()
    assert gen("container") == text, "deploy/container/Dockerfile differs from `ferrocast gen container`"
    instrs = dockerfile_instructions(text)
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) == 2, froms  # build stage, then a slim runtime
    assert froms[0].endswith(" AS build"), froms
    for image in froms:
        ref = image.split()[0]
        assert ":" in ref and not ref.endswith(":latest"), f"unpinned base image {ref}"
    build = " ".join(a for i, a in instrs if i == "RUN")
    assert "cargo build --release --locked -p ferrocast" in build
    assert ("COPY", "--from=build /usr/local/bin/ferrocast /usr/local/bin/ferrocast") in instrs
    after_runtime = instrs[[i for i, (k, _) in enumerate(instrs) if k == "FROM"][1]:]
    user = [a for i, a in after_runtime if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), user
    envs = dict(a.split("=", 1) for i, a in instrs if i == "ENV")
    assert envs["FERROCAST_SERVER_LISTEN"] == "0.0.0.0:8080"  # reachable from outside
    assert ("EXPOSE", "8080") in instrs
    assert ("STOPSIGNAL", "SIGTERM") in instrs
    health = [a for i, a in instrs if i == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and "/dev/tcp/127.0.0.1/8080" in health[0]
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert json.loads(entry[0]) == ["/usr/local/bin/ferrocast"]  # exec form: gets SIGTERM
    cmd = [a for i, a in instrs if i == "CMD"]
    assert json.loads(cmd[-1]) == ["serve"]
    assert not any(i == "ADD" for i, _ in instrs)
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().split()
    assert "target" in ignore and ".git" in ignore


def test_dockerfile_health_check_speaks_http(start_server):
    """The health check's shell line, run against a real server, passes; against a closed
    port it fails."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    instrs = dockerfile_instructions(DOCKERFILE.read_text())
    health = next(a for i, a in instrs if i == "HEALTHCHECK")
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[:2] == ["bash", "-c"]
    server = start_server()
    script = argv[2].replace("/8080", f"/{server.port}")
    assert subprocess.run(["bash", "-c", script], timeout=10).returncode == 0
    closed = argv[2].replace("/8080", "/1")
    assert subprocess.run(["bash", "-c", closed], timeout=10, capture_output=True).returncode != 0


def test_dockerfile_follows_the_settings():
    text = gen(
        "container",
        "--set", "server.listen=127.0.0.1:9000",
        "--set", "server.ws_paths=/ws,/ws/price",
        "--set", "api.key=do-not-bake-me",
    )
    instrs = dockerfile_instructions(text)
    envs = dict(a.split("=", 1) for i, a in instrs if i == "ENV")
    assert envs["FERROCAST_SERVER_LISTEN"] == "0.0.0.0:9000"
    assert envs["FERROCAST_SERVER_WS_PATHS"] == '"/ws,/ws/price"'
    assert ("EXPOSE", "9000") in instrs
    assert "do-not-bake-me" not in text
    # The baked-in value is read back by the server as the same setting.
    r = run_ferrocast(["config", "show"], env={"FERROCAST_SERVER_WS_PATHS": "/ws,/ws/price"})
    assert r.returncode == 0, r.stderr
    assert re.search(r'ws_paths = \["/ws", "/ws/price"\]', r.stdout), r.stdout


# --- TLS served by ferrocast itself ([server.tls]) ------------------------------------------

TLS_SETS = (
    "--set", "server.tls.cert_file=/etc/ferrocast/tls/cert.pem",
    "--set", "server.tls.key_file=/etc/ferrocast/tls/key.pem",
)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_unit_with_tls_reloads_on_sighup_and_verifies(tmp_path: Path):
    text = gen("systemd", *TLS_SETS)
    service = parse_unit(text)["Service"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["SupplementaryGroups"] == ["ferrocast-tls"]
    assert "--deploy-hook" in text and "systemctl reload ferrocast" in text
    unit = tmp_path / "ferrocast.service"
    unit.write_text(text.replace("/usr/local/bin/ferrocast", str(ferrocast_bin())))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), f"systemd-analyze verify:\n{r.stderr}"


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="curl or openssl is not installed")
def test_dockerfile_with_tls_health_checks_over_https(start_server, artifacts):
    """The TLS variant's health check (curl, which that image installs), run against a real
    ferrocast serving TLS, passes; against a closed port it fails."""
    from ferrocast_e2e.certs import client_context, make_ca_and_certificate

    text = gen("container", *TLS_SETS)
    instrs = dockerfile_instructions(text)
    envs = dict(a.split("=", 1) for i, a in instrs if i == "ENV")
    assert envs["FERROCAST_SERVER_TLS_CERT_FILE"] == '"/etc/ferrocast/tls/cert.pem"'
    assert any(i == "RUN" and "install -y --no-install-recommends curl" in a for i, a in instrs)
    health = next(a for i, a in instrs if i == "HEALTHCHECK")
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "curl" and argv[-1] == "https://127.0.0.1:8080/healthz", argv
    ca, cert, key = make_ca_and_certificate(artifacts / "tls")
    server = start_server(
        f"server.tls.cert_file={cert}", f"server.tls.key_file={key}", tls=client_context(ca)
    )
    live = [a.replace(":8080/", f":{server.port}/") for a in argv]
    assert subprocess.run(live, timeout=10).returncode == 0
    closed = [a.replace(":8080/", ":1/") for a in argv]
    assert subprocess.run(closed, timeout=10, capture_output=True).returncode != 0
