//! Verification keys fetched from `auth.jwks_url` (a JSON Web Key Set, RFC 7517), chosen by a
//! token's `kid`.
//!
//! The set is fetched at startup and again every `auth.jwks_refresh_ms`, so a key removed
//! from the set stops verifying. A token whose `kid` is not in the cached set makes the
//! server fetch the set at once (the issuer may have rotated its keys), at most once per
//! `auth.jwks_min_refresh_ms`: a stream of made-up `kid`s costs one fetch per interval, never
//! one per token. A failed fetch keeps the keys already known.
//!
//! Each key verifies only the algorithms of its own kind (RSA: RS*/PS*; EC P-256: ES256;
//! P-384: ES384; Ed25519: EdDSA), narrowed to its `alg` when the set names one. Symmetric
//! (`oct`) keys and keys marked `"use":"enc"` are ignored: a key set is public, and an HMAC
//! key published in it would let anyone sign.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;

use crate::auth::{ED_ALGS, Key, RSA_ALGS};

/// Largest key set accepted, in bytes.
const MAX_SET_BYTES: usize = 1024 * 1024;

/// The fetched keys and when they were fetched.
#[derive(Default)]
struct State {
    keys: HashMap<String, Arc<Key>>,
    /// When the last fetch (successful or not) started.
    attempted: Option<Instant>,
}

/// A cached key set.
pub struct Jwks {
    url: String,
    pub refresh: Duration,
    min_refresh: Duration,
    timeout: Duration,
    state: RwLock<State>,
    /// One fetch at a time; a caller that waited for another's fetch uses its result.
    fetching: tokio::sync::Mutex<()>,
    pub fetches_ok: AtomicU64,
    pub fetches_failed: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Where a `kid` was found.
pub(crate) enum Lookup {
    Found(Arc<Key>),
    /// Not in the set, even after a fetch (or a fetch was not allowed yet): the message says
    /// which.
    Unknown(String),
}

impl Jwks {
    pub fn new(url: String, refresh: Duration, min_refresh: Duration, timeout: Duration) -> Self {
        Jwks {
            url,
            refresh,
            min_refresh,
            timeout,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
        }
    }

    /// How many keys are cached.
    pub fn len(&self) -> usize {
        self.state.read().keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key named `kid`, fetching the set again first when it is unknown and the last
    /// fetch is at least `jwks_min_refresh_ms` old. Called from synchronous code: the fetch
    /// is waited for with the worker thread handed over to other tasks.
    pub(crate) fn key(&self, kid: &str) -> Lookup {
        if let Some(key) = self.state.read().keys.get(kid) {
            return Lookup::Found(key.clone());
        }
        let since = self.state.read().attempted.map(|t| t.elapsed());
        if since.is_some_and(|s| s < self.min_refresh) {
            return Lookup::Unknown(format!(
                "the token's \"kid\" {kid:?} is not in the key set of auth.jwks_url (fetched {} ms ago; \
                 an unknown kid fetches it again at most every {} ms)",
                since.unwrap_or_default().as_millis(),
                self.min_refresh.as_millis()
            ));
        }
        let fetched = crate::block_on(self.fetch_if_older(Instant::now()));
        match self.state.read().keys.get(kid) {
            Some(key) => Lookup::Found(key.clone()),
            None => Lookup::Unknown(match fetched {
                Ok(()) => format!(
                    "the token's \"kid\" {kid:?} is not in the key set of auth.jwks_url, even fetched again"
                ),
                Err(e) => format!(
                    "the token's \"kid\" {kid:?} is not among the keys known, and fetching auth.jwks_url failed: {e}"
                ),
            }),
        }
    }

    /// Fetches the set unless a fetch started at or after `wanted_after` (another caller's,
    /// which this one waited for).
    async fn fetch_if_older(&self, wanted_after: Instant) -> Result<(), String> {
        let _one_at_a_time = self.fetching.lock().await;
        if self.state.read().attempted.is_some_and(|t| t >= wanted_after) {
            return Ok(());
        }
        self.fetch().await
    }

    /// Fetches the set and replaces the cached keys with it; a failure keeps them.
    pub async fn fetch(&self) -> Result<(), String> {
        self.state.write().attempted = Some(Instant::now());
        let result = async {
            let response =
                ferrocast_feeds::http::get(&self.url, self.timeout, MAX_SET_BYTES).await?;
            if response.status != 200 {
                return Err(format!("auth.jwks_url answered HTTP {}", response.status));
            }
            parse_set(&response.body)
        }
        .await;
        match result {
            Ok((keys, skipped)) => {
                self.fetches_ok.fetch_add(1, Relaxed);
                tracing::info!(keys = keys.len(), skipped, "fetched the key set of auth.jwks_url");
                self.state.write().keys = keys;
                Ok(())
            }
            Err(e) => {
                self.fetches_failed.fetch_add(1, Relaxed);
                tracing::warn!("fetching auth.jwks_url failed (the keys already known stay): {e}");
                Err(e)
            }
        }
    }

    /// Fetches the set now and then every `refresh`, for the life of the process.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            let _ = self.fetch_if_older(Instant::now()).await;
            tokio::time::sleep(self.refresh).await;
        }
    }
}

/// The usable keys of a JWKS document, by `kid`, and how many were skipped.
pub(crate) fn parse_set(body: &[u8]) -> Result<(HashMap<String, Arc<Key>>, usize), String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body)
        .map_err(|e| format!("the key set is not a JWKS document ({{\"keys\":[...]}}): {e}"))?;
    let mut keys = HashMap::new();
    let mut skipped = 0;
    for value in set.keys {
        let usable = serde_json::from_value::<Jwk>(value).ok().and_then(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            Some((kid, usable_key(&jwk)?))
        });
        match usable {
            Some((kid, key)) => {
                keys.insert(kid, Arc::new(key));
            }
            None => skipped += 1,
        }
    }
    Ok((keys, skipped))
}

/// A signature-verifying key and its algorithms, or `None` for keys this server will not use.
fn usable_key(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let kind: &'static [Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA_ALGS,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => ED_ALGS,
        _ => return None,
    };
    let algorithms: &'static [Algorithm] = match jwk.common.key_algorithm {
        None => kind,
        Some(named) => {
            let name = format!("{named:?}");
            let position = kind.iter().position(|a| format!("{a:?}") == name)?;
            &kind[position..=position]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key { key, algorithms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_signing_keys_with_a_kid_and_narrows_to_their_alg() {
        let set = br#"{"keys":[
            {"kty":"RSA","kid":"r1","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB","alg":"PS256"},
            {"kty":"RSA","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"oct","kid":"h1","k":"c2VjcmV0"},
            {"kty":"OKP","kid":"e1","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"weird","kid":"w"}
        ]}"#;
        let (keys, skipped) = parse_set(set).unwrap();
        assert_eq!(skipped, 4, "no kid, oct, enc, unknown kty");
        assert_eq!(keys["r1"].algorithms, &[Algorithm::PS256]);
        assert_eq!(keys["e1"].algorithms, ED_ALGS);
        assert!(parse_set(b"[]").err().is_some_and(|e| e.contains("JWKS")));
    }
}
