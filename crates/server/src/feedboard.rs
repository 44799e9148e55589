//! The state of every data source (simulator, upstream connectors), for `/api/feeds`,
//! `/readyz` and `/metrics`.

use std::fmt::Write;

use parking_lot::Mutex;
use serde::Serialize;

use crate::metrics::family;

/// What a feed is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedState {
    Connecting,
    Authenticating,
    Live,
    BackingOff,
    Failed,
    Stopped,
}

impl FeedState {
    pub const ALL: [FeedState; 6] = [
        FeedState::Connecting,
        FeedState::Authenticating,
        FeedState::Live,
        FeedState::BackingOff,
        FeedState::Failed,
        FeedState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FeedState::Connecting => "connecting",
            FeedState::Authenticating => "authenticating",
            FeedState::Live => "live",
            FeedState::BackingOff => "backing_off",
            FeedState::Failed => "failed",
            FeedState::Stopped => "stopped",
        }
    }
}

/// One feed's public status.
#[derive(Debug, Clone, Serialize)]
pub struct FeedStatus {
    pub name: String,
    pub kind: String,
    pub state: FeedState,
    /// Why the feed is not live, in words a person can act on.
    pub reason: Option<String>,
    /// Whether readiness depends on this feed.
    pub required: bool,
}

/// Every feed's status.
#[derive(Debug, Default)]
pub struct FeedBoard {
    feeds: Mutex<Vec<FeedStatus>>,
}

impl FeedBoard {
    /// Adds a feed or updates its state.
    pub fn set(
        &self,
        name: &str,
        kind: &str,
        required: bool,
        state: FeedState,
        reason: Option<String>,
    ) {
        let mut feeds = self.feeds.lock();
        match feeds.iter_mut().find(|f| f.name == name) {
            Some(f) => {
                f.state = state;
                f.reason = reason;
            }
            None => feeds.push(FeedStatus {
                name: name.into(),
                kind: kind.into(),
                state,
                reason,
                required,
            }),
        }
    }

    pub fn snapshot(&self) -> Vec<FeedStatus> {
        self.feeds.lock().clone()
    }

    /// Why the server is not ready because of a feed, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.feeds.lock().iter().find(|f| f.required && f.state != FeedState::Live).map(|f| {
            format!(
                "feed {:?} is {}{}",
                f.name,
                f.state.as_str(),
                f.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            )
        })
    }

    /// `ferrocast_feed_state{feed,state}` gauges, one per feed and state.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        family(&mut out, "ferrocast_feed_state", "gauge", "1 for the state each feed is in.");
        for f in self.feeds.lock().iter() {
            for s in FeedState::ALL {
                let _ = writeln!(
                    out,
                    "ferrocast_feed_state{{feed=\"{}\",kind=\"{}\",state=\"{}\"}} {}",
                    f.name,
                    f.kind,
                    s.as_str(),
                    u8::from(f.state == s)
                );
            }
        }
        out
    }
}
