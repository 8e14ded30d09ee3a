//! The control request/reply client (`copilot-ingest control …`): builds a
//! command, signs it, publishes it and waits for the instance's signed reply.

use super::*;

/// The command JSON for a CLI control action.
pub(crate) fn control_command(
    action: ControlAction,
    command_id: &str,
    entity: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::json;
    let (message, parameters) = match action {
        ControlAction::ValidateRetentionConfig { fetchxml } => {
            ("ValidateRetentionConfig", json!({"EntityName": entity, "FetchXml": fetchxml}))
        }
        ControlAction::Retain { target } => ("Retain", json!({"Target": target})),
        ControlAction::Retrieve { target, columns } => {
            let columns = columns.map(|c| json!(c)).unwrap_or_else(|| json!("all"));
            ("Retrieve", json!({"Target": target, "ColumnSet": columns}))
        }
        ControlAction::BulkRetain { fetchxml, older_than, page_size } => {
            let fetchxml = match (fetchxml, older_than) {
                (Some(x), _) => x,
                (None, Some(age)) => older_than_fetchxml(entity, &age)?,
                (None, None) => return Err("bulk-retain needs --fetchxml or --older-than".into()),
            };
            let mut p = json!({"EntityName": entity, "FetchXml": fetchxml});
            if let Some(n) = page_size {
                p["PageSize"] = json!(n);
            }
            ("BulkRetain", p)
        }
        ControlAction::RollbackRetain { operation_id, target } => {
            let mut p = json!({});
            if let Some(op) = operation_id {
                p["OperationId"] = json!(op);
            }
            if let Some(t) = target {
                p["Target"] = json!(t);
            }
            ("RollbackRetain", p)
        }
        ControlAction::RetrieveMultiple { fetchxml, .. } => ("RetrieveMultiple", json!({"Query": fetchxml})),
        ControlAction::Update { target, set, row_version } => {
            let mut record = serde_json::Map::new();
            record.insert(crate::table::table().primary_id_attribute.clone(), json!(target));
            for assignment in set {
                let (column, value) = column_value(&assignment)?;
                record.insert(column, value);
            }
            let mut p = json!({"Target": record});
            if let Some(v) = row_version {
                p["ConcurrencyBehavior"] = json!("IfRowVersionMatches");
                p["RowVersion"] = json!(v);
            }
            ("Update", p)
        }
        ControlAction::Delete { target } => ("Delete", json!({"Target": target})),
        ControlAction::SetState { target, state, status } => {
            ("SetState", json!({"EntityMoniker": target, "State": state, "Status": status}))
        }
        ControlAction::IsValidStateTransition { target, new_state, new_status } => {
            ("IsValidStateTransition", json!({"Entity": target, "NewState": new_state, "NewStatus": new_status}))
        }
        ControlAction::BulkDelete { fetchxml, retained, page_size } => {
            let mut p = json!({"EntityName": entity, "FetchXml": fetchxml,
                               "DataSource": if retained { "retained" } else { "live" }});
            if let Some(n) = page_size {
                p["PageSize"] = json!(n);
            }
            ("BulkDelete", p)
        }
        ControlAction::PurgeRetainedContent { max_version, fetchxml, page_size } => {
            let mut p = json!({"EntityName": entity});
            if let Some(v) = max_version {
                p["MaxVersionToPurge"] = json!(v);
            }
            if let Some(x) = fetchxml {
                p["FetchXml"] = json!(x);
            }
            if let Some(n) = page_size {
                p["PageSize"] = json!(n);
            }
            ("PurgeRetainedContent", p)
        }
    };
    Ok(json!({"command_id": command_id, "message": message, "parameters": parameters}))
}

/// `column=value` of `update --set`: a number for numeric and option-set
/// columns when it reads as one, `null` to clear, text otherwise.
fn column_value(assignment: &str) -> Result<(String, serde_json::Value), String> {
    use crate::table::ColumnType;
    let (column, value) =
        assignment.split_once('=').ok_or_else(|| format!("--set '{assignment}': use column=value"))?;
    let numeric = crate::table::table().column(column).is_some_and(|c| {
        matches!(
            c.column_type,
            ColumnType::Integer | ColumnType::Bigint | ColumnType::Picklist | ColumnType::State | ColumnType::Status
        )
    });
    let value = match value.parse::<i64>() {
        _ if value == "null" => serde_json::Value::Null,
        Ok(n) if numeric => serde_json::Value::from(n),
        _ => serde_json::Value::String(value.to_owned()),
    };
    Ok((column.to_owned(), value))
}

/// The FetchXML of the page after `reply`'s, or `None` after the last page.
fn next_page(fetchxml: &str, reply: &serde_json::Value) -> Option<String> {
    let collection = &reply["response"]["EntityCollection"];
    if collection["MoreRecords"] != true {
        return None;
    }
    let cookie = collection["PagingCookie"].as_str()?;
    let page = cookie.split("page=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|p| p.parse::<i64>().ok())?;
    let escaped = cookie
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;");
    let rest = fetchxml.trim_start().strip_prefix("<fetch")?;
    Some(format!("<fetch page='{}' paging-cookie='{escaped}'{rest}", page + 1))
}

/// `90d` / `12h` / `6m` → FetchXML on createdon.
pub(crate) fn older_than_fetchxml(entity: &str, age: &str) -> Result<String, String> {
    let age = age.trim();
    let (number, unit) = age.split_at(age.len().saturating_sub(1));
    let operator = match unit {
        "d" => "olderthan-x-days",
        "h" => "olderthan-x-hours",
        "m" => "olderthan-x-months",
        _ => return Err(format!("--older-than '{age}': use a number with d, h or m (e.g. 90d)")),
    };
    let n: u32 = number.parse().map_err(|_| format!("--older-than '{age}': not a number"))?;
    Ok(format!(
        "<fetch><entity name='{entity}'><filter><condition attribute='createdon' operator='{operator}' value='{n}'/></filter></entity></fetch>"
    ))
}

pub(crate) async fn control_cmd(
    config: Config,
    action: ControlAction,
    brokers: Option<String>,
    timeout: Duration,
    command_id: Option<String>,
) -> anyhow::Result<i32> {
    let brokers = brokers.unwrap_or_else(|| config.kafka.brokers.clone());
    if brokers.trim() == "embedded" {
        eprintln!("control needs the service's broker: pass --brokers host:port or set kafka.brokers");
        return Ok(EXIT_CONFIG);
    }
    let (mut pages, all_pages) = match &action {
        ControlAction::RetrieveMultiple { fetchxml, all_pages } => (Some(fetchxml.clone()), *all_pages),
        _ => (None, false),
    };
    let first_id = command_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let command = match control_command(action, &first_id, &crate::table::table().logical_name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(EXIT_CONFIG);
        }
    };
    let mut command = command;
    let mut command_id = first_id;
    loop {
        let reply = exchange(&config, &brokers, &command_id, &command, timeout).await?;
        let Some(reply) = reply else {
            eprintln!("no reply within {}s (is copilot-ingest running against this broker?)", timeout.as_secs());
            return Ok(EXIT_REJECTED);
        };
        let Some(fetchxml) = pages.as_ref().filter(|_| reply["status"] == "Succeeded") else {
            println!("{}", serde_json::to_string_pretty(&reply)?);
            return Ok(if reply["status"] == "Succeeded" { EXIT_OK } else { EXIT_REJECTED });
        };
        // RetrieveMultiple: JSON Lines, one record per line.
        for entity in reply["response"]["EntityCollection"]["Entities"].as_array().into_iter().flatten() {
            println!("{entity}");
        }
        match next_page(fetchxml, &reply).filter(|_| all_pages) {
            Some(next) => {
                command_id = uuid::Uuid::new_v4().to_string();
                command = serde_json::json!({"command_id": command_id, "message": "RetrieveMultiple",
                                             "parameters": {"Query": next}});
                pages = Some(next);
            }
            None => return Ok(EXIT_OK),
        }
    }
}

/// Publishes one command and waits for its reply (`None`: none in time).
async fn exchange(
    config: &Config,
    brokers: &str,
    command_id: &str,
    command: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<Option<serde_json::Value>> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let value = serde_json::to_vec(command)?;
    let (brokers, command_id) = (brokers.to_owned(), command_id.to_owned());
    let options = pipeline::kafka_options(config);
    let reply_topic = config.kafka.control_reply_topic.clone();
    let control_topic = config.kafka.control_topic.clone();
    let auth = crate::transport::control::Authenticator::new(&config.control);
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<serde_json::Value>> {
        // Start reading replies at the current end, before the command goes out.
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("group.id", format!("copilot-ingest-cli-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false");
        for (k, v) in &options {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg.create()?;
        let metadata = consumer.fetch_metadata(Some(&reply_topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        if partitions.is_empty() {
            anyhow::bail!("reply topic {reply_topic} does not exist");
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in partitions {
            let (_, high) = consumer.fetch_watermarks(&reply_topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&reply_topic, p, rdkafka::Offset::Offset(high))?;
        }
        consumer.assign(&tpl)?;

        let producer: BaseProducer = crate::transport::ingest::dlq::producer_config(&brokers, &options).create()?;
        let mut record = BaseRecord::to(&control_topic).key(&command_id).payload(&value);
        if let Some(key) = auth.signing_key() {
            record = record.headers(crate::transport::control::signature_headers(key, &value));
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(30))?;

        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
            if m.key() != Some(command_id.as_bytes()) {
                continue;
            }
            match accept_reply(&auth, &command_id, &m) {
                Ok(reply) => return Ok(Some(reply)),
                Err(problem) => eprintln!("ignored a reply to {command_id}: {problem}"),
            }
        }
        Ok(None)
    })
    .await?
}

/// A reply the CLI believes: for the command id it sent, and, when a key is
/// configured, signed by the instance (anyone may write to the reply topic).
pub(crate) fn accept_reply(
    auth: &crate::transport::control::Authenticator,
    command_id: &str,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<serde_json::Value, String> {
    use rdkafka::Message as _;
    let body = message.payload().unwrap_or_default();
    // With a key, the reply must verify as a command would (same headers, same
    // freshness); without one there is nothing to verify against.
    if auth.signing_key().is_some() {
        let (timestamp, signature) = crate::transport::control::signature_headers_of(message);
        auth.check(body, timestamp, signature, chrono::Utc::now().timestamp()).map_err(|f| f.message().to_owned())?;
    }
    let reply: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if reply["command_id"].as_str() != Some(command_id) {
        return Err("its command_id is not the one sent".into());
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieve_sends_the_asked_columns_or_all() {
        let entity = "msdyn_copilotinteraction";
        let some = ControlAction::Retrieve {
            target: "t".into(),
            columns: Some(vec!["msdyn_name".into(), "statecode".into()]),
        };
        let command = control_command(some, "c1", entity).unwrap();
        assert_eq!(command["message"], "Retrieve");
        assert_eq!(command["parameters"], serde_json::json!({"Target": "t", "ColumnSet": ["msdyn_name", "statecode"]}));
        let all = control_command(ControlAction::Retrieve { target: "t".into(), columns: None }, "c2", entity).unwrap();
        assert_eq!(all["parameters"]["ColumnSet"], "all");
    }
}
