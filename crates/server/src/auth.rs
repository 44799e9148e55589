//! Identity: the `[auth]` settings and the verification of JWT connection and subscription
//! tokens.
//!
//! Tokens are verified with the `jsonwebtoken` crate, version 9, which signs and verifies with
//! `ring` (already in the build for rustls): no aws-lc, no cmake, nothing beyond a C compiler.
//!
//! The algorithm is never taken on trust from the token: an HMAC secret accepts only
//! HS256/384/512, a public key only the algorithms of its own kind (RSA: RS*/PS*, EC:
//! ES256/384, Ed25519: EdDSA). `alg: none` and an HMAC token signed with the public key (the
//! classic algorithm confusion) are therefore refused before any signature is checked.
//! Keys from `auth.jwks_url` ([`crate::jwks`]) are chosen by the token's `kid`, with the
//! same rule.
//!
//! A refusal ([`Refusal`]) carries a short metric label (`reason`), the error code the client
//! gets and a message naming the claim or check that failed; the token itself is never logged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine;
use ferrocast_protocol::ErrorCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The `[auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secret for HS256/384/512 tokens; empty for none.
    pub hmac_secret: String,
    /// Name of an environment variable holding the HMAC secret (used when `hmac_secret` is
    /// empty).
    pub hmac_secret_env: String,
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519) for RS*/PS*/ES256/ES384/EdDSA tokens.
    pub public_key_file: String,
    /// URL of a JSON Web Key Set; tokens name their key with `kid`. Empty: none.
    pub jwks_url: String,
    /// How often the key set is fetched again, in milliseconds (a removed key stops
    /// verifying).
    pub jwks_refresh_ms: u64,
    /// An unknown `kid` fetches the key set again at most this often, in milliseconds.
    pub jwks_min_refresh_ms: u64,
    /// Checked against the token's `aud` when set (the claim is then required).
    pub audience: String,
    /// Checked against the token's `iss` when set (the claim is then required).
    pub issuer: String,
    /// Whether connections without a token are served. With `false` a connection that has
    /// not presented a valid token within `auth_timeout_ms` is closed with 4001.
    pub anonymous: bool,
    /// Clock skew tolerated on `exp` and `nbf`, in milliseconds.
    pub leeway_ms: u64,
    /// With `anonymous = false`: how long a connection may stay without a valid token.
    pub auth_timeout_ms: u64,
    /// How long after its token's `exp` a connection that sent no fresh token is closed
    /// with 4011.
    pub expiry_grace_ms: u64,
    /// Name of a cookie holding the connection token (native WebSocket and SSE); empty: off.
    pub cookie: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hmac_secret: String::new(),
            hmac_secret_env: String::new(),
            public_key_file: String::new(),
            jwks_url: String::new(),
            jwks_refresh_ms: 3_600_000,
            jwks_min_refresh_ms: 10_000,
            audience: String::new(),
            issuer: String::new(),
            anonymous: true,
            leeway_ms: 30_000,
            auth_timeout_ms: 5_000,
            expiry_grace_ms: 5_000,
            cookie: String::new(),
        }
    }
}

/// Who a connection is, from a verified token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The token's `sub`; empty means an anonymous token.
    pub user: String,
    /// The token's `exp` (seconds since the epoch), if it has one.
    pub expires_at: Option<u64>,
    /// The token's `info` claim, attached to the connection.
    pub info: Option<serde_json::Value>,
    /// Channels the server subscribes the connection to at connect (`channels` claim).
    pub channels: Vec<String>,
}

/// Why a token or a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Short label for logs and `ferrocast_auth_refused_total{reason}`.
    pub reason: &'static str,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: &'static str, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { reason, code, message: message.into() }
    }

    fn unauthorized(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal::new(reason, ErrorCode::Unauthorized, message)
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    info: Option<serde_json::Value>,
    /// Subscription tokens only.
    channel: Option<String>,
}

/// A key and the algorithms it may verify.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    pub(crate) algorithms: &'static [Algorithm],
}

/// How long one fetch of `auth.jwks_url` may take.
const JWKS_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

const HMAC_ALGS: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
pub(crate) const RSA_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC_ALGS: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
pub(crate) const ED_ALGS: &[Algorithm] = &[Algorithm::EdDSA];

/// The configured verifier, with refusal counters.
pub struct Auth {
    keys: Vec<Key>,
    /// Keys from `auth.jwks_url`, by `kid`.
    pub jwks: Option<std::sync::Arc<crate::jwks::Jwks>>,
    audience: String,
    issuer: String,
    leeway_s: u64,
    pub anonymous: bool,
    pub auth_timeout_ms: u64,
    pub expiry_grace_ms: u64,
    pub cookie: String,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    pub accepted: AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth::from_config(&AuthConfig::default(), &[]).expect("the default needs no keys")
    }
}

impl Auth {
    /// Builds the verifier; `env` resolves `hmac_secret_env`. Errors name the key.
    pub fn from_config(
        config: &AuthConfig,
        env: &[(String, String)],
    ) -> Result<Auth, crate::config::ConfigError> {
        let err =
            |key: &str, reason: String| crate::config::ConfigError { key: key.into(), reason };
        let mut keys = Vec::new();
        let mut secret = config.hmac_secret.clone();
        if secret.is_empty() && !config.hmac_secret_env.is_empty() {
            secret = env
                .iter()
                .find(|(k, _)| *k == config.hmac_secret_env)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    err(
                        "auth.hmac_secret_env",
                        format!("names {:?}, which is not set", config.hmac_secret_env),
                    )
                })?;
        }
        if !secret.is_empty() {
            keys.push(Key {
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: HMAC_ALGS,
            });
        }
        if !config.public_key_file.is_empty() {
            let pem = std::fs::read(&config.public_key_file).map_err(|e| {
                err(
                    "auth.public_key_file",
                    format!("cannot read {:?}: {e}", config.public_key_file),
                )
            })?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                Key { key: k, algorithms: RSA_ALGS }
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                Key { key: k, algorithms: EC_ALGS }
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                Key { key: k, algorithms: ED_ALGS }
            } else {
                return Err(err(
                    "auth.public_key_file",
                    format!(
                        "{:?} is not a PEM public key (RSA, EC P-256/P-384 or Ed25519)",
                        config.public_key_file
                    ),
                ));
            };
            keys.push(key);
        }
        let jwks = if config.jwks_url.is_empty() {
            None
        } else {
            let parsed = url::Url::parse(&config.jwks_url).ok();
            if !parsed.as_ref().is_some_and(|u| ["http", "https"].contains(&u.scheme())) {
                return Err(err(
                    "auth.jwks_url",
                    format!("{:?} is not an http:// or https:// URL", config.jwks_url),
                ));
            }
            Some(std::sync::Arc::new(crate::jwks::Jwks::new(
                config.jwks_url.clone(),
                std::time::Duration::from_millis(config.jwks_refresh_ms.max(1000)),
                std::time::Duration::from_millis(config.jwks_min_refresh_ms),
                JWKS_FETCH_TIMEOUT,
            )))
        };
        if !config.anonymous && keys.is_empty() && jwks.is_none() {
            return Err(err(
                "auth.anonymous",
                "false needs a key to verify tokens (auth.hmac_secret, auth.hmac_secret_env, auth.public_key_file or auth.jwks_url)".into(),
            ));
        }
        Ok(Auth {
            keys,
            jwks,
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway_s: config.leeway_ms.div_ceil(1000),
            anonymous: config.anonymous,
            auth_timeout_ms: config.auth_timeout_ms,
            expiry_grace_ms: config.expiry_grace_ms,
            cookie: config.cookie.clone(),
            refused: Mutex::new(BTreeMap::new()),
            accepted: AtomicU64::new(0),
        })
    }

    /// Whether any key is configured (tokens can be verified at all).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.jwks.is_some()
    }

    /// Counts a refusal by reason (for `/metrics`).
    pub fn count_refusal(&self, reason: &'static str) {
        *self.refused.lock().entry(reason).or_default() += 1;
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        self.refused.lock().iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// The `ferrocast_auth_*` metric families.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        crate::metrics::family(
            &mut out,
            "ferrocast_auth_tokens_accepted_total",
            "counter",
            "Tokens (connection and subscription) that verified.",
        );
        out.push_str(&format!(
            "ferrocast_auth_tokens_accepted_total {}\n",
            self.accepted.load(Relaxed)
        ));
        crate::metrics::family(
            &mut out,
            "ferrocast_auth_refused_total",
            "counter",
            "Refused tokens and requests refused by an auth rule, by reason.",
        );
        for (reason, n) in self.refusals() {
            out.push_str(&format!("ferrocast_auth_refused_total{{reason=\"{reason}\"}} {n}\n"));
        }
        if let Some(jwks) = &self.jwks {
            crate::metrics::family(
                &mut out,
                "ferrocast_auth_jwks_fetches_total",
                "counter",
                "Fetches of auth.jwks_url, by result.",
            );
            for (result, n) in [("ok", &jwks.fetches_ok), ("error", &jwks.fetches_failed)] {
                out.push_str(&format!(
                    "ferrocast_auth_jwks_fetches_total{{result=\"{result}\"}} {}\n",
                    n.load(Relaxed)
                ));
            }
            crate::metrics::family(
                &mut out,
                "ferrocast_auth_jwks_keys",
                "gauge",
                "Keys of the auth.jwks_url key set in use.",
            );
            out.push_str(&format!("ferrocast_auth_jwks_keys {}\n", jwks.len()));
        }
        out
    }

    /// Verifies a connection token.
    pub fn verify_connection(&self, token: &str) -> Result<Identity, Refusal> {
        let claims = self.decode(token)?;
        if claims.channel.is_some() {
            return Err(Refusal::unauthorized(
                "wrong_token_kind",
                "this is a subscription token (it has a \"channel\" claim); connect with a connection token",
            ));
        }
        Ok(Identity {
            user: claims.sub,
            expires_at: claims.exp,
            info: claims.info,
            channels: claims.channels,
        })
    }

    /// Verifies a subscription token for `channel`, presented by a connection of `user`.
    pub fn verify_subscription(
        &self,
        token: &str,
        user: &str,
        channel: &str,
    ) -> Result<(), Refusal> {
        let claims = self.decode(token)?;
        let Some(claimed) = claims.channel else {
            return Err(Refusal::new(
                "subscription_token_channel",
                ErrorCode::Forbidden,
                "the subscription token has no \"channel\" claim",
            ));
        };
        if claimed != channel {
            return Err(Refusal::new(
                "subscription_token_channel",
                ErrorCode::Forbidden,
                format!("the subscription token's \"channel\" claim is not {channel:?}"),
            ));
        }
        if claims.sub != user {
            return Err(Refusal::new(
                "subscription_token_sub",
                ErrorCode::Forbidden,
                "the subscription token's \"sub\" claim is not this connection's user",
            ));
        }
        Ok(())
    }

    fn decode(&self, token: &str) -> Result<Claims, Refusal> {
        if !self.enabled() {
            return Err(Refusal::unauthorized(
                "no_keys",
                "this server verifies no tokens (no auth.hmac_secret, auth.public_key_file or auth.jwks_url configured)",
            ));
        }
        let header = read_header(token)?;
        let alg_name = header.alg;
        let static_key = || {
            self.keys.iter().find_map(|k| {
                k.algorithms.iter().find(|a| alg_str(**a) == alg_name).map(|a| (k, *a))
            })
        };
        let from_set;
        let chosen = match (&self.jwks, header.kid) {
            (Some(jwks), Some(kid)) => match jwks.key(&kid) {
                crate::jwks::Lookup::Found(key) => {
                    from_set = key;
                    let Some(alg) =
                        from_set.algorithms.iter().find(|a| alg_str(**a) == alg_name).copied()
                    else {
                        let accepted: Vec<&str> =
                            from_set.algorithms.iter().map(|a| alg_str(*a)).collect();
                        return Err(Refusal::unauthorized(
                            "algorithm",
                            format!(
                                "the token's alg {alg_name:?} is not one its key {kid:?} verifies (accepted: {})",
                                accepted.join(", ")
                            ),
                        ));
                    };
                    Some((&*from_set, alg))
                }
                crate::jwks::Lookup::Unknown(message) => match static_key() {
                    Some(found) => Some(found),
                    None => return Err(Refusal::unauthorized("unknown_kid", message)),
                },
            },
            (Some(_), None) if static_key().is_none() => {
                return Err(Refusal::unauthorized(
                    "unknown_kid",
                    "the token has no \"kid\": keys from auth.jwks_url are chosen by kid",
                ));
            }
            _ => static_key(),
        };
        let Some((key, alg)) = chosen else {
            let accepted: Vec<&str> =
                self.keys.iter().flat_map(|k| k.algorithms.iter().map(|a| alg_str(*a))).collect();
            return Err(Refusal::unauthorized(
                "algorithm",
                format!(
                    "the token's alg {alg_name:?} is not accepted by this server's keys (accepted: {})",
                    accepted.join(", ")
                ),
            ));
        };
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = self.leeway_s;
        validation.validate_nbf = true;
        let mut required: Vec<&str> = Vec::new();
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&[&self.issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => {
                self.accepted.fetch_add(1, Relaxed);
                Ok(data.claims)
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::new(
                    "expired",
                    ErrorCode::TokenExpired,
                    "the token's \"exp\" is in the past: get a new token",
                ),
                ErrorKind::ImmatureSignature => {
                    Refusal::unauthorized("not_yet_valid", "the token's \"nbf\" is in the future")
                }
                ErrorKind::InvalidAudience => Refusal::unauthorized(
                    "audience",
                    "the token's \"aud\" claim does not name this server (auth.audience)",
                ),
                ErrorKind::InvalidIssuer => Refusal::unauthorized(
                    "issuer",
                    "the token's \"iss\" claim is not the configured issuer (auth.issuer)",
                ),
                ErrorKind::MissingRequiredClaim(claim) => Refusal::unauthorized(
                    "missing_claim",
                    format!("the token has no {claim:?} claim, which this server requires"),
                ),
                ErrorKind::InvalidSignature => {
                    Refusal::unauthorized("signature", "the token's signature does not verify")
                }
                ErrorKind::Json(_) => Refusal::unauthorized(
                    "claims",
                    "the token's claims are not valid (sub must be a string, exp/nbf/iat numbers, channels a list of strings)",
                ),
                _ => Refusal::unauthorized(
                    "malformed",
                    "the token is not a well-formed JWT (three base64url parts)",
                ),
            }),
        }
    }
}

/// What a token's header says, read before anything is trusted.
struct TokenHeader {
    alg: String,
    kid: Option<String>,
}

fn read_header(token: &str) -> Result<TokenHeader, Refusal> {
    let malformed = || {
        Refusal::unauthorized(
            "malformed",
            "the token is not a well-formed JWT (three base64url parts)",
        )
    };
    let header = token.split('.').next().ok_or_else(malformed)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed())?;
    #[derive(Deserialize)]
    struct Header {
        alg: Option<String>,
        kid: Option<String>,
    }
    let header: Header = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    match header.alg {
        None => Err(Refusal::unauthorized("algorithm", "the token's header has no \"alg\"")),
        Some(a) if a.eq_ignore_ascii_case("none") => Err(Refusal::unauthorized(
            "algorithm",
            "the token's alg \"none\" is never accepted: tokens must be signed",
        )),
        Some(alg) => Ok(TokenHeader { alg, kid: header.kid }),
    }
}

fn alg_str(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// A token presented in an HTTP request: `Authorization: Bearer` (scheme case-insensitive),
/// the `token` query parameter, or the configured cookie, in that order.
pub fn token_from_request(
    headers: &http::HeaderMap,
    query: Option<&str>,
    cookie_name: &str,
) -> Option<String> {
    if let Some(token) = bearer(headers) {
        return Some(token);
    }
    if let Some(query) = query {
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("token=") {
                let value = percent_decode(value);
                if !value.is_empty() {
                    return Some(value);
                }
            }
        }
    }
    if !cookie_name.is_empty() {
        for header in headers.get_all(http::header::COOKIE) {
            let Ok(text) = header.to_str() else { continue };
            for part in text.split(';') {
                if let Some((name, value)) = part.trim().split_once('=')
                    && name == cookie_name
                    && !value.is_empty()
                {
                    return Some(value.trim_matches('"').to_owned());
                }
            }
        }
    }
    None
}

/// The credentials of an `Authorization: Bearer ...` header.
pub fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty()).then(|| rest.to_owned())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn hmac(secret: &str) -> Auth {
        let config = AuthConfig { hmac_secret: secret.into(), ..AuthConfig::default() };
        Auth::from_config(&config, &[]).unwrap()
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_token_and_reads_its_claims() {
        let auth = hmac("s3cret");
        let exp = now_s() + 60;
        let token = sign(
            serde_json::json!({"sub":"42","exp":exp,"channels":["a.b"],"info":{"n":1}}),
            "s3cret",
        );
        let id = auth.verify_connection(&token).unwrap();
        assert_eq!(id.user, "42");
        assert_eq!(id.expires_at, Some(exp));
        assert_eq!(id.channels, ["a.b"]);
        assert_eq!(id.info, Some(serde_json::json!({"n":1})));
    }

    #[test]
    fn refusals_name_the_check() {
        let auth = hmac("s3cret");
        let old = now_s() - 3600;
        let cases = [
            (sign(serde_json::json!({"sub":"1","exp":old}), "s3cret"), "expired"),
            (sign(serde_json::json!({"sub":"1","nbf":now_s()+3600}), "s3cret"), "not_yet_valid"),
            (sign(serde_json::json!({"sub":"1"}), "other"), "signature"),
            ("not-a-jwt".into(), "malformed"),
            ("e30.e30.x".into(), "algorithm"),
            ("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.".into(), "algorithm"),
        ];
        for (token, reason) in cases {
            assert_eq!(auth.verify_connection(&token).unwrap_err().reason, reason, "{token}");
        }
        let expired = sign(serde_json::json!({"sub":"1","exp":old}), "s3cret");
        assert_eq!(auth.verify_connection(&expired).unwrap_err().code, ErrorCode::TokenExpired);
    }

    #[test]
    fn leeway_tolerates_small_skew() {
        let auth = hmac("k");
        let just_expired = sign(serde_json::json!({"sub":"1","exp":now_s() - 5}), "k");
        assert!(auth.verify_connection(&just_expired).is_ok());
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let config = AuthConfig {
            hmac_secret: "k".into(),
            audience: "ferrocast".into(),
            issuer: "https://app".into(),
            ..AuthConfig::default()
        };
        let auth = Auth::from_config(&config, &[]).unwrap();
        let ok = sign(serde_json::json!({"sub":"1","aud":"ferrocast","iss":"https://app"}), "k");
        assert!(auth.verify_connection(&ok).is_ok());
        let no_iss = sign(serde_json::json!({"sub":"1","aud":"ferrocast"}), "k");
        assert_eq!(auth.verify_connection(&no_iss).unwrap_err().reason, "missing_claim");
        let bad_aud = sign(serde_json::json!({"sub":"1","aud":"x","iss":"https://app"}), "k");
        assert_eq!(auth.verify_connection(&bad_aud).unwrap_err().reason, "audience");
        let bad_iss = sign(serde_json::json!({"sub":"1","aud":"ferrocast","iss":"y"}), "k");
        assert_eq!(auth.verify_connection(&bad_iss).unwrap_err().reason, "issuer");
    }

    #[test]
    fn subscription_tokens_match_channel_and_user() {
        let auth = hmac("k");
        let t = sign(serde_json::json!({"sub":"42","channel":"pay.eu"}), "k");
        assert!(auth.verify_subscription(&t, "42", "pay.eu").is_ok());
        assert_eq!(
            auth.verify_subscription(&t, "43", "pay.eu").unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            auth.verify_subscription(&t, "42", "pay.us").unwrap_err().reason,
            "subscription_token_channel"
        );
        assert_eq!(auth.verify_connection(&t).unwrap_err().reason, "wrong_token_kind");
    }

    #[test]
    fn secret_from_env_and_anonymous_false_needs_a_key() {
        let config = AuthConfig { hmac_secret_env: "JWT_KEY".into(), ..AuthConfig::default() };
        assert!(Auth::from_config(&config, &[]).unwrap_err().reason.contains("not set"));
        let env = [("JWT_KEY".to_string(), "k".to_string())];
        assert!(Auth::from_config(&config, &env).unwrap().enabled());
        let closed = AuthConfig { anonymous: false, ..AuthConfig::default() };
        assert_eq!(Auth::from_config(&closed, &[]).unwrap_err().key, "auth.anonymous");
    }

    #[test]
    fn tokens_from_header_query_and_cookie() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(token_from_request(&headers, Some("a=1&token=x%2Ey"), ""), Some("x.y".into()));
        headers.insert(http::header::COOKIE, "a=1; fc_token=c.d".parse().unwrap());
        assert_eq!(token_from_request(&headers, None, "fc_token"), Some("c.d".into()));
        assert_eq!(token_from_request(&headers, None, ""), None);
        headers.insert(http::header::AUTHORIZATION, "bearer h.i".parse().unwrap());
        assert_eq!(token_from_request(&headers, Some("token=q"), "fc_token"), Some("h.i".into()));
    }
}
