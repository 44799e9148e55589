//! Which channels a connector must serve: the demand tracker between the hub's
//! first-subscriber / last-subscriber notifications and the connector's upstream
//! subscriptions.
//!
//! A channel is *wanted* while it has subscribers, *lingering* for `linger` after its last
//! subscriber left (so a dashboard reload does not cost an unsubscribe and a resubscribe
//! upstream), and *reserved* between a subscribe being admitted against an upstream limit and
//! its first-subscriber notification. Lingering and reserved channels still count as demand.
//!
//! When a linger or reservation runs out, the connector asks the hub whether the channel has
//! subscribers before dropping it ([`Interest::settle`]). That check makes the tracker
//! immune to notifications arriving out of order (the hub sends them after releasing the
//! channel lock, so a "last left" can overtake a "first arrived" on another thread).

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The demand state of one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demand {
    /// At least one subscriber.
    Wanted,
    /// No subscriber since the last one left; kept until `until`.
    Lingering {
        /// When to check again and drop the channel if still unwatched.
        until: Instant,
    },
    /// Admitted against an upstream limit, first subscriber not yet reported.
    Reserved {
        /// When to give the reservation up if no subscriber showed up.
        until: Instant,
    },
}

impl Demand {
    fn deadline(self) -> Option<Instant> {
        match self {
            Demand::Wanted => None,
            Demand::Lingering { until } | Demand::Reserved { until } => Some(until),
        }
    }
}

/// The channels a connector serves, with their demand state.
#[derive(Debug)]
pub struct Interest {
    channels: Mutex<HashMap<String, Demand>>,
    /// Woken on every change, so the connector task reconciles promptly.
    changed: Notify,
    linger: Duration,
}

impl Interest {
    /// An empty tracker whose channels linger for `linger` after their last subscriber.
    pub fn new(linger: Duration) -> Self {
        Interest { channels: Mutex::new(HashMap::new()), changed: Notify::new(), linger }
    }

    /// Records a first-subscriber (`wanted`) or last-subscriber notification.
    pub fn set(&self, channel: &str, wanted: bool) {
        {
            let mut channels = self.channels.lock();
            if wanted {
                channels.insert(channel.to_owned(), Demand::Wanted);
            } else if let Some(d) = channels.get_mut(channel) {
                *d = Demand::Lingering { until: Instant::now() + self.linger };
            } else {
                return;
            }
        }
        self.changed.notify_one();
    }

    /// Runs `f` over the channel map under the lock, for checks that must be atomic with a
    /// change (admission against a limit). `f` must not block.
    pub fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Demand>) -> R) -> R {
        let r = f(&mut self.channels.lock());
        self.changed.notify_one();
        r
    }

    /// Every channel that counts as demand (wanted, lingering or reserved).
    pub fn channels(&self) -> Vec<String> {
        self.channels.lock().keys().cloned().collect()
    }

    /// The earliest linger or reservation deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.channels.lock().values().filter_map(|d| d.deadline()).min()
    }

    /// Resolves the lingering and reserved channels whose deadline has passed: each becomes
    /// wanted again if `has_subscribers` says so, and is dropped otherwise. Returns whether
    /// anything was dropped. `has_subscribers` is called without the lock held.
    pub fn settle(&self, now: Instant, has_subscribers: impl Fn(&str) -> bool) -> bool {
        let due: Vec<String> = self
            .channels
            .lock()
            .iter()
            .filter(|(_, d)| d.deadline().is_some_and(|t| t <= now))
            .map(|(c, _)| c.clone())
            .collect();
        if due.is_empty() {
            return false;
        }
        let answers: Vec<(String, bool)> = due
            .into_iter()
            .map(|c| {
                let watched = has_subscribers(&c);
                (c, watched)
            })
            .collect();
        let mut dropped = false;
        let mut channels = self.channels.lock();
        for (channel, watched) in answers {
            // Re-check: a notification may have changed the channel while the lock was free.
            let Some(d) = channels.get(&channel).copied() else { continue };
            if d.deadline().is_none_or(|t| t > now) {
                continue;
            }
            if watched {
                channels.insert(channel, Demand::Wanted);
            } else {
                channels.remove(&channel);
                dropped = true;
            }
        }
        dropped
    }

    /// Completes when the tracker changed since the last call (or immediately if it did).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The linger period.
    pub fn linger(&self) -> Duration {
        self.linger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn linger_then_drop_unless_watched() {
        let i = Interest::new(Duration::from_secs(30));
        i.set("ticks.AAPL", true);
        i.set("ticks.MSFT", true);
        i.set("ticks.AAPL", false);
        i.set("ticks.MSFT", false);
        i.set("ticks.UNKNOWN", false);
        assert_eq!(i.channels().len(), 2);
        let deadline = i.next_deadline().unwrap();
        assert!(!i.settle(deadline - Duration::from_millis(1), |_| false));
        // The hub says MSFT has a subscriber again (its "first" notification was overtaken).
        assert!(i.settle(deadline, |c| c == "ticks.MSFT"));
        assert_eq!(i.channels(), vec!["ticks.MSFT".to_owned()]);
        assert_eq!(i.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn resubscribe_during_linger_keeps_the_channel() {
        let i = Interest::new(Duration::from_secs(1));
        i.set("quotes.AAPL", true);
        i.set("quotes.AAPL", false);
        i.set("quotes.AAPL", true);
        assert_eq!(i.next_deadline(), None);
        assert!(!i.settle(Instant::now() + Duration::from_secs(5), |_| false));
        assert_eq!(i.channels().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_wake_the_connector() {
        let i = Interest::new(Duration::ZERO);
        i.set("ticks.AAPL", true);
        tokio::time::timeout(Duration::from_secs(1), i.changed()).await.expect("woken");
    }
}
