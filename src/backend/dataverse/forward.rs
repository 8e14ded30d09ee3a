//! The table's messages executed by Dataverse itself when the sink is
//! `dataverse://`: Retrieve (GET with `$select`), RetrieveMultiple (GET with
//! `fetchXml`), Update (PATCH with `If-Match: *`, or the row version),
//! UpdateMultiple, Delete, SetState (PATCH `statecode`/`statuscode`) and
//! IsValidStateTransition, with the same replies as on SQLite and
//! PostgreSQL. Retention stays with Dataverse's own policies (not forwarded).

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value as Json, json};
use uuid::Uuid;

use super::{Answer, ApiError, DataverseBackend};
use crate::backend::BackendError;
use crate::operations::retrieve::FORMATTED_VALUE as FORMATTED;
use crate::operations::retrieve::RetrieveResponse;
use crate::operations::retrieve_multiple::{EntityCollection, RetrieveMultipleResponse};
use crate::operations::state::{IsValidStateTransitionResponse, status_for};
use crate::operations::update::{Empty, UpdateTarget};
use crate::operations::{NOT_FOUND, OperationError, Request, not_found};
use crate::query::odata::property_name;
use crate::table::table;

/// Whether a message is executed by Dataverse when the sink is `dataverse://`.
pub fn forwards(message: crate::operations::parameters::Message) -> bool {
    use crate::operations::parameters::Message;
    matches!(
        message,
        Message::Retrieve
            | Message::RetrieveMultiple
            | Message::Update
            | Message::UpdateMultiple
            | Message::Delete
            | Message::SetState
            | Message::IsValidStateTransition
            | Message::ValidateRetentionConfig
    )
}

fn refused(status: u16, error: ApiError, id: Option<Uuid>) -> OperationError {
    match (status, id) {
        (404, Some(id)) => not_found(id),
        _ if error.code.eq_ignore_ascii_case(NOT_FOUND) => OperationError::failed(NOT_FOUND, error.message),
        (412, _) => OperationError::failed(crate::operations::update::VERSION_MISMATCH, error.describe(412)),
        _ if error.code.is_empty() => OperationError::failed("DataverseRefused", error.describe(status)),
        _ => OperationError::failed(&error.code, error.message),
    }
}

fn respond(response: impl serde::Serialize) -> Result<Json, OperationError> {
    serde_json::to_value(response).map_err(|e| OperationError::Backend(BackendError::Permanent(e.to_string())))
}

/// A Web API record as the operations' entity: logical names (lookups from
/// `_x_value`), formatted values kept, other annotations dropped.
fn entity_of(row: &Map<String, Json>) -> Map<String, Json> {
    let mut out = Map::new();
    for (key, value) in row {
        let (name, annotation) = key.split_once('@').map_or((key.as_str(), None), |(n, a)| (n, Some(a)));
        let logical = name.strip_prefix('_').and_then(|n| n.strip_suffix("_value")).unwrap_or(name);
        if logical.is_empty() || table().index_of(logical).is_none() {
            continue;
        }
        match annotation {
            None => {
                out.insert(logical.to_owned(), value.clone());
            }
            Some(FORMATTED) => {
                out.insert(format!("{logical}@{FORMATTED}"), value.clone());
            }
            Some(_) => {}
        }
    }
    out
}

/// `$select` for columns: the Web API's property names (lookups as `_x_value`).
fn select(columns: &[usize]) -> String {
    columns.iter().map(|&i| property_name(i)).collect::<Vec<_>>().join(",")
}

fn body_of(response: &crate::http_client::Response) -> Result<Map<String, Json>, OperationError> {
    match serde_json::from_slice::<Json>(&response.body) {
        Ok(Json::Object(m)) => Ok(m),
        _ => Err(OperationError::Backend(BackendError::Transient("Dataverse answered a body that is not JSON".into()))),
    }
}

/// The inner paging cookie of Dataverse's `fetchxmlpagingcookie`
/// annotation (`<cookie pagenumber=… pagingcookie="<twice encoded>" …/>`).
fn inner_cookie(outer: &str) -> Option<String> {
    let start = outer.find("pagingcookie=\"")? + "pagingcookie=\"".len();
    let encoded = &outer[start..start + outer[start..].find('"')?];
    let once = percent_decode_str(encoded).decode_utf8().ok()?;
    Some(percent_decode_str(&once).decode_utf8().ok()?.into_owned())
}

impl DataverseBackend {
    fn record_path(&self, id: Uuid) -> String {
        format!("{}/{}({id})", self.api_path, self.entity_set)
    }

    /// Executes a message in Dataverse; `None` for the messages executed
    /// here (ValidateRetentionConfig) or not at all (retention).
    pub async fn forward(&self, request: &Request) -> Option<Result<Json, OperationError>> {
        Some(match request {
            Request::Retrieve(r) => self.retrieve_remote(r.target, &r.columns).await,
            Request::RetrieveMultiple(r) => self.retrieve_multiple_remote(r).await,
            Request::Update(r) => self.patch(&r.target).await.and_then(respond),
            Request::UpdateMultiple(r) => self.update_multiple_remote(&r.targets).await,
            Request::Delete(r) => self.delete_remote(r.target).await,
            Request::SetState(r) => self.set_state_remote(r.target, r.state, r.status).await,
            Request::IsValidStateTransition(r) => {
                self.is_valid_state_transition_remote(r.target, &r.new_state, r.new_status).await
            }
            _ => return None,
        })
    }

    async fn retrieve_remote(&self, id: Uuid, columns: &[usize]) -> Result<Json, OperationError> {
        let path = format!("{}?$select={}", self.record_path(id), select(columns));
        let prefer = vec![("Prefer", format!("odata.include-annotations=\"{FORMATTED}\""))];
        match self.call_with("retrieve", "GET", path, Vec::new(), prefer).await? {
            Answer::Ok(response) => respond(RetrieveResponse { entity: entity_of(&body_of(&response)?) }),
            Answer::Refused(status, e) => Err(refused(status, e, Some(id))),
        }
    }

    async fn retrieve_multiple_remote(
        &self,
        request: &crate::operations::retrieve_multiple::RetrieveMultiple,
    ) -> Result<Json, OperationError> {
        let Some(fetch_xml) = &request.fetch_xml else {
            return Err(OperationError::failed("NotSupported", "only FetchXML queries are forwarded to Dataverse"));
        };
        let path = format!(
            "{}/{}?fetchXml={}",
            self.api_path,
            self.entity_set,
            utf8_percent_encode(fetch_xml, NON_ALPHANUMERIC)
        );
        let prefer = vec![(
            "Prefer",
            format!(
                "odata.include-annotations=\"Microsoft.Dynamics.CRM.fetchxmlpagingcookie,Microsoft.Dynamics.CRM.morerecords,Microsoft.Dynamics.CRM.totalrecordcount,{FORMATTED}\""
            ),
        )];
        let response = match self.call_with("retrieve", "GET", path, Vec::new(), prefer).await? {
            Answer::Ok(response) => response,
            Answer::Refused(status, e) => return Err(refused(status, e, None)),
        };
        let body = body_of(&response)?;
        let entities: Vec<Map<String, Json>> = body
            .get("value")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(Json::as_object)
            .map(entity_of)
            .collect();
        let more_records = match body.get("@Microsoft.Dynamics.CRM.morerecords") {
            Some(Json::Bool(b)) => *b,
            Some(Json::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let paging_cookie =
            body.get("@Microsoft.Dynamics.CRM.fetchxmlpagingcookie").and_then(Json::as_str).and_then(inner_cookie);
        let total_record_count =
            body.get("@Microsoft.Dynamics.CRM.totalrecordcount").and_then(Json::as_i64).unwrap_or(-1);
        respond(RetrieveMultipleResponse {
            entity_collection: EntityCollection { entities, more_records, paging_cookie, total_record_count },
        })
    }

    async fn patch(&self, target: &UpdateTarget) -> Result<Empty, OperationError> {
        let if_match = target.row_version.map_or_else(|| "*".to_owned(), |v| format!("W/\"{v}\""));
        let body =
            serde_json::to_vec(&target.fields).map_err(|e| OperationError::failed("malformed_json", e.to_string()))?;
        match self.call_with("update", "PATCH", self.record_path(target.id), body, vec![("If-Match", if_match)]).await?
        {
            Answer::Ok(_) => Ok(Empty {}),
            Answer::Refused(status, e) => Err(refused(status, e, Some(target.id))),
        }
    }

    async fn update_multiple_remote(&self, targets: &[UpdateTarget]) -> Result<Json, OperationError> {
        let t = table();
        let targets: Vec<Json> = targets
            .iter()
            .map(|target| {
                let mut record = target.fields.clone();
                record.insert(t.primary_id_attribute.clone(), json!(target.id));
                record.insert("@odata.type".into(), json!(format!("Microsoft.Dynamics.CRM.{}", t.logical_name)));
                Json::Object(record)
            })
            .collect();
        let body = json!({"Targets": targets}).to_string().into_bytes();
        let path = format!("{}/{}/Microsoft.Dynamics.CRM.UpdateMultiple", self.api_path, self.entity_set);
        match self.call("update", "POST", path, body).await? {
            Answer::Ok(_) => respond(Empty {}),
            Answer::Refused(status, e) => Err(refused(status, e, None)),
        }
    }

    async fn delete_remote(&self, id: Uuid) -> Result<Json, OperationError> {
        match self.call("delete", "DELETE", self.record_path(id), Vec::new()).await? {
            Answer::Ok(_) => respond(Empty {}),
            Answer::Refused(status, e) => Err(refused(status, e, Some(id))),
        }
    }

    async fn set_state_remote(&self, id: Uuid, state: i32, status: i32) -> Result<Json, OperationError> {
        let status = status_for(state, status).ok_or_else(|| {
            OperationError::failed("0x80040203", format!("({state}, {status}) is not a state and status of the table"))
        })?;
        let mut fields = Map::new();
        fields.insert("statecode".into(), json!(state));
        fields.insert("statuscode".into(), json!(status));
        self.patch(&UpdateTarget { id, fields, row_version: None }).await.and_then(respond)
    }

    async fn is_valid_state_transition_remote(
        &self,
        id: Uuid,
        new_state: &str,
        new_status: i32,
    ) -> Result<Json, OperationError> {
        let entity = json!({"@odata.id": format!("{}({id})", self.entity_set)}).to_string();
        let path = format!(
            "{}/IsValidStateTransition(Entity=@p1,NewState=@p2,NewStatus=@p3)?@p1={}&@p2={}&@p3={new_status}",
            self.api_path,
            utf8_percent_encode(&entity, NON_ALPHANUMERIC),
            utf8_percent_encode(&format!("'{}'", new_state.replace('\'', "''")), NON_ALPHANUMERIC),
        );
        match self.call("retrieve", "GET", path, Vec::new()).await? {
            Answer::Ok(response) => {
                let is_valid = body_of(&response)?.get("IsValid").and_then(Json::as_bool).unwrap_or(false);
                respond(IsValidStateTransitionResponse { is_valid })
            }
            Answer::Refused(status, e) => Err(refused(status, e, Some(id))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataverse_cookies_and_records_read_back() {
        let inner = "<cookie page=\"1\"><createdon last=\"2024-05-01T10:00:00Z\" /></cookie>";
        let twice = utf8_percent_encode(&utf8_percent_encode(inner, NON_ALPHANUMERIC).to_string(), NON_ALPHANUMERIC)
            .to_string();
        let outer = format!("<cookie pagenumber=\"2\" pagingcookie=\"{twice}\" istracking=\"False\" />");
        assert_eq!(inner_cookie(&outer).as_deref(), Some(inner));
        let row = json!({"@odata.etag": "W/\"3\"", "_msdyn_interactiondataid_value": "x", "msdyn_name": "n",
            "msdyn_interactiontype": 1, "msdyn_interactiontype@OData.Community.Display.V1.FormattedValue": "ThumbsUp",
            "_msdyn_interactiondataid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "msdyn_copilotinteractiondata"});
        let entity = entity_of(row.as_object().unwrap());
        assert_eq!(entity.len(), 4, "{entity:?}");
        assert_eq!(entity["msdyn_interactiondataid"], "x");
        assert_eq!(entity["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"], "ThumbsUp");
    }
}
