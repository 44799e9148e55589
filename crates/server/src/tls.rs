//! TLS served directly (`[server.tls]`): `wss://` and `https://` on the listening port, with
//! rustls (the `ring` provider) and HTTP/2 offered by ALPN.
//!
//! - [`Tls::from_config`] reads the PEM certificate chain and private key, checks that the
//!   key matches the certificate, and refuses a bad pair with an error naming the key of the
//!   configuration (`serve` then exits with 2).
//! - [`Tls::reload`] (the binary calls it on SIGHUP) reads both files again and, only if
//!   they make a valid pair, swaps them in: handshakes from then on use the new certificate,
//!   connections already open keep theirs. A bad pair is logged and counted, and the old one
//!   stays.
//! - [`Tls::accept`] runs one handshake (bounded by `server.header_read_timeout_ms` in the
//!   accept path) and reports what was negotiated as a [`Negotiated`], which every request of
//!   the connection carries as an extension (`/api/diagnostics` shows it).
//!
//! ALPN offers `h2` then `http/1.1`: browsers get HTTP/2 (many SSE streams and API requests
//! share one connection, so the six-connections-per-origin limit of HTTP/1.1 no longer
//! starves an SSE dashboard), and WebSocket clients, which offer only `http/1.1`, get the
//! HTTP/1.1 upgrade. See [`crate::serve_connection`] for what HTTP/2 serves.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics::family;

/// The `[server.tls]` table: both files set, or neither.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain: the server's certificate first, then its intermediates.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of the first certificate.
    pub key_file: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }

    /// The problems a configuration check can see without reading the files.
    pub fn problems(&self) -> Vec<(String, String)> {
        match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (false, true) => vec![(
                "server.tls.key_file".into(),
                "must be set with server.tls.cert_file (the certificate's private key)".into(),
            )],
            (true, false) => vec![(
                "server.tls.cert_file".into(),
                "must be set with server.tls.key_file (the certificate chain)".into(),
            )],
            _ => Vec::new(),
        }
    }
}

/// A certificate or key that cannot be served, naming the configuration key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsError {
    pub key: &'static str,
    pub reason: String,
}

fn error(key: &'static str, reason: impl Into<String>) -> TlsError {
    TlsError { key, reason: reason.into() }
}

/// What a connection's handshake settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// `h2`, `http/1.1`, or `None` when the client offered no ALPN (HTTP/1.1 then).
    pub alpn: Option<&'static str>,
}

impl Negotiated {
    fn of(conn: &rustls::ServerConnection) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let alpn = match conn.alpn_protocol() {
            Some(b"h2") => Some("h2"),
            Some(b"http/1.1") => Some("http/1.1"),
            _ => None,
        };
        Negotiated { version, alpn }
    }

    pub fn is_h2(&self) -> bool {
        self.alpn == Some("h2")
    }
}

/// The TLS acceptor and its reloadable certificate.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    config: TlsConfig,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("config", &self.config).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    handshakes: AtomicU64,
    handshake_failures: AtomicU64,
    handshake_timeouts: AtomicU64,
    websockets_h1: AtomicU64,
    websockets_h2: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// The served certificate's `notAfter`, in seconds since the epoch (0: unknown).
    not_after: AtomicI64,
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// The acceptor for `config`, or `None` when TLS is off.
    pub fn from_config(config: &TlsConfig) -> Result<Option<Tls>, TlsError> {
        if !config.enabled() {
            return Ok(None);
        }
        let (key, not_after) = load(config)?;
        let resolver = Arc::new(Resolver { current: RwLock::new(Arc::new(key)) });
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| error("server.tls", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let counters = Arc::new(Counters::default());
        counters.not_after.store(not_after, Relaxed);
        Ok(Some(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            config: config.clone(),
            counters,
        }))
    }

    /// Reads the files again and serves the new pair from the next handshake on; on error
    /// the current pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load(&self.config) {
            Ok((key, not_after)) => {
                *self.resolver.current.write() = Arc::new(key);
                self.counters.not_after.store(not_after, Relaxed);
                self.counters.reloads_ok.fetch_add(1, Relaxed);
                tracing::info!(
                    cert_file = self.config.cert_file,
                    not_after,
                    "TLS certificate reloaded; new handshakes use it, open connections keep theirs"
                );
                Ok(())
            }
            Err(e) => {
                self.counters.reloads_failed.fetch_add(1, Relaxed);
                tracing::error!("TLS reload failed, still serving the previous certificate: {e}");
                Err(e)
            }
        }
    }

    /// Runs the server side of a handshake.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<(TlsStream<IO>, Negotiated)>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match self.acceptor.accept(io).await {
            Ok(stream) => {
                self.counters.handshakes.fetch_add(1, Relaxed);
                let negotiated = Negotiated::of(stream.get_ref().1);
                Ok((stream, negotiated))
            }
            Err(e) => {
                self.counters.handshake_failures.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Counts a handshake that did not finish within the header timeout.
    pub fn count_handshake_timeout(&self) {
        self.counters.handshake_timeouts.fetch_add(1, Relaxed);
    }

    /// Counts a WebSocket (native or Socket.IO) accepted over TLS, by the HTTP version of its
    /// handshake.
    pub fn count_websocket(&self, http2: bool) {
        let n = if http2 { &self.counters.websockets_h2 } else { &self.counters.websockets_h1 };
        n.fetch_add(1, Relaxed);
    }

    /// The `ferrocast_tls_*` metric families.
    pub fn render_metrics(&self) -> String {
        let c = &self.counters;
        let mut out = String::new();
        family(&mut out, "ferrocast_tls_handshakes_total", "counter", "TLS handshakes, by result.");
        for (result, n) in [
            ("ok", &c.handshakes),
            ("failed", &c.handshake_failures),
            ("timeout", &c.handshake_timeouts),
        ] {
            let _ = writeln!(
                out,
                "ferrocast_tls_handshakes_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_tls_websockets_total",
            "counter",
            "WebSockets (native and Socket.IO) opened over TLS, by handshake: HTTP/1.1 \
             upgrade or HTTP/2 extended CONNECT (RFC 8441).",
        );
        for (http, n) in [("1.1", &c.websockets_h1), ("2", &c.websockets_h2)] {
            let _ = writeln!(
                out,
                "ferrocast_tls_websockets_total{{http=\"{http}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_tls_reloads_total",
            "counter",
            "Certificate reloads (SIGHUP), by result.",
        );
        for (result, n) in [("ok", &c.reloads_ok), ("failed", &c.reloads_failed)] {
            let _ = writeln!(
                out,
                "ferrocast_tls_reloads_total{{result=\"{result}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the served certificate expires (notAfter), in seconds since the epoch.",
        );
        let _ = writeln!(
            out,
            "ferrocast_tls_certificate_expiry_timestamp_seconds {}",
            c.not_after.load(Relaxed)
        );
        out
    }
}

/// Reads and checks the pair; returns it with the certificate's `notAfter`.
fn load(config: &TlsConfig) -> Result<(CertifiedKey, i64), TlsError> {
    const CERT: &str = "server.tls.cert_file";
    const KEY: &str = "server.tls.key_file";
    let cert_path = Path::new(&config.cert_file);
    let key_path = Path::new(&config.key_file);
    let cert_text = std::fs::read(cert_path)
        .map_err(|e| error(CERT, format!("cannot read {}: {e}", cert_path.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<_, _>>()
        .map_err(|e| error(CERT, format!("{} is not a PEM file: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(error(
            CERT,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                cert_path.display()
            ),
        ));
    }
    let key_text = std::fs::read(key_path)
        .map_err(|e| error(KEY, format!("cannot read {}: {e}", key_path.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| {
        error(KEY, format!("{} holds no usable PEM private key: {e}", key_path.display()))
    })?;
    let not_after = x509_parser::parse_x509_certificate(&certs[0])
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|e| {
            error(
                CERT,
                format!("the first certificate of {} is not X.509: {e}", cert_path.display()),
            )
        })?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => error(
            KEY,
            format!(
                "the key in {} does not match the certificate in {} ({CERT})",
                key_path.display(),
                cert_path.display()
            ),
        ),
        other => error(KEY, format!("{}: {other}", key_path.display())),
    })?;
    Ok((certified, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrocast-tls-{}", crate::random_id(12)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_valid_pair_loads_and_bad_ones_name_their_key() {
        let dir = tempdir();
        let (cert, key) = pair("localhost");
        let (_, other_key) = pair("localhost");
        let config = |c: &str, k: &str| TlsConfig { cert_file: c.into(), key_file: k.into() };
        let cert_file = write(&dir, "cert.pem", &cert);
        let key_file = write(&dir, "key.pem", &key);
        assert!(Tls::from_config(&config(&cert_file, &key_file)).unwrap().is_some());
        assert!(Tls::from_config(&TlsConfig::default()).unwrap().is_none());

        let missing = dir.join("missing.pem").display().to_string();
        let e = Tls::from_config(&config(&missing, &key_file)).unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.reason.contains("cannot read"), "{e}");
        let e = Tls::from_config(&config(&cert_file, &missing)).unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");

        let garbage = write(&dir, "garbage.pem", "not a certificate\n");
        let e = Tls::from_config(&config(&garbage, &key_file)).unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.reason.contains("no PEM certificate"), "{e}");
        let e = Tls::from_config(&config(&cert_file, &garbage)).unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.reason.contains("private key"), "{e}");

        let wrong_key = write(&dir, "wrong.pem", &other_key);
        let e = Tls::from_config(&config(&cert_file, &wrong_key)).unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.reason.contains("does not match"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_reload_keeps_the_current_pair() {
        let dir = tempdir();
        let (cert, key) = pair("localhost");
        let cert_file = write(&dir, "cert.pem", &cert);
        let key_file = write(&dir, "key.pem", &key);
        let tls = Tls::from_config(&TlsConfig { cert_file: cert_file.clone(), key_file })
            .unwrap()
            .unwrap();
        let before = tls.resolver.current.read().cert[0].clone();
        write(&dir, "cert.pem", "broken");
        assert_eq!(tls.reload().unwrap_err().key, "server.tls.cert_file");
        assert_eq!(tls.resolver.current.read().cert[0], before);
        let (cert, key) = pair("localhost");
        write(&dir, "cert.pem", &cert);
        write(&dir, "key.pem", &key);
        tls.reload().unwrap();
        assert_ne!(tls.resolver.current.read().cert[0], before);
        let metrics = tls.render_metrics();
        assert!(metrics.contains("ferrocast_tls_reloads_total{result=\"failed\"} 1"), "{metrics}");
        assert!(metrics.contains("ferrocast_tls_reloads_total{result=\"ok\"} 1"), "{metrics}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
