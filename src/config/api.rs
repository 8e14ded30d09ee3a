//! `[api]`: the Dataverse-compatible Web API (SPEC §8) and its checks.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How a request proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `Authorization: Bearer <token>` whose SHA-256 is one of `api.tokens`.
    #[default]
    Token,
    /// `Authorization: Bearer <JWT>` signed (RS256) by the `[api.jwt]`
    /// issuer's keys, e.g. an Entra ID access token; the role from its `roles` claim.
    Jwt,
    /// No authentication, every request may do everything: only on a
    /// loopback address, for local development.
    None,
}

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Retrieve, RetrieveMultiple, metadata.
    Read,
    /// Create, Update, Upsert, Delete, SetState.
    Write,
    /// The destructive bulk messages: Retain, BulkRetain, RollbackRetain,
    /// PurgeRetainedContent, BulkDelete.
    Retention,
}

/// One static bearer token: only its SHA-256 is configured, so the
/// configuration file never holds the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Lower-case hex SHA-256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    pub role: Role,
    /// Who the token belongs to, shown by `WhoAmI` and in logs.
    #[serde(default)]
    pub name: String,
}

/// The OpenID issuer whose access tokens the Web API accepts (`auth = "jwt"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` claim, e.g. `https://login.microsoftonline.com/<tenant>/v2.0`.
    pub issuer: String,
    /// The `aud` claim: this API's application id URI or client id.
    pub audience: String,
    /// The issuer's signing keys, e.g. `https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`.
    pub jwks_url: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_seconds: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig { issuer: String::new(), audience: String::new(), jwks_url: String::new(), leeway_seconds: 60 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port`; empty = the Web API is off.
    pub listen: String,
    /// PEM certificate chain and private key: with both, the API serves https.
    pub cert_file: String,
    pub key_file: String,
    pub auth: AuthMode,
    pub tokens: Vec<ApiToken>,
    pub jwt: JwtConfig,
    /// Largest request body (a CreateMultiple of 1,000 typical records is ~1 MiB).
    pub max_body_bytes: usize,
    /// Connections served at once; the rest wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest one request may take, answer included.
    pub request_timeout_ms: u64,
    /// Requests executed at once; more are answered 429 with `Retry-After`
    /// rather than queued, so a burst cannot pile up work or memory.
    pub max_requests_in_flight: usize,
    /// Set by `run` on the embedded broker when nothing was configured: the
    /// API then listens on loopback only if the port is free, without tokens.
    #[serde(skip)]
    pub local_default: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            auth: AuthMode::Token,
            tokens: Vec::new(),
            jwt: JwtConfig::default(),
            max_body_bytes: 16 * 1024 * 1024,
            max_connections: 256,
            request_timeout_ms: 120_000,
            max_requests_in_flight: 64,
            local_default: false,
        }
    }
}

impl ApiConfig {
    pub fn is_enabled(&self) -> bool {
        !self.listen.trim().is_empty()
    }

    pub fn tls(&self) -> bool {
        !self.cert_file.is_empty()
    }

    pub(super) fn check(&self, errors: &mut Vec<String>) {
        if !self.is_enabled() {
            return;
        }
        let address = self.listen.parse::<SocketAddr>();
        match &address {
            Err(_) => errors.push(format!("api.listen: '{}' is not an address like 127.0.0.1:8443", self.listen)),
            Ok(a) if self.auth == AuthMode::None && !a.ip().is_loopback() => errors.push(format!(
                "api.auth: \"none\" is refused on {a}: it lets anyone reach the table; listen on 127.0.0.1 or use tokens"
            )),
            Ok(_) => {}
        }
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            errors.push("api.cert_file, api.key_file: set both (https) or neither (http)".into());
        }
        for (key, path) in [("api.cert_file", &self.cert_file), ("api.key_file", &self.key_file)] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                errors.push(format!("{key}: '{path}' is not a readable file"));
            }
        }
        if self.auth == AuthMode::Token && self.tokens.is_empty() {
            errors.push(
                "api.tokens: auth = \"token\" needs at least one [[api.tokens]] (sha256 of the token, role)".into(),
            );
        }
        if self.auth == AuthMode::Jwt {
            for (key, value) in
                [("issuer", &self.jwt.issuer), ("audience", &self.jwt.audience), ("jwks_url", &self.jwt.jwks_url)]
            {
                if value.trim().is_empty() {
                    errors.push(format!("api.jwt.{key}: required with auth = \"jwt\""));
                }
            }
            if !self.jwt.jwks_url.is_empty() && crate::http_client::Endpoint::parse(&self.jwt.jwks_url).is_err() {
                errors.push(format!("api.jwt.jwks_url: '{}' is not an http(s) URL", self.jwt.jwks_url));
            }
            if self.jwt.leeway_seconds > 600 {
                errors.push("api.jwt.leeway_seconds: must be at most 600".into());
            }
        }
        for (i, token) in self.tokens.iter().enumerate() {
            let hex = token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                errors.push(format!(
                    "api.tokens[{i}].sha256: must be the 64 hex digits of the token's SHA-256, not the token"
                ));
            }
        }
        if !(1024..=1_073_741_824).contains(&self.max_body_bytes) {
            errors.push("api.max_body_bytes: must be between 1024 and 1073741824".into());
        }
        if !(1..=65_536).contains(&self.max_connections) {
            errors.push("api.max_connections: must be between 1 and 65536".into());
        }
        if !(1..=65_536).contains(&self.max_requests_in_flight) {
            errors.push("api.max_requests_in_flight: must be between 1 and 65536".into());
        }
        if !(1000..=3_600_000).contains(&self.request_timeout_ms) {
            errors.push("api.request_timeout_ms: must be between 1000 and 3600000".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn problems(toml: &str) -> Vec<String> {
        Config::from_sources(Some(toml), &[]).err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn the_api_refuses_unsafe_settings() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        // Off unless listen is set: nothing else is checked then.
        assert!(problems("[api]\nauth = \"none\"\n").is_empty());
        let open = problems("[api]\nlisten = \"0.0.0.0:8443\"\nauth = \"none\"\n");
        assert!(open.iter().any(|p| p.starts_with("api.auth: \"none\" is refused on 0.0.0.0:8443")), "{open:?}");
        assert!(problems("[api]\nlisten = \"127.0.0.1:8443\"\nauth = \"none\"\n").is_empty());
        let no_tokens = problems("[api]\nlisten = \"127.0.0.1:8443\"\n");
        assert!(no_tokens.iter().any(|p| p.starts_with("api.tokens:")), "{no_tokens:?}");
        let plain = problems(
            "[api]\nlisten = \"127.0.0.1:8443\"\n[[api.tokens]]\nsha256 = \"my-secret-token\"\nrole = \"read\"\n",
        );
        assert!(plain.iter().any(|p| p.contains("not the token")), "{plain:?}");
        assert!(!plain.iter().any(|p| p.contains("my-secret-token")), "a token is never echoed: {plain:?}");
        let half_tls = problems(&format!(
            "[api]\nlisten = \"127.0.0.1:8443\"\ncert_file = \"/nonexistent.pem\"\n[[api.tokens]]\nsha256 = \"{digest}\"\nrole = \"write\"\n"
        ));
        assert!(half_tls.iter().any(|p| p.contains("set both")), "{half_tls:?}");
        assert!(half_tls.iter().any(|p| p.contains("not a readable file")), "{half_tls:?}");
        let role = problems(&format!(
            "[api]\nlisten = \"127.0.0.1:8443\"\n[[api.tokens]]\nsha256 = \"{digest}\"\nrole = \"admin\"\n"
        ));
        assert!(role.iter().any(|p| p.starts_with("api.tokens")), "{role:?}");
        let jwt = problems("[api]\nlisten = \"127.0.0.1:8443\"\nauth = \"jwt\"\n[api.jwt]\njwks_url = \"ftp://x\"\n");
        for key in ["api.jwt.issuer", "api.jwt.audience", "api.jwt.jwks_url"] {
            assert!(jwt.iter().any(|p| p.starts_with(key)), "{key}: {jwt:?}");
        }
        let entra = "[api]\nlisten = \"0.0.0.0:8443\"\nauth = \"jwt\"\n[api.jwt]\nissuer = \"https://login.microsoftonline.com/t/v2.0\"\naudience = \"api://copilot-ingest\"\njwks_url = \"https://login.microsoftonline.com/t/discovery/v2.0/keys\"\n";
        assert!(problems(entra).is_empty(), "{:?}", problems(entra));
        let good = format!(
            "[api]\nlisten = \"127.0.0.1:8443\"\n[[api.tokens]]\nsha256 = \"{digest}\"\nrole = \"retention\"\n"
        );
        assert!(problems(&good).is_empty(), "{:?}", problems(&good));
    }
}
