//! OAuth2 client credentials for the Dataverse sink: one token at a time,
//! renewed ahead of expiry and once when the service refuses it.

use super::*;

pub(super) struct Token {
    value: String,
    renew_at: Instant,
}

pub(super) enum TokenError {
    /// The issuer refused the credentials: an operator must fix the configuration.
    Refused(String),
    Transient(String),
}

pub(super) struct TokenSource {
    client: HttpClient,
    path: String,
    form: Secret,
    cache: Mutex<Option<Token>>,
    metrics: Arc<Metrics>,
}

impl TokenSource {
    pub(super) fn new(
        target: &DataverseTarget,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<TokenSource, String> {
        let mut origin = Endpoint::parse(&target.token_url)?;
        let path = std::mem::take(&mut origin.base_path);
        let d = &target.settings;
        let form = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
            percent_encode(d.client_id.trim()),
            percent_encode(d.client_secret.expose()),
            percent_encode(&target.scope)
        );
        Ok(TokenSource {
            client: HttpClient::new(origin, timeout)?,
            path,
            form: Secret::new(form),
            cache: Mutex::new(None),
            metrics,
        })
    }

    /// A valid token; `rejected` is a token the API just answered 401 to, which forces a renewal.
    pub(super) fn get(&self, rejected: Option<&str>) -> Result<String, TokenError> {
        let mut cache = self.cache.lock().map_err(|_| TokenError::Transient("token cache poisoned".into()))?;
        if let Some(token) = cache.as_ref() {
            let renew = Instant::now() >= token.renew_at || rejected == Some(token.value.as_str());
            if !renew {
                return Ok(token.value.clone());
            }
        }
        // Renewing under the lock: concurrent requests wait for one renewal instead of each asking.
        let fetched = self.fetch();
        let outcome = if fetched.is_ok() { "ok" } else { "failed" };
        self.metrics.dataverse_token_renewals_total.with_label_values(&[outcome]).inc();
        let token = fetched?;
        let value = token.value.clone();
        *cache = Some(token);
        Ok(value)
    }

    pub(super) fn fetch(&self) -> Result<Token, TokenError> {
        let headers = [("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")];
        let response = self
            .client
            .request("POST", &self.path, &headers, self.form.expose().as_bytes())
            .map_err(|e| TokenError::Transient(format!("token endpoint: {e}")))?;
        let body: Option<Json> = serde_json::from_slice(&response.body).ok();
        let text = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Json::as_str).unwrap_or("");
        match response.status {
            200 => {
                let value = text("access_token");
                if value.is_empty() {
                    return Err(TokenError::Transient("token endpoint answered without access_token".into()));
                }
                // `expires_in` is a number (Entra ID v2) or a numeric string (v1).
                let lifetime = body
                    .as_ref()
                    .and_then(|b| b.get("expires_in"))
                    .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                    .unwrap_or(3600);
                Ok(Token { value: value.to_owned(), renew_at: Instant::now() + renew_after(lifetime) })
            }
            400 | 401 | 403 => Err(TokenError::Refused(format!(
                "the token endpoint refused the client credentials (HTTP {}): {} {}",
                response.status,
                text("error"),
                text("error_description").lines().next().unwrap_or("")
            ))),
            status => Err(TokenError::Transient(format!("token endpoint answered HTTP {status}"))),
        }
    }
}

/// When to renew a token that lives `lifetime_secs`: 5 minutes before it
/// expires, or at 80% of a short lifetime.
pub(super) fn renew_after(lifetime_secs: u64) -> Duration {
    let lifetime = Duration::from_secs(lifetime_secs);
    lifetime - (lifetime / 5).min(Duration::from_secs(300))
}
