//! The control plane (SPEC §6): retention and purge commands arriving on the
//! control topic, executed at most once per `command_id`, answered on the
//! reply topic.
//!
//! - [`fetchxml`]: criteria parsing, validation and compilation to bound SQL.
//! - [`store`]: the commands' effects on SQLite and PostgreSQL.
//! - [`consumer`]: the control-topic loop (its own consumer group, one command at a time).

pub mod consumer;
pub mod fetchxml;
pub mod store;

use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use sha2::Sha256;
use uuid::Uuid;

use crate::table::table;

/// The largest command accepted (FetchXml is itself capped at 64 KiB).
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// Default `PageSize` of BulkRetain and PurgeRetainedContent.
pub const DEFAULT_PAGE_SIZE: i64 = 5000;
pub const SIGNATURE_HEADER: &str = "x-signature";

/// The messages of the control topic, named after the Dataverse messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    ValidateRetentionConfig,
    Retain,
    BulkRetain,
    RollbackRetain,
    PurgeRetainedContent,
}

impl Message {
    pub const ALL: [Message; 5] = [
        Message::ValidateRetentionConfig,
        Message::Retain,
        Message::BulkRetain,
        Message::RollbackRetain,
        Message::PurgeRetainedContent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Message::ValidateRetentionConfig => "ValidateRetentionConfig",
            Message::Retain => "Retain",
            Message::BulkRetain => "BulkRetain",
            Message::RollbackRetain => "RollbackRetain",
            Message::PurgeRetainedContent => "PurgeRetainedContent",
        }
    }

    fn parse(s: &str) -> Option<Message> {
        Message::ALL.into_iter().find(|m| m.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Succeeded,
    Failed,
    Rejected,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Succeeded => "Succeeded",
            Status::Failed => "Failed",
            Status::Rejected => "Rejected",
        }
    }
}

/// A reply, as published on the reply topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub command_id: Option<String>,
    pub message: Option<String>,
    pub status: Status,
    pub response: Option<Json>,
    pub error: Option<ReplyError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyError {
    pub code: String,
    pub message: String,
}

impl Reply {
    pub fn succeeded(command: &Command, response: Json) -> Reply {
        Reply {
            command_id: Some(command.command_id.clone()),
            message: Some(command.message.name().to_owned()),
            status: Status::Succeeded,
            response: Some(response),
            error: None,
        }
    }

    pub fn failed(command: &Command, code: &str, message: impl Into<String>) -> Reply {
        Reply {
            command_id: Some(command.command_id.clone()),
            message: Some(command.message.name().to_owned()),
            status: Status::Failed,
            response: None,
            error: Some(ReplyError { code: code.into(), message: message.into() }),
        }
    }

    pub fn rejected(command_id: Option<String>, message: Option<String>, code: &str, text: impl Into<String>) -> Reply {
        Reply {
            command_id,
            message,
            status: Status::Rejected,
            response: None,
            error: Some(ReplyError { code: code.into(), message: text.into() }),
        }
    }
}

/// A validated command.
#[derive(Debug, Clone)]
pub struct Command {
    pub command_id: String,
    pub message: Message,
    pub parameters: Parameters,
}

/// Parameters, checked per message.
#[derive(Debug, Clone)]
pub enum Parameters {
    ValidateRetentionConfig { fetch_xml: String },
    Retain { target: Uuid },
    BulkRetain { criteria: fetchxml::Criteria, fetch_xml: String, page_size: i64 },
    RollbackRetain { operation_id: Option<Uuid>, target: Option<Uuid> },
    PurgeRetainedContent { max_version: Option<i64>, criteria: Option<fetchxml::Criteria>, page_size: i64 },
}

impl Command {
    /// The operation id of a run: derived from the command id, so a
    /// redelivered command resumes the same operation.
    pub fn operation_id(&self) -> Uuid {
        const NS: Uuid = Uuid::from_u128(0x6f0b_4c1e_2a57_4d0e_9b1c_0c0b_71c5_7a03);
        Uuid::new_v5(&NS, self.command_id.as_bytes())
    }
}

/// Checks `x-signature: sha256=<hex>` against the HMAC-SHA256 of the value,
/// in constant time.
pub fn verify_signature(key: &str, value: &[u8], header: Option<&[u8]>) -> Result<(), String> {
    let header = header.ok_or("the command is not signed (x-signature header missing)")?;
    let header = std::str::from_utf8(header).map_err(|_| "x-signature is not text".to_owned())?;
    let hex = header.trim().strip_prefix("sha256=").ok_or("x-signature must be 'sha256=<hex>'")?;
    let tag = decode_hex(hex).ok_or("x-signature is not hexadecimal")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).map_err(|_| "unusable HMAC key".to_owned())?;
    mac.update(value);
    mac.verify_slice(&tag).map_err(|_| "x-signature does not match".to_owned())
}

/// `sha256=<hex HMAC-SHA256 of value>`, as the CLI sends it.
pub fn sign(key: &str, value: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(value);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Parses and validates a command. On failure returns the Rejected reply.
pub fn parse_command(value: &[u8]) -> Result<Command, Box<Reply>> {
    if value.len() > MAX_COMMAND_BYTES {
        return Err(Box::new(Reply::rejected(
            None,
            None,
            "PayloadTooLarge",
            format!("command over {MAX_COMMAND_BYTES} bytes"),
        )));
    }
    let json: Json = serde_json::from_slice(value)
        .map_err(|e| Box::new(Reply::rejected(None, None, "MalformedCommand", format!("not valid JSON: {e}"))))?;
    let command_id = json.get("command_id").and_then(Json::as_str).map(str::to_owned);
    let message_name = json.get("message").and_then(Json::as_str).map(str::to_owned);
    let reject =
        |code: &str, text: String| Box::new(Reply::rejected(command_id.clone(), message_name.clone(), code, text));
    let Some(id) = command_id.clone() else {
        return Err(reject("MalformedCommand", "command_id (a string) is required".into()));
    };
    if id.is_empty() || id.len() > 200 {
        return Err(reject("MalformedCommand", "command_id must be 1 to 200 characters".into()));
    }
    let Some(name) = message_name.clone() else {
        return Err(reject("MalformedCommand", "message (a string) is required".into()));
    };
    let message = Message::parse(&name)
        .ok_or_else(|| reject("UnknownMessage", format!("unknown message '{}'", truncate(&name))))?;
    let empty = serde_json::Map::new();
    let params = match json.get("parameters") {
        None | Some(Json::Null) => &empty,
        Some(Json::Object(m)) => m,
        Some(_) => return Err(reject("InvalidParameters", "parameters must be an object".into())),
    };
    let known: &[&str] = match message {
        Message::ValidateRetentionConfig => &["EntityName", "FetchXml", "ConfigId"],
        Message::Retain => &["Target"],
        Message::BulkRetain => &["EntityName", "FetchXml", "PageSize", "OperationId", "PagingCookie"],
        Message::RollbackRetain => &["OperationId", "Target"],
        Message::PurgeRetainedContent => &["EntityName", "MaxVersionToPurge", "FetchXml", "PageSize", "OperationId"],
    };
    if let Some(unknown) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(reject("InvalidParameters", format!("unknown parameter '{}' for {name}", truncate(unknown))));
    }
    let text = |key: &str| params.get(key).and_then(Json::as_str);
    let entity_ok = |required: bool| -> Result<(), Box<Reply>> {
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
    let guid = |key: &str| -> Result<Option<Uuid>, Box<Reply>> {
        match params.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => crate::normalize::parse_guid(s)
                .map(Some)
                .ok_or_else(|| reject("InvalidParameters", format!("{key} is not a GUID"))),
            Some(_) => Err(reject("InvalidParameters", format!("{key} must be a GUID string"))),
        }
    };
    let page_size = || -> Result<i64, Box<Reply>> {
        match params.get("PageSize") {
            None | Some(Json::Null) => Ok(DEFAULT_PAGE_SIZE),
            Some(v) => v
                .as_i64()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| reject("InvalidParameters", "PageSize must be an integer from 1 to 100000".into())),
        }
    };
    let now = Utc::now();
    let parameters = match message {
        Message::ValidateRetentionConfig => {
            let fetch_xml =
                text("FetchXml").ok_or_else(|| reject("InvalidParameters", "FetchXml is required".into()))?;
            Parameters::ValidateRetentionConfig { fetch_xml: fetch_xml.to_owned() }
        }
        Message::Retain => Parameters::Retain {
            target: guid("Target")?
                .ok_or_else(|| reject("InvalidParameters", "Target (a record id) is required".into()))?,
        },
        Message::BulkRetain => {
            entity_ok(true)?;
            let fetch_xml =
                text("FetchXml").ok_or_else(|| reject("InvalidParameters", "FetchXml is required".into()))?;
            let criteria = fetchxml::parse(fetch_xml, now).map_err(|e| reject("InvalidFetchXml", e))?;
            Parameters::BulkRetain { criteria, fetch_xml: fetch_xml.to_owned(), page_size: page_size()? }
        }
        Message::RollbackRetain => {
            let operation_id = guid("OperationId")?;
            let target = guid("Target")?;
            if operation_id.is_none() && target.is_none() {
                return Err(reject("InvalidParameters", "OperationId or Target is required".into()));
            }
            Parameters::RollbackRetain { operation_id, target }
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
                Some(x) => Some(fetchxml::parse(x, now).map_err(|e| reject("InvalidFetchXml", e))?),
                None => None,
            };
            Parameters::PurgeRetainedContent { max_version, criteria, page_size: page_size()? }
        }
    };
    Ok(Command { command_id: id, message, parameters })
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

/// `{"EntityCountCollection": {"msdyn_copilotinteraction": n}}` plus extra fields.
pub fn count_response(count: i64, extra: Json) -> Json {
    let mut response = json!({ "EntityCountCollection": { table().logical_name.clone(): count } });
    if let (Some(r), Json::Object(extra)) = (response.as_object_mut(), extra) {
        r.extend(extra);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked() {
        let value = br#"{"command_id":"1","message":"Retain"}"#;
        let good = sign("k3y", value);
        assert!(verify_signature("k3y", value, Some(good.as_bytes())).is_ok());
        assert!(verify_signature("k3y", value, None).unwrap_err().contains("not signed"));
        assert!(verify_signature("other", value, Some(good.as_bytes())).is_err());
        assert!(verify_signature("k3y", b"tampered", Some(good.as_bytes())).is_err());
        let truncated = &good[..good.len() - 2];
        assert!(verify_signature("k3y", value, Some(truncated.as_bytes())).is_err());
        assert!(verify_signature("k3y", value, Some(b"sha256=zz")).is_err());
        assert!(verify_signature("k3y", value, Some(good.trim_start_matches("sha256=").as_bytes())).is_err());
    }

    #[test]
    fn malformed_and_unknown_commands_are_rejected_with_a_reason() {
        let cases: [(&[u8], &str); 8] = [
            (b"not json", "MalformedCommand"),
            (br#"{"message":"Retain"}"#, "MalformedCommand"),
            (br#"{"command_id":"1"}"#, "MalformedCommand"),
            (br#"{"command_id":"1","message":"DropTable"}"#, "UnknownMessage"),
            (br#"{"command_id":"1","message":"Retain","parameters":{}}"#, "InvalidParameters"),
            (br#"{"command_id":"1","message":"Retain","parameters":{"Target":"nope"}}"#, "InvalidParameters"),
            (br#"{"command_id":"1","message":"BulkRetain","parameters":{"EntityName":"account","FetchXml":"<fetch/>"}}"#, "InvalidParameters"),
            (br#"{"command_id":"1","message":"BulkRetain","parameters":{"EntityName":"msdyn_copilotinteraction","FetchXml":"<fetch/>"}}"#, "InvalidFetchXml"),
        ];
        for (value, code) in cases {
            let reply = parse_command(value).expect_err(&String::from_utf8_lossy(value));
            assert_eq!(reply.status, Status::Rejected);
            assert_eq!(reply.error.as_ref().map(|e| e.code.as_str()), Some(code), "{}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn operation_ids_follow_the_command_id() {
        let c = |id: &str| {
            parse_command(format!(r#"{{"command_id":"{id}","message":"RollbackRetain","parameters":{{"Target":"0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d"}}}}"#).as_bytes()).unwrap()
        };
        assert_eq!(c("a").operation_id(), c("a").operation_id());
        assert_ne!(c("a").operation_id(), c("b").operation_id());
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// The JSON Schemas in schemas/ name exactly the messages and statuses the code handles.
    #[test]
    fn schemas_match_the_code() {
        let command: Json = serde_json::from_str(include_str!("../../schemas/control_command.schema.json")).unwrap();
        let messages: Vec<&str> =
            command["properties"]["message"]["enum"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert_eq!(messages, Message::ALL.iter().map(|m| m.name()).collect::<Vec<_>>());
        let reply: Json = serde_json::from_str(include_str!("../../schemas/control_reply.schema.json")).unwrap();
        let statuses: Vec<&str> =
            reply["properties"]["status"]["enum"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert_eq!(statuses, [Status::Succeeded, Status::Failed, Status::Rejected].map(Status::name));
        let codes: Vec<&str> = reply["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        let sources = [include_str!("mod.rs"), include_str!("store.rs"), include_str!("consumer.rs")].concat();
        for code in codes {
            assert!(sources.contains(&format!("\"{code}\"")), "{code} is in the schema but never produced");
        }
    }
}
