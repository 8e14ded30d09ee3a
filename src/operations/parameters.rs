//! The parameters of each message, in Dataverse's shape (`Target`,
//! `FetchXml`, `PageSize`, …), checked into a [`Request`]. Every transport
//! that carries messages by name (the control topic, the Web API's actions)
//! reads them here, so they mean the same everywhere.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::{Request, bookkeeping, delete, retention, retrieve, retrieve_multiple, state, update};
use crate::backend::RollbackScope;
use crate::query::fetchxml;
use crate::table::table;

/// Default `PageSize` of BulkRetain, PurgeRetainedContent and BulkDelete.
pub const DEFAULT_PAGE_SIZE: i64 = 5000;

/// The table's messages, named as Dataverse names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    ValidateRetentionConfig,
    Retain,
    BulkRetain,
    RollbackRetain,
    PurgeRetainedContent,
    Retrieve,
    RetrieveMultiple,
    Update,
    UpdateMultiple,
    Delete,
    SetState,
    IsValidStateTransition,
    BulkDelete,
    /// Creates a `retentionconfig` (the only entity created by message).
    Create,
}

impl Message {
    pub const ALL: [Message; 14] = [
        Message::ValidateRetentionConfig,
        Message::Retain,
        Message::BulkRetain,
        Message::RollbackRetain,
        Message::PurgeRetainedContent,
        Message::Retrieve,
        Message::RetrieveMultiple,
        Message::Update,
        Message::UpdateMultiple,
        Message::Delete,
        Message::SetState,
        Message::IsValidStateTransition,
        Message::BulkDelete,
        Message::Create,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Message::ValidateRetentionConfig => "ValidateRetentionConfig",
            Message::Retain => "Retain",
            Message::BulkRetain => "BulkRetain",
            Message::RollbackRetain => "RollbackRetain",
            Message::PurgeRetainedContent => "PurgeRetainedContent",
            Message::Retrieve => "Retrieve",
            Message::RetrieveMultiple => "RetrieveMultiple",
            Message::Update => "Update",
            Message::UpdateMultiple => "UpdateMultiple",
            Message::Delete => "Delete",
            Message::SetState => "SetState",
            Message::IsValidStateTransition => "IsValidStateTransition",
            Message::BulkDelete => "BulkDelete",
            Message::Create => "Create",
        }
    }

    pub fn parse(s: &str) -> Option<Message> {
        Message::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// The requests about the retention bookkeeping entities: RetrieveMultiple
/// of `retentionconfig` or `retentionoperation`, and Create, Update and
/// Delete with `EntityName` `retentionconfig`. `None` for the table's own.
fn bookkeeping_request(
    message: Message,
    params: &Map<String, Json>,
) -> Result<Option<bookkeeping::Request>, ParameterError> {
    let reject = |message: String| ParameterError { code: "InvalidParameters", message };
    let policy_entity = params.get("EntityName").and_then(Json::as_str) == Some(bookkeeping::POLICY_ENTITY);
    let target_object = || match params.get("Target") {
        Some(Json::Object(map)) => Ok(map.clone()),
        _ => Err(reject("Target must be an object of retentionconfig columns".into())),
    };
    Ok(Some(match message {
        Message::RetrieveMultiple => {
            let Some(query) = params.get("Query").and_then(Json::as_str) else { return Ok(None) };
            let parsed = crate::query::bookkeeping::query(query, &bookkeeping::filterable)
                .map_err(|e| ParameterError { code: "InvalidFetchXml", message: e })?;
            let Some(q) = parsed else { return Ok(None) };
            if q.entity == bookkeeping::POLICY_ENTITY {
                bookkeeping::Request::RetrievePolicies { conditions: q.conditions, count: q.count }
            } else {
                bookkeeping::Request::RetrieveOperations { conditions: q.conditions, count: q.count }
            }
        }
        Message::Create if policy_entity => bookkeeping::Request::CreatePolicy { entity: target_object()? },
        Message::Update if policy_entity => {
            let changes = target_object()?;
            let key = changes
                .get("uniquename")
                .and_then(Json::as_str)
                .ok_or_else(|| reject("Target needs the uniquename of the retentionconfig".into()))?;
            bookkeeping::Request::UpdatePolicy { key: bookkeeping::PolicyKey::UniqueName(key.to_owned()), changes }
        }
        Message::Delete if policy_entity => {
            let key = params
                .get("Target")
                .and_then(Json::as_str)
                .ok_or_else(|| reject("Target must be the uniquename of the retentionconfig".into()))?;
            bookkeeping::Request::DeletePolicy { key: bookkeeping::PolicyKey::UniqueName(key.to_owned()) }
        }
        _ if params.contains_key("EntityName") && matches!(message, Message::Update | Message::Delete) => {
            let named = params.get("EntityName").and_then(Json::as_str).unwrap_or_default();
            if named != table().logical_name {
                return Err(reject(format!(
                    "EntityName '{}' is not {} or {}",
                    truncate(named),
                    table().logical_name,
                    bookkeeping::POLICY_ENTITY
                )));
            }
            return Ok(None);
        }
        _ => return Ok(None),
    }))
}

/// Why parameters were refused: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterError {
    pub code: &'static str,
    pub message: String,
}

/// Checks the parameters of `message` into a request.
pub fn request(message: Message, params: &Map<String, Json>) -> Result<Request, ParameterError> {
    let name = message.name();
    let reject = |code: &'static str, message: String| ParameterError { code, message };
    let known: &[&str] = match message {
        Message::ValidateRetentionConfig => &["EntityName", "FetchXml", "ConfigId"],
        Message::Retain => &["Target"],
        Message::BulkRetain => &["EntityName", "FetchXml", "PageSize", "OperationId", "PagingCookie", "AllowAll"],
        Message::RollbackRetain => &["OperationId", "Target"],
        Message::PurgeRetainedContent => {
            &["EntityName", "MaxVersionToPurge", "FetchXml", "PageSize", "OperationId", "AllowAll"]
        }
        Message::Retrieve => &["Target", "ColumnSet"],
        Message::RetrieveMultiple => &["Query"],
        Message::Update => &["Target", "ConcurrencyBehavior", "RowVersion", "EntityName"],
        Message::UpdateMultiple => &["Targets"],
        Message::Delete => &["Target", "EntityName"],
        Message::Create => &["EntityName", "Target"],
        Message::SetState => &["EntityMoniker", "State", "Status"],
        Message::IsValidStateTransition => &["Entity", "NewState", "NewStatus"],
        Message::BulkDelete => &["EntityName", "FetchXml", "PageSize", "DataSource", "AllowAll"],
    };
    if let Some(unknown) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(reject("InvalidParameters", format!("unknown parameter '{}' for {name}", truncate(unknown))));
    }
    let text = |key: &str| params.get(key).and_then(Json::as_str);
    let entity_ok = |required: bool| -> Result<(), ParameterError> {
        match text("EntityName") {
            Some(e) if e == table().logical_name => Ok(()),
            Some(e) => Err(reject(
                "InvalidParameters",
                format!("EntityName '{}' is not {}", truncate(e), table().logical_name),
            )),
            None if required => Err(reject("InvalidParameters", "EntityName is required".into())),
            None => Ok(()),
        }
    };
    let guid = |key: &str| -> Result<Option<Uuid>, ParameterError> {
        match params.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => crate::normalize::parse_guid(s)
                .map(Some)
                .ok_or_else(|| reject("InvalidParameters", format!("{key} is not a GUID"))),
            Some(_) => Err(reject("InvalidParameters", format!("{key} must be a GUID string"))),
        }
    };
    let page_size = || -> Result<i64, ParameterError> {
        match params.get("PageSize") {
            None | Some(Json::Null) => Ok(DEFAULT_PAGE_SIZE),
            Some(v) => v
                .as_i64()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| reject("InvalidParameters", "PageSize must be an integer from 1 to 100000".into())),
        }
    };
    let allow_all = match params.get("AllowAll") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return Err(reject("InvalidParameters", "AllowAll must be true or false".into())),
    };
    // Criteria of a destructive message: an empty <filter> is refused, and
    // criteria that match every record need AllowAll, so that a mistyped or
    // truncated document never retains or purges the whole table.
    let destructive_criteria = |fetch_xml: &str| -> Result<fetchxml::Criteria, ParameterError> {
        let criteria = fetchxml::parse(fetch_xml, Utc::now()).map_err(|e| reject("InvalidFetchXml", e))?;
        if criteria.has_empty_and() {
            return Err(reject(
                "InvalidFetchXml",
                "an empty <filter> (no conditions) would match every record; add conditions or remove it".into(),
            ));
        }
        if criteria.matches_everything() && !allow_all {
            return Err(reject(
                "InvalidFetchXml",
                "the criteria match every record of the table; set the parameter AllowAll to true to mean it".into(),
            ));
        }
        Ok(criteria)
    };
    if let Some(request) = bookkeeping_request(message, params)? {
        return Ok(Request::Bookkeeping(request));
    }
    let request = match message {
        Message::Create => {
            return Err(reject(
                "InvalidParameters",
                format!("Create takes EntityName '{}' (records arrive by ingestion)", bookkeeping::POLICY_ENTITY),
            ));
        }
        Message::ValidateRetentionConfig => {
            let fetch_xml =
                text("FetchXml").ok_or_else(|| reject("InvalidParameters", "FetchXml is required".into()))?;
            Request::ValidateRetentionConfig(retention::ValidateRetentionConfig { fetch_xml: fetch_xml.to_owned() })
        }
        Message::Retain => Request::Retain(retention::Retain {
            target: guid("Target")?
                .ok_or_else(|| reject("InvalidParameters", "Target (a record id) is required".into()))?,
        }),
        Message::BulkRetain => {
            entity_ok(true)?;
            let fetch_xml =
                text("FetchXml").ok_or_else(|| reject("InvalidParameters", "FetchXml is required".into()))?;
            let criteria = destructive_criteria(fetch_xml)?;
            Request::BulkRetain(retention::BulkRetain {
                criteria,
                fetch_xml: fetch_xml.to_owned(),
                page_size: page_size()?,
            })
        }
        Message::RollbackRetain => {
            let scope = match (guid("OperationId")?, guid("Target")?) {
                (Some(op), _) => RollbackScope::Operation(op),
                (None, Some(target)) => RollbackScope::Record(target),
                (None, None) => return Err(reject("InvalidParameters", "OperationId or Target is required".into())),
            };
            Request::RollbackRetain(retention::RollbackRetain { scope })
        }
        Message::PurgeRetainedContent => {
            entity_ok(true)?;
            let max_version = match params.get("MaxVersionToPurge") {
                None | Some(Json::Null) => None,
                Some(v) => Some(
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| reject("InvalidParameters", "MaxVersionToPurge must be an integer".into()))?,
                ),
            };
            let criteria = match text("FetchXml") {
                Some(x) => Some(destructive_criteria(x)?),
                None => None,
            };
            Request::PurgeRetainedContent(retention::PurgeRetainedContent {
                max_version,
                criteria,
                page_size: page_size()?,
            })
        }
        Message::Retrieve => {
            let target = guid("Target")?
                .ok_or_else(|| reject("InvalidParameters", "Target (a record id) is required".into()))?;
            let t = table();
            let stored = || t.columns.iter().enumerate().filter(|(_, c)| c.stored).map(|(i, _)| i).collect();
            let columns = match params.get("ColumnSet") {
                None | Some(Json::Null) => stored(),
                Some(Json::String(all)) if all == "all" => stored(),
                Some(Json::Array(names)) => {
                    let mut columns = Vec::with_capacity(names.len());
                    for name in names {
                        let name = name.as_str().unwrap_or_default();
                        match t.index_of(name).filter(|&i| t.columns[i].stored) {
                            Some(i) => columns.push(i),
                            None => {
                                return Err(reject(
                                    "InvalidParameters",
                                    format!("ColumnSet: '{}' is not a column of {}", truncate(name), t.logical_name),
                                ));
                            }
                        }
                    }
                    columns
                }
                Some(_) => {
                    return Err(reject(
                        "InvalidParameters",
                        "ColumnSet must be \"all\" or a list of column names".into(),
                    ));
                }
            };
            Request::Retrieve(retrieve::Retrieve { target, columns })
        }
        Message::RetrieveMultiple => {
            let query =
                text("Query").ok_or_else(|| reject("InvalidParameters", "Query (FetchXML) is required".into()))?;
            let fetch_xml = Some(query.to_owned());
            let query = crate::query::page::parse(query, Utc::now()).map_err(|e| reject("InvalidFetchXml", e))?;
            Request::RetrieveMultiple(retrieve_multiple::RetrieveMultiple {
                query,
                fetch_xml,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            })
        }
        Message::Update => {
            let concurrency = match text("ConcurrencyBehavior") {
                None | Some("Default") => false,
                Some("IfRowVersionMatches") => true,
                Some(other) => {
                    return Err(reject(
                        "InvalidParameters",
                        format!("ConcurrencyBehavior '{}' is not Default or IfRowVersionMatches", truncate(other)),
                    ));
                }
            };
            let row_version = match (concurrency, params.get("RowVersion")) {
                (false, _) => None,
                (true, Some(v)) => Some(
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                        .ok_or_else(|| reject("InvalidParameters", "RowVersion must be an integer".into()))?,
                ),
                (true, None) => {
                    return Err(reject("InvalidParameters", "IfRowVersionMatches needs a RowVersion".into()));
                }
            };
            let target =
                params.get("Target").ok_or_else(|| reject("InvalidParameters", "Target is required".into()))?;
            let mut target = update_target(target).map_err(|e| reject("InvalidParameters", e))?;
            target.row_version = row_version;
            Request::Update(update::Update { target })
        }
        Message::UpdateMultiple => {
            let targets = params
                .get("Targets")
                .and_then(Json::as_array)
                .filter(|t| !t.is_empty() && t.len() <= MAX_UPDATE_TARGETS)
                .ok_or_else(|| {
                    reject("InvalidParameters", format!("Targets must be a list of 1 to {MAX_UPDATE_TARGETS} records"))
                })?;
            let targets = targets
                .iter()
                .map(update_target)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| reject("InvalidParameters", e))?;
            Request::UpdateMultiple(update::UpdateMultiple { targets })
        }
        Message::Delete => Request::Delete(delete::Delete {
            target: guid("Target")?
                .ok_or_else(|| reject("InvalidParameters", "Target (a record id) is required".into()))?,
        }),
        Message::SetState => {
            let target = guid("EntityMoniker")?
                .ok_or_else(|| reject("InvalidParameters", "EntityMoniker (a record id) is required".into()))?;
            let int = |key: &str| {
                params
                    .get(key)
                    .and_then(Json::as_i64)
                    .and_then(|v| i32::try_from(v).ok())
                    .ok_or_else(|| reject("InvalidParameters", format!("{key} (an integer) is required")))
            };
            Request::SetState(state::SetState { target, state: int("State")?, status: int("Status")? })
        }
        Message::IsValidStateTransition => {
            let target = guid("Entity")?
                .ok_or_else(|| reject("InvalidParameters", "Entity (a record id) is required".into()))?;
            let new_state = text("NewState")
                .ok_or_else(|| reject("InvalidParameters", "NewState (a state name) is required".into()))?;
            let new_status = params
                .get("NewStatus")
                .and_then(Json::as_i64)
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| reject("InvalidParameters", "NewStatus (an integer) is required".into()))?;
            Request::IsValidStateTransition(state::IsValidStateTransition {
                target,
                new_state: new_state.to_owned(),
                new_status,
            })
        }
        Message::BulkDelete => {
            entity_ok(true)?;
            let fetch_xml =
                text("FetchXml").ok_or_else(|| reject("InvalidParameters", "FetchXml is required".into()))?;
            let mut criteria = destructive_criteria(fetch_xml)?;
            criteria.retained = match text("DataSource") {
                None => criteria.retained,
                Some("live") => false,
                Some("retained") => true,
                Some(other) => {
                    return Err(reject(
                        "InvalidParameters",
                        format!("DataSource '{}' is not live or retained", truncate(other)),
                    ));
                }
            };
            Request::BulkDelete(delete::BulkDelete {
                criteria,
                fetch_xml: fetch_xml.to_owned(),
                page_size: page_size()?,
            })
        }
    };
    Ok(request)
}

/// The most records one UpdateMultiple may change (Dataverse's recommended batch is far smaller).
pub const MAX_UPDATE_TARGETS: usize = 1000;
/// The entity bytes a RetrieveMultiple reply carries when the consumer sets
/// no limit of its own (librdkafka's default message size, less headroom).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 900_000;

/// An Update target: `msdyn_copilotinteractionid` and the columns to set.
fn update_target(value: &Json) -> Result<update::UpdateTarget, String> {
    let t = table();
    let Json::Object(fields) = value else { return Err("a Target must be an object of column values".into()) };
    let mut fields = fields.clone();
    let id = match fields.remove(&t.primary_id_attribute) {
        Some(Json::String(s)) => crate::normalize::parse_guid(&s),
        _ => None,
    }
    .ok_or_else(|| format!("a Target needs {} (a GUID)", t.primary_id_attribute))?;
    if fields.is_empty() {
        return Err("a Target must set at least one column".into());
    }
    Ok(update::UpdateTarget { id, fields, row_version: None })
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}
