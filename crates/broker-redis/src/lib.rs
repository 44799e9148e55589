//! The Redis broker: several ferrocast nodes share one offset sequence, one history and one
//! live stream per channel through Redis (or Valkey, KeyDB).
//!
//! - [`keys`]: the key layout and the server-side Lua scripts (publish, read);
//! - [`pubsub`]: the node's pub/sub connection, one subscription per channel with local
//!   subscribers, delivery into the hub with gap filling, resubscription and position checks,
//!   and the taps of the node following them (candles built once per cluster);
//! - `demand`: which channels have subscribers on some node (for the feed connectors);
//! - `survey`: questions every node answers (cluster-wide `/api/channels` and `/api/stats`,
//!   the server API's requests on a user's connections);
//! - [`sentinel`]: Sentinel settings (the `redis+sentinel://` URL or the `sentinels` list);
//! - [`metrics`]: `ferrocast_broker_*` counters.
//!
//! How a publish travels: [`RedisBroker::publish`] queues the message for the publisher task
//! (one per node, so one node's publishes keep their order); the task sends what is queued as
//! one pipeline of `EVALSHA` calls on one connection. The script assigns the offset and
//! stores the message in history before it PUBLISHes, so a message is in history before any
//! node can deliver it. Each node's pub/sub task hands what arrives to
//! [`Hub::deliver`](ferrocast_hub::Hub::deliver), which drops duplicates and reports gaps,
//! which the task fills from history before delivering in order.
//!
//! Crate choice: `redis` (redis-rs), the most used Rust client, maintained by the Redis
//! organisation, with tokio support, pipelining on a multiplexed connection, scripts with
//! automatic `EVALSHA` fallback, pub/sub split into a sink and a stream, and Sentinel and
//! Cluster clients in the same crate.
#![forbid(unsafe_code)]

mod demand;
pub mod keys;
pub mod metrics;
pub mod pubsub;
pub mod sentinel;
mod survey;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrocast_hub::{
    Broker, BrokerError, BrokerFuture, ClusterDemand, DemandListener, HistoryPage, Hub, Lease,
    Pending, Position, PublishError, PublishKind, Published, RunOutcome, SnapshotMode,
    SurveyHandler,
};
use ferrocast_protocol::{StreamPosition, validate_channel};
use parking_lot::Mutex;
use rand::Rng;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use keys::ChannelKeys;
pub use metrics::BrokerMetrics;

/// How long a lease lives without renewal: a dead holder's role moves within about this
/// plus one renewal period.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often a lease is renewed (or, by the other nodes, tried).
pub const LEASE_RENEW: Duration = Duration::from_secs(2);

/// How long a node's advertisement lasts without renewal (`/api/nodes`).
pub const NODE_TTL: Duration = Duration::from_secs(6);

/// Most publishes waiting for the publisher task; beyond it publishes fail at once.
const MAX_QUEUED_PUBLISHES: usize = 100_000;
/// Most publishes sent to Redis in one pipeline.
const MAX_PIPELINE: usize = 512;

/// Settings (from `[broker]`).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub prefix: String,
    /// Longest wait for Redis on a publish, a subscribe or a read.
    pub timeout: Duration,
    pub position_check: Duration,
    pub meta_ttl: Duration,
    /// How long Redis may be unreachable before [`Broker::ready`] fails.
    pub ready_grace: Duration,
    /// PEM certificates to trust for `rediss://` instead of the system's roots.
    pub tls_ca: Option<Vec<u8>>,
    /// Seed nodes of a Redis Cluster; empty for one server (`url`).
    pub cluster_urls: Vec<String>,
    /// Sentinels watching the primary named `sentinel_master`; empty for no Sentinel.
    pub sentinels: Vec<String>,
    pub sentinel_master: String,
}

/// The broker. Cheap to share; its tasks run until the process ends.
#[derive(Debug)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Arc<Hub>,
    opts: RedisOptions,
    conn: Conn,
    publish_tx: mpsc::UnboundedSender<Job>,
    queued: AtomicUsize,
    pubsub_tx: mpsc::UnboundedSender<pubsub::Command>,
    /// Channels this node is subscribed to on Redis pub/sub.
    subscribed: Mutex<HashSet<String>>,
    read_script: redis::Script,
    publish_sha: String,
    metrics: BrokerMetrics,
    health: Health,
    /// This process's id in leases and in `/api/nodes`.
    node_id: String,
    /// Leases this node competes for.
    leases: Mutex<Vec<String>>,
    /// Set by `close`: no lease is taken or renewed any more.
    closing: tokio::sync::Mutex<bool>,
    /// Whether the hub's taps see every retained message of the cluster (`follow_taps`).
    taps_followed: AtomicBool,
    /// Whether this node listens to demand announcements, and where they are signalled.
    demand_watched: AtomicBool,
    demand_announced: tokio::sync::Notify,
    surveys: survey::Surveys,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("prefix", &self.opts.prefix).finish_non_exhaustive()
    }
}

/// One queued publish.
struct Job {
    channel: String,
    /// One message, or a run published atomically (consecutive offsets).
    data: Vec<Vec<u8>>,
    kind: PublishKind,
    reply: oneshot::Sender<Result<Vec<Published>, BrokerError>>,
    queued_at: Instant,
}

/// What a read returned: the channel's position in Redis and history entries, oldest first.
#[derive(Debug)]
pub struct ReadResult {
    pub epoch: String,
    pub top: u64,
    /// The epoch this one replaced in a fence (empty if none), and the last offset both share.
    pub prev: String,
    pub base: u64,
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// Who a read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// A client's recovery or snapshot, or the history API: a position in an unknown epoch
    /// reads nothing after it.
    Client,
    /// This node catching up from its own position: in an unknown epoch, everything is new.
    Node,
}

impl RedisBroker {
    /// Starts the broker's tasks (publisher, pub/sub, position checks, health). Redis need
    /// not be reachable yet: until it is, publishes fail with `unavailable` and readiness
    /// fails after the grace period. Must run inside a multi-threaded tokio runtime.
    pub fn start(hub: Arc<Hub>, opts: RedisOptions) -> Result<Arc<RedisBroker>, String> {
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if !matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            return Err("the Redis broker needs a multi-threaded tokio runtime".into());
        }
        let target = match sentinel_settings(&opts) {
            Some(settings) => {
                let client = settings?.client().map_err(|e| format!("broker.sentinels: {e}"))?;
                Target::Sentinel(tokio::sync::Mutex::new(client))
            }
            None => {
                // With a cluster, pub/sub runs on the first seed: a PUBLISH on any node of a
                // Redis Cluster reaches the subscribers of every node.
                let url = opts.cluster_urls.first().unwrap_or(&opts.url);
                let client = open_client(url, opts.tls_ca.as_deref())
                    .map_err(|e| format!("broker.url {url:?}: {e}"))?;
                Target::Server(client)
            }
        };
        let cluster = if opts.cluster_urls.is_empty() {
            None
        } else {
            let builder = redis::cluster::ClusterClientBuilder::new(opts.cluster_urls.clone())
                .connection_timeout(opts.timeout)
                .response_timeout(opts.timeout);
            Some(builder.build().map_err(|e| format!("broker.cluster_urls: {e}"))?)
        };
        let (publish_tx, publish_rx) = mpsc::unbounded_channel();
        let (pubsub_tx, pubsub_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            conn: Conn::new(target, cluster, opts.timeout),
            publish_tx,
            queued: AtomicUsize::new(0),
            pubsub_tx,
            subscribed: Mutex::new(HashSet::new()),
            read_script: redis::Script::new(keys::READ),
            publish_sha: redis::Script::new(keys::PUBLISH).get_hash().to_owned(),
            metrics: BrokerMetrics::default(),
            health: Health::new(),
            node_id: format!("{}-{}", new_epoch(), std::process::id()),
            leases: Mutex::new(Vec::new()),
            closing: tokio::sync::Mutex::new(false),
            taps_followed: AtomicBool::new(false),
            demand_watched: AtomicBool::new(false),
            demand_announced: tokio::sync::Notify::new(),
            surveys: survey::Surveys::default(),
            hub: hub.clone(),
            opts,
        });
        tokio::spawn(publisher(inner.clone(), publish_rx));
        tokio::spawn(pubsub::run(inner.clone(), pubsub_rx));
        tokio::spawn(pubsub::check_positions(inner.clone()));
        tokio::spawn(health(inner.clone()));
        let broker = Arc::new(RedisBroker { inner });
        hub.add_demand_listener(Arc::new(Demand(broker.inner.clone())));
        Ok(broker)
    }

    pub fn metrics(&self) -> &BrokerMetrics {
        &self.inner.metrics
    }

    /// Queues `data` (one message or an atomic run) for the publisher task.
    fn enqueue(
        &self,
        channel: &str,
        data: Vec<Vec<u8>>,
        kind: PublishKind,
    ) -> Pending<Result<Vec<Published>, BrokerError>> {
        let inner = &self.inner;
        if let Err(e) = validate_channel(channel) {
            return Pending::Ready(Err(PublishError::InvalidChannel(e).into()));
        }
        if data.is_empty() {
            return Pending::Ready(Ok(Vec::new()));
        }
        if inner.queued.fetch_add(1, Relaxed) >= MAX_QUEUED_PUBLISHES {
            inner.queued.fetch_sub(1, Relaxed);
            inner.metrics.error("queue_full");
            return Pending::Ready(Err(BrokerError::Unavailable(format!(
                "{MAX_QUEUED_PUBLISHES} publishes are already waiting for Redis"
            ))));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job { channel: channel.to_owned(), data, kind, reply, queued_at: Instant::now() };
        if inner.publish_tx.send(job).is_err() {
            return Pending::Ready(Err(BrokerError::Unavailable("the broker stopped".into())));
        }
        let inner = inner.clone();
        Pending::Later(Box::pin(async move {
            match tokio::time::timeout(inner.opts.timeout, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BrokerError::Unavailable("the broker stopped".into())),
                Err(_) => Err(inner.unavailable_timeout()),
            }
        }))
    }

    /// This node's id among the cluster's nodes.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }
}

impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn publish(
        &self,
        channel: &str,
        data: &[u8],
        kind: PublishKind,
    ) -> Pending<Result<Published, BrokerError>> {
        match self.enqueue(channel, vec![data.to_vec()], kind) {
            Pending::Ready(answer) => Pending::Ready(answer.map(first)),
            Pending::Later(answer) => {
                Pending::Later(Box::pin(async move { answer.await.map(first) }))
            }
        }
    }

    fn publish_run(&self, channel: &str, data: &[&[u8]], kind: PublishKind) -> Pending<RunOutcome> {
        let split = |answer: Result<Vec<Published>, BrokerError>| match answer {
            Ok(published) => (published, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        match self.enqueue(channel, data.iter().map(|d| d.to_vec()).collect(), kind) {
            Pending::Ready(answer) => Pending::Ready(split(answer)),
            Pending::Later(answer) => Pending::Later(Box::pin(async move { split(answer.await) })),
        }
    }

    fn prepare_subscribe(
        &self,
        channel: &str,
        recover: Option<&StreamPosition>,
    ) -> Option<BrokerFuture<Result<(), BrokerError>>> {
        let inner = self.inner.clone();
        let channel = channel.to_owned();
        let recover = recover.cloned();
        Some(Box::pin(async move {
            let timeout = inner.opts.timeout;
            let work = async {
                pubsub::ensure_subscribed(&inner, &channel).await?;
                let ns = inner.hub.namespace(&channel).clone();
                let tail = match ns.snapshot {
                    SnapshotMode::None => 0,
                    SnapshotMode::Latest => 1,
                    SnapshotMode::Last => ns.snapshot_size,
                };
                let since = recover.as_ref().map(|p| (p.offset, p.epoch.as_str()));
                let before = inner.hub.position(&channel);
                let read =
                    inner.read(&channel, since, tail, ns.history_size, Reader::Client).await?;
                // A channel this node already follows may have messages on their way through
                // pub/sub (a busy node lags): it does not move past them.
                let lost_until = before.as_ref().filter(|b| b.top > 0 && *b.epoch == *read.epoch);
                let lost_until = lost_until.map(|b| b.top);
                inner.apply(&channel, before, read, Reader::Client, lost_until).await?;
                Ok(())
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(result) => result,
                Err(_) => {
                    inner.metrics.error("timeout");
                    Err(inner.unavailable_timeout())
                }
            }
        }))
    }

    fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Pending<Result<Option<HistoryPage>, BrokerError>> {
        let inner = self.inner.clone();
        let channel = channel.to_owned();
        Pending::Later(Box::pin(async move {
            let since_arg = Some((since, ""));
            let read = inner.read_or_create(&channel, since_arg, 0, limit, false, Reader::Client);
            let Some(read) = read.await? else {
                return Ok(None);
            };
            Ok(Some(HistoryPage {
                channel,
                epoch: read.epoch,
                offset: read.top,
                messages: read
                    .entries
                    .into_iter()
                    .filter(|(offset, _)| *offset > since)
                    .map(|(offset, data)| (offset, Bytes::from(data)))
                    .collect(),
            }))
        }))
    }

    fn lease(&self, name: &str) -> Lease {
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.inner.leases.lock().push(name.to_owned());
        tokio::spawn(hold_lease(self.inner.clone(), name.to_owned(), tx));
        Lease::watching(rx)
    }

    fn follow_taps(&self, on: bool) {
        if self.inner.taps_followed.swap(on, Relaxed) != on {
            tracing::info!(on, "following every node's publishes for candles");
            let _ = self.inner.pubsub_tx.send(pubsub::Command::FollowTaps(on));
        }
    }

    fn cluster_demand(&self, patterns: &[&str]) -> Option<ClusterDemand> {
        let patterns = patterns.iter().map(|p| (*p).to_owned()).collect();
        Some(demand::watch(self.inner.clone(), patterns))
    }

    fn advertise(&self, info: String) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = inner.conn.get().await else { return };
            let prefix = &inner.opts.prefix;
            let now = unix_ms();
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(keys::node_key(prefix, &inner.node_id))
                .arg(info)
                .arg("PX")
                .arg(NODE_TTL.as_millis() as u64)
                .ignore()
                .cmd("ZADD")
                .arg(keys::nodes_key(prefix))
                .arg(now)
                .arg(&inner.node_id)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(keys::nodes_key(prefix))
                .arg("-inf")
                .arg(now.saturating_sub(NODE_TTL.as_millis() as u64))
                .ignore();
            let sent = pipe.query_async::<()>(&mut conn);
            if !matches!(tokio::time::timeout(inner.opts.timeout, sent).await, Ok(Ok(()))) {
                inner.metrics.error("connection");
            }
        });
    }

    fn nodes(&self) -> Option<BrokerFuture<Result<Vec<String>, BrokerError>>> {
        let inner = self.inner.clone();
        Some(Box::pin(async move { live_nodes(&inner).await }))
    }

    fn answer_surveys(&self, handler: SurveyHandler) {
        *self.inner.surveys.handler.write() = Some(handler);
    }

    fn survey(&self, question: &[u8]) -> Option<BrokerFuture<Result<Vec<Vec<u8>>, BrokerError>>> {
        let inner = self.inner.clone();
        let question = question.to_vec();
        Some(Box::pin(async move { survey::ask(&inner, &question).await }))
    }

    fn close(&self) -> Option<BrokerFuture<()>> {
        let inner = self.inner.clone();
        Some(Box::pin(async move {
            *inner.closing.lock().await = true;
            let Ok(mut conn) = inner.conn.get().await else { return };
            let prefix = &inner.opts.prefix;
            let mut pipe = redis::pipe();
            for name in inner.leases.lock().iter() {
                pipe.cmd("EVAL")
                    .arg(keys::RELEASE)
                    .arg(1)
                    .arg(keys::lease_key(prefix, name))
                    .arg(&inner.node_id)
                    .ignore();
            }
            pipe.cmd("ZREM").arg(keys::nodes_key(prefix)).arg(&inner.node_id).ignore();
            pipe.cmd("DEL").arg(keys::node_key(prefix, &inner.node_id)).ignore();
            let done = pipe.query_async::<()>(&mut conn);
            match tokio::time::timeout(inner.opts.timeout, done).await {
                Ok(Ok(())) => tracing::info!("left the cluster: leases released"),
                _ => tracing::warn!("could not release leases in Redis; they expire in 6 s"),
            }
        }))
    }

    fn ready(&self) -> Result<(), String> {
        self.inner.health.ready(self.inner.opts.ready_grace)
    }

    fn render_metrics(&self, out: &mut String) {
        self.inner.metrics.render(out);
    }

    fn published(&self) -> Option<u64> {
        Some(self.inner.metrics.published.load(Relaxed))
    }
}

impl Inner {
    /// Makes the pub/sub task listen to demand announcements (see `demand`).
    fn watch_demand(&self) {
        if !self.demand_watched.swap(true, Relaxed) {
            let _ = self.pubsub_tx.send(pubsub::Command::WatchDemand);
        }
    }

    /// "Redis did not answer in time", with the last connection error if there is one (the
    /// reason a client and an operator want, e.g. an untrusted certificate).
    fn unavailable_timeout(&self) -> BrokerError {
        let mut message = format!(
            "Redis did not answer within {} ms (broker.timeout_ms)",
            self.opts.timeout.as_millis()
        );
        if let Some(e) = self.conn.last_error.lock().as_deref() {
            message.push_str("; last connection error: ");
            message.push_str(e);
        }
        BrokerError::Unavailable(message)
    }

    fn keys(&self, channel: &str) -> ChannelKeys {
        ChannelKeys::new(&self.opts.prefix, channel)
    }

    /// Reads `channel`'s position and history from Redis (see [`keys::READ`]).
    async fn read(
        &self,
        channel: &str,
        since: Option<(u64, &str)>,
        tail: usize,
        limit: usize,
        reader: Reader,
    ) -> Result<ReadResult, BrokerError> {
        self.read_or_create(channel, since, tail, limit, true, reader)
            .await?
            .ok_or_else(|| BrokerError::Unavailable("the read script created nothing".into()))
    }

    /// [`Inner::read`]; with `create` false, a channel Redis does not hold is `None`.
    async fn read_or_create(
        &self,
        channel: &str,
        since: Option<(u64, &str)>,
        tail: usize,
        limit: usize,
        create: bool,
        reader: Reader,
    ) -> Result<Option<ReadResult>, BrokerError> {
        let k = self.keys(channel);
        let ns = self.hub.namespace(channel);
        let mut conn = self.conn.get().await.inspect_err(|_| self.metrics.error("connection"))?;
        let mut invocation = self.read_script.prepare_invoke();
        invocation
            .key(&k.meta)
            .key(&k.stream)
            .arg(since.map_or(-1i64, |(offset, _)| offset.min(i64::MAX as u64) as i64))
            .arg(since.map_or("", |(_, epoch)| epoch))
            .arg(tail)
            .arg(limit)
            .arg(ns.history_ttl_ms)
            .arg(self.opts.meta_ttl.as_millis() as u64)
            .arg(new_epoch())
            .arg(if create { "1" } else { "0" })
            .arg(if reader == Reader::Node { "1" } else { "0" });
        let value: RedisResult<Vec<Value>> =
            tokio::time::timeout(self.opts.timeout, invocation.invoke_async(&mut conn))
                .await
                .unwrap_or_else(|_| Err(timeout_error()));
        let values = value.map_err(|e| self.redis_error(e))?;
        if values.is_empty() && !create {
            return Ok(None);
        }
        parse_read(values).map(Some).ok_or_else(|| {
            self.metrics.error("protocol");
            BrokerError::Unavailable("unexpected answer from the read script".into())
        })
    }

    /// Brings this node's copy of `channel` up to what Redis holds, delivering what it
    /// lacks (after a pub/sub loss, at a position check, or on meeting another epoch), and
    /// moving past what history no longer holds up to `lost_until` at most: messages after
    /// it may still be on their way through pub/sub (`None`: nothing is, as after a
    /// reconnect). Returns how many messages were new here, and the epoch Redis's replaced
    /// in a fence (empty if none).
    pub(crate) async fn catch_up(
        &self,
        channel: &str,
        lost_until: Option<u64>,
    ) -> Result<(u64, String), BrokerError> {
        let limit = self.hub.namespace(channel).history_size;
        let local = self.hub.position(channel);
        let since = local.as_ref().map(|p| (p.top, &*p.epoch));
        let read = self.read(channel, since, 0, limit, Reader::Node).await?;
        let prev = read.prev.clone();
        let applied = self.apply(channel, local, read, Reader::Node, lost_until).await?;
        if applied > 0 {
            self.metrics.gaps_filled.fetch_add(1, Relaxed);
            self.metrics.messages_filled.fetch_add(applied, Relaxed);
        }
        Ok((applied, prev))
    }

    /// Merges what a read returned into the hub (see [`Hub::merge`]), moving past missing
    /// messages up to `lost_until` at most (see [`Inner::catch_up`]). Returns how many
    /// messages were new here.
    ///
    /// Two cases come first. Redis behind what this node delivered in the same epoch means a
    /// failover lost writes: the channel is [fenced](Inner::fence). A client's read in
    /// another epoch than this node's (Redis lost the channel, or another node fenced it)
    /// says nothing of what this node missed: the node first catches up from its own
    /// position, which delivers exactly what its subscribers have not seen.
    ///
    /// `before` is this node's position taken before the read was sent: only that one
    /// cannot be ahead of Redis (messages delivered since may be newer than the read).
    async fn apply(
        &self,
        channel: &str,
        before: Option<Position>,
        read: ReadResult,
        reader: Reader,
        lost_until: Option<u64>,
    ) -> Result<u64, BrokerError> {
        if let Some(local) = before
            && local.top > 0
        {
            if *local.epoch == *read.epoch && local.top > read.top {
                return self.fence(channel, &read.epoch, local.top).await;
            }
            if *local.epoch != *read.epoch && reader == Reader::Client {
                let limit = self.hub.namespace(channel).history_size;
                let since = Some((local.top, &*local.epoch));
                let caught = self.read(channel, since, 0, limit, Reader::Node).await?;
                let applied = self.merge(channel, caught, None);
                return Ok(applied + self.merge(channel, read, None));
            }
        }
        Ok(self.merge(channel, read, lost_until))
    }

    /// [`Hub::merge`], moving the channel without its messages up to `lost_until` at most.
    fn merge(&self, channel: &str, read: ReadResult, lost_until: Option<u64>) -> u64 {
        let top = lost_until.map_or(read.top, |until| until.min(read.top));
        self.hub.merge(channel, &read.epoch, top, &read.entries).unwrap_or(0)
    }

    /// `channel` in `epoch` stands at `top` in Redis, behind what this node delivered
    /// (`delivered`): the primary lost writes in a failover and may have given their offsets
    /// to other messages. The channel moves to a new epoch (clients recovering past the part
    /// both share get `recovered: false`, never a silent gap) and this node delivers what
    /// follows that part.
    async fn fence(&self, channel: &str, epoch: &str, delivered: u64) -> Result<u64, BrokerError> {
        let limit = self.hub.namespace(channel).history_size;
        let tail = self.read(channel, None, limit, limit, Reader::Node).await?;
        let base = self.hub.agreed_until(channel, epoch, &tail.entries).min(tail.top);
        let mut conn = self.conn.get().await.inspect_err(|_| self.metrics.error("connection"))?;
        let script = redis::Script::new(keys::FENCE);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys(channel).meta)
            .arg(epoch)
            .arg(new_epoch())
            .arg(base)
            .arg(self.opts.meta_ttl.as_millis() as u64);
        let fenced: String =
            tokio::time::timeout(self.opts.timeout, invocation.invoke_async(&mut conn))
                .await
                .unwrap_or_else(|_| Err(timeout_error()))
                .map_err(|e| self.redis_error(e))?;
        self.metrics.fences.fetch_add(1, Relaxed);
        tracing::warn!(
            channel,
            old_epoch = epoch,
            new_epoch = %fenced,
            delivered,
            kept = base,
            "Redis lost messages of this channel (a failover?); moved it to a new epoch"
        );
        let since = Some((delivered, epoch));
        let read = self.read(channel, since, 0, limit, Reader::Node).await?;
        Ok(self.merge(channel, read, None))
    }

    /// Counts a Redis error by kind and words it for the client.
    fn redis_error(&self, e: redis::RedisError) -> BrokerError {
        let readonly = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_io_error() || e.is_connection_dropped() || readonly {
            // A replica answers READONLY: the primary moved (Sentinel failover).
            "connection"
        } else {
            "script"
        };
        self.metrics.error(kind);
        if kind != "script" {
            self.conn.reset();
        }
        BrokerError::Unavailable(format!("Redis: {e}"))
    }
}

/// Parses `{epoch, top, prev, base, offset, data, ...}`.
fn parse_read(values: Vec<Value>) -> Option<ReadResult> {
    let mut it = values.into_iter();
    let epoch = value_string(it.next()?)?;
    let top = value_u64(it.next()?)?;
    let prev = value_string(it.next()?)?;
    let base = value_u64(it.next()?)?;
    let mut entries = Vec::new();
    while let Some(offset) = it.next() {
        let offset = value_u64(offset)?;
        let Value::BulkString(data) = it.next()? else { return None };
        entries.push((offset, data));
    }
    Some(ReadResult { epoch, top, prev, base, entries })
}

fn value_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn value_u64(v: Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(n).ok(),
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        _ => None,
    }
}

/// The one result of a single publish.
fn first(mut published: Vec<Published>) -> Published {
    published.swap_remove(0)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
}

/// A fresh epoch, offered to Redis for a channel that has none (8 characters of the channel
/// alphabet, like the hub's).
fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..8).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A command connection: to one server (a multiplexed connection, which keeps command
/// order) or to a Redis Cluster (routed by key slot).
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the node's connections go when not to a Redis Cluster.
enum Target {
    /// One server (`url`; the first seed for a cluster's pub/sub).
    Server(redis::Client),
    /// The primary the sentinels name, asked at every (re)connection so a failover is
    /// followed.
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

/// The command connection, made on first use and remade after a failure.
struct Conn {
    target: Target,
    /// Set for Redis Cluster (`broker.cluster_urls`).
    cluster: Option<redis::cluster::ClusterClient>,
    timeout: Duration,
    current: Mutex<Option<Link>>,
    connecting: tokio::sync::Mutex<()>,
    /// Why the last connection attempt failed (cleared by a success).
    last_error: Mutex<Option<String>>,
}

impl Conn {
    fn new(
        target: Target,
        cluster: Option<redis::cluster::ClusterClient>,
        timeout: Duration,
    ) -> Self {
        Conn {
            target,
            cluster,
            timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
        }
    }

    fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// A client for the server to talk to: the current primary with Sentinel, else the
    /// configured one (the first seed for a cluster's pub/sub).
    async fn server(&self) -> Result<redis::Client, BrokerError> {
        let sentinel = match &self.target {
            Target::Server(client) => return Ok(client.clone()),
            Target::Sentinel(sentinel) => sentinel,
        };
        let asked = async { sentinel.lock().await.async_get_client().await };
        match tokio::time::timeout(self.timeout, asked).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(BrokerError::Unavailable(format!("Sentinel: {e}"))),
            Err(_) => {
                Err(BrokerError::Unavailable("Sentinel did not name a primary in time".into()))
            }
        }
    }

    async fn get(&self) -> Result<Link, BrokerError> {
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let made = match &self.cluster {
            Some(cluster) => tokio::time::timeout(self.timeout, cluster.get_async_connection())
                .await
                .map(|r| r.map(Link::Cluster)),
            None => {
                let server = match self.server().await {
                    Ok(server) => server,
                    Err(e) => {
                        *self.last_error.lock() = Some(e.to_string());
                        return Err(e);
                    }
                };
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    self.timeout,
                    ConnectionManager::new_with_config(server, config),
                )
                .await
                .map(|r| r.map(Link::Single))
            }
        };
        let failed = match made {
            Ok(Ok(c)) => {
                *self.current.lock() = Some(c.clone());
                *self.last_error.lock() = None;
                return Ok(c);
            }
            Ok(Err(e)) => format!("cannot connect to Redis: {e}"),
            Err(_) => format!(
                "cannot connect to Redis within {} ms (broker.timeout_ms)",
                self.timeout.as_millis()
            ),
        };
        *self.last_error.lock() = Some(failed.clone());
        Err(BrokerError::Unavailable(failed))
    }

    /// Forgets the connection after an error, so the next use connects afresh.
    fn reset(&self) {
        *self.current.lock() = None;
    }
}

/// Sends queued publishes to Redis in order, a pipeline at a time.
async fn publisher(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut script_loaded = false;
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_PIPELINE);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_PIPELINE {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        inner.queued.fetch_sub(batch.len(), Relaxed);
        // A publish whose caller stopped waiting (timed out) is still sent: fire-and-forget
        // publishers never wait, and one that timed out may succeed late, as documented. A
        // publish queued longer than the timeout is not: Redis has been away, and sending a
        // backlog after the callers were told "unavailable" would surprise them.
        let now = Instant::now();
        let timeout = inner.opts.timeout;
        let (stale, fresh): (Vec<Job>, Vec<Job>) =
            batch.drain(..).partition(|j| now.duration_since(j.queued_at) > timeout);
        for job in stale {
            inner.metrics.error("timeout");
            let _ = job.reply.send(Err(inner.unavailable_timeout()));
        }
        if fresh.is_empty() {
            continue;
        }
        let mut sent = send_batch(&inner, &fresh, !script_loaded).await;
        if let Ok(replies) = &sent
            && replies.iter().all(is_noscript)
        {
            // Redis lost its scripts (it restarted behind a reconnect) and nothing ran: the
            // same batch again, with the script, keeps the order.
            sent = send_batch(&inner, &fresh, true).await;
        }
        let mut replies = match sent {
            Ok(replies) => {
                script_loaded = !replies.iter().any(is_noscript);
                replies.into_iter()
            }
            Err(e) => {
                script_loaded = false;
                for job in fresh {
                    let _ = job.reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        for job in fresh {
            let answer = match replies.next() {
                Some(Ok(Value::Array(v))) if v.len() == job.data.len() + 1 => {
                    let mut v = v.into_iter();
                    let epoch: Option<Arc<str>> = v.next().and_then(value_string).map(Arc::from);
                    let offsets: Option<Vec<u64>> = v.map(value_u64).collect();
                    match (epoch, offsets) {
                        (Some(epoch), Some(offsets)) => Ok(offsets
                            .into_iter()
                            .map(|offset| Published { offset, epoch: epoch.clone() })
                            .collect()),
                        _ => {
                            inner.metrics.error("protocol");
                            Err(BrokerError::Unavailable("unexpected publish answer".into()))
                        }
                    }
                }
                Some(Ok(_)) | None => {
                    inner.metrics.error("protocol");
                    Err(BrokerError::Unavailable("unexpected publish answer".into()))
                }
                Some(Err(e)) => {
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                        script_loaded = false;
                    }
                    Err(inner.redis_error(e))
                }
            };
            if answer.is_ok() {
                inner.metrics.published.fetch_add(job.data.len() as u64, Relaxed);
                inner.metrics.publish_latency(job.queued_at.elapsed());
            }
            let _ = job.reply.send(answer);
        }
    }
}

/// Takes lease `name` when free and renews it while held; tells `held` every change. A
/// node that cannot reach Redis gives the role up (another node may have taken it).
async fn hold_lease(inner: Arc<Inner>, name: String, held: tokio::sync::watch::Sender<bool>) {
    let key = keys::lease_key(&inner.opts.prefix, &name);
    let script = redis::Script::new(keys::LEASE);
    let mut tick = tokio::time::interval(LEASE_RENEW);
    loop {
        tick.tick().await;
        // Held across the renewal, so `close` cannot release between a check and a renewal.
        let closing = inner.closing.lock().await;
        if *closing || held.is_closed() {
            held.send_replace(false);
            return;
        }
        let answer = match inner.conn.get().await {
            Ok(mut conn) => {
                let mut invocation = script.prepare_invoke();
                invocation.key(&key).arg(&inner.node_id).arg(LEASE_TTL.as_millis() as u64);
                tokio::time::timeout(inner.opts.timeout, invocation.invoke_async::<i64>(&mut conn))
                    .await
                    .unwrap_or_else(|_| Err(timeout_error()))
            }
            Err(e) => Err(redis::RedisError::from(std::io::Error::other(e.to_string()))),
        };
        let now_held = matches!(answer, Ok(1));
        if now_held != *held.borrow() {
            tracing::info!(lease = %name, node = %inner.node_id, held = now_held, "lease changed hands");
            held.send_replace(now_held);
        }
    }
}

/// Sends `jobs` as one pipeline of publish scripts (after `SCRIPT LOAD` when `load`), and
/// returns one reply per job.
async fn send_batch(
    inner: &Inner,
    jobs: &[Job],
    load: bool,
) -> Result<Vec<RedisResult<Value>>, BrokerError> {
    if inner.conn.is_cluster() {
        return send_batch_to_cluster(inner, jobs, load).await;
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    if load {
        pipe.cmd("SCRIPT").arg("LOAD").arg(keys::PUBLISH);
    }
    for job in jobs {
        push_publish(&mut pipe, inner, job);
    }
    let mut conn = inner.conn.get().await.inspect_err(|_| inner.metrics.error("connection"))?;
    let query = pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn);
    let mut replies = tokio::time::timeout(inner.opts.timeout, query)
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
        .map_err(|e| inner.redis_error(e))?;
    if load && !replies.is_empty() {
        let _ = replies.remove(0);
    }
    Ok(replies)
}

/// [`send_batch`] for Redis Cluster, where a pipeline must stay in one slot: one pipeline
/// per channel (its keys share a slot), all sent at once. Order holds per channel, which
/// is what publishes promise.
async fn send_batch_to_cluster(
    inner: &Inner,
    jobs: &[Job],
    load: bool,
) -> Result<Vec<RedisResult<Value>>, BrokerError> {
    let conn = inner.conn.get().await.inspect_err(|_| inner.metrics.error("connection"))?;
    if load {
        // Routed to every primary by the cluster connection.
        let cmd = redis::cmd("SCRIPT").arg("LOAD").arg(keys::PUBLISH).to_owned();
        let mut c = conn.clone();
        tokio::time::timeout(inner.opts.timeout, cmd.query_async::<Value>(&mut c))
            .await
            .unwrap_or_else(|_| Err(timeout_error()))
            .map_err(|e| inner.redis_error(e))?;
    }
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match groups.iter_mut().find(|(channel, _)| *channel == job.channel) {
            Some((_, members)) => members.push(i),
            None => groups.push((&job.channel, vec![i])),
        }
    }
    let sends = groups.iter().map(|(_, members)| {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &i in members {
            push_publish(&mut pipe, inner, &jobs[i]);
        }
        let mut c = conn.clone();
        async move {
            let query = pipe.query_async::<Vec<RedisResult<Value>>>(&mut c);
            tokio::time::timeout(inner.opts.timeout, query)
                .await
                .unwrap_or_else(|_| Err(timeout_error()))
        }
    });
    let results = futures_util::future::join_all(sends).await;
    let mut replies: Vec<Option<RedisResult<Value>>> = jobs.iter().map(|_| None).collect();
    for ((_, members), result) in groups.iter().zip(results) {
        match result {
            Ok(values) => {
                for (&i, value) in members.iter().zip(values) {
                    replies[i] = Some(value);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                let _ = inner.redis_error(e);
                for &i in members {
                    replies[i] =
                        Some(Err(redis::RedisError::from(std::io::Error::other(reason.clone()))));
                }
            }
        }
    }
    Ok(replies
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(std::io::Error::other("no reply").into())))
        .collect())
}

/// Appends one publish script call for `job` to `pipe`.
fn push_publish(pipe: &mut redis::Pipeline, inner: &Inner, job: &Job) {
    let k = inner.keys(&job.channel);
    let ns = inner.hub.namespace(&job.channel);
    let mode = if job.kind == PublishKind::Ephemeral { "e" } else { "r" };
    let call = pipe
        .cmd("EVALSHA")
        .arg(&inner.publish_sha)
        .arg(2)
        .arg(&k.meta)
        .arg(&k.stream)
        .arg(mode)
        .arg(ns.history_size)
        .arg(ns.history_ttl_ms)
        .arg(inner.opts.meta_ttl.as_millis() as u64)
        .arg(&k.topic)
        .arg(new_epoch());
    for data in &job.data {
        call.arg(&data[..]);
    }
}

fn is_noscript(reply: &RedisResult<Value>) -> bool {
    matches!(reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

/// Whether Redis answers: the command connection (pinged) and the pub/sub connection.
struct Health {
    /// Since when each part has been failing (`None`: fine).
    command_down: Mutex<Option<Instant>>,
    pubsub_down: Mutex<Option<Instant>>,
}

impl Health {
    fn new() -> Self {
        let now = Some(Instant::now());
        Health { command_down: Mutex::new(now), pubsub_down: Mutex::new(now) }
    }

    fn set(slot: &Mutex<Option<Instant>>, ok: bool) {
        let mut s = slot.lock();
        if ok {
            *s = None;
        } else if s.is_none() {
            *s = Some(Instant::now());
        }
    }

    fn command(&self, ok: bool) {
        Self::set(&self.command_down, ok);
    }

    fn pubsub(&self, ok: bool) {
        Self::set(&self.pubsub_down, ok);
    }

    fn ready(&self, grace: Duration) -> Result<(), String> {
        for (part, slot) in [("commands", &self.command_down), ("pub/sub", &self.pubsub_down)] {
            if let Some(since) = *slot.lock() {
                let down = since.elapsed();
                if down >= grace {
                    return Err(format!(
                        "Redis ({part}) unreachable for {} ms (broker.ready_grace_ms)",
                        down.as_millis()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Pings Redis twice a second so readiness follows it.
async fn health(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let ok = match inner.conn.get().await {
            Ok(mut conn) => {
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut conn);
                match tokio::time::timeout(inner.opts.timeout, ping).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        let _ = inner.redis_error(e);
                        false
                    }
                    Err(_) => {
                        inner.conn.reset();
                        false
                    }
                }
            }
            Err(_) => false,
        };
        inner.health.command(ok);
    }
}

/// Tells the pub/sub task when a channel loses its last local subscriber (after the
/// broker's timeout, so a subscribe being prepared meanwhile keeps it).
struct Demand(Arc<Inner>);

impl DemandListener for Demand {
    fn demand_changed(&self, channel: &str, wanted: bool) {
        if wanted {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let inner = self.0.clone();
        let channel = channel.to_owned();
        runtime.spawn(async move {
            tokio::time::sleep(inner.opts.timeout).await;
            let _ = inner.pubsub_tx.send(pubsub::Command::Unsubscribe(channel));
        });
    }
}

/// Every live node's latest advertisement (those renewed within [`NODE_TTL`]).
async fn live_nodes(inner: &Inner) -> Result<Vec<String>, BrokerError> {
    let mut conn = inner.conn.get().await?;
    let prefix = &inner.opts.prefix;
    let since = unix_ms().saturating_sub(NODE_TTL.as_millis() as u64);
    let cmd =
        redis::cmd("ZRANGEBYSCORE").arg(keys::nodes_key(prefix)).arg(since).arg("+inf").to_owned();
    let ids = tokio::time::timeout(inner.opts.timeout, cmd.query_async::<Vec<String>>(&mut conn))
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
        .map_err(|e| inner.redis_error(e))?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = ids.iter().map(|id| keys::node_key(prefix, id)).collect();
    let cmd = redis::cmd("MGET").arg(&keys).to_owned();
    let infos =
        tokio::time::timeout(inner.opts.timeout, cmd.query_async::<Vec<Option<String>>>(&mut conn))
            .await
            .unwrap_or_else(|_| Err(timeout_error()))
            .map_err(|e| inner.redis_error(e))?;
    Ok(infos.into_iter().flatten().collect())
}

/// Checks a `broker.url` (and the CA certificates for `rediss://`) the way
/// [`RedisBroker::start`] will read them; a `redis+sentinel://` URL included.
pub fn check_url(url: &str, tls_ca: Option<&[u8]>) -> Result<(), String> {
    if let Some(settings) = sentinel::Settings::from_url(url, "mymaster") {
        return settings?.client().map(|_| ());
    }
    open_client(url, tls_ca).map(|_| ()).map_err(|e| e.to_string())
}

/// The Sentinel settings in `opts` (the `redis+sentinel://` URL or the `sentinels` list),
/// `None` without Sentinel.
fn sentinel_settings(opts: &RedisOptions) -> Option<Result<sentinel::Settings, String>> {
    if let Some(settings) = sentinel::Settings::from_url(&opts.url, &opts.sentinel_master) {
        return Some(settings.map_err(|e| format!("broker.url {:?}: {e}", opts.url)));
    }
    if opts.sentinels.is_empty() {
        return None;
    }
    Some(
        sentinel::Settings::from_list(&opts.sentinels, &opts.sentinel_master, &opts.url)
            .map_err(|e| format!("broker.url {:?}: {e}", opts.url)),
    )
}

/// A client for `url`; `rediss://` verifies the server against `tls_ca` (PEM) when given,
/// else against the system's roots. TLS is rustls with ring.
fn open_client(url: &str, tls_ca: Option<&[u8]>) -> RedisResult<redis::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tls_ca {
        Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
        ),
        _ => redis::Client::open(url),
    }
}
