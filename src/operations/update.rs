//! Update and UpdateMultiple: new values for live records, validated and
//! normalized exactly as ingestion validates an event (the stored row with
//! the changes applied goes through the same normalizer), written in one
//! transaction with a new `versionnumber` and `modifiedon`. The stored
//! content digest stays the ingested event's, so a replay of that event is
//! still recognised as a replay and never undoes the update.

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::OperationError;
use crate::backend::{Backend, RecordState, RowUpdate};
use crate::normalize::Normalizer;
use crate::record::create_columns;
use crate::table::table;

/// Dataverse's code for an `IfRowVersionMatches` whose version is not the record's.
pub const VERSION_MISMATCH: &str = "0x80060882";
/// Retained records are read-only.
pub const RECORD_RETAINED: &str = "RecordRetained";

/// One record's changes: its id and the columns to set (`null` clears one).
#[derive(Debug, Clone)]
pub struct UpdateTarget {
    pub id: Uuid,
    pub fields: Map<String, Json>,
    /// `ConcurrencyBehavior: IfRowVersionMatches` with this `RowVersion`.
    pub row_version: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Update {
    pub target: UpdateTarget,
}

#[derive(Debug, Clone)]
pub struct UpdateMultiple {
    pub targets: Vec<UpdateTarget>,
}

/// Update and UpdateMultiple answer nothing beyond success.
#[derive(Debug, Clone, Serialize)]
pub struct Empty {}

pub async fn update(backend: &Backend, request: &Update) -> Result<Empty, OperationError> {
    update_all(backend, std::slice::from_ref(&request.target)).await
}

/// All or nothing: one transaction; the first target that cannot be
/// updated fails the whole request and nothing is written.
pub async fn update_multiple(backend: &Backend, request: &UpdateMultiple) -> Result<Empty, OperationError> {
    update_all(backend, &request.targets).await
}

async fn update_all(backend: &Backend, targets: &[UpdateTarget]) -> Result<Empty, OperationError> {
    let mut rows = Vec::with_capacity(targets.len());
    for target in targets {
        check_columns(&target.fields)?;
        rows.push(normalized(backend, target).await?);
    }
    match backend.update_rows(&rows).await? {
        None => Ok(Empty {}),
        Some(k) => Err(why_not_updated(backend, &targets[k]).await?),
    }
}

/// Whether an Update would succeed now, changing nothing: the columns, the
/// values through the normalizer, the record's state and its row version (a
/// Web API change set checks every part before it runs any).
pub async fn check(backend: &Backend, target: &UpdateTarget) -> Result<(), OperationError> {
    check_columns(&target.fields)?;
    normalized(backend, target).await?;
    if let Some(expected) = target.row_version {
        let version = table().index_of("versionnumber").unwrap_or(0);
        let current = backend.retrieve(target.id, &[version]).await?.and_then(|v| v.first().and_then(Json::as_i64));
        if current != Some(expected) {
            return Err(why_not_updated(backend, target).await?);
        }
    }
    Ok(())
}

/// Only stored columns valid for update may be set.
pub(super) fn check_columns(fields: &Map<String, Json>) -> Result<(), OperationError> {
    let t = table();
    for name in fields.keys() {
        match t.index_of(name).map(|i| &t.columns[i]) {
            None => {
                return Err(OperationError::failed(
                    "unknown_field",
                    format!("'{}' is not a column of {}", name.chars().take(100).collect::<String>(), t.logical_name),
                ));
            }
            Some(c) if !c.valid_for_update || !c.stored => {
                let hint = if c.logical_name == "statecode" { "; use SetState" } else { "" };
                return Err(OperationError::failed(
                    "not_valid_for_update",
                    format!("'{}' is not valid for update{hint}", c.logical_name),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The stored record with the target's changes, through the ingestion normalizer.
pub(super) async fn normalized(backend: &Backend, target: &UpdateTarget) -> Result<RowUpdate, OperationError> {
    let t = table();
    if backend.record_state(target.id).await? == RecordState::Retained {
        return Err(retained(target.id));
    }
    let layout = create_columns();
    let stored = backend.retrieve(target.id, layout).await?.ok_or_else(|| super::not_found(target.id))?;
    let mut merged = Map::new();
    for (&i, value) in layout.iter().zip(stored) {
        if !value.is_null() {
            merged.insert(t.columns[i].logical_name.clone(), value);
        }
    }
    for (name, value) in &target.fields {
        if value.is_null() {
            merged.remove(name);
        } else {
            merged.insert(name.clone(), value.clone());
        }
    }
    let event = serde_json::to_vec(&merged).map_err(|e| OperationError::failed("malformed_json", e.to_string()))?;
    let record = Normalizer::default()
        .normalize_changed_json(&event, Utc::now())
        .map_err(|r| OperationError::failed(r.reason.code(), r.message))?;
    Ok(RowUpdate {
        id: target.id,
        values: record.values().to_vec(),
        state_code: record.state_code(),
        expected_version: target.row_version,
    })
}

/// Why a row matched nothing when written: retained or gone since it was
/// read, or not at the expected version.
pub(super) async fn why_not_updated(
    backend: &Backend,
    target: &UpdateTarget,
) -> Result<OperationError, OperationError> {
    Ok(match backend.record_state(target.id).await? {
        RecordState::Retained => retained(target.id),
        RecordState::Purged | RecordState::Missing => super::not_found(target.id),
        RecordState::Live => OperationError::failed(
            VERSION_MISMATCH,
            format!(
                "The version of the existing record {} doesn't match the RowVersion {} provided",
                target.id,
                target.row_version.map(|v| v.to_string()).unwrap_or_default()
            ),
        ),
    })
}

pub(super) fn retained(id: Uuid) -> OperationError {
    OperationError::failed(
        RECORD_RETAINED,
        format!("record {id} is retained (long-term retention): retained records are read-only"),
    )
}
