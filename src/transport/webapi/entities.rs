//! The entity set `msdyn_copilotinteractions`: Create (POST), Retrieve and
//! RetrieveMultiple (GET, OData options or `?fetchXml=`), Update and Upsert
//! (PATCH with `If-Match` / `If-None-Match`), Delete, `$count`, and the
//! bound actions CreateMultiple, UpdateMultiple and UpsertMultiple.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value as Json, json};
use uuid::Uuid;

use super::encode::{Collection, WebEntity, WebShape, event_fields};
use super::error::{ApiError, DUPLICATE};
use super::request::{Call, DEFAULT_PAGE_SIZE};
use super::{WebApi, json_response};
use crate::backend::{Outcome, RecordState};
use crate::config::Role;
use crate::operations::retrieve::{Retrieve, retrieve_row};
use crate::operations::retrieve_multiple::{RetrieveMultiple, retrieve_page};
use crate::operations::update::{UpdateTarget, update_multiple};
use crate::operations::{create_multiple, delete as delete_op, state, update};
use crate::query::fetchxml::Criteria;
use crate::query::odata::{QueryOptions, page_query, parse_filter, property_column};
use crate::record::Record;
use crate::table::table;

/// The most bytes of entities one page carries; a page that would be larger
/// ends early with a next link.
pub const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;
/// The most records one CreateMultiple, UpdateMultiple or UpsertMultiple takes.
pub const MAX_TARGETS: usize = 1000;

fn version_index() -> usize {
    table().index_of("versionnumber").unwrap_or(0)
}

/// `$select` as column indices (all stored columns when absent).
fn selected_columns(call: &Call) -> Result<Vec<usize>, ApiError> {
    let t = table();
    match call.option("$select").map(str::trim).filter(|s| !s.is_empty() && *s != "*") {
        None => Ok(t.columns.iter().enumerate().filter(|(_, c)| c.stored).map(|(i, _)| i).collect()),
        Some(select) => select
            .split(',')
            .map(|name| {
                property_column(name.trim()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Could not find a property named '{}' on type 'Microsoft.Dynamics.CRM.{}'",
                        name.trim().chars().take(64).collect::<String>(),
                        t.logical_name
                    ))
                })
            })
            .collect(),
    }
}

fn context(call: &Call, suffix: &str) -> String {
    let t = table();
    match call.option("$select") {
        Some(select) if !select.trim().is_empty() => {
            format!("{}/$metadata#{}({}){suffix}", call.base, t.entity_set_name, select.trim())
        }
        _ => format!("{}/$metadata#{}{suffix}", call.base, t.entity_set_name),
    }
}

/// GET one record.
pub async fn retrieve(api: &WebApi, call: &Call, id: Uuid) -> Result<Response, ApiError> {
    let entity = read_entity(api, call, id).await?;
    let mut body = Map::new();
    body.insert("@odata.context".into(), Json::String(context(call, "/$entity")));
    body.extend(entity);
    Ok(json_response(StatusCode::OK, &Json::Object(body)))
}

async fn read_entity(api: &WebApi, call: &Call, id: Uuid) -> Result<Map<String, Json>, ApiError> {
    let mut columns = selected_columns(call)?;
    let keep_version = columns.contains(&version_index());
    if !keep_version {
        columns.push(version_index());
    }
    let (columns, values) = retrieve_row(&api.backend, &Retrieve { target: id, columns }).await?;
    let entity = WebEntity { columns: &columns, values: &values, shape: WebShape::of(&call.prefer, keep_version) };
    match serde_json::to_value(entity) {
        Ok(Json::Object(entity)) => Ok(entity),
        _ => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, super::error::UNEXPECTED, "a record did not encode")),
    }
}

/// GET the entity set: OData query options, or `?fetchXml=`.
pub async fn retrieve_multiple(api: &WebApi, call: &Call) -> Result<Response, ApiError> {
    if let Some(fetch_xml) = call.option("fetchXml") {
        return fetch(api, call, fetch_xml).await;
    }
    let options = QueryOptions {
        select: call.option("$select").map(str::to_owned),
        filter: call.option("$filter").map(str::to_owned),
        orderby: call.option("$orderby").map(str::to_owned),
        top: call.option("$top").map(str::to_owned),
        count: call.option("$count").map(str::to_owned),
        skiptoken: call.option("$skiptoken").map(str::to_owned),
    };
    if let Some(unsupported) = call.query.iter().map(|(k, _)| k.as_str()).find(|k| {
        k.starts_with('$') && !matches!(*k, "$select" | "$filter" | "$orderby" | "$top" | "$count" | "$skiptoken")
    }) {
        return Err(ApiError::bad_request(format!("the query option '{unsupported}' is not supported")));
    }
    let page_size = call.prefer.max_page_size.unwrap_or(DEFAULT_PAGE_SIZE).clamp(1, DEFAULT_PAGE_SIZE);
    let mut query = page_query(&options, page_size, Utc::now()).map_err(ApiError::bad_request)?;
    let keep_version = query.columns.contains(&version_index());
    if !keep_version {
        query.columns.push(version_index());
    }
    let top = query.count;
    let asked_top = options.top.as_deref().and_then(|t| t.trim().parse::<i64>().ok());
    let request = RetrieveMultiple { query, fetch_xml: None, max_response_bytes: MAX_PAGE_BYTES };
    let page = retrieve_page(&api.backend, &request).await?;
    let returned = page.rows.len() as i64;
    let mut annotations = vec![("@odata.context", Json::String(context(call, "")))];
    if options.count.as_deref() == Some("true") {
        annotations.push(("@odata.count", json!(page.total_record_count)));
    }
    // `$top` bounds the whole result: a next page only while some of it is left.
    let remaining_top = asked_top.map(|t| t - returned);
    let more = page.more_records && remaining_top.is_none_or(|r| r > 0) && returned <= top;
    let mut next_link = None;
    if more && let Some(cookie) = &page.paging_cookie {
        let mut pairs: Vec<(String, String)> =
            call.query.iter().filter(|(k, _)| k != "$skiptoken" && k != "$top").cloned().collect();
        if let Some(r) = remaining_top {
            pairs.push(("$top".into(), r.to_string()));
        }
        pairs.push(("$skiptoken".into(), cookie.clone()));
        let query: Vec<String> =
            pairs.iter().map(|(k, v)| format!("{}={}", k, utf8_percent_encode(v, NON_ALPHANUMERIC))).collect();
        next_link = Some(format!("{}?{}", call.entity_set_url(), query.join("&")));
    }
    let shape = WebShape::of(&call.prefer, keep_version);
    let body = Collection { annotations, columns: &page.columns, rows: &page.rows, shape, next_link };
    Ok(json_response(StatusCode::OK, &body))
}

/// `?fetchXml=`: one page, with Dataverse's paging cookie annotation while
/// more records follow (omitted on the last page: DynamicsWebApi pages
/// while it is present) and `morerecords`.
async fn fetch(api: &WebApi, call: &Call, fetch_xml: &str) -> Result<Response, ApiError> {
    let mut query = crate::query::page::parse(fetch_xml, Utc::now()).map_err(ApiError::bad_request)?;
    let keep_version = query.columns.contains(&version_index());
    if !keep_version {
        query.columns.push(version_index());
    }
    let page_number = query.page;
    let total = query.total_record_count;
    let request = RetrieveMultiple { query, fetch_xml: Some(fetch_xml.to_owned()), max_response_bytes: MAX_PAGE_BYTES };
    let page = retrieve_page(&api.backend, &request).await?;
    let mut annotations = vec![("@odata.context", Json::String(context(call, "")))];
    if total {
        annotations.push(("@Microsoft.Dynamics.CRM.totalrecordcount", json!(page.total_record_count)));
        annotations.push(("@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded", json!(false)));
    }
    if let Some(inner) = page.paging_cookie.as_deref().filter(|_| page.more_records) {
        let twice = utf8_percent_encode(&utf8_percent_encode(inner, NON_ALPHANUMERIC).to_string(), NON_ALPHANUMERIC)
            .to_string();
        let outer = format!(
            "<cookie pagenumber=\"{}\" pagingcookie=\"{twice}\" istracking=\"False\" />",
            page_number.saturating_add(1)
        );
        annotations.push(("@Microsoft.Dynamics.CRM.fetchxmlpagingcookie", Json::String(outer)));
    }
    annotations.push(("@Microsoft.Dynamics.CRM.morerecords", json!(page.more_records)));
    let shape = WebShape::of(&call.prefer, keep_version);
    let body = Collection { annotations, columns: &page.columns, rows: &page.rows, shape, next_link: None };
    Ok(json_response(StatusCode::OK, &body))
}

/// `$count`: the number of live records (optionally filtered), as text.
pub async fn count(api: &WebApi, call: &Call) -> Result<Response, ApiError> {
    let filter = match call.option("$filter").filter(|f| !f.trim().is_empty()) {
        Some(f) => Some(parse_filter(f, Utc::now()).map_err(ApiError::bad_request)?),
        None => None,
    };
    let n = api.backend.count(&Criteria { filter, retained: false }).await?;
    let mut response = (StatusCode::OK, n.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

fn body_object(call: &Call) -> Result<Map<String, Json>, ApiError> {
    match serde_json::from_slice::<Json>(&call.body) {
        Ok(Json::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
    }
}

/// A request body's record validated and normalized as an event is; `id`
/// (from the URL) wins over the body's; without either a new id is made.
fn validated(api: &WebApi, body: &Map<String, Json>, id: Option<Uuid>) -> Result<Record, ApiError> {
    let t = table();
    let mut fields = event_fields(body).map_err(ApiError::bad_request)?;
    // Without an id in the URL or the body, Dataverse makes one up.
    let id = id.or_else(|| (!fields.contains_key(&t.primary_id_attribute)).then(Uuid::new_v4));
    if let Some(id) = id {
        fields.insert(t.primary_id_attribute.clone(), Json::String(id.to_string()));
    }
    let payload = serde_json::to_vec(&fields).map_err(|e| ApiError::bad_request(e.to_string()))?;
    api.normalizer
        .normalize_json(&payload, None, Utc::now())
        .map_err(|r| ApiError::from_reason(r.reason.code(), &r.message))
}

/// The outcome of writing one record, as the answer to a create.
fn created(outcome: Outcome, id: Uuid) -> Result<Uuid, ApiError> {
    match outcome {
        // The same content under the same id: a client's retry of a create.
        Outcome::Written | Outcome::Replay => Ok(id),
        Outcome::PurgedReplay | Outcome::DeletedReplay => Err(ApiError::precondition_failed(
            DUPLICATE,
            format!("the record {id} was deleted or purged; a removed id is never created again"),
        )),
        Outcome::Rejected(r) => Err(ApiError::from_reason(r.reason.code(), &r.message)),
    }
}

async fn create_validated(api: &WebApi, records: Vec<Record>) -> Result<Vec<Uuid>, ApiError> {
    let ids: Vec<Uuid> = records.iter().map(Record::id).collect();
    let outcomes = create_multiple::create_records(&api.backend, records, &api.metrics).await?;
    outcomes.into_iter().zip(ids).map(|(o, id)| created(o, id)).collect()
}

fn entity_url(call: &Call, id: Uuid) -> String {
    format!("{}({id})", call.entity_set_url())
}

/// 204 with `OData-EntityId`, or with `Prefer: return=representation` the
/// record (201 for a create, 200 for an update).
async fn written(api: &WebApi, call: &Call, id: Uuid, created: bool) -> Result<Response, ApiError> {
    let location = entity_url(call, id);
    let mut response = if call.prefer.return_representation {
        let mut body = Map::new();
        body.insert("@odata.context".into(), Json::String(context(call, "/$entity")));
        body.extend(read_entity(api, call, id).await?);
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        let mut r = json_response(status, &Json::Object(body));
        r.headers_mut().insert("Preference-Applied", HeaderValue::from_static("return=representation"));
        r
    } else {
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert("OData-Version", HeaderValue::from_static("4.0"));
        r
    };
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert("OData-EntityId", value.clone());
        if created {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(response)
}

/// POST the entity set: Create.
pub async fn create(api: &WebApi, call: &Call) -> Result<Response, ApiError> {
    call.caller.require(Role::Write, "Create")?;
    let body = body_object(call)?;
    let record = validated(api, &body, None)?;
    let id = create_validated(api, vec![record]).await?[0];
    written(api, call, id, true).await
}

/// `W/"<versionnumber>"` (or `*`: any version) of an `If-Match` header.
fn expected_version(value: &str) -> Result<Option<i64>, ApiError> {
    let value = value.trim();
    if value == "*" {
        return Ok(None);
    }
    value
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse::<i64>()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("If-Match '{value}' is not * or an ETag W/\"<version>\"")))
}

/// What a PATCH will do, decided before anything is written.
enum PatchPlan {
    Create(Record),
    Update(Changes),
}

/// A PATCH body's changes to an existing record: columns for Update,
/// `statecode` (with `statuscode`) for SetState.
struct Changes {
    id: Uuid,
    fields: Map<String, Json>,
    row_version: Option<i64>,
    state: Option<(i32, i32)>,
}

fn changes(id: Uuid, body: &Map<String, Json>, row_version: Option<i64>) -> Result<Changes, ApiError> {
    let mut fields = event_fields(body).map_err(ApiError::bad_request)?;
    fields.remove(&table().primary_id_attribute);
    let state = match fields.remove("statecode") {
        None => None,
        Some(state) => {
            let state = state.as_i64().and_then(|s| i32::try_from(s).ok());
            let status = match fields.remove("statuscode") {
                None | Some(Json::Null) => Some(-1),
                Some(s) => s.as_i64().and_then(|s| i32::try_from(s).ok()),
            };
            match (state, status) {
                (Some(state), Some(status)) => Some((state, status)),
                _ => return Err(ApiError::bad_request("statecode and statuscode must be integers")),
            }
        }
    };
    Ok(Changes { id, fields, row_version, state })
}

impl Changes {
    fn update(&self) -> Option<UpdateTarget> {
        (!self.fields.is_empty() || self.row_version.is_some()).then(|| UpdateTarget {
            id: self.id,
            fields: self.fields.clone(),
            row_version: self.row_version,
        })
    }

    async fn apply(&self, api: &WebApi) -> Result<(), ApiError> {
        if let Some(target) = self.update() {
            update::update(&api.backend, &update::Update { target }).await?;
        }
        if let Some((state, status)) = self.state {
            state::set_state(&api.backend, &state::SetState { target: self.id, state, status }).await?;
        }
        Ok(())
    }

    /// Whether [`Self::apply`] would succeed now; changes nothing.
    async fn check(&self, api: &WebApi) -> Result<(), ApiError> {
        if let Some(target) = self.update() {
            update::check(&api.backend, &target).await?;
        }
        if let Some((state, status)) = self.state {
            let pair = state::IsValidStateTransition {
                target: self.id,
                new_state: table()
                    .column("statecode")
                    .and_then(|c| c.option(state))
                    .map(|o| o.label.clone())
                    .unwrap_or_default(),
                new_status: state::status_for(state, status).unwrap_or(-2),
            };
            if !state::is_valid_state_transition(&api.backend, &pair).await?.is_valid {
                return Err(ApiError::bad_request(format!(
                    "({state}, {status}) is not a state the record {} can be set to",
                    self.id
                )));
            }
        }
        Ok(())
    }
}

async fn plan_patch(api: &WebApi, call: &Call, id: Uuid) -> Result<PatchPlan, ApiError> {
    let body = body_object(call)?;
    let if_match = call.header("If-Match").map(expected_version).transpose()?;
    let create_only = call.header("If-None-Match").is_some_and(|v| v.trim() == "*");
    let existing = api.backend.record_state(id).await?;
    let exists = matches!(existing, RecordState::Live | RecordState::Retained);
    if create_only && exists {
        return Err(ApiError::precondition_failed(DUPLICATE, format!("A record with id {id} already exists")));
    }
    if if_match.is_some() && !exists {
        return Err(ApiError::not_found(format!("{} With Id = {id} Does Not Exist", table().logical_name)));
    }
    if exists {
        Ok(PatchPlan::Update(changes(id, &body, if_match.flatten())?))
    } else {
        Ok(PatchPlan::Create(validated(api, &body, Some(id))?))
    }
}

/// PATCH one record: an upsert, an update only (`If-Match`), or a create
/// only (`If-None-Match: *`). `statecode`/`statuscode` change the state as
/// SetState does.
pub async fn patch(api: &WebApi, call: &Call, id: Uuid) -> Result<Response, ApiError> {
    call.caller.require(Role::Write, "Update")?;
    match plan_patch(api, call, id).await? {
        PatchPlan::Create(record) => {
            create_validated(api, vec![record]).await?;
            written(api, call, id, true).await
        }
        PatchPlan::Update(changes) => {
            changes.apply(api).await?;
            written(api, call, id, false).await
        }
    }
}

/// The checks of one write of a change set, made for every part before any
/// runs, so that a part that would fail leaves the others unapplied.
pub async fn precheck(api: &WebApi, call: &Call) -> Result<(), ApiError> {
    use super::path::Resource;
    use axum::http::Method;
    match (&call.method, &call.resource) {
        (&Method::POST, Resource::EntitySet) => {
            call.caller.require(Role::Write, "Create")?;
            validated(api, &body_object(call)?, None).map(|_| ())
        }
        (&Method::PATCH, Resource::Entity(id)) => {
            call.caller.require(Role::Write, "Update")?;
            match plan_patch(api, call, *id).await? {
                PatchPlan::Create(_) => Ok(()),
                PatchPlan::Update(changes) => changes.check(api).await,
            }
        }
        (&Method::DELETE, Resource::Entity(id)) => {
            call.caller.require(Role::Write, "Delete")?;
            check_delete(api, call, *id).await
        }
        _ => Ok(()),
    }
}

/// The record exists, and its version is the `If-Match` one when given.
async fn check_delete(api: &WebApi, call: &Call, id: Uuid) -> Result<(), ApiError> {
    let columns = vec![version_index()];
    let (columns, values) = retrieve_row(&api.backend, &Retrieve { target: id, columns }).await?;
    let version = columns.iter().position(|&c| c == version_index()).and_then(|k| values.get(k));
    if let Some(Some(expected)) = call.header("If-Match").map(expected_version).transpose()?
        && version.and_then(Json::as_i64) != Some(expected)
    {
        return Err(ApiError::precondition_failed(
            super::error::VERSION_MISMATCH,
            format!("The version of {id} is not {expected}"),
        ));
    }
    Ok(())
}

/// DELETE one record (tombstoned: a Kafka replay never brings it back).
pub async fn delete(api: &WebApi, call: &Call, id: Uuid) -> Result<Response, ApiError> {
    call.caller.require(Role::Write, "Delete")?;
    if call.header("If-Match").is_some() {
        check_delete(api, call, id).await?;
    }
    delete_op::delete(&api.backend, &delete_op::Delete { target: id }).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert("OData-Version", HeaderValue::from_static("4.0"));
    Ok(response)
}

fn targets(call: &Call) -> Result<Vec<Map<String, Json>>, ApiError> {
    let mut body = body_object(call)?;
    let Some(Json::Array(targets)) = body.remove("Targets") else {
        return Err(ApiError::bad_request("the body must be {\"Targets\": [records]}"));
    };
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(ApiError::bad_request(format!("Targets must hold 1 to {MAX_TARGETS} records")));
    }
    targets
        .into_iter()
        .map(|t| match t {
            Json::Object(m) => Ok(m),
            _ => Err(ApiError::bad_request("each of Targets must be a record (a JSON object)")),
        })
        .collect()
}

/// The id of an UpsertMultiple or UpdateMultiple target: its primary key, or
/// its `@odata.id` (`msdyn_copilotinteractions(msdyn_copilotinteractionid='<id>')`).
fn target_id(target: &Map<String, Json>) -> Option<Uuid> {
    let t = table();
    if let Some(id) = target.get(&t.primary_id_attribute).and_then(Json::as_str) {
        return crate::normalize::parse_guid(id);
    }
    let reference = target.get("@odata.id").and_then(Json::as_str)?;
    let key = reference.rsplit_once('(')?.1.strip_suffix(')')?;
    let value = key.split_once('=').map_or(key, |(_, v)| v).trim_matches('\'');
    crate::normalize::parse_guid(value)
}

/// CreateMultiple, UpdateMultiple, UpsertMultiple.
pub async fn set_action(api: &WebApi, call: &Call, name: &str) -> Result<Response, ApiError> {
    match name {
        "CreateMultiple" => {
            call.caller.require(Role::Write, "CreateMultiple")?;
            // Every record is validated before anything is written.
            let records = targets(call)?
                .iter()
                .enumerate()
                .map(|(i, t)| validated(api, t, None).map_err(|e| at_target(e, i)))
                .collect::<Result<Vec<_>, _>>()?;
            let ids = create_validated(api, records).await?;
            let body = json!({
                "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", call.base),
                "Ids": ids,
            });
            Ok(json_response(StatusCode::OK, &body))
        }
        "UpdateMultiple" => {
            call.caller.require(Role::Write, "UpdateMultiple")?;
            let t = table();
            let mut updates = Vec::new();
            for (i, target) in targets(call)?.iter().enumerate() {
                let id = target_id(target).ok_or_else(|| {
                    ApiError::bad_request(format!("Targets[{i}] needs {} (a GUID)", t.primary_id_attribute))
                })?;
                let mut fields = event_fields(target).map_err(ApiError::bad_request)?;
                fields.remove(&t.primary_id_attribute);
                updates.push(UpdateTarget { id, fields, row_version: None });
            }
            // One transaction: all or nothing.
            update_multiple(&api.backend, &update::UpdateMultiple { targets: updates }).await?;
            let mut response = StatusCode::NO_CONTENT.into_response();
            response.headers_mut().insert("OData-Version", HeaderValue::from_static("4.0"));
            Ok(response)
        }
        "UpsertMultiple" => {
            call.caller.require(Role::Write, "UpsertMultiple")?;
            let mut ids = Vec::new();
            for (i, target) in targets(call)?.iter().enumerate() {
                let id = target_id(target).unwrap_or_else(Uuid::new_v4);
                match api.backend.record_state(id).await? {
                    RecordState::Live | RecordState::Retained => match changes(id, target, None) {
                        Ok(changes) => changes.apply(api).await,
                        Err(e) => Err(e),
                    },
                    _ => match validated(api, target, Some(id)) {
                        Ok(record) => create_validated(api, vec![record]).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                }
                .map_err(|e| at_target(e, i))?;
                ids.push(id);
            }
            let body = json!({
                "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.UpsertMultipleResponse", call.base),
                "Ids": ids,
            });
            Ok(json_response(StatusCode::OK, &body))
        }
        other => super::actions::bound_to_set(api, call, other).await,
    }
}

fn at_target(mut e: ApiError, index: usize) -> ApiError {
    e.message = format!("Targets[{index}]: {}", e.message);
    e
}
