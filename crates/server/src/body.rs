//! Request bodies within limits of time and size.
//!
//! A layer on every route gives each request body a deadline, `server.body_read_timeout_ms`
//! from the moment its headers were read, so a client trickling a body a byte a second holds
//! its connection (and the memory behind it) for that long at most, whichever handler reads
//! it (Socket.IO's polling included). Handlers that take a body read it with [`read`], which
//! also enforces their byte limit, and answer a refusal as JSON: `408 request_timeout` or
//! `413 payload_too_large`, each logged with the peer and counted.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::middleware::Next;
use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use serde_json::json;
use tokio::time::Sleep;

use crate::AppState;
use crate::ws::json_response;

/// The layer: wraps every request body that is not empty in a [`DeadlineBody`].
pub async fn deadline(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response<Body> {
    use hyper::body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(p)| *p);
    let timeout = Duration::from_millis(app.config.server.body_read_timeout_ms);
    let req = req.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            app: app.clone(),
            peer,
            expired: false,
        })
    });
    next.run(req).await
}

/// The error a body reports once its deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within server.body_read_timeout_ms")]
pub struct BodyTimedOut;

/// A request body that fails with [`BodyTimedOut`] when it has not ended by its deadline.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    app: Arc<AppState>,
    peer: Option<SocketAddr>,
    expired: bool,
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired = true;
        this.app.connections.counters.body_timeouts.fetch_add(1, Relaxed);
        let timeout_ms = this.app.config.server.body_read_timeout_ms;
        match this.peer {
            Some(peer) => tracing::info!(
                %peer,
                timeout_ms,
                "request body still incomplete at server.body_read_timeout_ms; closing"
            ),
            None => tracing::info!(
                timeout_ms,
                "request body still incomplete at server.body_read_timeout_ms; closing"
            ),
        }
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a body was not read: the status, error code and message to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// `{"error":code,"message":...}`; the connection closes after it, since the rest of the
    /// body was not read.
    pub fn into_response(self) -> Response<Body> {
        let mut resp =
            json_response(self.status, json!({ "error": self.code, "message": self.message }));
        if self.status != StatusCode::BAD_REQUEST {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Most bytes of a too-large body read and discarded before the 413 is sent. Most clients
/// (Python's http.client, curl without `Expect`) send the whole body before they read the
/// answer, and miss it when the server closes under them; beyond this the server closes
/// anyway. The body's deadline bounds the time this takes.
const DRAIN_MAX: u64 = 16 * 1024 * 1024;

/// The most a body's buffer reserves before its bytes arrive.
const FIRST_CHUNK: u64 = 16 * 1024;

/// Reads a whole request body of at most `limit` bytes (`option` names the setting, for the
/// message).
pub async fn read(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    option: &'static str,
) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit64 = limit as u64;
    // Grown as bytes arrive: a declared length is only a promise, and a client trickling a
    // body must hold no more than it sent.
    let mut buf =
        BytesMut::with_capacity(declared.unwrap_or(0).min(limit64).min(FIRST_CHUNK) as usize);
    let mut seen: u64 = 0;
    let mut failure = None;
    if declared.is_none_or(|len| len <= limit64 + DRAIN_MAX) {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let Ok(data) = frame.into_data() else { continue };
                    seen += data.len() as u64;
                    if seen <= limit64 {
                        buf.extend_from_slice(&data);
                    } else if seen > limit64 + DRAIN_MAX {
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    let too_large = declared.is_some_and(|len| len > limit64) || seen > limit64;
    if too_large {
        app.connections.counters.payload_too_large.fetch_add(1, Relaxed);
        let size = declared.map(|s| format!("of {s} bytes ")).unwrap_or_default();
        if app.api_refusals.allow() {
            tracing::info!(%peer, limit, option, "request body {size}refused: too large");
        }
        return Err(Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            message: format!(
                "the request body {size}is too large: the limit is {limit} bytes ({option})"
            ),
        });
    }
    match failure {
        None => Ok(buf.freeze()),
        Some(e) if caused_by_timeout(&e) => Err(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "request_timeout",
            message: format!(
                "the request body did not arrive within {} ms (server.body_read_timeout_ms)",
                app.config.server.body_read_timeout_ms
            ),
        }),
        Some(e) => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: format!("the request body could not be read: {e}"),
        }),
    }
}

fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose client never sends another byte.
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    fn app() -> Arc<AppState> {
        AppState::new(crate::Config::default(), None)
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test]
    async fn reads_up_to_the_limit_and_refuses_beyond() {
        let app = app();
        let none = HeaderMap::new();
        let got = read(&app, peer(), &none, Body::from(vec![b'a'; 100]), 100, "x").await;
        assert_eq!(got.unwrap().len(), 100);
        let e = read(&app, peer(), &none, Body::from(vec![b'a'; 101]), 100, "api.max_body_bytes")
            .await
            .unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
        assert!(e.message.contains("the limit is 100 bytes (api.max_body_bytes)"), "{e:?}");
        assert_eq!(app.connections.counters.payload_too_large.load(Relaxed), 1);
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    #[tokio::test]
    async fn a_declared_length_far_over_the_limit_is_refused_without_reading() {
        let app = app();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000000000000"));
        // The body never arrives: only the declared length can have refused it.
        let e = read(&app, peer(), &headers, Body::new(Stalled), 1024, "x").await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("of 1000000000000 bytes"), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_with_408() {
        let app = app();
        let timeout = Duration::from_millis(app.config.server.body_read_timeout_ms);
        let body = Body::new(DeadlineBody {
            inner: Body::new(Stalled),
            sleep: Box::pin(tokio::time::sleep(timeout)),
            app: app.clone(),
            peer: Some(peer()),
            expired: false,
        });
        let started = tokio::time::Instant::now();
        let e = read(&app, peer(), &HeaderMap::new(), body, 1024, "x").await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::REQUEST_TIMEOUT, "request_timeout"));
        assert_eq!(started.elapsed(), timeout);
        assert!(e.message.contains("server.body_read_timeout_ms"), "{e:?}");
        assert_eq!(app.connections.counters.body_timeouts.load(Relaxed), 1);
    }
}
