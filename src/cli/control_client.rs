//! The control request/reply client (`copilot-ingest control …`): builds a
//! command, signs it, publishes it and waits for the instance's signed reply.

use std::sync::{Arc, Mutex};

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
        ControlAction::Policies => {
            ("RetrieveMultiple", json!({"Query": "<fetch><entity name='retentionconfig'/></fetch>"}))
        }
        ControlAction::Operation { operation_id, .. } => {
            let id = uuid::Uuid::parse_str(&operation_id)
                .map_err(|_| format!("--operation-id '{operation_id}' is not a GUID"))?;
            ("RetrieveMultiple", json!({"Query": operation_query(id)}))
        }
        ControlAction::PausePolicy { uniquename } => {
            policy_status(uniquename, crate::operations::policy::PolicyStatus::Unscheduled)
        }
        ControlAction::ResumePolicy { uniquename } => {
            policy_status(uniquename, crate::operations::policy::PolicyStatus::Scheduled)
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

fn policy_status(
    uniquename: String,
    status: crate::operations::policy::PolicyStatus,
) -> (&'static str, serde_json::Value) {
    let target = serde_json::json!({"uniquename": uniquename, "statuscode": status.statuscode()});
    ("Update", serde_json::json!({"EntityName": "retentionconfig", "Target": target}))
}

fn operation_query(id: uuid::Uuid) -> String {
    format!(
        "<fetch><entity name='retentionoperation'><filter><condition attribute='retentionoperationid' operator='eq' value='{id}'/></filter></entity></fetch>"
    )
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

/// The options every `control` action shares.
pub(crate) struct ControlOptions {
    pub brokers: Option<String>,
    pub timeout: Duration,
    pub command_id: Option<String>,
    pub no_wait: bool,
}

pub(crate) async fn control_cmd(config: Config, action: ControlAction, options: ControlOptions) -> anyhow::Result<i32> {
    let ControlOptions { brokers, timeout, command_id, no_wait } = options;
    let brokers = brokers.unwrap_or_else(|| config.kafka.brokers.clone());
    if brokers.trim() == "embedded" {
        eprintln!("control needs the service's broker: pass --brokers host:port or set kafka.brokers");
        return Ok(EXIT_CONFIG);
    }
    let (mut pages, all_pages) = match &action {
        ControlAction::RetrieveMultiple { fetchxml, all_pages } => (Some(fetchxml.clone()), *all_pages),
        _ => (None, false),
    };
    let view = match &action {
        ControlAction::Policies => View::PolicyTable,
        ControlAction::Operation { operation_id, watch: true } => View::Watch(operation_id.clone()),
        ControlAction::Operation { .. } => View::Operation,
        _ => View::Reply,
    };
    let first_id = command_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let command = match control_command(action, &first_id, &crate::table::table().logical_name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(EXIT_CONFIG);
        }
    };
    if no_wait {
        publish_only(&config, &brokers, &first_id, &command).await?;
        let operation_id = crate::operations::Context::for_request(&first_id).operation_id;
        println!("{}", serde_json::json!({"command_id": first_id, "OperationId": operation_id}));
        return Ok(EXIT_OK);
    }
    if let View::Watch(id) = view {
        return watch_operation(&config, &brokers, &id, timeout).await;
    }
    let mut command = command;
    let mut command_id = first_id;
    let shown = Arc::new(Mutex::new(ProgressView::new()));
    loop {
        let view_of = Arc::clone(&shown);
        let on_progress = Box::new(move |r: &serde_json::Value| lock(&view_of).show(r));
        let reply = exchange(&config, &brokers, &command_id, &command, timeout, on_progress).await?;
        lock(&shown).finish();
        let Some(reply) = reply else {
            eprintln!("no reply within {}s (is copilot-ingest running against this broker?)", timeout.as_secs());
            return Ok(EXIT_REJECTED);
        };
        let succeeded = reply["status"] == "Succeeded";
        match view {
            View::PolicyTable if succeeded => {
                print!("{}", policy_table(&reply["response"]["EntityCollection"]["Entities"]));
                return Ok(EXIT_OK);
            }
            View::Operation if succeeded => {
                let Some(entity) = reply["response"]["EntityCollection"]["Entities"].get(0) else {
                    eprintln!("no such operation");
                    return Ok(EXIT_REJECTED);
                };
                println!("{}", serde_json::to_string_pretty(entity)?);
                return Ok(EXIT_OK);
            }
            _ => {}
        }
        let Some(fetchxml) = pages.as_ref().filter(|_| succeeded) else {
            print_reply(&reply)?;
            return Ok(if succeeded { EXIT_OK } else { EXIT_REJECTED });
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

fn lock(view: &Mutex<ProgressView>) -> std::sync::MutexGuard<'_, ProgressView> {
    view.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a reply is shown.
enum View {
    Reply,
    PolicyTable,
    Operation,
    Watch(String),
}

/// The final reply: indented on a terminal, one JSON line otherwise (so a
/// pipe reads progress and final replies alike as JSON Lines).
fn print_reply(reply: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("{}", serde_json::to_string_pretty(reply)?);
    } else {
        println!("{reply}");
    }
    Ok(())
}

/// Progress replies: a bar with the count, rate and ETA on a terminal; JSON
/// lines on stdout otherwise.
struct ProgressView {
    bar: Option<crate::progress::Progress>,
    /// The step the bar shows (a new step, a new bar: its total differs).
    step: String,
    terminal: bool,
}

impl ProgressView {
    fn new() -> ProgressView {
        use std::io::IsTerminal;
        ProgressView { bar: None, step: String::new(), terminal: std::io::stdout().is_terminal() }
    }

    fn show(&mut self, reply: &serde_json::Value) {
        if !self.terminal {
            println!("{reply}");
            return;
        }
        let response = &reply["response"];
        let count =
            response["EntityCountCollection"].as_object().map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
        let rate = response["RowsPerSecond"].as_f64().unwrap_or(0.0);
        let step = response["Step"].as_str().unwrap_or("").to_owned();
        let expected = response["Expected"].as_u64().filter(|e| *e > 0);
        if step != self.step {
            self.finish();
            self.step = step.clone();
        }
        let bar = self.bar.get_or_insert_with(|| crate::progress::Progress::start(false, expected));
        let eta = match expected {
            Some(total) if rate > 0.0 && total > count => {
                format!(", ETA {}s", ((total - count) as f64 / rate).ceil() as u64)
            }
            _ => String::new(),
        };
        bar.update(count, || format!("{step}: {count} records, {rate:.0}/s{eta}"));
    }

    fn finish(&mut self) {
        if let Some(bar) = &mut self.bar {
            bar.finish();
        }
        self.bar = None;
    }
}

/// `control policies`: one line per policy.
fn policy_table(entities: &serde_json::Value) -> String {
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or("-").to_owned();
    let mut rows = vec![["UNIQUENAME", "STATUS", "RECURRENCE", "NEXT RUN", "LAST RUN", "OUTCOME"].map(str::to_owned)];
    for e in entities.as_array().into_iter().flatten() {
        let recurrence = e["recurrence"].as_str().filter(|r| !r.is_empty()).unwrap_or("once").to_owned();
        rows.push([
            text(e, "uniquename"),
            text(e, "statuscode@OData.Community.Display.V1.FormattedValue"),
            recurrence,
            text(e, "nextrun"),
            text(e, "lastrun"),
            text(e, "lastoutcome"),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `control operation --watch`: polls the operation every 2 s until it
/// completes; JSON lines on a pipe, a progress line on a terminal.
async fn watch_operation(config: &Config, brokers: &str, operation_id: &str, timeout: Duration) -> anyhow::Result<i32> {
    let Ok(id) = uuid::Uuid::parse_str(operation_id) else {
        eprintln!("--operation-id '{operation_id}' is not a GUID");
        return Ok(EXIT_CONFIG);
    };
    let mut shown = ProgressView::new();
    loop {
        let command_id = uuid::Uuid::new_v4().to_string();
        let command = serde_json::json!({"command_id": command_id, "message": "RetrieveMultiple",
                                         "parameters": {"Query": operation_query(id)}});
        let Some(reply) = exchange(config, brokers, &command_id, &command, timeout, Box::new(|_| {})).await? else {
            shown.finish();
            eprintln!("no reply within {}s", timeout.as_secs());
            return Ok(EXIT_REJECTED);
        };
        let Some(entity) = reply["response"]["EntityCollection"]["Entities"].get(0).cloned() else {
            shown.finish();
            eprintln!("no such operation (yet): {id}");
            return Ok(EXIT_REJECTED);
        };
        if entity["statecode"] == 2 {
            shown.finish();
            print_reply(&entity)?;
            return Ok(if entity["statuscode"] == 5 { EXIT_OK } else { EXIT_REJECTED });
        }
        let as_progress = serde_json::json!({"status": "InProgress", "response": {
            "OperationId": id, "Step": entity["statuscode@OData.Community.Display.V1.FormattedValue"],
            "EntityCountCollection": {"records": entity["recordcount"]}, "operation": entity}});
        shown.show(&as_progress);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Publishes a command without waiting for its reply (`--no-wait`).
async fn publish_only(
    config: &Config,
    brokers: &str,
    command_id: &str,
    command: &serde_json::Value,
) -> anyhow::Result<()> {
    let value = serde_json::to_vec(command)?;
    let options = pipeline::kafka_options(config);
    let (brokers, command_id, topic) = (brokers.to_owned(), command_id.to_owned(), config.kafka.control_topic.clone());
    let auth = crate::transport::control::Authenticator::new(&config.control);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let producer: BaseProducer = crate::transport::ingest::dlq::producer_config(&brokers, &options).create()?;
        let mut record = BaseRecord::to(&topic).key(&command_id).payload(&value);
        if let Some(key) = auth.signing_key() {
            record = record.headers(crate::transport::control::signature_headers(key, &value));
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    })
    .await?
}

/// Publishes one command and waits for its reply (`None`: none in time).
async fn exchange(
    config: &Config,
    brokers: &str,
    command_id: &str,
    command: &serde_json::Value,
    timeout: Duration,
    mut on_progress: Box<dyn FnMut(&serde_json::Value) + Send>,
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

        let mut deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
            if m.key() != Some(command_id.as_bytes()) {
                continue;
            }
            match accept_reply(&auth, &command_id, &m) {
                // A long operation is alive while its progress arrives.
                Ok(reply) if reply["status"] == "InProgress" => {
                    on_progress(&reply);
                    deadline = Instant::now() + timeout;
                }
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
