//! The ingress runtime: where publishes come in, apart from where deliveries go out.
//!
//! One publish to a busy channel wakes every subscriber's connection task. On one runtime,
//! those ~1,000 tasks sit in the workers' run queues ahead of whatever the publisher does
//! next, so a sequential publisher's next request is read only after the whole fan-out has
//! been written: one message per fan-out round, and every delivery its own wake-up and its
//! own `writev`. `ferrocast serve` therefore runs a second, one-thread runtime for ingress:
//! HTTP connections whose first request is for the API (`/api/…`, `/metrics`), the feed
//! connectors and the simulator. A publish there is read, fanned out into the queues and
//! answered while the egress workers are still writing the previous one, so the publisher
//! never waits for the writers; and since it keeps publishing meanwhile, each writer finds
//! several messages queued when it runs and writes them with one `writev`.
//!
//! A plain-TCP connection is routed by the start of its first request, read with `peek`
//! (nothing is consumed), and moved to the ingress runtime's reactor. TLS connections, and
//! connections whose first request is anything else (WebSocket upgrades, SSE, Socket.IO,
//! the dashboard), stay on the main runtime. Routing only decides where a connection is
//! scheduled: every connection is served the same way wherever it runs.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle, Runtime};

/// Enough of a request line to tell `POST /api/publish` from `GET /ws`.
const PEEK_BYTES: usize = 24;

/// Starts the ingress runtime: one worker thread, named `ferrocast-ingress`.
pub fn runtime() -> std::io::Result<Runtime> {
    // Multi-threaded with one worker (not current-thread) so `block_in_place`, which
    // [`crate::block_on`] uses for the broker's and proxy's answers, works there too.
    Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferrocast-ingress")
        .enable_all()
        .build()
}

/// Where a new connection should run, from the start of its first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Ingress,
    Egress,
    /// Nothing arrived within the header deadline.
    Silent,
}

/// Waits (up to `deadline`) for the first bytes of `stream` and routes it; reads nothing.
pub async fn route(stream: &TcpStream, deadline: Duration) -> Route {
    let mut buf = [0u8; PEEK_BYTES];
    match tokio::time::timeout(deadline, stream.peek(&mut buf)).await {
        Ok(Ok(n)) if is_api_request(&buf[..n]) => Route::Ingress,
        Ok(_) => Route::Egress,
        Err(_) => Route::Silent,
    }
}

/// Whether a request line starts with a method and an API target (`/api/…`, `/metrics`).
fn is_api_request(start: &[u8]) -> bool {
    let Some(space) = start.iter().take(8).position(|&b| b == b' ') else { return false };
    let (method, target) = (&start[..space], &start[space + 1..]);
    method.iter().all(u8::is_ascii_uppercase)
        && (target.starts_with(b"/api/") || target.starts_with(b"/metrics"))
}

/// Moves a connection accepted on the main runtime to `ingress` and runs `serve` there.
pub fn hand_over<F, Fut>(ingress: &Handle, stream: TcpStream, serve: F) -> std::io::Result<()>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    // Leaves the main runtime's reactor; registered again with the ingress one.
    let stream = stream.into_std()?;
    ingress.spawn(async move {
        match TcpStream::from_std(stream) {
            Ok(stream) => serve(stream).await,
            Err(e) => tracing::debug!("cannot move a connection to the ingress runtime: {e}"),
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_requests_go_to_ingress_and_the_rest_stays() {
        assert!(is_api_request(b"POST /api/publish HTTP/1.1\r\n"));
        assert!(is_api_request(b"GET /api/channels?limit=5"));
        assert!(is_api_request(b"GET /metrics HTTP/1.1"));
        assert!(!is_api_request(b"GET /ws HTTP/1.1\r\n"));
        assert!(!is_api_request(b"GET /sse?channels=a"));
        assert!(!is_api_request(b"POST /socket.io/?EIO=4"));
        assert!(!is_api_request(b"GET / HTTP/1.1"));
        // A TLS client hello, or a request line cut short.
        assert!(!is_api_request(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!is_api_request(b"POST"));
        assert!(!is_api_request(b""));
    }

    #[tokio::test]
    async fn routes_by_the_first_request_without_consuming_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"POST /api/publish HTTP/1.1\r\n").await.unwrap();
        assert_eq!(route(&server, Duration::from_secs(5)).await, Route::Ingress);
        let mut line = [0u8; 17];
        server.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"POST /api/publish");

        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(route(&server, Duration::from_millis(50)).await, Route::Silent);
        silent.write_all(b"GET /ws HTTP/1.1\r\n").await.unwrap();
        assert_eq!(route(&server, Duration::from_secs(5)).await, Route::Egress);
    }
}
