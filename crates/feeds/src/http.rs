//! One bounded HTTP/1.1 `GET` over `http://` or `https://` (rustls with the Mozilla roots),
//! for the REST calls connectors make besides their WebSocket (Massive's aggregates, for
//! backfill). A whole request, from connecting to the last body byte, has one deadline, and
//! the body one size limit, so a slow or huge answer can never hold a connector up.
//!
//! [`open`] gives the HTTP/1.1 connection itself, for callers that keep connections alive
//! between requests (the server's auth proxy).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body, at most the limit given to [`get`].
    pub body: Bytes,
}

/// `GET url`, failing when the whole exchange takes longer than `timeout` or the body is
/// larger than `max_body` bytes. Errors are sentences naming the host, never the query
/// (which may carry an API key).
pub async fn get(url: &str, timeout: Duration, max_body: usize) -> Result<Response, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
    let host = parsed.host_str().ok_or("URL without a host")?.to_owned();
    let shown = format!("{}://{host}{}", parsed.scheme(), parsed.path());
    match tokio::time::timeout(timeout, exchange(&parsed, &host, max_body)).await {
        Err(_) => Err(format!("GET {shown} timed out after {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(format!("GET {shown}: {e}")),
        Ok(Ok(r)) => Ok(r),
    }
}

async fn exchange(url: &url::Url, host: &str, max_body: usize) -> Result<Response, String> {
    let mut sender = open(url).await?;
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let req = http::Request::get(target)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, concat!("ferrocast/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = read_body(resp, max_body).await?;
    Ok(Response { status, body })
}

/// Reads a response's body, failing beyond `max_body` bytes.
pub async fn read_body(
    resp: http::Response<hyper::body::Incoming>,
    max_body: usize,
) -> Result<Bytes, String> {
    Ok(Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("reading the body (limit {max_body} bytes): {e}"))?
        .to_bytes())
}

/// Opens an HTTP/1.1 connection to `url`'s host (TCP, or TLS for `https://`). The
/// connection's task ends when the returned sender is dropped or the server closes.
pub async fn open(url: &url::Url) -> Result<SendRequest<Full<Bytes>>, String> {
    let host = url.host_str().ok_or("URL without a host")?;
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(format!("unsupported scheme {other:?}")),
    };
    let port = url.port_or_known_default().ok_or("no port")?;
    let tcp = TcpStream::connect((host, port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if tls {
        crate::link::install_crypto_provider();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("bad TLS server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls_config())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        handshake(stream).await
    } else {
        handshake(tcp).await
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Arc::new(
                rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
            )
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `response` to the first request; returns its URL
    /// and the request it received.
    async fn serve_once(response: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(response.as_bytes()).await.unwrap();
            let _ = s.shutdown().await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn gets_a_body_and_sends_host_and_query() {
        let (url, seen) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
        )
        .await;
        let r = get(&format!("{url}/v2/x?apiKey=k"), Duration::from_secs(5), 1024).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"{\"a\":1}"[..]));
        let request = seen.await.unwrap();
        assert!(request.starts_with("GET /v2/x?apiKey=k HTTP/1.1\r\n"), "{request}");
        assert!(request.to_ascii_lowercase().contains("host: 127.0.0.1:"), "{request}");
    }

    #[tokio::test]
    async fn limits_the_body_and_hides_the_query_in_errors() {
        let (url, _seen) =
            serve_once("HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n01234567890123456789").await;
        let e =
            get(&format!("{url}/p?apiKey=secret"), Duration::from_secs(5), 10).await.unwrap_err();
        assert!(e.contains("limit 10 bytes") && !e.contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/slow", listener.local_addr().unwrap());
        // Accepts (the kernel does) but never answers.
        let e = get(&url, Duration::from_millis(200), 10).await.unwrap_err();
        assert!(e.contains("timed out after 200 ms"), "{e}");
        drop(listener);
    }
}
