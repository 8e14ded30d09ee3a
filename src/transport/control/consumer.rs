//! The control-topic loop: its own consumer group (`<group_id>.control`), one
//! command at a time, in order. A command's offset is committed only after its
//! reply is acknowledged by the broker; the reply is stored first, so a
//! redelivered command gets the stored reply instead of running again.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value as Json;
use tokio::sync::watch;

use super::{Authenticator, Reply, Status, loggable, parse_command, signature_headers};
use crate::backend::{Backend, BackendError};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::kafka_log::QuietContext;
use crate::metrics::Metrics;
use crate::operations::report::ProgressSink;
use crate::operations::{self, OperationError};

/// Runs until `shutdown` turns true, executing commands on `backend`.
pub async fn run(
    config: Config,
    brokers: String,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let options = crate::transport::ingest::pipeline::kafka_options(&config);
    let mut consumer_config = rdkafka::ClientConfig::new();
    consumer_config
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{}.control", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A BulkRetain over millions of rows may take long between polls.
        .set("max.poll.interval.ms", "3600000");
    for (k, v) in &options {
        consumer_config.set(k, v);
    }
    let consumer: StreamConsumer<QuietContext> =
        consumer_config.create_with_context(QuietContext::new("control consumer"))?;
    consumer.subscribe(&[&config.kafka.control_topic])?;
    let producer = crate::transport::ingest::dlq::create_producer(
        &crate::transport::ingest::dlq::producer_config(&brokers, &options),
        "control producer",
    )?;
    tracing::info!(topic = %config.kafka.control_topic, "control commands: consuming");
    let auth = Authenticator::new(&config.control);
    // A reply must fit the producer's message size: a RetrieveMultiple page
    // carries at most this many bytes of entities (the rest of the reply and
    // its headers fit in the headroom).
    let reply_limit = options
        .iter()
        .find(|(k, _)| k == "message.max.bytes")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .map_or(super::DEFAULT_MAX_RESPONSE_BYTES, |max| max.saturating_sub(64 * 1024).max(1024));
    let consume_errors = crate::kafka_log::Throttle::default();

    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                crate::kafka_log::error(&consume_errors, "control consumer", &e, "consume");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let value = message.payload().unwrap_or_default();
        let headers = super::signature_headers_of(&message);
        // Progress replies go out in order, from their own task, while the
        // command runs; the final reply waits for them, so it is the last.
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
        let progress_publisher = {
            let (producer, topic, auth) = (producer.clone(), config.kafka.control_reply_topic.clone(), auth.clone());
            tokio::spawn(async move {
                while let Some(reply) = progress_rx.recv().await {
                    publish(&producer, &topic, &auth, &reply).await;
                }
            })
        };
        let progress = ProgressReplies { replies: progress_tx, every: crate::operations::report::REPORT_EVERY };
        let handled = handle(
            &backend,
            &auth,
            value,
            headers,
            &mut shutdown,
            &metrics,
            Replies { limit: reply_limit, progress: Some(progress) },
        )
        .await;
        let _ = progress_publisher.await;
        let Some(reply) = handled else {
            // Shutting down in the middle of a command: left uncommitted, it
            // resumes after the restart.
            break;
        };
        let key = reply.command_id.clone().unwrap_or_default();
        publish(&producer, &config.kafka.control_reply_topic, &auth, &reply).await;
        if let Err(e) = consumer.commit_message(&message, CommitMode::Sync) {
            tracing::warn!(error = %e, "committing a control command failed; a redelivery will get the stored reply");
        }
        let name = reply
            .message
            .as_deref()
            .filter(|m| super::Message::ALL.iter().any(|k| k.name() == *m))
            .unwrap_or("invalid");
        metrics.control_commands_total.with_label_values(&[name, reply.status.name()]).inc();
        tracing::info!(
            command_id = %loggable(&key),
            message = name,
            status = reply.status.name(),
            "control command handled"
        );
    }
    Ok(())
}

/// Publishes one reply, signed when a key is set, retrying until the broker takes it.
pub(crate) async fn publish(
    producer: &rdkafka::producer::FutureProducer<QuietContext>,
    topic: &str,
    auth: &Authenticator,
    reply: &Reply,
) {
    let key = reply.command_id.clone().unwrap_or_default();
    let body = serde_json::to_vec(reply).unwrap_or_default();
    let mut backoff = Backoff::default();
    loop {
        let mut record = FutureRecord::to(topic).key(&key).payload(&body);
        // Signed, so that a client holding the key can tell our replies from forged ones.
        if let Some(signing_key) = auth.signing_key() {
            record = record.headers(signature_headers(signing_key, &body));
        }
        match producer.send(record, Timeout::After(Duration::from_secs(30))).await {
            Ok(_) => return,
            Err((e, _)) => {
                tracing::warn!(error = %e, "publishing a control reply failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Runs the control consumer. Ingestion goes on without it, but never
/// silently: if it cannot start or stops with an error, an ERROR says so and
/// `/readyz` answers 503 naming it.
pub async fn supervised(
    control: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    readiness: Arc<crate::transport::http::Readiness>,
) {
    let outcome = match tokio::spawn(control).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => crate::cli::safe_error(&e),
        Err(e) => e.to_string(),
    };
    readiness.control_failed.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::error!(error = %outcome, "control consumer stopped: retention commands are not executed");
}

/// Prunes the dead-letter ledger and stored replies every hour (the first
/// time a minute after start), until `shutdown`.
pub async fn prune_periodically(config: Config, backend: Arc<Backend>, mut shutdown: watch::Receiver<bool>) {
    if backend.kind() == "dataverse" {
        return;
    }
    let max_age = chrono::Duration::hours(i64::try_from(config.sink.prune_after_hours).unwrap_or(i64::MAX / 7200));
    let mut next = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shutdown.changed() => return,
        }
        next += Duration::from_secs(3600);
        match backend.prune(chrono::Utc::now() - max_age).await {
            Ok((letters, replies)) => {
                tracing::info!(
                    dead_letter_entries = letters,
                    stored_replies = replies,
                    "pruned bookkeeping older than sink.prune_after_hours"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning the dead-letter ledger and stored replies failed; retrying in an hour")
            }
        }
    }
}

/// Authenticates, deduplicates and executes one command. `None` when shutdown
/// interrupted a retry.
async fn handle(
    store: &Backend,
    auth: &Authenticator,
    value: &[u8],
    (timestamp, signature): (Option<&[u8]>, Option<&[u8]>),
    shutdown: &mut watch::Receiver<bool>,
    metrics: &Metrics,
    Replies { limit: reply_limit, progress }: Replies,
) -> Option<Reply> {
    if let Err(failure) = auth.check(value, timestamp, signature, chrono::Utc::now().timestamp()) {
        tracing::warn!(problem = failure.message(), "control command refused");
        // Not stored: a forged command must not block the genuine one with the same id.
        // Only a well-formed id is echoed (it becomes the reply's key).
        let parsed: Option<Json> = serde_json::from_slice(value).ok();
        let field = |k: &str| parsed.as_ref().and_then(|p| p.get(k)).and_then(Json::as_str).map(str::to_owned);
        let command_id = field("command_id").filter(|id| super::is_valid_command_id(id));
        let message = field("message").filter(|m| super::Message::ALL.iter().any(|k| k.name() == m));
        return Some(Reply::rejected(command_id, message, failure.code(), failure.message()));
    }
    let mut command = match parse_command(value) {
        Ok(c) => c,
        Err(reply) => return Some(*reply),
    };
    if let operations::Request::RetrieveMultiple(query) = &mut command.request {
        query.max_response_bytes = reply_limit;
    }
    // Dataverse keeps no command ledger here and runs retention itself (its
    // long-term retention policies); the other messages are forwarded to it.
    let ledger = store.kind() != "dataverse";
    if !ledger && !crate::backend::dataverse::forwards(command.message) {
        return Some(Reply::rejected(
            Some(command.command_id.clone()),
            Some(command.message.name().to_owned()),
            "NotSupported",
            "the dataverse:// sink does not execute retention commands (Retain, BulkRetain, RollbackRetain, \
             PurgeRetainedContent, BulkDelete): configure a long-term retention policy in the Dataverse environment instead",
        ));
    }
    let sink = progress_sink(&command, progress, metrics);
    let mut backoff = Backoff::default();
    loop {
        let attempt = async {
            if !ledger {
                return Ok::<_, BackendError>(Some(execute(store, &command, sink.clone()).await?));
            }
            // Claimed in the database first: another instance handed the same
            // command (a rebalance, a second consumer group) waits here until
            // this one has stored its reply, then returns that reply.
            let Some(_claim) = store.claim(&command.command_id).await? else {
                return Ok::<_, BackendError>(None);
            };
            let stored = store.stored_reply(&command.command_id).await?;
            if let Some(stored) = stored.and_then(|text| serde_json::from_str::<Reply>(&text).ok()) {
                tracing::info!(
                    command_id = %loggable(&command.command_id),
                    "command seen before: returning the stored reply"
                );
                return Ok(Some(stored));
            }
            let reply = execute(store, &command, sink.clone()).await?;
            if reply.status != Status::Rejected {
                let text = serde_json::to_string(&reply).map_err(|e| BackendError::Permanent(e.to_string()))?;
                store.store_reply(&command.command_id, reply.message.as_deref(), &text).await?;
            }
            Ok(Some(reply))
        };
        match attempt.await {
            Ok(Some(reply)) => {
                if crate::metrics::OPERATION_KINDS.contains(&command.message.name()) {
                    // The progress gauge shows running operations only.
                    metrics.retention_operation_records.with_label_values(&[command.message.name()]).set(0);
                }
                record_counts(metrics, &reply);
                return Some(reply);
            }
            Ok(None) => {
                tracing::debug!(command_id = %loggable(&command.command_id), "command claimed by another instance; waiting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.changed() => return None,
                }
            }
            Err(BackendError::Permanent(e)) => return Some(Reply::failed(&command, "ExecutionFailed", e)),
            Err(BackendError::Transient(e) | BackendError::Fatal(e)) => {
                tracing::warn!(
                    error = %e,
                    command_id = %loggable(&command.command_id),
                    "control command hit a transient error; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.changed() => return None,
                }
            }
        }
    }
}

/// Runs the command's operation. A failure of the request becomes a Failed
/// reply; a backend failure is returned for the caller to retry (transient)
/// or to report as failed (permanent).
async fn execute(
    backend: &Backend,
    command: &super::Command,
    progress: Option<ProgressSink>,
) -> Result<Reply, BackendError> {
    let context = operations::Context { progress, ..command.context() };
    match operations::execute(backend, &context, &command.request).await {
        Ok(response) => Ok(Reply::succeeded(command, response)),
        Err(OperationError::Failed { code, message }) => Ok(Reply::failed(command, &code, message)),
        Err(OperationError::Backend(e)) => Err(e),
    }
}

/// What the replies to one command may be: the size limit of a
/// RetrieveMultiple page, and where progress replies go.
struct Replies {
    limit: usize,
    progress: Option<ProgressReplies>,
}

/// Where a command's progress replies go, and how often at most.
struct ProgressReplies {
    replies: tokio::sync::mpsc::UnboundedSender<Reply>,
    every: Duration,
}

/// Sends each progress report of the command's operation as an InProgress
/// reply and into the progress gauge.
fn progress_sink(
    command: &super::Command,
    progress: Option<ProgressReplies>,
    metrics: &Metrics,
) -> Option<ProgressSink> {
    let ProgressReplies { replies, every } = progress?;
    let command = command.clone();
    let gauge = metrics.retention_operation_records.clone();
    Some(ProgressSink::every(every, move |report| {
        gauge.with_label_values(&[command.message.name()]).set(report.count);
        let _ = replies.send(Reply::in_progress(&command, report));
    }))
}

fn record_counts(metrics: &Metrics, reply: &Reply) {
    let action = match reply.message.as_deref() {
        Some("Retain" | "BulkRetain") => "retained",
        Some("RollbackRetain") => "rolled_back",
        Some("PurgeRetainedContent") => "purged",
        _ => return,
    };
    let count = reply
        .response
        .as_ref()
        .and_then(|r| r.get("EntityCountCollection"))
        .and_then(Json::as_object)
        .map(|m| m.values().filter_map(Json::as_u64).sum::<u64>())
        .unwrap_or(0);
    metrics.retention_records_total.with_label_values(&[action]).inc_by(count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_control_consumer_makes_readiness_fail() {
        let readiness = Arc::new(crate::transport::http::Readiness::default());
        for flag in [&readiness.broker_reachable, &readiness.sink_reachable, &readiness.assigned] {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        supervised(async { Ok(()) }, Arc::clone(&readiness)).await;
        assert!(readiness.is_ready(), "a control consumer that stopped cleanly (shutdown) is not a failure");
        supervised(async { Err(anyhow::anyhow!("subscribe refused")) }, Arc::clone(&readiness)).await;
        assert!(!readiness.is_ready());
        supervised(async { panic!("control consumer panicked") }, Arc::clone(&readiness)).await;
        assert!(!readiness.is_ready());
    }

    /// A SQLite backend in a fresh directory (removed by the test).
    async fn sqlite_backend(name: &str) -> (Backend, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("copilot-ingest-{name}-{}", uuid::Uuid::new_v4().simple()));
        let url = crate::config::SinkUrl::Sqlite(dir.join("t.db"));
        (Backend::open(&url, "t", 1, &Arc::new(Metrics::new())).await.unwrap(), dir)
    }

    /// A long command's progress replies count up, page by page, and the
    /// final reply carries the whole count.
    #[tokio::test]
    async fn progress_replies_count_up_to_the_final_reply() {
        let auth = Authenticator::new(&crate::config::ControlConfig { allow_unsigned: true, ..Default::default() });
        let (_tx, mut shutdown) = watch::channel(false);
        let metrics = Metrics::new();
        let (backend, dir) = sqlite_backend("progress").await;
        let normalizer = crate::normalize::Normalizer::default();
        let records = (0..50)
            .map(|i| {
                let event = serde_json::json!({"msdyn_name": format!("e{i}"), "msdyn_interactiontype": "Copy", "msdyn_scenariorequestid": "r",
                    "msdyn_scenariotype": "Copilot", "msdyn_copilotinteractionid": uuid::Uuid::new_v4().to_string()});
                normalizer.normalize_json(event.to_string().as_bytes(), None, chrono::Utc::now()).unwrap()
            })
            .collect();
        operations::create_multiple::create_records(&backend, records, &metrics).await.unwrap();
        let (replies, mut received) = tokio::sync::mpsc::unbounded_channel();
        let command = serde_json::json!({"command_id": "bulk-1", "message": "BulkRetain", "parameters": {
            "EntityName": "msdyn_copilotinteraction", "PageSize": 5,
            "FetchXml": "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='msdyn_name' operator='like' value='e%'/></filter></entity></fetch>"}});
        let progress = ProgressReplies { replies, every: Duration::ZERO };
        let value = command.to_string();
        let last = handle(
            &backend,
            &auth,
            value.as_bytes(),
            (None, None),
            &mut shutdown,
            &metrics,
            Replies { limit: 1 << 20, progress: Some(progress) },
        )
        .await
        .unwrap();
        let mut counts = Vec::new();
        while let Ok(reply) = received.try_recv() {
            assert_eq!((reply.status, reply.command_id.as_deref()), (Status::InProgress, Some("bulk-1")));
            let response = reply.response.unwrap();
            assert_eq!(response["Step"], "Marking");
            assert_eq!(response["Expected"], 50, "what matched when the run started");
            counts.push(response["EntityCountCollection"]["msdyn_copilotinteraction"].as_i64().unwrap());
        }
        assert_eq!(counts, (1..=11).map(|page| (page * 5).min(50)).collect::<Vec<_>>(), "one reply per page, in order");
        assert_eq!(last.status, Status::Succeeded);
        assert_eq!(last.response.unwrap()["EntityCountCollection"]["msdyn_copilotinteraction"], 50);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A refused command's reply never echoes an oversized or multi-line id
    /// (it would become the reply's key and reach logs).
    #[tokio::test]
    async fn refused_commands_echo_only_well_formed_ids() {
        let auth = Authenticator::new(&crate::config::ControlConfig::default());
        let (_tx, mut shutdown) = watch::channel(false);
        let metrics = Metrics::new();
        let (backend, dir) = sqlite_backend("refused").await;
        let huge = "x".repeat(200_000);
        for (id, echoed) in [("ok-id", true), (huge.as_str(), false), ("forged\nERROR line", false)] {
            let value = serde_json::json!({"command_id": id, "message": "BulkRetain"}).to_string();
            let reply = handle(
                &backend,
                &auth,
                value.as_bytes(),
                (None, None),
                &mut shutdown,
                &metrics,
                Replies { limit: 1 << 20, progress: None },
            )
            .await
            .unwrap();
            assert_eq!(reply.status, Status::Rejected);
            assert_eq!(reply.error.as_ref().map(|e| e.code.as_str()), Some("Unauthorized"));
            assert_eq!(reply.command_id.as_deref(), echoed.then_some(id), "{}", loggable(id));
            assert_eq!(reply.message.as_deref(), Some("BulkRetain"));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
