//! TLS for the doctor: the client configuration (Mozilla's roots from `webpki-roots`, plus
//! `--ca-file`; or no verification with `--insecure`), the certificate check (chain,
//! hostname and expiry, with the certificate's details even when verification fails), and
//! what a browser would negotiate on top ([`http_offer`]: ALPN with `h2` offered, and over
//! HTTP/2 whether WebSockets may run on a stream, RFC 8441).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::fixes;
use super::report::Outcome;

/// Days before expiry from which the certificate is reported as a warning.
const EXPIRY_WARN_DAYS: i64 = 14;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that verifies against Mozilla's roots and `ca_file`, offering
/// only HTTP/1.1 (WebSocket upgrades need it).
pub fn verifying_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{} holds no certificate", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that accepts any certificate (`--insecure`, and for reading the
/// certificate of a server whose verification failed).
pub fn insecure_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = AcceptAny(provider.signature_verification_algorithms);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Accepts every certificate but still checks handshake signatures.
#[derive(Debug)]
struct AcceptAny(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// What the leaf certificate says.
#[derive(Debug, Clone)]
struct CertInfo {
    subject: String,
    issuer: String,
    names: Vec<String>,
    not_after_unix: i64,
    not_after: String,
}

fn inspect(der: &CertificateDer<'_>) -> Option<CertInfo> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::IPAddress(bytes) => names.push(match bytes.len() {
                    4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string(),
                    16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string(),
                    _ => continue,
                }),
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after;
    Some(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        not_after_unix: not_after.timestamp(),
        not_after: not_after.to_datetime().date().to_string(),
    })
}

/// What the server agreed to when offered what a browser offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOffer {
    /// The protocol ALPN chose (`h2`, `http/1.1`), or `None` when the server chose none.
    pub alpn: Option<String>,
    /// Over HTTP/2: the status of `GET /healthz` on the connection.
    pub h2_status: Option<u16>,
    /// Over HTTP/2: the answer to an extended CONNECT (`:protocol = websocket`) on the
    /// WebSocket path: its status, or why it could not be sent.
    pub websocket: Option<Result<u16, String>>,
}

/// Offers `h2` and `http/1.1` by ALPN on `tcp` (verifying as `config` does); when the server
/// picks `h2`, asks for `/healthz` over HTTP/2, then opens a WebSocket on a stream of the
/// same connection (RFC 8441) at `ws_path`, which hyper sends only when the server has
/// advertised SETTINGS_ENABLE_CONNECT_PROTOCOL.
pub async fn http_offer(
    tcp: TcpStream,
    host: &str,
    config: &ClientConfig,
    ws_path: &str,
) -> std::io::Result<HttpOffer> {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = super::net::server_name(host)?;
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
    let mut offer = HttpOffer { alpn, h2_status: None, websocket: None };
    if offer.alpn.as_deref() != Some("h2") {
        return Ok(offer);
    }
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .map_err(std::io::Error::other)?;
    let driver = tokio::spawn(conn);
    let authority = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
    let health = http::Request::get(format!("https://{authority}/healthz"))
        .body(Empty::new())
        .map_err(std::io::Error::other)?;
    // Answered, the request also means the server's SETTINGS have been read.
    let status = sender.send_request(health).await.map_err(std::io::Error::other)?.status();
    offer.h2_status = Some(status.as_u16());
    let mut connect = http::Request::connect(format!("https://{authority}{ws_path}"))
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .map_err(std::io::Error::other)?;
    connect.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    offer.websocket = Some(match sender.send_request(connect).await {
        Ok(response) => Ok(response.status().as_u16()),
        Err(e) => Err(e.to_string()),
    });
    drop(sender);
    driver.abort();
    Ok(offer)
}

impl HttpOffer {
    /// The lines the TLS check adds about it, and its JSON for `--json`.
    pub fn describe(&self) -> (Vec<String>, serde_json::Value) {
        let mut lines = Vec::new();
        match self.alpn.as_deref() {
            Some("h2") => lines.push(match self.h2_status {
                Some(status) => format!(
                    "ALPN: h2 (HTTP/2) when offered h2 and http/1.1, as browsers do: SSE and \
                     the HTTP API share one connection (GET /healthz over HTTP/2: {status})"
                ),
                None => "ALPN: h2 (HTTP/2) when offered h2 and http/1.1".into(),
            }),
            Some(other) => lines.push(format!(
                "ALPN: {other} when offered h2 and http/1.1: no HTTP/2, so a browser holds at \
                 most six connections (SSE streams included) to this origin"
            )),
            None => lines.push(
                "ALPN: none chosen when offered h2 and http/1.1: HTTP/1.1, so a browser holds \
                 at most six connections (SSE streams included) to this origin"
                    .into(),
            ),
        }
        match &self.websocket {
            Some(Ok(200)) => lines.push(
                "WebSocket over HTTP/2 (RFC 8441): accepted on a stream of the HTTP/2 \
                 connection"
                    .into(),
            ),
            Some(Ok(status)) => lines.push(format!(
                "WebSocket over HTTP/2 (RFC 8441): the extended CONNECT was answered {status}; \
                 browsers then fail that WebSocket"
            )),
            Some(Err(e)) => lines.push(format!(
                "WebSocket over HTTP/2 (RFC 8441): not offered ({e}); browsers open WebSockets \
                 on a separate HTTP/1.1 connection"
            )),
            None => {}
        }
        let websocket = match &self.websocket {
            Some(Ok(status)) => serde_json::json!(*status == 200),
            Some(Err(_)) => serde_json::json!(false),
            None => serde_json::Value::Null,
        };
        let data = serde_json::json!({
            "alpn": self.alpn,
            "http2": self.alpn.as_deref() == Some("h2"),
            "websocket_over_http2": websocket,
        });
        (lines, data)
    }
}

/// Handshake details worth showing.
struct Session {
    version: String,
    alpn: Option<String>,
    leaf: Option<CertInfo>,
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<Session> {
    let name = super::net::server_name(host)?;
    let tls = TlsConnector::from(config).connect(name, tcp).await?;
    let (_, conn) = tls.get_ref();
    Ok(Session {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."))
            .unwrap_or_default(),
        alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        leaf: conn.peer_certificates().and_then(|c| c.first()).and_then(inspect),
    })
}

/// The TLS check: a verifying handshake on `tcp`; on failure, a second unverified one on a
/// fresh connection (from `reconnect`) to show what the server presents. Returns the verdict
/// and the configuration later probes should use (none when they cannot go on).
pub async fn check<F, Fut>(
    tcp: TcpStream,
    host: &str,
    verifying: Arc<ClientConfig>,
    insecure: bool,
    timeout: Duration,
    reconnect: F,
) -> (Outcome, Option<Arc<ClientConfig>>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Option<TcpStream>>,
{
    let verified = tokio::time::timeout(timeout, handshake(tcp, host, verifying.clone())).await;
    let error = match verified {
        Ok(Ok(session)) => return (verified_outcome(host, session), Some(verifying)),
        Ok(Err(e)) => e,
        Err(_) => {
            return (
                Outcome::fail(format!("no TLS handshake within {} s", timeout.as_secs()))
                    .cause("the port accepts TCP but does not complete a TLS handshake: it may speak plain HTTP, or a firewall holds the connection")
                    .fixes(fixes::tls_port()),
                None,
            );
        }
    };
    let rustls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).cloned();
    // Look at the certificate anyway, to explain the failure.
    let presented = match reconnect().await {
        Some(tcp) => tokio::time::timeout(timeout, handshake(tcp, host, insecure_config()))
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let mut outcome = failure_outcome(host, &error, rustls_error.as_ref());
    if let Some(leaf) = presented.as_ref().and_then(|s| s.leaf.as_ref()) {
        outcome = outcome.details(describe(leaf));
    }
    if insecure && presented.is_some() {
        outcome.status = super::report::Status::Warn;
        outcome = outcome.detail("--insecure: continuing without certificate verification");
        return (outcome, Some(insecure_config()));
    }
    (outcome, None)
}

fn describe(leaf: &CertInfo) -> Vec<String> {
    vec![
        format!("certificate subject: {}", leaf.subject),
        format!("issuer: {}", leaf.issuer),
        format!(
            "names: {}",
            if leaf.names.is_empty() { "(none)".into() } else { leaf.names.join(", ") }
        ),
        format!("valid until: {}", leaf.not_after),
    ]
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn verified_outcome(host: &str, session: Session) -> Outcome {
    let alpn_note = match session.alpn.as_deref() {
        Some("http/1.1") | None => None,
        Some(other) => {
            Some(format!("server chose ALPN {other:?} although only http/1.1 was offered"))
        }
    };
    let Some(leaf) = session.leaf else {
        return Outcome::pass(format!("{}: verified for {host}", session.version));
    };
    let days_left = (leaf.not_after_unix - now_unix()) / 86_400;
    let data = json!({"version": session.version, "not_after": leaf.not_after, "days_left": days_left, "names": leaf.names});
    let summary = format!(
        "{}, certificate for {host} valid until {} ({days_left} days), issued by {}",
        session.version, leaf.not_after, leaf.issuer
    );
    let outcome = if days_left < EXPIRY_WARN_DAYS {
        Outcome::warn(summary)
            .cause(format!("the certificate expires in {days_left} days; browsers will refuse wss:// once it does"))
            .fixes(fixes::renew_certificate())
    } else {
        Outcome::pass(summary)
    };
    outcome.details(alpn_note).data(data)
}

fn failure_outcome(
    host: &str,
    error: &std::io::Error,
    rustls_error: Option<&rustls::Error>,
) -> Outcome {
    use rustls::Error as E;
    match rustls_error {
        Some(E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            Outcome::fail("the certificate has expired")
                .cause("browsers and WebSocket clients refuse an expired certificate")
                .fixes(fixes::renew_certificate())
        }
        Some(E::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
            Outcome::fail(format!("the certificate is not valid for {host}"))
                .cause(format!("the server presents a certificate for other names (see below); the proxy may be serving its default certificate because no server block matches {host} (SNI)"))
                .fixes(fixes::certificate_name(host))
        }
        Some(E::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            Outcome::fail("the certificate chain does not lead to a trusted root")
                .cause("a self-signed certificate, a private CA, or a server that sends only the leaf without its intermediate certificates")
                .fixes(fixes::certificate_chain())
        }
        Some(E::InvalidCertificate(other)) => {
            Outcome::fail(format!("the certificate was refused: {other:?}")).fixes(fixes::renew_certificate())
        }
        Some(E::InvalidMessage(_)) | Some(E::InappropriateMessage { .. }) => Outcome::fail(format!("not a TLS server: {error}"))
            .cause("the port answers, but not with TLS: it probably speaks plain HTTP (use ws:// or http://), or TLS is terminated elsewhere")
            .fixes(fixes::tls_port()),
        Some(E::AlertReceived(alert)) => Outcome::fail(format!("the server refused the handshake with the alert {alert:?}"))
            .cause("no matching certificate for this name (SNI), or no protocol version / cipher in common")
            .fixes(fixes::certificate_name(host)),
        _ => Outcome::fail(format!("TLS handshake failed: {error}"))
            .cause("the connection was closed during the handshake, or the server does not speak TLS on this port")
            .fixes(fixes::tls_port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// The civil date `days` from today (Howard Hinnant's days-to-civil).
    fn date_in(days: i64) -> (i32, u8, u8) {
        let z = now_unix() / 86_400 + days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        ((yoe + era * 400 + i64::from(m <= 2)) as i32, m as u8, d as u8)
    }

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem_path: std::path::PathBuf,
    }

    fn ca() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem_path = std::env::temp_dir()
            .join(format!("ferrocast-doctor-ca-{}.pem", ferrocast_server::random_id(8)));
        std::fs::write(&pem_path, cert.pem()).unwrap();
        Ca { issuer: Issuer::new(params, key), pem_path }
    }

    /// A TLS server presenting a leaf for `names`, valid from `from` to `until` days from now.
    async fn server(ca: &Ca, names: &[&str], from: i64, until: i64) -> std::net::SocketAddr {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let ((fy, fm, fd), (uy, um, ud)) = (date_in(from), date_in(until));
        params.not_before = rcgen::date_time_ymd(fy, fm, fd);
        params.not_after = rcgen::date_time_ymd(uy, um, ud);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn run(addr: std::net::SocketAddr, ca: Option<&Path>, insecure: bool) -> (Outcome, bool) {
        let verifying = verifying_config(ca).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (outcome, config) =
            check(tcp, "localhost", verifying, insecure, Duration::from_secs(5), || async move {
                TcpStream::connect(addr).await.ok()
            })
            .await;
        (outcome, config.is_some())
    }

    /// What a browser would get from a ferrocast serving TLS, and from a server without ALPN.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_offer_reports_alpn_http2_and_websockets_over_http2() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca.issuer)
            .unwrap();
        let dir = std::env::temp_dir()
            .join(format!("ferrocast-doctor-{}", ferrocast_server::random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let mut config = ferrocast_server::Config::default();
        config.simulator.enabled = false;
        config.server.tls.cert_file = dir.join("cert.pem").display().to_string();
        config.server.tls.key_file = dir.join("key.pem").display().to_string();
        let tls = ferrocast_server::tls::Tls::from_config(&config.server.tls).unwrap().unwrap();
        let app = ferrocast_server::AppState::new(config, None);
        let gateway = ferrocast_server::Server::bind(app, Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap()
            .with_tls(tls);
        let addr = gateway.local_addr();
        tokio::spawn(gateway.run(std::future::pending()));
        let verifying = verifying_config(Some(&ca.pem_path)).unwrap();

        let tcp = TcpStream::connect(addr).await.unwrap();
        let offer = http_offer(tcp, "localhost", &verifying, "/ws").await.unwrap();
        let expected =
            HttpOffer { alpn: Some("h2".into()), h2_status: Some(200), websocket: Some(Ok(200)) };
        assert_eq!(offer, expected);
        let (lines, data) = offer.describe();
        assert!(lines[1].contains("RFC 8441): accepted"), "{lines:?}");
        assert_eq!(data, json!({"alpn": "h2", "http2": true, "websocket_over_http2": true}));
        // A CONNECT to a path that is not a WebSocket endpoint is refused by the server.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let offer = http_offer(tcp, "localhost", &verifying, "/healthz").await.unwrap();
        assert_eq!(offer.websocket, Some(Ok(405)), "{offer:?}");

        // No ALPN chosen: HTTP/1.1, and nothing is asked over HTTP/2.
        let plain = server(&ca, &["localhost"], -1, 90).await;
        let tcp = TcpStream::connect(plain).await.unwrap();
        let offer = http_offer(tcp, "localhost", &verifying, "/ws").await.unwrap();
        assert_eq!(offer, HttpOffer { alpn: None, h2_status: None, websocket: None });
        let (lines, data) = offer.describe();
        assert!(lines[0].contains("six connections"), "{lines:?}");
        assert_eq!(data["http2"], false);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn verdicts_for_chain_name_and_expiry() {
        let ca = ca();
        let good = server(&ca, &["localhost"], -1, 90).await;
        let (o, usable) = run(good, Some(&ca.pem_path), false).await;
        assert_eq!(o.status, Status::Pass, "{o:?}");
        assert!(o.summary.contains("certificate for localhost valid until"), "{}", o.summary);
        assert!(usable);

        let soon = server(&ca, &["localhost"], -1, 5).await;
        let (o, usable) = run(soon, Some(&ca.pem_path), false).await;
        assert_eq!(o.status, Status::Warn, "{o:?}");
        assert!(o.cause.unwrap().contains("expires in"));
        assert!(usable);

        let expired = server(&ca, &["localhost"], -60, -1).await;
        let (o, usable) = run(expired, Some(&ca.pem_path), false).await;
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(o.summary.contains("expired"), "{}", o.summary);
        assert!(o.details.iter().any(|d| d.starts_with("valid until:")), "{:?}", o.details);
        assert!(!usable);

        let wrong = server(&ca, &["other.example"], -1, 90).await;
        let (o, _) = run(wrong, Some(&ca.pem_path), false).await;
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(o.summary.contains("not valid for localhost"), "{}", o.summary);
        assert!(o.details.iter().any(|d| d == "names: other.example"), "{:?}", o.details);

        // Without the private CA the chain is untrusted; --insecure goes on with a warning.
        let (o, usable) = run(good, None, false).await;
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(o.summary.contains("trusted root"), "{}", o.summary);
        assert!(!usable);
        let (o, usable) = run(good, None, true).await;
        assert_eq!(o.status, Status::Warn, "{o:?}");
        assert!(usable);
        let _ = std::fs::remove_file(&ca.pem_path);
    }

    #[tokio::test]
    async fn plain_http_on_a_tls_url_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ =
                    tcp.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
            }
        });
        let (o, usable) = run(addr, None, false).await;
        assert_eq!(o.status, Status::Fail, "{o:?}");
        assert!(o.summary.contains("not a TLS server"), "{}", o.summary);
        assert!(!usable);
    }

    #[test]
    fn reads_a_certificate() {
        let cert =
            rcgen::generate_simple_self_signed(vec!["push.example.com".into(), "127.0.0.1".into()])
                .unwrap();
        let info = inspect(cert.cert.der()).unwrap();
        assert!(info.names.contains(&"push.example.com".to_string()), "{:?}", info.names);
        assert!(info.names.contains(&"127.0.0.1".to_string()), "{:?}", info.names);
        assert!(info.not_after_unix > now_unix());
    }
}
