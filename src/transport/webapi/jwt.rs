//! JWT bearer tokens (`auth = "jwt"`): RS256 access tokens of an OpenID
//! issuer such as Entra ID, verified with `jsonwebtoken` against the
//! issuer's JWKS (fetched on first use, cached for an hour, fetched again
//! when a token names a key not yet seen — at most once a minute, so forged
//! key ids cannot make us hammer the issuer). `iss`, `aud`, `exp` and `nbf`
//! are checked with the configured clock skew; the role is the highest of
//! the token's `roles` claim (`read`, `write`, `retention`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::auth::Caller;
use crate::config::{JwtConfig, Role};
use crate::http_client::{Endpoint, HttpClient};

/// Keys are fetched again after this long, whatever tokens arrive.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// At most one fetch for an unknown key id per this long.
const REFETCH_INTERVAL: Duration = Duration::from_secs(60);

struct Keys {
    by_id: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
}

pub struct JwtVerifier {
    config: JwtConfig,
    client: Arc<HttpClient>,
    keys: Mutex<Keys>,
    refetch_interval: Duration,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    sub: Option<String>,
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<JwtVerifier, String> {
        let endpoint = Endpoint::parse(&config.jwks_url).map_err(|e| format!("api.jwt.jwks_url: {e}"))?;
        let client = HttpClient::new(endpoint, Duration::from_secs(10))?;
        Ok(JwtVerifier {
            config: config.clone(),
            client: Arc::new(client),
            keys: Mutex::new(Keys { by_id: HashMap::new(), fetched: None, last_attempt: None }),
            refetch_interval: REFETCH_INTERVAL,
        })
    }

    /// The caller a token proves, or why it proves nothing (never the token).
    pub async fn verify(&self, token: &str) -> Result<Caller, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "the bearer token is not a JWT".to_owned())?;
        if header.alg != Algorithm::RS256 {
            return Err(format!("the token is signed with {:?}; only RS256 is accepted", header.alg));
        }
        let kid = header.kid.ok_or("the token names no signing key (kid)")?;
        let key = match self.cached(&kid, false) {
            Some(key) => key,
            None => {
                self.refresh().await;
                // Keys past their hour still verify when the issuer could not be reached.
                self.cached(&kid, true).ok_or("the token's signing key is not one of the issuer's")?
            }
        };
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.leeway = self.config.leeway_seconds;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                ErrorKind::ImmatureSignature => "the token is not valid yet".to_owned(),
                ErrorKind::InvalidIssuer => "the token is from another issuer".to_owned(),
                ErrorKind::InvalidAudience => "the token is for another audience".to_owned(),
                ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
                _ => format!("the token is not valid ({e})"),
            }
        })?;
        let claims = data.claims;
        let role = claims
            .roles
            .iter()
            .filter_map(|r| match r.as_str() {
                "read" => Some(Role::Read),
                "write" => Some(Role::Write),
                "retention" => Some(Role::Retention),
                _ => None,
            })
            .max()
            .ok_or("the token's roles claim holds none of read, write, retention")?;
        let name = claims.name.or(claims.azp).or(claims.appid).or(claims.sub).unwrap_or_else(|| "jwt".into());
        Ok(Caller { name, role })
    }

    fn cached(&self, kid: &str, allow_stale: bool) -> Option<DecodingKey> {
        let keys = self.keys.lock().ok()?;
        if !allow_stale && keys.fetched.is_none_or(|at| at.elapsed() > KEYS_TTL) {
            return None;
        }
        keys.by_id.get(kid).cloned()
    }

    /// Fetches the issuer's keys unless that was tried a moment ago; on a
    /// failure the keys already known stay in use.
    async fn refresh(&self) {
        {
            let Ok(mut keys) = self.keys.lock() else { return };
            if keys.last_attempt.is_some_and(|at| at.elapsed() < self.refetch_interval)
                && keys.fetched.is_some_and(|at| at.elapsed() <= KEYS_TTL)
            {
                return;
            }
            keys.last_attempt = Some(Instant::now());
        }
        let client = Arc::clone(&self.client);
        let fetched =
            tokio::task::spawn_blocking(move || client.request("GET", "", &[("Accept", "application/json")], &[]))
                .await;
        let set = match fetched {
            Ok(Ok(response)) if response.status == 200 => {
                serde_json::from_slice::<JwkSet>(&response.body).map_err(|e| format!("the JWKS is not a key set: {e}"))
            }
            Ok(Ok(response)) => Err(format!("the JWKS URL answered {}", response.status)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match set {
            Ok(set) => {
                let by_id: HashMap<String, DecodingKey> = set
                    .keys
                    .iter()
                    .filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?)))
                    .collect();
                tracing::info!(keys = by_id.len(), "Web API: the issuer's signing keys were fetched");
                if let Ok(mut keys) = self.keys.lock() {
                    keys.by_id = by_id;
                    keys.fetched = Some(Instant::now());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %self.config.jwks_url, "Web API: the issuer's signing keys could not be fetched")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    struct Issuer {
        key: openssl::rsa::Rsa<openssl::pkey::Private>,
        url: String,
        fetches: Arc<AtomicUsize>,
    }

    /// An issuer serving its JWKS (one RSA key, id `k1`) over http.
    fn issuer() -> Issuer {
        let key = openssl::rsa::Rsa::generate(2048).unwrap();
        let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
            "n": b64(&key.n().to_vec()), "e": b64(&key.e().to_vec())}]})
        .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/keys", listener.local_addr().unwrap());
        let fetches = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&fetches);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{jwks}",
                    jwks.len()
                );
            }
        });
        Issuer { key, url, fetches }
    }

    fn sign(key: &openssl::rsa::Rsa<openssl::pkey::Private>, kid: &str, claims: serde_json::Value) -> String {
        let der = key.private_key_to_der().unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_der(&der)).unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[tokio::test]
    async fn issuer_tokens_are_verified_against_its_keys_and_claims() {
        let issuer = issuer();
        let config = JwtConfig {
            issuer: "https://login.example/tenant/v2.0".into(),
            audience: "api://copilot-ingest".into(),
            jwks_url: issuer.url.clone(),
            leeway_seconds: 30,
        };
        let mut verifier = JwtVerifier::new(&config).unwrap();
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"iss": config.issuer, "aud": config.audience, "exp": now() + 600,
                "nbf": now() - 10, "roles": ["read", "write"], "azp": "dashboards-app"});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let caller = verifier.verify(&sign(&issuer.key, "k1", claims(serde_json::json!({})))).await.unwrap();
        assert_eq!((caller.name.as_str(), caller.role), ("dashboards-app", Role::Write));
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1, "keys fetched once and cached");
        verifier.verify(&sign(&issuer.key, "k1", claims(serde_json::json!({})))).await.unwrap();
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);

        for (extra, why) in [
            (serde_json::json!({"exp": now() - 120}), "expired"),
            (serde_json::json!({"nbf": now() + 600}), "not valid yet"),
            (serde_json::json!({"aud": "api://someone-else"}), "another audience"),
            (serde_json::json!({"iss": "https://evil.example/"}), "another issuer"),
            (serde_json::json!({"roles": ["admin"]}), "none of read, write, retention"),
        ] {
            let e = verifier.verify(&sign(&issuer.key, "k1", claims(extra))).await.unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        // Within the clock skew an expired token still passes.
        verifier.verify(&sign(&issuer.key, "k1", claims(serde_json::json!({"exp": now() - 10})))).await.unwrap();

        let forger = openssl::rsa::Rsa::generate(2048).unwrap();
        let e = verifier.verify(&sign(&forger, "k1", claims(serde_json::json!({})))).await.unwrap_err();
        assert!(e.contains("signature"), "{e}");
        // An unknown key id fetches the keys again (a rotation), once a minute at most.
        let e = verifier.verify(&sign(&forger, "k2", claims(serde_json::json!({})))).await.unwrap_err();
        assert!(e.contains("not one of the issuer's"), "{e}");
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1, "the first fetch was a moment ago");
        verifier.refetch_interval = Duration::ZERO;
        verifier.verify(&sign(&forger, "k3", claims(serde_json::json!({})))).await.unwrap_err();
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);

        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims(serde_json::json!({})),
            &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        )
        .unwrap();
        assert!(verifier.verify(&hs).await.unwrap_err().contains("only RS256"));
        assert!(verifier.verify("not.a.jwt").await.is_err());
    }
}
