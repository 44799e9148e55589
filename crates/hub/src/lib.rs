//! The ferrocast hub: channels, subscriptions, history and fan-out, with no knowledge of
//! HTTP or WebSocket framing.
//!
//! - [`namespace`]: per-namespace policy (history bounds, snapshot, overflow, permissions);
//! - [`queue`]: each connection's outbound queue, bounded in bytes, with the overflow policies;
//! - [`history`]: the retained history of one channel (offsets and epoch);
//! - [`hub`]: the sharded channel registry: publish, subscribe with recovery, unsubscribe;
//! - [`broker`]: where offsets come from (memory: this hub; Redis: shared by many nodes);
//! - [`metrics`]: the hub's counters, rendered by the server's `/metrics`.
//!
//! Performance rules (see DESIGN.md): a message is encoded once per publish and shared by
//! every subscriber as `Bytes`; publishing never waits on a subscriber, it only appends to
//! bounded queues; the registry is sharded so publishers to different channels do not contend.
#![forbid(unsafe_code)]

pub mod broker;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod namespace;
pub mod queue;

pub use broker::{
    Broker, BrokerError, BrokerFuture, ClusterDemand, Lease, MemoryBroker, Pending, RunOutcome,
    SurveyHandler,
};
pub use hub::{
    ChannelInfo, ChannelPage, Delivery, DemandListener, HistoryPage, Hub, HubOptions, Position,
    PublishError, Published, Subscription,
};
pub use metrics::HubMetrics;
pub use namespace::{
    HistoryRule, NamespaceConfig, Namespaces, OverflowPolicy, PublishRule, SnapshotMode,
    SubscribeRule,
};
pub use queue::{ConnQueue, Drained, Outbound, PublishKind, PushOutcome, SharedForms};
