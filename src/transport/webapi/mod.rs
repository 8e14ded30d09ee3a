//! The Dataverse-compatible Web API (SPEC §8): the table served over HTTP
//! as Dataverse serves it, so Dataverse client libraries work unmodified.
//! Like every transport it only parses, authenticates, calls an operation
//! and encodes the answer.
//!
//! - [`path`]: the resource an OData path names.
//! - [`request`]: query options, `Prefer`, the caller's base URL.
//! - [`auth`]: bearer tokens and roles; [`jwt`]: JWTs of an OpenID issuer.
//! - [`entities`]: the entity set: Create, Retrieve, RetrieveMultiple, Update/Upsert, Delete, `$count`,
//!   CreateMultiple, UpdateMultiple, UpsertMultiple.
//! - [`actions`]: the table's other messages as OData actions and functions.
//! - [`bookkeeping`]: `retentionconfigs` (the retention policies) and `retentionoperations`.
//! - [`metadata`]: `EntityDefinitions`, `$metadata`, `WhoAmI`, generated from the table definition.
//! - [`batch`]: `$batch` (multipart/mixed, change sets).
//! - [`error`]: Dataverse's error shape and codes.

pub mod actions;
pub mod auth;
pub mod batch;
pub mod bookkeeping;
pub mod encode;
pub mod entities;
pub mod error;
pub mod jwt;
pub mod metadata;
pub mod path;
pub mod request;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::config::ApiConfig;
use crate::metrics::Metrics;
use crate::normalize::Normalizer;
use crate::transport::http::{Limits, serve_app};
use error::ApiError;
use path::Resource;
use request::Call;

/// What every request handler shares.
pub struct WebApi {
    pub backend: Arc<Backend>,
    pub normalizer: Normalizer,
    pub metrics: Arc<Metrics>,
    pub auth: auth::Authenticator,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub https: bool,
    /// Requests being executed; none left means 429.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl WebApi {
    pub fn new(
        config: &ApiConfig,
        backend: Arc<Backend>,
        normalizer: Normalizer,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<WebApi> {
        Ok(WebApi {
            backend,
            normalizer,
            metrics,
            auth: auth::Authenticator::new(config).map_err(anyhow::Error::msg)?,
            max_body_bytes: config.max_body_bytes,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            https: config.tls(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_requests_in_flight)),
        })
    }
}

/// The TLS acceptor of `cert_file`/`key_file`, or `None` for plain http.
pub fn tls_acceptor(config: &ApiConfig) -> anyhow::Result<Option<Arc<openssl::ssl::SslAcceptor>>> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    if !config.tls() {
        return Ok(None);
    }
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    builder
        .set_certificate_chain_file(&config.cert_file)
        .map_err(|e| anyhow::anyhow!("api.cert_file {}: {e}", config.cert_file))?;
    builder
        .set_private_key_file(&config.key_file, SslFiletype::PEM)
        .map_err(|e| anyhow::anyhow!("api.key_file {}: {e}", config.key_file))?;
    builder.check_private_key().map_err(|e| anyhow::anyhow!("api.key_file does not match api.cert_file: {e}"))?;
    Ok(Some(Arc::new(builder.build())))
}

/// Serves the Web API until `shutdown` turns true; requests under way finish.
pub async fn serve(
    listener: TcpListener,
    api: Arc<WebApi>,
    config: ApiConfig,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = Limits {
        max_connections: config.max_connections,
        max_head_bytes: 64 * 1024,
        head_timeout: Duration::from_secs(30),
        // Kept-alive connections are bounded by the idle timeout above and
        // each request by `request_timeout`; this only ends a connection
        // held open for a very long time.
        connection_timeout: Duration::from_secs(3600),
        keep_alive: true,
    };
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let api = Arc::clone(&api);
        async move { handle(&api, request).await }
    });
    serve_app(listener, app, tls, limits, shutdown).await
}

async fn handle(api: &WebApi, request: axum::extract::Request) -> Response {
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = match Arc::clone(&api.in_flight).try_acquire_owned() {
        // Shed load instead of queueing it: the client is told when to come back.
        Err(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                error::THROTTLED,
                "too many requests are being served; retry after the time in Retry-After",
            )
        }
        .into_response(),
        Ok(_permit) => match tokio::time::timeout(api.request_timeout, answer(api, request)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                error::UNEXPECTED,
                format!("the request took longer than {} s", api.request_timeout.as_secs()),
            )
            .into_response(),
        },
    };
    let class = match response.status().as_u16() {
        200..=399 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let method_label = match method {
        Method::GET | Method::POST | Method::PATCH | Method::DELETE => method.as_str(),
        _ => "other",
    };
    api.metrics.api_requests_total.with_label_values(&[method_label, class]).inc();
    tracing::debug!(method = %method, status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "Web API request");
    response
}

async fn answer(api: &WebApi, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, api.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                error::INVALID_ARGUMENT,
                format!("the request body is larger than {} bytes", api.max_body_bytes),
            )
            .into_response();
        }
    };
    let scheme = if api.https { "https" } else { "http" };
    let caller = match api.auth.authenticate(&parts.headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let call = match Call::new(parts.method, &target, parts.headers, body, scheme, caller) {
        Ok(call) => call,
        Err(e) => return e.into_response(),
    };
    dispatch(api, call).await
}

/// Answers one request (also each part of a `$batch`).
pub async fn dispatch(api: &WebApi, call: Call) -> Response {
    let result = match &call.resource {
        Resource::Batch if call.method == Method::POST => batch::handle(api, &call).await,
        resource => route(api, &call, resource.clone()).await,
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn route(api: &WebApi, call: &Call, resource: Resource) -> Result<Response, ApiError> {
    use crate::config::Role;
    let m = &call.method;
    if *m == Method::GET {
        call.caller.require(Role::Read, "reading")?;
    }
    match (m.clone(), resource) {
        (Method::GET, Resource::Service) => Ok(metadata::service_document(call)),
        (Method::GET, Resource::Metadata) => Ok(metadata::csdl()),
        (Method::GET, Resource::WhoAmI) => Ok(metadata::who_am_i(call)),
        (Method::GET, Resource::EntityDefinitions { logical_name }) => {
            metadata::entity_definitions(call, logical_name.as_deref())
        }
        (Method::GET, Resource::Attributes { logical_name, picklists_only }) => {
            metadata::attributes(call, &logical_name, picklists_only)
        }
        (_, Resource::Bookkeeping { entity, key }) => bookkeeping::handle(api, call, entity, key).await,
        (Method::GET, Resource::EntitySet) => entities::retrieve_multiple(api, call).await,
        (Method::GET, Resource::Count) => entities::count(api, call).await,
        (Method::GET, Resource::Entity(id)) => entities::retrieve(api, call, id).await,
        (Method::POST, Resource::EntitySet) => entities::create(api, call).await,
        (Method::PATCH, Resource::Entity(id)) => entities::patch(api, call, id).await,
        (Method::DELETE, Resource::Entity(id)) => entities::delete(api, call, id).await,
        (Method::POST, Resource::SetAction(name)) => entities::set_action(api, call, &name).await,
        (Method::POST, Resource::EntityAction(id, name)) => actions::bound(api, call, id, &name).await,
        (Method::GET, Resource::Operation { name, arguments }) => {
            actions::function(api, call, &name, arguments.as_deref()).await
        }
        (Method::POST, Resource::Operation { name, arguments: None }) => actions::unbound(api, call, &name).await,
        (_, Resource::Operation { name, .. }) => Err(ApiError::not_found(format!(
            "Resource not found for the segment '{}'",
            name.chars().take(100).collect::<String>()
        ))),
        (method, resource) => Err(ApiError::method_not_allowed(method.as_str(), &format!("{resource:?}"))),
    }
}

/// A JSON answer with the OData headers the clients expect.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let text = match serde_json::to_vec(body) {
        Ok(text) => text,
        // Only a defect in a body's own serializer gets here.
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error::UNEXPECTED, e.to_string()).into_response();
        }
    };
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json; odata.metadata=minimal"),
    );
    headers.insert("OData-Version", axum::http::HeaderValue::from_static("4.0"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past `max_requests_in_flight`, requests are answered 429 with
    /// Retry-After in Dataverse's error shape; a freed slot serves again.
    #[tokio::test]
    async fn requests_beyond_the_limit_are_shed_with_retry_after() {
        let dir = std::env::temp_dir().join(format!("copilot-ingest-shed-{}", uuid::Uuid::new_v4().simple()));
        let metrics = Arc::new(Metrics::new());
        let url = crate::config::SinkUrl::Sqlite(dir.join("t.db"));
        let backend = Arc::new(Backend::open(&url, "t", 1, &metrics).await.unwrap());
        let config =
            ApiConfig { auth: crate::config::AuthMode::None, max_requests_in_flight: 1, ..ApiConfig::default() };
        let api = WebApi::new(&config, backend, Normalizer::default(), Arc::clone(&metrics)).unwrap();
        let request =
            || axum::http::Request::get("/api/data/v9.2/WhoAmI()").header("Host", "h").body(Body::empty()).unwrap();
        let held = Arc::clone(&api.in_flight).try_acquire_owned().unwrap();
        let shed = handle(&api, request()).await;
        assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(shed.headers().get("Retry-After").unwrap(), "1");
        let body = axum::body::to_bytes(shed.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], error::THROTTLED);
        drop(held);
        assert_eq!(handle(&api, request()).await.status(), StatusCode::OK);
        assert_eq!(metrics.api_requests_total.with_label_values(&["GET", "4xx"]).get(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
