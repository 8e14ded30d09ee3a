//! The table's messages, one function per Dataverse message, written once
//! over the [`Backend`] interface. They know nothing about Kafka or HTTP: a
//! transport parses a request into a [`Request`], calls [`execute`] and
//! encodes the response (the Dataverse response shape, as JSON) or the
//! failure (a Dataverse error code and message).
//!
//! - CreateMultiple (the ingest transport's batches) in [`create_multiple`];
//! - Retrieve in [`retrieve`], RetrieveMultiple in [`retrieve_multiple`];
//! - Update and UpdateMultiple in [`update`]; Delete and BulkDelete in [`delete`];
//! - SetState and IsValidStateTransition in [`state`];
//! - ValidateRetentionConfig, Retain, BulkRetain, RollbackRetain, PurgeRetainedContent in [`retention`];
//! - retention policies ([`policy`]), run by the [`scheduler`], read and managed as the
//!   `retentionconfig` and `retentionoperation` entities in [`bookkeeping`]; progress in [`report`].

pub mod bookkeeping;
pub mod create_multiple;
pub mod delete;
pub mod parameters;
pub mod policy;
pub mod report;
pub mod retention;
pub mod retrieve;
pub mod retrieve_multiple;
pub mod scheduler;
pub mod state;
pub mod update;

use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

use crate::backend::{Backend, BackendError};
use crate::table::table;

/// Who asked, for the operations that leave a record of their run.
#[derive(Debug, Clone)]
pub struct Context {
    /// The transport's id of the request (the control command's `command_id`).
    pub request_id: String,
    /// The id of the run: stable across redeliveries of one request, so a
    /// redelivered request resumes the same run.
    pub operation_id: Uuid,
    /// Where a long operation reports its progress, if anyone listens.
    pub progress: Option<report::ProgressSink>,
}

impl Context {
    /// A context whose operation id is derived from the request id.
    pub fn for_request(request_id: &str) -> Context {
        const NS: Uuid = Uuid::from_u128(0x6f0b_4c1e_2a57_4d0e_9b1c_0c0b_71c5_7a03);
        Context {
            request_id: request_id.to_owned(),
            operation_id: Uuid::new_v5(&NS, request_id.as_bytes()),
            progress: None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum OperationError {
    /// The request ran and cannot succeed as given: Dataverse's error code
    /// (`0x80040217` not found, …) or a named one, and a message.
    #[error("{code}: {message}")]
    Failed { code: String, message: String },
    /// The backend failed; a transient failure is worth retrying as is.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl OperationError {
    pub fn failed(code: &str, message: impl Into<String>) -> OperationError {
        OperationError::Failed { code: code.to_owned(), message: message.into() }
    }
}

/// Dataverse's "record does not exist" code.
pub const NOT_FOUND: &str = "0x80040217";

/// Dataverse's not-found failure for `id`.
pub fn not_found(id: Uuid) -> OperationError {
    OperationError::failed(NOT_FOUND, format!("{} With Id = {id} Does Not Exist", table().logical_name))
}

/// One request to the table, with its validated parameters.
#[derive(Debug, Clone)]
pub enum Request {
    ValidateRetentionConfig(retention::ValidateRetentionConfig),
    Retain(retention::Retain),
    BulkRetain(retention::BulkRetain),
    RollbackRetain(retention::RollbackRetain),
    PurgeRetainedContent(retention::PurgeRetainedContent),
    Retrieve(retrieve::Retrieve),
    RetrieveMultiple(retrieve_multiple::RetrieveMultiple),
    Update(update::Update),
    UpdateMultiple(update::UpdateMultiple),
    Delete(delete::Delete),
    BulkDelete(delete::BulkDelete),
    SetState(state::SetState),
    IsValidStateTransition(state::IsValidStateTransition),
    /// The retention policies and operations as entities.
    Bookkeeping(bookkeeping::Request),
}

/// Runs one request and returns its response in Dataverse's shape. With
/// the Dataverse backend, Dataverse itself executes the messages it has.
pub async fn execute(backend: &Backend, context: &Context, request: &Request) -> Result<Json, OperationError> {
    if let Backend::Dataverse(dataverse) = backend
        && let Some(forwarded) = dataverse.forward(request).await
    {
        return forwarded;
    }
    match request {
        Request::ValidateRetentionConfig(r) => respond(retention::validate_retention_config(r)),
        Request::Retain(r) => respond(retention::retain(backend, context, r).await?),
        Request::BulkRetain(r) => respond(retention::bulk_retain(backend, context, r).await?),
        Request::RollbackRetain(r) => respond(retention::rollback_retain(backend, r).await?),
        Request::PurgeRetainedContent(r) => respond(retention::purge_retained_content(backend, context, r).await?),
        Request::Retrieve(r) => respond(retrieve::retrieve(backend, r).await?),
        Request::RetrieveMultiple(r) => respond(retrieve_multiple::retrieve_multiple(backend, r).await?),
        Request::Update(r) => respond(update::update(backend, r).await?),
        Request::UpdateMultiple(r) => respond(update::update_multiple(backend, r).await?),
        Request::Delete(r) => respond(delete::delete(backend, r).await?),
        Request::BulkDelete(r) => respond(delete::bulk_delete(backend, context, r).await?),
        Request::SetState(r) => respond(state::set_state(backend, r).await?),
        Request::IsValidStateTransition(r) => respond(state::is_valid_state_transition(backend, r).await?),
        Request::Bookkeeping(r) => bookkeeping::execute(backend, r, chrono::Utc::now()).await,
    }
}

fn respond(response: impl Serialize) -> Result<Json, OperationError> {
    serde_json::to_value(response).map_err(|e| OperationError::Backend(BackendError::Permanent(e.to_string())))
}

/// `{"msdyn_copilotinteraction": n}`: Dataverse's `EntityCountCollection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityCountCollection(pub i64);

impl Serialize for EntityCountCollection {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(&table().logical_name, &self.0)?;
        map.end()
    }
}
