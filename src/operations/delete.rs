//! Delete and BulkDelete: records removed for good, each id tombstoned with
//! the message that deleted it, so a replayed event never re-creates it
//! (counted as `deleted_replay`). Live and retained records alike.

use serde::Serialize;
use uuid::Uuid;

use super::retention::{delete_pages, start};
use super::update::Empty;
use super::{Context, EntityCountCollection, OperationError};
use crate::backend::{Backend, DeletePage, OperationCounter};
use crate::query::fetchxml::Criteria;

#[derive(Debug, Clone)]
pub struct Delete {
    pub target: Uuid,
}

/// Deletes one record; an id that does not exist (or no longer does) is not found.
pub async fn delete(backend: &Backend, request: &Delete) -> Result<Empty, OperationError> {
    if backend.delete_record(request.target).await? { Ok(Empty {}) } else { Err(super::not_found(request.target)) }
}

#[derive(Debug, Clone)]
pub struct BulkDelete {
    /// `criteria.retained`: the retained records (`DataSource: "retained"`), else the live ones.
    pub criteria: Criteria,
    pub fetch_xml: String,
    pub page_size: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BulkDeleteResponse {
    pub entity_count_collection: EntityCountCollection,
    pub operation_id: Uuid,
    pub has_more_records: bool,
}

/// Deletes every record matching the criteria, page by page; a run killed
/// halfway resumes under the same operation with exact counts.
pub async fn bulk_delete(
    backend: &Backend,
    context: &Context,
    request: &BulkDelete,
) -> Result<BulkDeleteResponse, OperationError> {
    let page = DeletePage {
        retained: request.criteria.retained,
        max_version: None,
        criteria: request.criteria.clone(),
        deleted_by: Some("BulkDelete"),
        retained_before: None,
        counter: OperationCounter::Total,
    };
    let operation = start(context, "BulkDelete", Some(&request.fetch_xml));
    let total = delete_pages(backend, context, &operation, &page, request.page_size).await?;
    Ok(BulkDeleteResponse {
        entity_count_collection: EntityCountCollection(total),
        operation_id: context.operation_id,
        has_more_records: false,
    })
}
