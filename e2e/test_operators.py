"""Operator files: the Grafana dashboard, the Prometheus alert rules, Kubernetes
(`ferrocast gen kubernetes` and the Helm chart) and AWS Elastic Beanstalk
(`ferrocast gen elastic-beanstalk`).

- Dashboard and rules: every `ferrocast_*` name they use is a family the real server exports
  (a server with an upstream feed, after connections, messages, a bad frame and a close, and
  a node with the Redis broker for the broker's health); `promtool check rules|config` and
  `promtool test rules` accept them; a real Prometheus scraping three real servers (one whose
  feed's key is rejected, one clustered through Redis) evaluates every rule without error,
  fires FerrocastFeedFailed for the broken one only, and answers every dashboard query.
- Kubernetes: the manifest is what `gen kubernetes` writes, parses, and is consistent (kinds,
  probes, grace period above the drain, ingress annotations, ports and names from Deployment
  to Service to Ingress, a ConfigMap that `ferrocast config check` accepts and a real server
  runs with, and that server drains and exits within the grace period after SIGTERM); it
  follows the settings; with `kubernetes-validate` installed, every object passes the
  Kubernetes schema. The Helm chart: every `.Values` reference exists in
  values.yaml; with `helm-python-sdk` (Helm's own Go engine) installed, `helm lint` passes and
  the rendered chart passes the same checks as the generated manifest.
- Elastic Beanstalk: the bundle is what `gen elastic-beanstalk` writes; its nginx files run
  in a real nginx laid out like Elastic Beanstalk's (conf.d/*.conf in http, conf.d/
  elasticbeanstalk/*.conf inside the server block next to its own `location /`), and a real
  WebSocket client, SSE (unbuffered: the doctor's check) and python-socketio work through it,
  while /api/publish and /metrics are refused to clients from other addresses (which
  Elastic Beanstalk's bare `location /` would let publish).

PyYAML is needed for the Kubernetes and Elastic Beanstalk checks (skipped without it);
promtool and prometheus come from Debian's prometheus package (e2e/system-packages.txt).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import socketio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ferrocast_e2e.procs import REPO_ROOT, ManagedProcess, free_port, http_status, tcp_connectable
from ferrocast_e2e.redis import RedisServer
from ferrocast_e2e.server import clean_env, ferrocast_bin, http_request, parse_metrics, run_ferrocast
from ferrocast_e2e.wsclient import CONNECT_DEFAULTS

try:
    import yaml
except ImportError:  # PyYAML is not in e2e/requirements.txt yet
    yaml = None

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ferrocast.json"
RULES = DEPLOY / "prometheus" / "ferrocast-alerts.yml"
RULES_TESTS = DEPLOY / "prometheus" / "ferrocast-alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
MANIFEST = DEPLOY / "kubernetes" / "ferrocast.yaml"
CHART = DEPLOY / "helm" / "ferrocast"
BEANSTALK = DEPLOY / "elastic-beanstalk"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")

KEY = "e2e-key"


def gen(*args: str) -> str:
    r = run_ferrocast(["gen", *args])
    assert r.returncode == 0, r.stderr
    return r.stdout


async def until(what: str, cond, timeout: float = 15.0):
    """Polls `cond` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(cond)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


# --- metric names in the dashboard and the rules -------------------------------------------

METRIC_NAME = re.compile(r"\bferrocast_[a-z0-9_]+\b")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
#: Labels Prometheus adds at scrape time, and the histogram bucket bound.
SCRAPE_LABELS = {"instance", "job", "le"}


def dashboard_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(variables: bool = True) -> list[str]:
    """The panels' PromQL, and (with `variables`) the template variables' queries, which are
    Grafana's `label_values(...)` rather than PromQL."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if variables and var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def rule_exprs() -> list[str]:
    """The rules' `expr:` values (one line, or a `|` block), read without a YAML parser."""
    exprs, lines = [], RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2)
        if rest.strip() != "|":
            exprs.append(rest)
            continue
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(block))
    return exprs


def families(metrics_text: str) -> dict[str, str]:
    """Metric family → type, from the `# TYPE` lines."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.MULTILINE)
    }


def family_of(name: str, types: dict[str, str]) -> str | None:
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return None


def expr_labels(expr: str) -> set[str]:
    labels = set()
    for group in BY_CLAUSE.findall(expr):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    # Matchers inside {...}; template text such as {{ $labels.x }} is not PromQL.
    for selector in re.findall(r"\{([^{}]*)\}", expr):
        labels |= set(MATCHER.findall(selector))
    return labels - SCRAPE_LABELS


def test_dashboard_is_a_sound_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in dashboard_panels(dash) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in dashboard_panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (area & cells), f"panel {p['title']!r} overlaps another"
        cells |= area
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert expr.count("(") == expr.count(")"), expr
            assert 'instance=~"$instance"' in expr, f"{p['title']}: not filtered by $instance"
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{p['title']}: window {window}"
            if "histogram_quantile" in expr:
                assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr
    # What an operator looks for first is there.
    every = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for needle in (
        "sum by (transport) (ferrocast_connections{",
        "sum by (transport) (rate(ferrocast_messages_out_total{",
        "histogram_quantile(0.99, sum by (le) (rate(ferrocast_delivery_latency_seconds_bucket{",
        "sum by (policy) (rate(ferrocast_queue_overflows_total{",
        "sum by (code) (rate(ferrocast_closes_total{",
        "sum by (code) (rate(ferrocast_frame_errors_total{",
        "ferrocast_feed_state{",
    ):
        assert needle in every, f"no panel with {needle}"


def start_upstream(artifacts: Path, track_process) -> int:
    """`ferrocast simulate massive` (the upstream of a feed); returns its port."""
    port = free_port()
    argv = [str(ferrocast_bin()), "simulate", "massive", "--listen", f"127.0.0.1:{port}",
            "--api-key", KEY, "--rate", "100"]
    proc = track_process(
        ManagedProcess("simulate-massive", argv, artifacts / f"simulate-{port}.log", clean_env()).start()
    )
    proc.wait_until(
        lambda: http_status(f"http://127.0.0.1:{port}/debug/subscriptions") == 200, 20,
        "the simulator's control API answered",
    )
    return port


def feed_config(path: Path, upstream_port: int) -> Path:
    path.write_text(
        f"""[simulator]
enabled = false

[[feeds]]
name = "stocks"
kind = "massive"
url = "ws://127.0.0.1:{upstream_port}/stocks"
api_key_env = "MASSIVE_API_KEY"
required = true
linger_ms = 300
backoff_initial_ms = 100
backoff_max_ms = 500
events = ["T", "Q", "AM"]
"""
    )
    return path


async def exercise(server) -> None:
    """Connections, a live message, a bad frame and a close: the events after which the
    per-code and per-transport series exist."""
    async with connect(server.ws_url("/ws"), **CONNECT_DEFAULTS) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channels": ["chat.ops", "ticks.AAPL"]}))
        await ws.send("this is not json")
        await asyncio.sleep(0.2)
        await server.apublish("chat.ops", {"n": 1})
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame.get("type") == "msg" and frame["channel"] == "chat.ops":
                break


def start_clustered(start_server, artifacts: Path, track_process):
    """A node with the Redis broker (a redis-server of its own): the `ferrocast_broker_*`
    families exist only there."""
    redis = RedisServer(artifacts).start()
    track_process(redis.process)
    return start_server("broker.kind=redis", f"broker.url={redis.url}")


async def test_every_metric_the_dashboard_and_rules_use_is_exported(start_server, artifacts, track_process):
    up = start_upstream(artifacts, track_process)
    server = start_server(config=feed_config(artifacts / "ferrocast.toml", up), env={"MASSIVE_API_KEY": KEY})
    clustered = start_clustered(start_server, artifacts, track_process)
    for node in (server, clustered):
        await until("ready", lambda: node.get("/readyz").status == 200)
        await exercise(node)

    def counted(node) -> str | None:
        t = node.metrics_text()
        return t if "ferrocast_closes_total{" in t and "ferrocast_frame_errors_total{" in t else None

    text = await until("closes and frame errors counted", lambda: counted(server))
    cluster_text = await until("closes and frame errors counted (clustered)", lambda: counted(clustered))
    types = families(text) | families(cluster_text)
    samples = parse_metrics(text) + parse_metrics(cluster_text)
    assert server.metric("ferrocast_ready") == 1  # /readyz answers 200
    assert clustered.metric("ferrocast_broker_published_total") >= 1, "the clustered node published through Redis"

    referenced: dict[str, list[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        assert exprs, f"no expressions found in the {source}"
        for expr in exprs:
            for name in METRIC_NAME.findall(expr):
                referenced.setdefault(name, []).append(f"{source}: {expr}")
    # The rules' descriptions name metrics too: those must exist as well.
    for name in METRIC_NAME.findall(RULES.read_text()):
        referenced.setdefault(name, []).append("rules (annotation)")
    missing = {n: where[0] for n, where in referenced.items() if family_of(n, types) is None}
    assert not missing, f"not exported by the server: {missing}"
    assert len({family_of(n, types) for n in referenced}) >= 20, sorted(referenced)
    broker = {family_of(n, types) for n in referenced if n.startswith("ferrocast_broker_")}
    assert len(broker) >= 6, f"the broker's health is on the dashboard and in the rules: {broker}"

    # Every label an expression groups or filters by is on the samples of its metrics.
    unverified = set()
    for expr in dashboard_exprs() + rule_exprs():
        names = {family_of(n, types) for n in METRIC_NAME.findall(expr)}
        have = [lbls for n, lbls, _ in samples if family_of(n, types) in names]
        if not have:
            unverified |= names
            continue
        present = set().union(*(set(lbls) for lbls in have))
        assert expr_labels(expr) <= present, f"{expr}: labels {expr_labels(expr) - present} never exported"
    # Only families that need an event this test does not cause have no samples yet.
    assert unverified <= {
        "ferrocast_wrong_endpoint_total",
        "ferrocast_feed_disconnects_total",
        "ferrocast_broker_errors_total",
    }, unverified


# --- promtool and a real Prometheus ------------------------------------------------------

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests(tmp_path: Path):
    for argv in (
        [PROMTOOL, "check", "rules", str(RULES)],
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)],
        [PROMTOOL, "test", "rules", str(RULES_TESTS)],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(argv[1:3])}:\n{r.stdout}{r.stderr}"
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert "SUCCESS: 14 rules found" in r.stdout, r.stdout
    # The unit tests do test something: a wrong expectation fails them.
    broken = tmp_path / "broken.test.yml"
    broken.write_text(
        RULES_TESTS.read_text()
        .replace("value: 0.4975", "value: 0.3")
        .replace("ferrocast-alerts.yml", str(RULES))
    )
    r = subprocess.run([PROMTOOL, "test", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "0.4975" in (r.stdout + r.stderr).replace("4.975E-01", "0.4975"), r.stdout


def prometheus_api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")
async def test_prometheus_evaluates_the_rules_and_the_dashboard_on_real_servers(
    start_server, artifacts, track_process
):
    up = start_upstream(artifacts, track_process)
    good = start_server(config=feed_config(artifacts / "good.toml", up), env={"MASSIVE_API_KEY": KEY})
    bad = start_server(config=feed_config(artifacts / "bad.toml", up), env={"MASSIVE_API_KEY": "wrong"})
    await until("the good feed live", lambda: good.get("/readyz").status == 200)
    await until("the bad feed failed", lambda: "failed" in bad.get("/readyz").text)
    clustered = start_clustered(start_server, artifacts, track_process)
    await until("the clustered node ready", lambda: clustered.get("/readyz").status == 200)
    await exercise(good)
    await exercise(clustered)
    assert (good.metric("ferrocast_ready"), bad.metric("ferrocast_ready")) == (1, 0)

    prom_dir = artifacts / "prometheus"
    prom_dir.mkdir()
    shutil.copy(RULES, prom_dir / "ferrocast-alerts.yml")
    (prom_dir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [ferrocast-alerts.yml]\n"
        "scrape_configs:\n  - job_name: ferrocast\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{good.port}', '127.0.0.1:{bad.port}', '127.0.0.1:{clustered.port}']\n"
    )
    port = free_port()
    proc = track_process(
        ManagedProcess(
            "prometheus",
            [PROMETHEUS, f"--config.file={prom_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            prom_dir / "prometheus.log",
        ).start()
    )
    proc.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/-/ready") == 200, 30, "prometheus ready")

    def failed_alerts():
        # Groups are evaluated independently: wait for one round of each.
        alerts = prometheus_api(port, "alerts")["alerts"]
        names = {a["labels"]["alertname"] for a in alerts}
        firing = [a for a in alerts if a["labels"]["alertname"] == "FerrocastFeedFailed" and a["state"] == "firing"]
        return alerts if firing and {"FerrocastFeedDown", "FerrocastNotReady"} <= names else None

    alerts = await until("FerrocastFeedFailed firing, FeedDown and NotReady pending", failed_alerts, 30)
    by_name: dict[str, list[dict]] = {}
    for a in alerts:
        by_name.setdefault(a["labels"]["alertname"], []).append(a)
    failed = by_name["FerrocastFeedFailed"]
    assert [a["labels"]["instance"] for a in failed] == [f"127.0.0.1:{bad.port}"], failed
    assert failed[0]["labels"]["feed"] == "stocks" and failed[0]["labels"]["severity"] == "critical"
    assert "stopped retrying" in failed[0]["annotations"]["summary"], failed[0]
    # Rules with a `for` are pending for the broken server only; nothing concerns the good one.
    for name in ("FerrocastFeedDown", "FerrocastNotReady"):
        assert [(a["labels"]["instance"], a["state"]) for a in by_name[name]] == [
            (f"127.0.0.1:{bad.port}", "pending")
        ], by_name[name]
    for healthy in (good, clustered):
        assert not [a for a in alerts if a["labels"].get("instance") == f"127.0.0.1:{healthy.port}"], alerts
    assert "FerrocastInstanceDown" not in by_name

    rules = [r for g in prometheus_api(port, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == 14
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy, unhealthy

    # Every dashboard query, with Grafana's variables filled in, is valid PromQL on real data,
    # and the core panels have data.
    await asyncio.sleep(3)  # a few scrapes after the traffic, so rates have two points
    empty = []
    for expr in dashboard_exprs(variables=False):
        q = expr.replace("$__rate_interval", "10s").replace("$__range", "1m").replace("$instance", ".*")
        result = prometheus_api(port, "query", query=q)["result"]
        if not result:
            empty.append(expr)
    core = [e for e in dashboard_exprs(variables=False) if re.search(
        r"ferrocast_(connections|messages_out_total|queue_overflows_total|feed_state|closes_total|frame_errors_total|ready"
        r"|broker_published_total|broker_publish_latency_seconds_bucket|broker_subscribed_channels)\{", e)]
    assert core and not set(core) & set(empty), f"no data for: {set(core) & set(empty)}"


# --- Kubernetes ------------------------------------------------------------------------------


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = {}
    for d in docs:
        assert d["kind"] not in kinds, f"two {d['kind']} objects"
        kinds[d["kind"]] = d
    return kinds


def check_manifest(docs: list[dict], *, namespace: str, host: str, replicas: int) -> dict:
    """The checks `gen kubernetes` and the Helm chart share; returns the parsed config."""
    k = by_kind(docs)
    expected = {"ConfigMap", "Deployment", "Service", "Ingress"} | ({"PodDisruptionBudget"} if replicas > 1 else set())
    assert set(k) == expected, set(k)
    for d in docs:
        assert d["metadata"]["namespace"] == namespace, d["metadata"]
    config = tomllib.loads(k["ConfigMap"]["data"]["ferrocast.toml"])
    shown = tomllib.loads(_config_show(k["ConfigMap"]["data"]["ferrocast.toml"]))
    server = shown["server"]
    host_part, _, port = server["listen"].rpartition(":")
    assert host_part == "0.0.0.0", "the pod must listen on every interface"
    port = int(port)

    deploy = k["Deployment"]
    assert deploy["spec"]["replicas"] == replicas
    pod = deploy["spec"]["template"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 1, sleep
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > int(sleep[1]) + server["shutdown_grace_ms"] / 1000, (grace, server["shutdown_grace_ms"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["args"] == ["serve", "--config", "/etc/ferrocast/ferrocast.toml"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/etc/ferrocast" and mount["readOnly"] is True
    (volume,) = spec["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == k["ConfigMap"]["metadata"]["name"]
    secret_env = {e["name"]: e for e in container["env"]}["FERROCAST_API_KEY"]
    assert secret_env["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "key" not in config.get("api", {}), "no secret in the ConfigMap"

    svc = k["Service"]
    assert svc["spec"]["selector"] == selector
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports, "the Service targets the container's named port"

    ing = k["Ingress"]
    ann = ing["metadata"]["annotations"]
    ping_s = server["ping_interval_ms"] / 1000
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(ann[f"nginx.ingress.kubernetes.io/{key}"]) >= 2 * ping_s, ann
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ann["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert ing["spec"]["ingressClassName"] == "nginx"
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == host
    paths = {p["path"]: p["pathType"] for p in rule["http"]["paths"]}
    for p in rule["http"]["paths"]:
        assert p["backend"]["service"]["name"] == svc["metadata"]["name"]
        assert p["backend"]["service"]["port"] == {"name": svc_port["name"]}
    for ws_path in server["ws_paths"]:
        assert paths[ws_path] == "Exact"
    assert paths["/sse"] == "Prefix" and paths["/api"] == "Prefix"
    assert (paths.get("/socket.io") == "Prefix") == shown["socketio"]["enabled"]
    assert "/metrics" not in paths and "/readyz" not in paths
    if "PodDisruptionBudget" in k:
        assert k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    return shown


def _config_show(toml_text: str) -> str:
    """`ferrocast config check` and `config show` of a ConfigMap's file: the effective settings."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ferrocast.toml"
        path.write_text(toml_text)
        check = run_ferrocast(["config", "check", str(path)])
        assert check.returncode == 0, f"config check refused the ConfigMap:\n{check.stderr}\n{toml_text}"
        show = run_ferrocast(["config", "show", "--config", str(path)])
        assert show.returncode == 0, show.stderr
        return show.stdout


def schema_validate(docs: list[dict]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs:
        kv.validate(d, "1.33", strict=True)


@needs_yaml
def test_kubernetes_manifest_is_the_generated_one_and_consistent():
    text = MANIFEST.read_text()
    assert gen("kubernetes") == text, "deploy/kubernetes/ferrocast.yaml differs from `ferrocast gen kubernetes`"
    docs = load_docs(text)
    shown = check_manifest(docs, namespace="ferrocast", host="push.example.com", replicas=2)
    k = by_kind(docs)
    assert k["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 20  # 5 + 10 + 5
    ann = k["Ingress"]["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "75"  # 3 × 25 s heartbeats
    assert ann["nginx.ingress.kubernetes.io/proxy-body-size"] == "4m"
    assert shown["server"]["ping_interval_ms"] == 25000


@needs_yaml
def test_kubernetes_manifest_follows_the_settings():
    text = gen(
        "kubernetes",
        "--set", "server.listen=0.0.0.0:9000",
        "--set", "server.shutdown_grace_ms=30000",
        "--set", "server.ping_interval_ms=40000",
        "--set", "server.ws_paths=/ws,/ws/price",
        "--set", "socketio.enabled=false",
        "--set", "api.key=do-not-ship-me",
        "--namespace", "live", "--replicas", "1", "--host", "rt.example.org",
        "--image", "registry.example.org/ferrocast:1.2.3", "--tls-secret", "rt-tls",
    )
    assert "do-not-ship-me" not in text
    docs = load_docs(text)
    shown = check_manifest(docs, namespace="live", host="rt.example.org", replicas=1)
    k = by_kind(docs)
    assert shown["server"]["ws_paths"] == ["/ws", "/ws/price"]
    assert shown["server"]["shutdown_grace_ms"] == 30000
    pod = k["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 35
    assert pod["containers"][0]["image"] == "registry.example.org/ferrocast:1.2.3"
    assert pod["containers"][0]["ports"][0]["containerPort"] == 9000
    ann = k["Ingress"]["metadata"]["annotations"]
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) == 120
    assert k["Ingress"]["spec"]["tls"] == [{"hosts": ["rt.example.org"], "secretName": "rt-tls"}]
    paths = [p["path"] for p in k["Ingress"]["spec"]["rules"][0]["http"]["paths"]]
    assert "/socket.io" not in paths and "/ws/price" in paths


@needs_yaml
def test_kubernetes_low_port_and_the_kubernetes_schema():
    low = load_docs(gen("kubernetes", "--set", "server.listen=0.0.0.0:80", "--replicas", "1"))
    check_manifest(low, namespace="ferrocast", host="push.example.com", replicas=1)
    pod = by_kind(low)["Deployment"]["spec"]["template"]["spec"]
    # Non-root cannot bind port 80 unless the pod lowers the unprivileged port range.
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    schema_validate(load_docs(MANIFEST.read_text()))
    schema_validate(low)


@needs_yaml
async def test_configmap_configuration_runs_a_server_that_drains_within_the_grace_period(
    start_server, artifacts
):
    text = gen(
        "kubernetes",
        "--set", "server.ping_interval_ms=7000",
        "--set", "server.shutdown_grace_ms=2000",
        "--set", "log.format=json",
    )
    docs = by_kind(load_docs(text))
    config = artifacts / "ferrocast.toml"
    config.write_text(docs["ConfigMap"]["data"]["ferrocast.toml"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    after_sigterm = pod["terminationGracePeriodSeconds"] - pre_stop
    # As the pod runs it (the file's settings untouched); the pod's listen address is
    # 0.0.0.0:8080, the test's --listen flag wins over it.
    server = start_server(config=config, simulator=True, test_defaults=False)
    await until("ready", lambda: server.get("/readyz").status == 200)
    assert server.get("/healthz").status == 200
    async with connect(server.ws_url("/ws"), **CONNECT_DEFAULTS) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["type"] == "welcome" and welcome["ping_interval_ms"] == 7000, welcome
        first_log_line = server.log().splitlines()[1]  # the first line is the command
        assert json.loads(first_log_line)["level"] == "INFO", "log.format = json took effect"

        # What the kubelet does after the preStop hook: SIGTERM, then SIGKILL once the grace
        # period is over. The drain (readiness 503, clients closed with 1001) ends before.
        started = time.monotonic()
        server.process.signal(signal.SIGTERM)
        await until("readiness 503", lambda: http_status(server.base_url + "/readyz") in (503, None), 5)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), after_sigterm)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
    code = await asyncio.to_thread(server.process.wait, after_sigterm)
    assert code == 0, f"still running {time.monotonic() - started:.1f} s after SIGTERM, or failed: {code}"
    assert time.monotonic() - started < after_sigterm


# --- the Helm chart --------------------------------------------------------------------------


def values_paths(values, prefix=""):
    if isinstance(values, dict):
        for k, v in values.items():
            path = f"{prefix}.{k}" if prefix else k
            yield path
            yield from values_paths(v, path)


@needs_yaml
def test_helm_chart_metadata_and_value_references():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "ferrocast" and chart["type"] == "application"
    cargo = (REPO_ROOT / "Cargo.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in cargo, "appVersion is the crate version"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = set(values_paths(values))
    templates = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    assert {"_helpers.tpl", "NOTES.txt", "configmap.yaml", "deployment.yaml", "service.yaml",
            "ingress.yaml", "pdb.yaml"} <= set(templates)
    refs = {m for t in templates.values() for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", t)}
    assert len(refs) > 20, refs
    unknown = sorted(r for r in refs if r not in known)
    assert not unknown, f"templates use values that values.yaml does not define: {unknown}"
    for t in templates.values():
        assert t.count("{{") == t.count("}}"), "unbalanced template delimiters"


helm = None
try:
    import helm_python as helm  # Helm's Go SDK (helm-python-sdk)
except ImportError:
    pass

needs_helm = pytest.mark.skipif(helm is None, reason="helm-python-sdk is not installed")


def render_chart(values: dict | None, release: str = "ferrocast", namespace: str = "ferrocast") -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=release, namespace=namespace)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += load_docs(text)
    return docs


@needs_yaml
@needs_helm
def test_helm_lint_and_template_match_the_generated_manifest():
    report = helm.lint(str(CHART), strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report  # warnings or errors

    docs = render_chart(None)
    check_manifest(docs, namespace="ferrocast", host="push.example.com", replicas=2)
    schema_validate(docs)
    # The same objects, with the same derived numbers, as `ferrocast gen kubernetes`.
    chart, generated = by_kind(docs), by_kind(load_docs(MANIFEST.read_text()))
    assert set(chart) == set(generated)
    c_pod, g_pod = (k["Deployment"]["spec"]["template"]["spec"] for k in (chart, generated))
    assert c_pod["terminationGracePeriodSeconds"] == g_pod["terminationGracePeriodSeconds"]
    for key in ("readinessProbe", "livenessProbe", "lifecycle", "ports", "args", "securityContext", "resources"):
        assert c_pod["containers"][0][key] == g_pod["containers"][0][key], key
    assert c_pod["securityContext"] == g_pod["securityContext"]
    assert chart["Ingress"]["metadata"]["annotations"] == generated["Ingress"]["metadata"]["annotations"]
    assert chart["Ingress"]["spec"]["rules"][0]["http"]["paths"] == generated["Ingress"]["spec"]["rules"][0]["http"]["paths"]
    c_toml = tomllib.loads(_config_show(chart["ConfigMap"]["data"]["ferrocast.toml"]))
    g_toml = tomllib.loads(_config_show(generated["ConfigMap"]["data"]["ferrocast.toml"]))
    assert c_toml == g_toml, "the chart's ferrocast.toml means the defaults, like the generated one"


@needs_yaml
@needs_helm
def test_helm_values_drive_the_objects():
    docs = render_chart(
        {
            "replicaCount": 1,
            "image": {"repository": "registry.example.org/ferrocast", "tag": "9.9.9"},
            "ferrocast": {
                "port": 443,
                "pingIntervalMs": 50000,
                "shutdownGraceMs": 45000,
                "wsPaths": ["/ws", "/stream"],
                "socketio": {"enabled": False},
                "extraConfig": '[namespaces.prices]\noverflow = "conflate"\n',
                "env": {"FERROCAST_SERVER_QUEUE_MAX_BYTES": 2097152},
            },
            "ingress": {"host": "rt.example.org", "tlsSecret": "rt-tls"},
        },
        release="edge",
        namespace="live",
    )
    shown = check_manifest(docs, namespace="live", host="rt.example.org", replicas=1)
    assert shown["namespaces"]["prices"]["overflow"] == "conflate"
    assert shown["server"]["ws_paths"] == ["/ws", "/stream"]
    k = by_kind(docs)
    pod = k["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 45 + 5
    assert pod["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.org/ferrocast:9.9.9"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FERROCAST_SERVER_QUEUE_MAX_BYTES"] == "2097152"
    assert k["Deployment"]["metadata"]["name"] == "edge-ferrocast"
    ann = k["Ingress"]["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "150"
    assert k["Ingress"]["spec"]["tls"][0]["secretName"] == "rt-tls"
    # A changed configuration changes the pod template, so pods roll.
    other = by_kind(render_chart({"ferrocast": {"pingIntervalMs": 20000}}))
    default = by_kind(render_chart(None))
    assert (other["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            != default["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


# --- AWS Elastic Beanstalk -------------------------------------------------------------------

EB_FILES = (
    ".platform/nginx/conf.d/ferrocast.conf",
    ".platform/nginx/conf.d/elasticbeanstalk/ferrocast.conf",
    ".ebextensions/ferrocast.config",
    "Procfile",
    "ferrocast.toml",
)


def gen_beanstalk(out: Path, *args: str) -> dict[str, str]:
    r = run_ferrocast(["gen", "elastic-beanstalk", "--out", str(out), *args])
    assert r.returncode == 0, r.stderr
    files = {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}
    assert set(files) == set(EB_FILES), sorted(files)
    return files


@needs_yaml
def test_beanstalk_bundle_is_the_generated_one(tmp_path: Path):
    files = gen_beanstalk(tmp_path / "eb")
    for rel, text in files.items():
        assert (BEANSTALK / rel).read_text() == text, f"deploy/elastic-beanstalk/{rel} differs from the generator"
    ext = yaml.safe_load(files[".ebextensions/ferrocast.config"])["option_settings"]
    assert ext["aws:elbv2:loadbalancer"]["IdleTimeout"] > 25 * 2  # above the 25 s heartbeat
    process = ext["aws:elasticbeanstalk:environment:process:default"]
    assert process["StickinessEnabled"] == "true" and process["HealthCheckPath"] == "/readyz"
    assert process["DeregistrationDelay"] > 10  # the 10 s drain
    assert ext["aws:elasticbeanstalk:environment"]["LoadBalancerType"] == "application"
    config = tomllib.loads(files["ferrocast.toml"])
    assert config["server"]["listen"] == "127.0.0.1:8080"
    assert ext["aws:elasticbeanstalk:application:environment"]["PORT"] == "8080"
    assert "--config ferrocast.toml" in files["Procfile"]
    check = run_ferrocast(["config", "check", str(tmp_path / "eb" / "ferrocast.toml")])
    assert check.returncode == 0, check.stderr
    # Settings flow into the bundle.
    files = gen_beanstalk(tmp_path / "eb2", "--set", "server.ping_interval_ms=50000", "--listen", "127.0.0.1:9100")
    assert yaml.safe_load(files[".ebextensions/ferrocast.config"])["option_settings"]["aws:elbv2:loadbalancer"]["IdleTimeout"] == 150
    assert "proxy_read_timeout 150s;" in files[".platform/nginx/conf.d/elasticbeanstalk/ferrocast.conf"]
    assert "server 127.0.0.1:9100;" in files[".platform/nginx/conf.d/ferrocast.conf"]


def beanstalk_nginx_conf(prefix: Path, listen_port: int, app_port: int) -> str:
    """An nginx.conf laid out like Elastic Beanstalk's: conf.d/*.conf at http level, and a
    port-80 server whose own `location /` proxies to $PORT and that includes
    conf.d/elasticbeanstalk/*.conf."""
    tmp = prefix / "tmp"
    return f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 65;
    map $http_upgrade $connection_upgrade {{
        default "upgrade";
    }}
    include {prefix}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{listen_port} default_server;
        gzip on;
        gzip_types text/plain text/css application/json application/javascript text/event-stream;
        location / {{
            proxy_pass http://127.0.0.1:{app_port};
            proxy_http_version 1.1;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
        include {prefix}/conf.d/elasticbeanstalk/*.conf;
    }}
}}
"""


@pytest.mark.slow
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")
async def test_beanstalk_nginx_carries_websocket_sse_and_socketio(start_server, artifacts, track_process):
    server = start_server()
    bundle = artifacts / "bundle"
    files = gen_beanstalk(bundle, "--listen", f"127.0.0.1:{server.port}")
    prefix = artifacts / "nginx"
    shutil.copytree(bundle / ".platform" / "nginx", prefix)
    (prefix / "tmp").mkdir()
    (prefix / "tmp").chmod(0o777)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(beanstalk_nginx_conf(prefix, port, server.port))
    check = subprocess.run([NGINX, "-p", str(prefix), "-c", str(conf), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t:\n{check.stderr}\n{files}"
    proc = track_process(
        ManagedProcess("nginx-eb", [NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"], prefix / "nginx.log").start()
    )
    proc.wait_until(lambda: tcp_connectable(port), 10, f"nginx listens on {port}")
    base = f"http://127.0.0.1:{port}"

    # Native WebSocket: subscribe, publish, receive, through the bundle's `location = /ws`.
    async with connect(f"ws://127.0.0.1:{port}/ws", **CONNECT_DEFAULTS) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channels": ["chat.eb"]}))
        await ws.send(json.dumps({"op": "publish", "id": 2, "channel": "chat.eb", "data": {"via": "eb"}}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame.get("type") == "msg":
                assert frame["data"] == {"via": "eb"}, frame
                break

    # Socket.IO with python-socketio: polling first, then the upgrade to WebSocket.
    sio = socketio.AsyncClient(reconnection=False)
    messages: asyncio.Queue = asyncio.Queue()
    sio.on("message", messages.put_nowait)
    await sio.connect(base, wait_timeout=5)
    try:
        for _ in range(100):
            if sio.transport() == "websocket":
                break
            await asyncio.sleep(0.05)
        assert sio.transport() == "websocket", "the polling session upgraded through nginx"
        await sio.call("subscribe", ["chat.ebsio"], timeout=5)
        await server.apublish("chat.ebsio", {"n": 1})
        assert (await asyncio.wait_for(messages.get(), 5))["data"] == {"n": 1}
    finally:
        await sio.disconnect()
    polling = socketio.AsyncClient(reconnection=False)
    await polling.connect(base, transports=["polling"], wait_timeout=5)
    try:
        assert (await polling.call("subscribe", ["chat.ebpoll"], timeout=5))["chat.ebpoll"]["offset"] == 0
    finally:
        await polling.disconnect()

    # The doctor through this proxy: upgrade, headers, protocol, SSE unbuffered, message size.
    r = await asyncio.to_thread(run_ferrocast, ["doctor", base + "/", "--json", "--timeout", "5s", "--idle", "2s"], None, 90)
    doc = json.loads(r.stdout)
    checks = {c["id"]: c for c in doc["checks"]}
    for id_ in ("upgrade", "headers", "protocol", "sse", "max_message"):
        assert checks[id_]["status"] == "pass", f"{id_}: {checks[id_]}"
    assert checks["headers"]["data"]["via_proxy"] is True, checks["headers"]

    # Publishing and metrics stay on the instance. Through Elastic Beanstalk's own
    # `location /` every request reaches ferrocast from nginx, i.e. from loopback, which may
    # publish without a key: a client from another address (127.0.0.2 stands in for the load
    # balancer) is refused by the bundle's locations, and still reaches the rest.
    def from_elsewhere(method: str, path: str, body: bytes | None = None, via: int = port) -> int:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", via, timeout=5, source_address=("127.0.0.2", 0))
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            return conn.getresponse().status
        finally:
            conn.close()

    publish = json.dumps({"channel": "chat.eb", "data": "from outside"}).encode()
    assert from_elsewhere("POST", "/api/publish", publish) == 403
    assert from_elsewhere("GET", "/metrics") == 403
    assert from_elsewhere("GET", "/readyz") == 200  # Elastic Beanstalk's own location /
    assert from_elsewhere("GET", "/api/stats") == 200
    # From the instance itself both work.
    assert http_request(base + "/api/publish", "POST", {"channel": "chat.eb", "data": 1}).status == 200
    r = await asyncio.to_thread(
        urllib.request.urlopen, urllib.request.Request(base + "/metrics"), None, 5
    )
    assert r.status == 200 and "ferrocast_connections" in r.read().decode()

    # Without the bundle, Elastic Beanstalk's `location /` lets that outside client publish
    # (ferrocast sees nginx's loopback address): what the bundle's locations prevent.
    bare = artifacts / "nginx-bare"
    (bare / "conf.d" / "elasticbeanstalk").mkdir(parents=True)
    (bare / "tmp").mkdir()
    (bare / "tmp").chmod(0o777)
    bare_port = free_port()
    (bare / "nginx.conf").write_text(beanstalk_nginx_conf(bare, bare_port, server.port))
    proc = track_process(
        ManagedProcess("nginx-eb-bare", [NGINX, "-p", bare, "-c", bare / "nginx.conf", "-g", "daemon off;"],
                       bare / "nginx.log").start()
    )
    proc.wait_until(lambda: tcp_connectable(bare_port), 10, f"nginx listens on {bare_port}")
    assert from_elsewhere("POST", "/api/publish", publish, via=bare_port) == 200
    assert from_elsewhere("GET", "/metrics", via=bare_port) == 200


@needs_yaml
def test_kubernetes_manifest_with_tls_mounts_the_secret_and_speaks_https():
    """With [server.tls] the pods serve TLS: the Secret is mounted where the configuration
    points, probes and the Ingress's backend speak HTTPS, and it all passes the schema."""
    text = gen(
        "kubernetes",
        "--set", "server.tls.cert_file=/anywhere/cert.pem",
        "--set", "server.tls.key_file=/anywhere/key.pem",
        "--tls-secret", "push-tls",
    )
    docs = load_docs(text)
    k = by_kind(docs)
    config = tomllib.loads(k["ConfigMap"]["data"]["ferrocast.toml"])
    tls = config["server"]["tls"]
    pod = k["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert tls == {"cert_file": f"{mount['mountPath']}/tls.crt", "key_file": f"{mount['mountPath']}/tls.key"}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "push-tls"
    assert container["ports"][0]["name"] == "https"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", container[probe]
        assert container[probe]["httpGet"]["port"] == "https"
    service_port = k["Service"]["spec"]["ports"][0]
    assert (service_port["name"], service_port["port"]) == ("https", 443)
    ingress = k["Ingress"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    backends = {p["backend"]["service"]["port"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert backends == {"https"}
    schema_validate(docs)


@needs_yaml
def test_beanstalk_tls_ends_at_the_load_balancer(tmp_path: Path):
    arn = "arn:aws:acm:eu-west-1:123456789012:certificate/abc"
    files = gen_beanstalk(tmp_path / "eb", "--certificate-arn", arn)
    listener = yaml.safe_load(files[".ebextensions/ferrocast.config"])["option_settings"]["aws:elbv2:listener:443"]
    assert listener == {
        "ListenerEnabled": "true",
        "Protocol": "HTTPS",
        "SSLCertificateArns": arn,
        "SSLPolicy": "ELBSecurityPolicy-TLS13-1-2-2021-06",
    }
    # ferrocast's own TLS does not fit behind Elastic Beanstalk's nginx: refused, saying why.
    r = run_ferrocast([
        "gen", "elastic-beanstalk", "--out", str(tmp_path / "eb2"),
        "--set", "server.tls.cert_file=/c.pem", "--set", "server.tls.key_file=/k.pem",
    ])
    assert r.returncode == 2 and "--certificate-arn" in r.stderr, r.stderr
    assert not (tmp_path / "eb2").exists()


def _threads(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def test_one_core_is_left_to_the_ingress_runtime(start_server):
    """`ferrocast serve` runs the fan-out on one worker per core but one (at least one) and
    publishes on its own `ferrocast-ingress` thread; TOKIO_WORKER_THREADS overrides the
    workers."""
    cores = len(os.sched_getaffinity(0))
    server = start_server()
    threads = _threads(server.process.pid)
    assert threads.count("ferrocast-ingre") == 1, threads  # comm is cut at 15 bytes
    assert threads.count("tokio-rt-worker") == max(1, cores - 1), (cores, threads)

    server = start_server(env={"TOKIO_WORKER_THREADS": "3"})
    threads = _threads(server.process.pid)
    assert threads.count("tokio-rt-worker") == 3, threads
    assert threads.count("ferrocast-ingre") == 1, threads
