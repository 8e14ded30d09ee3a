//! The table's other messages as OData actions and functions: `Retain`
//! (bound to a record or unbound), `BulkRetain`, `RollbackRetain`,
//! `PurgeRetainedContent`, `ValidateRetentionConfig`, `BulkDelete` (POST
//! with the message's parameters as the body, read by the same parameter
//! reader as the control topic) and the function `IsValidStateTransition`.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::error::ApiError;
use super::request::Call;
use super::{WebApi, json_response};
use crate::config::Role;
use crate::operations::parameters::{self, Message};
use crate::operations::{Context, execute};

/// The role each message needs: the destructive bulk messages need `retention`.
fn role_for(message: Message) -> Role {
    match message {
        Message::ValidateRetentionConfig
        | Message::IsValidStateTransition
        | Message::Retrieve
        | Message::RetrieveMultiple => Role::Read,
        Message::Update | Message::UpdateMultiple | Message::Delete | Message::SetState => Role::Write,
        Message::Retain
        | Message::BulkRetain
        | Message::RollbackRetain
        | Message::PurgeRetainedContent
        | Message::BulkDelete
        | Message::Create => Role::Retention,
    }
}

/// The messages served as actions (the rest have their own routes).
fn action(name: &str) -> Option<Message> {
    match name {
        "Retain" => Some(Message::Retain),
        "BulkRetain" => Some(Message::BulkRetain),
        "RollbackRetain" => Some(Message::RollbackRetain),
        "PurgeRetainedContent" => Some(Message::PurgeRetainedContent),
        "ValidateRetentionConfig" => Some(Message::ValidateRetentionConfig),
        "BulkDelete" => Some(Message::BulkDelete),
        // SetState is a PATCH of statecode/statuscode in the Web API, not an action.
        _ => None,
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(format!("Resource not found for the segment '{}'", name.chars().take(100).collect::<String>()))
}

async fn run(api: &WebApi, call: &Call, message: Message, params: &Map<String, Json>) -> Result<Response, ApiError> {
    call.caller.require(role_for(message), message.name())?;
    let request = parameters::request(message, params)
        .map_err(|e| ApiError::bad_request(format!("{}: {}", e.code, e.message)))?;
    // Each HTTP request is its own run (there is no command id to resume by).
    let context = Context::for_request(&format!("webapi:{}", Uuid::new_v4()));
    let response = execute(&api.backend, &context, &request).await?;
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        Json::String(format!("{}/$metadata#Microsoft.Dynamics.CRM.{}Response", call.base, message.name())),
    );
    if let Json::Object(fields) = response {
        body.extend(fields);
    }
    Ok(json_response(StatusCode::OK, &Json::Object(body)))
}

fn body_parameters(call: &Call) -> Result<Map<String, Json>, ApiError> {
    if call.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Json>(&call.body) {
        Ok(Json::Object(mut map)) => {
            map.retain(|k, _| !k.starts_with('@'));
            Ok(map)
        }
        _ => Err(ApiError::bad_request("the action's parameters must be a JSON object")),
    }
}

/// POST `<Action>` (unbound).
pub async fn unbound(api: &WebApi, call: &Call, name: &str) -> Result<Response, ApiError> {
    let message = action(name).ok_or_else(|| unknown(name))?;
    let params = body_parameters(call)?;
    if message == Message::BulkDelete && params.contains_key("QuerySet") {
        return Err(ApiError::bad_request(
            "BulkDelete takes FetchXml (and optionally DataSource, PageSize) here; a QuerySet of QueryExpressions is not supported",
        ));
    }
    run(api, call, message, &params).await
}

/// POST `msdyn_copilotinteractions/Microsoft.Dynamics.CRM.<Action>`: the
/// unbound action addressed through the entity set.
pub async fn bound_to_set(api: &WebApi, call: &Call, name: &str) -> Result<Response, ApiError> {
    unbound(api, call, name).await
}

/// POST `msdyn_copilotinteractions(<id>)/Microsoft.Dynamics.CRM.<Action>`:
/// the record is the action's `Target`.
pub async fn bound(api: &WebApi, call: &Call, id: Uuid, name: &str) -> Result<Response, ApiError> {
    let message = match name {
        "Retain" => Message::Retain,
        "RollbackRetain" => Message::RollbackRetain,
        _ => return Err(unknown(name)),
    };
    let mut params = body_parameters(call)?;
    params.insert("Target".into(), Json::String(id.to_string()));
    run(api, call, message, &params).await
}

/// GET `<Function>(Name=value|@alias,…)`.
pub async fn function(api: &WebApi, call: &Call, name: &str, arguments: Option<&str>) -> Result<Response, ApiError> {
    if name != "IsValidStateTransition" {
        return Err(unknown(name));
    }
    let mut params = Map::new();
    for argument in arguments.unwrap_or_default().split(',').filter(|a| !a.trim().is_empty()) {
        let (key, value) = argument
            .split_once('=')
            .ok_or_else(|| ApiError::bad_request(format!("the function argument '{argument}' is not Name=value")))?;
        let value = match value.trim().strip_prefix('@') {
            Some(alias) => call
                .option(&format!("@{alias}"))
                .ok_or_else(|| ApiError::bad_request(format!("the parameter alias @{alias} has no value")))?,
            None => value.trim(),
        };
        params.insert(key.trim().to_owned(), function_value(value)?);
    }
    run(api, call, Message::IsValidStateTransition, &params).await
}

/// A function argument: a quoted string, a number, or an entity reference
/// `{"@odata.id":"msdyn_copilotinteractions(<id>)"}` (its id).
fn function_value(text: &str) -> Result<Json, ApiError> {
    if let Some(quoted) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Ok(Json::String(quoted.replace("''", "'")));
    }
    if let Ok(n) = text.parse::<i64>() {
        return Ok(Json::from(n));
    }
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(reference)) => {
            let id = reference
                .get("@odata.id")
                .and_then(Json::as_str)
                .and_then(|r| r.rsplit_once('('))
                .and_then(|(_, id)| id.strip_suffix(')'))
                .ok_or_else(|| ApiError::bad_request("an entity argument needs @odata.id: \"<set>(<id>)\""))?;
            Ok(Json::String(id.to_owned()))
        }
        _ => Ok(Json::String(text.to_owned())),
    }
}
