//! The generic JSON WebSocket connector: any upstream that speaks JSON over WebSocket,
//! described entirely in configuration (see `deploy/examples/binance.toml` and
//! `deploy/examples/coinbase.toml`).
//!
//! The configuration says how to talk and how to listen:
//! - **talk**: extra handshake `headers`; an `auth` message (`{api_key}`), `auth_ok` /
//!   `auth_failed` matchers; `on_connect` messages; `subscribe` / `unsubscribe` templates
//!   rendered per batch of symbols (`{symbols}`, `{topics}` as JSON arrays) or per symbol
//!   (`{sym}`, `{sym_lower}`, `{sym_upper}`), with a request `{id}`; a cap on requests per
//!   second for upstreams that disconnect chatty clients (Binance: 5).
//! - **listen**: `unwrap` envelopes by JSON pointer and split arrays into elements; drop
//!   messages matching `ignore` (heartbeats, acks), log and count those matching `errors`;
//!   publish through every `routes` entry whose `match` fits, on a channel rendered from the
//!   message (`ticks.{/s}`), either normalised to the market schema (`trade`, `quote`) or
//!   raw.
//! - **keepalive**: WebSocket pings every `ping_interval_ms`, server pings answered (by
//!   tungstenite, while reading), and a `read_timeout_ms` after which a silent connection is
//!   replaced. Application heartbeats count as traffic, so an `ignore`d heartbeat still keeps
//!   the connection alive.
//!
//! Demand is tracked per symbol: a client on any market channel of a symbol (`ticks.SYM`,
//! `quotes.SYM`, `candles.SYM.*`) keeps every topic of that symbol subscribed. Reconnects
//! resubscribe everything in demand, like the Massive connector.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};

use crate::PublishKind;
use crate::backoff::Backoff;
use crate::config::{FeedConfig, MatchValue, Problem, RouteConfig};
use crate::feed::{
    Feed, FeedContext, FeedStats, LinkState, MarketChannel, STALE_TAG, Staleness, SymbolFilter,
    now_ms,
};
use crate::interest::Interest;
use crate::link::{self, Message, Throttle, WsTx, close_text, sleep_until_opt, tick};
use crate::market::{self, Quote, Trade};
use crate::supervise::{SessionEnd, Upstream, supervise};

/// A piece of a template.
#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    Id,
    ApiKey,
    Symbols,
    SymbolsLower,
    SymbolsUpper,
    Topics,
    Sym,
    SymLower,
    SymUpper,
    /// `{/pointer}`: a value of the incoming message (channel templates only).
    Pointer(String),
}

/// A parsed `{placeholder}` template. A `{` not followed by a known name and `}` is text,
/// so JSON braces need no escaping.
#[derive(Clone, Debug, PartialEq)]
pub struct Template(Vec<Piece>);

impl Template {
    /// Parses `text`; `allowed` says which placeholders may appear. Unknown `{name}` forms
    /// are an error, so a typo is caught at startup instead of being sent upstream.
    fn parse(text: &str, allowed: &[&str]) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}');
            let name = close.map(|c| &after[..c]);
            let is_placeholder = name.is_some_and(|n| {
                !n.is_empty()
                    && (n.starts_with('/')
                        || n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    && !n.contains(['"', '{', ' '])
            });
            if !is_placeholder {
                literal.push('{');
                rest = after;
                continue;
            }
            let name = name.expect("checked");
            let piece = match name {
                "id" => Piece::Id,
                "api_key" => Piece::ApiKey,
                "symbols" => Piece::Symbols,
                "symbols_lower" => Piece::SymbolsLower,
                "symbols_upper" => Piece::SymbolsUpper,
                "topics" => Piece::Topics,
                "sym" => Piece::Sym,
                "sym_lower" => Piece::SymLower,
                "sym_upper" => Piece::SymUpper,
                p if p.starts_with('/') => Piece::Pointer(p.to_owned()),
                other => return Err(format!("unknown placeholder {{{other}}}")),
            };
            let label = if matches!(piece, Piece::Pointer(_)) { "/pointer" } else { name };
            if !allowed.contains(&label) {
                return Err(format!("placeholder {{{name}}} cannot be used here"));
            }
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(piece);
            rest = &after[name.len() + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template(pieces))
    }

    /// Whether the template names one symbol, so it is sent once per symbol.
    fn per_symbol(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Piece::Sym | Piece::SymLower | Piece::SymUpper))
    }

    /// Renders a request template. `symbols` is the batch (one symbol when per-symbol).
    fn render(&self, id: u64, api_key: &str, symbols: &[String], topics: &[Template]) -> String {
        let mut out = String::new();
        let json_list = |items: Vec<String>| Value::from(items).to_string();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Id => out.push_str(&id.to_string()),
                Piece::ApiKey => {
                    // Escaped as the inside of a JSON string: the template supplies quotes.
                    let quoted = Value::from(api_key).to_string();
                    out.push_str(&quoted[1..quoted.len() - 1]);
                }
                Piece::Symbols => out.push_str(&json_list(symbols.to_vec())),
                Piece::SymbolsLower => {
                    out.push_str(&json_list(symbols.iter().map(|s| s.to_lowercase()).collect()))
                }
                Piece::SymbolsUpper => {
                    out.push_str(&json_list(symbols.iter().map(|s| s.to_uppercase()).collect()))
                }
                Piece::Topics => out.push_str(&json_list(
                    symbols
                        .iter()
                        .flat_map(|s| {
                            topics
                                .iter()
                                .map(|t| t.render(id, api_key, std::slice::from_ref(s), &[]))
                        })
                        .collect(),
                )),
                Piece::Sym => out.push_str(symbols.first().map_or("", String::as_str)),
                Piece::SymLower => {
                    out.push_str(&symbols.first().map(|s| s.to_lowercase()).unwrap_or_default())
                }
                Piece::SymUpper => {
                    out.push_str(&symbols.first().map(|s| s.to_uppercase()).unwrap_or_default())
                }
                Piece::Pointer(_) => {}
            }
        }
        out
    }

    /// Renders a channel template from a message; `None` when a pointer is missing or does
    /// not hold a string or number.
    fn render_from(&self, msg: &Value) -> Option<String> {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Pointer(p) => match msg.pointer(p)? {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => out.push_str(&n.to_string()),
                    _ => return None,
                },
                _ => {}
            }
        }
        Some(out)
    }
}

const REQUEST_VARS: &[&str] = &[
    "id",
    "api_key",
    "symbols",
    "symbols_lower",
    "symbols_upper",
    "topics",
    "sym",
    "sym_lower",
    "sym_upper",
];
const TOPIC_VARS: &[&str] = &["sym", "sym_lower", "sym_upper"];
const AUTH_VARS: &[&str] = &["id", "api_key"];

/// A compiled matcher: every pointer must hold the value (`"*"`: exist).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matcher(Vec<(String, MatchValue)>);

impl Matcher {
    fn compile(m: &crate::config::Matcher) -> Matcher {
        Matcher(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `msg` fits every condition.
    pub fn matches(&self, msg: &Value) -> bool {
        self.0.iter().all(|(pointer, want)| {
            let Some(got) = msg.pointer(pointer) else { return false };
            match want {
                MatchValue::Str(s) if s == "*" => true,
                MatchValue::Str(s) => got.as_str() == Some(s.as_str()),
                MatchValue::Int(i) => got.as_i64() == Some(*i),
                MatchValue::Float(f) => got.as_f64() == Some(*f),
                MatchValue::Bool(b) => got.as_bool() == Some(*b),
            }
        })
    }
}

/// The shape a route publishes.
#[derive(Clone, Debug, PartialEq)]
enum Schema {
    Trade(BTreeMap<String, String>),
    Quote(BTreeMap<String, String>),
    Raw(String),
}

/// A compiled route.
#[derive(Clone, Debug, PartialEq)]
struct Route {
    when: Matcher,
    channel: Template,
    schema: Schema,
    kind: PublishKind,
}

const TRADE_FIELDS: (&[&str], &[&str]) =
    (&["price", "size"], &["ts", "id", "seq", "exchange", "sym"]);
const QUOTE_FIELDS: (&[&str], &[&str]) =
    (&["bid", "bid_size", "ask", "ask_size"], &["ts", "seq", "sym"]);

impl Route {
    fn compile(r: &RouteConfig) -> Result<Route, Vec<Problem>> {
        let mut problems = Vec::new();
        let channel = match Template::parse(&r.channel, &["/pointer"]) {
            Ok(t) if !r.channel.is_empty() => Some(t),
            Ok(_) => {
                problems.push(("channel".into(), "a channel template is required".into()));
                None
            }
            Err(e) => {
                problems.push(("channel".into(), e));
                None
            }
        };
        let check_fields = |spec: (&[&str], &[&str]), problems: &mut Vec<Problem>| {
            for required in spec.0 {
                if !r.fields.contains_key(*required) {
                    problems.push((
                        format!("fields.{required}"),
                        format!("schema {:?} needs a pointer for {required}", r.schema),
                    ));
                }
            }
            for (field, pointer) in &r.fields {
                if !spec.0.contains(&field.as_str()) && !spec.1.contains(&field.as_str()) {
                    problems.push((
                        format!("fields.{field}"),
                        format!(
                            "not a field of schema {:?} (fields: {})",
                            r.schema,
                            [spec.0, spec.1].concat().join(", ")
                        ),
                    ));
                }
                if !pointer.starts_with('/') {
                    problems.push((
                        format!("fields.{field}"),
                        format!("{pointer:?} is not a JSON pointer (starts with /)"),
                    ));
                }
            }
        };
        let schema = match r.schema.as_str() {
            "trade" => {
                check_fields(TRADE_FIELDS, &mut problems);
                Schema::Trade(r.fields.clone())
            }
            "quote" => {
                check_fields(QUOTE_FIELDS, &mut problems);
                Schema::Quote(r.fields.clone())
            }
            "raw" | "" => {
                if !r.fields.is_empty() {
                    problems.push(("fields".into(), "only used by schema trade or quote".into()));
                }
                if !r.data.is_empty() && !r.data.starts_with('/') {
                    problems.push(("data".into(), format!("{:?} is not a JSON pointer", r.data)));
                }
                Schema::Raw(r.data.clone())
            }
            other => {
                problems
                    .push(("schema".into(), format!("{other:?} is not one of trade, quote, raw")));
                Schema::Raw(String::new())
            }
        };
        for pointer in r.when.keys() {
            if !pointer.starts_with('/') {
                problems.push((format!("match.{pointer}"), "keys are JSON pointers".into()));
            }
        }
        match channel {
            Some(channel) if problems.is_empty() => Ok(Route {
                when: Matcher::compile(&r.when),
                channel,
                schema,
                kind: if r.ephemeral { PublishKind::Ephemeral } else { PublishKind::Retained },
            }),
            _ => Err(problems),
        }
    }
}

/// A validated generic feed.
#[derive(Clone, Debug)]
pub struct GenericConfig {
    /// Feed name, also the `src` of normalised events.
    pub name: String,
    /// WebSocket URL.
    pub url: String,
    /// Extra handshake headers.
    pub headers: BTreeMap<String, String>,
    /// API key for `{api_key}`, or why it is missing (fatal at start when a template uses it).
    pub api_key: Result<String, String>,
    /// Symbols served.
    pub symbols: SymbolFilter,
    /// Symbols always subscribed.
    pub always: Vec<String>,
    /// Linger after the last client left.
    pub linger: Duration,
    /// Connect deadline.
    pub connect_timeout: Duration,
    /// Ping interval.
    pub ping_interval: Option<Duration>,
    /// Silence after which the connection is presumed dead.
    pub read_timeout: Duration,
    /// No market data this long, in ms, with symbols subscribed: `stale` (0: never).
    pub stale_after_ms: u64,
    /// Reconnect backoff start.
    pub backoff_initial: Duration,
    /// Reconnect backoff cap.
    pub backoff_max: Duration,
    auth: Option<Template>,
    auth_ok: Matcher,
    auth_failed: Matcher,
    on_connect: Vec<Template>,
    subscribe: Template,
    unsubscribe: Option<Template>,
    topics: Vec<Template>,
    batch_size: usize,
    min_send_interval: Option<Duration>,
    unwrap: Vec<String>,
    ignore: Vec<Matcher>,
    errors: Vec<Matcher>,
    routes: Vec<Route>,
    uses_api_key: bool,
}

impl GenericConfig {
    /// Problems of a `kind = "generic"` feed table (keys relative to the feed).
    pub fn problems(cfg: &FeedConfig) -> Vec<Problem> {
        match Self::compile(cfg, &[]) {
            Ok(_) => Vec::new(),
            Err(problems) => problems,
        }
    }

    /// Resolves a validated feed table; `env` supplies `api_key_env`.
    pub fn from_feed(cfg: &FeedConfig, env: &[(String, String)]) -> Result<Self, Vec<Problem>> {
        Self::compile(cfg, env)
    }

    fn compile(cfg: &FeedConfig, env: &[(String, String)]) -> Result<Self, Vec<Problem>> {
        let mut problems: Vec<Problem> = Vec::new();
        let mut template = |key: &str, text: &str, vars: &[&str]| match Template::parse(text, vars)
        {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push((key.to_owned(), e));
                None
            }
        };
        let auth = (!cfg.auth.is_empty()).then(|| template("auth", &cfg.auth, AUTH_VARS)).flatten();
        let on_connect: Vec<Template> = cfg
            .on_connect
            .iter()
            .enumerate()
            .filter_map(|(i, t)| template(&format!("on_connect[{i}]"), t, AUTH_VARS))
            .collect();
        let subscribe = template("subscribe", &cfg.subscribe, REQUEST_VARS);
        let unsubscribe = (!cfg.unsubscribe.is_empty())
            .then(|| template("unsubscribe", &cfg.unsubscribe, REQUEST_VARS))
            .flatten();
        let topics: Vec<Template> = cfg
            .topics
            .iter()
            .enumerate()
            .filter_map(|(i, t)| template(&format!("topics[{i}]"), t, TOPIC_VARS))
            .collect();
        if cfg.subscribe.is_empty() {
            problems.push((
                "subscribe".into(),
                "a subscribe template is required, e.g. '{\"method\":\"SUBSCRIBE\",\"params\":{topics},\"id\":{id}}'".into(),
            ));
        }
        let uses_topics =
            [&subscribe, &unsubscribe].into_iter().flatten().any(|t| t.0.contains(&Piece::Topics));
        if uses_topics && cfg.topics.is_empty() {
            problems.push(("topics".into(), "{topics} is used but no topics are listed".into()));
        }
        // A rendered request must be JSON, or the upstream would get garbage.
        for (key, t) in [("subscribe", &subscribe), ("unsubscribe", &unsubscribe)] {
            if let Some(t) = t {
                let sample = t.render(1, "key", &["BTCUSDT".into(), "ETHUSDT".into()], &topics);
                if serde_json::from_str::<Value>(&sample).is_err() {
                    problems.push((
                        key.into(),
                        format!(
                            "does not render to JSON (with symbols BTCUSDT, ETHUSDT: {sample})"
                        ),
                    ));
                }
            }
        }
        if cfg.batch_size == 0 || cfg.batch_size > 10_000 {
            problems
                .push(("batch_size".into(), format!("{} is outside 1..=10000", cfg.batch_size)));
        }
        if !(cfg.max_messages_per_second.is_finite() && cfg.max_messages_per_second >= 0.0) {
            problems.push(("max_messages_per_second".into(), "must be 0 or more".into()));
        }
        for (i, p) in cfg.unwrap.iter().enumerate() {
            if !p.starts_with('/') {
                problems.push((format!("unwrap[{i}]"), format!("{p:?} is not a JSON pointer")));
            }
        }
        for (list, key) in [(&cfg.ignore, "ignore"), (&cfg.errors, "errors")] {
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || m.keys().any(|k| !k.starts_with('/')) {
                    problems.push((
                        format!("{key}[{i}]"),
                        "needs at least one condition, keyed by JSON pointer".into(),
                    ));
                }
            }
        }
        if cfg.always.iter().any(|s| s == "*") {
            problems.push((
                "always".into(),
                "a generic feed subscribes named symbols; \"*\" is not supported".into(),
            ));
        }
        if cfg.routes.is_empty() {
            problems.push(("routes".into(), "at least one [[feeds.routes]] is needed".into()));
        }
        let mut routes = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            match Route::compile(r) {
                Ok(route) => routes.push(route),
                Err(ps) => {
                    problems.extend(ps.into_iter().map(|(k, v)| (format!("routes[{i}].{k}"), v)))
                }
            }
        }
        let uses_api_key = [&auth, &subscribe, &unsubscribe]
            .into_iter()
            .flatten()
            .chain(on_connect.iter())
            .any(|t| t.0.contains(&Piece::ApiKey));
        if !problems.is_empty() {
            return Err(problems);
        }
        let api_key = match cfg.resolve_api_key(env) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err("{api_key} is used but no api_key or api_key_env is set".into()),
            Err(reason) => Err(reason),
        };
        let ms = Duration::from_millis;
        Ok(GenericConfig {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            headers: cfg.headers.clone(),
            api_key,
            symbols: if cfg.symbols.is_empty() {
                SymbolFilter::Patterns(vec!["*".into()])
            } else {
                SymbolFilter::Patterns(cfg.symbols.clone())
            },
            always: cfg.always.clone(),
            linger: ms(cfg.linger_ms),
            connect_timeout: ms(cfg.connect_timeout_ms),
            ping_interval: (cfg.ping_interval_ms > 0).then(|| ms(cfg.ping_interval_ms)),
            read_timeout: ms(cfg.read_timeout_ms),
            stale_after_ms: cfg.stale_after_ms,
            backoff_initial: ms(cfg.backoff_initial_ms),
            backoff_max: ms(cfg.backoff_max_ms),
            auth,
            auth_ok: Matcher::compile(&cfg.auth_ok),
            auth_failed: Matcher::compile(&cfg.auth_failed),
            on_connect,
            subscribe: subscribe.expect("no problems"),
            unsubscribe,
            topics,
            batch_size: cfg.batch_size,
            min_send_interval: (cfg.max_messages_per_second > 0.0)
                .then(|| Duration::from_secs_f64(1.0 / cfg.max_messages_per_second)),
            unwrap: cfg.unwrap.clone(),
            ignore: cfg.ignore.iter().map(Matcher::compile).collect(),
            errors: cfg.errors.iter().map(Matcher::compile).collect(),
            routes,
            uses_api_key,
        })
    }
}

/// Splits a message into the elements routes look at: arrays become their elements, then
/// each `unwrap` pointer that exists replaces the value by what it points to (and arrays
/// found there are split again).
fn unwrap_message(msg: Value, unwrap: &[String]) -> Vec<Value> {
    fn flatten(v: Value, out: &mut Vec<Value>) {
        match v {
            Value::Array(items) => items.into_iter().for_each(|i| flatten(i, out)),
            other => out.push(other),
        }
    }
    let mut values = Vec::new();
    flatten(msg, &mut values);
    for pointer in unwrap {
        let mut next = Vec::with_capacity(values.len());
        for mut v in values {
            match v.pointer_mut(pointer) {
                Some(inner) => flatten(inner.take(), &mut next),
                None => next.push(v),
            }
        }
        values = next;
    }
    values
}

/// A number that may arrive as a JSON string (`"0.001"`, as Binance and Coinbase send).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f: &f64| f.is_finite())
}

/// A timestamp in Unix ms from epoch seconds, ms, µs or ns (told apart by magnitude: any
/// date between 1973 and 5138 is read right) or an RFC 3339 string.
fn timestamp_ms(v: &Value) -> Option<i64> {
    if let Some(n) = number(v) {
        let n = n.abs();
        let ms = if n < 1e11 {
            n * 1e3
        } else if n < 1e14 {
            n
        } else if n < 1e17 {
            n / 1e3
        } else {
            n / 1e6
        };
        return Some(ms as i64);
    }
    rfc3339_ms(v.as_str()?)
}

/// Parses `2022-10-19T23:28:22.061769Z` or `...+02:00` into Unix ms.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        s.get(r.clone()).filter(|t| t.bytes().all(|c| c.is_ascii_digit()))?.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() {
            return None;
        }
        let first3: String = frac.chars().chain("000".chars()).take(3).collect();
        millis = first3.parse::<i64>().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1_000 + millis)
}

/// Why a routed message could not be published.
#[derive(Debug, PartialEq, Eq)]
struct Unusable(String);

impl Route {
    /// The channel and JSON to publish for `msg`, plus its upstream time when known.
    fn apply(
        &self,
        msg: &Value,
        src: &str,
    ) -> Result<(String, bytes::Bytes, Option<i64>), Unusable> {
        let channel = self
            .channel
            .render_from(msg)
            .ok_or_else(|| Unusable("a channel placeholder points to nothing".into()))?;
        if ferrocast_protocol::validate_channel(&channel).is_err() {
            return Err(Unusable(format!("rendered channel {channel:?} is not a valid channel")));
        }
        let field = |fields: &BTreeMap<String, String>, name: &str| -> Option<&Value> {
            fields.get(name).and_then(|p| msg.pointer(p))
        };
        let required = |fields: &BTreeMap<String, String>, name: &str| -> Result<f64, Unusable> {
            field(fields, name)
                .and_then(number)
                .ok_or_else(|| Unusable(format!("{name} is missing or not a number")))
        };
        let symbol = |fields: &BTreeMap<String, String>| -> String {
            field(fields, "sym").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
                channel.split_once('.').map_or(channel.clone(), |(_, sym)| sym.to_owned())
            })
        };
        let seq = |fields: &BTreeMap<String, String>| {
            field(fields, "seq").and_then(number).filter(|n| *n >= 0.0).map(|n| n as u64)
        };
        match &self.schema {
            Schema::Raw(pointer) => {
                let value = if pointer.is_empty() { Some(msg) } else { msg.pointer(pointer) };
                let value =
                    value.ok_or_else(|| Unusable(format!("{pointer} points to nothing")))?;
                Ok((channel, bytes::Bytes::from(value.to_string()), None))
            }
            Schema::Trade(fields) => {
                let upstream_ts = field(fields, "ts").and_then(timestamp_ms);
                let trade = Trade {
                    sym: symbol(fields),
                    price: required(fields, "price")?,
                    size: required(fields, "size")?,
                    ts: upstream_ts.unwrap_or_else(now_ms),
                    exchange: field(fields, "exchange").and_then(Value::as_i64),
                    conditions: Vec::new(),
                    id: field(fields, "id").and_then(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    }),
                    seq: seq(fields),
                    src: src.to_owned(),
                };
                Ok((channel, market::encode(&trade), upstream_ts))
            }
            Schema::Quote(fields) => {
                let upstream_ts = field(fields, "ts").and_then(timestamp_ms);
                let quote = Quote {
                    sym: symbol(fields),
                    bid: required(fields, "bid")?,
                    bid_size: required(fields, "bid_size")?,
                    ask: required(fields, "ask")?,
                    ask_size: required(fields, "ask_size")?,
                    ts: upstream_ts.unwrap_or_else(now_ms),
                    bid_exchange: None,
                    ask_exchange: None,
                    seq: seq(fields),
                    src: src.to_owned(),
                };
                Ok((channel, market::encode(&quote), upstream_ts))
            }
        }
    }
}

/// How a connection ended.
enum End {
    Fatal(String),
    Retry(&'static str, String),
}

impl Upstream for GenericFeed {
    async fn run_session(&self, live_since: &mut Option<Instant>) -> SessionEnd {
        match self.session(live_since).await {
            End::Fatal(reason) => SessionEnd::Fatal(reason),
            End::Retry(tag, reason) => SessionEnd::Retry { tag, reason, wait: None },
        }
    }

    fn session_ended(&self) {
        self.upstream.lock().clear();
        self.ctx.stats.upstream_subscriptions.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running generic feed: the demand side ([`Feed`]) and the connection task.
pub struct GenericFeed {
    cfg: GenericConfig,
    ctx: FeedContext,
    interest: Interest,
    /// Symbols subscribed upstream on the live connection.
    upstream: Mutex<BTreeSet<String>>,
    log: Mutex<Throttle>,
    /// The last session ended stale: the feed stays `stale` until market data flows again.
    stale: AtomicBool,
}

impl std::fmt::Debug for GenericFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenericFeed").field("name", &self.cfg.name).finish_non_exhaustive()
    }
}

/// Per-connection request state: the next `{id}` and the send pacing.
struct Requests {
    next_id: u64,
    last_sent: Option<Instant>,
}

impl GenericFeed {
    /// A feed ready to [`run`](GenericFeed::run).
    pub fn new(cfg: GenericConfig, ctx: FeedContext) -> Arc<Self> {
        Arc::new(GenericFeed {
            interest: Interest::new(cfg.linger),
            cfg,
            ctx,
            upstream: Mutex::new(BTreeSet::new()),
            log: Mutex::new(Throttle::new(5)),
            stale: AtomicBool::new(false),
        })
    }

    /// This feed's state and counters.
    pub fn stats(&self) -> &Arc<FeedStats> {
        &self.ctx.stats
    }

    /// Symbols subscribed upstream now (empty while disconnected).
    pub fn upstream_symbols(&self) -> BTreeSet<String> {
        self.upstream.lock().clone()
    }

    fn desired(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .interest
            .channels()
            .iter()
            .filter_map(|c| MarketChannel::parse(c).map(|m| m.symbol().to_owned()))
            .collect();
        out.extend(self.cfg.always.iter().cloned());
        out
    }

    fn api_key(&self) -> &str {
        self.cfg.api_key.as_deref().unwrap_or("")
    }

    /// Runs the connection loop until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        supervise(&*self, &self.cfg.url, &self.ctx.stats, backoff, shutdown).await;
    }

    async fn session(&self, live_since: &mut Option<Instant>) -> End {
        let stats = &self.ctx.stats;
        if self.cfg.uses_api_key
            && let Err(reason) = &self.cfg.api_key
        {
            return End::Fatal(reason.clone());
        }
        stats.set_state(LinkState::Connecting, None);
        let ws =
            match link::connect(&self.cfg.url, &self.cfg.headers, self.cfg.connect_timeout).await {
                Ok(ws) => ws,
                Err(reason) => return End::Retry("connect_failed", reason),
            };
        let (mut tx, mut rx) = ws.split();
        let mut requests = Requests { next_id: 1, last_sent: None };
        let mut authenticated = self.cfg.auth_ok.is_empty();
        if let Some(auth) = &self.cfg.auth {
            stats.set_state(LinkState::Authenticating, None);
            let msg = auth.render(requests.next_id, self.api_key(), &[], &[]);
            requests.next_id += 1;
            if let Err(e) = self.send(&mut tx, &mut requests, msg).await {
                return e;
            }
        }
        let now = Instant::now();
        let mut last_rx = now;
        let auth_deadline = now + self.cfg.read_timeout;
        if authenticated && let Err(e) = self.go_live(&mut tx, &mut requests, live_since).await {
            return e;
        }
        let mut ping = self.cfg.ping_interval.map(|period| {
            let mut t = tokio::time::interval_at(now + period, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        let mut staleness = Staleness::new(self.cfg.stale_after_ms);
        loop {
            staleness.subscribed(authenticated && !self.upstream.lock().is_empty(), Instant::now());
            let linger_deadline = if authenticated { self.interest.next_deadline() } else { None };
            let silence_deadline =
                if authenticated { last_rx + self.cfg.read_timeout } else { auth_deadline };
            tokio::select! {
                msg = rx.next() => {
                    last_rx = Instant::now();
                    match msg {
                        None => return End::Retry("closed", "connection closed by upstream".into()),
                        Some(Err(e)) => return End::Retry("read_failed", format!("read failed: {e}")),
                        Some(Ok(Message::Text(text))) => {
                            let published = FeedStats::get(&stats.published);
                            let step = self.on_message(&text, authenticated);
                            if FeedStats::get(&stats.published) > published {
                                staleness.data(last_rx);
                                if self.stale.swap(false, Relaxed) {
                                    stats.set_state(LinkState::Live, None);
                                    tracing::info!(feed = %self.cfg.name, "feed live again: market data is flowing");
                                }
                            }
                            match step {
                                Step::Continue => {}
                                Step::Authenticated => {
                                    authenticated = true;
                                    if let Err(e) = self.go_live(&mut tx, &mut requests, live_since).await {
                                        return e;
                                    }
                                }
                                Step::End(end) => return end,
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return End::Retry("closed", format!("closed by upstream ({})", close_text(frame)));
                        }
                        Some(Ok(_)) => {}
                    }
                }
                () = tokio::time::sleep_until(silence_deadline) => {
                    return if authenticated {
                        End::Retry("read_timeout", format!(
                            "nothing received for {} ms (no data, heartbeat or pong): the connection is presumed dead",
                            self.cfg.read_timeout.as_millis()))
                    } else {
                        End::Retry("auth_timeout", format!(
                            "no message matching auth_ok within {} ms", self.cfg.read_timeout.as_millis()))
                    };
                }
                () = sleep_until_opt(staleness.deadline()) => {
                    let reason = staleness.reason(self.upstream.lock().len());
                    self.stale.store(true, Relaxed);
                    stats.set_state(LinkState::Stale, Some(reason.clone()));
                    return End::Retry(STALE_TAG, reason);
                }
                _ = tick(&mut ping) => {
                    if let Err(e) = link::send(&mut tx, Message::Ping(Default::default()), self.cfg.read_timeout).await {
                        return End::Retry("write_failed", e);
                    }
                }
                () = self.interest.changed(), if authenticated => {
                    if let Err(e) = self.reconcile(&mut tx, &mut requests).await {
                        return e;
                    }
                }
                () = sleep_until_opt(linger_deadline) => {
                    if let Err(e) = self.reconcile(&mut tx, &mut requests).await {
                        return e;
                    }
                }
            }
        }
    }

    async fn go_live(
        &self,
        tx: &mut WsTx,
        requests: &mut Requests,
        live_since: &mut Option<Instant>,
    ) -> Result<(), End> {
        for t in &self.cfg.on_connect {
            let msg = t.render(requests.next_id, self.api_key(), &[], &[]);
            requests.next_id += 1;
            self.send(tx, requests, msg).await?;
        }
        *live_since = Some(Instant::now());
        if self.stale.load(Relaxed) {
            self.ctx.stats.set_state(
                LinkState::Stale,
                Some("reconnected after going stale; waiting for market data".into()),
            );
            tracing::info!(feed = %self.cfg.name, "feed reconnected, still stale until data flows");
        } else {
            self.ctx.stats.set_state(LinkState::Live, None);
            tracing::info!(feed = %self.cfg.name, url = %self.cfg.url, "feed live");
        }
        self.reconcile(tx, requests).await
    }

    /// Sends one request, pacing requests to `max_messages_per_second`.
    async fn send(&self, tx: &mut WsTx, requests: &mut Requests, msg: String) -> Result<(), End> {
        if let (Some(gap), Some(last)) = (self.cfg.min_send_interval, requests.last_sent) {
            tokio::time::sleep_until(last + gap).await;
        }
        requests.last_sent = Some(Instant::now());
        link::send(tx, Message::text(msg), self.cfg.read_timeout)
            .await
            .map_err(|e| End::Retry("write_failed", e))
    }

    /// Brings upstream subscriptions in line with demand.
    async fn reconcile(&self, tx: &mut WsTx, requests: &mut Requests) -> Result<(), End> {
        let probe = self.ctx.probe.clone();
        self.interest.settle(Instant::now(), |c| probe(c));
        let desired = self.desired();
        let (remove, add) = {
            let upstream = self.upstream.lock();
            (
                upstream.difference(&desired).cloned().collect::<Vec<_>>(),
                desired.difference(&upstream).cloned().collect::<Vec<_>>(),
            )
        };
        // Without an unsubscribe template, unwatched symbols stay subscribed until the next
        // reconnect; they are kept in `upstream` so they are not subscribed twice.
        let remove = if self.cfg.unsubscribe.is_some() { remove } else { Vec::new() };
        let actions = [
            (&remove, self.cfg.unsubscribe.as_ref(), false),
            (&add, Some(&self.cfg.subscribe), true),
        ];
        for (symbols, template, subscribing) in actions {
            let Some(template) = template else { continue };
            if symbols.is_empty() {
                continue;
            }
            let batch = if template.per_symbol() { 1 } else { self.cfg.batch_size };
            for chunk in symbols.chunks(batch) {
                let msg =
                    template.render(requests.next_id, self.api_key(), chunk, &self.cfg.topics);
                requests.next_id += 1;
                self.send(tx, requests, msg).await?;
                tracing::info!(
                    feed = %self.cfg.name,
                    "upstream {}: {}",
                    if subscribing { "subscribe" } else { "unsubscribe" },
                    chunk.join(",")
                );
                let mut upstream = self.upstream.lock();
                for sym in chunk {
                    if subscribing {
                        upstream.insert(sym.clone());
                    } else {
                        upstream.remove(sym);
                    }
                }
                self.ctx
                    .stats
                    .upstream_subscriptions
                    .store(upstream.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn warn(&self, what: &str, text: &str) {
        if let Some(suppressed) = self.log.lock().allow() {
            let sample: String = text.chars().take(200).collect();
            tracing::warn!(feed = %self.cfg.name, suppressed, "{what}; message starts {sample:?}");
        }
    }

    /// Handles one text message.
    fn on_message(&self, text: &str, authenticated: bool) -> Step {
        let stats = &self.ctx.stats;
        FeedStats::add(&stats.frames_in, 1);
        let msg: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                FeedStats::add(&stats.parse_errors, 1);
                self.warn(&format!("upstream message is not JSON ({e})"), text);
                return Step::Continue;
            }
        };
        let mut step = Step::Continue;
        for element in unwrap_message(msg, &self.cfg.unwrap) {
            FeedStats::add(&stats.messages_in, 1);
            if !authenticated {
                if !self.cfg.auth_failed.is_empty() && self.cfg.auth_failed.matches(&element) {
                    return Step::End(End::Fatal(format!(
                        "the upstream refused the credentials: {}",
                        truncate(&element.to_string(), 300)
                    )));
                }
                if self.cfg.auth_ok.matches(&element) {
                    step = Step::Authenticated;
                    continue;
                }
            }
            if self.cfg.errors.iter().any(|m| m.matches(&element)) {
                FeedStats::add(&stats.upstream_errors, 1);
                self.warn("upstream reported an error", &element.to_string());
                continue;
            }
            if self.cfg.ignore.iter().any(|m| m.matches(&element)) {
                FeedStats::add(&stats.ignored, 1);
                continue;
            }
            let mut matched = false;
            for route in self.cfg.routes.iter().filter(|r| r.when.matches(&element)) {
                matched = true;
                match route.apply(&element, &self.cfg.name) {
                    Ok((channel, data, upstream_ts)) => {
                        self.ctx.sink.publish(&channel, data, route.kind);
                        FeedStats::add(&stats.published, 1);
                        if let Some(ts) = upstream_ts {
                            stats.latency.record_ms(now_ms() - ts);
                        }
                    }
                    Err(Unusable(why)) => {
                        FeedStats::add(&stats.parse_errors, 1);
                        self.warn(&format!("message skipped: {why}"), &element.to_string());
                    }
                }
            }
            if !matched {
                FeedStats::add(&stats.unknown_events, 1);
                tracing::debug!(feed = %self.cfg.name, "message matched no route: {}", truncate(&element.to_string(), 200));
            }
        }
        step
    }
}

enum Step {
    Continue,
    Authenticated,
    End(End),
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl Feed for GenericFeed {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn claims(&self, channel: &MarketChannel<'_>) -> bool {
        self.cfg.symbols.matches(channel.symbol())
    }

    fn admit(&self, _channel: &str) -> Result<(), String> {
        Ok(())
    }

    fn demand(&self, channel: &str, wanted: bool) {
        self.interest.set(channel, wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_batches_and_single_symbols() {
        let topics = vec![
            Template::parse("{sym_lower}@trade", TOPIC_VARS).unwrap(),
            Template::parse("{sym_lower}@bookTicker", TOPIC_VARS).unwrap(),
        ];
        let sub =
            Template::parse(r#"{"method":"SUBSCRIBE","params":{topics},"id":{id}}"#, REQUEST_VARS)
                .unwrap();
        assert!(!sub.per_symbol());
        assert_eq!(
            sub.render(7, "", &["BTCUSDT".into(), "ETHUSDT".into()], &topics),
            r#"{"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@bookTicker","ethusdt@trade","ethusdt@bookTicker"],"id":7}"#
        );
        let single = Template::parse(
            r#"{"method":"SUBSCRIBE","params":["{sym_lower}@trade"],"id":{id}}"#,
            REQUEST_VARS,
        )
        .unwrap();
        assert!(single.per_symbol());
        assert_eq!(
            single.render(1, "", &["BTCUSDT".into()], &[]),
            r#"{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}"#
        );
        let auth = Template::parse(r#"{"action":"auth","params":"{api_key}"}"#, AUTH_VARS).unwrap();
        assert_eq!(auth.render(1, "k\"ey", &[], &[]), r#"{"action":"auth","params":"k\"ey"}"#);
        assert!(Template::parse("{symbol}", REQUEST_VARS).unwrap_err().contains("unknown"));
        assert!(Template::parse("{topics}", TOPIC_VARS).is_err());
        let channel = Template::parse("ticks.{/s}", &["/pointer"]).unwrap();
        assert_eq!(channel.render_from(&json!({"s": "BTCUSDT"})).as_deref(), Some("ticks.BTCUSDT"));
        assert_eq!(channel.render_from(&json!({"x": 1})), None);
    }

    #[test]
    fn unwrap_splits_arrays_and_envelopes() {
        let msg = json!([{"stream":"a","data":{"e":"trade"}},{"result":null,"id":1}]);
        let out = unwrap_message(msg, &["/data".into()]);
        assert_eq!(out, vec![json!({"e":"trade"}), json!({"result":null,"id":1})]);
        let nested = json!({"events":[{"trades":[{"p":1},{"p":2}]}]});
        let out = unwrap_message(nested, &["/events".into(), "/trades".into()]);
        assert_eq!(out, vec![json!({"p":1}), json!({"p":2})]);
    }

    #[test]
    fn matchers() {
        let mut m = crate::config::Matcher::new();
        m.insert("/type".into(), MatchValue::Str("heartbeat".into()));
        let m = Matcher::compile(&m);
        assert!(m.matches(&json!({"type":"heartbeat"})));
        assert!(!m.matches(&json!({"type":"ticker"})));
        let mut any = crate::config::Matcher::new();
        any.insert("/result".into(), MatchValue::Str("*".into()));
        let any = Matcher::compile(&any);
        assert!(any.matches(&json!({"result":null,"id":1})));
        assert!(!any.matches(&json!({"id":1})));
    }

    #[test]
    fn timestamps_in_any_unit_or_rfc3339() {
        assert_eq!(rfc3339_ms("2022-10-19T23:28:22.061769Z"), Some(1_666_222_102_061));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(rfc3339_ms("2024-02-29T12:00:00.5Z"), Some(1_709_208_000_500));
        assert_eq!(rfc3339_ms("yesterday"), None);
        assert_eq!(timestamp_ms(&json!(1_672_515_782_136_i64)), Some(1_672_515_782_136));
        assert_eq!(timestamp_ms(&json!(1_672_515_782)), Some(1_672_515_782_000));
        assert_eq!(timestamp_ms(&json!("1672515782136000")), Some(1_672_515_782_136));
        assert_eq!(timestamp_ms(&json!(1_672_515_782_136_000_000_i64)), Some(1_672_515_782_136));
    }

    #[test]
    fn routes_normalise_string_numbers() {
        let mut fields = BTreeMap::new();
        for (k, v) in [("price", "/p"), ("size", "/q"), ("ts", "/T"), ("id", "/t")] {
            fields.insert(k.to_owned(), v.to_owned());
        }
        let route = Route::compile(&RouteConfig {
            channel: "ticks.{/s}".into(),
            schema: "trade".into(),
            fields,
            ..RouteConfig::default()
        })
        .unwrap();
        let msg = json!({"e":"trade","E":1672515782136_i64,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","T":1672515782136_i64,"m":true,"M":true});
        let (channel, data, ts) = route.apply(&msg, "binance").unwrap();
        assert_eq!(channel, "ticks.BNBBTC");
        assert_eq!(ts, Some(1_672_515_782_136));
        let trade: Trade = serde_json::from_slice(&data).unwrap();
        assert_eq!((trade.sym.as_str(), trade.price, trade.size), ("BNBBTC", 0.001, 100.0));
        assert_eq!((trade.id.as_deref(), trade.src.as_str()), (Some("12345"), "binance"));
        assert!(route.apply(&json!({"s":"X","p":"abc","q":"1"}), "b").is_err());
    }
}
