//! The entity sets `retentionconfigs` (the retention policies: GET, POST,
//! PATCH, DELETE) and `retentionoperations` (every long operation and
//! scheduled run: GET), over the same bookkeeping operations as the control
//! topic. Reading needs the `read` role; changing a policy `retention`.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::error::ApiError;
use super::request::Call;
use super::{WebApi, json_response};
use crate::config::Role;
use crate::operations::bookkeeping::{self, DUPLICATE, OPERATION_ENTITY, POLICY_ENTITY, PolicyKey, Request};

pub const POLICY_SET: &str = "retentionconfigs";
pub const OPERATION_SET: &str = "retentionoperations";

/// The entity set a path segment names, and its entity.
pub fn entity_of_set(set: &str) -> Option<&'static str> {
    match set {
        POLICY_SET => Some(POLICY_ENTITY),
        OPERATION_SET => Some(OPERATION_ENTITY),
        _ => None,
    }
}

pub async fn handle(api: &WebApi, call: &Call, entity: &'static str, key: Option<Uuid>) -> Result<Response, ApiError> {
    let set = if entity == POLICY_ENTITY { POLICY_SET } else { OPERATION_SET };
    let method = call.method.clone();
    if method == Method::GET {
        call.caller.require(Role::Read, set)?;
        return read(api, call, entity, set, key).await;
    }
    if entity != POLICY_ENTITY {
        return Err(ApiError::method_not_allowed(method.as_str(), "retentionoperations are read-only"));
    }
    call.caller.require(Role::Retention, "changing retention policies")?;
    let request = match (method, key) {
        (Method::POST, None) => Request::CreatePolicy { entity: body(call)? },
        (Method::PATCH, Some(id)) => Request::UpdatePolicy { key: PolicyKey::Id(id), changes: body(call)? },
        (Method::DELETE, Some(id)) => Request::DeletePolicy { key: PolicyKey::Id(id) },
        (method, _) => return Err(ApiError::method_not_allowed(method.as_str(), set)),
    };
    let created = matches!(request, Request::CreatePolicy { .. });
    let answer = bookkeeping::execute(&api.backend, &request, chrono::Utc::now()).await.map_err(|e| match e {
        crate::operations::OperationError::Failed { code, message } if code == DUPLICATE => {
            ApiError::precondition_failed(DUPLICATE, message)
        }
        other => other.into(),
    })?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let id = if created { answer["id"].as_str().and_then(|id| Uuid::parse_str(id).ok()) } else { key };
    if let Some(id) = id
        && let Ok(value) = HeaderValue::from_str(&format!("{}/{set}({id})", call.base))
    {
        response.headers_mut().insert("OData-EntityId", value.clone());
        if created {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(response)
}

fn body(call: &Call) -> Result<Map<String, Json>, ApiError> {
    match serde_json::from_slice::<Json>(&call.body) {
        Ok(Json::Object(map)) => Ok(map),
        _ => Err(ApiError::bad_request("the body must be a JSON object of retentionconfig columns")),
    }
}

async fn read(
    api: &WebApi,
    call: &Call,
    entity: &'static str,
    set: &str,
    key: Option<Uuid>,
) -> Result<Response, ApiError> {
    let id_column = if entity == POLICY_ENTITY { "retentionconfigid" } else { "retentionoperationid" };
    let mut conditions: Vec<(String, String)> =
        key.map(|id| (id_column.to_owned(), id.to_string())).into_iter().collect();
    let mut top = None;
    for (name, value) in &call.query {
        match name.as_str() {
            "$filter" => conditions.extend(filter_conditions(entity, value)?),
            "$top" => top = Some(value.parse::<i64>().map_err(|_| ApiError::bad_request("$top must be a number"))?),
            "$select" | "$orderby" | "$count" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "the query option '{}' is not supported on {set}",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    let request = if entity == POLICY_ENTITY {
        Request::RetrievePolicies { conditions, count: top }
    } else {
        Request::RetrieveOperations { conditions, count: top }
    };
    let answer = bookkeeping::execute(&api.backend, &request, chrono::Utc::now()).await?;
    let entities = answer["EntityCollection"]["Entities"].as_array().cloned().unwrap_or_default();
    let context = format!("{}/$metadata#{set}", call.base);
    let Some(_) = key else {
        return Ok(json_response(StatusCode::OK, &serde_json::json!({"@odata.context": context, "value": entities})));
    };
    let Some(Json::Object(one)) = entities.into_iter().next() else {
        return Err(ApiError::not_found(format!("{entity} With Id = {} Does Not Exist", key.unwrap_or_default())));
    };
    let mut body = Map::new();
    body.insert("@odata.context".into(), Json::String(format!("{context}/$entity")));
    body.extend(one);
    Ok(json_response(StatusCode::OK, &Json::Object(body)))
}

/// `$filter` on these sets: `column eq 'value'` joined by `and`, on the
/// columns a bookkeeping query may filter by.
fn filter_conditions(entity: &str, filter: &str) -> Result<Vec<(String, String)>, ApiError> {
    let allowed = bookkeeping::filterable(entity).unwrap_or(&[]);
    let mut conditions = Vec::new();
    for clause in filter.split(" and ") {
        let mut parts = clause.trim().splitn(3, ' ');
        let (Some(column), Some("eq"), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ApiError::bad_request(format!("$filter on {entity} takes only `column eq 'value'` clauses")));
        };
        if !allowed.contains(&column) {
            return Err(ApiError::bad_request(format!("$filter on {entity}: filter by {}", allowed.join(", "))));
        }
        conditions.push((column.to_owned(), value.trim().trim_matches('\'').replace("''", "'")));
    }
    Ok(conditions)
}
