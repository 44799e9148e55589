//! The WebSocket plumbing connectors share: opening a `ws://` or `wss://` connection with
//! extra headers and a deadline, sending with a deadline, and throttled logging.

use std::collections::BTreeMap;
use std::sync::Once;
use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::{SplitSink, SplitStream};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Message;

/// An upstream WebSocket connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// Its write half.
pub type WsTx = SplitSink<Ws, Message>;
/// Its read half.
pub type WsRx = SplitStream<Ws>;

/// Largest upstream message accepted. Massive's Go client caps reads at 1 MB; a busy
/// `T.*` batch can come close, so allow 16 MiB before calling the upstream broken.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Installs rustls' `ring` provider once per process, so TLS works even when another crate
/// in the build enables a second provider (rustls then refuses to guess).
pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means a provider is installed already, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens a WebSocket to `url` with extra `headers`, within `timeout`.
pub async fn connect(
    url: &str,
    headers: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<Ws, String> {
    install_crypto_provider();
    let mut request = url.into_client_request().map_err(|e| format!("bad URL {url}: {e}"))?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("bad header name {name:?}: {e}"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| format!("bad value for header {name}: {e}"))?;
        request.headers_mut().insert(name, value);
    }
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, None);
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(format!("connecting to {url} timed out after {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(format!("cannot connect to {url}: {e}")),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

/// Sends `msg`, failing if the upstream does not take it within `timeout` (a peer that
/// stopped reading would otherwise stall the connector once the TCP buffer is full).
pub async fn send(tx: &mut WsTx, msg: Message, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tx.send(msg)).await {
        Err(_) => Err(format!("upstream did not accept a write within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Ok(Ok(())) => Ok(()),
    }
}

/// Allows a few log lines per minute for a recurring condition (malformed frames), so a
/// broken upstream cannot flood the log; the counters still see every occurrence.
#[derive(Debug)]
pub struct Throttle {
    per_minute: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Throttle {
    /// At most `per_minute` lines per minute.
    pub const fn new(per_minute: u32) -> Self {
        Throttle { per_minute, window_start: None, in_window: 0, suppressed: 0 }
    }

    /// Whether to log now. When a new window opens, returns how many lines the last one
    /// suppressed, so the log can say so.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.window_start.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.per_minute {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Ticks `interval` when there is one; never completes otherwise.
pub async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline` when there is one; never completes otherwise.
pub async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A close frame in words, for logs and feed states.
pub fn close_text(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close code {}: {:?}", u16::from(f.code), f.reason.as_str()),
        None => "no close code".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttle_allows_a_few_per_minute() {
        let mut t = Throttle::new(2);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.allow(), Some(2));
    }
}
