//! The broker seam: where a channel's offsets come from and how a message reaches the other
//! nodes' hubs.
//!
//! Every ingress (HTTP API, client publish, simulator, feeds) publishes through a
//! [`Broker`], never straight into the hub, and every subscribe asks the broker to
//! [prepare](Broker::prepare_subscribe) the channel first. Two implementations sit side by
//! side: [`MemoryBroker`] (one node; offsets assigned by the local hub, exactly what the
//! hub did before there was a seam, with nothing to await) and the Redis broker in the
//! `ferrocast-broker-redis` crate (offsets assigned in Redis atomically with storing history;
//! each node's hub is its local fan-out and history cache, fed by
//! [`Hub::deliver`](crate::Hub::deliver)).
//!
//! The broker also asks every live node a question and gathers the answers
//! ([`Broker::survey`]): cluster-wide figures and the server API's "disconnect this user" on
//! every node travel that one way.
//!
//! Results come back as [`Pending`]: `Ready` when the broker answered at once (the memory
//! broker always does, so its publish path allocates nothing more than before), `Later` with
//! a future when the answer needs a round trip. A caller that does not need the answer
//! (feeds, the simulator) drops it: the publish still happens, in order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ferrocast_protocol::StreamPosition;

use crate::hub::{HistoryPage, Hub, PublishError, Published};
use crate::queue::PublishKind;

/// A boxed future a broker answers with.
pub type BrokerFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An answer now or later.
pub enum Pending<T> {
    Ready(T),
    Later(BrokerFuture<T>),
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pending::Ready(_) => "Pending::Ready",
            Pending::Later(_) => "Pending::Later",
        })
    }
}

impl<T> Pending<T> {
    /// The answer, awaiting it if needed.
    pub async fn wait(self) -> T {
        match self {
            Pending::Ready(value) => value,
            Pending::Later(future) => future.await,
        }
    }
}

/// What [`Broker::publish_run`] did: the messages published, in order, and the error that
/// stopped the run, if any.
pub type RunOutcome = (Vec<Published>, Option<BrokerError>);

/// Why a broker could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Refused by the hub (bad channel name, channel limit): the caller's fault.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The shared engine did not answer in time or is unreachable; retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// Where offsets come from. See the module documentation.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// `"memory"` or `"redis"`, for logs, stats and metrics.
    fn kind(&self) -> &'static str;

    /// Publishes `data` (one serialized JSON value) on `channel`. Publishes made from one
    /// node to one channel keep the order in which this method was called, whether or not
    /// their answers are awaited.
    fn publish(
        &self,
        channel: &str,
        data: &[u8],
        kind: PublishKind,
    ) -> Pending<Result<Published, BrokerError>>;

    /// Publishes a run of messages on one channel, in order, with consecutive offsets (an
    /// HTTP batch's consecutive messages to one channel): with Redis atomically, no other
    /// node's publish in between. Answers with the messages published and, if the run
    /// stopped, why (with Redis a run is published whole or not at all).
    fn publish_run(&self, channel: &str, data: &[&[u8]], kind: PublishKind) -> Pending<RunOutcome>;

    /// Makes the local hub's copy of `channel` current enough for a subscribe with `recover`
    /// (or with the namespace's snapshot) to be answered exactly, and makes sure this node
    /// receives the channel's live messages. `None` when there is nothing to do (memory).
    fn prepare_subscribe(
        &self,
        channel: &str,
        recover: Option<&StreamPosition>,
    ) -> Option<BrokerFuture<Result<(), BrokerError>>>;

    /// Retained messages of `channel` after `since`, at most `limit` (the history API);
    /// `None` for a channel nobody published or subscribed to.
    fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Pending<Result<Option<HistoryPage>, BrokerError>>;

    /// A cluster-wide role named `name` (e.g. `"simulator"`): held by one node at a time.
    /// Always held with the memory broker.
    fn lease(&self, name: &str) -> Lease {
        let _ = name;
        Lease::always()
    }

    /// Makes this node's hub taps (see [`Hub::add_tap`]) see every retained message
    /// published anywhere in the cluster (`on`), or nothing (`off`, the start). The node
    /// holding the ingest lease follows them, so derived data (candles) is built once per
    /// cluster. Without a cluster the taps always see every publish, and this does nothing.
    fn follow_taps(&self, on: bool) {
        let _ = on;
    }

    /// The channels matching `patterns` (`ticks.*`) that have subscribers on some node of
    /// the cluster, kept current while the receiver lives; `None` without a cluster (this
    /// node's own demand is all there is). Feed connectors subscribe upstream for these.
    fn cluster_demand(&self, patterns: &[&str]) -> Option<ClusterDemand> {
        let _ = patterns;
        None
    }

    /// How this node answers [`Broker::survey`] questions from any node (itself included).
    fn answer_surveys(&self, handler: SurveyHandler) {
        let _ = handler;
    }

    /// Asks every live node `question` and returns the answers that came in time (at least
    /// one, or an error); `None` without a cluster (the caller answers for this node alone).
    /// A node that is not connected to the broker at that moment does not hear it: a caller
    /// that must say which nodes answered compares the answers with [`Broker::nodes`].
    fn survey(&self, question: &[u8]) -> Option<BrokerFuture<Result<Vec<Vec<u8>>, BrokerError>>> {
        let _ = question;
        None
    }

    /// Advertises this node (`info`, a JSON object) to the others; see [`Broker::nodes`].
    fn advertise(&self, info: String) {
        let _ = info;
    }

    /// Every live node's latest advertisement (JSON objects), this one's included, or
    /// `None` when there is no cluster (memory: the caller describes this node itself).
    fn nodes(&self) -> Option<BrokerFuture<Result<Vec<String>, BrokerError>>> {
        None
    }

    /// Called once the server has drained, before the process exits: gives up this node's
    /// leases (so another node takes its roles at once) and its place among the nodes.
    fn close(&self) -> Option<BrokerFuture<()>> {
        None
    }

    /// `Err(reason)` while the broker cannot serve (for `/readyz`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Messages this node has published through the broker (`None` for memory, where the
    /// hub counts them as they come in).
    fn published(&self) -> Option<u64> {
        None
    }

    /// Appends the broker's Prometheus metrics to `out` (none for memory).
    fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }
}

/// One node: the hub assigns offsets and keeps history itself.
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        MemoryBroker { hub }
    }
}

impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn publish(
        &self,
        channel: &str,
        data: &[u8],
        kind: PublishKind,
    ) -> Pending<Result<Published, BrokerError>> {
        Pending::Ready(self.hub.publish(channel, data, kind).map_err(BrokerError::Publish))
    }

    fn publish_run(&self, channel: &str, data: &[&[u8]], kind: PublishKind) -> Pending<RunOutcome> {
        let (out, stopped) = self.hub.publish_run(channel, data, kind);
        Pending::Ready((out, stopped.map(Into::into)))
    }

    fn prepare_subscribe(
        &self,
        _channel: &str,
        _recover: Option<&StreamPosition>,
    ) -> Option<BrokerFuture<Result<(), BrokerError>>> {
        None
    }

    fn history(
        &self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Pending<Result<Option<HistoryPage>, BrokerError>> {
        Pending::Ready(Ok(self.hub.history(channel, since, limit)))
    }
}

/// Computes this node's answer to a [`Broker::survey`] question (carrying it out, for a
/// question that asks the node to act).
pub type SurveyHandler = Arc<dyn Fn(Vec<u8>) -> BrokerFuture<Vec<u8>> + Send + Sync>;

/// The cluster-wide demand [`Broker::cluster_demand`] keeps current.
pub type ClusterDemand = tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<String>>>;

/// Whether this node holds a cluster-wide role; see [`Broker::lease`].
#[derive(Debug, Clone)]
pub struct Lease {
    held: tokio::sync::watch::Receiver<bool>,
    /// Keeps the channel open for a lease nobody updates (always held).
    _fixed: Option<Arc<tokio::sync::watch::Sender<bool>>>,
}

impl Lease {
    /// A lease held for good (one node).
    pub fn always() -> Lease {
        let (tx, rx) = tokio::sync::watch::channel(true);
        Lease { held: rx, _fixed: Some(Arc::new(tx)) }
    }

    /// A lease whose holder updates `held`.
    pub fn watching(held: tokio::sync::watch::Receiver<bool>) -> Lease {
        Lease { held, _fixed: None }
    }

    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Returns once the lease is held (at once if it is).
    pub async fn acquired(&mut self) {
        if self.held.wait_for(|h| *h).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Returns once the lease is lost (never for one that cannot be).
    pub async fn lost(&mut self) {
        if self.held.wait_for(|h| !*h).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
