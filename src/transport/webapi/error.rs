//! Errors in Dataverse's shape, `{"error":{"code":"0x…","message":"…"}}`,
//! with Dataverse's codes and HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::backend::BackendError;
use crate::operations::OperationError;

/// Record does not exist.
pub const NOT_FOUND: &str = crate::operations::NOT_FOUND;
/// A record with these key values already exists.
pub const DUPLICATE: &str = "0x80040237";
/// A string is longer than its column's maximum length.
pub const STRING_TOO_LONG: &str = "0x80044331";
/// A value is not an option of its option set.
pub const OPTION_OUT_OF_RANGE: &str = "0x8004431A";
/// A property in the payload is not one of the table's.
pub const UNKNOWN_PROPERTY: &str = "0x80060888";
/// A request parameter or value is not valid.
pub const INVALID_ARGUMENT: &str = "0x80040203";
/// The row version does not match (optimistic concurrency).
pub const VERSION_MISMATCH: &str = crate::operations::update::VERSION_MISMATCH;
/// The caller may not do this.
pub const ACCESS_DENIED: &str = "0x80040220";
/// No valid credentials.
pub const UNAUTHENTICATED: &str = "0x80072560";
/// The server is busy; retry after the given delay.
pub const THROTTLED: &str = "0x80072322";
/// Anything unexpected.
pub const UNEXPECTED: &str = "0x80040216";
/// The resource or method is not served.
pub const NOT_SUPPORTED: &str = "0x80060888";

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, INVALID_ARGUMENT, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, NOT_FOUND, message)
    }

    pub fn precondition_failed(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PRECONDITION_FAILED, code, message)
    }

    pub fn method_not_allowed(method: &str, what: &str) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, NOT_SUPPORTED, format!("{method} is not supported on {what}"))
    }

    /// A refused record (validation), by its reason code.
    pub fn from_reason(reason: &str, message: &str) -> ApiError {
        let code = match reason {
            "value_too_long" => STRING_TOO_LONG,
            "invalid_option" => OPTION_OUT_OF_RANGE,
            "unknown_field" | "read_only_field" => UNKNOWN_PROPERTY,
            "duplicate_id_conflict" => return ApiError::precondition_failed(DUPLICATE, message),
            _ => INVALID_ARGUMENT,
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, format!("{reason}: {message}"))
    }
}

impl From<OperationError> for ApiError {
    fn from(e: OperationError) -> ApiError {
        match e {
            OperationError::Failed { code, message } => match code.as_str() {
                NOT_FOUND => ApiError::not_found(message),
                VERSION_MISMATCH => ApiError::precondition_failed(VERSION_MISMATCH, message),
                // The validator's reason codes (Update runs the ingestion normalizer).
                c if c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => ApiError::from_reason(c, &message),
                // Named refusals of the operations (RecordRetained, NotRetained, InvalidFetchXml, …).
                c => ApiError::bad_request(format!("{c}: {message}")),
            },
            OperationError::Backend(e) => e.into(),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        match e {
            BackendError::Transient(message) => {
                tracing::warn!(error = %message, "Web API: the database is unavailable");
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        UNEXPECTED,
                        "the database is unavailable; retry later",
                    )
                }
            }
            BackendError::Permanent(message) | BackendError::Fatal(message) => {
                tracing::error!(error = %message, "Web API: the database refused a request");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, UNEXPECTED, "the database refused the request")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; odata.metadata=minimal"));
        headers.insert("OData-Version", HeaderValue::from_static("4.0"));
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
