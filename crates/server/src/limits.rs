//! Limits against abuse (`[limits]`): client connections per IP address (concurrent, and new
//! ones per second), connections per user, and the rate of requests on one connection.
//!
//! A *client connection* is a native WebSocket, an SSE stream or a Socket.IO socket, whatever
//! carries it (one TCP connection, a stream of an HTTP/2 connection). Plain HTTP requests are
//! bounded by `server.max_connections`, the header and body timeouts, and the API keys.
//!
//! - [`Limits::admit_ip`] is the one decision for a new client connection's address: it
//!   returns an [`IpSlot`] that holds the connection's place in its address's count until
//!   dropped, or a [`LimitRefusal`] with the limit's name and a reconnect delay. Transports
//!   answer a refusal in their own way (WebSocket close 1013 with a JSON reconnect hint, SSE
//!   and Engine.IO `429` with `Retry-After`, Socket.IO `connect_error`).
//! - [`Limits::user_slot`] is the same for a user id, taken by the session when a token first
//!   names its user.
//! - [`CommandBucket`] is one connection's request budget, kept by its session (see
//!   [`crate::session::Session`]): `commands_per_s` with a burst of `commands_burst`. A request
//!   beyond it is refused with `rate_limited`; a connection that keeps sending while refused
//!   (more than `commands_burst` refusals beyond what `commands_per_s` forgives) is closed
//!   with 4029.
//!
//! Addresses are counted per IPv4 address and per IPv6 /64 (one host usually holds a whole
//! /64). Behind a proxy listed in `limits.trusted_proxies`, the address is the client one the
//! proxies forwarded (`X-Forwarded-For`, read from the right past every trusted proxy). The
//! table forgets an address once it holds no connection and its bucket is full again, is
//! swept every few seconds, and never holds more than [`MAX_TRACKED_ADDRESSES`] entries:
//! beyond that a new address is let through uncounted (and counted in the metrics), so a
//! botnet of addresses can neither grow memory nor lock out addresses never seen before.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::metrics::family;

/// The `[limits]` table. Every limit is off at `0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most client connections open at once from one address.
    pub connections_per_ip: u32,
    /// New client connections one address may open per second (a token bucket holding one
    /// second's worth, at least one); beyond it: 429, or close 1013 with a reconnect hint.
    pub new_connections_per_ip_per_s: f64,
    /// Requests per second one connection may send, sustained.
    pub commands_per_s: f64,
    /// Requests one connection may send at once beyond the sustained rate.
    pub commands_burst: u32,
    /// Most connections open at once for one user (the `sub` of their tokens).
    pub connections_per_user: u32,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` names the client address
    /// the per-address limits count.
    pub trusted_proxies: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_ip: 0,
            new_connections_per_ip_per_s: 0.0,
            commands_per_s: 50.0,
            commands_burst: 200,
            connections_per_user: 0,
            trusted_proxies: vec!["127.0.0.0/8".into(), "::1".into()],
        }
    }
}

impl LimitsConfig {
    /// The configuration problems, as `(key, reason)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, rate) in [
            ("limits.new_connections_per_ip_per_s", self.new_connections_per_ip_per_s),
            ("limits.commands_per_s", self.commands_per_s),
        ] {
            if !(rate.is_finite() && (0.0..=1_000_000.0).contains(&rate)) {
                out.push((key.into(), format!("{rate} must be between 0 (off) and 1000000")));
            }
        }
        if self.commands_per_s > 0.0 && self.commands_burst == 0 {
            out.push((
                "limits.commands_burst".into(),
                "must be at least 1 when limits.commands_per_s is set".into(),
            ));
        }
        for (i, proxy) in self.trusted_proxies.iter().enumerate() {
            if let Err(e) = parse_net(proxy) {
                out.push((format!("limits.trusted_proxies[{i}]"), e));
            }
        }
        out
    }
}

/// An address or a CIDR network: `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("{s:?} is not an IP address or a CIDR network such as 10.0.0.0/8 or ::1")
    })
}

/// Most addresses tracked at once (about 64 bytes each).
pub const MAX_TRACKED_ADDRESSES: usize = 1 << 18;
/// Shards of the address table, so admissions from different addresses rarely wait.
const SHARDS: usize = 16;

/// Why a new connection was refused: the limit's key (also the metric label), what to tell
/// the client, and when it may try again.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRefusal {
    pub limit: &'static str,
    pub message: String,
    pub retry_after_ms: u64,
}

impl LimitRefusal {
    /// The reason of a WebSocket close 1013: a JSON reconnect hint naming the limit, like the
    /// 1001 hint of a drain (at most 123 bytes, as a close reason must be).
    pub fn close_reason(&self) -> String {
        format!(
            "{{\"reconnect\":true,\"after_ms\":{},\"limit\":\"limits.{}\"}}",
            self.retry_after_ms, self.limit
        )
    }

    /// Whole seconds for `Retry-After` (at least one).
    pub fn retry_after_s(&self) -> u64 {
        self.retry_after_ms.div_ceil(1000).max(1)
    }
}

/// The limits' state: per-address and per-user counts, and the counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    config: LimitsConfig,
    trusted: Vec<IpNet>,
    /// The reconnect delay told to clients refused by a concurrency limit.
    reconnect_after_ms: u64,
    shards: [Mutex<HashMap<Ipv6Addr, IpEntry>>; SHARDS],
    /// Entries in `shards`, kept apart so admission need not lock every shard.
    tracked: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
    users: Mutex<HashMap<String, u32>>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    connections_per_ip: AtomicU64,
    new_connections_per_ip: AtomicU64,
    connections_per_user: AtomicU64,
    commands: AtomicU64,
    closed_4029: AtomicU64,
    untracked: AtomicU64,
}

/// One address's state.
#[derive(Debug)]
struct IpEntry {
    open: u32,
    /// New-connection tokens left, as of `refilled`.
    tokens: f64,
    refilled: Instant,
}

impl Limits {
    /// The limits of a validated configuration. `reconnect_after_ms` is `server`'s.
    pub fn new(config: &LimitsConfig, reconnect_after_ms: u64) -> Self {
        let trusted = config.trusted_proxies.iter().filter_map(|p| parse_net(p).ok()).collect();
        Limits {
            inner: Arc::new(Inner {
                config: config.clone(),
                trusted,
                reconnect_after_ms: reconnect_after_ms.max(1),
                ..Inner::default()
            }),
        }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.inner.config
    }

    /// The address the per-address limits count for a request from `peer`: the peer itself,
    /// or, when it is a trusted proxy, the rightmost `X-Forwarded-For` entry that is not one
    /// (then `X-Real-IP`), since entries further left are written by the client.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.inner.trusted.iter().any(|n| n.contains(ip));
        let peer = canonical(peer.ip());
        if !trusted(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        let mut last_trusted = None;
        for entry in forwarded.iter().rev() {
            let Some(ip) = crate::access::parse_ip(entry).map(canonical) else {
                // A garbled entry: whatever is left of it was written by the client.
                break;
            };
            if !trusted(&ip) {
                return ip;
            }
            last_trusted = Some(ip);
        }
        if forwarded.is_empty()
            && let Some(ip) = headers
                .get("x-real-ip")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::access::parse_ip)
        {
            return canonical(ip);
        }
        last_trusted.unwrap_or(peer)
    }

    /// Admits a new client connection from `ip`, or says which limit refuses it. The slot
    /// holds its place in the address's count until dropped.
    pub fn admit_ip(&self, ip: IpAddr) -> Result<IpSlot, LimitRefusal> {
        let inner = &self.inner;
        let per_ip = inner.config.connections_per_ip;
        let rate = inner.config.new_connections_per_ip_per_s;
        if per_ip == 0 && rate <= 0.0 {
            return Ok(IpSlot(None));
        }
        let key = address_key(ip);
        let mut shard = inner.shard(&key).lock();
        let now = Instant::now();
        let capacity = rate.max(1.0);
        if !shard.contains_key(&key) {
            if inner.tracked.load(Relaxed) >= MAX_TRACKED_ADDRESSES {
                inner.counters.untracked.fetch_add(1, Relaxed);
                return Ok(IpSlot(None));
            }
            inner.tracked.fetch_add(1, Relaxed);
        }
        let entry =
            shard.entry(key).or_insert(IpEntry { open: 0, tokens: capacity, refilled: now });
        if per_ip > 0 && entry.open >= per_ip {
            inner.counters.connections_per_ip.fetch_add(1, Relaxed);
            return Err(LimitRefusal {
                limit: "connections_per_ip",
                message: format!(
                    "{ip} already holds {per_ip} connections (limits.connections_per_ip); \
                     close one or try again later"
                ),
                retry_after_ms: inner.jittered(inner.reconnect_after_ms),
            });
        }
        if rate > 0.0 {
            let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * rate).min(capacity);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                inner.counters.new_connections_per_ip.fetch_add(1, Relaxed);
                let wait_ms = ((1.0 - entry.tokens) / rate * 1000.0).ceil() as u64;
                let refusal = LimitRefusal {
                    limit: "new_connections_per_ip_per_s",
                    message: format!(
                        "{ip} opens connections faster than {rate} per second \
                         (limits.new_connections_per_ip_per_s); try again later"
                    ),
                    retry_after_ms: inner.jittered(wait_ms.max(1)),
                };
                return Err(refusal);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(IpSlot(Some((self.inner.clone(), key))))
    }

    /// Takes a place among `user`'s connections, or refuses with `connections_per_user`.
    pub fn user_slot(&self, user: &str) -> Result<UserSlot, LimitRefusal> {
        let inner = &self.inner;
        let max = inner.config.connections_per_user;
        if max == 0 || user.is_empty() {
            return Ok(UserSlot(None));
        }
        let mut users = inner.users.lock();
        let open = users.entry(user.to_owned()).or_default();
        if *open >= max {
            inner.counters.connections_per_user.fetch_add(1, Relaxed);
            let refusal = LimitRefusal {
                limit: "connections_per_user",
                message: format!(
                    "user {user:?} already holds {max} connections (limits.connections_per_user)"
                ),
                retry_after_ms: inner.jittered(inner.reconnect_after_ms),
            };
            if *open == 0 {
                users.remove(user);
            }
            return Err(refusal);
        }
        *open += 1;
        Ok(UserSlot(Some((self.inner.clone(), user.to_owned()))))
    }

    /// A request budget for a new connection.
    pub fn command_bucket(&self) -> CommandBucket {
        let c = &self.inner.config;
        CommandBucket::new(c.commands_per_s, c.commands_burst)
    }

    /// Counts a request refused with `rate_limited`.
    pub fn count_command_refusal(&self) {
        self.inner.counters.commands.fetch_add(1, Relaxed);
    }

    /// Counts a connection closed with 4029.
    pub fn count_rate_close(&self) {
        self.inner.counters.closed_4029.fetch_add(1, Relaxed);
    }

    /// Forgets addresses that hold no connection and whose bucket is full again.
    pub fn sweep(&self) -> usize {
        let inner = &self.inner;
        let rate = inner.config.new_connections_per_ip_per_s;
        let refill =
            if rate > 0.0 { Duration::from_secs_f64(rate.max(1.0) / rate) } else { Duration::ZERO };
        let now = Instant::now();
        let mut removed = 0;
        for shard in &inner.shards {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, e| e.open > 0 || now.saturating_duration_since(e.refilled) < refill);
            removed += before - shard.len();
            inner.tracked.fetch_sub(before - shard.len(), Relaxed);
            if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
                shard.shrink_to_fit();
            }
        }
        removed
    }

    /// Addresses currently tracked.
    pub fn tracked_addresses(&self) -> usize {
        self.inner.tracked.load(Relaxed)
    }

    /// The `ferrocast_limits_*` metric families.
    pub fn render_metrics(&self) -> String {
        let c = &self.inner.counters;
        let mut out = String::new();
        family(
            &mut out,
            "ferrocast_limits_refused_total",
            "counter",
            "Connections and requests refused by a [limits] limit, by limit.",
        );
        for (limit, n) in [
            ("connections_per_ip", &c.connections_per_ip),
            ("new_connections_per_ip_per_s", &c.new_connections_per_ip),
            ("connections_per_user", &c.connections_per_user),
            ("commands_per_s", &c.commands),
        ] {
            let _ = writeln!(
                out,
                "ferrocast_limits_refused_total{{limit=\"{limit}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_limits_rate_closed_total",
            "counter",
            "Connections closed with 4029 for sending on after being rate limited.",
        );
        let _ = writeln!(out, "ferrocast_limits_rate_closed_total {}", c.closed_4029.load(Relaxed));
        family(
            &mut out,
            "ferrocast_limits_tracked_addresses",
            "gauge",
            "Client addresses (IPv4, IPv6 /64) the per-address limits hold state for.",
        );
        let _ = writeln!(out, "ferrocast_limits_tracked_addresses {}", self.tracked_addresses());
        family(
            &mut out,
            "ferrocast_limits_untracked_total",
            "counter",
            "Connections let through uncounted because the address table was full.",
        );
        let _ = writeln!(out, "ferrocast_limits_untracked_total {}", c.untracked.load(Relaxed));
        let users = self.inner.users.lock().len();
        family(
            &mut out,
            "ferrocast_limits_tracked_users",
            "gauge",
            "Users with connections counted by limits.connections_per_user.",
        );
        let _ = writeln!(out, "ferrocast_limits_tracked_users {users}");
        out
    }
}

impl Inner {
    fn shard(&self, key: &Ipv6Addr) -> &Mutex<HashMap<Ipv6Addr, IpEntry>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// A delay between `ms` and twice that, so refused clients do not return in one wave.
    fn jittered(&self, ms: u64) -> u64 {
        rand::rng().random_range(ms..=ms.saturating_mul(2))
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The table key: an IPv4 address as its mapped IPv6 form, an IPv6 address cut to its /64.
fn address_key(ip: IpAddr) -> Ipv6Addr {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)
        }
    }
}

/// A client connection's place in its address's count (nothing when no per-address limit
/// is set, or the table was full).
#[derive(Debug)]
pub struct IpSlot(Option<(Arc<Inner>, Ipv6Addr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((inner, key)) = self.0.take() else { return };
        let mut shard = inner.shard(&key).lock();
        if let Some(entry) = shard.get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

/// A connection's place among its user's connections.
#[derive(Debug)]
pub struct UserSlot(Option<(Arc<Inner>, String)>);

impl Drop for UserSlot {
    fn drop(&mut self) {
        let Some((inner, user)) = self.0.take() else { return };
        let mut users = inner.users.lock();
        if let Some(open) = users.get_mut(&user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                users.remove(&user);
            }
        }
    }
}

/// What [`CommandBucket::take`] decided about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the budget: carry it out.
    Allowed,
    /// Over the budget: refuse it with `rate_limited`.
    Limited,
    /// Over the budget, and the connection kept sending while refused: close it with 4029.
    Abusive,
}

/// One connection's request budget: a token bucket of `burst` requests refilled at `rate`
/// per second, and a second one of refusals, refilled at the same rate, whose exhaustion
/// means the client is not backing off.
#[derive(Debug, Clone)]
pub struct CommandBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Refusals not yet forgiven.
    refused: f64,
    updated: Instant,
}

impl CommandBucket {
    /// A bucket for `rate` requests per second (0: unlimited) with `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        CommandBucket { rate, burst, tokens: burst, refused: 0.0, updated: Instant::now() }
    }

    /// Takes one request at `now`.
    pub fn take(&mut self, now: Instant) -> Verdict {
        if self.rate <= 0.0 {
            return Verdict::Allowed;
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refused = (self.refused - elapsed * self.rate).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        self.refused += 1.0;
        if self.refused > self.burst { Verdict::Abusive } else { Verdict::Limited }
    }

    /// The configured sustained rate (0: unlimited) and burst, for messages.
    pub fn describe(&self) -> (f64, u32) {
        (self.rate, self.burst as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut LimitsConfig)) -> Limits {
        let mut c = LimitsConfig::default();
        f(&mut c);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        Limits::new(&c, 1000)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn concurrent_connections_per_address_are_counted_until_the_slot_drops() {
        let l = limits(|c| c.connections_per_ip = 2);
        let a = l.admit_ip(ip("192.0.2.1")).unwrap();
        let _b = l.admit_ip(ip("192.0.2.1")).unwrap();
        let refusal = l.admit_ip(ip("192.0.2.1")).unwrap_err();
        assert_eq!(refusal.limit, "connections_per_ip");
        assert!(refusal.message.contains("limits.connections_per_ip"), "{}", refusal.message);
        assert!((1000..=2000).contains(&refusal.retry_after_ms));
        // Another address is not affected; an IPv4-mapped IPv6 address is the same address.
        let _c = l.admit_ip(ip("192.0.2.2")).unwrap();
        assert!(l.admit_ip(ip("::ffff:192.0.2.1")).is_err());
        drop(a);
        let _d = l.admit_ip(ip("192.0.2.1")).unwrap();
    }

    #[test]
    fn ipv6_addresses_are_counted_per_64() {
        let l = limits(|c| c.connections_per_ip = 1);
        let _a = l.admit_ip(ip("2001:db8:1:2::1")).unwrap();
        assert!(l.admit_ip(ip("2001:db8:1:2:ffff::9")).is_err());
        let _b = l.admit_ip(ip("2001:db8:1:3::1")).unwrap();
    }

    #[test]
    fn new_connections_follow_a_token_bucket() {
        let l = limits(|c| c.new_connections_per_ip_per_s = 2.0);
        let _a = l.admit_ip(ip("192.0.2.1")).unwrap();
        let _b = l.admit_ip(ip("192.0.2.1")).unwrap();
        let refusal = l.admit_ip(ip("192.0.2.1")).unwrap_err();
        assert_eq!(refusal.limit, "new_connections_per_ip_per_s");
        // About half a second until the next token, jittered up to twice that.
        assert!((1..=1000).contains(&refusal.retry_after_ms), "{}", refusal.retry_after_ms);
        assert!(refusal.close_reason().len() <= 123, "{}", refusal.close_reason());
        let hint: serde_json::Value = serde_json::from_str(&refusal.close_reason()).unwrap();
        assert_eq!(hint["limit"], "limits.new_connections_per_ip_per_s");
        assert_eq!(hint["reconnect"], true);
        // Time refills it.
        let key = address_key(ip("192.0.2.1"));
        l.inner.shard(&key).lock().get_mut(&key).unwrap().refilled -= Duration::from_secs(1);
        let _c = l.admit_ip(ip("192.0.2.1")).unwrap();
    }

    #[test]
    fn idle_addresses_are_forgotten() {
        let l = limits(|c| {
            c.connections_per_ip = 5;
            c.new_connections_per_ip_per_s = 10.0;
        });
        let held = l.admit_ip(ip("192.0.2.1")).unwrap();
        drop(l.admit_ip(ip("192.0.2.2")).unwrap());
        assert_eq!(l.tracked_addresses(), 2);
        for shard in &l.inner.shards {
            for e in shard.lock().values_mut() {
                e.refilled -= Duration::from_secs(2);
            }
        }
        assert_eq!(l.sweep(), 1);
        assert_eq!(l.tracked_addresses(), 1, "the address holding a connection stays");
        drop(held);
        assert_eq!(l.sweep(), 1);
        assert_eq!(l.tracked_addresses(), 0);
    }

    #[test]
    fn no_per_address_limit_tracks_nothing() {
        let l = limits(|_| {});
        let _a = l.admit_ip(ip("192.0.2.1")).unwrap();
        assert_eq!(l.tracked_addresses(), 0);
    }

    #[test]
    fn users_are_counted_until_the_slot_drops() {
        let l = limits(|c| c.connections_per_user = 1);
        let a = l.user_slot("42").unwrap();
        assert_eq!(l.user_slot("42").unwrap_err().limit, "connections_per_user");
        let _b = l.user_slot("43").unwrap();
        drop(a);
        let _c = l.user_slot("42").unwrap();
        // Anonymous connections are not users.
        let _d = l.user_slot("").unwrap();
        let _e = l.user_slot("").unwrap();
        assert_eq!(l.inner.users.lock().len(), 2);
    }

    #[test]
    fn commands_get_a_burst_then_the_rate_then_a_close() {
        let start = Instant::now();
        let mut b = CommandBucket::new(10.0, 5);
        for _ in 0..5 {
            assert_eq!(b.take(start), Verdict::Allowed);
        }
        assert_eq!(b.take(start), Verdict::Limited);
        // A tenth of a second buys one more.
        let later = start + Duration::from_millis(100);
        assert_eq!(b.take(later), Verdict::Allowed);
        assert_eq!(b.take(later), Verdict::Limited);
        // Refusals beyond a burst's worth, without backing off: abusive.
        let mut verdicts = Vec::new();
        for _ in 0..5 {
            verdicts.push(b.take(later));
        }
        assert_eq!(verdicts.last(), Some(&Verdict::Abusive), "{verdicts:?}");
        // A client that backs off is forgiven.
        let mut b = CommandBucket::new(10.0, 5);
        for _ in 0..5 {
            b.take(start);
        }
        for i in 0..100 {
            let at = start + Duration::from_millis(100 * i);
            assert_ne!(b.take(at), Verdict::Abusive);
        }
        assert_eq!(CommandBucket::new(0.0, 1).take(start), Verdict::Allowed);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_address_comes_from_trusted_proxies_only() {
        let l = limits(|c| c.trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()]);
        let direct: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let forged = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(l.client_ip(direct, &forged), ip("203.0.113.9"));
        assert_eq!(l.client_ip(proxy, &forged), ip("198.51.100.1"));
        // Read from the right, past every trusted hop; the client's own entries are ignored.
        let chain = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.1, 10.1.2.3")]);
        assert_eq!(l.client_ip(proxy, &chain), ip("198.51.100.1"));
        let split = headers(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "198.51.100.2")]);
        assert_eq!(l.client_ip(proxy, &split), ip("198.51.100.2"));
        let real_ip = headers(&[("x-real-ip", "198.51.100.3")]);
        assert_eq!(l.client_ip(proxy, &real_ip), ip("198.51.100.3"));
        assert_eq!(l.client_ip(proxy, &HeaderMap::new()), ip("127.0.0.1"));
        let garbled = headers(&[("x-forwarded-for", "nonsense")]);
        assert_eq!(l.client_ip(proxy, &garbled), ip("127.0.0.1"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut c = LimitsConfig {
            commands_burst: 0,
            new_connections_per_ip_per_s: -1.0,
            ..LimitsConfig::default()
        };
        c.trusted_proxies.push("10.0.0.0/33".into());
        let keys: Vec<String> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "limits.new_connections_per_ip_per_s",
                "limits.commands_burst",
                "limits.trusted_proxies[2]"
            ]
        );
    }
}
