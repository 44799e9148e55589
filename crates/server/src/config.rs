//! Configuration: the TOML file, `FERROCAST_*` environment overrides and `--set` flags,
//! merged in that order over the built-in defaults, then validated before any port is bound.
//!
//! Every key of the file can be overridden. The environment variable for a key is its path in
//! upper case with `.` replaced by `_`: `server.listen` is `FERROCAST_SERVER_LISTEN`,
//! `namespaces.ticks.history_size` is `FERROCAST_NAMESPACES_TICKS_HISTORY_SIZE`. The flag is
//! `--set server.listen=0.0.0.0:8080`. Values are TOML literals (`true`, `42`, `["/ws"]`);
//! anything that does not parse as one is taken as a string, and a list key also accepts a
//! comma-separated string.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use ferrocast_hub::{NamespaceConfig, OverflowPolicy, SnapshotMode};
use serde::{Deserialize, Serialize};
use toml::Value;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub simulator: SimulatorConfig,
    pub socketio: SocketIoConfig,
    pub diagnostics: DiagnosticsConfig,
    /// Connection tokens (JWT) and whether anonymous connections are served.
    pub auth: crate::auth::AuthConfig,
    /// Limits against abuse: connections per address and per user, requests per connection.
    pub limits: crate::limits::LimitsConfig,
    /// The application's own login: connect, subscribe and publish decided by HTTP calls.
    pub proxy: crate::proxy::ProxyConfig,
    /// Where channel offsets and history live: this process, or Redis shared by many nodes.
    pub broker: BrokerConfig,
    /// Settings for channels whose namespace has no table of its own.
    pub namespace_defaults: NamespaceConfig,
    /// Per-namespace settings, keyed by namespace (the part of a channel before the first `.`).
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Upstream market-data connectors (`[[feeds]]` tables), in routing order: a market
    /// channel goes to the first feed whose symbols match.
    pub feeds: Vec<ferrocast_feeds::config::FeedConfig>,
}

/// Listening, connection and transport settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (HTTP, WebSocket, SSE and Socket.IO share it).
    pub listen: String,
    /// Paths of the native WebSocket endpoint. The first is canonical; the others are aliases
    /// so existing apps keep their URLs (for example `/ws/price`, `/api/socket`).
    pub ws_paths: Vec<String>,
    /// Origins allowed to open WebSocket connections (`https://app.example.com`); empty or
    /// `["*"]` allows any. A request from another origin is closed with 1008. Also the
    /// origins whose pages may call the HTTP API (CORS with credentials, and the cross-site
    /// check on publishing and the server API).
    pub allowed_origins: Vec<String>,
    /// Host names (besides loopback names) under which loopback clients keep the trust that
    /// stands in for an API key; any other `Host` loses it (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Most concurrent client connections; beyond it new ones are closed with 1013.
    pub max_connections: usize,
    /// Largest client frame accepted, in bytes; a larger one closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Most channels in one subscribe or unsubscribe request.
    pub max_channels_per_request: usize,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Most channels held at once, whoever creates them (publish or subscribe); creating one
    /// more is refused with `channel_limit`.
    pub max_channels: usize,
    /// Interval between server heartbeats (`{"type":"ping"}`), in milliseconds. Keep it well
    /// below your proxy's idle timeout (nginx `proxy_read_timeout` defaults to 60 s).
    pub ping_interval_ms: u64,
    /// How long a client may take to answer a ping before it is closed with 4009.
    pub pong_timeout_ms: u64,
    /// Outbound queue budget per connection, in bytes; overflow applies the namespace policy.
    pub queue_max_bytes: usize,
    /// Send several queued messages as one JSON array frame instead of one frame each.
    pub batch: bool,
    /// How long a graceful shutdown waits for connections to close, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Base delay of the reconnect hint sent with 1001; each client gets a random delay
    /// between this and twice this, so a fleet does not come back in one wave.
    pub reconnect_after_ms: u64,
    /// Serve the live dashboard at `/` and the browser client at `/client.js`.
    pub dashboard: bool,
    /// How long a connection may take to send a request's headers, in milliseconds; the wait
    /// for the next request on an idle keep-alive connection counts too.
    pub header_read_timeout_ms: u64,
    /// How long a request's whole body may take to arrive, in milliseconds (408 beyond).
    pub body_read_timeout_ms: u64,
    /// Deepest nesting of arrays and objects accepted in published `data` (`bad_request`).
    pub max_data_depth: usize,
    /// `wss://` and `https://` served directly, with HTTP/2 by ALPN.
    pub tls: crate::tls::TlsConfig,
}

/// The HTTP publish API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer key with every scope. Empty (and no `keys`): only loopback clients may use
    /// the API.
    pub key: String,
    /// Name of an environment variable holding the key (used when `key` is empty).
    pub key_env: String,
    /// Further keys, each with its own scopes (`[[api.keys]]`).
    pub keys: Vec<ApiKeyConfig>,
    /// Lets anyone use the read endpoints (channels, stats, nodes, and the history of
    /// channels whose rules admit an anonymous subscriber), as a public dashboard needs.
    pub public_read: bool,
    /// Largest publish request body accepted, in bytes.
    pub max_body_bytes: usize,
}

/// One `[[api.keys]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in logs (never the key).
    pub name: String,
    /// The key; or
    #[serde(default)]
    pub key: String,
    /// the name of an environment variable holding it.
    #[serde(default)]
    pub key_env: String,
    /// What it may do: `publish`, `read`, `admin` (which includes `read`).
    pub scopes: Vec<crate::access::Scope>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a full `tracing` filter directive.
    pub level: String,
    /// `text` for people, `json` for log pipelines.
    pub format: String,
}

/// The built-in market simulator (the demo feed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    pub enabled: bool,
    /// Events (trades and quotes) per second across all symbols.
    pub rate: f64,
    /// Symbols to simulate; empty uses the built-in list of about 20 well-known names.
    pub symbols: Vec<String>,
    /// Closed candles of made-up past published at startup on each symbol's
    /// `candles.SYM.1s` and `candles.SYM.1m`, so charts are not empty (0: none).
    pub backfill_bars: usize,
}

/// The Socket.IO v4 endpoint (Engine.IO v4, through `socketioxide`). Heartbeat, payload and
/// connection limits come from `[server]`, so every transport obeys the same limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIoConfig {
    /// Serve Socket.IO. When off, the path answers 404 with a pointer to `/ws` and `/sse`.
    pub enabled: bool,
    /// Path of the endpoint, as `socket.io-client`'s `path` option (default `/socket.io`).
    pub path: String,
    /// Engine.IO transports offered: `polling`, `websocket` or both (polling then upgrade).
    pub transports: Vec<String>,
    /// How long an Engine.IO session may go without sending the Socket.IO CONNECT packet
    /// before it is closed, in milliseconds (the reference server's `connectTimeout`).
    pub connect_timeout_ms: u64,
}

/// The broker (`[broker]`): `memory` keeps offsets and history in this process (one node);
/// `redis` shares them through Redis so several nodes act as one gateway (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `"memory"` (default) or `"redis"`.
    pub kind: BrokerKind,
    /// Redis URL: `redis://[user:pass@]host:port/db`, `rediss://` for TLS, or
    /// `redis+sentinel://[user:pass@]host1:26379,host2:26379/MASTER[/DB]` for Sentinel; with
    /// the `sentinels` list, its credentials and database apply to the primary.
    pub url: String,
    /// PEM file of the certificates to trust for `rediss://` (empty: the system's roots).
    pub tls_ca_file: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each); when set, `url` is unused.
    pub cluster_urls: Vec<String>,
    /// Sentinels (`redis://host:26379` each) watching `sentinel_master`; when set, the
    /// primary they name is used instead of `url`, and followed through failovers.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub sentinel_master: String,
    /// Prefix of every Redis key and pub/sub topic, so clusters can share one Redis.
    pub prefix: String,
    /// Longest wait for Redis on a publish or a subscribe; past it the request fails with
    /// `unavailable` (HTTP 503).
    pub timeout_ms: u64,
    /// How often each node compares its channels' positions with Redis, catching a lost
    /// last message.
    pub position_check_ms: u64,
    /// Lifetime of a channel's epoch and offset in Redis after its last publish (they must
    /// outlive its history so offsets never restart while a client may still recover).
    pub meta_ttl_ms: u64,
    /// How long Redis may be unreachable before `/readyz` answers 503.
    pub ready_grace_ms: u64,
}

impl BrokerConfig {
    /// The contents of `tls_ca_file`, if one is named.
    pub fn tls_ca(&self) -> Result<Option<Vec<u8>>, String> {
        if self.tls_ca_file.is_empty() {
            return Ok(None);
        }
        std::fs::read(&self.tls_ca_file)
            .map(Some)
            .map_err(|e| format!("cannot read {:?}: {e}", self.tls_ca_file))
    }
}

/// Which broker a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    #[default]
    Memory,
    Redis,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            url: "redis://127.0.0.1:6379/0".into(),
            tls_ca_file: String::new(),
            cluster_urls: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: "mymaster".into(),
            prefix: "ferrocast".into(),
            timeout_ms: 1_000,
            position_check_ms: 3_000,
            meta_ttl_ms: 7 * 24 * 3_600_000,
            ready_grace_ms: 2_000,
        }
    }
}

/// The diagnostics endpoint (`GET /api/diagnostics`), which reports what the server received
/// after every proxy hop; `ferrocast doctor` compares it with what it sent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Who may read it.
    pub allow: DiagnosticsAccess,
}

/// Who may read `GET /api/diagnostics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiagnosticsAccess {
    /// Clients presenting the API key, and clients on loopback or a private network: both the
    /// TCP peer and the client address the nearest proxy forwarded (the rightmost
    /// `X-Forwarded-For` / `Forwarded` entry) must be loopback, private or link-local.
    #[default]
    Local,
    /// Only clients presenting the API key (`Authorization: Bearer <key>`).
    Key,
    /// Anyone (while debugging a deployment).
    All,
    /// Nobody: the path answers 404.
    Off,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        SocketIoConfig {
            enabled: true,
            path: "/socket.io".into(),
            transports: vec!["polling".into(), "websocket".into()],
            connect_timeout_ms: 45_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            ws_paths: vec!["/ws".into()],
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 100_000,
            max_frame_bytes: 64 * 1024,
            max_channels_per_request: 100,
            max_subscriptions: 1_000,
            max_channels: 100_000,
            ping_interval_ms: 25_000,
            pong_timeout_ms: 10_000,
            queue_max_bytes: 1024 * 1024,
            batch: false,
            shutdown_grace_ms: 10_000,
            reconnect_after_ms: 1_000,
            dashboard: true,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_data_depth: 64,
            tls: crate::tls::TlsConfig::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            key: String::new(),
            key_env: String::new(),
            keys: Vec::new(),
            public_read: false,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: "text".into() }
    }
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            enabled: true,
            rate: 50.0,
            symbols: Vec::new(),
            backfill_bars: ferrocast_feeds::backfill::DEFAULT_BACKFILL_BARS,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            "ticks".into(),
            NamespaceConfig {
                history_size: 1_000,
                overflow: OverflowPolicy::Disconnect,
                ..Default::default()
            },
        );
        namespaces.insert(
            "quotes".into(),
            NamespaceConfig {
                history_size: 100,
                overflow: OverflowPolicy::Conflate,
                snapshot: SnapshotMode::Latest,
                ..Default::default()
            },
        );
        namespaces.insert(
            "candles".into(),
            NamespaceConfig {
                history_size: 500,
                history_ttl_ms: 0,
                overflow: OverflowPolicy::Disconnect,
                snapshot: SnapshotMode::Last,
                snapshot_size: 300,
                ..Default::default()
            },
        );
        namespaces
            .insert("chat".into(), NamespaceConfig { client_publish: true, ..Default::default() });
        Config {
            server: ServerConfig::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            simulator: SimulatorConfig::default(),
            socketio: SocketIoConfig::default(),
            diagnostics: DiagnosticsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            proxy: crate::proxy::ProxyConfig::default(),
            broker: BrokerConfig::default(),
            namespace_defaults: NamespaceConfig::default(),
            namespaces,
            feeds: Vec::new(),
        }
    }
}

/// A configuration problem, naming the key and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { key: key.into(), reason: reason.into() }
    }
}

/// Where configuration comes from, besides the defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources<'a> {
    /// Text of the TOML file and its path (for messages).
    pub file: Option<(&'a Path, String)>,
    /// Environment variables (usually `std::env::vars()`).
    pub env: Vec<(String, String)>,
    /// `KEY=VALUE` overrides from `--set` and the shorthand flags, applied last.
    pub sets: Vec<String>,
}

impl Config {
    /// Whether some namespace compresses its messages, so `/ws` negotiates permessage-deflate.
    pub fn compresses(&self) -> bool {
        self.namespace_defaults.compress || self.namespaces.values().any(|ns| ns.compress)
    }

    /// Whether some namespace emits its messages to Socket.IO under an event of its own too.
    pub fn socketio_events(&self) -> bool {
        !self.namespace_defaults.socketio_event.is_empty()
            || self.namespaces.values().any(|ns| !ns.socketio_event.is_empty())
    }

    /// Merges defaults, file, environment and flags, then validates. Returns every problem
    /// found, each naming its key.
    pub fn load(sources: &Sources<'_>) -> Result<Config, Vec<ConfigError>> {
        Config::load_with_notes(sources).map(|(config, _)| config)
    }

    /// [`Config::load`], also returning notes about adjustments the loader made on the
    /// user's behalf (one sentence each), for the caller to log once logging is set up.
    pub fn load_with_notes(
        sources: &Sources<'_>,
    ) -> Result<(Config, Vec<String>), Vec<ConfigError>> {
        let mut merged = Value::try_from(Config::default()).expect("defaults serialize");
        let mut simulator_explicit = false;
        if let Some((path, text)) = &sources.file {
            let file: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                vec![ConfigError::new(path.display().to_string(), format!("not valid TOML: {e}"))]
            })?;
            let file = Value::Table(file);
            simulator_explicit |= lookup(&file, SIMULATOR_ENABLED).is_some();
            merge(&mut merged, file);
        }
        let simulator_env = env_name(SIMULATOR_ENABLED);
        simulator_explicit |= sources.env.iter().any(|(k, _)| *k == simulator_env);
        simulator_explicit |= sources
            .sets
            .iter()
            .any(|set| set.split_once('=').is_some_and(|(key, _)| key.trim() == SIMULATOR_ENABLED));
        fill_namespaces(&mut merged);
        let mut errors = Vec::new();
        apply_env(&mut merged, &sources.env, &mut errors);
        for set in &sources.sets {
            match set.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    let key = key.trim();
                    let current = lookup(&merged, key).cloned();
                    if let Err(reason) =
                        set_path(&mut merged, key, parse_value(value, current.as_ref()))
                    {
                        errors.push(ConfigError::new(key, reason));
                    }
                }
                _ => errors.push(ConfigError::new(set.clone(), "expected KEY=VALUE")),
            }
        }
        check_unknown_env(&merged, &sources.env, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        fill_namespaces(&mut merged);
        let mut config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            vec![ConfigError::new(
                if key == "." { "config".into() } else { key },
                e.into_inner().to_string(),
            )]
        })?;
        let mut notes = Vec::new();
        if !config.feeds.is_empty() && config.simulator.enabled && !simulator_explicit {
            // The simulator is on only by default (for the demo): a configured feed means
            // real prices are wanted, so the demo steps aside instead of failing the start.
            config.simulator.enabled = false;
            notes.push(
                "demo simulator turned off because [[feeds]] are configured (simulator.enabled \
                 is not set explicitly)"
                    .to_owned(),
            );
        }
        config.validate()?;
        Ok((config, notes))
    }

    /// The socket address to listen on (valid after [`Config::load`]).
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated")
    }

    /// Checks every rule and reports all violations.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, key: &str, reason: String| {
            if !ok {
                errors.push(ConfigError::new(key, reason));
            }
        };
        let s = &self.server;
        check(
            s.listen.parse::<SocketAddr>().is_ok(),
            "server.listen",
            format!(
                "{:?} is not a socket address; expected HOST:PORT such as 127.0.0.1:8080",
                s.listen
            ),
        );
        check(!s.ws_paths.is_empty(), "server.ws_paths", "at least one path is needed".into());
        for (i, path) in s.ws_paths.iter().enumerate() {
            let key = format!("server.ws_paths[{i}]");
            if let Err(reason) = check_route_path(path) {
                check(false, &key, reason);
            }
            check(
                !collides_with_builtin(path),
                &key,
                format!(
                    "{path:?} collides with a built-in endpoint ({})",
                    BUILTIN_PATHS.join(", ")
                ),
            );
            check(
                s.ws_paths.iter().filter(|p| *p == path).count() == 1,
                &key,
                format!("{path:?} is listed twice"),
            );
        }
        for (i, origin) in s.allowed_origins.iter().enumerate() {
            check(
                origin == "*" || origin.starts_with("http://") || origin.starts_with("https://"),
                &format!("server.allowed_origins[{i}]"),
                format!("{origin:?} must be \"*\" or an origin such as https://app.example.com"),
            );
        }
        for (i, host) in s.allowed_hosts.iter().enumerate() {
            check(
                !host.is_empty() && !host.contains('/') && !host.contains(' '),
                &format!("server.allowed_hosts[{i}]"),
                format!(
                    "{host:?} must be a host name such as ferrocast.internal (no scheme or path)"
                ),
            );
        }
        let api = &self.api;
        for (i, entry) in api.keys.iter().enumerate() {
            let key = format!("api.keys[{i}]");
            check(
                !entry.name.is_empty(),
                &format!("{key}.name"),
                "a name is needed (it is logged instead of the key)".into(),
            );
            check(
                api.keys.iter().filter(|k| k.name == entry.name).count() == 1,
                &format!("{key}.name"),
                format!("{:?} is used by two keys", entry.name),
            );
            check(
                entry.key.is_empty() != entry.key_env.is_empty(),
                &key,
                "set exactly one of key and key_env".into(),
            );
            check(
                !entry.scopes.is_empty(),
                &format!("{key}.scopes"),
                "at least one of \"publish\", \"read\", \"admin\" is needed".into(),
            );
        }
        if let Err(e) = self.proxy.validate() {
            check(false, &e.key, e.reason);
        }
        check(s.max_connections >= 1, "server.max_connections", "must be at least 1".into());
        check(
            (128..=16 * 1024 * 1024).contains(&s.max_frame_bytes),
            "server.max_frame_bytes",
            format!("{} is outside 128..=16777216", s.max_frame_bytes),
        );
        check(
            s.max_channels_per_request >= 1,
            "server.max_channels_per_request",
            "must be at least 1".into(),
        );
        check(s.max_subscriptions >= 1, "server.max_subscriptions", "must be at least 1".into());
        check(s.max_channels >= 1, "server.max_channels", "must be at least 1".into());
        check(
            (100..=3_600_000).contains(&s.ping_interval_ms),
            "server.ping_interval_ms",
            format!("{} is outside 100..=3600000", s.ping_interval_ms),
        );
        check(
            (100..=600_000).contains(&s.pong_timeout_ms),
            "server.pong_timeout_ms",
            format!("{} is outside 100..=600000", s.pong_timeout_ms),
        );
        check(
            s.queue_max_bytes >= 1024,
            "server.queue_max_bytes",
            format!("{} is too small; use at least 1024", s.queue_max_bytes),
        );
        check(
            (100..=3_600_000).contains(&s.header_read_timeout_ms),
            "server.header_read_timeout_ms",
            format!("{} is outside 100..=3600000", s.header_read_timeout_ms),
        );
        check(
            (100..=3_600_000).contains(&s.body_read_timeout_ms),
            "server.body_read_timeout_ms",
            format!("{} is outside 100..=3600000", s.body_read_timeout_ms),
        );
        check(
            (1..=1024).contains(&s.max_data_depth),
            "server.max_data_depth",
            format!("{} is outside 1..=1024", s.max_data_depth),
        );
        for (key, reason) in s.tls.problems().into_iter().chain(self.limits.problems()) {
            check(false, &key, reason);
        }
        check(
            (1024..=256 * 1024 * 1024).contains(&self.api.max_body_bytes),
            "api.max_body_bytes",
            format!("{} is outside 1024..=268435456", self.api.max_body_bytes),
        );
        check(
            s.shutdown_grace_ms <= 600_000,
            "server.shutdown_grace_ms",
            "must be at most 600000".into(),
        );
        check(
            (1..=600_000).contains(&s.reconnect_after_ms),
            "server.reconnect_after_ms",
            format!("{} is outside 1..=600000", s.reconnect_after_ms),
        );
        if let Err(reason) = check_log_filter(&self.log.level) {
            check(false, "log.level", reason);
        }
        check(
            ["text", "json"].contains(&self.log.format.as_str()),
            "log.format",
            format!("{:?} must be \"text\" or \"json\"", self.log.format),
        );
        let sim = &self.simulator;
        check(
            sim.rate > 0.0 && sim.rate <= 1_000_000.0,
            "simulator.rate",
            format!("{} must be above 0 and at most 1000000 events per second", sim.rate),
        );
        check(
            sim.backfill_bars <= ferrocast_feeds::backfill::MAX_BACKFILL_BARS,
            "simulator.backfill_bars",
            format!(
                "{} is above {}",
                sim.backfill_bars,
                ferrocast_feeds::backfill::MAX_BACKFILL_BARS
            ),
        );
        for (i, sym) in sim.symbols.iter().enumerate() {
            check(
                ferrocast_protocol::validate_channel(&format!("ticks.{sym}")).is_ok()
                    && !sym.contains('.'),
                &format!("simulator.symbols[{i}]"),
                format!("{sym:?} cannot be used in a channel name"),
            );
        }
        let sio = &self.socketio;
        if let Err(reason) = check_route_path(&sio.path) {
            check(false, "socketio.path", reason);
        }
        check(
            !sio.path.ends_with('/'),
            "socketio.path",
            format!("{:?} must not end with /", sio.path),
        );
        check(
            sio.path == "/socket.io"
                || !(collides_with_builtin(&sio.path)
                    || BUILTIN_PATHS.iter().any(|b| b.starts_with(&format!("{}/", sio.path)))),
            "socketio.path",
            format!(
                "{:?} collides with a built-in endpoint ({})",
                sio.path,
                BUILTIN_PATHS.join(", ")
            ),
        );
        check(
            !s.ws_paths.iter().any(|p| {
                *p == sio.path || p.starts_with(&format!("{}/", sio.path.trim_end_matches('/')))
            }),
            "socketio.path",
            format!("{:?} is also a WebSocket path (server.ws_paths)", sio.path),
        );
        check(
            (100..=600_000).contains(&sio.connect_timeout_ms),
            "socketio.connect_timeout_ms",
            format!("{} is outside 100..=600000", sio.connect_timeout_ms),
        );
        check(!sio.transports.is_empty(), "socketio.transports", "at least one is needed".into());
        for (i, t) in sio.transports.iter().enumerate() {
            check(
                ["polling", "websocket"].contains(&t.as_str())
                    && sio.transports.iter().filter(|x| *x == t).count() == 1,
                &format!("socketio.transports[{i}]"),
                format!("{t:?} must be \"polling\" or \"websocket\", listed once"),
            );
        }
        let b = &self.broker;
        if b.kind == BrokerKind::Redis {
            let ca = match b.tls_ca() {
                Ok(ca) => ca,
                Err(reason) => {
                    check(false, "broker.tls_ca_file", reason);
                    None
                }
            };
            let schemes = ["redis://", "rediss://", "unix://", "redis+sentinel://"];
            let parsed = if schemes.iter().any(|p| b.url.starts_with(p)) {
                ferrocast_broker_redis::check_url(&b.url, ca.as_deref())
            } else {
                Err("expected redis://[user:password@]host:port/db, rediss://... or redis+sentinel://host:port,.../master".into())
            };
            if let Err(reason) = parsed {
                check(false, "broker.url", format!("{:?}: {reason}", b.url));
            }
            let sentinel_url = b.url.starts_with("redis+sentinel://");
            check(
                b.sentinels.is_empty() || b.cluster_urls.is_empty(),
                "broker.sentinels",
                "use either sentinels or cluster_urls, not both".into(),
            );
            check(
                !sentinel_url || (b.sentinels.is_empty() && b.cluster_urls.is_empty()),
                "broker.url",
                "a redis+sentinel:// URL lists the sentinels itself: leave sentinels and cluster_urls empty".into(),
            );
            check(
                b.sentinels.is_empty() || !b.sentinel_master.is_empty(),
                "broker.sentinel_master",
                "the name the sentinels monitor the primary under is needed".into(),
            );
            for (i, url) in b.sentinels.iter().enumerate() {
                if let Err(reason) = ferrocast_broker_redis::check_url(url, None) {
                    check(false, &format!("broker.sentinels[{i}]"), format!("{url:?}: {reason}"));
                }
            }
            for (i, url) in b.cluster_urls.iter().enumerate() {
                let parsed = if url.starts_with("redis://") || url.starts_with("rediss://") {
                    ferrocast_broker_redis::check_url(url, ca.as_deref())
                } else {
                    Err("expected redis://host:port or rediss://host:port".into())
                };
                if let Err(reason) = parsed {
                    check(
                        false,
                        &format!("broker.cluster_urls[{i}]"),
                        format!("{url:?}: {reason}"),
                    );
                }
            }
        }
        check(
            !b.prefix.is_empty()
                && b.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "_-:.".contains(c)),
            "broker.prefix",
            format!("{:?} must be non-empty letters, digits, _ - : or .", b.prefix),
        );
        check(
            (10..=60_000).contains(&b.timeout_ms),
            "broker.timeout_ms",
            format!("{} must be between 10 and 60000", b.timeout_ms),
        );
        check(
            (100..=3_600_000).contains(&b.position_check_ms),
            "broker.position_check_ms",
            format!("{} must be between 100 and 3600000", b.position_check_ms),
        );
        check(
            b.meta_ttl_ms >= 60_000,
            "broker.meta_ttl_ms",
            format!("{} must be at least 60000 (one minute)", b.meta_ttl_ms),
        );
        check(
            b.ready_grace_ms <= 600_000,
            "broker.ready_grace_ms",
            format!("{} must be at most 600000", b.ready_grace_ms),
        );
        let proxy = &self.proxy;
        for (key, ns) in
            std::iter::once(("namespace_defaults".to_string(), &self.namespace_defaults))
                .chain(self.namespaces.iter().map(|(name, ns)| (format!("namespaces.{name}"), ns)))
        {
            if ns.subscribe == ferrocast_hub::SubscribeRule::Proxy && proxy.subscribe_url.is_empty()
            {
                errors.push(ConfigError::new(
                    format!("{key}.subscribe"),
                    "\"proxy\" needs proxy.subscribe_url",
                ));
            }
            if ns.publish_rule() == ferrocast_hub::PublishRule::Proxy
                && proxy.publish_url.is_empty()
            {
                errors.push(ConfigError::new(
                    format!("{key}.publish"),
                    "\"proxy\" needs proxy.publish_url",
                ));
            }
        }
        check_namespace("namespace_defaults", &self.namespace_defaults, &mut errors);
        for (name, ns) in &self.namespaces {
            let key = format!("namespaces.{name}");
            if name.is_empty()
                || name.contains('.')
                || ferrocast_protocol::validate_channel(name).is_err()
            {
                errors.push(ConfigError::new(
                    &key,
                    "a namespace name uses A-Z a-z 0-9 _ : @ - and no dot",
                ));
            }
            check_namespace(&key, ns, &mut errors);
        }
        for (key, reason) in ferrocast_feeds::config::validate_all(&self.feeds) {
            errors.push(ConfigError::new(key, reason));
        }
        if !self.feeds.is_empty() && self.simulator.enabled {
            // The demo market publishes made-up prices on the same ticks.* and quotes.*
            // channels as the feeds; mixing them on a trading screen would be dangerous.
            // Only an explicit `simulator.enabled = true` gets here: the default is turned
            // off by `Config::load` when feeds are configured.
            errors.push(ConfigError::new(
                "simulator.enabled",
                "must be false when [[feeds]] are configured: the demo simulator would publish \
                 made-up prices on the same ticks.* / quotes.* channels (remove the explicit \
                 simulator.enabled = true)",
            ));
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

/// The key that turns the demo simulator on or off.
const SIMULATOR_ENABLED: &str = "simulator.enabled";

/// Paths served by ferrocast itself (each also as a prefix), which a WebSocket alias may not
/// take. Other paths under `/api/` are free, so `/api/socket` can be an alias.
const BUILTIN_PATHS: &[&str] = &[
    "/",
    "/sse",
    "/socket.io",
    "/api/publish",
    "/api/channels",
    "/api/stats",
    "/api/feeds",
    "/api/diagnostics",
    "/api/nodes",
    "/api/users",
    "/metrics",
    "/healthz",
    "/readyz",
    "/client.js",
    "/app.js",
    "/app.css",
];

/// Checks a configured route path (`server.ws_paths`, `socketio.path`): it is matched
/// literally, so it must not contain the router's pattern syntax (`:id`, `*rest`, `{id}`),
/// which would otherwise make `serve` fail after binding.
fn check_route_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.len() < 2 {
        return Err(format!("{path:?} must start with / and name a path"));
    }
    if path.len() > 256 {
        return Err(format!("{path:?} is longer than 256 characters"));
    }
    if let Some(c) = path.chars().find(|c| !(c.is_ascii_alphanumeric() || "/-._~".contains(*c))) {
        return Err(format!(
            "{path:?} contains {c:?}: a path is literal and uses only A-Z a-z 0-9 / - . _ ~ \
             (no route patterns such as :id, *rest or {{id}})"
        ));
    }
    let inner = path.strip_suffix('/').unwrap_or(path);
    if inner[1..].split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err(format!("{path:?} has an empty, \".\" or \"..\" segment"));
    }
    Ok(())
}

/// Checks `log.level` strictly: every comma-separated directive must be a level
/// (`off error warn info debug trace`) or `target=level`, as `tracing`'s filter syntax reads
/// it. A bare word would otherwise be taken as a target name and quietly log nothing else.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |s: &str| LEVELS.contains(&s.to_ascii_lowercase().as_str());
    for directive in filter.split(',').map(str::trim) {
        let ok = if directive.is_empty() {
            false
        } else if let Some((target, level)) = directive.rsplit_once('=') {
            is_level(level) && !target.is_empty() && !target.contains('=')
        } else {
            is_level(directive)
        };
        if !ok {
            return Err(format!(
                "{filter:?} is not a log filter: {directive:?} must be a level (off, error, warn, \
                 info, debug, trace) or TARGET=LEVEL such as ferrocast_server=debug"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| format!("{filter:?} is not a log filter: {e}"))
}

fn collides_with_builtin(path: &str) -> bool {
    BUILTIN_PATHS.iter().any(|b| path == *b || (*b != "/" && path.starts_with(&format!("{b}/"))))
}

/// Socket.IO event names a namespace's `socketio_event` may not take: the client library's
/// own events and the ones ferrocast emits or handles itself.
const SOCKETIO_RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "message",
    "subscribe",
    "unsubscribe",
    "publish",
    "ping",
    "pong",
    "close",
    "unsubscribed",
];

fn check_namespace(key: &str, ns: &NamespaceConfig, errors: &mut Vec<ConfigError>) {
    if ns.history_size > 1_000_000 {
        errors.push(ConfigError::new(format!("{key}.history_size"), "must be at most 1000000"));
    }
    if ns.snapshot == SnapshotMode::Last
        && !(1..=ns.history_size.max(1)).contains(&ns.snapshot_size)
    {
        errors.push(ConfigError::new(
            format!("{key}.snapshot_size"),
            format!(
                "snapshot = \"last\" needs snapshot_size between 1 and history_size ({}), got {}",
                ns.history_size, ns.snapshot_size
            ),
        ));
    }
    if ns.max_replay > 1_000_000 {
        errors.push(ConfigError::new(format!("{key}.max_replay"), "must be at most 1000000"));
    }
    let event = &ns.socketio_event;
    if !event.is_empty() && (event.len() > 64 || SOCKETIO_RESERVED_EVENTS.contains(&event.as_str()))
    {
        errors.push(ConfigError::new(
            format!("{key}.socketio_event"),
            format!("{event:?} is reserved or longer than 64 characters"),
        ));
    }
}

/// Deep-merges `overlay` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Table(base), Value::Table(overlay)) => {
            for (k, v) in overlay {
                match base.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Gives every namespace table the keys it does not set from `[namespace_defaults]`, so a
/// new namespace inherits the defaults and every key of it has an environment variable.
fn fill_namespaces(merged: &mut Value) {
    let Some(defaults) = merged.get("namespace_defaults").cloned() else { return };
    if let Some(Value::Table(namespaces)) = merged.get_mut("namespaces") {
        for (_, ns) in namespaces.iter_mut() {
            let mut full = defaults.clone();
            merge(&mut full, ns.clone());
            *ns = full;
        }
    }
}

/// Every leaf key path of a table (`server.listen`, `namespaces.ticks.overflow`, …).
fn leaf_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Table(t) = value {
        for (k, v) in t {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if v.is_table() {
                leaf_paths(v, &path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// The environment variable that overrides `path`.
pub fn env_name(path: &str) -> String {
    format!("FERROCAST_{}", path.replace(['.', '-'], "_").to_ascii_uppercase())
}

fn apply_env(merged: &mut Value, env: &[(String, String)], errors: &mut Vec<ConfigError>) {
    let mut paths = Vec::new();
    leaf_paths(merged, "", &mut paths);
    for path in paths {
        let name = env_name(&path);
        if let Some((_, raw)) = env.iter().find(|(k, _)| *k == name) {
            let current = lookup(merged, &path).cloned();
            if let Err(reason) = set_path(merged, &path, parse_value(raw, current.as_ref())) {
                errors.push(ConfigError::new(format!("{path} (from {name})"), reason));
            }
        }
    }
}

/// `FERROCAST_*` variables that are not configuration keys but are read by the binary, its
/// tests or its deployment files, so an environment that sets them is not refused.
pub const NON_CONFIG_ENV: &[&str] = &[
    // `serve` / `config show`: the configuration file (`--config`).
    "FERROCAST_CONFIG",
    // The test suites: the binary under test, skipped stages, where artifacts go, which
    // Chromium the browser tests drive.
    "FERROCAST_BIN",
    "FERROCAST_TEST_SKIP",
    "FERROCAST_E2E_ARTIFACTS",
    "FERROCAST_CHROMIUM",
];

/// Refuses `FERROCAST_*` variables that name no configuration key (a misspelling would
/// otherwise be ignored), suggesting the closest known name. Allowed besides the keys:
/// [`NON_CONFIG_ENV`] and the variables `api.key_env` and each feed's `api_key_env` name.
fn check_unknown_env(merged: &Value, env: &[(String, String)], errors: &mut Vec<ConfigError>) {
    let mut paths = Vec::new();
    leaf_paths(merged, "", &mut paths);
    let mut known: Vec<String> = paths.iter().map(|p| env_name(p)).collect();
    known.extend(NON_CONFIG_ENV.iter().map(|s| s.to_string()));
    let named_by = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    known.extend(named_by(lookup(merged, "api.key_env")));
    known.extend(named_by(lookup(merged, "auth.hmac_secret_env")));
    if let Some(Value::Array(keys)) = lookup(merged, "api.keys") {
        known.extend(keys.iter().filter_map(|k| named_by(k.get("key_env"))));
    }
    if let Some(Value::Array(feeds)) = merged.get("feeds") {
        known.extend(feeds.iter().filter_map(|f| named_by(f.get("api_key_env"))));
    }
    for (name, _) in env {
        if !name.starts_with("FERROCAST_") || known.iter().any(|k| k == name) {
            continue;
        }
        let closest = known
            .iter()
            .map(|k| (strsim::levenshtein(k, name), k))
            .min()
            .filter(|(d, _)| *d <= name.len() / 3 + 2)
            .map(|(_, k)| format!("; did you mean {k}?"))
            .unwrap_or_default();
        let hint = if name.starts_with("FERROCAST_NAMESPACES_") {
            " (a namespace's variables exist once the file has its [namespaces.NAME] table)"
        } else if name.starts_with("FERROCAST_FEEDS") {
            " ([[feeds]] blocks are configured in the file only)"
        } else {
            ""
        };
        errors.push(ConfigError::new(
            name.clone(),
            format!("unknown FERROCAST_ variable: it names no configuration key{hint}{closest}"),
        ));
    }
}

fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |v, part| v.as_table()?.get(part))
}

/// Parses an override: a TOML literal when it is one, otherwise a string; a comma-separated
/// string for a key that currently holds a list.
fn parse_value(raw: &str, current: Option<&Value>) -> Value {
    let parsed = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    match (parsed, current) {
        (Some(v @ Value::Array(_)), _) => v,
        (_, Some(Value::Array(_))) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        (Some(v), Some(Value::String(_))) if !v.is_str() => Value::String(raw.to_owned()),
        (Some(v), _) => v,
        (None, _) => Value::String(raw.to_owned()),
    }
}

fn set_path(root: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut node = root;
    while let Some(part) = parts.next() {
        let table = node.as_table_mut().ok_or_else(|| format!("{path} does not name a table"))?;
        if parts.peek().is_none() {
            table.insert(part.to_owned(), value);
            return Ok(());
        }
        node = table.entry(part.to_owned()).or_insert_with(|| Value::Table(toml::Table::new()));
    }
    Err("empty key".into())
}

/// The commented example configuration, covering every option (also in `docs/`).
pub const EXAMPLE_CONFIG: &str = include_str!("../../../deploy/ferrocast.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        file: Option<&str>,
        env: &[(&str, &str)],
        sets: &[&str],
    ) -> Result<Config, Vec<ConfigError>> {
        Config::load(&Sources {
            file: file.map(|t| (Path::new("test.toml"), t.to_owned())),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(None, &[], &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.ping_interval_ms, 25_000);
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let c = load(Some(EXAMPLE_CONFIG), &[], &[]).unwrap();
        // Every default key appears in the example, so it documents every option.
        let mut paths = Vec::new();
        leaf_paths(&Value::try_from(Config::default()).unwrap(), "", &mut paths);
        let example: toml::Table = EXAMPLE_CONFIG.parse().unwrap();
        // `feeds` is an array of tables with no default entry: the example documents it as
        // a commented [[feeds]] block, checked below.
        for p in paths.iter().filter(|p| !p.starts_with("namespaces.") && *p != "feeds") {
            assert!(
                lookup(&Value::Table(example.clone()), p).is_some(),
                "example config lacks {p}"
            );
        }
        assert!(c.namespaces.contains_key("ticks"));
        assert!(c.feeds.is_empty());
    }

    /// The example's commented `[[feeds]]` block, uncommented, is a valid Massive feed that
    /// mentions every key a Massive feed takes.
    #[test]
    fn example_feed_block_is_valid_when_uncommented() {
        let block: String = EXAMPLE_CONFIG
            .lines()
            .skip_while(|l| !l.starts_with("# [[feeds]]"))
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with(' ') && (l.starts_with('[') || l.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(block.starts_with("[[feeds]]"), "no commented [[feeds]] block: {block}");
        let text = format!("[simulator]\nenabled = false\n{block}");
        let c = load(Some(&text), &[], &[]).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert_eq!(c.feeds.len(), 1);
        let f = &c.feeds[0];
        assert_eq!((f.kind.as_str(), f.name.as_str()), ("massive", "stocks"));
        for key in [
            "name",
            "kind",
            "url",
            "api_key_env",
            "events",
            "always",
            "symbols",
            "linger_ms",
            "required",
            "connect_timeout_ms",
            "ping_interval_ms",
            "read_timeout_ms",
            "stale_after_ms",
            "backoff_initial_ms",
            "backoff_max_ms",
            "max_connections_backoff_ms",
            "backfill_bars",
            "rest_url",
        ] {
            assert!(block.contains(&format!("{key} = ")), "example [[feeds]] lacks {key}");
        }
    }

    #[test]
    fn feed_errors_name_the_feed_key() {
        let text = "[simulator]\nenabled = false\n[[feeds]]\nname = \"stocks\"\nkind = \"massive\"\nurl = \"https://x\"\nevents = [\"T\", \"Z\"]\n";
        let e = load(Some(text), &[], &[]).unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"feeds[0].url"), "{e:?}");
        assert!(keys.contains(&"feeds[0].events[1]"), "{e:?}");

        let text = "[[feeds]]\nname = \"s\"\nkind = \"massive\"\nurl = \"wss://socket.massive.com/stocks\"\nevents = [\"T\"]\nsubscribe = \"x\"\n";
        let e = load(Some(text), &[], &[]).unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["feeds[0].subscribe"], "{e:?}");

        let e = load(Some("[[feeds]]\nname = \"s\"\nurll = \"x\"\n"), &[], &[]).unwrap_err();
        assert_eq!(e[0].key, "feeds[0].urll");
    }

    const ONE_FEED: &str = "[[feeds]]\nname = \"s\"\nkind = \"massive\"\nurl = \"wss://socket.massive.com/stocks\"\nevents = [\"T\"]\n";

    #[test]
    fn a_feed_turns_the_default_simulator_off_with_a_note() {
        let (c, notes) = Config::load_with_notes(&Sources {
            file: Some((Path::new("f.toml"), ONE_FEED.to_owned())),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.simulator.enabled);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("simulator"), "{notes:?}");

        // Without feeds the default stays on and nothing is noted.
        let (c, notes) = Config::load_with_notes(&Sources::default()).unwrap();
        assert!(c.simulator.enabled);
        assert!(notes.is_empty(), "{notes:?}");

        // Explicitly off: no note needed.
        let text = format!("[simulator]\nenabled = false\n{ONE_FEED}");
        let (c, notes) = Config::load_with_notes(&Sources {
            file: Some((Path::new("f.toml"), text)),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.simulator.enabled);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn an_explicit_simulator_with_feeds_is_still_refused() {
        let in_file = format!("[simulator]\nenabled = true\n{ONE_FEED}");
        let e = load(Some(&in_file), &[], &[]).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "simulator.enabled");
        assert!(e[0].reason.contains("[[feeds]]"), "{}", e[0].reason);

        let e = load(Some(ONE_FEED), &[("FERROCAST_SIMULATOR_ENABLED", "true")], &[]).unwrap_err();
        assert_eq!(e[0].key, "simulator.enabled", "{e:?}");

        let e = load(Some(ONE_FEED), &[], &[" simulator.enabled = true"]).unwrap_err();
        assert_eq!(e[0].key, "simulator.enabled", "{e:?}");

        // A feed given only through --set counts as configured too.
        let sets = [
            "feeds=[{name = \"s\", kind = \"massive\", url = \"wss://x.example/stocks\", events = [\"T\"]}]",
        ];
        assert!(!load(None, &[], &sets).unwrap().simulator.enabled);
    }

    #[test]
    fn file_then_env_then_flags() {
        let file = "[server]\nlisten = \"127.0.0.1:9000\"\nping_interval_ms = 1000\n[namespaces.prices]\nclient_publish = true\n";
        let c = load(
            Some(file),
            &[
                ("FERROCAST_SERVER_PING_INTERVAL_MS", "2000"),
                ("FERROCAST_NAMESPACES_PRICES_HISTORY_SIZE", "7"),
                ("FERROCAST_SERVER_WS_PATHS", "/ws,/ws/price"),
            ],
            &["server.listen=127.0.0.1:9001"],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9001");
        assert_eq!(c.server.ping_interval_ms, 2000);
        assert_eq!(c.server.ws_paths, vec!["/ws", "/ws/price"]);
        assert_eq!(c.namespaces["prices"].history_size, 7);
        assert!(c.namespaces["prices"].client_publish);
        assert!(c.namespaces.contains_key("ticks"), "defaults survive a partial namespaces table");
    }

    #[test]
    fn errors_name_the_key_and_reason() {
        let e = load(Some("[server]\nlisten = \"nope\"\n"), &[], &[]).unwrap_err();
        assert_eq!(e[0].key, "server.listen");
        assert!(e[0].reason.contains("not a socket address"), "{}", e[0].reason);

        let e = load(Some("[server]\nlistn = \"x\"\n"), &[], &[]).unwrap_err();
        assert_eq!(e[0].key, "server.listn");
        assert!(e[0].reason.contains("unknown field `listn`"), "{}", e[0].reason);

        let e = load(None, &[], &["namespaces.ticks.overflow=sometimes"]).unwrap_err();
        assert_eq!(e[0].key, "namespaces.ticks.overflow");

        let e = load(None, &[("FERROCAST_SERVER_MAX_FRAME_BYTES", "10")], &[]).unwrap_err();
        assert_eq!(e[0].key, "server.max_frame_bytes");

        let e = load(Some("[server\n"), &[], &[]).unwrap_err();
        assert!(e[0].reason.contains("not valid TOML"));

        let e = load(
            None,
            &[],
            &["server.ws_paths=[\"/api/publish\"]", "namespaces.candles.snapshot_size=0"],
        )
        .unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["server.ws_paths[0]", "namespaces.candles.snapshot_size"]);
    }

    #[test]
    fn route_paths_are_literal() {
        for bad in [
            "/ws/:id",
            "/ws/*rest",
            "/ws/{",
            "/ws/{id}",
            "ws",
            "/",
            "/ws//x",
            "/a b",
            "/ws/..",
            "/ws?x",
        ] {
            let e = load(None, &[], &[&format!("server.ws_paths=[\"{bad}\"]")]).unwrap_err();
            assert_eq!(e[0].key, "server.ws_paths[0]", "{bad}: {e:?}");
        }
        for bad in ["/sio/:id", "/sio/{x}", "/api", "/sio/"] {
            let e = load(None, &[], &[&format!("socketio.path={bad}")]).unwrap_err();
            assert_eq!(e[0].key, "socketio.path", "{bad}: {e:?}");
        }
        let ok = ["/ws", "/ws/price", "/api/socket", "/v1/stream.ws", "/a-b_c~d/"];
        let c = load(None, &[], &[&format!("server.ws_paths={}", ok.join(","))]).unwrap();
        assert_eq!(c.server.ws_paths, ok);
        // Every accepted combination builds the router without panicking.
        let c =
            load(None, &[], &["socketio.path=/rt/sio", "server.ws_paths=/ws,/rt,/rt/ws/"]).unwrap();
        let _ = crate::router(crate::AppState::new(c, None));
    }

    #[test]
    fn log_filter_is_strict() {
        for ok in ["info", "WARN", "off", "info,ferrocast_server=debug", "tower_http=trace"] {
            assert!(check_log_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "info,foo=bar=baz", "", "info,", "foo=loud", "=info"] {
            let e = load(None, &[], &[&format!("log.level={bad}")]).unwrap_err();
            assert_eq!(e[0].key, "log.level", "{bad}");
            assert!(e[0].reason.contains("not a log filter"), "{bad}: {}", e[0].reason);
        }
    }

    #[test]
    fn unknown_env_vars_are_refused_with_a_suggestion() {
        let e = load(None, &[("FERROCAST_SERVER_PING_INTERVAL", "1000")], &[]).unwrap_err();
        assert_eq!(e[0].key, "FERROCAST_SERVER_PING_INTERVAL");
        assert!(e[0].reason.contains("did you mean FERROCAST_SERVER_PING_INTERVAL_MS?"), "{e:?}");
        // Non-config variables in use, and the variables the config names, are allowed.
        let c = load(
            Some("[api]\nkey_env = \"FERROCAST_PUBLISH_KEY\"\n"),
            &[
                ("FERROCAST_BIN", "/x"),
                ("FERROCAST_API_KEY", "k"),
                ("FERROCAST_CONFIG", "/etc/f.toml"),
                ("FERROCAST_PUBLISH_KEY", "k2"),
                ("OTHER_VAR", "1"),
            ],
            &[],
        )
        .unwrap();
        // FERROCAST_API_KEY is also the variable of `api.key`.
        assert_eq!(c.api.key, "k");
        let e = load(None, &[("FERROCAST_NAMESPACES_NEWS_HISTORY_SIZE", "5")], &[]).unwrap_err();
        assert!(e[0].reason.contains("[namespaces.NAME]"), "{e:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// No path configuration that passes validation can make building the router panic
        /// (which would happen after binding the port).
        #[test]
        fn every_valid_path_configuration_builds_the_router(
            ws in proptest::collection::vec("/[a-z._~-]{0,3}(/[a-z:*{}._-]{0,3}){0,2}/?", 1..4),
            sio in "/[a-z.-]{1,5}(/[a-z:*{}]{0,3})?",
            dashboard in proptest::bool::ANY,
            socketio in proptest::bool::ANY,
        ) {
            let sets = [
                format!("server.ws_paths={}", serde_json::to_string(&ws).unwrap()),
                format!("socketio.path={sio}"),
                format!("server.dashboard={dashboard}"),
                format!("socketio.enabled={socketio}"),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            if let Ok(c) = load(None, &[], &sets) {
                let _ = crate::router(crate::AppState::new(c, None));
            }
        }
    }

    #[test]
    fn broker_settings_are_checked() {
        let c = load(None, &[("FERROCAST_BROKER_KIND", "redis")], &["broker.url=redis://h:1/2"]);
        let c = c.unwrap();
        assert_eq!((c.broker.kind, c.broker.url.as_str()), (BrokerKind::Redis, "redis://h:1/2"));

        let bad = |sets: &[&str]| {
            let mut all = vec!["broker.kind=redis"];
            all.extend_from_slice(sets);
            load(None, &[], &all).unwrap_err().into_iter().map(|e| e.key).collect::<Vec<_>>()
        };
        assert_eq!(bad(&["broker.url=http://h:1"]), vec!["broker.url"]);
        let sentinel_url = "broker.url=redis+sentinel://s1:26379,s2:26379/orders/1";
        assert!(load(None, &[], &["broker.kind=redis", sentinel_url]).is_ok());
        assert_eq!(bad(&["broker.url=redis+sentinel://s1:26379/orders/x"]), vec!["broker.url"]);
        assert_eq!(
            bad(&["broker.url=redis+sentinel://s1/m", "broker.sentinels=[\"redis://s:26379\"]"]),
            vec!["broker.url"]
        );
        assert_eq!(bad(&["broker.url=redis://h:notaport"]), vec!["broker.url"]);
        assert_eq!(bad(&["broker.timeout_ms=0"]), vec!["broker.timeout_ms"]);
        assert_eq!(bad(&["broker.position_check_ms=1"]), vec!["broker.position_check_ms"]);
        assert_eq!(bad(&["broker.meta_ttl_ms=1000"]), vec!["broker.meta_ttl_ms"]);
        assert_eq!(bad(&["broker.prefix=a b"]), vec!["broker.prefix"]);
        assert_eq!(bad(&["broker.tls_ca_file=/nonexistent/ca.pem"]), vec!["broker.tls_ca_file"]);
        assert_eq!(
            bad(&[
                "broker.sentinels=[\"redis://s:26379\"]",
                "broker.cluster_urls=[\"redis://c:7000\"]"
            ]),
            vec!["broker.sentinels"]
        );
        assert_eq!(
            bad(&["broker.cluster_urls=[\"http://c:7000\"]"]),
            vec!["broker.cluster_urls[0]"]
        );
        let e = load(None, &[], &["broker.kind=etcd"]).unwrap_err();
        assert_eq!(e[0].key, "broker.kind");
        // The memory broker ignores the Redis URL.
        assert!(load(None, &[], &["broker.url=http://h"]).is_ok());
    }
}
