//! The retention bookkeeping as Dataverse entities: `retentionconfig` (the
//! policies) and `retentionoperation` (every long operation and scheduled
//! run), read with RetrieveMultiple and the policies created, updated and
//! deleted with Create, Update and Delete, on the control topic and in the
//! Web API's `retentionconfigs` and `retentionoperations` alike.
//!
//! Codes, after Dataverse's: a policy's `statecode` 0 Active / 1 Inactive with
//! `statuscode` 1 Scheduled, 2 Unscheduled (paused), 3 Cancelled; an
//! operation's `statecode` 0 Scheduled / 1 InProgress / 2 Completed with
//! `statuscode` 1 Waiting, 2 Marking, 4 Deleting, 5 Succeeded, 6 Failed,
//! 7 Cancelled, 8 RolledBack, 9 RolledBackPartially.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json, json};
use uuid::Uuid;

use super::OperationError;
use super::policy::{self, INVALID_POLICY, PolicyRecord, PolicySource, PolicyStatus, RetentionPolicy};
use crate::backend::{Backend, OperationRecord};
use crate::record::format_datetime;

pub const POLICY_ENTITY: &str = "retentionconfig";
pub const OPERATION_ENTITY: &str = "retentionoperation";

/// The columns a bookkeeping query may filter on (equality only).
pub fn filterable(entity: &str) -> Option<&'static [&'static str]> {
    match entity {
        POLICY_ENTITY => Some(&["uniquename", "retentionconfigid"]),
        OPERATION_ENTITY => Some(&["retentionoperationid", "uniquename", "operationtype"]),
        _ => None,
    }
}

/// One request about the bookkeeping entities.
#[derive(Debug, Clone)]
pub enum Request {
    RetrievePolicies {
        conditions: Vec<(String, String)>,
        count: Option<i64>,
    },
    RetrieveOperations {
        conditions: Vec<(String, String)>,
        count: Option<i64>,
    },
    CreatePolicy {
        entity: Map<String, Json>,
    },
    /// `uniquename` or the `retentionconfigid` the Web API addresses.
    UpdatePolicy {
        key: PolicyKey,
        changes: Map<String, Json>,
    },
    DeletePolicy {
        key: PolicyKey,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKey {
    UniqueName(String),
    Id(Uuid),
}

/// A policy's `retentionconfigid`: derived from its uniquename, so it is the
/// same on every instance and after a reconcile.
pub fn policy_id(uniquename: &str) -> Uuid {
    const NS: Uuid = Uuid::from_u128(0x8c41_0d2e_7b6a_4f3c_9e15_a2d4_6b70_c9e1);
    Uuid::new_v5(&NS, uniquename.as_bytes())
}

fn time(at: Option<DateTime<Utc>>) -> Json {
    at.map_or(Json::Null, |d| Json::String(format_datetime(&d)))
}

/// A policy as a `retentionconfig` entity.
pub fn policy_entity(record: &PolicyRecord) -> Map<String, Json> {
    let p = &record.policy;
    let state = if p.status.statecode() == 0 { "Active" } else { "Inactive" };
    let entity = json!({
        "retentionconfigid": policy_id(&p.uniquename),
        "uniquename": p.uniquename,
        "name": p.name,
        "entitylogicalname": p.entitylogicalname,
        "criteria": p.criteria,
        "starttime": format_datetime(&p.starttime),
        "recurrence": p.recurrence,
        "statecode": p.status.statecode(),
        "statecode@OData.Community.Display.V1.FormattedValue": state,
        "statuscode": p.status.statuscode(),
        "statuscode@OData.Community.Display.V1.FormattedValue": p.status.name(),
        "purgeafterseconds": p.purge_after_seconds,
        "pagesize": p.page_size,
        "source": p.source.name(),
        "nextrun": time(record.next_run),
        "lastrun": time(record.last_run),
        "lastoutcome": record.last_outcome,
        "lastsuccess": time(record.last_success),
        "lastoperationid": record.last_operation_id,
        "runningoperationid": record.running_operation_id,
        "createdon": format_datetime(&record.created_on),
        "modifiedon": format_datetime(&record.modified_on),
    });
    match entity {
        Json::Object(map) => map,
        _ => Map::new(),
    }
}

/// An operation status's `statecode` and `statuscode`.
pub fn operation_codes(status: &str) -> (i64, i64) {
    match status {
        "Waiting" => (0, 1),
        "Marking" => (1, 2),
        "Deleting" => (1, 4),
        "Succeeded" => (2, 5),
        "Failed" => (2, 6),
        "Cancelled" => (2, 7),
        "RolledBack" => (2, 8),
        "RolledBackPartially" => (2, 9),
        _ => (1, 2),
    }
}

/// An operation as a `retentionoperation` entity. `recordcount` is what its
/// message did (retained, purged or deleted), split into the three counts.
pub fn operation_entity(op: &OperationRecord) -> Map<String, Json> {
    let (statecode, statuscode) = operation_codes(&op.status);
    let state = ["Scheduled", "InProgress", "Completed"][statecode as usize];
    let (retained, purged, deleted) = match op.message.as_str() {
        "PurgeRetainedContent" => (0, op.total, 0),
        "BulkDelete" => (0, 0, op.total),
        _ => (op.total, op.purged, 0),
    };
    let entity = json!({
        "retentionoperationid": op.operation_id,
        "name": op.policy.clone().unwrap_or_else(|| op.message.clone()),
        "operationtype": op.message,
        "uniquename": op.policy,
        "retentionconfigid": op.policy.as_deref().map(policy_id),
        "commandid": op.command_id,
        "criteria": op.criteria,
        "statecode": statecode,
        "statecode@OData.Community.Display.V1.FormattedValue": state,
        "statuscode": statuscode,
        "statuscode@OData.Community.Display.V1.FormattedValue": op.status,
        "starttime": format_datetime(&op.started_on),
        "endtime": time(op.ended_on),
        "recordcount": op.total,
        "retainedcount": retained,
        "purgedcount": purged,
        "deletedcount": deleted,
        "errormessage": op.error,
    });
    match entity {
        Json::Object(map) => map,
        _ => Map::new(),
    }
}

/// Runs one bookkeeping request; a read answers an `EntityCollection`.
pub async fn execute(backend: &Backend, request: &Request, now: DateTime<Utc>) -> Result<Json, OperationError> {
    match request {
        Request::RetrievePolicies { conditions, count } => {
            let records = backend.policies().await?;
            let entities: Vec<Map<String, Json>> = records.iter().map(policy_entity).collect();
            Ok(collection(entities, conditions, *count))
        }
        Request::RetrieveOperations { conditions, count } => {
            let operations = backend.operations(crate::backend::MAX_OPERATIONS_LISTED).await?;
            let entities: Vec<Map<String, Json>> = operations.iter().map(operation_entity).collect();
            Ok(collection(entities, conditions, *count))
        }
        Request::CreatePolicy { entity } => {
            let policy = policy_from_entity(entity, None)?;
            if backend.policies().await?.iter().any(|r| r.policy.uniquename == policy.uniquename) {
                return Err(OperationError::failed(
                    DUPLICATE,
                    format!("a retentionconfig with uniquename '{}' exists; update it instead", policy.uniquename),
                ));
            }
            policy::save(backend, &policy, now).await?;
            Ok(json!({"id": policy_id(&policy.uniquename), "uniquename": policy.uniquename}))
        }
        Request::UpdatePolicy { key, changes } => {
            let existing = find(backend, key).await?;
            let policy = policy_from_entity(changes, Some(&existing.policy))?;
            if policy.uniquename != existing.policy.uniquename {
                return Err(OperationError::failed(INVALID_POLICY, "uniquename cannot change; create a new policy"));
            }
            policy::save(backend, &policy, now).await?;
            Ok(Json::Null)
        }
        Request::DeletePolicy { key } => {
            let existing = find(backend, key).await?;
            policy::delete(backend, &existing.policy.uniquename).await?;
            Ok(Json::Null)
        }
    }
}

/// Dataverse's duplicate-key error code.
pub const DUPLICATE: &str = "0x80040237";

async fn find(backend: &Backend, key: &PolicyKey) -> Result<PolicyRecord, OperationError> {
    let records = backend.policies().await?;
    records
        .into_iter()
        .find(|r| match key {
            PolicyKey::UniqueName(name) => &r.policy.uniquename == name,
            PolicyKey::Id(id) => policy_id(&r.policy.uniquename) == *id,
        })
        .ok_or_else(|| {
            let key = match key {
                PolicyKey::UniqueName(name) => format!("uniquename = {}", crate::transport::control::loggable(name)),
                PolicyKey::Id(id) => format!("Id = {id}"),
            };
            OperationError::failed(super::NOT_FOUND, format!("retentionconfig With {key} Does Not Exist"))
        })
}

fn collection(entities: Vec<Map<String, Json>>, conditions: &[(String, String)], count: Option<i64>) -> Json {
    let matches = |e: &Map<String, Json>| {
        conditions.iter().all(|(column, value)| match e.get(column) {
            Some(Json::String(s)) => s.eq_ignore_ascii_case(value),
            Some(other) => serde_json::from_str::<Json>(value).ok().as_ref() == Some(other),
            None => false,
        })
    };
    let limit = count.unwrap_or(5000).clamp(1, 5000) as usize;
    let mut matching: Vec<Map<String, Json>> = entities.into_iter().filter(matches).collect();
    let more_records = matching.len() > limit;
    matching.truncate(limit);
    json!({"EntityCollection": {"Entities": matching, "MoreRecords": more_records, "PagingCookie": null,
                                "TotalRecordCount": -1}})
}

/// A policy from a `retentionconfig` entity's columns: all of a new one,
/// or the columns that change over `existing`.
pub fn policy_from_entity(
    entity: &Map<String, Json>,
    existing: Option<&RetentionPolicy>,
) -> Result<RetentionPolicy, OperationError> {
    let invalid = |message: String| OperationError::failed(INVALID_POLICY, message);
    let mut policy = match existing {
        Some(p) => p.clone(),
        None => RetentionPolicy {
            uniquename: String::new(),
            name: String::new(),
            entitylogicalname: crate::table::table().logical_name.clone(),
            criteria: String::new(),
            starttime: Utc::now(),
            recurrence: String::new(),
            status: PolicyStatus::Scheduled,
            purge_after_seconds: None,
            page_size: super::parameters::DEFAULT_PAGE_SIZE,
            source: PolicySource::Runtime,
        },
    };
    let text = |key: &str, value: &Json| -> Result<String, OperationError> {
        value.as_str().map(str::to_owned).ok_or_else(|| invalid(format!("{key} must be a string")))
    };
    let mut status_code = None;
    let mut state_code = None;
    for (key, value) in entity {
        if key.starts_with('@') || key.contains("@OData") || key.contains("@odata") {
            continue;
        }
        match key.as_str() {
            "uniquename" => policy.uniquename = text(key, value)?,
            "name" => policy.name = text(key, value)?,
            "entitylogicalname" => policy.entitylogicalname = text(key, value)?,
            "criteria" => policy.criteria = text(key, value)?,
            "recurrence" => policy.recurrence = if value.is_null() { String::new() } else { text(key, value)? },
            "starttime" => {
                let raw = text(key, value)?;
                policy.starttime = DateTime::parse_from_rfc3339(&raw)
                    .map(|d| d.with_timezone(&Utc))
                    .map_err(|_| invalid(format!("starttime '{}' is not an RFC 3339 time", truncate(&raw))))?;
            }
            "statuscode" => {
                status_code = Some(value.as_i64().ok_or_else(|| invalid("statuscode must be 1, 2 or 3".into()))?)
            }
            "statecode" => state_code = Some(value.as_i64().ok_or_else(|| invalid("statecode must be 0 or 1".into()))?),
            "purgeafterseconds" => {
                policy.purge_after_seconds = match value {
                    Json::Null => None,
                    v => Some(v.as_i64().ok_or_else(|| invalid("purgeafterseconds must be a whole number".into()))?),
                }
            }
            "pagesize" => {
                policy.page_size = value.as_i64().ok_or_else(|| invalid("pagesize must be a whole number".into()))?
            }
            "retentionconfigid" => {}
            other => {
                return Err(invalid(format!(
                    "'{}' is not a column of retentionconfig that can be set",
                    truncate(other)
                )));
            }
        }
    }
    if let Some(code) = status_code {
        policy.status = PolicyStatus::from_statuscode(code).ok_or_else(|| {
            invalid(format!("statuscode {code} is not 1 (Scheduled), 2 (Unscheduled) or 3 (Cancelled)"))
        })?;
    }
    match (state_code, status_code) {
        (Some(1), None) => policy.status = PolicyStatus::Cancelled,
        (Some(0), None) if policy.status == PolicyStatus::Cancelled => policy.status = PolicyStatus::Scheduled,
        (Some(state), _) if state != policy.status.statecode() => {
            return Err(invalid(format!(
                "statecode {state} does not go with statuscode {}",
                policy.status.statuscode()
            )));
        }
        _ => {}
    }
    if existing.is_none() && policy.name.is_empty() {
        policy.name = policy.uniquename.clone();
    }
    policy.validate().map_err(invalid)?;
    Ok(policy)
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(value: Json) -> Map<String, Json> {
        value.as_object().cloned().unwrap_or_default()
    }

    const CRITERIA: &str = "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='createdon' operator='olderthan-x-days' value='30'/></filter></entity></fetch>";

    #[test]
    fn a_policy_reads_from_its_entity_and_changes_column_by_column() {
        let created = policy_from_entity(
            &entity(json!({"uniquename": "p", "criteria": CRITERIA, "starttime": "2026-01-01T00:00:00Z",
                           "recurrence": "FREQ=WEEKLY", "@odata.type": "Microsoft.Dynamics.CRM.retentionconfig"})),
            None,
        )
        .unwrap();
        assert_eq!((created.name.as_str(), created.status, created.page_size), ("p", PolicyStatus::Scheduled, 5000));
        let paused = policy_from_entity(&entity(json!({"statuscode": 2})), Some(&created)).unwrap();
        assert_eq!(paused.status, PolicyStatus::Unscheduled);
        assert_eq!(paused.criteria, created.criteria, "columns not sent stay");
        let retired = policy_from_entity(&entity(json!({"statecode": 1})), Some(&created)).unwrap();
        assert_eq!(retired.status, PolicyStatus::Cancelled);
        for (bad, says) in [
            (json!({"statuscode": 9}), "statuscode 9"),
            (json!({"statecode": 1, "statuscode": 1}), "does not go with"),
            (json!({"nextrun": "x"}), "'nextrun' is not a column"),
            (json!({"starttime": "soon"}), "RFC 3339"),
            (json!({"criteria": "<fetch/>"}), "criteria"),
        ] {
            let problem = policy_from_entity(&entity(bad.clone()), Some(&created)).unwrap_err().to_string();
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }

    #[test]
    fn operations_carry_dataverse_codes_and_split_counts() {
        let op = OperationRecord {
            operation_id: Uuid::nil(),
            command_id: "c".into(),
            message: "PurgeRetainedContent".into(),
            policy: None,
            criteria: None,
            status: "Deleting".into(),
            total: 7,
            purged: 0,
            started_on: Utc::now(),
            ended_on: None,
            error: None,
        };
        let e = operation_entity(&op);
        assert_eq!((e["statecode"].as_i64(), e["statuscode"].as_i64()), (Some(1), Some(4)));
        assert_eq!((e["purgedcount"].as_i64(), e["retainedcount"].as_i64()), (Some(7), Some(0)));
        assert_eq!(operation_codes("Succeeded"), (2, 5));
    }
}
