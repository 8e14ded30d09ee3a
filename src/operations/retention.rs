//! Long-term retention: ValidateRetentionConfig, Retain, BulkRetain,
//! RollbackRetain and PurgeRetainedContent. The bulk ones run page by page,
//! each page one transaction that also counts itself into the operation's
//! row, so a run killed halfway resumes (same operation id) with exact counts.

use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use super::report::Tracker;
use super::{Context, EntityCountCollection, OperationError};
use crate::backend::{Backend, BackendError, DeletePage, OperationCounter, OperationStart, RecordState, RollbackScope};
use crate::query::fetchxml::{self, Condition, Criteria, Filter, Operator, Param};
use crate::table::table;

#[derive(Debug, Clone)]
pub struct ValidateRetentionConfig {
    pub fetch_xml: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ValidateRetentionConfigResponse {
    pub is_validation_successful: bool,
    pub error_message: Option<String>,
}

/// Checks criteria against the table definition; changes nothing.
pub fn validate_retention_config(request: &ValidateRetentionConfig) -> ValidateRetentionConfigResponse {
    let error_message = fetchxml::parse(&request.fetch_xml, Utc::now()).err();
    ValidateRetentionConfigResponse { is_validation_successful: error_message.is_none(), error_message }
}

#[derive(Debug, Clone)]
pub struct Retain {
    pub target: Uuid,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RetainResponse {
    pub entity_count_collection: EntityCountCollection,
    pub operation_id: Uuid,
}

/// Marks one live record retained.
pub async fn retain(backend: &Backend, context: &Context, request: &Retain) -> Result<RetainResponse, OperationError> {
    let t = table();
    let op = context.operation_id;
    backend.begin_operation(&start(context, "Retain", None)).await?;
    let criteria = Criteria {
        filter: Some(Filter::Condition(Condition {
            column: t.index_of(&t.primary_id_attribute).unwrap_or(0),
            operator: Operator::Eq,
            values: vec![Param::Guid(request.target)],
        })),
        retained: false,
    };
    if backend.retain_page(op, &criteria, 1).await? == 1 {
        backend.set_operation_status(op, "Succeeded", true).await?;
        return Ok(RetainResponse { entity_count_collection: EntityCountCollection(1), operation_id: op });
    }
    backend.set_operation_status(op, "Failed", true).await?;
    let target = request.target;
    Err(match backend.record_state(target).await? {
        RecordState::Retained => {
            OperationError::failed("AlreadyRetained", format!("record {target} is already retained"))
        }
        RecordState::Purged => OperationError::failed("RecordPurged", format!("record {target} was purged")),
        RecordState::Live | RecordState::Missing => super::not_found(target),
    })
}

#[derive(Debug, Clone)]
pub struct BulkRetain {
    pub criteria: Criteria,
    pub fetch_xml: String,
    pub page_size: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct BulkRetainResponse {
    pub entity_count_collection: EntityCountCollection,
    pub operation_id: Uuid,
    pub has_more_records: bool,
    pub failed_records: Vec<Uuid>,
}

/// Marks every live record matching the criteria retained, page by page.
pub async fn bulk_retain(
    backend: &Backend,
    context: &Context,
    request: &BulkRetain,
) -> Result<BulkRetainResponse, OperationError> {
    let op = context.operation_id;
    let total = backend.begin_operation(&start(context, "BulkRetain", Some(&request.fetch_xml))).await?;
    let mut tracker = Tracker::new(context.progress.clone(), op, "BulkRetain", "Marking", total);
    if tracker.listening() {
        tracker.expect(backend.count(&request.criteria).await?);
    }
    let size = request.page_size;
    page_by_page(size, &mut tracker, || backend.retain_page(op, &request.criteria, size), nothing).await?;
    backend.set_operation_status(op, "Succeeded", true).await?;
    Ok(BulkRetainResponse {
        entity_count_collection: EntityCountCollection(tracker.count()),
        operation_id: op,
        has_more_records: false,
        failed_records: Vec::new(),
    })
}

#[derive(Debug, Clone)]
pub struct RollbackRetain {
    pub scope: RollbackScope,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RollbackRetainResponse {
    pub entity_count_collection: EntityCountCollection,
    pub operation_id: Option<Uuid>,
    pub failed_record_count: i64,
    pub failed_records: Vec<Uuid>,
    pub error_message: Option<String>,
}

/// Returns the records an operation retained (or one record), not yet
/// purged, to live. Only a retain operation rolls back: a purge's record of
/// deletions is never rewritten.
pub async fn rollback_retain(
    backend: &Backend,
    request: &RollbackRetain,
) -> Result<RollbackRetainResponse, OperationError> {
    let operation_id = match request.scope {
        RollbackScope::Operation(op) => {
            match backend.operation_message(op).await?.as_deref() {
                None => {
                    return Err(OperationError::failed("OperationNotFound", format!("no retention operation {op}")));
                }
                Some("BulkRetain" | "Retain") => {}
                Some(other) => {
                    return Err(OperationError::failed(
                        "NotRollbackable",
                        format!("operation {op} is a {other}; only BulkRetain and Retain operations roll back"),
                    ));
                }
            }
            Some(op)
        }
        RollbackScope::Record(_) => None,
    };
    let counts = backend.rollback(request.scope).await?;
    match request.scope {
        RollbackScope::Operation(op) => {
            let status = if counts.purged > 0 { "RolledBackPartially" } else { "RolledBack" };
            backend.set_operation_status(op, status, false).await?;
        }
        RollbackScope::Record(target) if counts.restored == 0 && counts.purged == 0 => {
            return Err(match backend.record_state(target).await? {
                RecordState::Live => OperationError::failed("NotRetained", format!("record {target} is not retained")),
                _ => super::not_found(target),
            });
        }
        RollbackScope::Record(_) => {}
    }
    Ok(RollbackRetainResponse {
        entity_count_collection: EntityCountCollection(counts.restored),
        operation_id,
        failed_record_count: counts.purged,
        failed_records: Vec::new(),
        error_message: (counts.purged > 0)
            .then(|| format!("{} record(s) were purged and cannot be rolled back", counts.purged)),
    })
}

#[derive(Debug, Clone)]
pub struct PurgeRetainedContent {
    pub max_version: Option<i64>,
    /// `None`: every retained record.
    pub criteria: Option<Criteria>,
    pub page_size: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PurgeRetainedContentResponse {
    pub entity_count_collection: EntityCountCollection,
    pub operation_id: Uuid,
    pub has_more_records: bool,
}

/// Deletes retained records for good, page by page, tombstoning each id so
/// a replayed event never re-creates it.
pub async fn purge_retained_content(
    backend: &Backend,
    context: &Context,
    request: &PurgeRetainedContent,
) -> Result<PurgeRetainedContentResponse, OperationError> {
    let op = context.operation_id;
    let page = DeletePage {
        retained: true,
        max_version: request.max_version,
        criteria: request.criteria.clone().unwrap_or(Criteria { filter: None, retained: true }),
        deleted_by: None,
        retained_before: None,
        counter: OperationCounter::Total,
    };
    let total =
        delete_pages(backend, context, &start(context, "PurgeRetainedContent", None), &page, request.page_size).await?;
    Ok(PurgeRetainedContentResponse {
        entity_count_collection: EntityCountCollection(total),
        operation_id: op,
        has_more_records: false,
    })
}

/// Deletes `page` page by page under one operation; returns the total.
pub(super) async fn delete_pages(
    backend: &Backend,
    context: &Context,
    operation: &OperationStart,
    page: &DeletePage,
    page_size: i64,
) -> Result<i64, OperationError> {
    let op = operation.operation_id;
    let total = backend.begin_operation(operation).await?;
    backend.set_operation_status(op, "Deleting", false).await?;
    let mut tracker = Tracker::new(context.progress.clone(), op, operation.message, "Deleting", total);
    if tracker.listening() {
        tracker.expect(backend.count(&page.criteria).await?);
    }
    page_by_page(page_size, &mut tracker, || backend.delete_page(op, page, page_size), nothing).await?;
    backend.set_operation_status(op, "Succeeded", true).await?;
    Ok(tracker.count())
}

/// Runs `page` until one comes back short of `page_size`, counting each into
/// `tracker`; `between` runs after every full page (the scheduler renews its
/// lease there). Each page is one transaction that also counts itself into
/// the operation, so stopping anywhere leaves exact counts.
pub(crate) async fn page_by_page<P, PageDone, B, BetweenDone>(
    page_size: i64,
    tracker: &mut Tracker,
    page: P,
    between: B,
) -> Result<(), OperationError>
where
    P: Fn() -> PageDone,
    PageDone: std::future::Future<Output = Result<i64, BackendError>>,
    B: Fn() -> BetweenDone,
    BetweenDone: std::future::Future<Output = Result<(), BackendError>>,
{
    loop {
        let n = page().await?;
        tracker.page(n);
        if n < page_size {
            return Ok(());
        }
        between().await?;
    }
}

/// Nothing to do between pages.
pub(crate) async fn nothing() -> Result<(), BackendError> {
    Ok(())
}

pub(super) fn start(context: &Context, message: &'static str, criteria: Option<&str>) -> OperationStart {
    OperationStart {
        operation_id: context.operation_id,
        command_id: context.request_id.clone(),
        message,
        criteria: criteria.map(str::to_owned),
        policy: None,
    }
}
