//! Throttled logging for refusals a client can repeat at will (a flood of bad publishes,
//! wrong API keys, oversized bodies): the first [`PER_WINDOW`] in each [`WINDOW`] are logged
//! as they come, the others only counted, and one summary line a window later says how many
//! were not logged. Every refusal is still counted exactly by its metric; only the log is
//! bounded, to about `PER_WINDOW + 1` lines a second however fast the refusals come.
//!
//! Hand-written (some 60 lines) rather than a crate: no maintained `tracing` layer throttles
//! one call site with an exact count of what it held back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a window lasts.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Refusals logged in full per window.
pub const PER_WINDOW: u32 = 5;

/// One throttled log line; see the module documentation.
#[derive(Debug)]
pub struct LogThrottle {
    /// What the summary line counts ("refused HTTP API requests").
    what: &'static str,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
    /// A task will log the summary at the end of the window.
    summary_due: bool,
}

impl LogThrottle {
    pub fn new(what: &'static str) -> Self {
        LogThrottle { what, state: Arc::default() }
    }

    /// Whether this refusal may be logged in full; if not, it is counted for the summary.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.window.is_none_or(|start| now.duration_since(start) >= WINDOW) {
            state.window = Some(now);
            state.logged = 0;
            // Without a runtime to log it on time, the summary comes with the next refusal.
            if !state.summary_due && state.suppressed > 0 {
                summarize(self.what, std::mem::take(&mut state.suppressed));
            }
        }
        if state.logged < PER_WINDOW {
            state.logged += 1;
            return true;
        }
        state.suppressed += 1;
        if !state.summary_due
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            state.summary_due = true;
            let due = state.window.unwrap_or(now) + WINDOW;
            let (what, shared) = (self.what, self.state.clone());
            runtime.spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                let mut state = shared.lock();
                state.summary_due = false;
                summarize(what, std::mem::take(&mut state.suppressed));
            });
        }
        false
    }
}

fn summarize(what: &str, suppressed: u64) {
    if suppressed > 0 {
        tracing::info!(
            suppressed,
            "{suppressed} more {what} not logged (at most {PER_WINDOW} a second are; the metrics count every one)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_window_pass_and_the_rest_are_counted() {
        let throttle = LogThrottle::new("refusals");
        let allowed = (0..100).filter(|_| throttle.allow()).count();
        assert_eq!(allowed, PER_WINDOW as usize);
        assert_eq!(throttle.state.lock().suppressed, 100 - u64::from(PER_WINDOW));
        // A new window: the count is summarized (no runtime here, so inline) and reset.
        throttle.state.lock().window = Some(Instant::now() - WINDOW);
        assert!(throttle.allow());
        assert_eq!(throttle.state.lock().suppressed, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_runtime_the_summary_comes_a_window_later_by_itself() {
        let throttle = LogThrottle::new("refusals");
        for _ in 0..(PER_WINDOW + 7) {
            throttle.allow();
        }
        assert!(throttle.state.lock().summary_due);
        assert_eq!(throttle.state.lock().suppressed, 7);
        tokio::time::sleep(WINDOW + Duration::from_millis(10)).await;
        let state = throttle.state.lock();
        assert!(!state.summary_due);
        assert_eq!(state.suppressed, 0);
    }
}
