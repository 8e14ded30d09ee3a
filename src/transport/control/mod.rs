//! The control topic (SPEC §6): signed commands naming one of the table's
//! messages, executed at most once per `command_id`, answered on the reply
//! topic. This module reads the command envelope; the parameters are read by
//! [`crate::operations::parameters`], shared with the Web API.
//!
//! - [`auth`]: command signatures and keys.
//! - [`consumer`]: the control-topic loop (its own consumer group, one command at a time).

mod auth;
pub mod consumer;

pub use auth::*;

pub use crate::query::fetchxml;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use uuid::Uuid;

use crate::operations::parameters;
pub use crate::operations::parameters::{DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_PAGE_SIZE, MAX_UPDATE_TARGETS, Message};
use crate::operations::{Context, Request};

/// The largest command accepted (FetchXml is itself capped at 64 KiB).
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Succeeded,
    Failed,
    Rejected,
    /// A long operation's progress, before its final reply.
    InProgress,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Succeeded => "Succeeded",
            Status::Failed => "Failed",
            Status::Rejected => "Rejected",
            Status::InProgress => "InProgress",
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

    /// A progress reply: the counts so far of the command's operation.
    pub fn in_progress(command: &Command, report: &crate::operations::report::ProgressReport) -> Reply {
        Reply::progress(&command.command_id, command.message.name(), report)
    }

    /// A progress reply under `command_id` (a command's, or a scheduled run's).
    pub fn progress(command_id: &str, message: &str, report: &crate::operations::report::ProgressReport) -> Reply {
        let counts = crate::operations::EntityCountCollection(report.count);
        Reply {
            command_id: Some(command_id.to_owned()),
            message: Some(message.to_owned()),
            status: Status::InProgress,
            response: Some(serde_json::json!({
                "OperationId": report.operation_id,
                "EntityCountCollection": counts,
                "Step": report.step,
                "PagesDone": report.pages_done,
                "RowsPerSecond": (report.rows_per_second * 10.0).round() / 10.0,
                "Expected": report.expected,
            })),
            error: None,
        }
    }

    /// The reply of a scheduled retention run's report, under its reply id.
    pub fn of_run(report: &crate::operations::scheduler::RunReport) -> Reply {
        use crate::operations::scheduler::{RUN_MESSAGE, RunReport};
        match report {
            RunReport::Progress { reply_id, report } => Reply::progress(reply_id, RUN_MESSAGE, report),
            RunReport::Finished { reply_id, outcome } => {
                let succeeded = outcome.outcome == "Succeeded";
                Reply {
                    command_id: Some(reply_id.clone()),
                    message: Some(RUN_MESSAGE.to_owned()),
                    status: if succeeded { Status::Succeeded } else { Status::Failed },
                    response: Some(serde_json::json!({
                        "OperationId": outcome.operation_id,
                        "EntityCountCollection": crate::operations::EntityCountCollection(outcome.retained),
                        "PurgedCount": outcome.purged,
                    })),
                    error: (!succeeded).then(|| ReplyError {
                        code: "RetentionRunFailed".into(),
                        message: outcome.error.clone().unwrap_or_default(),
                    }),
                }
            }
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

/// A validated command: the request of one operation.
#[derive(Debug, Clone)]
pub struct Command {
    pub command_id: String,
    pub message: Message,
    pub request: Request,
}

impl Command {
    /// The operation id of a run: derived from the command id, so a
    /// redelivered command resumes the same operation.
    pub fn operation_id(&self) -> Uuid {
        self.context().operation_id
    }

    pub fn context(&self) -> Context {
        Context::for_request(&self.command_id)
    }
}

/// The longest `command_id` accepted, in characters.
pub const MAX_COMMAND_ID_CHARS: usize = 200;

/// A command id fit to echo in a reply key, a reply and a log line: 1 to 200
/// characters, none of them control characters.
pub fn is_valid_command_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_COMMAND_ID_CHARS && !id.chars().any(char::is_control)
}

/// A value from a command, made safe for a log line: escaped (a newline
/// cannot start a forged line) and cut to 200 characters.
pub fn loggable(value: &str) -> String {
    value.chars().take(MAX_COMMAND_ID_CHARS).flat_map(char::escape_debug).collect()
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
        // Only a known message name is echoed; an unknown one is named (cut short) in the text.
        |code: &str, text: String| {
            Box::new(Reply::rejected(
                command_id.clone(),
                message_name.clone().filter(|m| Message::parse(m).is_some()),
                code,
                text,
            ))
        };
    let Some(id) = command_id.clone() else {
        return Err(reject("MalformedCommand", "command_id (a string) is required".into()));
    };
    if !is_valid_command_id(&id) {
        // Not echoed: an oversized or multi-line id must not reach the reply key or a log.
        return Err(Box::new(Reply::rejected(
            None,
            message_name.clone().filter(|m| Message::parse(m).is_some()),
            "MalformedCommand",
            format!("command_id must be 1 to {MAX_COMMAND_ID_CHARS} printable characters"),
        )));
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
    let parameters = parameters::request(message, params).map_err(|e| reject(e.code, e.message))?;
    Ok(Command { command_id: id, message, request: parameters })
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const OLD_KEY: &str = "fedcba9876543210fedcba9876543210";
    const NOW: i64 = 1_800_000_000;

    fn authenticator(current: &str, previous: &str, allow_unsigned: bool) -> Authenticator {
        Authenticator::new(&crate::config::ControlConfig {
            hmac_key: crate::config::Secret::new(current),
            hmac_key_previous: crate::config::Secret::new(previous),
            allow_unsigned,
        })
    }

    #[test]
    fn signatures_bind_the_timestamp_and_the_value() {
        let value = br#"{"command_id":"1","message":"Retain"}"#;
        let auth = authenticator(KEY, "", false);
        let ts = NOW.to_string();
        let good = sign(KEY, NOW, value);
        assert_eq!(auth.check(value, Some(ts.as_bytes()), Some(good.as_bytes()), NOW), Ok(()));
        assert_eq!(auth.check(value, Some(ts.as_bytes()), Some(good.as_bytes()), NOW + 300), Ok(()));
        let stale = auth.check(value, Some(ts.as_bytes()), Some(good.as_bytes()), NOW + 301).unwrap_err();
        assert_eq!(stale.code(), "InvalidSignature");
        assert!(stale.message().contains("at most 300s"), "{stale:?}");
        assert!(auth.check(value, Some(ts.as_bytes()), Some(good.as_bytes()), NOW - 301).is_err(), "from the future");
        // The timestamp is inside the signed bytes: moving it breaks the signature.
        let later = (NOW + 10).to_string();
        assert!(auth.check(value, Some(later.as_bytes()), Some(good.as_bytes()), NOW).is_err());
        assert!(auth.check(b"tampered", Some(ts.as_bytes()), Some(good.as_bytes()), NOW).is_err());
        assert!(auth.check(value, Some(ts.as_bytes()), Some(&good.as_bytes()[..good.len() - 2]), NOW).is_err());
        assert!(auth.check(value, Some(ts.as_bytes()), Some(b"sha256=zz"), NOW).is_err());
        assert!(auth.check(value, Some(b"-5"), Some(good.as_bytes()), NOW).is_err());
        assert!(
            auth.check(value, Some(ts.as_bytes()), Some(good.trim_start_matches("sha256=").as_bytes()), NOW).is_err()
        );
        let other = sign("another-key-another-key-another-k", NOW, value);
        assert!(auth.check(value, Some(ts.as_bytes()), Some(other.as_bytes()), NOW).is_err());
        assert_eq!(auth.check(value, None, None, NOW).unwrap_err().code(), "Unauthorized");
        assert_eq!(auth.check(value, None, Some(good.as_bytes()), NOW).unwrap_err().code(), "Unauthorized");
    }

    #[test]
    fn a_rotation_accepts_the_previous_key_and_signs_with_the_new_one() {
        let value = b"{}";
        let ts = NOW.to_string();
        let auth = authenticator(KEY, OLD_KEY, false);
        assert_eq!(auth.signing_key(), Some(KEY));
        for key in [KEY, OLD_KEY] {
            let sig = sign(key, NOW, value);
            assert_eq!(auth.check(value, Some(ts.as_bytes()), Some(sig.as_bytes()), NOW), Ok(()), "{key}");
        }
        let retired = authenticator(KEY, "", false);
        let sig = sign(OLD_KEY, NOW, value);
        assert!(retired.check(value, Some(ts.as_bytes()), Some(sig.as_bytes()), NOW).is_err());
    }

    #[test]
    fn unsigned_commands_need_an_explicit_opt_in() {
        let refused = authenticator("", "", false).check(b"{}", None, None, NOW).unwrap_err();
        assert_eq!(refused.code(), "Unauthorized");
        assert_eq!(authenticator("", "", true).check(b"{}", None, None, NOW), Ok(()));
        // A key always wins over the opt-in.
        assert!(authenticator(KEY, "", true).check(b"{}", None, None, NOW).is_err());
    }

    #[test]
    fn command_ids_are_bounded_and_never_echoed_when_bad() {
        let long = "x".repeat(201);
        for id in [long.as_str(), "two\nlines", "", "tab\there"] {
            let value = json!({"command_id": id, "message": "Retain", "parameters": {"Target": "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d"}});
            let reply = parse_command(value.to_string().as_bytes()).unwrap_err();
            assert_eq!(reply.command_id, None, "{id:?}");
            assert_eq!(reply.error.as_ref().map(|e| e.code.as_str()), Some("MalformedCommand"));
        }
        assert!(is_valid_command_id(&"é".repeat(200)));
        assert_eq!(loggable("a\nERROR forged"), "a\\nERROR forged");
    }

    #[test]
    fn destructive_criteria_that_match_everything_need_allow_all() {
        let bulk = |fetch: &str, allow: Option<bool>| {
            let mut p = json!({"EntityName": "msdyn_copilotinteraction", "FetchXml": fetch});
            if let Some(a) = allow {
                p["AllowAll"] = json!(a);
            }
            parse_command(json!({"command_id": "c", "message": "BulkRetain", "parameters": p}).to_string().as_bytes())
        };
        let code = |r: Result<Command, Box<Reply>>| r.err().and_then(|r| r.error).map(|e| e.code);
        let whole = "<fetch><entity name='msdyn_copilotinteraction'/></fetch>";
        let empty_and = "<fetch><entity name='msdyn_copilotinteraction'><filter/></entity></fetch>";
        let empty_or = "<fetch><entity name='msdyn_copilotinteraction'><filter type='or'/></entity></fetch>";
        assert_eq!(code(bulk(whole, None)).as_deref(), Some("InvalidFetchXml"));
        assert_eq!(code(bulk(whole, Some(false))).as_deref(), Some("InvalidFetchXml"));
        assert!(bulk(whole, Some(true)).is_ok());
        assert_eq!(code(bulk(empty_and, None)).as_deref(), Some("InvalidFetchXml"));
        assert_eq!(code(bulk(empty_and, Some(true))).as_deref(), Some("InvalidFetchXml"));
        assert!(bulk(empty_or, None).is_ok(), "an empty or matches nothing, so it is not 'everything'");
        let purge = json!({"command_id": "p", "message": "PurgeRetainedContent",
            "parameters": {"EntityName": "msdyn_copilotinteraction", "FetchXml": whole}});
        assert_eq!(code(parse_command(purge.to_string().as_bytes())).as_deref(), Some("InvalidFetchXml"));
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
        let command: Json = serde_json::from_str(include_str!("../../../schemas/control_command.schema.json")).unwrap();
        let messages: Vec<&str> =
            command["properties"]["message"]["enum"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert_eq!(messages, Message::ALL.iter().map(|m| m.name()).collect::<Vec<_>>());
        let reply: Json = serde_json::from_str(include_str!("../../../schemas/control_reply.schema.json")).unwrap();
        let statuses: Vec<&str> =
            reply["properties"]["status"]["enum"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert_eq!(
            statuses,
            [Status::Succeeded, Status::Failed, Status::Rejected, Status::InProgress].map(Status::name)
        );
        let codes: Vec<&str> = reply["properties"]["error"]["properties"]["code"]["anyOf"][0]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        let sources = [
            include_str!("mod.rs"),
            include_str!("consumer.rs"),
            include_str!("../../operations/mod.rs"),
            include_str!("../../operations/retention.rs"),
            include_str!("../../operations/retrieve.rs"),
            include_str!("../../operations/retrieve_multiple.rs"),
            include_str!("../../operations/update.rs"),
            include_str!("../../operations/state.rs"),
            include_str!("../../operations/policy.rs"),
            include_str!("../../operations/bookkeeping.rs"),
        ]
        .concat();
        for code in codes {
            assert!(sources.contains(&format!("\"{code}\"")), "{code} is in the schema but never produced");
        }
    }
}
