//! `ferrocast doctor URL`: checks every hop between a client and a ferrocast server (or any
//! WebSocket server) one after another, and explains each failure with its likely cause and
//! the exact fix for nginx, HAProxy, cloud load balancers or ferrocast itself.
//!
//! | # | check | what it does |
//! | --- | --- | --- |
//! | 1 | DNS lookup | resolves the host |
//! | 2 | TCP connect | connects to each address until one answers |
//! | 3 | TLS certificate | chain, hostname and expiry (wss/https only) |
//! | 4 | WebSocket upgrade | the upgrade's answer: 101, or what 400/404/426/200/3xx/5xx mean |
//! | 5 | Headers after proxies | what the server received (via `/api/diagnostics`) against what was sent |
//! | 6 | Protocol match | native vs Socket.IO on both ends (a `io()` client against `/ws`, …) |
//! | 7 | Round-trip time | native `ping`/`pong` (or WebSocket control pings) |
//! | 8 | Largest message | binary search for the largest frame that passes, both directions |
//! | 9 | Idle timeout | with `--idle`: how long intermediaries let a silent connection live |
//! | 10 | SSE streaming | events published apart must arrive apart, not in buffered bursts |
//! | 11 | Fallback transports | `/sse` and Socket.IO (polling and websocket) answer |
//! | 12 | Sticky sessions | a Socket.IO polling session's and an SSE stream's requests, each on a new connection, reach the node that holds the session |
//!
//! Exit code: 0 when every check passed (or was skipped), 1 when the worst is a warning,
//! 2 when a check failed. `--json` prints one JSON document instead of the progress lines.

mod checks;
mod fixes;
mod net;
mod probes;
mod report;
mod sse;
mod sticky;
mod tls;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use net::{Connector, HttpReply, NetError, Target};
use probes::{FirstFrame, NativeConn};
use report::{Outcome, Reporter};

/// Flags of `ferrocast doctor`.
#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// What to check: ws://, wss://, http:// or https:// URL of a WebSocket endpoint
    /// (wss://push.example.com/ws), a Socket.IO endpoint (https://host/socket.io/) or a
    /// deployment's origin (https://push.example.com).
    pub url: String,
    /// Also find how long intermediaries let an idle connection live, waiting up to this long
    /// (e.g. 120s or 2m; a little above your proxy's timeout, nginx's default being 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Print one JSON document (checks, verdicts, measurements) instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// API key: reads /api/diagnostics where it requires one, and publishes test messages
    /// over HTTP when no namespace allows client publishing.
    #[arg(long, env = "FERROCAST_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Origin header to send with upgrades, as a browser on that site would.
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<String>,
    /// Also trust the CA certificates in this PEM file (a private CA, a self-signed test cert).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Continue past certificate errors (reported as warnings).
    #[arg(long, short = 'k')]
    pub insecure: bool,
    /// Limit for each network step.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Namespace for the doctor's test channels; it must allow client publishing (default:
    /// one the server reports as publishable, preferring "chat").
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,
}

/// `10s`, `2m`, `1500ms`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 =
        number.parse().map_err(|_| format!("{s:?} is not a duration such as 30s, 2m or 1500ms"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s, m or h")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (at most 24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What `/api/diagnostics` said.
#[derive(Debug, Clone)]
enum Diag {
    /// The report; `upgraded` when it came over a WebSocket (the upgrade went through).
    Report { report: Value, upgraded: bool },
    /// The endpoint exists but refused us (403): its message.
    Refused(String),
    /// Turned off in the server's configuration.
    Off,
    /// Not there: not a ferrocast server, or the proxy does not route the path.
    Absent(String),
}

impl Diag {
    fn report(&self) -> Option<&Value> {
        match self {
            Diag::Report { report, .. } => Some(report),
            _ => None,
        }
    }

    fn settings(&self) -> Option<&Value> {
        self.report().map(|r| &r["settings"])
    }

    fn ws_paths(&self) -> Vec<String> {
        self.settings()
            .and_then(|s| s["ws_paths"].as_array())
            .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    fn setting_u64(&self, key: &str) -> Option<u64> {
        self.settings().and_then(|s| s[key].as_u64())
    }

    /// Why there is no report, for SKIP messages.
    fn why_missing(&self) -> String {
        match self {
            Diag::Report { .. } => String::new(),
            Diag::Refused(msg) => format!("/api/diagnostics refused the doctor: {msg}"),
            Diag::Off => "/api/diagnostics is turned off (diagnostics.allow = \"off\")".into(),
            Diag::Absent(why) => why.clone(),
        }
    }
}

/// The answer to the WebSocket upgrade of the path under test (check 4).
enum UpgradeAnswer {
    Upgraded { first: FirstFrame },
    Refused(HttpReply),
    Failed(NetError),
}

/// What the doctor learned so far; each check reads what earlier ones found.
struct Doctor {
    args: DoctorArgs,
    target: Arc<Target>,
    addrs: Vec<SocketAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Set once DNS, TCP and TLS worked: every later probe connects through it.
    connector: Option<Connector>,
    diag: Diag,
    /// The WebSocket path probed (the URL's, or the server's first `ws_paths` entry).
    ws_path: String,
    upgrade: Option<UpgradeAnswer>,
    /// The connection check 4 opened, when it was a ferrocast welcome.
    native: Option<NativeConn>,
    /// A non-native WebSocket from check 4 (Socket.IO or another server), for the RTT check.
    other_ws: Option<Box<net::Ws>>,
}

/// The checks, in order: id and title.
const CHECKS: [(&str, &str); 12] = [
    ("dns", "DNS lookup"),
    ("tcp", "TCP connect"),
    ("tls", "TLS certificate"),
    ("upgrade", "WebSocket upgrade"),
    ("headers", "Headers after proxies"),
    ("protocol", "Protocol match"),
    ("rtt", "Round-trip time"),
    ("max_message", "Largest message"),
    ("idle", "Idle timeout"),
    ("sse", "SSE streaming"),
    ("fallbacks", "Fallback transports"),
    ("sticky", "Sticky sessions"),
];

pub async fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let target = match Target::parse(&args.url) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("ferrocast doctor: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let tls = if target.secure {
        match tls::verifying_config(args.ca_file.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("ferrocast doctor: --ca-file: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    } else {
        None
    };
    let mut reporter = Reporter::new(args.json, CHECKS.len());
    reporter.header(&format!("ferrocast doctor {}  ({})", args.url, net::user_agent()));
    let mut doctor = Doctor {
        ws_path: target.path.clone().unwrap_or_else(|| "/ws".into()),
        args,
        target,
        addrs: Vec::new(),
        tls,
        connector: None,
        diag: Diag::Absent("not fetched".into()),
        upgrade: None,
        native: None,
        other_ws: None,
    };
    for (id, title) in CHECKS {
        reporter.start(title);
        let outcome = doctor.run_check(id).await;
        reporter.finish(id, title, outcome);
    }
    if let Some(conn) = doctor.native.take() {
        conn.close().await;
    }
    let worst = reporter.worst();
    if doctor.args.json {
        let doc = json!({
            "target": doctor.args.url,
            "doctor": net::user_agent(),
            "checks": reporter.checks,
            "worst": worst,
            "exit_code": worst.exit_code(),
        });
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?);
    } else {
        reporter.footer();
    }
    Ok(ExitCode::from(worst.exit_code()))
}

impl Doctor {
    async fn run_check(&mut self, id: &str) -> Outcome {
        // The network checks come first; everything after them needs a working connection.
        match id {
            "dns" => return self.dns().await,
            "tcp" => return self.tcp().await,
            "tls" => return self.tls().await,
            _ => {}
        }
        if self.connector.is_none() {
            return Outcome::skip("needs a connection (an earlier check failed)");
        }
        match id {
            "upgrade" => {
                self.diag = self.fetch_diag().await;
                if self.target.path.is_none()
                    && let Some(first) = self.diag.ws_paths().first()
                {
                    self.ws_path = first.clone();
                }
                self.upgrade().await
            }
            "headers" => self.headers(),
            "protocol" => self.protocol().await,
            "rtt" => self.rtt().await,
            "max_message" => self.max_message().await,
            "idle" => self.idle().await,
            "sse" => self.sse().await,
            "fallbacks" => self.fallbacks().await,
            "sticky" => self.sticky().await,
            other => unreachable!("unknown check {other}"),
        }
    }

    fn connector(&self) -> &Connector {
        self.connector.as_ref().expect("checked by run_check")
    }

    /// Headers every upgrade carries besides the WebSocket ones.
    fn upgrade_extra(&self) -> Vec<(&'static str, String)> {
        self.args.origin.iter().map(|o| ("origin", o.clone())).collect()
    }

    /// Asks `/api/diagnostics` what it received, with an upgrade request like the real one.
    async fn fetch_diag(&self) -> Diag {
        let mut extra = self.upgrade_extra();
        if let Some(key) = &self.args.api_key {
            extra.push(("authorization", format!("Bearer {key}")));
        }
        match self.connector().upgrade("/api/diagnostics?hold_ms=0", &extra).await {
            Ok(net::Upgrade::Upgraded { mut ws, .. }) => {
                let text = probes::first_text(&mut ws, self.args.timeout).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    futures_util::SinkExt::close(&mut ws),
                )
                .await;
                match text.and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                    Some(report) if report["server"] == "ferrocast" => {
                        Diag::Report { report, upgraded: true }
                    }
                    _ => Diag::Absent(
                        "/api/diagnostics upgraded to a WebSocket but sent no ferrocast report"
                            .into(),
                    ),
                }
            }
            Ok(net::Upgrade::Refused(reply)) => diag_from_reply(&reply),
            Err(e) => Diag::Absent(format!("/api/diagnostics did not answer: {e}")),
        }
    }

    /// The namespace for test channels: `--namespace`, else one the server lets clients
    /// publish to ("chat" first), else "chat" (ferrocast's default) as a guess.
    fn publish_namespace(&self) -> Option<String> {
        if let Some(ns) = &self.args.namespace {
            return Some(ns.clone());
        }
        let Some(settings) = self.diag.settings() else { return Some("chat".into()) };
        let publishable: Vec<&str> = settings["client_publish_namespaces"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if publishable.contains(&"chat") {
            Some("chat".into())
        } else if let Some(first) = publishable.first() {
            Some((*first).to_owned())
        } else if settings["client_publish_default"].as_bool() == Some(true) {
            Some("doctor".into())
        } else {
            None
        }
    }

    /// A fresh channel name of the doctor's own.
    fn test_channel(&self, ns: &str) -> String {
        format!("{ns}.doctor-{}", ferrocast_server::random_id(8))
    }
}

/// Interprets a non-upgraded answer from `/api/diagnostics`.
fn diag_from_reply(reply: &HttpReply) -> Diag {
    let body = reply.json();
    let is_ferrocast_report = body.as_ref().is_some_and(|b| b["server"] == "ferrocast");
    match reply.status.as_u16() {
        200 if is_ferrocast_report => {
            Diag::Report { report: body.expect("checked"), upgraded: false }
        }
        403 => Diag::Refused(
            body.and_then(|b| b["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| reply.snippet()),
        ),
        404 if body.as_ref().is_some_and(|b| {
            b["message"].as_str().is_some_and(|m| m.contains("diagnostics are turned off"))
        }) =>
        {
            Diag::Off
        }
        status => Diag::Absent(format!(
            "no ferrocast diagnostics at /api/diagnostics ({status}{}): not a ferrocast server, or the proxy does not route that path",
            reply.origin_note()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
