//! Graceful shutdown: one signal every task can watch, and a count of live connections so
//! the server can wait for them to finish within the grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Shared shutdown state. Cloning is cheap; every clone sees the same signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    draining: Arc<watch::Sender<bool>>,
    active: Arc<Active>,
}

#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Held by each connection while it lives; dropping it lets [`Shutdown::wait_idle`] finish.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Active>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { draining: Arc::new(watch::channel(false).0), active: Arc::default() }
    }
}

impl Shutdown {
    /// Starts draining: readiness turns 503 and every connection is asked to close.
    pub fn trigger(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// A receiver whose `changed()` resolves when draining starts.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Resolves once draining has started.
    pub async fn draining(&self) {
        let mut rx = self.subscribe();
        // An error means the sender is gone, which only happens at teardown: treat as drain.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Counts a connection until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.active.clone())
    }

    pub fn active_connections(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Waits until no tracked connection is left, or `grace` has passed. Returns whether
    /// every connection finished.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.active.idle.notified();
                if self.active_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, wait).await.is_ok()
    }
}
