//! Who is calling: `Authorization: Bearer <token>` checked against the
//! SHA-256 digests of `[[api.tokens]]`, each with a role. The token itself is
//! never stored, logged or echoed.

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use super::error::{ACCESS_DENIED, ApiError, UNAUTHENTICATED};
use crate::config::{ApiConfig, AuthMode, Role};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Refuses with 403 unless the caller's role includes `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ACCESS_DENIED,
                format!("{what} needs the {needed:?} role; the caller '{}' has {:?}", self.name, self.role)
                    .to_lowercase(),
            ))
        }
    }
}

pub struct Authenticator {
    mode: AuthMode,
    tokens: Vec<([u8; 32], Caller)>,
    jwt: Option<super::jwt::JwtVerifier>,
}

impl Authenticator {
    /// From a checked configuration (the digests are 64 hex digits).
    pub fn new(config: &ApiConfig) -> Result<Authenticator, String> {
        let tokens = config
            .tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let mut digest = [0u8; 32];
                for (k, byte) in digest.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(t.sha256.get(2 * k..2 * k + 2)?, 16).ok()?;
                }
                let name = if t.name.is_empty() { format!("token {}", i + 1) } else { t.name.clone() };
                Some((digest, Caller { name, role: t.role }))
            })
            .collect();
        let jwt = match config.auth {
            AuthMode::Jwt => Some(super::jwt::JwtVerifier::new(&config.jwt)?),
            _ => None,
        };
        Ok(Authenticator { mode: config.auth, tokens, jwt })
    }

    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.mode == AuthMode::None {
            return Ok(Caller { name: "anonymous (auth = none)".into(), role: Role::Retention });
        }
        let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, UNAUTHENTICATED, message);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("an Authorization: Bearer <token> header is required"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must be 'Bearer <token>'"))?;
        if let Some(verifier) = &self.jwt {
            return verifier.verify(token).await.map_err(|why| unauthorized(&why));
        }
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every digest is compared in full, so the time taken says nothing
        // about how close a guess came.
        let mut found = None;
        for (digest, caller) in &self.tokens {
            let difference = digest.iter().zip(&presented).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 {
                found = Some(caller);
            }
        }
        found.cloned().ok_or_else(|| unauthorized("the bearer token is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiToken;

    fn hex(token: &str) -> String {
        Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn tokens_are_matched_by_digest_and_roles_ordered() {
        let config = ApiConfig {
            tokens: vec![
                ApiToken { sha256: hex("reader-secret"), role: Role::Read, name: "dash".into() },
                ApiToken { sha256: hex("writer-secret").to_uppercase(), role: Role::Write, name: String::new() },
            ],
            ..ApiConfig::default()
        };
        let auth = Authenticator::new(&config).unwrap();
        let reader = auth.authenticate(&headers("Bearer reader-secret")).await.unwrap();
        assert_eq!((reader.name.as_str(), reader.role), ("dash", Role::Read));
        let writer = auth.authenticate(&headers("Bearer writer-secret")).await.unwrap();
        assert_eq!(writer.role, Role::Write);
        assert!(writer.require(Role::Write, "Update").is_ok());
        let denied = reader.require(Role::Write, "Update").unwrap_err();
        assert_eq!((denied.status, denied.code), (StatusCode::FORBIDDEN, ACCESS_DENIED));
        assert!(writer.require(Role::Retention, "BulkDelete").is_err());
        for bad in ["Bearer nope", "Basic cmVhZGVyLXNlY3JldA==", "Bearer ", "reader-secret"] {
            let e = auth.authenticate(&headers(bad)).await.unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad}");
            assert!(!e.message.contains("secret"), "the token is never echoed: {}", e.message);
        }
        assert_eq!(auth.authenticate(&HeaderMap::new()).await.unwrap_err().status, StatusCode::UNAUTHORIZED);
    }
}
