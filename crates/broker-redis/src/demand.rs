//! Cluster-wide demand: which channels have subscribers on some node.
//!
//! A node's interest in a channel is already visible in Redis: it is the node's pub/sub
//! subscription to the channel's topic, held while the node has local subscribers and
//! dropped by Redis the moment the node's connection closes (a dead node leaves no interest
//! behind, with no TTL to wait out). `PUBSUB CHANNELS` lists them. A node that subscribes a
//! topic anew announces the channel on the `P:demand` topic, so a watcher (the node running
//! the feeds) learns of a new symbol at once rather than at its next poll; interest that
//! ends is seen at the next poll, which the feeds' linger makes ample.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferrocast_hub::{BrokerError, ClusterDemand};
use tokio::sync::watch;

use crate::{Inner, keys, timeout_error};

/// How often the set is read again without an announcement.
const POLL: Duration = Duration::from_secs(2);
/// Announcements arriving this close together cost one read.
const SETTLE: Duration = Duration::from_millis(20);

/// Starts keeping the demand for channels matching `patterns` current.
pub(crate) fn watch(inner: Arc<Inner>, patterns: Vec<String>) -> ClusterDemand {
    let (tx, rx) = watch::channel(Arc::new(BTreeSet::new()));
    inner.watch_demand();
    tokio::spawn(async move {
        loop {
            match read(&inner, &patterns).await {
                Ok(now) => {
                    tx.send_if_modified(|held| {
                        let changed = **held != now;
                        if changed {
                            *held = Arc::new(now);
                        }
                        changed
                    });
                }
                Err(e) => tracing::debug!("cannot read the cluster's demand: {e}"),
            }
            tokio::select! {
                () = inner.demand_announced.notified() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(POLL) => {}
                () = tx.closed() => return,
            }
        }
    });
    rx
}

/// The channels matching `patterns` some node is subscribed to.
async fn read(inner: &Inner, patterns: &[String]) -> Result<BTreeSet<String>, BrokerError> {
    let prefix = keys::topic_prefix(&inner.opts.prefix);
    let mut conn = inner.conn.get().await?;
    let mut pipe = redis::pipe();
    for pattern in patterns {
        pipe.cmd("PUBSUB").arg("CHANNELS").arg(format!("{prefix}{pattern}"));
    }
    let listed = pipe.query_async::<Vec<Vec<String>>>(&mut conn);
    let listed = tokio::time::timeout(inner.opts.timeout, listed)
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
        .map_err(|e| inner.redis_error(e))?;
    Ok(listed
        .into_iter()
        .flatten()
        .filter_map(|topic| topic.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// Tells the watchers that this node now has subscribers on `channel`.
pub(crate) async fn announce(inner: &Inner, channel: &str) {
    let Ok(mut conn) = inner.conn.get().await else { return };
    let cmd =
        redis::cmd("PUBLISH").arg(keys::demand_topic(&inner.opts.prefix)).arg(channel).to_owned();
    let sent = tokio::time::timeout(inner.opts.timeout, cmd.query_async::<i64>(&mut conn)).await;
    if !matches!(sent, Ok(Ok(_))) {
        inner.metrics.error("connection");
    }
}
