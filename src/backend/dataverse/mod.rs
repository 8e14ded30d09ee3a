//! The Dataverse Web API sink: `CreateMultiple` over HTTPS with an OAuth2
//! client-credentials token, as a careful Dataverse client behaves.
//!
//! - One request per sub-batch; on a standard table it is all-or-nothing.
//! - Ids are ours (deterministic), so a replay after a crash fails with
//!   `0x80040237` (duplicate key): the existing ids are looked up, compared
//!   column by column (identical = replay, skipped; different =
//!   `duplicate_id_conflict`), and the rest is sent again.
//! - Any other record-level refusal (string too long, choice out of range, …)
//!   is returned as permanent, which makes [`super::write_batch`] bisect the
//!   batch until only the offending records are dead-lettered.
//! - 429 waits exactly `Retry-After` (every request waits, not only the one
//!   throttled) and halves the concurrency; 502/503/504, connection errors and
//!   timeouts are transient. Concurrency starts from `x-ms-dop-hint`, grows by
//!   about one per round of successes, never above `max_in_flight` (≤ 52).
//!
//! HTTP calls are blocking (see [`crate::http_client`]) and run on tokio's
//! blocking pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::DateTime;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::{BackendError, Outcome, classify_existing};
use crate::batch::Batch;
use crate::config::{DataverseTarget, Secret};
use crate::http_client::{Endpoint, HttpClient, Response, percent_encode};
use crate::metrics::Metrics;
use crate::record::{Record, Value, format_datetime};
use crate::table::{ColumnType, table};

mod forward;
mod limiter;
mod token;
pub use forward::forwards;
use limiter::Limiter;
#[cfg(test)]
use token::renew_after;
use token::{TokenError, TokenSource};

/// The service's per-user concurrency limit (service protection API limits).
const SERVICE_MAX_CONCURRENCY: usize = 52;
/// Ids per lookup query: keeps the URL far below the service's 32 KB limit.
const LOOKUP_CHUNK: usize = 50;
/// The app registration is not an application user of the environment.
const NOT_AN_APPLICATION_USER: &str = "0x80072560";
const DUPLICATE_KEY: &str = "0x80040237";
/// The payload does not fit the environment's metadata (e.g. a wrong
/// navigation property name). Our payloads are built from validated records,
/// so this is a configuration fault: retried, never dead-lettered record by record.
const PAYLOAD_ERROR: &str = "0x80048d19";
/// How often `/readyz` may cost a WhoAmI request.
const PING_INTERVAL: Duration = Duration::from_secs(30);

/// A Web API error body: `{"error":{"code":"0x…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl ApiError {
    fn from_response(response: &Response) -> ApiError {
        let parsed: Option<Json> = serde_json::from_slice(&response.body).ok();
        let error = parsed.as_ref().and_then(|j| j.get("error"));
        let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Json::as_str).map(str::to_owned);
        ApiError {
            code: field("code").unwrap_or_default(),
            message: field("message").unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&response.body);
                text.chars().take(300).collect()
            }),
        }
    }

    fn describe(&self, status: u16) -> String {
        if self.code.is_empty() {
            format!("HTTP {status}: {}", self.message)
        } else {
            format!("{}: {}", self.code, self.message)
        }
    }
}

// ---------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------

pub struct DataverseBackend {
    api: Arc<HttpClient>,
    tokens: Arc<TokenSource>,
    /// `/api/data/v9.2`
    api_path: String,
    entity_set: String,
    navigation: String,
    lookup_entity_set: String,
    bypass_custom_plugins: bool,
    limiter: Limiter,
    /// No request leaves before this instant (set by 429 `Retry-After`).
    throttled_until: Mutex<Option<Instant>>,
    healthy: AtomicBool,
    last_ping: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// What a request to the Web API came back with.
enum Answer {
    Ok(Response),
    /// A 4xx the caller interprets.
    Refused(u16, ApiError),
}

impl DataverseBackend {
    /// Builds the clients, obtains a token and checks with `WhoAmI` that the
    /// app is a user of the environment. Refused credentials and a missing
    /// application user are [`BackendError::Fatal`]; an unreachable service is transient.
    pub async fn open(target: &DataverseTarget, metrics: Arc<Metrics>) -> Result<DataverseBackend, BackendError> {
        let d = &target.settings;
        let timeout = Duration::from_millis(d.request_timeout_ms);
        let endpoint = Endpoint::parse(&target.api_url).map_err(BackendError::Fatal)?;
        let api = HttpClient::new(endpoint, timeout).map_err(BackendError::Fatal)?;
        let tokens = TokenSource::new(target, timeout, Arc::clone(&metrics)).map_err(BackendError::Fatal)?;
        let t = table();
        let lookup_target = t
            .columns
            .iter()
            .find(|c| c.column_type == ColumnType::Lookup && c.valid_for_create)
            .and_then(|c| c.targets.first())
            .map(|target| format!("{target}s"))
            .unwrap_or_default();
        let gauge = metrics.dataverse_concurrency_limit.with_label_values(&["dataverse"]);
        let sink = DataverseBackend {
            api: Arc::new(api),
            tokens: Arc::new(tokens),
            api_path: format!("/api/data/{}", d.api_version),
            entity_set: t.entity_set_name.clone(),
            navigation: d.interactiondata_navigation_property.clone(),
            lookup_entity_set: lookup_target,
            bypass_custom_plugins: d.bypass_custom_plugins,
            limiter: Limiter::new(d.max_in_flight, gauge),
            throttled_until: Mutex::new(None),
            healthy: AtomicBool::new(false),
            last_ping: Mutex::new(None),
            metrics,
        };
        sink.who_am_i().await?;
        Ok(sink)
    }

    /// `GET WhoAmI`: proves the token works in this environment.
    async fn who_am_i(&self) -> Result<(), BackendError> {
        match self.call("whoami", "GET", format!("{}/WhoAmI", self.api_path), Vec::new()).await? {
            Answer::Ok(_) => Ok(()),
            Answer::Refused(403, e) if e.code.eq_ignore_ascii_case(NOT_AN_APPLICATION_USER) => {
                Err(BackendError::Fatal(format!(
                    "Dataverse refused the app ({}): it is not an application user of this environment. \
                     In the Power Platform admin center, open the environment, Settings > Users + permissions > \
                     Application users, add the app registration's client id and give it a security role \
                     that can create msdyn_copilotinteraction records.",
                    e.describe(403)
                )))
            }
            Answer::Refused(401, e) => Err(BackendError::Fatal(format!(
                "Dataverse rejected the access token ({}); check sink.dataverse.tenant_id and that sink.url names \
                 the environment the app registration is granted on",
                e.describe(401)
            ))),
            Answer::Refused(status, e) => Err(BackendError::Transient(format!("WhoAmI: {}", e.describe(status)))),
        }
    }

    pub async fn ping(&self) -> bool {
        let due = self.last_ping.lock().map(|p| p.is_none_or(|at| at.elapsed() >= PING_INTERVAL)).unwrap_or(true);
        if due {
            if let Ok(mut p) = self.last_ping.lock() {
                *p = Some(Instant::now());
            }
            let ok = self.who_am_i().await.is_ok();
            self.healthy.store(ok, Ordering::Relaxed);
        }
        self.healthy.load(Ordering::Relaxed)
    }

    /// One request with a valid token: waits out throttling (429 `Retry-After`,
    /// then retries), renews the token once on 401, maps 5xx and transport
    /// failures to transient errors, and returns other 4xx to the caller.
    async fn call(
        &self,
        kind: &'static str,
        method: &'static str,
        path: String,
        body: Vec<u8>,
    ) -> Result<Answer, BackendError> {
        self.call_with(kind, method, path, body, Vec::new()).await
    }

    /// [`Self::call`] with more headers (`If-Match`, `Prefer`).
    async fn call_with(
        &self,
        kind: &'static str,
        method: &'static str,
        path: String,
        body: Vec<u8>,
        extra_headers: Vec<(&'static str, String)>,
    ) -> Result<Answer, BackendError> {
        let extra_headers = Arc::new(extra_headers);
        let body = Arc::new(body);
        let path = Arc::new(path);
        let mut renewed = false;
        let mut rejected_token: Option<String> = None;
        loop {
            self.wait_for_throttle().await;
            let tokens = Arc::clone(&self.tokens);
            let api = Arc::clone(&self.api);
            let (body_ref, path_ref) = (Arc::clone(&body), Arc::clone(&path));
            let extra_ref = Arc::clone(&extra_headers);
            let stale = rejected_token.take();
            let bypass = self.bypass_custom_plugins;
            let result = tokio::task::spawn_blocking(move || {
                let token = match tokens.get(stale.as_deref()) {
                    Ok(t) => t,
                    Err(e) => return Err(e),
                };
                let authorization = format!("Bearer {token}");
                let mut headers = vec![
                    ("Authorization", authorization.as_str()),
                    ("Accept", "application/json"),
                    ("OData-MaxVersion", "4.0"),
                    ("OData-Version", "4.0"),
                ];
                if !body_ref.is_empty() {
                    headers.push(("Content-Type", "application/json; charset=utf-8"));
                }
                if bypass {
                    headers.push(("MSCRM.BypassCustomPluginExecution", "true"));
                }
                for (name, value) in extra_ref.iter() {
                    headers.push((name, value.as_str()));
                }
                let response = api.request(method, &path_ref, &headers, &body_ref);
                Ok((token, response))
            })
            .await
            .map_err(|e| BackendError::Transient(format!("request task: {e}")))?;
            let (token, response) = match result {
                Ok(pair) => pair,
                Err(TokenError::Refused(m)) => {
                    tracing::error!(error = %m, "cannot obtain a Dataverse token; writes are paused until the credentials work");
                    return Err(BackendError::Fatal(m));
                }
                Err(TokenError::Transient(m)) => return Err(BackendError::Transient(m)),
            };
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    self.metrics.dataverse_responses_total.with_label_values(&[kind, "transport_error"]).inc();
                    return Err(BackendError::Transient(e.to_string()));
                }
            };
            self.metrics.dataverse_responses_total.with_label_values(&[kind, &response.status.to_string()]).inc();
            if let Some(dop) = response.header("x-ms-dop-hint").and_then(|h| h.trim().parse::<usize>().ok()) {
                self.limiter.hint(dop);
            }
            match response.status {
                200..=299 => {
                    self.healthy.store(true, Ordering::Relaxed);
                    return Ok(Answer::Ok(response));
                }
                401 if !renewed => {
                    // One renewal and one retry; a second 401 is reported.
                    renewed = true;
                    rejected_token = Some(token);
                    let error = ApiError::from_response(&response);
                    tracing::info!(error = %error.describe(401), "access token refused; renewing it once");
                    continue;
                }
                429 => {
                    let wait = retry_after(&response);
                    self.limiter.throttled();
                    self.throttle_for(wait);
                    tracing::warn!(
                        retry_after_ms = wait.as_millis() as u64,
                        "Dataverse service protection limit (429); waiting as told and lowering concurrency"
                    );
                    continue;
                }
                502..=504 | 500 => {
                    self.healthy.store(false, Ordering::Relaxed);
                    let error = ApiError::from_response(&response);
                    return Err(BackendError::Transient(format!("Dataverse {}", error.describe(response.status))));
                }
                status => return Ok(Answer::Refused(status, ApiError::from_response(&response))),
            }
        }
    }

    fn throttle_for(&self, wait: Duration) {
        if let Ok(mut until) = self.throttled_until.lock() {
            let candidate = Instant::now() + wait;
            if until.is_none_or(|u| u < candidate) {
                *until = Some(candidate);
            }
        }
    }

    async fn wait_for_throttle(&self) {
        loop {
            let until = self.throttled_until.lock().ok().and_then(|u| *u);
            match until {
                Some(at) if at > Instant::now() => tokio::time::sleep_until(at.into()).await,
                _ => return,
            }
        }
    }

    pub async fn write(&self, batch: &Arc<Batch>, indices: &[usize]) -> Result<Vec<Outcome>, BackendError> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; indices.len()];
        // Duplicates inside the batch: the first occurrence is sent; later ones
        // are settled at the end against what the table then holds for the id.
        let mut first: HashMap<Uuid, usize> = HashMap::with_capacity(indices.len());
        let mut pending: Vec<usize> = Vec::with_capacity(indices.len());
        let mut later: Vec<usize> = Vec::new();
        for (k, &i) in indices.iter().enumerate() {
            let r = &batch[i].record;
            if let std::collections::hash_map::Entry::Vacant(slot) = first.entry(r.id()) {
                slot.insert(k);
                pending.push(k);
            } else {
                later.push(k);
            }
        }
        let targets: Vec<Map<String, Json>> = indices.iter().map(|&i| self.target(&batch[i].record)).collect();
        // Rows found stored under ids of this batch (a duplicate-key answer).
        let mut stored_rows: HashMap<Uuid, Map<String, Json>> = HashMap::new();

        while !pending.is_empty() {
            let body = serde_json::to_vec(&serde_json::json!({
                "Targets": pending.iter().map(|&k| &targets[k]).collect::<Vec<_>>()
            }))
            .map_err(|e| BackendError::Permanent(e.to_string()))?;
            let answer = {
                let _permit = self.limiter.acquire().await;
                self.call(
                    "create",
                    "POST",
                    format!("{}/{}/Microsoft.Dynamics.CRM.CreateMultiple", self.api_path, self.entity_set),
                    body,
                )
                .await?
            };
            match answer {
                Answer::Ok(response) => {
                    self.limiter.succeeded();
                    let sent: Vec<Uuid> = pending.iter().map(|&k| batch[indices[k]].record.id()).collect();
                    check_ids(&response, &sent)?;
                    for &k in &pending {
                        outcomes[k] = Some(Outcome::Written);
                    }
                    pending.clear();
                }
                Answer::Refused(_, error) if error.code.eq_ignore_ascii_case(DUPLICATE_KEY) => {
                    let ids: Vec<Uuid> = pending.iter().map(|&k| batch[indices[k]].record.id()).collect();
                    let existing = self.existing(&ids).await?;
                    if existing.is_empty() {
                        return Err(BackendError::Transient(format!(
                            "Dataverse reported a duplicate key but none of the {} ids exists yet",
                            ids.len()
                        )));
                    }
                    stored_rows.extend(existing.iter().map(|(id, row)| (*id, row.clone())));
                    pending.retain(|&k| {
                        let record = &batch[indices[k]].record;
                        match existing.get(&record.id()) {
                            Some(stored) => {
                                outcomes[k] = Some(if same_content(&targets[k], stored, &self.navigation) {
                                    Outcome::Replay
                                } else {
                                    classify_existing(record.content_hash(), None, record.id())
                                });
                                false
                            }
                            None => true,
                        }
                    });
                }
                Answer::Refused(403, error) if error.code.eq_ignore_ascii_case(NOT_AN_APPLICATION_USER) => {
                    tracing::error!(error = %error.describe(403), "the app is no longer an application user of the environment; writes are paused");
                    return Err(BackendError::Transient(error.describe(403)));
                }
                Answer::Refused(status, error) if error.code.eq_ignore_ascii_case(PAYLOAD_ERROR) => {
                    tracing::error!(error = %error.describe(status), "Dataverse refused the request's shape; check [sink.dataverse] (e.g. interactiondata_navigation_property); writes are paused");
                    return Err(BackendError::Transient(format!("Dataverse {}", error.describe(status))));
                }
                Answer::Refused(status @ (401 | 403 | 404 | 408 | 409), error) => {
                    // Authorization, a missing table or a conflict in the service: not the records' fault.
                    return Err(BackendError::Transient(format!("Dataverse {}", error.describe(status))));
                }
                Answer::Refused(status, error) => {
                    return Err(BackendError::Permanent(format!("Dataverse {}", error.describe(status))));
                }
            }
        }
        for k in later {
            let record = &batch[indices[k]].record;
            let id = record.id();
            outcomes[k] = Some(match stored_rows.get(&id) {
                // The id was already stored: this occurrence replays it or conflicts with it.
                Some(stored) if same_content(&targets[k], stored, &self.navigation) => Outcome::Replay,
                Some(_) => classify_existing(record.content_hash(), None, id),
                // Stored by this batch's first occurrence.
                None => {
                    let first_hash = first.get(&id).map(|&f| batch[indices[f]].record.content_hash());
                    classify_existing(record.content_hash(), first_hash, id)
                }
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(Outcome::Rejected(crate::reason::Rejection::new(
                    crate::reason::Reason::SinkRejected,
                    None,
                    "no outcome",
                )))
            })
            .collect())
    }

    /// The CreateMultiple target of a record: option sets as integers,
    /// datetimes ISO 8601 UTC, the lookup as an `@odata.bind`; nulls left out.
    fn target(&self, record: &Record) -> Map<String, Json> {
        let t = table();
        let mut map = Map::with_capacity(record.values().len() + 1);
        map.insert("@odata.type".into(), Json::String(format!("Microsoft.Dynamics.CRM.{}", t.logical_name)));
        for (&index, value) in crate::record::create_columns().iter().zip(record.values()) {
            let column = &t.columns[index];
            let (name, column_type) = (column.logical_name.as_str(), column.column_type);
            let json = match value {
                Value::Null => continue,
                Value::Text(s) => Json::String(s.clone()),
                Value::Int(i) => Json::from(*i),
                Value::DateTime(d) => Json::String(format_datetime(d)),
                Value::Guid(g) if column_type == ColumnType::Lookup => {
                    map.insert(
                        format!("{}@odata.bind", self.navigation),
                        Json::String(format!("/{}({})", self.lookup_entity_set, g.hyphenated())),
                    );
                    continue;
                }
                Value::Guid(g) => Json::String(g.hyphenated().to_string()),
            };
            map.insert(name.to_owned(), json);
        }
        map
    }

    /// Stored rows among `ids`, by id, with the columns we write.
    async fn existing(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Map<String, Json>>, BackendError> {
        let t = table();
        let select: Vec<&str> =
            crate::record::create_columns().iter().map(|&i| crate::query::odata::property_name(i)).collect();
        let mut found = HashMap::new();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let values: Vec<String> = chunk.iter().map(|id| format!("'{}'", id.hyphenated())).collect();
            let filter = format!(
                "Microsoft.Dynamics.CRM.In(PropertyName='{}',PropertyValues=[{}])",
                t.primary_id_attribute,
                values.join(",")
            );
            let path = format!(
                "{}/{}?$select={}&$filter={}",
                self.api_path,
                self.entity_set,
                percent_encode(&select.join(",")),
                percent_encode(&filter)
            );
            match self.call("lookup", "GET", path, Vec::new()).await? {
                Answer::Ok(response) => {
                    let body: Json = serde_json::from_slice(&response.body)
                        .map_err(|e| BackendError::Transient(format!("lookup response: {e}")))?;
                    for row in body.get("value").and_then(Json::as_array).into_iter().flatten() {
                        let id = row
                            .get(&t.primary_id_attribute)
                            .and_then(Json::as_str)
                            .and_then(|s| Uuid::parse_str(s).ok());
                        if let (Some(id), Some(object)) = (id, row.as_object()) {
                            found.insert(id, object.clone());
                        }
                    }
                }
                Answer::Refused(status, error) => {
                    return Err(BackendError::Transient(format!("lookup of existing ids: {}", error.describe(status))));
                }
            }
        }
        Ok(found)
    }
}

/// `Retry-After` in seconds (fractions allowed); 5 s if absent or unreadable,
/// so a malformed header never turns into a busy loop.
fn retry_after(response: &Response) -> Duration {
    response
        .header("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
        .unwrap_or(Duration::from_secs(5))
}

/// The `{"Ids":[…]}` answer must name exactly the records sent, in order.
fn check_ids(response: &Response, sent: &[Uuid]) -> Result<(), BackendError> {
    let body: Json = serde_json::from_slice(&response.body)
        .map_err(|e| BackendError::Transient(format!("CreateMultiple response is not JSON: {e}")))?;
    let ids: Vec<Option<Uuid>> = body
        .get("Ids")
        .and_then(Json::as_array)
        .map(|a| a.iter().map(|v| v.as_str().and_then(|s| Uuid::parse_str(s).ok())).collect())
        .unwrap_or_default();
    if ids.len() == sent.len() && ids.iter().zip(sent).all(|(a, b)| *a == Some(*b)) {
        Ok(())
    } else {
        // The writes may have happened: a retry meets the duplicate-key path, which sorts it out.
        tracing::error!(
            sent = sent.len(),
            answered = ids.len(),
            "CreateMultiple answered ids that differ from those sent"
        );
        Err(BackendError::Transient("CreateMultiple answered different ids than sent".into()))
    }
}

/// Whether a stored row holds what we would have written. Dataverse keeps
/// datetimes to the second, so they are compared at that precision.
fn same_content(target: &Map<String, Json>, stored: &Map<String, Json>, navigation: &str) -> bool {
    target.iter().all(|(key, sent)| {
        if key == "@odata.type" {
            return true;
        }
        if let Some(navigation_key) = key.strip_suffix("@odata.bind") {
            debug_assert_eq!(navigation_key, navigation);
            let sent_id = sent.as_str().and_then(|s| s.rsplit_once('(')).map(|(_, id)| id.trim_end_matches(')'));
            let lookup = table().columns.iter().find(|c| c.column_type == ColumnType::Lookup && c.valid_for_create);
            let stored_id =
                lookup.and_then(|c| stored.get(&format!("_{}_value", c.logical_name))).and_then(Json::as_str);
            return matches!((sent_id, stored_id), (Some(a), Some(b)) if a.eq_ignore_ascii_case(b));
        }
        let Some(stored_value) = stored.get(key) else { return false };
        match (sent, stored_value) {
            (Json::String(a), Json::String(b)) => {
                a == b
                    || a.eq_ignore_ascii_case(b) && Uuid::parse_str(a).is_ok()
                    || match (DateTime::parse_from_rfc3339(a), DateTime::parse_from_rfc3339(b)) {
                        (Ok(x), Ok(y)) => x.timestamp() == y.timestamp(),
                        _ => false,
                    }
            }
            (Json::Number(a), Json::Number(b)) => a.as_i64() == b.as_i64(),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("g", "g").unwrap()
    }

    #[test]
    fn limiter_starts_from_the_hint_halves_on_429_and_grows_slowly() {
        let l = Limiter::new(16, gauge());
        assert_eq!(l.limit(), 16);
        l.hint(8);
        assert_eq!(l.limit(), 8);
        l.hint(2); // only the first hint counts
        assert_eq!(l.limit(), 8);
        l.throttled();
        assert_eq!(l.limit(), 4);
        for _ in 0..4 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 4, "a round of successes at limit 4 adds a little under one");
        l.succeeded();
        assert_eq!(l.limit(), 5);
        for _ in 0..10 {
            l.throttled();
        }
        assert_eq!(l.limit(), 1, "never below one");
        for _ in 0..10_000 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 16, "never above max_in_flight");
        assert_eq!(Limiter::new(500, gauge()).limit(), SERVICE_MAX_CONCURRENCY);
    }

    #[tokio::test]
    async fn limiter_blocks_beyond_the_limit_until_a_permit_returns() {
        let l = Limiter::new(2, gauge());
        let a = l.acquire().await;
        let _b = l.acquire().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), l.acquire()).await.is_err());
        drop(a);
        assert!(tokio::time::timeout(Duration::from_secs(1), l.acquire()).await.is_ok());
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn tokens_are_renewed_ahead_of_expiry() {
        assert_eq!(renew_after(3599), Duration::from_secs(3299));
        assert_eq!(renew_after(4), Duration::from_millis(3200));
        assert_eq!(renew_after(0), Duration::ZERO);
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_defaults_safely() {
        assert_eq!(retry_after(&response(429, &[("retry-after", "2")], "")), Duration::from_secs(2));
        assert_eq!(retry_after(&response(429, &[("retry-after", "0.5")], "")), Duration::from_millis(500));
        assert_eq!(retry_after(&response(429, &[("retry-after", "soon")], "")), Duration::from_secs(5));
        assert_eq!(retry_after(&response(429, &[], "")), Duration::from_secs(5));
    }

    #[test]
    fn error_bodies_are_parsed_and_described() {
        let e = ApiError::from_response(&response(400, &[], r#"{"error":{"code":"0x80044331","message":"too long"}}"#));
        assert_eq!(e.describe(400), "0x80044331: too long");
        let e = ApiError::from_response(&response(400, &[], "plain text"));
        assert_eq!(e.describe(400), "HTTP 400: plain text");
    }

    #[test]
    fn ids_must_match_what_was_sent() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let ok = response(200, &[], &format!(r#"{{"Ids":["{a}","{b}"]}}"#));
        assert!(check_ids(&ok, &[a, b]).is_ok());
        assert!(check_ids(&ok, &[b, a]).is_err());
        assert!(check_ids(&response(200, &[], "{}"), &[a]).is_err());
    }

    #[test]
    fn content_comparison_follows_what_dataverse_returns() {
        let id = "11111111-2222-3333-4444-555555555555";
        let target: Map<String, Json> = serde_json::from_value(serde_json::json!({
            "@odata.type": "Microsoft.Dynamics.CRM.msdyn_copilotinteraction",
            "msdyn_name": "n",
            "msdyn_interactiontype": 100230301,
            "msdyn_clienttimestamp": "2026-01-02T03:04:05.678Z",
            "msdyn_InteractionDataId@odata.bind": format!("/msdyn_copilotinteractiondatas({id})"),
        }))
        .unwrap();
        let stored: Map<String, Json> = serde_json::from_value(serde_json::json!({
            "msdyn_name": "n",
            "msdyn_interactiontype": 100230301,
            "msdyn_clienttimestamp": "2026-01-02T03:04:05Z",
            "_msdyn_interactiondataid_value": id.to_uppercase(),
            "msdyn_interactioncontext": null,
        }))
        .unwrap();
        assert!(same_content(&target, &stored, "msdyn_InteractionDataId"));
        let mut different = stored.clone();
        different.insert("msdyn_interactiontype".into(), Json::from(100230302));
        assert!(!same_content(&target, &different, "msdyn_InteractionDataId"));
        let mut missing = stored;
        missing.remove("msdyn_name");
        assert!(!same_content(&target, &missing, "msdyn_InteractionDataId"));
    }
}
