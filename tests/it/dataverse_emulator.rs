//! A Dataverse Web API emulator: the token endpoint of Microsoft Entra ID and
//! the parts of the Web API the sink uses, with fault injection. Each
//! behaviour names the public documentation it follows.
//!
//! HTTP/1.1 with keep-alive, one thread per connection, `Content-Length` bodies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

pub const TENANT: &str = "contoso-tenant";
pub const CLIENT_ID: &str = "11111111-aaaa-bbbb-cccc-000000000001";
pub const CLIENT_SECRET: &str = "s3cr3t-value-never-logged";

/// What the emulated environment accepts; tests change it to inject faults.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub token_lifetime: Duration,
    /// The app registration is an application user of the environment.
    pub application_user: bool,
    /// `x-ms-dop-hint` on every Web API response.
    pub dop_hint: Option<usize>,
    pub latency: Duration,
    /// The next N CreateMultiple requests answer 429 with `Retry-After: retry_after_secs`.
    pub throttle_next: usize,
    pub retry_after_secs: u64,
    /// The next N CreateMultiple requests answer 503.
    pub unavailable_next: usize,
    /// The next N CreateMultiple requests are executed, then answered 503, as
    /// if the response was lost (the client's retry meets duplicate keys).
    pub lose_response_next: usize,
    /// Column limits of this environment (a customized or older schema).
    pub max_name_length: usize,
    pub refused_interaction_types: Vec<i64>,
    /// Issue this access token every time (another service checks it by its digest).
    pub fixed_token: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            token_lifetime: Duration::from_secs(3600),
            application_user: true,
            dop_hint: Some(8),
            latency: Duration::ZERO,
            throttle_next: 0,
            retry_after_secs: 1,
            unavailable_next: 0,
            lose_response_next: 0,
            max_name_length: 100,
            refused_interaction_types: Vec::new(),
            fixed_token: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Observed {
    pub token_requests: usize,
    pub refused_tokens: usize,
    pub create_requests: usize,
    pub lookups: usize,
    /// (arrival of a CreateMultiple request)
    pub create_arrivals: Vec<Instant>,
    /// (when a 429 was sent, Retry-After)
    pub throttled: Vec<(Instant, Duration)>,
    pub unauthorized: usize,
    pub max_concurrent_creates: usize,
    concurrent_creates: usize,
    pub missing_headers: Vec<String>,
}

#[derive(Default)]
struct State {
    behaviour: Behaviour,
    observed: Observed,
    /// Rows by id (lower-case hyphenated), as the Web API returns them.
    rows: HashMap<String, serde_json::Map<String, Json>>,
    tokens: HashMap<String, Instant>,
    issued: usize,
}

pub struct Emulator {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Emulator {
    pub fn start(behaviour: Behaviour) -> Emulator {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind emulator");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State { behaviour, ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || serve(stream, &state));
                }
            });
        }
        Emulator { url, state, stop }
    }

    pub fn change(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.lock().unwrap().behaviour);
    }

    pub fn observed<T>(&self, f: impl FnOnce(&Observed) -> T) -> T {
        f(&self.state.lock().unwrap().observed)
    }

    pub fn row_count(&self) -> usize {
        self.state.lock().unwrap().rows.len()
    }

    pub fn rows(&self) -> Vec<serde_json::Map<String, Json>> {
        self.state.lock().unwrap().rows.values().cloned().collect()
    }

    /// Invalidates every issued token, as if they expired now.
    pub fn expire_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// `[sink.dataverse]` environment for the binary, pointing at this emulator.
    pub fn env(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("COPILOT_INGEST__SINK__URL", "dataverse://contoso.crm.dynamics.com".to_owned()),
            ("COPILOT_INGEST__SINK__DATAVERSE__TENANT_ID", TENANT.to_owned()),
            ("COPILOT_INGEST__SINK__DATAVERSE__CLIENT_ID", CLIENT_ID.to_owned()),
            ("COPILOT_INGEST__SINK__DATAVERSE__CLIENT_SECRET", secret.to_owned()),
            ("COPILOT_INGEST__SINK__DATAVERSE__AUTHORITY", self.url.clone()),
            ("COPILOT_INGEST__SINK__DATAVERSE__API_URL", self.url.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn answer(status: u16, body: Json) -> Answer {
    Answer { status, headers: Vec::new(), body: body.to_string().into_bytes() }
}

/// The Web API error shape: https://learn.microsoft.com/power-apps/developer/data-platform/webapi/compose-http-requests-handle-errors#parse-errors-from-the-response
fn api_error(status: u16, code: &str, message: &str) -> Answer {
    answer(status, json!({"error": {"code": code, "message": message}}))
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    let _ = writer.set_nodelay(true);
    while let Some(request) = read_request(&mut reader) {
        let response = handle(request, state);
        let reason = match response.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Status",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\n", response.status, response.body.len());
        if !response.body.is_empty() {
            head.push_str("Content-Type: application/json; odata.metadata=minimal\r\n");
        }
        for (k, v) in &response.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        // One write: a separate small body write would wait on the peer's delayed ACK (Nagle).
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&response.body);
        if writer.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, target, headers, body })
}

fn handle(request: Request, state: &Mutex<State>) -> Answer {
    // When the request arrived, before any emulated latency: what Retry-After is checked against.
    let arrived = Instant::now();
    let token_path = format!("/{TENANT}/oauth2/v2.0/token");
    if request.method == "POST" && request.target == token_path {
        return token(&request, state);
    }
    let api = "/api/data/v9.2/";
    let Some(resource) = request.target.strip_prefix(api) else {
        return api_error(404, "0x80060888", "Resource not found for the segment.");
    };
    let resource = resource.to_owned();
    // Authentication: https://learn.microsoft.com/power-apps/developer/data-platform/authenticate-oauth
    // An absent, unknown or expired bearer token answers 401 with an empty body.
    let authorized = {
        let mut s = state.lock().unwrap();
        let token = request.headers.get("authorization").and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        let valid = s.tokens.get(token).is_some_and(|expiry| *expiry > Instant::now());
        if !valid {
            s.observed.unauthorized += 1;
        }
        valid
    };
    if !authorized {
        return Answer {
            status: 401,
            headers: vec![("WWW-Authenticate", "Bearer authorization_uri=https://login.microsoftonline.com/".into())],
            body: Vec::new(),
        };
    }
    // https://learn.microsoft.com/power-apps/developer/data-platform/webapi/compose-http-requests-handle-errors#http-headers
    for required in ["odata-maxversion", "odata-version", "accept"] {
        if !request.headers.contains_key(required) {
            state.lock().unwrap().observed.missing_headers.push(required.to_owned());
        }
    }
    let (application_user, dop_hint, latency) = {
        let s = state.lock().unwrap();
        (s.behaviour.application_user, s.behaviour.dop_hint, s.behaviour.latency)
    };
    // An app registration without an application user in the environment:
    // https://learn.microsoft.com/power-platform/admin/manage-application-users
    if !application_user {
        return api_error(403, "0x80072560", "The user is not a member of the organization.");
    }
    std::thread::sleep(latency);
    let mut response = if request.method == "GET" && resource == "WhoAmI" {
        answer(
            200,
            json!({"BusinessUnitId": uuid::Uuid::new_v4(), "UserId": uuid::Uuid::new_v4(), "OrganizationId": uuid::Uuid::new_v4()}),
        )
    } else if request.method == "POST" && resource == "msdyn_copilotinteractions/Microsoft.Dynamics.CRM.CreateMultiple"
    {
        create_multiple(&request, arrived, state)
    } else if request.method == "GET" && resource.starts_with("msdyn_copilotinteractions?") {
        query(&resource, state)
    } else {
        api_error(404, "0x80060888", "Resource not found for the segment.")
    };
    // The service's suggested degree of parallelism:
    // https://learn.microsoft.com/power-apps/developer/data-platform/send-parallel-requests
    if let Some(dop) = dop_hint {
        response.headers.push(("x-ms-dop-hint", dop.to_string()));
    }
    response
}

/// OAuth 2.0 client credentials grant:
/// https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow
fn token(request: &Request, state: &Mutex<State>) -> Answer {
    let form: HashMap<String, String> = String::from_utf8_lossy(&request.body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let mut s = state.lock().unwrap();
    s.observed.token_requests += 1;
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("grant_type") != "client_credentials" {
        return answer(400, json!({"error": "unsupported_grant_type", "error_description": "AADSTS70003"}));
    }
    if field("client_id") != CLIENT_ID || field("client_secret") != CLIENT_SECRET {
        s.observed.refused_tokens += 1;
        // Invalid client secret: AADSTS7000215, HTTP 401 with invalid_client.
        return answer(
            401,
            json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
        );
    }
    // The scope of an app-only token is the resource with /.default.
    if !field("scope").ends_with("/.default") {
        return answer(400, json!({"error": "invalid_scope", "error_description": "AADSTS1002012"}));
    }
    s.issued += 1;
    let value = s
        .behaviour
        .fixed_token
        .clone()
        .unwrap_or_else(|| format!("token-{}-{}", s.issued, uuid::Uuid::new_v4().simple()));
    let lifetime = s.behaviour.token_lifetime;
    s.tokens.insert(value.clone(), Instant::now() + lifetime);
    answer(
        200,
        json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "ext_expires_in": lifetime.as_secs(), "access_token": value}),
    )
}

/// CreateMultiple on a standard table: one transaction, any failing target
/// rolls back all; answers `{"Ids":[…]}` in target order.
/// https://learn.microsoft.com/power-apps/developer/data-platform/bulk-operations
fn create_multiple(request: &Request, arrived: Instant, state: &Mutex<State>) -> Answer {
    {
        let mut s = state.lock().unwrap();
        s.observed.create_requests += 1;
        s.observed.create_arrivals.push(arrived);
        s.observed.concurrent_creates += 1;
        s.observed.max_concurrent_creates = s.observed.max_concurrent_creates.max(s.observed.concurrent_creates);
    }
    let result = create_multiple_inner(request, state);
    state.lock().unwrap().observed.concurrent_creates -= 1;
    result
}

fn create_multiple_inner(request: &Request, state: &Mutex<State>) -> Answer {
    let mut s = state.lock().unwrap();
    // Service protection limits answer 429 with Retry-After in seconds:
    // https://learn.microsoft.com/power-apps/developer/data-platform/api-limits#retry-operations
    if s.behaviour.throttle_next > 0 {
        s.behaviour.throttle_next -= 1;
        let after = s.behaviour.retry_after_secs;
        s.observed.throttled.push((Instant::now(), Duration::from_secs(after)));
        let mut a = api_error(
            429,
            "0x80072322",
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        );
        a.headers.push(("Retry-After", after.to_string()));
        return a;
    }
    if s.behaviour.unavailable_next > 0 {
        s.behaviour.unavailable_next -= 1;
        return api_error(503, "0x80040216", "The service is temporarily unavailable.");
    }
    if request.headers.get("content-type").is_none_or(|c| !c.starts_with("application/json")) {
        return api_error(400, "0x80048d19", "Content-Type must be application/json.");
    }
    let Ok(body) = serde_json::from_slice::<Json>(&request.body) else {
        return api_error(400, "0x80048d19", "Error identified in Payload provided by the user.");
    };
    let Some(targets) = body.get("Targets").and_then(Json::as_array) else {
        return api_error(400, "0x80048d19", "Targets is required.");
    };
    let mut staged: Vec<(String, serde_json::Map<String, Json>)> = Vec::new();
    for target in targets {
        let Some(object) = target.as_object() else {
            return api_error(400, "0x80048d19", "A target is not an object.");
        };
        // Each target names its type: https://learn.microsoft.com/power-apps/developer/data-platform/bulk-operations#createmultiple
        if object.get("@odata.type").and_then(Json::as_str) != Some("Microsoft.Dynamics.CRM.msdyn_copilotinteraction") {
            return api_error(400, "0x80048d19", "@odata.type is required for each target.");
        }
        let id = object
            .get("msdyn_copilotinteractionid")
            .and_then(Json::as_str)
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Web service error codes: https://learn.microsoft.com/power-apps/developer/data-platform/reference/web-service-error-codes
        if s.rows.contains_key(&id) || staged.iter().any(|(i, _)| *i == id) {
            return api_error(412, "0x80040237", "A record with matching key values already exists.");
        }
        let mut row = serde_json::Map::new();
        for (key, value) in object {
            if key == "@odata.type" {
                continue;
            }
            if let Some(property) = key.strip_suffix("@odata.bind") {
                // Lookups bind by navigation property (case-sensitive), value /entityset(id).
                if property != "msdyn_InteractionDataId" {
                    return api_error(
                        400,
                        "0x80048d19",
                        &format!(
                            "An undeclared property '{property}' which only has property annotations in the payload."
                        ),
                    );
                }
                let bound = value.as_str().unwrap_or("");
                let Some(inner) =
                    bound.strip_prefix("/msdyn_copilotinteractiondatas(").and_then(|b| b.strip_suffix(')'))
                else {
                    return api_error(400, "0x80048d19", "Bad lookup binding.");
                };
                row.insert("_msdyn_interactiondataid_value".into(), Json::String(inner.to_ascii_lowercase()));
                continue;
            }
            // String length in UTF-16 units: https://learn.microsoft.com/power-apps/developer/data-platform/types-of-fields
            if key == "msdyn_name"
                && value.as_str().is_some_and(|v| v.encode_utf16().count() > s.behaviour.max_name_length)
            {
                return api_error(
                    400,
                    "0x80044331",
                    &format!(
                        "A validation error occurred. The length of the 'msdyn_name' attribute of the 'msdyn_copilotinteraction' entity exceeded the maximum allowed length of '{}'.",
                        s.behaviour.max_name_length
                    ),
                );
            }
            if key == "msdyn_interactiontype"
                && value.as_i64().is_some_and(|v| s.behaviour.refused_interaction_types.contains(&v))
            {
                return api_error(
                    400,
                    "0x8004431A",
                    &format!(
                        "A validation error occurred. The value {value} of 'msdyn_interactiontype' on record of type 'msdyn_copilotinteraction' is outside the valid range."
                    ),
                );
            }
            // DateTime columns keep whole seconds, returned as UTC with Z:
            // https://learn.microsoft.com/power-apps/developer/data-platform/behavior-format-date-time-attribute
            let stored = match value.as_str().and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok()) {
                Some(d) => {
                    Json::String(d.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                }
                None => value.clone(),
            };
            row.insert(key.clone(), stored);
        }
        row.insert("msdyn_copilotinteractionid".into(), Json::String(id.clone()));
        staged.push((id, row));
    }
    let ids: Vec<String> = staged.iter().map(|(id, _)| id.clone()).collect();
    for (id, row) in staged {
        s.rows.insert(id, row);
    }
    if s.behaviour.lose_response_next > 0 {
        s.behaviour.lose_response_next -= 1;
        return api_error(503, "0x80040216", "The service is temporarily unavailable.");
    }
    answer(
        200,
        json!({"@odata.context": "https://contoso.crm.dynamics.com/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", "Ids": ids}),
    )
}

/// `$select` + `$filter=Microsoft.Dynamics.CRM.In(PropertyName='…',PropertyValues=[…])`:
/// https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/in
fn query(resource: &str, state: &Mutex<State>) -> Answer {
    let query = resource.split_once('?').map(|(_, q)| q).unwrap_or("");
    let params: HashMap<String, String> =
        query.split('&').filter_map(|p| p.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect();
    let select: Vec<&str> = params.get("$select").map(|s| s.split(',').collect()).unwrap_or_default();
    let filter = params.get("$filter").cloned().unwrap_or_default();
    let Some(values) = filter
        .strip_prefix("Microsoft.Dynamics.CRM.In(PropertyName='msdyn_copilotinteractionid',PropertyValues=[")
        .and_then(|f| f.strip_suffix("])"))
    else {
        return api_error(400, "0x80060888", "Unsupported filter.");
    };
    let mut s = state.lock().unwrap();
    s.observed.lookups += 1;
    let mut value = Vec::new();
    for id in values.split(',').map(|v| v.trim_matches('\'').to_ascii_lowercase()) {
        if let Some(row) = s.rows.get(&id) {
            let mut selected = serde_json::Map::new();
            selected.insert("msdyn_copilotinteractionid".into(), Json::String(id.clone()));
            for column in &select {
                selected.insert((*column).to_owned(), row.get(*column).cloned().unwrap_or(Json::Null));
            }
            value.push(Json::Object(selected));
        }
    }
    answer(200, json!({"value": value}))
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
