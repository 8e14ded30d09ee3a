//! SetState and IsValidStateTransition over the table's state/status pairs:
//! (0 Active, 1 Active) and (1 Inactive, 2 Inactive). Retained records
//! refuse a change of state.

use serde::Serialize;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::OperationError;
use super::update::{Empty, UpdateTarget, normalized, why_not_updated};
use crate::backend::{Backend, RecordState};
use crate::table::table;

#[derive(Debug, Clone)]
pub struct SetState {
    pub target: Uuid,
    pub state: i32,
    /// `-1`: the state's default status.
    pub status: i32,
}

/// The status a (state, status) request means, if the pair is one of the table's.
pub fn status_for(state: i32, status: i32) -> Option<i32> {
    let t = table();
    let state_option = t.column("statecode")?.option(state)?;
    let status = if status == -1 { state_option.default_status? } else { status };
    let status_option = t.column("statuscode")?.option(status)?;
    (status_option.state == Some(state)).then_some(status)
}

pub async fn set_state(backend: &Backend, request: &SetState) -> Result<Empty, OperationError> {
    let status = status_for(request.state, request.status).ok_or_else(|| {
        OperationError::failed(
            "0x80040203",
            format!(
                "State {} with Status {} is not a valid state and status of the table",
                request.state, request.status
            ),
        )
    })?;
    let mut fields = Map::new();
    fields.insert("statuscode".into(), Json::from(status));
    let target = UpdateTarget { id: request.target, fields, row_version: None };
    let row = normalized(backend, &target).await?;
    match backend.update_rows(std::slice::from_ref(&row)).await? {
        None => Ok(Empty {}),
        Some(_) => Err(why_not_updated(backend, &target).await?),
    }
}

#[derive(Debug, Clone)]
pub struct IsValidStateTransition {
    pub target: Uuid,
    /// The state's label, as Dataverse takes it (`"Active"`, `"Inactive"`).
    pub new_state: String,
    pub new_status: i32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IsValidStateTransitionResponse {
    pub is_valid: bool,
}

/// Whether SetState to this pair would succeed now; changes nothing.
pub async fn is_valid_state_transition(
    backend: &Backend,
    request: &IsValidStateTransition,
) -> Result<IsValidStateTransitionResponse, OperationError> {
    let state = table().column("statecode").and_then(|c| c.option_by_label(&request.new_state));
    let pair = state.and_then(|s| status_for(s, request.new_status));
    Ok(match backend.record_state(request.target).await? {
        RecordState::Purged | RecordState::Missing => return Err(super::not_found(request.target)),
        RecordState::Retained => IsValidStateTransitionResponse { is_valid: false },
        RecordState::Live => IsValidStateTransitionResponse { is_valid: pair.is_some() },
    })
}
