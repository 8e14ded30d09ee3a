//! The Web API's read rates for `bench`: Retrieve by id paced at a fixed
//! request rate (latency percentiles) and RetrieveMultiple paging through
//! the table in pages of 5,000 rows (rows/s), each alone while the service
//! ingests at half its drain rate, then both while a service drains the
//! whole topic into a fresh table, whose drain rate is compared with the
//! drain without readers from the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// What the readers measured.
#[derive(Debug, Default)]
pub struct Reads {
    /// Seconds per Retrieve, sorted.
    pub retrieve_seconds: Vec<f64>,
    pub retrieve_errors: u64,
    pub rows: u64,
    pub rows_seconds: f64,
}

impl Reads {
    pub fn percentile(&self, q: f64) -> f64 {
        if self.retrieve_seconds.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.retrieve_seconds.len() as f64 - 1.0) * q).round() as usize;
        self.retrieve_seconds[rank.min(self.retrieve_seconds.len() - 1)]
    }

    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.rows_seconds.max(1e-9)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn get(agent: &ureq::Agent, url: &str, prefer: Option<&str>) -> Option<(u16, Json)> {
    let mut request = agent.get(url).header("Accept", "application/json");
    if let Some(p) = prefer {
        request = request.header("Prefer", p);
    }
    let mut response = request.call().ok()?;
    let status = response.status().as_u16();
    let body = response.body_mut().with_config().limit(256 * 1024 * 1024).read_to_vec().ok()?;
    Some((status, serde_json::from_slice(&body).unwrap_or(Json::Null)))
}

/// Up to `n` record ids, read through the API.
pub fn ids(base: &str, n: usize) -> Vec<String> {
    let url = format!("{base}/msdyn_copilotinteractions?$select=msdyn_copilotinteractionid&$top={n}");
    get(&agent(), &url, None)
        .and_then(|(_, body)| body.get("value").and_then(Json::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.get("msdyn_copilotinteractionid").and_then(Json::as_str).map(str::to_owned))
        .collect()
}

/// Retrieve by id paced at `rate`, until `stop` or `seconds`: sorted latencies and failures.
pub fn retrieve_load(base: &str, ids: &[String], rate: u64, seconds: u64, stop: &AtomicBool) -> (Vec<f64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let agent = agent();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let (mut latencies, mut errors) = (Vec::new(), 0u64);
    let mut next = Instant::now();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && !ids.is_empty() {
        let url = format!("{base}/msdyn_copilotinteractions({})?$select=msdyn_name,createdon", ids[i % ids.len()]);
        i += 1;
        let started = Instant::now();
        match get(&agent, &url, None) {
            // 404: a record a draining service has not written yet.
            Some((200 | 404, _)) => latencies.push(started.elapsed().as_secs_f64()),
            _ => {
                errors += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, errors)
}

/// Pages through the table (5,000-row pages, following `@odata.nextLink`,
/// starting over at the end) as fast as answers come: rows and seconds.
pub fn page_load(base: &str, seconds: u64, stop: &AtomicBool) -> (u64, f64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let agent = agent();
    let (mut rows, started) = (0u64, Instant::now());
    let first = format!("{base}/msdyn_copilotinteractions?$select=msdyn_name,createdon,msdyn_interactiontype");
    let mut url = first.clone();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // Until the service answers (it may still be starting), try again shortly.
        let Some((200, body)) = get(&agent, &url, Some("odata.maxpagesize=5000")) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        rows += body.get("value").and_then(Json::as_array).map_or(0, |v| v.len() as u64);
        url = body.get("@odata.nextLink").and_then(Json::as_str).map_or_else(|| first.clone(), str::to_owned);
    }
    (rows, started.elapsed().as_secs_f64())
}

/// Both readers at once until `stop` (or `seconds`).
pub async fn read_load(base: String, ids: Vec<String>, rate: u64, seconds: u64, stop: Arc<AtomicBool>) -> Reads {
    let retrieve = {
        let (base, stop) = (base.clone(), Arc::clone(&stop));
        tokio::task::spawn_blocking(move || retrieve_load(&base, &ids, rate, seconds, &stop))
    };
    let multiple = tokio::task::spawn_blocking(move || page_load(&base, seconds, &stop));
    let (retrieve_seconds, retrieve_errors) = retrieve.await.unwrap_or_default();
    let (rows, rows_seconds) = multiple.await.unwrap_or_default();
    Reads { retrieve_seconds, retrieve_errors, rows, rows_seconds }
}
