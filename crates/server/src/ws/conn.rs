//! One native WebSocket connection after the upgrade: a single task that reads client
//! frames, writes queued frames, and runs the heartbeat.
//!
//! Reads wait for readiness and then read into a stack buffer, so an idle connection holds
//! no read buffer; writes hand every queued frame to one vectored write (headers built on the
//! fly, payloads shared with every other subscriber), and a write buffer exists only while
//! the socket pushes back. Over TLS or an HTTP/2 stream the same calls go through the small
//! buffers of [`super::socket`].

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferrocast_hub::{ConnQueue, Drained, Outbound};
use ferrocast_protocol::CloseCode;
use ferrocast_protocol::server::{PING_FRAME, encode_welcome};
use rand::Rng;
use tokio::time::{Instant as TokioInstant, sleep_until};

use super::deflate;
use super::frame::{self, Decoder, Incoming};
use super::socket::Socket;
use crate::AppState;
use crate::connections::ConnCount;
use crate::limits::IpSlot;
use crate::metrics::{LocalHistogram, Transport};
use crate::session::{Credentials, Session};
use crate::shutdown::ConnectionGuard;

/// How long to wait for the client's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// After failing a connection, how long to keep the half-closed socket for the client's close
/// frame or FIN (so its last bytes do not meet a reset); the client sees our FIN at once.
const FAILED_LINGER: Duration = Duration::from_millis(500);
/// Most frames per vectored write (each takes two slices; Linux allows 1024).
const FRAMES_PER_WRITE: usize = 256;
/// Most socket reads between two yields to the scheduler, so a flooding client cannot starve
/// the others.
const READS_PER_WAKE: usize = 16;
/// Most client requests handled between two yields: a client pipelining thousands of tiny
/// requests yields its worker thread between batches instead of holding it for the whole
/// burst.
///
/// Both count since the last yield, not per read: a client that keeps data arriving gets
/// short reads that each leave the socket readable, and the task would otherwise loop for as
/// long as the flood lasts without ever returning to the runtime. Meanwhile tokio polls
/// I/O and timers only between tasks (the runtime's other worker may be asleep), so every
/// other connection would wait for the flood to pause.
const REQUESTS_PER_WAKE: usize = 128;

/// Why a connection is being admitted or refused right after the handshake.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    Accept,
    Refuse(CloseCode),
    /// Refused by a `[limits]` limit: 1013 with a JSON reconnect hint naming it.
    Limited(crate::limits::LimitRefusal),
}

/// A frame part waiting to be written: a header and a shared payload, or a raw frame.
struct Part {
    header: [u8; 10],
    header_len: u8,
    body: Bytes,
}

fn text_part(body: Bytes) -> Part {
    let mut header = [0u8; 10];
    let header_len = frame::encode_header(frame::OP_TEXT, body.len(), &mut header) as u8;
    Part { header, header_len, body }
}

/// A text frame whose payload is a permessage-deflate compressed message (RSV1 set).
fn compressed_part(body: Bytes) -> Part {
    let mut part = text_part(body);
    part.header[0] |= frame::RSV1;
    part
}

/// What the handshake decided about a connection.
#[derive(Debug)]
pub struct Start {
    pub admission: Admission,
    pub credentials: Box<Credentials>,
    /// permessage-deflate was negotiated.
    pub deflate: bool,
    pub peer: String,
    /// The connection's place in its address's count, held until the session ends.
    pub ip_slot: Option<IpSlot>,
    /// Its place in the total (`server.max_connections`), held until the socket closes
    /// (a TLS or HTTP/2 stream holds its own).
    pub counted: Option<ConnCount>,
}

/// Builds one connection and returns the future that serves it to completion.
///
/// The connection is built here, before the future, so that the future (kept in its task
/// for the connection's whole life) holds it once, not also the pieces it was made from:
/// an `async fn` keeps its arguments beside its locals. Spawn the result as a task of its
/// own for the same reason (see `ws::upgrade`).
pub fn run(
    app: Arc<AppState>,
    stream: Socket,
    already_read: Bytes,
    start: Start,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + Send + 'static {
    let Start { admission, credentials, deflate, peer, ip_slot, counted } = start;
    let _ = stream.set_nodelay(true);
    let max_frame = app.config.server.max_frame_bytes;
    let session = Session::new(app.clone(), Transport::Ws);
    if deflate {
        session.queue.want_forms();
    }
    let mut conn = Conn {
        decoder: if deflate { Decoder::with_deflate(max_frame) } else { Decoder::new(max_frame) },
        deflate,
        session,
        stream,
        parts: VecDeque::new(),
        release_parts: true,
        written: 0,
        pending_bytes: 0,
        pong_due: None,
        paused_since: None,
        reads_since_yield: 0,
        requests_since_yield: 0,
        closing: None,
        close_code: None,
        failed: false,
        write_shut: false,
        auth_due: None,
        app,
    };
    if let Some(slot) = ip_slot {
        conn.session.hold_address(slot);
    }
    let conn_id = conn.session.conn_id;
    conn.app.metrics.connection_opened(Transport::Ws);
    // Bytes hyper read past the handshake: usually none, but the handle may pin hyper's whole
    // read buffer, so feed and release it before the connection settles into its idle state.
    if admission == Admission::Accept && !already_read.is_empty() {
        // A close frame among them is answered by the serve loop, which flushes it first.
        let _ = conn.feed(&already_read);
    }
    drop(already_read);
    async move {
        let _held = (guard, counted);
        let code = conn.serve(admission, credentials).await;
        conn.app.metrics.connection_closed(Transport::Ws, code);
        tracing::debug!(conn = conn_id, peer, code, "websocket closed");
    }
}

struct Conn {
    app: Arc<AppState>,
    session: Session,
    stream: Socket,
    decoder: Decoder,
    /// permessage-deflate was negotiated: messages of compressing namespaces go compressed.
    deflate: bool,
    /// Frames handed to the socket but not fully written yet.
    parts: VecDeque<Part>,
    /// The last drain carried no channel message (only replies, or nothing): once written,
    /// `parts` gives its buffer back, so an idle connection holds none.
    release_parts: bool,
    /// Bytes of the front part already written.
    written: usize,
    /// Bytes of `parts` not yet written.
    pending_bytes: usize,
    /// The payload of the latest WebSocket ping not answered yet. Pings arriving before the
    /// pong is queued share one answer (RFC 6455 5.5.3), so a ping flood costs nothing.
    pong_due: Option<Vec<u8>>,
    /// Since when reading has been paused because the client does not take our output.
    paused_since: Option<TokioInstant>,
    /// Reads and requests handled since the task last yielded (see [`REQUESTS_PER_WAKE`]).
    reads_since_yield: usize,
    requests_since_yield: usize,
    /// Set once our close frame is queued: when to give up waiting for the client's.
    closing: Option<TokioInstant>,
    close_code: Option<u16>,
    /// Set after failing the connection (a protocol violation): our close frame is queued,
    /// input is decoded only to find the client's close frame, and TCP is half-closed as soon
    /// as our close frame is out.
    failed: bool,
    /// Our side of TCP is shut down (FIN sent).
    write_shut: bool,
    /// When the connection is closed for want of a (fresh) token, with which code and reason.
    auth_due: Option<(TokioInstant, CloseCode, &'static str)>,
}

enum ReadOutcome {
    Open,
    /// Open, with more to read: yield to other connections before reading on.
    Busy,
    /// The client closed the connection (with its close frame, or by dropping TCP).
    Closed,
}

impl Conn {
    /// Serves until the connection ends; returns the close code recorded for metrics.
    async fn serve(&mut self, admission: Admission, credentials: Box<Credentials>) -> u16 {
        let conn_id = self.session.conn_id;
        match admission {
            Admission::Refuse(code) => {
                let reason = match code {
                    CloseCode::GoingAway => self.reconnect_hint(),
                    other => other.reason().to_owned(),
                };
                tracing::info!(conn = conn_id, code = code.code(), "refusing websocket: {reason}");
                self.start_close(code.code(), &reason);
            }
            Admission::Limited(refusal) => {
                let code = CloseCode::TryAgainLater.code();
                tracing::info!(
                    conn = conn_id,
                    code,
                    limit = refusal.limit,
                    "refusing websocket: {}",
                    refusal.message
                );
                self.start_close(code, &refusal.close_reason());
            }
            Admission::Accept => {
                let welcome =
                    encode_welcome(self.session.id(), self.app.config.server.ping_interval_ms);
                self.pending_bytes += welcome.len() + 2;
                self.parts.push_front(text_part(welcome));
                // A token presented with the upgrade (header, query or cookie), or the
                // connect proxy's answer: a refusal gets its error, then the close code that
                // tells the client what to do.
                // Boxed, so its state is not part of this task's future for the
                // connection's whole life.
                if let Err(refusal) = Box::pin(self.session.connect(*credentials)).await {
                    if let Some(e) = refusal.error {
                        let reply = self.session.error_frame(e);
                        self.queue_text(reply);
                    }
                    self.start_close(refusal.code, &refusal.reason);
                }
                self.refresh_auth_due();
            }
        }
        let ping_interval = Duration::from_millis(self.app.config.server.ping_interval_ms);
        let pong_timeout = Duration::from_millis(self.app.config.server.pong_timeout_ms);
        let mut next_ping = TokioInstant::now() + ping_interval;
        let mut pong_deadline: Option<TokioInstant> = None;
        let mut drain_rx = self.app.shutdown.subscribe();
        let queue = self.session.queue.clone();
        let mut drained = Drained::default();
        // One timer for the connection's life, moved rather than re-created on every wake-up:
        // registering a fresh timer per loop turn costs more than the rest of the turn.
        let timer_sleep = sleep_until(next_ping);
        tokio::pin!(timer_sleep);
        let mut missed = false;

        loop {
            if let Err(e) = self.flush() {
                tracing::debug!(conn = conn_id, "write failed: {e}");
                return self.close_code.unwrap_or(1006);
            }
            if self.closing.is_none() && *drain_rx.borrow() {
                let hint = self.reconnect_hint();
                self.start_close(CloseCode::GoingAway.code(), &hint);
                continue;
            }
            if self.closing.is_none()
                && let Some((code, reason)) = self.session.must_close()
            {
                // What the client's requests got, their refusals included, goes out first.
                self.take_queue(&queue, &mut drained);
                self.start_close(code.code(), reason);
                continue;
            }
            if self.failed && !self.write_shut && self.parts.is_empty() {
                self.half_close().await;
            }
            // Past the linger, give up on the client's close frame (and on a socket that
            // stopped taking our writes).
            if let Some(deadline) = self.closing
                && TokioInstant::now() >= deadline
            {
                return self.close_code.unwrap_or(1006);
            }
            // A client that does not take what its own requests produce stops being read;
            // it is closed if it stays that way.
            let reading = self.closing.is_some() || !self.output_over_budget();
            if reading {
                self.paused_since = None;
            } else if self.paused_since.is_none() {
                self.paused_since = Some(TokioInstant::now());
            }
            let stall_deadline = self.paused_since.map(|since| since + pong_timeout);
            let timer = match (self.closing, pong_deadline) {
                (Some(deadline), _) => deadline,
                (None, Some(pong)) => pong.min(next_ping),
                (None, None) => next_ping,
            };
            let timer = stall_deadline.map_or(timer, |stall| stall.min(timer));
            let timer = match self.auth_due {
                Some((due, ..)) if self.closing.is_none() => due.min(timer),
                _ => timer,
            };
            if timer_sleep.deadline() != timer {
                timer_sleep.as_mut().reset(timer);
            }
            let want_queue = self.closing.is_none();
            // A push arrived while the socket was backed up: take the queue now it is not.
            if missed && self.parts.is_empty() && self.closing.is_none() {
                missed = false;
                self.take_queue(&queue, &mut drained);
                continue;
            }
            tokio::select! {
                ready = self.stream.readable(), if reading => {
                    if ready.is_err() {
                        return self.close_code.unwrap_or(1006);
                    }
                    match self.read_ready() {
                        Ok(ReadOutcome::Open) => self.refresh_auth_due(),
                        Ok(ReadOutcome::Busy) => {
                            self.refresh_auth_due();
                            tokio::task::yield_now().await;
                            self.reads_since_yield = 0;
                            self.requests_since_yield = 0;
                        }
                        Ok(ReadOutcome::Closed) => {
                            let _ = self.flush();
                            return self.close_code.unwrap_or(1006);
                        }
                        Err(e) => {
                            tracing::debug!(conn = conn_id, "read failed: {e}");
                            return self.close_code.unwrap_or(1006);
                        }
                    }
                }
                ready = self.stream.writable(), if !self.parts.is_empty() || self.stream.has_pending_output() => {
                    if ready.is_err() {
                        return self.close_code.unwrap_or(1006);
                    }
                }
                // While the socket is backed up, pushes only tell us whether the queue has
                // overflowed: a client that stopped reading is closed now, not when (if
                // ever) it reads again or the heartbeat notices. (Nothing the other branches
                // poll touches `parts`, so it is as it was when the select started.)
                _ = queue.notified(), if want_queue => {
                    if self.parts.is_empty()
                        || queue.is_overflowed()
                        || queue.close_requested().is_some()
                    {
                        // A close frame may never get through; the linger bounds the wait.
                        self.take_queue(&queue, &mut drained);
                    } else {
                        missed = true;
                    }
                }
                _ = drain_rx.changed(), if self.closing.is_none() => {}
                _ = &mut timer_sleep => {
                    if self.closing.is_some() {
                        continue;
                    }
                    let now = TokioInstant::now();
                    if let Some((due, code, reason)) = self.auth_due
                        && now >= due
                    {
                        tracing::info!(conn = conn_id, code = code.code(), "closing: {reason}");
                        self.session.app().auth.count_refusal(match code {
                            CloseCode::TokenExpired => "expired_connection",
                            _ => "auth_timeout",
                        });
                        self.start_close(code.code(), reason);
                        continue;
                    }
                    if stall_deadline.is_some_and(|d| now >= d) {
                        tracing::info!(
                            conn = conn_id,
                            pending = self.pending_bytes + queue.reply_backlog(),
                            "the client sends requests but does not read the replies; closing with 4008"
                        );
                        let code = CloseCode::SlowConsumer;
                        self.start_close(code.code(), code.reason());
                        continue;
                    }
                    if self.session.pong_received {
                        self.session.pong_received = false;
                        pong_deadline = None;
                    }
                    if pong_deadline.is_some_and(|d| now >= d) {
                        tracing::info!(conn = conn_id, "no pong within {} ms, closing with 4009", pong_timeout.as_millis());
                        self.start_close(CloseCode::HeartbeatTimeout.code(), CloseCode::HeartbeatTimeout.reason());
                    } else if now >= next_ping {
                        self.queue_text(Bytes::from_static(PING_FRAME.as_bytes()));
                        next_ping = now + ping_interval;
                        if pong_deadline.is_none() {
                            pong_deadline = Some(now + pong_timeout);
                        }
                    }
                }
            }
            if self.session.pong_received {
                self.session.pong_received = false;
                pong_deadline = None;
            }
        }
    }

    /// Re-reads when the session's token runs out (after it may have changed).
    fn refresh_auth_due(&mut self) {
        self.auth_due = self.session.auth_deadline().map(|(due, code, reason)| {
            let left = due.saturating_duration_since(std::time::Instant::now());
            (TokioInstant::now() + left, code, reason)
        });
    }

    /// Moves everything queued into the write path; closes with 4008 if the queue overflowed.
    fn take_queue(&mut self, queue: &ConnQueue, drained: &mut Drained) {
        drained.frames.clear();
        queue.drain_into(drained);
        self.queue_drained(drained);
        if let Some((code, reason)) = drained.close.take() {
            tracing::info!(
                conn = self.session.conn_id,
                code,
                "closing as the server asked: {reason}"
            );
            self.start_close(code, &reason);
        }
        if drained.overflowed {
            tracing::info!(
                conn = self.session.conn_id,
                "slow consumer: outbound queue overflowed, closing with 4008"
            );
            self.start_close(CloseCode::SlowConsumer.code(), CloseCode::SlowConsumer.reason());
        }
        self.release_parts = !drained.carried_messages;
        if drained.frames.capacity() > 1024 || !drained.carried_messages {
            drained.frames = Vec::new();
        }
    }

    /// The 1001 reason: a JSON hint with a jittered delay so clients spread their reconnects.
    fn reconnect_hint(&self) -> String {
        let base = self.app.config.server.reconnect_after_ms;
        let after = rand::rng().random_range(base..=base * 2);
        format!("{{\"reconnect\":true,\"after_ms\":{after}}}")
    }

    /// Queues our close frame; from now on only reads (for the client's close) and writes run.
    fn start_close(&mut self, code: u16, reason: &str) {
        if self.closing.is_some() {
            return;
        }
        self.close_code = Some(code);
        self.queue_raw(frame::close_frame(code, reason));
        self.closing = Some(TokioInstant::now() + CLOSE_LINGER);
    }

    /// Fails the connection: our close frame with the violation's code, then (once it is
    /// flushed) a FIN, without the full linger a normal close allows.
    fn fail(&mut self, code: u16, reason: &str) {
        self.start_close(code, reason);
        self.failed = true;
    }

    /// Shuts down our write side right after our close frame, so the client sees the close
    /// and then EOF at once; the socket itself goes when the client's close frame or FIN
    /// arrives, or after [`FAILED_LINGER`].
    async fn half_close(&mut self) {
        let _ = self.stream.shutdown().await;
        self.write_shut = true;
        let deadline = TokioInstant::now() + FAILED_LINGER;
        self.closing = Some(self.closing.map_or(deadline, |d| d.min(deadline)));
    }

    fn queue_text(&mut self, body: Bytes) {
        let part = text_part(body);
        self.pending_bytes += part.header_len as usize + part.body.len();
        self.parts.push_back(part);
    }

    fn queue_raw(&mut self, frame: Vec<u8>) {
        self.pending_bytes += frame.len();
        self.parts.push_back(Part { header: [0; 10], header_len: 0, body: Bytes::from(frame) });
    }

    /// Whether the client leaves so much of our output unread that its requests must wait:
    /// replies it caused fill half the queue budget, or the bytes handed to the socket exceed
    /// the whole budget.
    fn output_over_budget(&self) -> bool {
        let queue = &self.session.queue;
        queue.replies_over_budget() || self.pending_bytes > queue.max_bytes()
    }

    /// Turns drained queue entries into frame parts, recording delivery latency.
    fn queue_drained(&mut self, drained: &mut Drained) {
        let now = Instant::now();
        let mut latency = LocalHistogram::default();
        let (mut messages, mut bytes) = (0u64, 0u64);
        let batch = self.app.config.server.batch;
        let (mut deflated, mut deflated_plain, mut deflated_wire) = (0u64, 0u64, 0u64);
        let mut frames = drained.frames.drain(..).peekable();
        while let Some(first) = frames.next() {
            if first.is_message() {
                messages += 1;
                if let Some(at) = first.published_at {
                    latency.record(now.saturating_duration_since(at));
                }
            }
            // Compressed once (by whichever subscriber gets here first), shared by all; a
            // compressed message travels alone, never inside a batch.
            if self.deflate
                && let Some(forms) = first.forms.as_ref().filter(|f| f.compress)
            {
                let metrics = &self.app.metrics.deflate;
                let z = forms.get_or_compress(|| deflate::compress(&first.bytes, metrics));
                if !z.is_empty() {
                    deflated += 1;
                    deflated_plain += first.bytes.len() as u64;
                    deflated_wire += z.len() as u64;
                    bytes += z.len() as u64;
                    let part = compressed_part(z.clone());
                    self.pending_bytes += part.header_len as usize + part.body.len();
                    self.parts.push_back(part);
                    continue;
                }
            }
            let batchable = |f: &Outbound| {
                f.is_message() && !(self.deflate && f.forms.as_ref().is_some_and(|f| f.compress))
            };
            // With batching on, consecutive messages travel as one JSON array frame.
            if batch && batchable(&first) && frames.peek().is_some_and(batchable) {
                let mut array = BytesMut::with_capacity(first.bytes.len() * 4);
                array.put_u8(b'[');
                array.put_slice(&first.bytes);
                while let Some(next) = frames.next_if(batchable) {
                    messages += 1;
                    if let Some(at) = next.published_at {
                        latency.record(now.saturating_duration_since(at));
                    }
                    array.put_u8(b',');
                    array.put_slice(&next.bytes);
                }
                array.put_u8(b']');
                bytes += array.len() as u64;
                self.queue_text(array.freeze());
            } else {
                bytes += first.bytes.len() as u64;
                self.queue_text(first.bytes);
            }
        }
        latency.flush_into(&self.app.metrics.delivery_latency);
        self.app.metrics.delivered(Transport::Ws, messages, bytes);
        if deflated != 0 {
            let d = &self.app.metrics.deflate;
            d.frames.fetch_add(deflated, Relaxed);
            d.plain_bytes.fetch_add(deflated_plain, Relaxed);
            d.wire_bytes.fetch_add(deflated_wire, Relaxed);
        }
    }

    /// Writes as much of the pending parts as the socket takes without blocking.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(payload) = self.pong_due.take()
            && self.closing.is_none()
        {
            self.queue_raw(frame::control_frame(frame::OP_PONG, &payload));
        }
        while !self.parts.is_empty() {
            let mut slices: Vec<IoSlice<'_>> =
                Vec::with_capacity(2 * FRAMES_PER_WRITE.min(self.parts.len()));
            let mut skip = self.written;
            for part in self.parts.iter().take(FRAMES_PER_WRITE) {
                let header = &part.header[..part.header_len as usize];
                if skip < header.len() {
                    slices.push(IoSlice::new(&header[skip..]));
                    slices.push(IoSlice::new(&part.body));
                } else {
                    slices.push(IoSlice::new(&part.body[skip - header.len()..]));
                }
                skip = 0;
            }
            let n = match self.stream.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            drop(slices);
            self.advance(n);
        }
        if self.parts.capacity() > 64 || self.release_parts {
            self.parts = VecDeque::new();
        }
        Ok(())
    }

    fn advance(&mut self, mut n: usize) {
        self.pending_bytes -= n;
        while n > 0 {
            let part = self.parts.front().expect("wrote more than was pending");
            let remaining = part.header_len as usize + part.body.len() - self.written;
            if n >= remaining {
                n -= remaining;
                self.written = 0;
                self.parts.pop_front();
            } else {
                self.written += n;
                n = 0;
            }
        }
    }

    /// Reads whatever is available and handles every complete frame; `Busy` when the task
    /// has done its share of work since it last yielded (or must stop reading).
    fn read_ready(&mut self) -> io::Result<ReadOutcome> {
        let mut buf = [0u8; 8192];
        loop {
            match self.stream.try_read(&mut buf) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => {
                    self.reads_since_yield += 1;
                    if let Err(closed) = self.feed(&buf[..n]) {
                        return Ok(closed);
                    }
                    if self.reads_since_yield >= READS_PER_WAKE
                        || self.requests_since_yield >= REQUESTS_PER_WAKE
                        || (self.closing.is_none() && self.output_over_budget())
                    {
                        return Ok(ReadOutcome::Busy);
                    }
                    if n < buf.len() {
                        return Ok(ReadOutcome::Open);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::Open),
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes and handles `bytes`. `Err` means the connection is finished.
    ///
    /// Once our close frame is sent, nothing but the client's close frame matters: data and
    /// pings are ignored (RFC 6455 allows no frame after a close).
    fn feed(&mut self, bytes: &[u8]) -> Result<(), ReadOutcome> {
        let mut incoming = Vec::new();
        let result = self.decoder.feed(bytes, &mut incoming);
        for frame in incoming {
            match frame {
                Incoming::Text(text) if self.closing.is_none() => {
                    self.requests_since_yield += 1;
                    self.session.handle_text(&text)
                }
                Incoming::Text(_) => {}
                Incoming::Ping(payload) if self.closing.is_none() => self.pong_due = Some(payload),
                Incoming::Ping(_) => {}
                Incoming::Pong => self.session.pong_received = true,
                Incoming::Close(code) => {
                    if self.closing.is_none() {
                        // Echo the client's code (the decoder lets only codes valid on the
                        // wire through); a close without a code is answered with 1000.
                        let echo = code.unwrap_or(1000);
                        self.close_code = Some(code.unwrap_or(1005));
                        self.queue_raw(frame::close_frame(echo, ""));
                    }
                    // Both closes are exchanged: flush ours and close TCP, no linger.
                    self.closing = Some(TokioInstant::now());
                    return Err(ReadOutcome::Closed);
                }
            }
        }
        let Err(violation) = result else { return Ok(()) };
        let conn_id = self.session.conn_id;
        if self.failed {
            // Already failed: a second violation just ends it.
            tracing::debug!(conn = conn_id, "more bad input after failing: {}", violation.reason);
            return Err(ReadOutcome::Closed);
        }
        tracing::info!(
            conn = conn_id,
            code = violation.code.code(),
            label = violation.label,
            "closing websocket: {}",
            violation.reason
        );
        self.app.metrics.frame_error(violation.label);
        if self.closing.is_some() {
            // Our close frame is out already: there is nothing left to tell the client.
            return Err(ReadOutcome::Closed);
        }
        self.fail(violation.code.code(), &violation.reason);
        if violation.peer_closed {
            self.closing = Some(TokioInstant::now());
            return Err(ReadOutcome::Closed);
        }
        // The frames after the refused one (in this read) may hold the client's close.
        self.feed(&[])
    }
}
