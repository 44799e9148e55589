//! Live connections by user, on this node: what the server API acts on (list, disconnect,
//! subscribe, unsubscribe a user's connections) and what a per-user connection count reads.
//!
//! Each session owns a [`ConnHandle`]: the part of it other tasks may touch. Its
//! subscription set lives here, under the handle's lock, so a subscribe made by the server
//! API and one made by the client cannot interleave, and the session's drop leaves exactly
//! the channels it holds. A session is listed under its user from the moment a token or the
//! connect proxy names one until it ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ferrocast_hub::ConnQueue;
use parking_lot::{Mutex, MutexGuard};
use serde_json::{Value, json};

use ferrocast_protocol::CloseCode;

use crate::metrics::Transport;

/// The shared part of one session.
#[derive(Debug)]
pub struct ConnHandle {
    pub conn_id: u64,
    /// The public session id (sent in the welcome).
    pub session_id: String,
    pub transport: Transport,
    pub queue: Arc<ConnQueue>,
    /// Milliseconds since the epoch.
    pub connected_at_ms: u64,
    /// Set once the client kept sending after being rate limited (see
    /// [`ConnHandle::must_close`]).
    condemned: AtomicBool,
    state: Mutex<HandleState>,
}

/// What the handle's lock guards.
#[derive(Debug, Default)]
pub struct HandleState {
    /// The connection's user and `info`, once known.
    pub user: Option<String>,
    /// Boxed: most connections have none, and every connection has a handle.
    pub info: Option<Box<Value>>,
    /// Channels the connection is subscribed to.
    pub subscriptions: HashSet<String>,
    /// Set when the session ends: nothing may subscribe it any more.
    pub closed: bool,
    /// When the connection is closed for want of a (fresh) token, and with which code (see
    /// [`ConnHandle::auth_deadline`]).
    pub auth_due: Option<(Instant, CloseCode)>,
}

impl ConnHandle {
    pub fn new(
        conn_id: u64,
        session_id: String,
        transport: Transport,
        queue: Arc<ConnQueue>,
    ) -> Self {
        let connected_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        ConnHandle {
            conn_id,
            session_id,
            transport,
            queue,
            connected_at_ms,
            condemned: AtomicBool::new(false),
            state: Mutex::new(HandleState::default()),
        }
    }

    /// Marks the connection for closing with 4029: it kept sending after being rate limited.
    pub fn condemn(&self) {
        self.condemned.store(true, Ordering::Relaxed);
    }

    /// Whether the connection was condemned (see [`ConnHandle::condemn`]).
    pub fn is_condemned(&self) -> bool {
        self.condemned.load(Ordering::Relaxed)
    }

    /// Whether the transport must close the connection now, with which code and reason:
    /// 4029 once the client kept flooding after being rate limited. Writers read this each
    /// turn without the session's lock, which a request may hold while it waits for the
    /// auth proxy or the broker.
    pub fn must_close(&self) -> Option<(CloseCode, &'static str)> {
        self.is_condemned().then_some((
            CloseCode::RateLimited,
            "rate limited: too many requests after being refused (limits.commands_per_s)",
        ))
    }

    /// When the connection must be closed for want of a (fresh) token, the close code, and
    /// its reason: 4001 when `auth.anonymous = false` and no token came within
    /// `auth.auth_timeout_ms`, 4011 `auth.expiry_grace_ms` after the token's `exp`. Like
    /// [`ConnHandle::must_close`], readable without the session's lock.
    pub fn auth_deadline(&self) -> Option<(Instant, CloseCode, &'static str)> {
        let (due, code) = self.state.lock().auth_due?;
        let reason = match code {
            CloseCode::Unauthorized => "no valid token within auth.auth_timeout_ms",
            code => code.reason(),
        };
        Some((due, code, reason))
    }

    /// The handle's state. Lock order: this lock, then the hub's and the queue's.
    pub fn lock(&self) -> MutexGuard<'_, HandleState> {
        self.state.lock()
    }

    /// How the server API lists the connection.
    pub fn describe(&self) -> Value {
        let state = self.state.lock();
        let mut channels: Vec<&String> = state.subscriptions.iter().collect();
        channels.sort();
        json!({
            "conn": self.conn_id,
            "session": self.session_id,
            "transport": self.transport.as_str(),
            "user": state.user,
            "info": state.info,
            "connected_at_ms": self.connected_at_ms,
            "channels": channels,
        })
    }
}

/// Sessions by user.
#[derive(Debug, Default)]
pub struct Users {
    by_user: Mutex<HashMap<String, Vec<Arc<ConnHandle>>>>,
}

impl Users {
    /// Lists `handle` under `user`.
    pub fn add(&self, user: &str, handle: &Arc<ConnHandle>) {
        self.by_user.lock().entry(user.to_owned()).or_default().push(handle.clone());
    }

    /// Takes connection `conn_id` off `user`'s list.
    pub fn remove(&self, user: &str, conn_id: u64) {
        let mut by_user = self.by_user.lock();
        if let Some(list) = by_user.get_mut(user) {
            list.retain(|h| h.conn_id != conn_id);
            if list.is_empty() {
                by_user.remove(user);
            }
        }
    }

    /// `user`'s connections on this node.
    pub fn connections(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        self.by_user.lock().get(user).cloned().unwrap_or_default()
    }

    /// How many connections `user` has on this node.
    pub fn count(&self, user: &str) -> usize {
        self.by_user.lock().get(user).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_a_users_connections_until_they_are_removed() {
        let users = Users::default();
        let handle = |id| {
            Arc::new(ConnHandle::new(
                id,
                format!("s{id}"),
                Transport::Ws,
                Arc::new(ConnQueue::new(id, 4096)),
            ))
        };
        let (a, b) = (handle(1), handle(2));
        users.add("42", &a);
        users.add("42", &b);
        assert_eq!(users.count("42"), 2);
        a.lock().subscriptions.insert("x.y".into());
        assert_eq!(users.connections("42")[0].describe()["channels"], json!(["x.y"]));
        users.remove("42", 1);
        users.remove("42", 2);
        assert_eq!(users.count("42"), 0);
        assert!(users.by_user.lock().is_empty());
    }
}
