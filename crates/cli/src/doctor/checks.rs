//! The checks, one method each, in the order they run. Each returns an [`Outcome`] and
//! leaves what later checks need (addresses, the connector, the open WebSocket) on the
//! [`Doctor`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::net::{Connector, EndpointKind, HttpReply, NetError, Upgrade};
use super::probes::{self, Ended, FirstFrame, Held, NativeConn, SizeResult};
use super::report::{Fix, Outcome};
use super::sse::{self, Publisher};
use super::sticky::{self, Tally};
use super::{Diag, Doctor, UpgradeAnswer, fixes, tls};

/// Pings per round-trip measurement, and their spacing.
const RTT_PINGS: usize = 5;
const RTT_GAP: Duration = Duration::from_millis(150);
/// A median round trip above this is reported as slow.
const RTT_SLOW: Duration = Duration::from_millis(300);
/// Upper bound of the message-size search when the server's limit is unknown.
const SIZE_SEARCH_MAX: usize = 1 << 20;
/// Smallest frame the size search tries; if even this fails, the path is broken.
const SIZE_SEARCH_MIN: usize = 128;
/// How long the first frame after an upgrade is waited for.
const FIRST_FRAME_WAIT: Duration = Duration::from_secs(3);
/// How long the fallback check waits for the head of the event stream.
const FALLBACK_HEAD_WAIT: Duration = Duration::from_secs(3);

/// The heartbeat rule, stated in every idle-probe verdict.
const HEARTBEAT_RULE: &str = "rule: the server heartbeat (server.ping_interval_ms) must be shorter than every \
     intermediary's idle timeout, ideally at most half of it; clients that answer pings then stay up";

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 { format!("{s:.0} s") } else { format!("{s:.1} s") }
}

/// Whole seconds, rounded (a proxy's 5 s timeout is measured as 4.99 s), at least 1.
fn whole_secs(d: Duration) -> u64 {
    (d.as_secs_f64().round() as u64).max(1)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl Doctor {
    // ---- 1. DNS -------------------------------------------------------------------------

    pub(super) async fn dns(&mut self) -> Outcome {
        let (host, port) = (self.target.host.clone(), self.target.port);
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.addrs = vec![SocketAddr::new(ip, port)];
            return Outcome::pass(format!("{host} is an address literal; no lookup needed"));
        }
        match tokio::time::timeout(
            self.args.timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(found)) => {
                let mut addrs: Vec<SocketAddr> = Vec::new();
                for a in found {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if addrs.is_empty() {
                    return Outcome::fail(format!("{host} resolves to no address"))
                        .cause("the name exists but has no A or AAAA record")
                        .fixes(fixes::dns(&host));
                }
                let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                self.addrs = addrs;
                Outcome::pass(format!("{host} → {}", list.join(", ")))
                    .data(json!({ "addresses": list }))
            }
            Ok(Err(e)) => Outcome::fail(format!("cannot resolve {host}: {e}"))
                .cause("no A/AAAA record for the name, a typo in it, or no reachable DNS resolver")
                .fixes(fixes::dns(&host)),
            Err(_) => Outcome::fail(format!(
                "no DNS answer for {host} within {}",
                secs(self.args.timeout)
            ))
            .cause("the resolver is unreachable or slow (check /etc/resolv.conf)")
            .fixes(fixes::dns(&host)),
        }
    }

    // ---- 2. TCP -------------------------------------------------------------------------

    pub(super) async fn tcp(&mut self) -> Outcome {
        if self.addrs.is_empty() {
            return Outcome::skip("needs an address (the DNS lookup failed)");
        }
        let port = self.target.port;
        let mut working = Vec::new();
        let mut failed: Vec<(SocketAddr, String, bool)> = Vec::new();
        let mut first_ms = None;
        for addr in self.addrs.clone() {
            let started = Instant::now();
            match tokio::time::timeout(self.args.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(_)) => {
                    first_ms.get_or_insert(started.elapsed());
                    working.push(addr);
                }
                Ok(Err(e)) => failed.push((
                    addr,
                    e.to_string(),
                    e.kind() == std::io::ErrorKind::ConnectionRefused,
                )),
                Err(_) => failed.push((
                    addr,
                    format!("no answer within {}", secs(self.args.timeout)),
                    false,
                )),
            }
        }
        let failures: Vec<String> = failed.iter().map(|(a, e, _)| format!("{a}: {e}")).collect();
        let Some(elapsed) = first_ms else {
            let refused = failed.iter().all(|(_, _, refused)| *refused);
            let outcome = Outcome::fail(format!("cannot connect to port {port}")).details(failures);
            return if refused {
                outcome
                    .cause(format!("nothing listens on port {port} there (connection refused)"))
                    .fixes(fixes::connection_refused(port))
            } else {
                outcome
                    .cause("packets are dropped on the way: a firewall or security group does not allow the port")
                    .fixes(fixes::connect_timeout(port))
            };
        };
        // Later probes use the addresses that answered, in order.
        self.addrs = working.clone();
        if !self.target.secure {
            self.connector = Some(Connector {
                target: self.target.clone(),
                addrs: working.clone(),
                tls: None,
                timeout: self.args.timeout,
            });
        }
        let summary = format!("connected to {} in {}", working[0], ms(elapsed));
        let public_failures: Vec<&(SocketAddr, String, bool)> =
            failed.iter().filter(|(a, _, _)| !a.ip().is_loopback()).collect();
        if public_failures.is_empty() {
            Outcome::pass(summary)
                .details(failures)
                .data(json!({"connect_ms": elapsed.as_secs_f64() * 1000.0}))
        } else {
            Outcome::warn(format!("{summary}, but {} of {} addresses did not answer", failed.len(), failed.len() + working.len()))
                .details(failures)
                .cause("clients that try a dead address first wait or fail: usually an AAAA record for a host whose proxy does not listen on IPv6")
                .fixes([Fix::new("nginx", format!("listen [::]:{port};   # next to listen {port};  (or remove the AAAA record)"))])
        }
    }

    // ---- 3. TLS -------------------------------------------------------------------------

    pub(super) async fn tls(&mut self) -> Outcome {
        if !self.target.secure {
            return Outcome::skip("plain ws:// or http://: no TLS on this hop");
        }
        let Some(verifying) = self.tls.clone() else {
            return Outcome::skip("no TLS configuration");
        };
        if self.addrs.is_empty() {
            return Outcome::skip("needs a TCP connection (an earlier check failed)");
        }
        let addr = self.addrs[0];
        let timeout = self.args.timeout;
        let tcp = match TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => return Outcome::fail(format!("cannot reconnect to {addr}: {e}")),
        };
        let (outcome, config) = tls::check(
            tcp,
            &self.target.host,
            verifying,
            self.args.insecure,
            timeout,
            || async move { TcpStream::connect(addr).await.ok() },
        )
        .await;
        let mut outcome = outcome;
        if let Some(config) = &config
            && let Ok(tcp) = TcpStream::connect(addr).await
        {
            let path = self.upgrade_path();
            let offer = tokio::time::timeout(
                timeout,
                tls::http_offer(tcp, &self.target.host, config, &path),
            )
            .await;
            match offer {
                Ok(Ok(offer)) => {
                    let (lines, data) = offer.describe();
                    outcome = outcome.details(lines);
                    match (&mut outcome.data, data) {
                        (Value::Object(map), Value::Object(extra)) => map.extend(extra),
                        (slot, extra) => *slot = extra,
                    }
                }
                Ok(Err(e)) => outcome = outcome.detail(format!("HTTP/2 probe failed: {e}")),
                Err(_) => outcome = outcome.detail("HTTP/2 probe: no answer in time"),
            }
        }
        if let Some(config) = config {
            self.connector = Some(Connector {
                target: self.target.clone(),
                addrs: self.addrs.clone(),
                tls: Some(config),
                timeout,
            });
        } else if !self.args.insecure {
            return outcome.detail(
                "later checks need TLS; rerun with --insecure (-k) to look past the certificate",
            );
        }
        outcome
    }

    // ---- 4. Upgrade ---------------------------------------------------------------------

    /// The path the upgrade is attempted on: the native path, or the Socket.IO WebSocket
    /// transport URL when the target is a Socket.IO endpoint.
    fn upgrade_path(&self) -> String {
        if self.target.kind != EndpointKind::SocketIo {
            return self.ws_path.clone();
        }
        socketio_websocket_path(self.target.path.as_deref().unwrap_or("/socket.io/"))
    }

    pub(super) async fn upgrade(&mut self) -> Outcome {
        let path = self.upgrade_path();
        let extra = self.upgrade_extra();
        let answer = match self.connector().upgrade(&path, &extra).await {
            Ok(Upgrade::Upgraded { mut ws, handshake, .. }) => {
                let first = probes::first_frame(&mut ws, FIRST_FRAME_WAIT).await;
                match &first {
                    FirstFrame::Welcome(w) => self.native = Some(NativeConn::new(ws, w.clone())),
                    FirstFrame::Ended(_) => {}
                    _ => self.other_ws = Some(ws),
                }
                let outcome = self.judge_upgraded(&path, &first, handshake);
                self.upgrade = Some(UpgradeAnswer::Upgraded { first });
                return outcome;
            }
            Ok(Upgrade::Refused(reply)) => UpgradeAnswer::Refused(reply),
            Err(e) => UpgradeAnswer::Failed(e),
        };
        let outcome = match &answer {
            UpgradeAnswer::Refused(reply) => self.judge_refused(&path, reply),
            UpgradeAnswer::Failed(e) => judge_failed(&path, e),
            UpgradeAnswer::Upgraded { .. } => unreachable!("returned above"),
        };
        self.upgrade = Some(answer);
        outcome
    }

    fn judge_upgraded(&self, path: &str, first: &FirstFrame, handshake: Duration) -> Outcome {
        let head = format!("101 Switching Protocols on {path} in {}", ms(handshake));
        match first {
            FirstFrame::Welcome(w) => Outcome::pass(format!(
                "{head}; ferrocast welcome (protocol v{}, heartbeat every {})",
                w.version,
                secs(Duration::from_millis(w.ping_interval_ms))
            ))
            .data(json!({"status": 101, "session": w.session, "ping_interval_ms": w.ping_interval_ms})),
            FirstFrame::EngineIoOpen(open) => {
                Outcome::pass(format!("{head}; Engine.IO open packet (a Socket.IO server)")).data(json!({"status": 101, "engineio": open}))
            }
            FirstFrame::Other(text) => Outcome::pass(format!("{head}; first frame: {text}")),
            FirstFrame::Nothing => Outcome::pass(format!("{head}; the server waits for the client to speak first")),
            FirstFrame::Ended(end) => {
                let summary = format!("{head}, then closed at once: {end}");
                match end.code() {
                    Some(1008) => Outcome::fail(summary)
                        .cause("the server refused the Origin (ferrocast: server.allowed_origins does not list it)")
                        .fixes(fixes::origin_allowlist(self.args.origin.as_deref().unwrap_or("https://your.site"))),
                    Some(1013) => Outcome::fail(summary)
                        .cause("the server is at its connection limit (server.max_connections) or overloaded")
                        .fixes([Fix::new("ferrocast", "ferrocast serve --set server.max_connections=200000   # and raise LimitNOFILE")]),
                    Some(1001) => Outcome::warn(summary).cause("the server is draining for a restart; clients reconnect after the hinted delay"),
                    Some(4001 | 4003) => Outcome::fail(summary)
                        .cause("the server requires credentials this connection did not present")
                        .fixes([Fix::new("client", "send the credentials the server expects with the upgrade (a token in the URL or a header)")]),
                    _ => Outcome::fail(summary)
                        .cause("an intermediary accepted the upgrade but does not carry WebSocket frames, or the server failed right after it")
                        .fixes(fixes::upgrade_headers(strip_query(path))),
                }
            }
        }
    }

    /// What the server received for the diagnostics upgrade, when it was not an upgrade.
    fn received_evidence(&self) -> Vec<String> {
        match &self.diag {
            Diag::Report { report, upgraded: false } => {
                let req = &report["request"];
                let header = |name: &str| {
                    let values: Vec<&str> = req["headers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|h| h[0] == name)
                        .filter_map(|h| h[1].as_str())
                        .collect();
                    if values.is_empty() { "(missing)".to_owned() } else { values.join(", ") }
                };
                vec![format!(
                    "ferrocast received the same upgrade (on /api/diagnostics) as {} with Upgrade: {}, Connection: {}",
                    req["http_version"].as_str().unwrap_or("?"),
                    header("upgrade"),
                    header("connection")
                )]
            }
            _ => Vec::new(),
        }
    }

    fn proxy_fixes(&self, path: &str) -> Vec<Fix> {
        let mut out = fixes::upgrade_headers(strip_query(path));
        if self.diag.report().is_some_and(|r| r["request"]["http_version"] == "HTTP/1.0") {
            out.extend(fixes::http_version());
        }
        out
    }

    fn judge_refused(&self, path: &str, reply: &HttpReply) -> Outcome {
        let status = reply.status;
        let body = reply.json();
        let from = reply.origin_note();
        let evidence = self.received_evidence();
        let stripped = !evidence.is_empty();
        let snippet = reply.snippet();
        let answered =
            format!("{} {}{from}", status.as_u16(), status.canonical_reason().unwrap_or(""));
        let base = |o: Outcome| {
            o.details(evidence.clone())
                .detail(format!("body: {snippet}"))
                .data(json!({"status": status.as_u16()}))
        };
        match status.as_u16() {
            426 => {
                let ferrocast = body.as_ref().is_some_and(|b| b["error"] == "upgrade_required");
                let mut cause = "a proxy in between does not forward the Upgrade and Connection headers (nginx forwards neither unless told to, and talks HTTP/1.0 to the upstream by default), so the server got a plain GET".to_owned();
                if !ferrocast {
                    cause.push_str("; or the application behind this path cannot complete WebSocket upgrades (a framework route that only serves plain HTTP)");
                }
                base(Outcome::fail(format!("{answered} instead of 101: the server received a plain request, not an upgrade")))
                    .cause(cause)
                    .fixes(self.proxy_fixes(path))
            }
            400 => {
                let engineio = body.as_ref().filter(|b| b.get("code").is_some() && b.get("message").is_some());
                let cause = if let Some(e) = engineio {
                    format!("a Socket.IO server rejected the handshake parameters: code {} \"{}\" (code 5 means an Engine.IO version mismatch: socket.io v2 servers speak EIO=3)", e["code"], e["message"].as_str().unwrap_or(""))
                } else if stripped {
                    "the proxy removes the Upgrade/Connection headers, so the server sees a GET with stray WebSocket headers and rejects it".to_owned()
                } else {
                    "the server rejected the handshake: usually a proxy removed Upgrade, Connection or Sec-WebSocket-Key on the way, or a Socket.IO endpoint got a request without ?EIO=4&transport=websocket".to_owned()
                };
                base(Outcome::fail(format!("{answered} to the upgrade"))).cause(cause).fixes(self.proxy_fixes(path))
            }
            404 => {
                let socketio_off = body.as_ref().is_some_and(|b| b["error"] == "socketio_disabled");
                let mut outcome = base(Outcome::fail(format!("{answered}: nothing serves {}", strip_query(path))));
                if self.target.path.is_none() {
                    outcome = outcome.detail("the URL has no path, so ferrocast's default /ws was tried: give the WebSocket URL your clients use");
                }
                if socketio_off {
                    outcome.cause("ferrocast answers, but has Socket.IO turned off (see the protocol check)")
                } else if reply.written_by_proxy() && self.diag.report().is_none() {
                    outcome
                        .cause("the proxy has no location for this path (or its proxy_pass rewrites the path) and answers itself")
                        .fixes(fixes::upgrade_headers(strip_query(path)))
                } else if self.diag.report().is_some() {
                    outcome
                        .cause("ferrocast does not serve a WebSocket at this path (see the protocol check)")
                        .fixes(fixes::ws_path_alias(strip_query(path), &self.diag.ws_paths()))
                } else {
                    outcome.cause("wrong path, or a different protocol than the client expects (see the protocol check)")
                }
            }
            200 => base(Outcome::fail(format!(
                "{answered} instead of 101: a page answered ({}), not a WebSocket endpoint",
                reply.header("content-type").unwrap_or("no content type")
            )))
            .cause("the proxy routes this path to a static site or an application's catch-all (an SPA's try_files … /index.html, a dashboard) instead of the WebSocket server, or strips the upgrade so the backend serves a plain GET")
            .fixes(self.proxy_fixes(path)),
            301 | 302 | 303 | 307 | 308 => {
                let location = reply.header("location").unwrap_or("(no Location header)").to_owned();
                base(Outcome::fail(format!("{answered} redirect to {location}: WebSocket clients do not follow redirects")))
                    .cause("an http→https redirect, a trailing-slash redirect (/ws → /ws/), or a login page")
                    .fixes([
                        Fix::new("client", format!("connect to the final URL directly: {location}")),
                        Fix::new("nginx", format!("location = {} {{ proxy_pass http://ferrocast; ... }}   # exact match: no slash redirect", strip_query(path))),
                    ])
            }
            401 | 403 => base(Outcome::fail(format!("{answered}: refused before the upgrade")))
                .cause("authentication in front (proxy basic auth, an API gateway key), an IP allowlist or a WAF rule")
                .fixes([Fix::new("nginx", "auth_basic off;   # in the WebSocket location, if the site is password-protected")]),
            502 => base(Outcome::fail(format!("{answered}: the proxy cannot reach the server")))
                .cause("the server behind the proxy is down, or the proxy's upstream address or port is wrong")
                .fixes(fixes::proxy_upstream()),
            503 => base(Outcome::fail(answered.clone()))
                .cause("no healthy backend, the server is overloaded, or it is draining for a restart")
                .fixes(fixes::proxy_upstream()),
            504 => base(Outcome::fail(format!("{answered}: the proxy reached nothing in time")))
                .cause("the proxy cannot reach the server in time: a firewall between them, a wrong port, or an overloaded server")
                .fixes(fixes::proxy_upstream()),
            _ => base(Outcome::fail(format!("{answered} instead of 101 Switching Protocols"))).fixes(self.proxy_fixes(path)),
        }
    }

    // ---- 5. Headers ---------------------------------------------------------------------

    pub(super) fn headers(&self) -> Outcome {
        let Some(report) = self.diag.report() else {
            return Outcome::skip(format!(
                "cannot see what the server received: {}",
                self.diag.why_missing()
            ));
        };
        let upgraded = matches!(self.diag, Diag::Report { upgraded: true, .. });
        let req = &report["request"];
        let received: Vec<(String, String)> = req["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| Some((h[0].as_str()?.to_owned(), h[1].as_str()?.to_owned())))
            .collect();
        let values = |name: &str| -> Vec<&str> {
            received.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
        };
        let has_token = |name: &str, token: &str| {
            values(name).iter().any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        let version = req["http_version"].as_str().unwrap_or("?").to_owned();
        let host = values("host").first().map(|h| h.to_string()).unwrap_or_default();
        const SENT: &[&str] = &[
            "host",
            "user-agent",
            "upgrade",
            "connection",
            "sec-websocket-key",
            "sec-websocket-version",
            "origin",
            "authorization",
            "content-length",
        ];
        let added: Vec<String> = received
            .iter()
            .filter(|(n, _)| !SENT.contains(&n.as_str()))
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        let forwarded = |n: &str| !values(n).is_empty();
        let via_proxy = forwarded("x-forwarded-for")
            || forwarded("forwarded")
            || forwarded("x-real-ip")
            || forwarded("via")
            || version != "HTTP/1.1"
            || host != self.target.authority;

        let mut details = vec![format!(
            "sent: GET /api/diagnostics HTTP/1.1, Host: {}, Upgrade: websocket, Connection: Upgrade",
            self.target.authority
        )];
        let show = |name: &str| {
            let v = values(name);
            if v.is_empty() { "(missing)".to_owned() } else { v.join(", ") }
        };
        details.push(format!(
            "received: {version}, Host: {host}, Upgrade: {}, Connection: {}, from {}",
            show("upgrade"),
            show("connection"),
            report["peer"].as_str().unwrap_or("?")
        ));
        if !added.is_empty() {
            details.push(format!("added on the way: {}", added.join("; ")));
        }
        let data = json!({"via_proxy": via_proxy, "http_version": version, "received": received, "upgraded": upgraded});

        let mut lost = Vec::new();
        if version == "HTTP/1.0" {
            lost.push("the request arrived as HTTP/1.0, which cannot upgrade");
        }
        if !has_token("upgrade", "websocket") {
            lost.push("the Upgrade header was removed");
        }
        if !has_token("connection", "upgrade") {
            lost.push("Connection: Upgrade was replaced");
        }
        if values("sec-websocket-key").is_empty() {
            lost.push("Sec-WebSocket-Key was removed");
        }
        if !lost.is_empty() {
            let summary = format!("a proxy changed the upgrade: {}", lost.join("; "));
            let native_works = matches!(self.upgrade, Some(UpgradeAnswer::Upgraded { .. }));
            let outcome = if native_works {
                Outcome::warn(format!("{summary} (on /api/diagnostics; {} upgrades fine)", strip_query(&self.ws_path)))
                    .cause("the proxy forwards upgrades per location: clients are fine, but the doctor's idle probe falls back to the WebSocket path")
            } else {
                Outcome::fail(summary).cause(
                    "the proxy does not forward the hop-by-hop Upgrade and Connection headers (they must be set explicitly) or talks HTTP/1.0 to the server",
                )
            };
            // When the upgrade check already failed for this reason, its fixes apply.
            let upgrade_failed = matches!(self.upgrade, Some(UpgradeAnswer::Refused(_)));
            let outcome = if upgrade_failed {
                outcome.detail("fix: as for the upgrade check above")
            } else {
                outcome.fixes(self.proxy_fixes(&self.ws_path))
            };
            return outcome.details(details).data(data);
        }
        if !via_proxy {
            return Outcome::pass("no proxy in between: ferrocast received the upgrade as sent")
                .details(details)
                .data(data);
        }
        if !forwarded("x-forwarded-for") && !forwarded("forwarded") {
            return Outcome::warn("via a proxy that does not say for whom: no X-Forwarded-For or Forwarded header")
                .details(details)
                .cause("the server logs the proxy's address for every client and cannot tell clients apart (limits, diagnostics access)")
                .fixes(fixes::forwarded_for())
                .data(data);
        }
        let mut summary = format!("via a proxy: upgrade headers forwarded, {version}");
        for name in ["x-forwarded-for", "x-forwarded-proto"] {
            if forwarded(name) {
                summary.push_str(&format!(", {name}: {}", values(name).join(", ")));
            }
        }
        if host == self.target.host {
            details.push(
                "note: the port was dropped from the Host header (nginx's $host does that; $http_host keeps it)".into(),
            );
        } else if host != self.target.authority {
            details.push(format!(
                "note: the Host header was rewritten ({} → {host}); nginx: proxy_set_header Host $host;",
                self.target.authority
            ));
        }
        Outcome::pass(summary).details(details).data(data)
    }

    // ---- 6. Protocol --------------------------------------------------------------------

    /// The Socket.IO path: the server's setting, else the URL's, else `/socket.io`.
    fn socketio_path(&self) -> String {
        if let Some(p) = self.diag.settings().and_then(|s| s["socketio"]["path"].as_str()) {
            return p.trim_end_matches('/').to_owned();
        }
        if self.target.kind == EndpointKind::SocketIo
            && let Some(p) = &self.target.path
        {
            return strip_query(p).trim_end_matches('/').to_owned();
        }
        "/socket.io".into()
    }

    async fn socketio_polling(&self) -> Result<HttpReply, NetError> {
        self.connector()
            .get(&format!("{}/?EIO=4&transport=polling", self.socketio_path()), &[])
            .await
    }

    fn is_ferrocast(&self) -> bool {
        self.native.is_some() || self.diag.report().is_some()
    }

    pub(super) async fn protocol(&mut self) -> Outcome {
        let first = match &self.upgrade {
            Some(UpgradeAnswer::Upgraded { first, .. }) => Some(first.clone()),
            _ => None,
        };
        if self.target.kind == EndpointKind::SocketIo {
            return self.protocol_socketio(first).await;
        }
        let path = strip_query(&self.ws_path).to_owned();
        match first {
            Some(FirstFrame::Welcome(w)) => {
                return Outcome::pass(format!(
                    "{path} speaks ferrocast's native protocol v{} (session {})",
                    w.version, w.session
                ));
            }
            Some(FirstFrame::EngineIoOpen(_)) => {
                return Outcome::fail(format!(
                    "{path} speaks Engine.IO / Socket.IO, not ferrocast's native protocol"
                ))
                .cause("a native WebSocket client is pointed at a Socket.IO endpoint")
                .fixes(fixes::native_client_to_socketio(&self.socketio_path()));
            }
            Some(FirstFrame::Other(_) | FirstFrame::Nothing) => {
                let mut o = Outcome::warn(format!(
                    "a WebSocket server answers at {path}, but not with ferrocast's welcome"
                ));
                if self.diag.report().is_some() {
                    o = o.cause("ferrocast runs on this host, but the proxy sends this path to another server");
                }
                return o.detail("checks that need ferrocast's protocol use generic probes");
            }
            Some(FirstFrame::Ended(_)) => {
                return Outcome::skip(
                    "the connection closed before the server spoke (see the upgrade check)",
                );
            }
            None => {}
        }
        // No upgrade: tell a proxy problem from a protocol mismatch.
        if let Some(UpgradeAnswer::Refused(reply)) = &self.upgrade
            && reply.json().is_some_and(|b| b["error"] == "upgrade_required")
        {
            return Outcome::pass(format!(
                "{path} is a ferrocast WebSocket path (its 426 answer says so); the upgrade is lost on the way (check 4)"
            ));
        }
        let ws_paths = self.diag.ws_paths();
        if !ws_paths.is_empty() && !ws_paths.iter().any(|p| p == &path) {
            return Outcome::fail(format!(
                "{path} is not one of ferrocast's WebSocket paths ({})",
                ws_paths.join(", ")
            ))
            .cause("the client uses another URL than the server serves (an app moved from its own server to ferrocast keeps its old path)")
            .fixes(fixes::ws_path_alias(&path, &ws_paths));
        }
        match self.socketio_polling().await {
            Ok(reply) if engineio_open(&reply).is_some() => Outcome::fail(format!(
                "the server speaks Socket.IO (Engine.IO v4 at {}/), and {path} is no native WebSocket endpoint",
                self.socketio_path()
            ))
            .cause("a native WebSocket client is pointed at a Socket.IO server")
            .fixes(fixes::native_client_to_socketio(&self.socketio_path())),
            _ => Outcome::skip(format!("no endpoint answered at {path}, so the protocol cannot be told (see check 4)")),
        }
    }

    async fn protocol_socketio(&mut self, first: Option<FirstFrame>) -> Outcome {
        let sio = self.socketio_path();
        let polling = self.socketio_polling().await;
        let polling_open = polling.as_ref().ok().and_then(engineio_open);
        if let Some(FirstFrame::EngineIoOpen(open)) = &first {
            return Outcome::pass(format!(
                "Socket.IO (Engine.IO v4) at {sio}/: websocket{} transport answers (pingInterval {} ms)",
                if polling_open.is_some() { " and polling" } else { "" },
                open["pingInterval"]
            ));
        }
        if let Some(open) = polling_open {
            return Outcome::pass(format!(
                "Socket.IO (Engine.IO v4) answers long-polling at {sio}/ (pingInterval {} ms); its WebSocket upgrade fails (check 4)",
                open["pingInterval"]
            ));
        }
        let reply = polling.ok();
        if reply
            .as_ref()
            .and_then(HttpReply::json)
            .is_some_and(|b| b["error"] == "socketio_disabled")
        {
            return Outcome::fail(format!("ferrocast answers {sio}/ but has Socket.IO turned off"))
                .cause("a Socket.IO client (io(...)) against a ferrocast server serving only native WebSocket and SSE")
                .fixes(fixes::socketio_client_to_native(self.diag.ws_paths().first().map_or("/ws", String::as_str)));
        }
        // Is there a native endpoint instead? (the classic 404 flood on /socket.io/)
        let native_path = self.diag.ws_paths().first().cloned().unwrap_or_else(|| "/ws".into());
        let extra = self.upgrade_extra();
        if let Ok(conn) = NativeConn::open(self.connector(), &native_path, &extra).await {
            conn.close().await;
            return Outcome::fail(format!("no Socket.IO at {sio}/, but a native ferrocast WebSocket answers at {native_path}"))
                .cause("protocol mismatch: the client speaks Socket.IO (io(...)), the server plain WebSocket; every poll ends in 404")
                .fixes(fixes::socketio_client_to_native(&native_path));
        }
        if let Some(r) = reply.filter(|r| r.status == StatusCode::BAD_REQUEST) {
            return Outcome::fail(format!("{sio}/ rejects the Engine.IO v4 handshake: {}", r.snippet()))
                .cause("an Engine.IO version mismatch (socket.io v2 servers speak EIO=3; v3/v4 speak EIO=4)")
                .fixes([Fix::new("client", "use the socket.io-client major version that matches the server (v2 server: client v2; v3/v4 server: client v4), or upgrade the server")]);
        }
        Outcome::fail(format!("nothing speaks Socket.IO at {sio}/"))
            .cause("wrong path, or the proxy does not route it to the Socket.IO server")
            .fixes(fixes::upgrade_headers(&format!("{sio}/")))
    }

    // ---- 7. RTT -------------------------------------------------------------------------

    pub(super) async fn rtt(&mut self) -> Outcome {
        let timeout = self.args.timeout.min(Duration::from_secs(5));
        let (rtt, how) = if let Some(conn) = self.native.as_mut() {
            (probes::native_rtt(conn, RTT_PINGS, RTT_GAP, timeout).await, "native ping/pong")
        } else if let Some(ws) = self.other_ws.as_mut() {
            (probes::control_rtt(ws, RTT_PINGS, RTT_GAP, timeout).await, "WebSocket control pings")
        } else if let Some(path) = self.diag.ws_paths().first().cloned() {
            match NativeConn::open(self.connector(), &path, &self.upgrade_extra()).await {
                Ok(mut conn) => {
                    let rtt = probes::native_rtt(&mut conn, RTT_PINGS, RTT_GAP, timeout).await;
                    conn.close().await;
                    (rtt, "native ping/pong")
                }
                Err(e) => return Outcome::skip(format!("no WebSocket to measure on: {e}")),
            }
        } else {
            return Outcome::skip("needs an open WebSocket (the upgrade check did not get one)");
        };
        let data = json!({
            "samples_ms": rtt.samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
            "lost": rtt.lost,
        });
        let Some(median) = rtt.median() else {
            return Outcome::fail(format!("no answer to {RTT_PINGS} pings ({how})"))
                .cause("frames do not pass after the upgrade: an intermediary accepted it but does not carry WebSocket traffic")
                .fixes(fixes::upgrade_headers(strip_query(&self.ws_path)))
                .data(data);
        };
        let summary = format!(
            "median {} (min {}, max {}) over {} {how}",
            ms(median),
            ms(rtt.min().unwrap_or_default()),
            ms(rtt.max().unwrap_or_default()),
            rtt.samples.len()
        );
        if rtt.lost > 0 {
            Outcome::warn(format!("{summary}; {} of {RTT_PINGS} pings unanswered", rtt.lost))
                .cause("a lossy or congested path, or an intermediary that delays frames")
                .data(data)
        } else if median > RTT_SLOW {
            Outcome::warn(format!("slow: {summary}"))
                .cause("every update reaches clients at least this late: distance to the server, a congested link, or a proxy that delays frames")
                .data(data)
        } else {
            Outcome::pass(summary).data(data)
        }
    }

    // ---- 8. Largest message -------------------------------------------------------------

    pub(super) async fn max_message(&mut self) -> Outcome {
        let path = if self.native.is_some() {
            self.ws_path.clone()
        } else if let Some(p) = self.diag.ws_paths().first() {
            p.clone()
        } else {
            return Outcome::skip(
                "needs ferrocast's native protocol (the probe sends padded pings)",
            );
        };
        let limit = self.diag.setting_u64("max_frame_bytes").map(|l| l as usize);
        let connector = self.connector().clone();
        let extra = self.upgrade_extra();
        let try_size = |size: usize| {
            let (connector, path, extra) = (connector.clone(), path.clone(), extra.clone());
            async move { probes::try_frame_size(&connector, &path, &extra, size).await }
        };
        let upper = limit.unwrap_or(SIZE_SEARCH_MAX);
        let (passing, cut) = match try_size(upper).await {
            SizeResult::Passed => (upper, None),
            SizeResult::NoConnection(e) => {
                return Outcome::skip(format!("cannot open {path}: {e}"));
            }
            SizeResult::Refused(first_end) => {
                if try_size(SIZE_SEARCH_MIN).await != SizeResult::Passed {
                    return Outcome::fail(format!(
                        "even a {SIZE_SEARCH_MIN}-byte frame does not pass on {path}"
                    ))
                    .cause("frames are not carried after the upgrade")
                    .fixes(fixes::upgrade_headers(strip_query(&path)));
                }
                let (mut lo, mut hi, mut how) = (SIZE_SEARCH_MIN, upper, first_end);
                while hi - lo > (lo / 50).max(64) {
                    let mid = lo + (hi - lo) / 2;
                    match try_size(mid).await {
                        SizeResult::Passed => lo = mid,
                        SizeResult::Refused(end) => {
                            hi = mid;
                            how = end;
                        }
                        SizeResult::NoConnection(e) => {
                            return Outcome::fail(format!(
                                "reconnecting to {path} failed during the search: {e}"
                            ));
                        }
                    }
                }
                (lo, Some(how))
            }
        };
        let mut details = Vec::new();
        if let (Some(limit), None) = (limit, &cut) {
            match try_size(limit + 1).await {
                SizeResult::Refused(Ended::Closed(1009, _)) => details
                    .push(format!("a {}-byte frame is closed with 1009, as documented", limit + 1)),
                SizeResult::Refused(end) => {
                    details.push(format!("a {}-byte frame ended the connection: {end}", limit + 1))
                }
                SizeResult::Passed => details.push(format!(
                    "a {}-byte frame passed although the limit is {limit}",
                    limit + 1
                )),
                SizeResult::NoConnection(_) => {}
            }
        }
        let downstream = self.downstream(&path, passing).await;
        details.push(downstream.clone());
        let data = json!({"largest_passing_bytes": passing, "server_limit_bytes": limit, "cut": cut.as_ref().map(ToString::to_string)});
        match (limit, cut) {
            (Some(limit), None) => Outcome::pass(format!(
                "frames up to {limit} bytes pass (the server's limit, server.max_frame_bytes)"
            ))
            .details(details)
            .data(data),
            (None, Some(Ended::Closed(1009, _))) => Outcome::pass(format!(
                "frames up to ~{passing} bytes pass; larger ones are closed with 1009 (the server's limit)"
            ))
            .details(details)
            .data(data),
            (limit, how) => {
                let how = how.map(|h| h.to_string()).unwrap_or_default();
                Outcome::warn(format!(
                    "frames above ~{passing} bytes are cut ({how}){}",
                    limit.map(|l| format!(", though the server accepts up to {l}")).unwrap_or_default()
                ))
                .cause("an intermediary limits WebSocket frame or message size, and clients see a dropped connection instead of a clean 1009")
                .fixes(fixes::frame_limit(passing))
                .details(details)
                .data(data)
            }
        }
    }

    /// Server → client: publishes a message close to `size` on a channel of our own and
    /// checks it arrives whole. Returns one line for the details.
    async fn downstream(&self, path: &str, size: usize) -> String {
        let Some(ns) = self.publish_namespace() else {
            return "server → client not measured: no namespace allows client publishing (--namespace)".into();
        };
        let channel = self.test_channel(&ns);
        let timeout = self.args.timeout;
        let mut conn = match NativeConn::open(self.connector(), path, &self.upgrade_extra()).await {
            Ok(c) => c,
            Err(e) => return format!("server → client not measured: {e}"),
        };
        let overhead = 64 + channel.len();
        let payload = "x".repeat(size.saturating_sub(overhead).max(1));
        let line = async {
            conn.subscribe(&channel, timeout).await?;
            conn.publish(&channel, Value::String(payload.clone()), timeout).await?;
            let msg = conn.next_msg(&channel, timeout).await.map_err(|e| e.to_string())?;
            match msg["data"].as_str() {
                Some(d) if d.len() == payload.len() => {
                    Ok(format!("server → client: a {}-byte message arrived whole", payload.len()))
                }
                _ => Err("the message arrived altered".to_owned()),
            }
        }
        .await;
        conn.close().await;
        line.unwrap_or_else(|e| format!("server → client not measured on {channel}: {e}"))
    }

    // ---- 9. Idle timeout ----------------------------------------------------------------

    pub(super) async fn idle(&mut self) -> Outcome {
        let Some(duration) = self.args.idle else {
            return Outcome::skip(
                "not run: add --idle 120s to find how long intermediaries keep idle connections (nginx's proxy_read_timeout defaults to 60s)",
            );
        };
        let ping = self
            .native
            .as_ref()
            .map(|c| c.welcome.ping_interval_ms)
            .or_else(|| self.diag.setting_u64("ping_interval_ms"))
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let connector = self.connector().clone();
        let extra = self.upgrade_extra();

        // A connection nobody speaks on: the diagnostics socket (no heartbeat at all), else
        // the WebSocket path itself, not answering heartbeats.
        let mut diag_extra = extra.clone();
        if let Some(key) = &self.args.api_key {
            diag_extra.push(("authorization", format!("Bearer {key}")));
        }
        let hold_ms = duration.as_millis() as u64 + 10_000;
        let mut diag_ws = match connector
            .upgrade(&format!("/api/diagnostics?hold_ms={hold_ms}"), &diag_extra)
            .await
        {
            Ok(Upgrade::Upgraded { ws, .. }) => Some(ws),
            _ => None,
        };
        if let Some(ws) = diag_ws.as_mut()
            && probes::first_text(ws, self.args.timeout).await.is_none()
        {
            diag_ws = None;
        }
        let silent = match diag_ws {
            Some(ws) => Some((
                ws,
                "a silent diagnostic connection (/api/diagnostics: no heartbeat)".to_owned(),
            )),
            None => match connector.upgrade(&self.upgrade_path(), &extra).await {
                Ok(Upgrade::Upgraded { mut ws, .. }) => {
                    let _ = probes::first_frame(&mut ws, FIRST_FRAME_WAIT).await;
                    Some((
                        ws,
                        format!("{} without answering heartbeats", strip_query(&self.ws_path)),
                    ))
                }
                _ => None,
            },
        };
        let Some((silent_ws, silent_what)) = silent else {
            return Outcome::skip("cannot open a WebSocket to hold (see the upgrade check)");
        };
        let responsive = if self.native.is_some() {
            NativeConn::open(&connector, &self.ws_path, &extra).await.ok()
        } else {
            None
        };
        let checked_responsive = responsive.is_some();
        let (silent, responsive) = tokio::join!(probes::hold_silent(silent_ws, duration), async {
            match responsive {
                Some(conn) => Some(probes::hold_responsive(conn, duration).await),
                None => None,
            }
        });
        judge_idle(duration, ping, &silent_what, &silent, responsive.as_ref(), checked_responsive)
    }

    // ---- 10. SSE ------------------------------------------------------------------------

    pub(super) async fn sse(&mut self) -> Outcome {
        if !self.is_ferrocast() {
            return Outcome::skip("needs a ferrocast server (the probe publishes test messages)");
        }
        // Publish over a fresh native connection (earlier ones may have been cut by now, by the
        // idle probe's proxy), else over the HTTP API.
        let connector = self.connector().clone();
        let publisher_conn = match (self.publish_namespace(), self.native.is_some()) {
            (Some(ns), true) => NativeConn::open(&connector, &self.ws_path, &self.upgrade_extra())
                .await
                .ok()
                .map(|conn| (ns, conn)),
            _ => None,
        };
        match publisher_conn {
            Some((ns, mut conn)) => {
                let channel = self.test_channel(&ns);
                let outcome =
                    sse::check(&connector, "/sse", &channel, Publisher::Ws(&mut conn)).await;
                conn.close().await;
                outcome
            }
            None => {
                let channel = self.test_channel("doctor");
                sse::check(&connector, "/sse", &channel, Publisher::Http(self.args.api_key.clone()))
                    .await
            }
        }
    }

    // ---- 11. Fallbacks ------------------------------------------------------------------

    pub(super) async fn fallbacks(&mut self) -> Outcome {
        if !self.is_ferrocast() && self.target.kind != EndpointKind::SocketIo {
            return Outcome::skip("not a ferrocast server: its fallbacks are unknown");
        }
        let connector = self.connector().clone();
        let mut ok = Vec::new();
        let mut problems = Vec::new();
        let mut fixes_out = Vec::new();

        // SSE: the head is enough; the stream itself never ends.
        let req = connector
            .request("GET", "/sse?channels=doctor.probe")
            .header("accept", "text/event-stream")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("valid request");
        // A buffering proxy holds even the head back; that is diagnosed by the SSE check.
        let head = tokio::time::timeout(FALLBACK_HEAD_WAIT, connector.send(req)).await;
        match head.unwrap_or(Err(NetError::Timeout("response head", FALLBACK_HEAD_WAIT))) {
            Ok(resp) => {
                let ct = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if resp.status().is_success() && ct.starts_with("text/event-stream") {
                    ok.push("/sse streams events".to_owned());
                } else {
                    problems.push(format!("/sse answers {} ({ct})", resp.status()));
                    fixes_out.extend(fixes::sse_buffering("/sse"));
                }
            }
            Err(NetError::Timeout(..)) => problems.push(
                "/sse: no response head in time: a proxy buffers the event stream".to_owned(),
            ),
            Err(e) => problems.push(format!("/sse: {e}")),
        }

        // Socket.IO: the polling handshake, then the WebSocket transport.
        let sio = self.socketio_path();
        match self.socketio_polling().await {
            Ok(reply) if engineio_open(&reply).is_some() => {
                ok.push(format!("Socket.IO long-polling at {sio}/"));
                let ws_path = format!("{sio}/?EIO=4&transport=websocket");
                match connector.upgrade(&ws_path, &self.upgrade_extra()).await {
                    Ok(Upgrade::Upgraded { mut ws, .. }) => {
                        match probes::first_frame(&mut ws, FIRST_FRAME_WAIT).await {
                            FirstFrame::EngineIoOpen(_) => {
                                ok.push(format!("Socket.IO WebSocket transport at {sio}/"))
                            }
                            FirstFrame::Ended(end) => {
                                problems.push(format!(
                                    "the Socket.IO WebSocket transport upgraded, then {end}: the proxy does not carry the upgrade"
                                ));
                                fixes_out.extend(fixes::upgrade_headers(&format!("{sio}/")));
                            }
                            other => problems.push(format!(
                                "the Socket.IO WebSocket transport upgraded but did not open the Engine.IO session ({other:?})"
                            )),
                        }
                    }
                    Ok(Upgrade::Refused(reply)) => {
                        problems.push(format!(
                            "Socket.IO long-polling works but its WebSocket upgrade answers {}: clients stay on polling",
                            reply.status
                        ));
                        fixes_out.extend(fixes::upgrade_headers(&format!("{sio}/")));
                    }
                    Err(e) => problems.push(format!("Socket.IO WebSocket transport: {e}")),
                }
            }
            Ok(reply) if reply.json().is_some_and(|b| b["error"] == "socketio_disabled") => {
                ok.push("Socket.IO is turned off in the server's configuration (socketio.enabled = false)".to_owned());
            }
            Ok(reply) => problems.push(format!(
                "{sio}/ answers {} to the Engine.IO handshake: {}",
                reply.status,
                reply.snippet()
            )),
            Err(e) => problems.push(format!("{sio}/: {e}")),
        }
        let summary = ok.join("; ");
        if problems.is_empty() {
            Outcome::pass(summary)
        } else {
            Outcome::warn(problems.join("; "))
                .details(ok.into_iter().map(|o| format!("ok: {o}")))
                .cause("clients whose network blocks WebSocket fall back to these transports; a proxy must route and not buffer them")
                .fixes(fixes_out)
        }
    }
}

impl Doctor {
    // ---- 12. Sticky sessions ------------------------------------------------------------

    pub(super) async fn sticky(&mut self) -> Outcome {
        let ferrocast = self.is_ferrocast();
        if !ferrocast && self.target.kind != EndpointKind::SocketIo {
            return Outcome::skip("not a ferrocast server: its sessions are unknown");
        }
        let connector = self.connector().clone();
        let sio = self.socketio_path();
        let sio_on = self.diag.settings().is_none_or(|s| s["socketio"]["enabled"] != false);
        let sio_runs = if sio_on {
            join_all((0..sticky::SIO_SESSIONS).map(|_| sticky::socketio_session(&connector, &sio)))
                .await
        } else {
            Vec::new()
        };
        let sse_runs = if ferrocast {
            let channel = format!("doctor.sticky-{}", ferrocast_server::random_id(8));
            join_all((0..sticky::SSE_STREAMS).map(|_| sticky::sse_session(&connector, &channel)))
                .await
        } else {
            Vec::new()
        };
        let (sio_t, sse_t) = (Tally::of(&sio_runs), Tally::of(&sse_runs));
        judge_sticky(&sio, sio_on, &sio_t, &sse_t)
    }
}

/// The verdict of the sticky-session probe.
fn judge_sticky(sio: &str, sio_on: bool, sio_t: &Tally, sse_t: &Tally) -> Outcome {
    let data = json!({"socketio": sio_t.data(), "sse": sse_t.data()});
    let mut cookies = sio_t.cookies.clone();
    cookies.extend(sse_t.cookies.iter().filter(|c| !sio_t.cookies.contains(c)).cloned());
    let mut details: Vec<String> = Vec::new();
    if !sio_on {
        details.push("Socket.IO is turned off (socketio.enabled = false)".into());
    }
    for e in &sio_t.not_opened {
        details.push(format!("Socket.IO session not opened: {e}"));
    }
    for e in &sse_t.not_opened {
        details.push(format!("SSE stream not opened: {e}"));
    }
    if sio_t.opened == 0 && sse_t.opened == 0 {
        return Outcome::skip(
            "no Socket.IO polling session or SSE stream could be opened (see the fallbacks check)",
        )
        .details(details)
        .data(data);
    }
    let opened = format!(
        "{} Socket.IO polling session{} and {} SSE stream{}",
        sio_t.opened,
        if sio_t.opened == 1 { "" } else { "s" },
        sse_t.opened,
        if sse_t.opened == 1 { "" } else { "s" }
    );
    let requests = sio_t.requests + sse_t.requests;
    if sio_t.unknown + sse_t.unknown > 0 {
        let mut found = Vec::new();
        if sio_t.unknown > 0 {
            found.push(format!(
                "Socket.IO long-polling is not sticky: {} of {} follow-up requests ({} of {} sessions) reached a node that answered 400 {{\"code\":1,\"message\":\"Session ID unknown\"}}",
                sio_t.unknown, sio_t.requests, sio_t.broken, sio_t.opened
            ));
        }
        if sse_t.unknown > 0 {
            found.push(format!(
                "SSE control requests reach other nodes than their stream: {} of {} answered 404 unknown_session",
                sse_t.unknown, sse_t.requests
            ));
        }
        if !cookies.is_empty() {
            details.push(format!(
                "the front set cookie(s) {} and the doctor sent them back, yet the session moved",
                cookies.join(", ")
            ));
        }
        details.push(format!("probed: {opened}, each follow-up request on a new connection"));
        details.extend(sio_t.errors.iter().chain(&sse_t.errors).cloned());
        return Outcome::fail(found.join("; "))
            .cause("a load balancer spreads one session's requests over several nodes, and only the node that opened a session knows it: Socket.IO clients on long-polling fail with \"Session ID unknown\" and reconnect again and again, and SSE streams cannot change their subscriptions. Pin each client to one node for the Socket.IO path, /sse and /sse/control (WebSocket can stay balanced freely)")
            .fixes(fixes::sticky_sessions(sio))
            .details(details)
            .data(data);
    }
    let errors: Vec<String> = sio_t.errors.iter().chain(&sse_t.errors).cloned().collect();
    if !errors.is_empty() {
        return Outcome::warn(format!(
            "{} of {requests} follow-up requests of {opened} failed (not with an unknown session)",
            errors.len()
        ))
        .cause("the path to the server is unreliable for session requests (a node or the proxy failing); stickiness could not be judged fully")
        .details(errors)
        .details(details)
        .data(data);
    }
    if !cookies.is_empty() {
        details.push(format!(
            "sticky by cookie ({}): browsers keep it; other clients must keep cookies too, or use the WebSocket transport only",
            cookies.join(", ")
        ));
    }
    Outcome::pass(format!(
        "{opened}: all {requests} follow-up requests, each on a new connection, reached the session's node"
    ))
    .details(details)
    .data(data)
}

fn judge_failed(path: &str, e: &NetError) -> Outcome {
    let outcome = Outcome::fail(format!("upgrade of {} failed: {e}", strip_query(path)));
    match e {
        NetError::Timeout(..) => outcome
            .cause("the request is held: a proxy that buffers upgrade requests, or an overloaded server")
            .fixes(fixes::upgrade_headers(strip_query(path))),
        NetError::BadHandshake(_) => outcome
            .cause("an intermediary answered the upgrade itself, incorrectly")
            .fixes(fixes::upgrade_headers(strip_query(path))),
        e if e.is_closed_without_answer() => outcome
            .cause("the connection was closed without an HTTP answer: a proxy, firewall or WAF dropping upgrade requests")
            .fixes(fixes::upgrade_headers(strip_query(path))),
        _ => outcome
            .cause("the connection failed during the upgrade request")
            .fixes(fixes::proxy_upstream()),
    }
}

fn judge_idle(
    duration: Duration,
    ping: Option<Duration>,
    silent_what: &str,
    silent: &Held,
    responsive: Option<&Held>,
    checked_responsive: bool,
) -> Outcome {
    let describe = |held: &Held| match &held.ended {
        Some((t, how)) => format!("ended after {} ({how})", secs(*t)),
        None => format!("still open after {}", secs(duration)),
    };
    let mut details = vec![format!("{silent_what}: {}", describe(silent))];
    if let Some(r) = responsive {
        details.push(format!("a client answering heartbeats: {}", describe(r)));
    }
    if let Some(p) = ping {
        details.push(format!("server heartbeat: every {} (server.ping_interval_ms)", secs(p)));
    }
    details.push(HEARTBEAT_RULE.to_owned());
    let data = json!({
        "probe_s": duration.as_secs_f64(),
        "ping_interval_ms": ping.map(|p| p.as_millis() as u64),
        "silent_ended_after_s": silent.ended.as_ref().map(|(t, _)| t.as_secs_f64()),
        "silent_ended_how": silent.ended.as_ref().map(|(_, how)| how.to_string()),
        "responsive_ended_after_s": responsive.and_then(|r| r.ended.as_ref()).map(|(t, _)| t.as_secs_f64()),
    });

    // A well-behaved client was cut: that is what users see.
    if let Some((t, how)) = responsive.and_then(|r| r.ended.as_ref())
        && how.code() != Some(1001)
    {
        let cause = match ping {
            Some(p) if p.as_secs_f64() >= t.as_secs_f64() * 0.9 => format!(
                "heartbeat {} > proxy timeout ~{}: ferrocast pings every {}, but an intermediary closes connections idle for ~{}, so clients are cut before the heartbeat keeps them alive; lower server.ping_interval_ms or raise the proxy's timeout",
                secs(p), secs(*t), secs(p), secs(*t)
            ),
            _ => "the connection was cut although heartbeats flowed: an intermediary limits connection lifetime, or ignores server-to-client traffic when timing idleness".to_owned(),
        };
        return Outcome::fail(format!(
            "a client answering heartbeats was cut after {} ({how})",
            secs(*t)
        ))
        .cause(cause)
        .fixes(fixes::idle_timeout(whole_secs(*t), ping.map(whole_secs)))
        .details(details)
        .data(data);
    }
    // The diagnostics endpoint ends its hold (at most 30 minutes) with 1000 "hold over".
    let silent_cut = silent
        .ended
        .as_ref()
        .filter(|(_, how)| !matches!(how, Ended::Closed(1000, reason) if reason == "hold over"));
    let Some((t, how)) = silent_cut else {
        return Outcome::pass(format!(
            "no intermediary closed an idle connection within {}",
            secs(duration)
        ))
        .details(details)
        .data(data);
    };
    if how.code() == Some(4009) {
        return Outcome::pass(format!(
            "no intermediary cut the silent connection; the server closed it itself after {} with 4009 (no pong), as designed",
            secs(*t)
        ))
        .details(details)
        .data(data);
    }
    let fixes = fixes::idle_timeout(whole_secs(*t), ping.map(whole_secs));
    match ping {
        Some(p) if p >= *t => Outcome::fail(format!(
            "heartbeat {} > proxy timeout ~{}: idle connections are cut after ~{} ({how})",
            secs(p), secs(*t), secs(*t)
        ))
        .cause("an intermediary closes connections idle for longer than its timeout, and ferrocast's heartbeat comes too late to keep them busy; lower server.ping_interval_ms or raise the proxy's timeout")
        .fixes(fixes)
        .details(details)
        .data(data),
        Some(p) if p * 2 > *t => Outcome::warn(format!(
            "your proxy kills idle connections after ~{} ({how}); ferrocast pings every {}: little margin",
            secs(*t), secs(p)
        ))
        .cause("a delayed heartbeat (a busy server, a slow client) lets the proxy cut the connection; keep the heartbeat at most half the timeout")
        .fixes(fixes)
        .details(details)
        .data(data),
        Some(p) => {
            let mut summary = format!(
                "your proxy kills idle connections after ~{} ({how}); ferrocast pings every {}, so clients that answer pings stay up",
                secs(*t),
                secs(p)
            );
            if checked_responsive {
                summary.push_str(&format!(" (checked for {})", secs(duration)));
            }
            Outcome::pass(summary).details(details).data(data)
        }
        None => Outcome::warn(format!("an intermediary or the server closes idle connections after ~{} ({how})", secs(*t)))
            .cause("make sure something (a server heartbeat, client pings) crosses the connection more often than that")
            .fixes(fixes)
            .details(details)
            .data(data),
    }
}

/// The Engine.IO v4 WebSocket-transport URL for a Socket.IO URL the user gave: the path with
/// a trailing slash, `EIO=4&transport=websocket` first, the user's other parameters kept.
fn socketio_websocket_path(given: &str) -> String {
    let (path, query) = given.split_once('?').unwrap_or((given, ""));
    let path = if path.ends_with('/') { path.to_owned() } else { format!("{path}/") };
    let mut params = vec!["EIO=4", "transport=websocket"];
    params.extend(
        query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("EIO=") && !p.starts_with("transport=")),
    );
    format!("{path}?{}", params.join("&"))
}

/// The Engine.IO open packet of a polling handshake answer, if it is one.
fn engineio_open(reply: &HttpReply) -> Option<Value> {
    if reply.status != StatusCode::OK {
        return None;
    }
    let text = reply.text();
    let open: Value = serde_json::from_str(text.strip_prefix('0')?).ok()?;
    open.get("sid").is_some().then_some(open)
}

fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(after: Option<(u64, Ended)>) -> Held {
        Held { ended: after.map(|(s, how)| (Duration::from_secs(s), how)) }
    }

    #[test]
    fn idle_verdicts_name_the_heartbeat_rule() {
        let d = Duration::from_secs(12);
        // Proxy cuts at 5 s, heartbeat 25 s: even responsive clients die.
        let o = judge_idle(
            d,
            Some(Duration::from_secs(25)),
            "silent",
            &held(Some((5, Ended::Dropped))),
            Some(&held(Some((5, Ended::Dropped)))),
            true,
        );
        assert_eq!(o.status, super::super::report::Status::Fail);
        assert!(
            o.cause.as_ref().unwrap().contains("heartbeat 25 s > proxy timeout ~5.0 s"),
            "{:?}",
            o.cause
        );
        assert!(o.details.iter().any(|d| d.contains("server.ping_interval_ms")));
        // Heartbeat 2 s: the proxy still cuts silent connections, but clients stay up.
        let o = judge_idle(
            d,
            Some(Duration::from_secs(2)),
            "silent",
            &held(Some((5, Ended::Dropped))),
            Some(&held(None)),
            true,
        );
        assert_eq!(o.status, super::super::report::Status::Pass);
        assert!(o.summary.contains("kills idle connections after ~5.0 s"), "{}", o.summary);
        // Nothing cut anything.
        let o = judge_idle(
            d,
            Some(Duration::from_secs(2)),
            "silent",
            &held(None),
            Some(&held(None)),
            true,
        );
        assert_eq!(o.status, super::super::report::Status::Pass);
        // The server's own 4009 on a silent native connection is not a proxy kill.
        let o = judge_idle(
            d,
            Some(Duration::from_secs(2)),
            "silent",
            &held(Some((3, Ended::Closed(4009, String::new())))),
            None,
            false,
        );
        assert_eq!(o.status, super::super::report::Status::Pass);
    }

    #[test]
    fn socketio_upgrade_path_keeps_extra_params() {
        assert_eq!(socketio_websocket_path("/socket.io/"), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(
            socketio_websocket_path("/socket.io?EIO=3&transport=polling&token=abc"),
            "/socket.io/?EIO=4&transport=websocket&token=abc"
        );
        assert_eq!(strip_query("/socket.io/?EIO=4"), "/socket.io/");
    }

    #[test]
    fn sticky_verdicts() {
        use super::super::report::Status;
        let tally = |opened, requests, unknown, cookies: &[&str]| Tally {
            opened,
            broken: usize::from(unknown > 0),
            requests,
            unknown,
            cookies: cookies.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let o = judge_sticky("/socket.io", true, &tally(4, 24, 0, &[]), &tally(2, 8, 0, &[]));
        assert_eq!(o.status, Status::Pass, "{o:?}");
        assert!(o.summary.contains("all 32 follow-up requests"), "{}", o.summary);
        let o =
            judge_sticky("/socket.io", true, &tally(4, 24, 0, &["AWSALB"]), &tally(2, 8, 0, &[]));
        assert!(o.details.iter().any(|d| d.contains("sticky by cookie (AWSALB)")), "{o:?}");
        let o = judge_sticky("/socket.io", true, &tally(4, 24, 7, &[]), &tally(2, 8, 0, &[]));
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.summary.contains("Session ID unknown") && !o.summary.contains("SSE"),
            "{}",
            o.summary
        );
        assert!(
            o.fixes.iter().any(|f| f.target == "HAProxy" && f.snippet.contains("balance source"))
        );
        let o = judge_sticky("/socket.io", false, &Tally::default(), &tally(2, 8, 3, &[]));
        assert_eq!(o.status, Status::Fail);
        assert!(o.summary.contains("3 of 8 answered 404 unknown_session"), "{}", o.summary);
        let errors =
            Tally { errors: vec!["GET (poll) answered 502".into()], ..tally(4, 24, 0, &[]) };
        assert_eq!(
            judge_sticky("/socket.io", true, &errors, &Tally::default()).status,
            Status::Warn
        );
        let none = Tally { not_opened: vec!["handshake: refused".into()], ..Tally::default() };
        let o = judge_sticky("/socket.io", true, &none, &Tally::default());
        assert_eq!(o.status, Status::Skip);
        assert!(o.details[0].contains("handshake: refused"), "{o:?}");
    }
}
