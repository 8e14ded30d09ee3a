//! `$batch`: a multipart/mixed body of requests, each answered as if sent
//! alone. A change set (a nested multipart) is checked part by part before
//! any part runs — validation, existence, row versions, states — so a part
//! that would fail leaves the others unapplied; the parts then run in order
//! and a failure at that point (a race, the database) stops the rest. DynamicsWebApi
//! sends any GET longer than 2,000 characters this way. Inner requests are
//! parsed with `httparse`; `$<Content-ID>` at the start of an inner URL
//! names a record an earlier part of the change set created.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use uuid::Uuid;

use super::error::ApiError;
use super::path::Resource;
use super::request::Call;
use super::{WebApi, dispatch};

/// The most requests one `$batch` may hold (Dataverse's limit).
pub const MAX_PARTS: usize = 1000;

/// One inner request.
#[derive(Clone)]
struct Part {
    content_id: Option<String>,
    method: Method,
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

enum Item {
    Single(Part),
    ChangeSet(Vec<Part>),
}

fn boundary(content_type: &str) -> Option<String> {
    content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 200)
}

/// The parts of a multipart body: for each, its headers and its content.
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<(HeaderMap, &'a [u8])>, String> {
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut positions = Vec::new();
    let mut from = 0;
    while let Some(i) = find(&text[from..], delimiter.as_bytes()) {
        positions.push(from + i);
        from += i + delimiter.len();
    }
    if positions.is_empty() {
        return Err(format!("no part starts with --{boundary}"));
    }
    let mut parts = Vec::new();
    for pair in positions.windows(2) {
        let start = pair[0] + delimiter.len();
        let chunk = &text[start..pair[1]];
        let chunk = chunk.strip_prefix(b"\r\n").or_else(|| chunk.strip_prefix(b"\n")).unwrap_or(chunk);
        let (headers, content) = split_head(chunk)?;
        parts.push((headers, trim_line_end(content)));
        if parts.len() > MAX_PARTS {
            return Err(format!("a $batch holds at most {MAX_PARTS} requests"));
        }
    }
    Ok(parts)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim_line_end(content: &[u8]) -> &[u8] {
    content.strip_suffix(b"\r\n").or_else(|| content.strip_suffix(b"\n")).unwrap_or(content)
}

/// MIME part headers, then the content after the blank line.
fn split_head(chunk: &[u8]) -> Result<(HeaderMap, &[u8]), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(chunk, &mut headers) {
        Ok(httparse::Status::Complete((end, parsed))) => Ok((to_header_map(parsed), &chunk[end..])),
        Ok(httparse::Status::Partial) => Ok((HeaderMap::new(), &chunk[chunk.len()..])),
        Err(e) => Err(format!("a $batch part has malformed headers: {e}")),
    }
}

fn to_header_map(parsed: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for h in parsed {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            map.append(name, value);
        }
    }
    map
}

/// An `application/http` part: the inner request line, headers and body.
fn inner_request(part_headers: &HeaderMap, content: &[u8]) -> Result<Part, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let end = match request.parse(content) {
        Ok(httparse::Status::Complete(end)) => end,
        // A request line and headers without the final blank line (a bodiless GET at the end of a part).
        Ok(httparse::Status::Partial) => {
            let mut padded = content.to_vec();
            padded.extend_from_slice(b"\r\n\r\n");
            return inner_request(part_headers, &padded);
        }
        Err(e) => return Err(format!("a $batch part is not an HTTP request: {e}")),
    };
    let method = request.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()).ok_or("no method")?;
    let target = request.path.ok_or("no request target")?.to_owned();
    let headers = to_header_map(request.headers);
    let content_id = part_headers.get("Content-ID").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok(Part { content_id, method, target, headers, body: Bytes::copy_from_slice(trim_line_end(&content[end..])) })
}

fn parse(call: &Call) -> Result<Vec<Item>, String> {
    let content_type = call.header(header::CONTENT_TYPE.as_str()).unwrap_or_default();
    let outer = boundary(content_type).ok_or("a $batch needs Content-Type: multipart/mixed; boundary=…")?;
    let mut items = Vec::new();
    let mut count = 0;
    for (headers, content) in split_multipart(&call.body, &outer)? {
        let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if kind.starts_with("multipart/mixed") {
            let inner = boundary(kind).ok_or("a change set needs a boundary")?;
            let parts = split_multipart(content, &inner)?
                .into_iter()
                .map(|(h, c)| inner_request(&h, c))
                .collect::<Result<Vec<_>, _>>()?;
            count += parts.len();
            items.push(Item::ChangeSet(parts));
        } else {
            count += 1;
            items.push(Item::Single(inner_request(&headers, content)?));
        }
        if count > MAX_PARTS {
            return Err(format!("a $batch holds at most {MAX_PARTS} requests"));
        }
    }
    Ok(items)
}

/// The path and query of an inner request's target: absolute URLs, paths,
/// and URLs relative to the service root all name the same resource.
fn local_target(call: &Call, target: &str, created: &[(String, String)]) -> String {
    let mut target = target.to_owned();
    if let Some(reference) = target.strip_prefix('$') {
        let (id, rest) = reference.split_once('/').map_or((reference, ""), |(a, b)| (a, b));
        if let Some((_, url)) = created.iter().find(|(cid, _)| cid == id) {
            target = if rest.is_empty() { url.clone() } else { format!("{url}/{rest}") };
        }
    }
    if let Some(after_scheme) = target.split_once("://").map(|(_, r)| r) {
        return after_scheme.find('/').map_or_else(|| "/".to_owned(), |i| after_scheme[i..].to_owned());
    }
    if target.starts_with('/') {
        return target;
    }
    // Relative to the service root `…/api/data/v9.x/`.
    let root = call.base.split_once("://").map_or(call.base.as_str(), |(_, r)| r);
    let root = root.find('/').map_or("/api/data/v9.2", |i| &root[i..]);
    format!("{root}/{target}")
}

/// The request a part holds, as if it had arrived alone.
fn inner_call(call: &Call, part: Part, created: &[(String, String)]) -> Result<Call, ApiError> {
    let target = local_target(call, &part.target, created);
    let mut headers = part.headers;
    if let Some(host) = call.headers.get(header::HOST) {
        headers.insert(header::HOST, host.clone());
    }
    let scheme = call.base.split_once("://").map_or("https", |(s, _)| s);
    let inner = Call::new(part.method, &target, headers, part.body, scheme, call.caller.clone())?;
    if inner.resource == Resource::Batch {
        return Err(ApiError::bad_request("a $batch cannot hold another $batch"));
    }
    Ok(inner)
}

async fn run_part(api: &WebApi, call: &Call, part: Part, created: &[(String, String)]) -> Response {
    match inner_call(call, part, created) {
        Ok(inner) => Box::pin(dispatch(api, inner)).await,
        Err(e) => e.into_response(),
    }
}

/// Checks every part of a change set before any runs; the first that would
/// fail is the change set's answer (with its Content-ID) and nothing is
/// applied. Parts that name a record created earlier in the set (`$1`) are
/// checked when they run.
async fn precheck_change_set(api: &WebApi, call: &Call, parts: &[Part]) -> Option<(Response, Option<String>)> {
    for part in parts.iter().filter(|p| !p.target.starts_with('$')) {
        let checked = match inner_call(call, part.clone(), &[]) {
            Ok(inner) => super::entities::precheck(api, &inner).await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            return Some((e.into_response(), part.content_id.clone()));
        }
    }
    None
}

/// One answer as an `application/http` part.
async fn encode(out: &mut Vec<u8>, response: Response, content_id: Option<&str>) {
    out.extend_from_slice(b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(id) = content_id {
        out.extend_from_slice(format!("Content-ID: {id}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let status = response.status();
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or("")).as_bytes(),
    );
    let (parts, body) = response.into_parts();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await {
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(b"\r\n");
}

pub async fn handle(api: &WebApi, call: &Call) -> Result<Response, ApiError> {
    let items = parse(call).map_err(ApiError::bad_request)?;
    let boundary = format!("batchresponse_{}", Uuid::new_v4());
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match item {
            Item::Single(part) => {
                let response = run_part(api, call, part, &[]).await;
                encode(&mut out, response, None).await;
            }
            Item::ChangeSet(parts) => {
                let changeset = format!("changesetresponse_{}", Uuid::new_v4());
                out.extend_from_slice(
                    format!("Content-Type: multipart/mixed; boundary={changeset}\r\n\r\n").as_bytes(),
                );
                let mut created: Vec<(String, String)> = Vec::new();
                let mut answers = Vec::new();
                let refusal = precheck_change_set(api, call, &parts).await;
                let to_run = if refusal.is_some() { Vec::new() } else { parts };
                answers.extend(refusal);
                for part in to_run {
                    let content_id = part.content_id.clone();
                    let response = run_part(api, call, part, &created).await;
                    if let (Some(id), Some(url)) = (&content_id, response.headers().get("OData-EntityId")) {
                        created.push((id.clone(), url.to_str().unwrap_or_default().to_owned()));
                    }
                    let failed = !response.status().is_success();
                    answers.push((response, content_id));
                    if failed {
                        // The failure answers for the whole change set.
                        answers.drain(..answers.len() - 1);
                        break;
                    }
                }
                for (response, content_id) in answers {
                    out.extend_from_slice(format!("--{changeset}\r\n").as_bytes());
                    encode(&mut out, response, content_id.as_deref()).await;
                }
                out.extend_from_slice(format!("--{changeset}--\r\n").as_bytes());
            }
        }
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let mut response = Response::new(Body::from(out));
    *response.status_mut() = StatusCode::OK;
    if let Ok(value) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response.headers_mut().insert("OData-Version", HeaderValue::from_static("4.0"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clients_batches_parse() {
        let python = "--batch_b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
GET https://127.0.0.1:18443/api/data/v9.2/msdyn_copilotinteractions(a60ee1ba-8400-472e-a5f5-d9b537e8afea)?$select=msdyn_name HTTP/1.1\r\n\r\n\
--batch_b\r\nContent-Type: multipart/mixed; boundary=\"changeset_c\"\r\n\r\n\
--changeset_c\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
PATCH https://127.0.0.1:18443/api/data/v9.2/msdyn_copilotinteractions(0da3b997-d162-492d-bcf6-890060fcb34f) HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\nIf-Match: *\r\n\r\n{\"msdyn_name\": \"in-changeset\"}\r\n\
--changeset_c--\r\n\r\n--batch_b--\r\n";
        let parts = split_multipart(python.as_bytes(), "batch_b").unwrap();
        assert_eq!(parts.len(), 2);
        let get = inner_request(&parts[0].0, parts[0].1).unwrap();
        assert_eq!(get.method, Method::GET);
        assert!(get.target.ends_with("?$select=msdyn_name"));
        let inner = split_multipart(parts[1].1, "changeset_c").unwrap();
        let patch = inner_request(&inner[0].0, inner[0].1).unwrap();
        assert_eq!((patch.method, patch.content_id.as_deref()), (Method::PATCH, Some("1")));
        assert_eq!(&patch.body[..], b"{\"msdyn_name\": \"in-changeset\"}");
        assert_eq!(patch.headers.get("If-Match").unwrap(), "*");

        let dwa = "\r\n--dwa\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
GET http://127.0.0.1:18181/api/data/v9.2/msdyn_copilotinteractions?$select=msdyn_name HTTP/1.1\r\nAccept: application/json\r\n\r\n--dwa--\r\n";
        let parts = split_multipart(dwa.as_bytes(), "dwa").unwrap();
        let get = inner_request(&parts[0].0, parts[0].1).unwrap();
        assert_eq!(get.headers.get("Accept").unwrap(), "application/json");
        assert!(get.body.is_empty());
    }

    #[test]
    fn boundaries_are_read_quoted_or_not() {
        assert_eq!(boundary("multipart/mixed; boundary=\"batch_1\"").as_deref(), Some("batch_1"));
        assert_eq!(boundary("multipart/mixed;boundary=dwa_batch_2").as_deref(), Some("dwa_batch_2"));
        assert_eq!(boundary("application/json"), None);
    }
}
