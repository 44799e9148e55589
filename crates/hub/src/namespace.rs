//! Namespaces: the policy shared by every channel whose name starts with `NAMESPACE.`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What happens when a subscriber's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Keep only the latest queued message per channel (quotes, forming bars).
    Conflate,
    /// Drop the oldest queued droppable messages to make room.
    DropOldest,
    /// Never drop: close the connection with 4008 so the client reconnects and recovers.
    Disconnect,
}

impl OverflowPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::Conflate => "conflate",
            OverflowPolicy::DropOldest => "drop_oldest",
            OverflowPolicy::Disconnect => "disconnect",
        }
    }
}

/// What a new subscriber receives before live messages when it does not recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Nothing: live messages only.
    None,
    /// The latest value only (a quote channel).
    Latest,
    /// The last `snapshot_size` retained messages (for example the last 300 one-minute bars).
    Last,
}

/// Who may subscribe to a namespace's channels (the user suffix `#42` applies on top).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeRule {
    /// Every connection, with or without a token.
    #[default]
    Anyone,
    /// Connections with a user (a token whose `sub` is not empty).
    Authenticated,
    /// Connections presenting a subscription token for the channel and their user.
    Token,
    /// Whatever the application answers to the subscribe proxy (`proxy.subscribe_url`).
    Proxy,
}

/// Who may publish into a namespace's channels from a client connection (the HTTP API,
/// with its key, always may).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRule {
    /// No client: only the HTTP API.
    None,
    /// Every connection.
    Anyone,
    /// Connections with a user.
    Authenticated,
    /// Whatever the application answers to the publish proxy (`proxy.publish_url`), which
    /// may also replace the data.
    Proxy,
}

/// Who may read a namespace's history over the HTTP API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryRule {
    /// Whoever passes the subscribe rule (a user's token in `Authorization: Bearer`), or
    /// the API key.
    #[default]
    Subscribe,
    /// Only the API key (or loopback when none is configured).
    Key,
}

/// Settings of one namespace. Every field has a default, so a namespace table in the config
/// only lists what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Retained messages per channel (0 keeps none; recovery then always fails).
    pub history_size: usize,
    /// Retained messages older than this are dropped, in milliseconds (0: no age limit).
    pub history_ttl_ms: u64,
    /// A channel with no subscribers and no publish for this long is forgotten, with its
    /// history, so memory stays bounded however many channels come and go (milliseconds).
    pub channel_ttl_ms: u64,
    /// Slow-consumer policy for this namespace's messages.
    pub overflow: OverflowPolicy,
    /// Whether clients may publish on these channels over `/ws` (the HTTP API always may).
    /// The old name of `publish = "anyone"`; `publish`, when set, wins.
    pub client_publish: bool,
    /// Who may subscribe.
    pub subscribe: SubscribeRule,
    /// Who may publish from a client connection; unset follows `client_publish`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishRule>,
    /// Who may read history over HTTP.
    pub history: HistoryRule,
    /// What a new subscriber gets first when it does not recover.
    pub snapshot: SnapshotMode,
    /// How many retained messages a `last` snapshot sends.
    pub snapshot_size: usize,
    /// The most missed messages one recovery replays; a longer gap gets `recovered: false`.
    pub max_replay: usize,
    /// Socket.IO: also emit each message's data under this event name (e.g. `price_update`);
    /// empty for none.
    pub socketio_event: String,
    /// Whether a client's subscribe may create a channel that does not exist yet (has never
    /// been published to, or was forgotten). With `false` such a subscribe is refused with
    /// `unknown_channel`, so anonymous clients cannot mint channels.
    pub create_on_subscribe: bool,
    /// Whether live messages of these channels go compressed (permessage-deflate) to `/ws`
    /// clients that offered the extension; each message is compressed once, for all of them.
    pub compress: bool,
    /// Messages (whole `msg` frames) shorter than this many bytes go uncompressed: below it
    /// deflate saves too little to pay for itself.
    pub compress_min_bytes: usize,
}

/// The default `compress_min_bytes`: a `msg` frame this short (a trade or a quote, ~100-200
/// bytes) shrinks by only a few dozen bytes, not worth the client's inflate call.
pub const DEFAULT_COMPRESS_MIN_BYTES: usize = 512;

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            history_size: 100,
            history_ttl_ms: 300_000,
            channel_ttl_ms: 600_000,
            overflow: OverflowPolicy::Disconnect,
            client_publish: false,
            subscribe: SubscribeRule::Anyone,
            publish: None,
            history: HistoryRule::Subscribe,
            snapshot: SnapshotMode::None,
            snapshot_size: 0,
            max_replay: 10_000,
            socketio_event: String::new(),
            create_on_subscribe: true,
            compress: false,
            compress_min_bytes: DEFAULT_COMPRESS_MIN_BYTES,
        }
    }
}

impl NamespaceConfig {
    /// The publish rule in force: `publish` when set, otherwise what `client_publish` says.
    pub fn publish_rule(&self) -> PublishRule {
        self.publish.unwrap_or(if self.client_publish {
            PublishRule::Anyone
        } else {
            PublishRule::None
        })
    }
}

/// All namespaces, with the defaults applied to channels whose namespace is not listed.
#[derive(Debug, Clone)]
pub struct Namespaces {
    named: BTreeMap<String, Arc<NamespaceConfig>>,
    fallback: Arc<NamespaceConfig>,
}

impl Namespaces {
    pub fn new(named: BTreeMap<String, NamespaceConfig>, fallback: NamespaceConfig) -> Self {
        Namespaces {
            named: named.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            fallback: Arc::new(fallback),
        }
    }

    /// The policy for `channel`.
    pub fn for_channel(&self, channel: &str) -> &Arc<NamespaceConfig> {
        let ns = ferrocast_protocol::namespace_of(channel);
        self.named.get(ns).unwrap_or(&self.fallback)
    }
}

impl Default for Namespaces {
    fn default() -> Self {
        Namespaces::new(BTreeMap::new(), NamespaceConfig::default())
    }
}
