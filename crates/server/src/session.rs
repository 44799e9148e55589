//! The session model shared by every transport: one client's identity, subscriptions,
//! limits and outbound queue, and the handling of its requests against the hub.
//!
//! Transports only move bytes: `/ws` feeds text frames to [`Session::handle_text`], SSE's
//! control endpoint and Socket.IO events call the typed methods. Whatever the transport,
//! the same channels, permissions, limits and metrics apply.
//!
//! The `[limits]` decisions are made here too: [`admit_address`] for a new connection's
//! address, the user's count when a token first names the user ([`Session::authenticate`]),
//! and the request budget ([`Session::admit_request`], which `/ws` text frames, SSE control
//! requests and Socket.IO events all pass). A connection that keeps flooding after being
//! refused is condemned: it takes no more requests, and its transport closes it with 4029
//! when [`Session::must_close`] says so.
//!
//! Identity comes from [`Session::connect`] (a token presented with the opening request, or
//! the connect proxy's answer) and [`Session::authenticate`] (the `auth` op); every request
//! then passes [`permissions::decide`], and a `"proxy"` rule asks the application. The part
//! of the session other tasks touch (subscriptions, the server API's commands) is its
//! [`ConnHandle`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrocast_hub::{BrokerError, ConnQueue, Pending, PublishError, PublishKind, Published};
use ferrocast_protocol::server::{
    ChannelResult, PublishResult, SubscribeResults, encode_ack, encode_ack_with, encode_error,
    encode_pong,
};
use ferrocast_protocol::{
    ClientFrame, CloseCode, ErrorCode, FrameError, StreamPosition, parse_client_frame,
    validate_channel,
};
use serde_json::value::RawValue;

use crate::AppState;
use crate::auth::{Identity, Refusal};
use crate::limits::{self, CommandBucket, IpSlot, LimitRefusal, UserSlot};
use crate::metrics::{PublishSource, Transport};
use crate::permissions::{self, Action, Verdict, Who};
use crate::proxy::{self, Denied};
use crate::users::ConnHandle;

/// How many request errors per connection are logged before further ones are only counted.
const LOGGED_ERRORS_PER_CONNECTION: u32 = 5;

/// One client connection, whatever its transport.
#[derive(Debug)]
pub struct Session {
    app: Arc<AppState>,
    /// Internal connection id, used in logs and by the hub.
    pub conn_id: u64,
    pub transport: Transport,
    pub queue: Arc<ConnQueue>,
    /// What other tasks may touch: subscriptions, and the user for the server API.
    handle: Arc<ConnHandle>,
    /// Set when a `pong` arrives; the transport's heartbeat reads and clears it.
    pub pong_received: bool,
    errors_logged: u32,
    /// Who the connection is, once a token (or the connect proxy) was accepted. Boxed: most
    /// connections of a public dashboard have none, and every connection has a session.
    identity: Option<Box<Identity>>,
    /// What the subscribe and publish proxies are told about the connection (kept only when
    /// a proxy is configured).
    proxy_context: Option<Box<ProxyContext>>,
    connected_at: Instant,
    /// The request budget (`limits.commands_per_s`, `limits.commands_burst`).
    commands: CommandBucket,
    /// The connection's place in its address's and its user's counts.
    _address: Option<IpSlot>,
    _user: Option<UserSlot>,
}

/// Admits a new client connection from `peer` under the per-address limits (the client's
/// own address when `peer` is a trusted proxy). The slot is held for the connection's life
/// by its session ([`Session::hold_address`]).
pub fn admit_address(
    app: &AppState,
    peer: SocketAddr,
    headers: &axum::http::HeaderMap,
) -> Result<IpSlot, LimitRefusal> {
    let ip = app.limits.client_ip(peer, headers);
    app.limits.admit_ip(ip).inspect_err(|refusal| {
        tracing::info!(%peer, client = %ip, limit = refusal.limit, "refusing connection: {}", refusal.message);
    })
}

/// What a connection presented when it opened.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    /// A token from the header, the query or the cookie.
    pub token: Option<String>,
    /// The request headers named by `proxy.forward_headers`.
    pub headers: Vec<(String, String)>,
    /// The client's address (the TCP peer), kept only when a proxy is configured.
    pub client: String,
}

impl Credentials {
    /// The credentials of an opening request: the token (`Authorization: Bearer`, the
    /// `token` query parameter or the `auth.cookie` cookie) and what the proxy forwards.
    pub fn from_request(
        app: &AppState,
        headers: &http::HeaderMap,
        query: Option<&str>,
        peer: std::net::SocketAddr,
    ) -> Self {
        let proxied = app.proxy.any();
        Credentials {
            token: crate::auth::token_from_request(headers, query, &app.auth.cookie),
            headers: app.proxy.forwarded(headers),
            client: if proxied { peer.ip().to_string() } else { String::new() },
        }
    }
}

#[derive(Debug)]
struct ProxyContext {
    headers: Vec<(String, String)>,
    client: String,
}

/// Why a connection is refused at connect: the error for the client, if any, then the close
/// code and reason.
#[derive(Debug)]
pub struct ConnectRefusal {
    pub error: Option<FrameError>,
    pub code: u16,
    pub reason: String,
}

impl ConnectRefusal {
    /// A refused token or proxy answer: `unauthorized` closes with 4001, `forbidden` 4003,
    /// `token_expired` 4011 (get a new token), `unavailable` and `limit_exceeded` (the user
    /// holds `limits.connections_per_user` connections already) 1013 (try again later).
    pub fn from_error(error: FrameError) -> Self {
        let close = match error.code {
            ErrorCode::TokenExpired => CloseCode::TokenExpired,
            ErrorCode::Unauthorized => CloseCode::Unauthorized,
            ErrorCode::Unavailable | ErrorCode::LimitExceeded => CloseCode::TryAgainLater,
            _ => CloseCode::Forbidden,
        };
        ConnectRefusal { error: Some(error), code: close.code(), reason: close.reason().to_owned() }
    }

    /// The message a Socket.IO CONNECT_ERROR carries: `CODE: reason (CLOSE)`.
    pub fn connect_error_message(&self) -> String {
        match &self.error {
            Some(e) => format!("{}: {} ({})", e.code.as_str(), e.message, self.code),
            None => format!("disconnect: {} ({})", self.reason, self.code),
        }
    }
}

/// The answer to an accepted `auth`: `{"user":"42","expires_at":N}`.
#[derive(Debug, serde::Serialize)]
pub struct AuthResult {
    pub user: String,
    pub expires_at: Option<u64>,
    /// Results of the subscriptions made from the token's `channels` claim (first `auth` only).
    #[serde(skip_serializing_if = "SubscribeResults::is_empty")]
    pub channels: SubscribeResults,
}

impl Session {
    pub fn new(app: Arc<AppState>, transport: Transport) -> Self {
        let conn_id = app.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(ConnQueue::new(conn_id, app.config.server.queue_max_bytes));
        let handle =
            Arc::new(ConnHandle::new(conn_id, crate::random_id(16), transport, queue.clone()));
        let session = Session {
            conn_id,
            transport,
            queue,
            handle,
            pong_received: false,
            errors_logged: 0,
            identity: None,
            proxy_context: None,
            connected_at: Instant::now(),
            commands: app.limits.command_bucket(),
            _address: None,
            _user: None,
            app,
        };
        session.update_auth_due();
        session
    }

    /// Keeps the connection's place in its address's count (from [`admit_address`]) until
    /// the session ends.
    pub fn hold_address(&mut self, slot: IpSlot) {
        self._address = Some(slot);
    }

    /// Counts one client request against the connection's budget. Over it the request is
    /// refused with `rate_limited`; a client that keeps sending while refused is condemned
    /// (see [`Session::must_close`]) and its later requests are dropped unanswered.
    pub fn admit_request(&mut self) -> Result<(), FrameError> {
        if self.handle.is_condemned() {
            self.app.limits.count_command_refusal();
            return Err(FrameError::new(
                None,
                ErrorCode::RateLimited,
                "rate limited: this connection is being closed with 4029",
            ));
        }
        match self.commands.take(Instant::now()) {
            limits::Verdict::Allowed => Ok(()),
            verdict => {
                self.app.limits.count_command_refusal();
                if verdict == limits::Verdict::Abusive {
                    self.handle.condemn();
                    self.app.limits.count_rate_close();
                    tracing::info!(
                        conn = self.conn_id,
                        transport = self.transport.as_str(),
                        "the client keeps sending after being rate limited; closing with 4029"
                    );
                    // Wake the transport's writer, which closes the connection.
                    let wake = self.queue.reserve();
                    self.queue.fill(wake, Bytes::new());
                }
                let (rate, burst) = self.commands.describe();
                Err(FrameError::new(
                    None,
                    ErrorCode::RateLimited,
                    format!(
                        "more than {rate} requests per second (limits.commands_per_s, bursts of \
                         {burst}: limits.commands_burst); slow down, or the connection is closed \
                         with 4029"
                    ),
                ))
            }
        }
    }

    /// Whether the transport must close the connection now, with which code and reason:
    /// 4029 once the client kept flooding after being rate limited.
    pub fn must_close(&self) -> Option<(CloseCode, &'static str)> {
        self.handle.must_close()
    }

    /// The part of the session other tasks may touch; the Socket.IO and SSE writers read
    /// [`ConnHandle::must_close`] and [`ConnHandle::auth_deadline`] there.
    pub fn conn_handle(&self) -> &Arc<ConnHandle> {
        &self.handle
    }

    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    /// The public session id (sent in the welcome).
    pub fn id(&self) -> &str {
        &self.handle.session_id
    }

    /// Channels this session is subscribed to.
    pub fn subscribed_channels(&self) -> Vec<String> {
        self.handle.lock().subscriptions.iter().cloned().collect()
    }

    /// Whether this session is subscribed to `channel`.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.handle.lock().subscriptions.contains(channel)
    }

    /// Handles one text frame of the native protocol; replies go into the queue.
    pub fn handle_text(&mut self, text: &str) {
        if self.handle.is_condemned() {
            return;
        }
        let frame = parse_client_frame(text);
        // Pongs answer the server's heartbeat and cost nothing; every other frame, even a
        // malformed one, is a request.
        if !matches!(frame, Ok(ClientFrame::Pong))
            && let Err(e) = self.admit_request()
        {
            let id = match &frame {
                Ok(f) => f.id(),
                Err(e) => e.id,
            };
            if !self.handle.is_condemned() {
                let reply = self.error_frame(FrameError { id, ..e });
                self.push_control(reply);
            }
            return;
        }
        match frame {
            Ok(ClientFrame::Subscribe { id, channels, recover, tokens }) => {
                let reservation = self.queue.reserve();
                let reply = match self.subscribe_with_tokens(&channels, &recover, &tokens) {
                    Ok(results) => encode_ack_with(id, &results),
                    Err(e) => self.error_frame(FrameError { id, ..e }),
                };
                self.queue.fill(reservation, reply);
            }
            Ok(ClientFrame::Unsubscribe { id, channels }) => {
                let reply = match self.unsubscribe(&channels) {
                    Ok(()) => encode_ack(id),
                    Err(e) => self.error_frame(FrameError { id, ..e }),
                };
                self.push_control(reply);
            }
            Ok(ClientFrame::Publish { id, channel, data }) => {
                let started = Instant::now();
                match self.start_publish(&channel, data.get().as_bytes()) {
                    Ok(Pending::Ready(answer)) => {
                        let reply = match publish_result(&channel, answer) {
                            Ok(result) => encode_ack_with(id, &result),
                            Err(e) => self.error_frame(FrameError { id, ..e }),
                        };
                        self.push_control(reply);
                        self.publish_acked(started);
                    }
                    Ok(Pending::Later(answer)) => {
                        // The reader goes on at once; the ack takes its place in the queue
                        // now and is filled in when the broker answers.
                        let reservation = self.queue.reserve();
                        let queue = self.queue.clone();
                        let app = self.app.clone();
                        let channel = channel.into_owned();
                        let source = PublishSource::Client(self.transport);
                        tokio::spawn(async move {
                            let reply = match publish_result(&channel, answer.await) {
                                Ok(result) => encode_ack_with(id, &result),
                                Err(e) => {
                                    app.metrics.frame_error(e.code.as_str());
                                    encode_error(id, e.code, &e.message)
                                }
                            };
                            queue.fill(reservation, reply);
                            app.metrics.publish_acked(source, started.elapsed());
                        });
                    }
                    Err(e) => {
                        let reply = self.error_frame(FrameError { id, ..e });
                        self.push_control(reply);
                    }
                }
            }
            Ok(ClientFrame::Auth { id, token }) => {
                let reservation = self.queue.reserve();
                let reply = match self.authenticate(&token) {
                    Ok(result) => encode_ack_with(id, &result),
                    Err(e) => self.error_frame(FrameError { id, ..e }),
                };
                self.queue.fill(reservation, reply);
            }
            Ok(ClientFrame::Ping { id }) => self.push_control(encode_pong(id)),
            Ok(ClientFrame::Pong) => self.pong_received = true,
            Err(e) => {
                let reply = self.error_frame(e);
                self.push_control(reply);
            }
        }
    }

    /// Queues a reply. Replies count against the connection's byte budget: one that does
    /// not fit overflows the queue, and the writer closes the connection with 4008.
    fn push_control(&self, frame: Bytes) {
        if !self.queue.push_control(frame) {
            tracing::info!(
                conn = self.conn_id,
                transport = self.transport.as_str(),
                "replies exceed the outbound budget (server.queue_max_bytes): the client is not reading; closing with 4008"
            );
        }
    }

    /// Encodes an error reply, counting it and logging it (a few per connection).
    pub fn error_frame(&mut self, e: FrameError) -> Bytes {
        self.app.metrics.frame_error(e.code.as_str());
        if self.errors_logged < LOGGED_ERRORS_PER_CONNECTION {
            self.errors_logged += 1;
            tracing::info!(
                conn = self.conn_id,
                transport = self.transport.as_str(),
                code = e.code.as_str(),
                "refused client request: {}",
                e.message
            );
            if self.errors_logged == LOGGED_ERRORS_PER_CONNECTION {
                tracing::info!(
                    conn = self.conn_id,
                    "further refused requests on this connection are only counted"
                );
            }
        }
        encode_error(e.id, e.code, &e.message)
    }

    /// The connection's identity, once a token was accepted.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    fn who(&self) -> Who<'_> {
        Who { user: self.identity.as_ref().map(|i| i.user.as_str()) }
    }

    /// Counts and logs a refusal (never the token), and turns it into an error reply.
    fn refused(&self, what: &str, refusal: Refusal) -> FrameError {
        self.app.auth.count_refusal(refusal.reason);
        tracing::info!(
            conn = self.conn_id,
            transport = self.transport.as_str(),
            reason = refusal.reason,
            "{what} refused: {}",
            refusal.message
        );
        FrameError::new(None, refusal.code, refusal.message)
    }

    /// Decides who an opening connection is: the connect proxy's answer when
    /// `proxy.connect_url` is set (told the token, if any, unverified), otherwise the token
    /// presented with the request, if any. `Ok(None)`: no identity yet (an anonymous
    /// connection, or one that will send an `auth` op).
    pub async fn connect(
        &mut self,
        credentials: Credentials,
    ) -> Result<Option<AuthResult>, ConnectRefusal> {
        let app = self.app.clone();
        if app.proxy.any() {
            self.proxy_context = Some(Box::new(ProxyContext {
                headers: credentials.headers.clone(),
                client: credentials.client.clone(),
            }));
        }
        if !app.proxy.enabled(proxy::Kind::Connect) {
            let Some(token) = credentials.token else { return Ok(None) };
            let result =
                self.authenticate_with(&token, true).map_err(ConnectRefusal::from_error)?;
            return Ok(Some(result));
        }
        let request = self.proxy_request(credentials.token.as_deref(), None, None);
        // Boxed: the call's state (an HTTP client, maybe TLS) would otherwise be part of
        // every WebSocket task's future for the connection's whole life.
        let answer = Box::pin(app.proxy.call(proxy::Kind::Connect, &request)).await;
        let granted = match answer {
            Ok(granted) => granted,
            Err(Denied::Refused(refusal)) => {
                return Err(ConnectRefusal::from_error(self.refused("connect", refusal)));
            }
            Err(Denied::Disconnect { code, reason }) => {
                app.auth.count_refusal("proxy_disconnect");
                tracing::info!(
                    conn = self.conn_id,
                    transport = self.transport.as_str(),
                    code,
                    "connect refused by the proxy: {reason}"
                );
                return Err(ConnectRefusal { error: None, code, reason });
            }
        };
        let identity = Identity {
            user: granted.user.unwrap_or_default(),
            expires_at: granted.expire_at,
            info: granted.info,
            channels: granted.channels,
        };
        let result = self
            .accept_identity(identity, "connect proxy", true)
            .map_err(ConnectRefusal::from_error)?;
        Ok(Some(result))
    }

    /// Accepts a connection token (at connect or in an `auth` op): the first one sets the
    /// identity and subscribes the token's `channels`; later ones refresh the expiry and
    /// must name the same user. With no key to verify tokens but a connect proxy, the token
    /// is handed to the proxy instead.
    pub fn authenticate(&mut self, token: &str) -> Result<AuthResult, FrameError> {
        self.authenticate_with(token, false)
    }

    /// [`Session::authenticate`]; `notify`: tell the client about the channels subscribed
    /// with `subscribed` notices (at connect, where no ack carries the results).
    fn authenticate_with(&mut self, token: &str, notify: bool) -> Result<AuthResult, FrameError> {
        let identity = if !self.app.auth.enabled() && self.app.proxy.enabled(proxy::Kind::Connect) {
            let request = self.proxy_request(Some(token), None, None);
            match crate::block_on(self.app.proxy.call(proxy::Kind::Connect, &request)) {
                Ok(granted) => Identity {
                    user: granted.user.unwrap_or_default(),
                    expires_at: granted.expire_at,
                    info: granted.info,
                    channels: granted.channels,
                },
                Err(denied) => return Err(self.denied("token", denied)),
            }
        } else {
            self.app.auth.verify_connection(token).map_err(|r| self.refused("token", r))?
        };
        if let Some(current) = &self.identity
            && current.user != identity.user
        {
            let refusal = Refusal::new(
                "other_user",
                ErrorCode::Forbidden,
                "a refreshed token must be for the connection's user; reconnect to change user",
            );
            return Err(self.refused("token refresh", refusal));
        }
        self.accept_identity(identity, "token", notify)
    }

    /// Takes `identity` as the connection's (the first time: lists it under its user and
    /// subscribes its `channels`, which the token's signer or the application granted, so
    /// no namespace rule applies to them).
    fn accept_identity(
        &mut self,
        identity: Identity,
        source: &str,
        notify: bool,
    ) -> Result<AuthResult, FrameError> {
        let first = self.identity.is_none();
        if first {
            // The user's connection count: a refusal leaves the connection anonymous.
            let slot = self.app.limits.user_slot(&identity.user).map_err(|refusal| {
                tracing::info!(
                    conn = self.conn_id,
                    transport = self.transport.as_str(),
                    limit = refusal.limit,
                    "token refused: {}",
                    refusal.message
                );
                FrameError::new(None, ErrorCode::LimitExceeded, refusal.message)
            })?;
            self._user = Some(slot);
        }
        let result_user = identity.user.clone();
        let expires_at = identity.expires_at;
        let channels = identity.channels.clone();
        tracing::info!(
            conn = self.conn_id,
            transport = self.transport.as_str(),
            user = identity.user.as_str(),
            expires_at,
            refresh = !first,
            "{source} accepted"
        );
        if first {
            let mut state = self.handle.lock();
            state.info = identity.info.clone().map(Box::new);
            if !identity.user.is_empty() {
                state.user = Some(identity.user.clone());
                drop(state);
                self.app.users.add(&identity.user, &self.handle);
            }
        }
        self.identity = Some(Box::new(identity));
        self.update_auth_due();
        let mut results = SubscribeResults::new();
        if first && !channels.is_empty() {
            results = self.subscribe_granted(&channels, notify);
        }
        Ok(AuthResult { user: result_user, expires_at, channels: results })
    }

    /// What the proxy is told about this connection.
    fn proxy_request<'a>(
        &'a self,
        token: Option<&'a str>,
        channel: Option<&'a str>,
        data: Option<&'a RawValue>,
    ) -> proxy::Request<'a> {
        let context = self.proxy_context.as_deref();
        proxy::Request {
            transport: match self.transport {
                Transport::Ws => "websocket",
                other => other.as_str(),
            },
            client: context.map_or("", |c| c.client.as_str()),
            headers: context
                .map(|c| c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
                .unwrap_or_default(),
            token,
            user: self.identity.as_ref().map(|i| i.user.as_str()).filter(|u| !u.is_empty()),
            info: self.identity.as_ref().and_then(|i| i.info.as_ref()),
            session: Some(self.id()),
            channel,
            data,
        }
    }

    /// A proxy's refusal as an error reply; a `disconnect` answer also closes the connection.
    fn denied(&self, what: &str, denied: Denied) -> FrameError {
        match denied {
            Denied::Refused(refusal) => self.refused(what, refusal),
            Denied::Disconnect { code, reason } => {
                self.app.auth.count_refusal("proxy_disconnect");
                tracing::info!(
                    conn = self.conn_id,
                    transport = self.transport.as_str(),
                    code,
                    "{what} refused by the proxy, which disconnects the connection: {reason}"
                );
                self.queue.request_close(code, &reason);
                FrameError::new(None, ErrorCode::Forbidden, reason)
            }
        }
    }

    /// When the connection must be closed for want of a (fresh) token: see
    /// [`ConnHandle::auth_deadline`].
    pub fn auth_deadline(&self) -> Option<(Instant, CloseCode, &'static str)> {
        self.handle.auth_deadline()
    }

    /// Recomputes the deadline [`Session::auth_deadline`] reads, once the identity changed.
    fn update_auth_due(&self) {
        let auth = &self.app.auth;
        let due = match &self.identity {
            None if !auth.anonymous => Some((
                self.connected_at + Duration::from_millis(auth.auth_timeout_ms),
                CloseCode::Unauthorized,
            )),
            None => None,
            Some(identity) => identity.expires_at.map(|exp| {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let due_ms = (exp * 1000 + auth.expiry_grace_ms).saturating_sub(now_ms);
                (Instant::now() + Duration::from_millis(due_ms), CloseCode::TokenExpired)
            }),
        };
        self.handle.lock().auth_due = due;
    }

    /// Subscribes to `channels`, recovering those with a position in `recover`. Replayed and
    /// snapshot messages go into the queue; the per-channel results are returned.
    pub fn subscribe<S: AsRef<str>>(
        &mut self,
        channels: &[S],
        recover: &BTreeMap<String, StreamPosition>,
    ) -> Result<SubscribeResults, FrameError> {
        self.subscribe_with_tokens(channels, recover, &BTreeMap::new())
    }

    /// [`Session::subscribe`] with subscription tokens by channel (`subscribe = "token"`).
    /// Each channel passes [`permissions::decide`] first: a refused one gets its error in
    /// its result, and neither recovery nor snapshot.
    pub fn subscribe_with_tokens<S: AsRef<str>>(
        &mut self,
        channels: &[S],
        recover: &BTreeMap<String, StreamPosition>,
        tokens: &BTreeMap<String, String>,
    ) -> Result<SubscribeResults, FrameError> {
        let limits = &self.app.config.server;
        if channels.is_empty() {
            return Err(FrameError::new(None, ErrorCode::BadRequest, "\"channels\" is empty"));
        }
        if channels.len() > limits.max_channels_per_request {
            return Err(FrameError::new(
                None,
                ErrorCode::TooManyChannels,
                format!(
                    "{} channels in one request; the limit is {} (server.max_channels_per_request)",
                    channels.len(),
                    limits.max_channels_per_request
                ),
            ));
        }
        let mut results = SubscribeResults::new();
        for channel in channels {
            let channel = channel.as_ref();
            let result = if let Err(e) = validate_channel(channel) {
                self.app.metrics.frame_error(ErrorCode::InvalidChannel.as_str());
                ChannelResult::failed(ErrorCode::InvalidChannel, e.to_string())
            } else if let Err(e) =
                self.may_subscribe(channel, tokens.get(channel).map(String::as_str))
            {
                self.app.metrics.frame_error(e.code.as_str());
                ChannelResult::failed(e.code, e.message)
            } else {
                self.join(channel, recover.get(channel))
            };
            results.insert(channel.to_owned(), result);
        }
        Ok(results)
    }

    /// Subscribes channels the server grants by itself (a token's or the connect proxy's
    /// `channels`): names are checked, namespace rules are not. With `notify`, each result
    /// also goes to the client as a `subscribed` notice, ahead of the channel's messages.
    pub fn subscribe_granted<S: AsRef<str>>(
        &mut self,
        channels: &[S],
        notify: bool,
    ) -> SubscribeResults {
        let mut results = SubscribeResults::new();
        for channel in channels {
            let channel = channel.as_ref();
            let reservation = notify.then(|| self.queue.reserve());
            let result = match validate_channel(channel) {
                Err(e) => ChannelResult::failed(ErrorCode::InvalidChannel, e.to_string()),
                Ok(()) => self.join(channel, None),
            };
            if let Some(reservation) = reservation {
                let notice = ferrocast_protocol::server::encode_subscribed(channel, &result);
                self.queue.fill(reservation, notice);
            }
            results.insert(channel.to_owned(), result);
        }
        results
    }

    /// Whether this connection may subscribe to `channel`: the rules, then the subscribe
    /// proxy where the namespace says so.
    fn may_subscribe(&mut self, channel: &str, token: Option<&str>) -> Result<(), FrameError> {
        let verdict = permissions::decide(
            &self.app.auth,
            self.app.hub.namespace(channel),
            self.who(),
            channel,
            Action::Subscribe { token },
        )
        .map_err(|r| self.refused(&format!("subscribe to {channel:?}"), r))?;
        if verdict == Verdict::AskProxy {
            let app = self.app.clone();
            if !app.proxy.enabled(proxy::Kind::Subscribe) {
                return Err(
                    self.refused(&format!("subscribe to {channel:?}"), no_proxy("subscribe"))
                );
            }
            let request = self.proxy_request(token, Some(channel), None);
            crate::block_on(app.proxy.call(proxy::Kind::Subscribe, &request))
                .map_err(|d| self.denied(&format!("subscribe to {channel:?}"), d))?;
        }
        Ok(())
    }

    /// Joins `channel` (allowed already): the subscription limit, the broker, the hub.
    fn join(&mut self, channel: &str, recover: Option<&StreamPosition>) -> ChannelResult {
        let max = self.app.config.server.max_subscriptions;
        {
            let state = self.handle.lock();
            if !state.subscriptions.contains(channel) && state.subscriptions.len() >= max {
                drop(state);
                self.app.metrics.frame_error(ErrorCode::LimitExceeded.as_str());
                return ChannelResult::failed(
                    ErrorCode::LimitExceeded,
                    format!(
                        "this connection already holds {max} subscriptions (server.max_subscriptions)"
                    ),
                );
            }
        }
        if let Err(e) = self.prepare(channel, recover) {
            self.app.metrics.frame_error(ErrorCode::Unavailable.as_str());
            return ChannelResult::failed(ErrorCode::Unavailable, e.to_string());
        }
        let mut state = self.handle.lock();
        let sub = self.app.hub.subscribe(channel, &self.queue, recover);
        if sub.added {
            state.subscriptions.insert(channel.to_owned());
        }
        sub.result
    }

    /// Lets the broker bring the channel's local copy up to date before the hub answers the
    /// subscribe (the Redis broker subscribes this node and reads the history a recovery or
    /// snapshot needs). Immediate with the memory broker.
    fn prepare(&self, channel: &str, recover: Option<&StreamPosition>) -> Result<(), BrokerError> {
        match self.app.broker.prepare_subscribe(channel, recover) {
            None => Ok(()),
            Some(future) => crate::wait_for_broker(Pending::Later(future)),
        }
    }

    /// Unsubscribes from `channels` (channels not subscribed are ignored).
    pub fn unsubscribe<S: AsRef<str>>(&mut self, channels: &[S]) -> Result<(), FrameError> {
        if channels.len() > self.app.config.server.max_channels_per_request {
            return Err(FrameError::new(
                None,
                ErrorCode::TooManyChannels,
                format!(
                    "{} channels in one request; the limit is {}",
                    channels.len(),
                    self.app.config.server.max_channels_per_request
                ),
            ));
        }
        let mut state = self.handle.lock();
        for channel in channels {
            if state.subscriptions.remove(channel.as_ref()) {
                self.app.hub.unsubscribe(channel.as_ref(), self.conn_id);
            }
        }
        Ok(())
    }

    /// Publishes from the client, where the namespace allows it, waiting for the answer.
    pub fn publish(&self, channel: &str, data: &[u8]) -> Result<PublishResult, FrameError> {
        let started = Instant::now();
        let pending = self.start_publish(channel, data)?;
        let result = publish_result(channel, crate::wait_for_broker(pending));
        self.publish_acked(started);
        result
    }

    /// Counts an answered client publish in the ack latency histogram.
    fn publish_acked(&self, started: Instant) {
        let source = PublishSource::Client(self.transport);
        self.app.metrics.publish_acked(source, started.elapsed());
    }

    /// Checks a client publish and hands it to the broker; the answer may come later (see
    /// [`publish_result`]). Publishes started in order are carried out in order.
    pub fn start_publish(
        &self,
        channel: &str,
        data: &[u8],
    ) -> Result<Pending<Result<Published, BrokerError>>, FrameError> {
        validate_channel(channel)
            .map_err(|e| FrameError::new(None, ErrorCode::InvalidChannel, e.to_string()))?;
        let verdict = permissions::decide(
            &self.app.auth,
            self.app.hub.namespace(channel),
            self.who(),
            channel,
            Action::Publish,
        )
        .map_err(|r| self.refused(&format!("publish to {channel:?}"), r))?;
        self.app.check_data_depth(data)?;
        if verdict == Verdict::AskProxy {
            let what = format!("publish to {channel:?}");
            if !self.app.proxy.enabled(proxy::Kind::Publish) {
                return Err(self.refused(&what, no_proxy("publish")));
            }
            let raw = std::str::from_utf8(data)
                .ok()
                .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
                .ok_or_else(|| {
                    FrameError::new(None, ErrorCode::BadRequest, "\"data\" is not JSON")
                })?;
            let request = self.proxy_request(None, Some(channel), Some(raw));
            let granted = crate::block_on(self.app.proxy.call(proxy::Kind::Publish, &request))
                .map_err(|d| self.denied(&what, d))?;
            if let Some(replaced) = granted.data {
                self.app.check_data_depth(replaced.get().as_bytes())?;
                return Ok(self.app.broker.publish(
                    channel,
                    replaced.get().as_bytes(),
                    PublishKind::Retained,
                ));
            }
        }
        Ok(self.app.broker.publish(channel, data, PublishKind::Retained))
    }
}

/// The reply to a client publish, from the broker's answer.
pub fn publish_result(
    channel: &str,
    answer: Result<Published, BrokerError>,
) -> Result<PublishResult, FrameError> {
    let published = answer.map_err(|e| {
        let code = match e {
            BrokerError::Publish(PublishError::InvalidChannel(_)) => ErrorCode::InvalidChannel,
            BrokerError::Publish(PublishError::ChannelLimit(_)) => ErrorCode::ChannelLimit,
            BrokerError::Unavailable(_) => ErrorCode::Unavailable,
        };
        FrameError::new(None, code, e.to_string())
    })?;
    Ok(PublishResult {
        channel: channel.to_owned(),
        offset: published.offset,
        epoch: published.epoch.to_string(),
    })
}

/// A `"proxy"` rule without its URL (the config check prevents it; kept for safety).
fn no_proxy(kind: &str) -> Refusal {
    Refusal::new(
        "proxy_unavailable",
        ErrorCode::Unavailable,
        format!("the namespace's rule is \"proxy\" but proxy.{kind}_url is not set"),
    )
}

impl Drop for Session {
    /// Leaves every channel and the user's list, so the hub and the server API never keep a
    /// dead connection.
    fn drop(&mut self) {
        let mut state = self.handle.lock();
        state.closed = true;
        for channel in state.subscriptions.drain() {
            self.app.hub.unsubscribe(&channel, self.conn_id);
        }
        if let Some(user) = state.user.take() {
            drop(state);
            self.app.users.remove(&user, self.conn_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WebSocket task keeps its `serve` future, and so the connect future's state, for the
    /// connection's whole life: the proxy call inside must stay behind a pointer.
    #[test]
    fn the_connect_future_stays_small() {
        let app = crate::AppState::new(crate::Config::default(), None);
        let mut session = Session::new(app, Transport::Ws);
        let future = session.connect(Credentials::default());
        assert!(std::mem::size_of_val(&future) <= 512, "{} bytes", std::mem::size_of_val(&future));
    }
}
