//! The `[[feeds]]` configuration of upstream connectors, as written in the server's TOML
//! file, and its validation.
//!
//! One flat table per feed: the keys every connector shares, then the keys of its `kind`.
//! Validation reports every problem as `(key, reason)` with the key relative to the feed
//! (`url`, `routes[0].channel`); the server prefixes `feeds[N].`. A key that belongs to the
//! other kind is an error rather than silently ignored, so a Massive feed with a `subscribe`
//! template is caught at startup.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One upstream feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Unique name: the `feed` label in metrics and the key in `/api/feeds`.
    pub name: String,
    /// `massive` or `generic`.
    pub kind: String,
    /// WebSocket URL (`wss://socket.massive.com/stocks`).
    pub url: String,
    /// The upstream API key. Prefer `api_key_env` so the key stays out of files.
    pub api_key: String,
    /// Name of an environment variable holding the API key (used when `api_key` is empty).
    pub api_key_env: String,
    /// Whether `/readyz` answers 503 while this feed is not live.
    pub required: bool,
    /// Symbols kept subscribed upstream whether or not a client watches them (`*`: all).
    pub always: Vec<String>,
    /// Which symbols this feed serves: `*`, `PREFIX*`, `*SUFFIX` or exact symbols. Empty: Massive
    /// feeds take their market's symbols (`O:*` for options, unprefixed for stocks), generic
    /// feeds take any symbol. A channel goes to the first feed (in file order) that matches.
    pub symbols: Vec<String>,
    /// How long an upstream subscription is kept after the last client left, in ms.
    pub linger_ms: u64,
    /// Most time to open the connection (TCP, TLS and the WebSocket handshake), in ms.
    pub connect_timeout_ms: u64,
    /// Interval of WebSocket pings sent upstream, in ms (0: none).
    pub ping_interval_ms: u64,
    /// With nothing received (data, heartbeat or pong) for this long, in ms, the connection is
    /// presumed dead and replaced.
    pub read_timeout_ms: u64,
    /// With at least one symbol subscribed upstream and no market data for this long, in ms
    /// (counted from the first subscription), the feed is `stale`: connected and answering
    /// pings but sending nothing. It is marked so, then reconnected (0: never).
    pub stale_after_ms: u64,
    /// First reconnect delay ceiling, in ms; it doubles per failure (with full jitter).
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay ceiling, in ms.
    pub backoff_max_ms: u64,
    /// Extra HTTP headers for the WebSocket handshake (`Authorization`, ...).
    pub headers: BTreeMap<String, String>,

    /// Massive: event types to subscribe per symbol: `T` trades, `Q` quotes, `A` second bars,
    /// `AM` minute bars.
    pub events: Vec<String>,
    /// Massive: wait this long, in ms, after a `max_connections` disconnect (another client
    /// uses the same key), instead of the usual backoff.
    pub max_connections_backoff_ms: u64,
    /// Massive: factor applied to quote sizes. Massive documents stock quote sizes in round
    /// lots (2 = 200 shares), so stocks default to 100; options (contracts) to 1.
    pub quote_size_multiplier: Option<f64>,
    /// Massive: most symbols with quotes (`Q`) on one connection. Options default to 1000,
    /// Massive's per-connection limit; a client subscribing beyond it is refused.
    pub quote_limit: Option<usize>,
    /// Massive: REST base URL for candle backfill (aggregates); empty uses
    /// `https://api.massive.com` for Massive's hosts, else the WebSocket's host and port.
    pub rest_url: String,
    /// Massive: closed bars fetched from REST for a candle channel with no history yet, when
    /// its first client subscribes (0: no backfill).
    pub backfill_bars: usize,

    /// Generic: message sent right after connecting, e.g. an auth request (`{api_key}`).
    pub auth: String,
    /// Generic: a message matching this means authenticated (empty: live at once).
    pub auth_ok: Matcher,
    /// Generic: a message matching this means the credentials were refused (fatal).
    pub auth_failed: Matcher,
    /// Generic: messages sent after authenticating, before any subscription.
    pub on_connect: Vec<String>,
    /// Generic: subscribe request template (`{symbols}`, `{topics}`, `{sym}`, `{id}`, ...).
    pub subscribe: String,
    /// Generic: unsubscribe request template (empty: unsubscribing is not supported and
    /// subscriptions are dropped only by reconnecting).
    pub unsubscribe: String,
    /// Generic: upstream topics per symbol, expanded into `{topics}` (`{sym_lower}@trade`).
    pub topics: Vec<String>,
    /// Generic: most symbols per subscribe or unsubscribe request with `{symbols}` or
    /// `{topics}`.
    pub batch_size: usize,
    /// Generic: most requests sent per second (0: no limit). Binance allows 5.
    pub max_messages_per_second: f64,
    /// Generic: JSON pointers to unwrap, in order: an envelope's payload (`/data`), then
    /// arrays are split into their elements.
    pub unwrap: Vec<String>,
    /// Generic: messages to drop silently (heartbeats, acks).
    pub ignore: Vec<Matcher>,
    /// Generic: messages that report an error: logged and counted.
    pub errors: Vec<Matcher>,
    /// Generic: how to turn a message into a publish. Every matching route publishes.
    pub routes: Vec<RouteConfig>,
}

/// JSON pointer → expected value; all must match. The value `"*"` only requires the
/// pointer to exist. Written inline in TOML: `{ "/type" = "heartbeat" }`.
pub type Matcher = BTreeMap<String, MatchValue>;

/// A value a [`Matcher`] compares with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MatchValue {
    /// A JSON boolean.
    Bool(bool),
    /// A JSON integer.
    Int(i64),
    /// A JSON number.
    Float(f64),
    /// A JSON string, or `"*"` for any value.
    Str(String),
}

/// One mapping from upstream messages to a channel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Which messages this route takes (empty: all).
    #[serde(rename = "match")]
    pub when: Matcher,
    /// Channel template: `ticks.{/s}` puts the value at `/s` after `ticks.`.
    pub channel: String,
    /// `trade` or `quote` (normalised to the market-data schema, so candles and dashboards
    /// work), or `raw` (the value at `data`, published as is).
    pub schema: String,
    /// Schema field → JSON pointer. Trade: `price`, `size`, `ts`?, `id`?, `seq`?,
    /// `exchange`?, `sym`?. Quote: `bid`, `bid_size`, `ask`, `ask_size`, `ts`?, `seq`?,
    /// `sym`?. Numbers may arrive as strings; `ts` may be epoch s/ms/µs/ns or RFC 3339.
    pub fields: BTreeMap<String, String>,
    /// For `raw`: pointer to the value published (empty: the whole message).
    pub data: String,
    /// Publish as ephemeral (not kept in history, conflatable) instead of retained.
    pub ephemeral: bool,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            name: String::new(),
            kind: String::new(),
            url: String::new(),
            api_key: String::new(),
            api_key_env: String::new(),
            required: true,
            always: Vec::new(),
            symbols: Vec::new(),
            linger_ms: 30_000,
            connect_timeout_ms: 10_000,
            ping_interval_ms: 10_000,
            read_timeout_ms: 30_000,
            stale_after_ms: 30_000,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            headers: BTreeMap::new(),
            events: Vec::new(),
            max_connections_backoff_ms: 60_000,
            quote_size_multiplier: None,
            quote_limit: None,
            rest_url: String::new(),
            backfill_bars: crate::backfill::DEFAULT_BACKFILL_BARS,
            auth: String::new(),
            auth_ok: Matcher::new(),
            auth_failed: Matcher::new(),
            on_connect: Vec::new(),
            subscribe: String::new(),
            unsubscribe: String::new(),
            topics: Vec::new(),
            batch_size: 100,
            max_messages_per_second: 0.0,
            unwrap: Vec::new(),
            ignore: Vec::new(),
            errors: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// A configuration problem: the key (relative to the feed) and why.
pub type Problem = (String, String);

impl FeedConfig {
    /// Checks the feed and returns every problem found.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, reason: String| {
            if !ok {
                problems.push((key.to_owned(), reason));
            }
        };
        check(
            !self.name.is_empty()
                && self.name.len() <= 64
                && self
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')),
            "name",
            format!("{:?} must be 1 to 64 characters from A-Z a-z 0-9 _ - .", self.name),
        );
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some() => {}
            _ => check(
                false,
                "url",
                format!("{:?} is not a ws:// or wss:// URL with a host", self.url),
            ),
        }
        check(
            self.api_key.is_empty() || self.api_key_env.is_empty(),
            "api_key",
            "set api_key or api_key_env, not both".into(),
        );
        for (i, sym) in self.always.iter().enumerate() {
            check(
                sym == "*" || crate::market::is_valid_symbol(sym),
                &format!("always[{i}]"),
                format!("{sym:?} is not \"*\" or a symbol usable in channel names"),
            );
        }
        for (i, pattern) in self.symbols.iter().enumerate() {
            let body = pattern.strip_suffix('*').or(pattern.strip_prefix('*')).unwrap_or(pattern);
            check(
                body.is_empty() || crate::market::is_valid_symbol(body),
                &format!("symbols[{i}]"),
                format!("{pattern:?} is not \"*\", PREFIX*, *SUFFIX or a symbol"),
            );
        }
        check(self.linger_ms <= 86_400_000, "linger_ms", "must be at most 86400000 (a day)".into());
        check(
            (100..=300_000).contains(&self.connect_timeout_ms),
            "connect_timeout_ms",
            format!("{} is outside 100..=300000", self.connect_timeout_ms),
        );
        check(
            self.stale_after_ms == 0 || (100..=86_400_000).contains(&self.stale_after_ms),
            "stale_after_ms",
            format!("{} must be 0 (never stale) or within 100..=86400000", self.stale_after_ms),
        );
        check(
            (100..=3_600_000).contains(&self.read_timeout_ms),
            "read_timeout_ms",
            format!("{} is outside 100..=3600000", self.read_timeout_ms),
        );
        check(
            self.ping_interval_ms == 0 || self.ping_interval_ms < self.read_timeout_ms,
            "ping_interval_ms",
            format!(
                "{} must be 0 (no pings) or below read_timeout_ms ({}), or an idle but healthy \
                 upstream would be taken for dead",
                self.ping_interval_ms, self.read_timeout_ms
            ),
        );
        check(
            self.backoff_initial_ms >= 1 && self.backoff_initial_ms <= self.backoff_max_ms,
            "backoff_initial_ms",
            format!(
                "{} must be at least 1 and at most backoff_max_ms ({})",
                self.backoff_initial_ms, self.backoff_max_ms
            ),
        );
        check(self.backoff_max_ms <= 3_600_000, "backoff_max_ms", "must be at most 3600000".into());
        for name in self.headers.keys() {
            check(
                http_token(name),
                &format!("headers.{name}"),
                "is not a valid HTTP header name".into(),
            );
        }
        match self.kind.as_str() {
            "massive" => {
                self.no_generic_keys(&mut problems);
                problems.extend(crate::massive::MassiveConfig::problems(self));
            }
            "generic" => {
                self.no_massive_keys(&mut problems);
                problems.extend(crate::generic::GenericConfig::problems(self));
            }
            other => problems.push((
                "kind".into(),
                format!("{other:?} is not a feed kind; expected \"massive\" or \"generic\""),
            )),
        }
        problems
    }

    /// The API key from `api_key` or the variable named by `api_key_env`, or why there is
    /// none (for the feed's `failed` reason).
    pub fn resolve_api_key(&self, env: &[(String, String)]) -> Result<Option<String>, String> {
        if !self.api_key.is_empty() {
            return Ok(Some(self.api_key.clone()));
        }
        if self.api_key_env.is_empty() {
            return Ok(None);
        }
        match env.iter().find(|(k, _)| *k == self.api_key_env) {
            Some((_, v)) if !v.is_empty() => Ok(Some(v.clone())),
            Some(_) => Err(format!("environment variable {} is empty", self.api_key_env)),
            None => {
                Err(format!("environment variable {} (api_key_env) is not set", self.api_key_env))
            }
        }
    }

    fn no_generic_keys(&self, problems: &mut Vec<Problem>) {
        let d = FeedConfig::default();
        let set = [
            ("auth", self.auth != d.auth),
            ("auth_ok", self.auth_ok != d.auth_ok),
            ("auth_failed", self.auth_failed != d.auth_failed),
            ("on_connect", self.on_connect != d.on_connect),
            ("subscribe", self.subscribe != d.subscribe),
            ("unsubscribe", self.unsubscribe != d.unsubscribe),
            ("topics", self.topics != d.topics),
            ("batch_size", self.batch_size != d.batch_size),
            ("max_messages_per_second", self.max_messages_per_second != d.max_messages_per_second),
            ("unwrap", self.unwrap != d.unwrap),
            ("ignore", self.ignore != d.ignore),
            ("errors", self.errors != d.errors),
            ("routes", self.routes != d.routes),
        ];
        for (key, is_set) in set {
            if is_set {
                problems.push((key.into(), "only used by kind = \"generic\"".into()));
            }
        }
    }

    fn no_massive_keys(&self, problems: &mut Vec<Problem>) {
        let d = FeedConfig::default();
        let set = [
            ("events", self.events != d.events),
            (
                "max_connections_backoff_ms",
                self.max_connections_backoff_ms != d.max_connections_backoff_ms,
            ),
            ("quote_size_multiplier", self.quote_size_multiplier.is_some()),
            ("quote_limit", self.quote_limit.is_some()),
            ("rest_url", self.rest_url != d.rest_url),
            ("backfill_bars", self.backfill_bars != d.backfill_bars),
        ];
        for (key, is_set) in set {
            if is_set {
                problems.push((key.into(), "only used by kind = \"massive\"".into()));
            }
        }
    }
}

/// Whether `s` is an HTTP token (a valid header name).
fn http_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Validates every feed and their names' uniqueness. Keys are prefixed `feeds[N].`.
pub fn validate_all(feeds: &[FeedConfig]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, feed) in feeds.iter().enumerate() {
        for (key, reason) in feed.validate() {
            problems.push((format!("feeds[{i}].{key}"), reason));
        }
        if feeds[..i].iter().any(|f| f.name == feed.name) {
            problems.push((format!("feeds[{i}].name"), format!("{:?} is used twice", feed.name)));
        }
    }
    problems
}
