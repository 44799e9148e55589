//! The reconnect loop every connector shares: run one upstream session after another, count
//! connects and reconnects, back off with full jitter between them, give up for good when a
//! session ends in a way retrying cannot fix, and keep the feed's state and log lines current.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::feed::{FeedStats, LinkState};

/// A session that stayed live this long resets the backoff: the next failure is a new
/// incident, not the continuation of the last one.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How one upstream session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Retrying cannot help (for example rejected credentials): the feed stays failed.
    Fatal(String),
    /// Reconnect after a delay: the backoff's, or `wait` when the upstream asks for longer.
    Retry {
        /// Metric label of the cause (`read_timeout`, `max_connections`, …).
        tag: &'static str,
        /// What happened, for the log and the feed's state.
        reason: String,
        /// A wait the upstream asked for, instead of the backoff's next delay.
        wait: Option<Duration>,
    },
}

/// One upstream connection, as the supervisor drives it.
pub trait Upstream: Send + Sync {
    /// Connects and serves until the connection ends; sets `live_since` once it is live.
    fn run_session<'a>(
        &'a self,
        live_since: &'a mut Option<Instant>,
    ) -> impl Future<Output = SessionEnd> + Send + 'a;

    /// Called after every session: upstream subscriptions do not survive a reconnect.
    fn session_ended(&self);
}

/// Runs `feed`'s sessions until `shutdown` resolves.
pub async fn supervise(
    feed: &impl Upstream,
    url: &str,
    stats: &FeedStats,
    mut backoff: Backoff,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
    let name = stats.name.as_str();
    let mut attempts: u64 = 0;
    loop {
        if attempts > 0 {
            FeedStats::add(&stats.reconnects, 1);
        }
        attempts += 1;
        FeedStats::add(&stats.connects, 1);
        let mut live_since = None;
        let end = tokio::select! {
            end = feed.run_session(&mut live_since) => Some(end),
            () = &mut shutdown => None,
        };
        feed.session_ended();
        if live_since.is_some_and(|t: Instant| t.elapsed() >= STABLE_AFTER) {
            backoff.reset();
        }
        match end {
            None => break,
            Some(SessionEnd::Fatal(reason)) => {
                tracing::error!(
                    feed = name,
                    url,
                    "feed failed and will not retry until restarted: {reason}"
                );
                stats.set_state(LinkState::Failed, Some(reason));
                shutdown.await;
                return;
            }
            Some(SessionEnd::Retry { tag, reason, wait }) => {
                stats.disconnected(tag);
                let delay = wait.unwrap_or_else(|| backoff.next_delay());
                tracing::warn!(
                    feed = name,
                    cause = tag,
                    retry_in_ms = delay.as_millis() as u64,
                    "upstream connection lost: {reason}"
                );
                // A stale feed stays `stale` (not merely backing off) until data flows again.
                let state = if tag == crate::feed::STALE_TAG {
                    LinkState::Stale
                } else {
                    LinkState::BackingOff
                };
                stats.set_state(
                    state,
                    Some(format!("{reason}; retrying in {} ms", delay.as_millis())),
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    stats.set_state(LinkState::Stopped, None);
}
