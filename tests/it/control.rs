//! The control topic end to end: every message against both sinks, replays
//! of retained and purged records, at-most-once execution, signatures,
//! hostile criteria, and a kill in the middle of BulkRetain and PurgeRetainedContent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use copilot_ingest::config::{Config, Secret};
use copilot_ingest::metrics::Metrics;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value as Json, json};

use crate::common::*;

const ENTITY: &str = "msdyn_copilotinteraction";

fn fetch(filter: &str) -> String {
    format!("<fetch><entity name='{ENTITY}'><filter>{filter}</filter></entity></fetch>")
}

async fn open_backend(config: &Config, metrics: &Arc<Metrics>) -> Arc<copilot_ingest::backend::Backend> {
    let url = config.sink_url().unwrap();
    Arc::new(copilot_ingest::backend::Backend::open(&url, &config.kafka.topic, 2, metrics).await.unwrap())
}

/// Runs the control consumer in-process.
pub(super) struct ControlService {
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ControlService {
    pub(super) async fn start(config: Config) -> ControlService {
        let metrics = Arc::new(Metrics::new());
        let (stop, rx) = tokio::sync::watch::channel(false);
        let brokers = config.kafka.brokers.clone();
        let backend = open_backend(&config, &metrics).await;
        let task = tokio::spawn(copilot_ingest::transport::control::consumer::run(
            config,
            brokers,
            backend,
            Arc::clone(&metrics),
            rx,
        ));
        ControlService { metrics, stop, task }
    }

    fn handled(&self) -> u64 {
        Metrics::total(&self.metrics.control_commands_total)
    }

    pub(super) async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }
}

/// Publishes commands and reads their replies.
pub(super) struct ControlClient {
    producer: FutureProducer,
    replies: BaseConsumer,
    topic: String,
}

impl ControlClient {
    pub(super) fn new(kafka: &TestKafka) -> ControlClient {
        let producer = ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap).create().unwrap();
        let replies: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap)
            .set("group.id", unique("reply-reader"))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&kafka.config.kafka.control_reply_topic, 0, Offset::Beginning).unwrap();
        replies.assign(&tpl).unwrap();
        ControlClient { producer, replies, topic: kafka.config.kafka.control_topic.clone() }
    }

    /// Publishes a command signed with the test key.
    async fn publish(&self, command: &Json) {
        let body = command.to_string();
        self.publish_with(command, Some(signed(body.as_bytes()))).await;
    }

    /// Publishes a command with exactly these headers.
    async fn publish_with(&self, command: &Json, headers: Option<OwnedHeaders>) {
        let body = command.to_string();
        let key = command["command_id"].as_str().unwrap_or("").to_owned();
        let mut record = FutureRecord::to(&self.topic).key(&key).payload(&body);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        self.producer.send(record, Duration::from_secs(10)).await.unwrap();
    }

    /// The next reply with this command id (replies to other ids are skipped).
    fn reply(&self, command_id: &str, timeout: Duration) -> Json {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = self.replies.poll(Duration::from_millis(100))
                && m.key() == Some(command_id.as_bytes())
            {
                let reply: Json = serde_json::from_slice(m.payload().unwrap()).unwrap();
                // Progress of a long command; the final reply follows.
                if reply["status"] != "InProgress" {
                    return reply;
                }
            }
        }
        panic!("no reply for {command_id}");
    }

    pub(super) async fn call(&self, message: &str, parameters: Json) -> Json {
        let id = uuid::Uuid::new_v4().to_string();
        self.publish(&json!({"command_id": id, "message": message, "parameters": parameters})).await;
        self.reply(&id, Duration::from_secs(60))
    }
}

pub(super) fn count(reply: &Json) -> i64 {
    reply["response"]["EntityCountCollection"][ENTITY].as_i64().unwrap_or(-1)
}

/// Counts rows in whichever sink `url` names.
pub(super) async fn query_i64(url: &str, sql: &str) -> i64 {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    } else {
        let client = copilot_ingest::backend::postgres::connect(url).await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }
}

/// Events: `old` with an overriddencreatedon in 2020, `recent` without.
pub(super) fn events(seed: u64, old: usize, recent: usize) -> Workload {
    let mut messages = Vec::new();
    for i in 0..old + recent {
        let mut e = json!({"msdyn_name": format!("event {seed}-{i}"), "msdyn_scenariorequestid": format!("req-{i}"),
                           "msdyn_interactiontype": "ThumbsUp", "msdyn_scenariotype": "Copilot",
                           "msdyn_clienttimestamp": format!("2024-01-01T00:00:{:02}.{:03}Z", i % 60, i)});
        if i < old {
            e["overriddencreatedon"] = json!("2020-01-01T00:00:00Z");
        }
        messages.push((format!("k{i}"), e.to_string().into_bytes()));
    }
    let expected = vec![None; messages.len()];
    Workload { messages, expected }
}

pub(super) async fn sink_urls() -> (Vec<String>, Option<PgDb>, std::path::PathBuf) {
    let (dir, sqlite) = temp_sqlite();
    let db = PgDb::create().await;
    let mut urls = vec![sqlite];
    if let Some(db) = &db {
        urls.push(db.url.clone());
    }
    (urls, db, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_works_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(2);
        let config = kafka.config_with_sink(&url);
        let pipeline = RunningPipeline::start(config.clone());
        let control = ControlService::start(config.clone()).await;
        let client = ControlClient::new(&kafka);
        let workload = events(1, 30, 20);
        kafka.produce(&workload.messages).await;
        pipeline.wait_handled(50, Duration::from_secs(60)).await;
        let table = ENTITY;

        // ValidateRetentionConfig: checks, changes nothing.
        let ok = client.call("ValidateRetentionConfig", json!({"EntityName": ENTITY, "FetchXml": fetch("<condition attribute='createdon' operator='olderthan-x-days' value='365'/>")})).await;
        assert_eq!(
            (ok["status"].as_str(), ok["response"]["IsValidationSuccessful"].as_bool()),
            (Some("Succeeded"), Some(true)),
            "{url}: {ok}"
        );
        let bad = client.call("ValidateRetentionConfig", json!({"EntityName": ENTITY, "FetchXml": fetch("<condition attribute='nope' operator='eq' value='1'/>")})).await;
        assert_eq!(bad["response"]["IsValidationSuccessful"], false);
        assert!(bad["response"]["ErrorMessage"].as_str().unwrap().contains("nope"));

        // BulkRetain, page by page.
        let versions_before =
            query_i64(&url, &format!("SELECT CAST(COALESCE(SUM(versionnumber), 0) AS BIGINT) FROM {table}")).await;
        let retain = client
            .call("BulkRetain", json!({"EntityName": ENTITY, "PageSize": 7, "FetchXml": fetch("<condition attribute='createdon' operator='olderthan-x-days' value='365'/>")}))
            .await;
        assert_eq!(retain["status"], "Succeeded", "{url}: {retain}");
        assert_eq!(count(&retain), 30);
        assert_eq!(retain["response"]["HasMoreRecords"], false);
        let bulk_op = retain["response"]["OperationId"].as_str().unwrap().to_owned();
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table} WHERE msft_datastate = 1")).await, 30);
        assert!(
            query_i64(&url, &format!("SELECT CAST(COALESCE(SUM(versionnumber), 0) AS BIGINT) FROM {table}")).await
                > versions_before,
            "versionnumber increases"
        );
        assert_eq!(
            query_i64(
                &url,
                "SELECT count(*) FROM copilot_ingest_retention_operation WHERE status = 'Succeeded' AND total = 30"
            )
            .await,
            1
        );

        // Retained records are read-only: replayed events change nothing.
        let retained_versions = query_i64(
            &url,
            &format!("SELECT CAST(SUM(versionnumber) AS BIGINT) FROM {table} WHERE msft_datastate = 1"),
        )
        .await;
        kafka.produce(&workload.messages[..30]).await;
        pipeline.wait_handled(80, Duration::from_secs(60)).await;
        assert_eq!(pipeline.skipped(), 30);
        assert_eq!(
            query_i64(
                &url,
                &format!("SELECT CAST(SUM(versionnumber) AS BIGINT) FROM {table} WHERE msft_datastate = 1")
            )
            .await,
            retained_versions
        );
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table}")).await, 50);

        // Retain one record, then roll that operation back.
        let target = query_text(
            &url,
            &format!(
                "SELECT msdyn_copilotinteractionid FROM {table} WHERE msft_datastate = 0 ORDER BY msdyn_name LIMIT 1"
            ),
        )
        .await;
        let one = client.call("Retain", json!({"Target": target})).await;
        assert_eq!((one["status"].as_str(), count(&one)), (Some("Succeeded"), 1), "{one}");
        let again = client.call("Retain", json!({"Target": target})).await;
        assert_eq!(again["status"], "Failed");
        assert_eq!(again["error"]["code"], "AlreadyRetained");
        let missing = client.call("Retain", json!({"Target": uuid::Uuid::new_v4().to_string()})).await;
        assert_eq!(missing["error"]["code"], "0x80040217");
        let rollback = client.call("RollbackRetain", json!({"OperationId": one["response"]["OperationId"]})).await;
        assert_eq!((rollback["status"].as_str(), count(&rollback)), (Some("Succeeded"), 1), "{rollback}");
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table} WHERE msft_datastate = 1")).await, 30);

        // Purge: retained records go, tombstones stay, replays never recreate them.
        let live_before = query_i64(&url, &format!("SELECT count(*) FROM {table} WHERE msft_datastate = 0")).await;
        let purge = client.call("PurgeRetainedContent", json!({"EntityName": ENTITY, "PageSize": 8})).await;
        assert_eq!((purge["status"].as_str(), count(&purge)), (Some("Succeeded"), 30), "{url}: {purge}");
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table}")).await, live_before);
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table}_tombstone")).await, 30);
        kafka.produce(&workload.messages[..30]).await;
        pipeline.wait_handled(110, Duration::from_secs(60)).await;
        assert_eq!(pipeline.metrics.records_skipped_total.with_label_values(&["purged_replay"]).get(), 30);
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table}")).await, live_before);

        // A purge is not a retention: its record of deletions cannot be rolled back.
        let purge_op = purge["response"]["OperationId"].as_str().unwrap().to_owned();
        let refused = client.call("RollbackRetain", json!({"OperationId": purge_op})).await;
        assert_eq!(
            (refused["status"].as_str(), refused["error"]["code"].as_str()),
            (Some("Failed"), Some("NotRollbackable")),
            "{url}: {refused}"
        );
        assert_eq!(
            query_i64(&url, "SELECT count(*) FROM copilot_ingest_retention_operation WHERE status = 'Succeeded' AND total = 30 AND message = 'PurgeRetainedContent'").await,
            1,
            "{url}: the purge's record is unchanged"
        );

        // Rolling back the purged operation restores nothing and says so.
        let late = client.call("RollbackRetain", json!({"OperationId": bulk_op})).await;
        assert_eq!(count(&late), 0);
        assert_eq!(late["response"]["FailedRecordCount"], 30);

        // MaxVersionToPurge: only retained records at or below the version go.
        let retain_rest = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": fetch("<condition attribute='msdyn_name' operator='like' value='event%'/>")})).await;
        assert_eq!(count(&retain_rest), 20);
        let purge_none =
            client.call("PurgeRetainedContent", json!({"EntityName": ENTITY, "MaxVersionToPurge": 0})).await;
        assert_eq!(count(&purge_none), 0);
        assert_eq!(query_i64(&url, &format!("SELECT count(*) FROM {table}")).await, 20);

        // Unknown messages and bad parameters are Rejected and change nothing.
        let unknown = client.call("DropEverything", json!({})).await;
        assert_eq!(
            (unknown["status"].as_str(), unknown["error"]["code"].as_str()),
            (Some("Rejected"), Some("UnknownMessage"))
        );
        let bad_xml = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": "<fetch>"})).await;
        assert_eq!(
            (bad_xml["status"].as_str(), bad_xml["error"]["code"].as_str()),
            (Some("Rejected"), Some("InvalidFetchXml"))
        );

        let succeeded: u64 =
            ["ValidateRetentionConfig", "BulkRetain", "Retain", "RollbackRetain", "PurgeRetainedContent"]
                .iter()
                .map(|m| control.metrics.control_commands_total.with_label_values(&[m, "Succeeded"]).get())
                .sum();
        assert_eq!(succeeded, 9, "{url}");
        assert_eq!(control.metrics.retention_records_total.with_label_values(&["purged"]).get(), 30);
        control.stop().await;
        pipeline.stop().await;
    }
}

pub(super) async fn query_text(url: &str, sql: &str) -> String {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    } else {
        let client = copilot_ingest::backend::postgres::connect(url).await.unwrap();
        let sql = sql.replace("SELECT msdyn_copilotinteractionid ", "SELECT msdyn_copilotinteractionid::text ");
        client.query_one(&sql, &[]).await.unwrap().get(0)
    }
}

/// A command id runs once: re-sending it returns the stored reply, and two
/// instances sharing the control topic execute each command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_id_executes_once_across_instances() {
    let kafka = TestKafka::new(1);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let pipeline = RunningPipeline::start(config.clone());
    kafka.produce(&events(2, 40, 0).messages).await;
    pipeline.wait_handled(40, Duration::from_secs(60)).await;
    let first = ControlService::start(config.clone()).await;
    let second = ControlService::start(config.clone()).await;
    let client = ControlClient::new(&kafka);

    let command = json!({"command_id": "bulk-1", "message": "BulkRetain",
        "parameters": {"EntityName": ENTITY, "PageSize": 10, "FetchXml": fetch("<condition attribute='msdyn_name' operator='like' value='event 2-1%'/>")}});
    client.publish(&command).await;
    let reply = client.reply("bulk-1", Duration::from_secs(60));
    assert_eq!(count(&reply), 11);
    // The same id again, after more records match: the stored reply, no second run.
    client.publish(&command).await;
    let again = client.reply("bulk-1", Duration::from_secs(60));
    assert_eq!(again, reply);
    assert_eq!(query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1").await, 11);
    assert_eq!(query_i64(&url, "SELECT total FROM copilot_ingest_retention_operation").await, 11);

    for i in 0..5 {
        client.call("ValidateRetentionConfig", json!({"EntityName": ENTITY, "FetchXml": fetch(&format!("<condition attribute='importsequencenumber' operator='eq' value='{i}'/>"))})).await;
    }
    // A command whose offset was not committed when the second instance's
    // join moved the partition is handled again (answered from the stored
    // reply, as above), so the count is at least one per command; execution
    // once per id is what the retention totals above prove.
    wait_for("every command counted", Duration::from_secs(60), || first.handled() + second.handled() >= 7).await;
    first.stop().await;
    second.stop().await;
    pipeline.stop().await;
}

/// Two instances handed the same command at once (here: two consumer groups
/// on one topic, as after restoring a deployment) claim it in the database:
/// one executes, the other returns its stored reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_both_execute_one_command_id() {
    let Some(db) = PgDb::create().await else { return };
    const ROWS: usize = 300;
    let kafka = TestKafka::new(1);
    let config = kafka.config_with_sink(&db.url);
    let pipeline = RunningPipeline::start(config.clone());
    kafka.produce(&events(7, ROWS, 1).messages).await;
    pipeline.wait_handled(ROWS as u64 + 1, Duration::from_secs(60)).await;
    let mut other_group = config.clone();
    other_group.kafka.group_id = unique("other-deployment");
    let first = ControlService::start(config).await;
    let second = ControlService::start(other_group).await;
    // Both consumers are ready before the command goes out, so both race for it.
    let client = ControlClient::new(&kafka);
    for i in 0..2 {
        client.call("ValidateRetentionConfig", json!({"EntityName": ENTITY, "FetchXml": fetch(&format!("<condition attribute='importsequencenumber' operator='eq' value='{i}'/>"))})).await;
    }
    wait_for("both instances consuming", Duration::from_secs(60), || first.handled() >= 2 && second.handled() >= 2)
        .await;

    let bulk = json!({"command_id": "race-bulk", "message": "BulkRetain", "parameters": {"EntityName": ENTITY, "PageSize": 1,
        "FetchXml": fetch("<condition attribute='createdon' operator='olderthan-x-days' value='365'/>")}});
    client.publish(&bulk).await;
    let a = client.reply("race-bulk", Duration::from_secs(120));
    let b = client.reply("race-bulk", Duration::from_secs(120));
    assert_eq!(a, b, "both instances answer with the one execution's reply");
    assert_eq!(count(&a), ROWS as i64, "{a}");

    let target = query_text(
        &db.url,
        "SELECT msdyn_copilotinteractionid FROM msdyn_copilotinteraction WHERE msft_datastate = 0 LIMIT 1",
    )
    .await;
    client.publish(&json!({"command_id": "race-retain", "message": "Retain", "parameters": {"Target": target}})).await;
    let a = client.reply("race-retain", Duration::from_secs(60));
    let b = client.reply("race-retain", Duration::from_secs(60));
    assert_eq!((a["status"].as_str(), b["status"].as_str()), (Some("Succeeded"), Some("Succeeded")), "{a} / {b}");
    assert_eq!(
        query_i64(&db.url, "SELECT count(*) FROM copilot_ingest_retention_operation WHERE command_id LIKE 'race-%'")
            .await,
        2
    );
    assert_eq!(
        query_i64(&db.url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1").await,
        ROWS as i64 + 1
    );
    first.stop().await;
    second.stop().await;
    pipeline.stop().await;
}

/// Commands run only when signed with the key, freshly; without a key, only
/// with `allow_unsigned`. A refused id is not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_only_when_signed_fresh_or_explicitly_allowed() {
    let kafka = TestKafka::new(1);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    copilot_ingest::backend::sqlite::migrate(
        &copilot_ingest::backend::sqlite::open_connection(std::path::Path::new(url.trim_start_matches("sqlite://")))
            .unwrap(),
    )
    .unwrap();
    let control = ControlService::start(config.clone()).await;
    let client = ControlClient::new(&kafka);
    let command = |id: &str| json!({"command_id": id, "message": "ValidateRetentionConfig", "parameters": {"EntityName": ENTITY, "FetchXml": fetch("")}});
    let body = |id: &str| command(id).to_string();
    let outcome = |r: &Json| (r["status"].as_str().map(str::to_owned), r["error"]["code"].as_str().map(str::to_owned));
    let rejected = |code: &str| (Some("Rejected".to_owned()), Some(code.to_owned()));
    let now = chrono::Utc::now().timestamp();
    let headers = |ts: i64, sig: &str| {
        let ts = ts.to_string();
        OwnedHeaders::new()
            .insert(Header { key: "x-signature-timestamp", value: Some(ts.as_str()) })
            .insert(Header { key: "x-signature", value: Some(sig) })
    };

    client.publish_with(&command("unsigned"), None).await;
    assert_eq!(outcome(&client.reply("unsigned", Duration::from_secs(60))), rejected("Unauthorized"));

    let wrong =
        copilot_ingest::transport::control::sign("another-key-another-key-another-key", now, body("wrong").as_bytes());
    client.publish_with(&command("wrong"), Some(headers(now, &wrong))).await;
    assert_eq!(outcome(&client.reply("wrong", Duration::from_secs(30))), rejected("InvalidSignature"));

    // The value alone signed, as before timestamps were bound: refused.
    let value_only = copilot_ingest::transport::control::sign(TEST_HMAC_KEY, now, body("value-only").as_bytes());
    client
        .publish_with(
            &command("value-only"),
            Some(OwnedHeaders::new().insert(Header { key: "x-signature", value: Some(value_only.as_str()) })),
        )
        .await;
    assert_eq!(outcome(&client.reply("value-only", Duration::from_secs(30))), rejected("Unauthorized"));

    // A captured command replayed six minutes later: refused.
    let stale_at = now - 360;
    let stale = copilot_ingest::transport::control::sign(TEST_HMAC_KEY, stale_at, body("stale").as_bytes());
    client.publish_with(&command("stale"), Some(headers(stale_at, &stale))).await;
    assert_eq!(outcome(&client.reply("stale", Duration::from_secs(30))), rejected("InvalidSignature"));

    client.publish(&command("good")).await;
    let r = client.reply("good", Duration::from_secs(30));
    assert_eq!(r["status"], "Succeeded", "{r}");
    // A refused id is not remembered: the genuine command with that id still runs.
    client.publish(&command("unsigned")).await;
    assert_eq!(client.reply("unsigned", Duration::from_secs(30))["status"], "Succeeded");
    control.stop().await;

    // No key: unsigned commands are refused unless the operator opted in.
    let mut keyless = config.clone();
    keyless.control.hmac_key = Secret::default();
    let control = ControlService::start(keyless.clone()).await;
    client.publish_with(&command("keyless"), None).await;
    assert_eq!(outcome(&client.reply("keyless", Duration::from_secs(60))), rejected("Unauthorized"));
    control.stop().await;
    keyless.control.allow_unsigned = true;
    let control = ControlService::start(keyless).await;
    client.publish_with(&command("opted-in"), None).await;
    assert_eq!(client.reply("opted-in", Duration::from_secs(60))["status"], "Succeeded");
    control.stop().await;
}

/// Quotes and SQL in values match nothing; the table is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_criteria_are_inert_or_rejected() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(1);
        let config = kafka.config_with_sink(&url);
        let pipeline = RunningPipeline::start(config.clone());
        kafka.produce(&events(3, 10, 0).messages).await;
        pipeline.wait_handled(10, Duration::from_secs(60)).await;
        let control = ControlService::start(config).await;
        let client = ControlClient::new(&kafka);
        for value in
            ["&apos; OR 1=1 --", "x&apos;; DROP TABLE msdyn_copilotinteraction; --", "&quot; OR &quot;&quot;=&quot;"]
        {
            let r = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": fetch(&format!("<condition attribute='msdyn_name' operator='eq' value='{value}'/>"))})).await;
            assert_eq!((r["status"].as_str(), count(&r)), (Some("Succeeded"), 0), "{url}: {r}");
        }
        // An empty `or` matches nothing; an empty `and` and the whole table are refused without AllowAll.
        let r = client
            .call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": fetch("<filter type='or'></filter>")}))
            .await;
        assert_eq!((r["status"].as_str(), count(&r)), (Some("Succeeded"), 0), "{url}: {r}");
        for whole in [fetch(""), format!("<fetch><entity name='{ENTITY}'/></fetch>")] {
            let r = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": whole})).await;
            assert_eq!(
                (r["status"].as_str(), r["error"]["code"].as_str()),
                (Some("Rejected"), Some("InvalidFetchXml")),
                "{url}: {r}"
            );
            let r = client.call("PurgeRetainedContent", json!({"EntityName": ENTITY, "FetchXml": whole})).await;
            assert_eq!(r["status"], "Rejected", "{url}: {r}");
        }
        let entity_bomb = "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><fetch><entity name='msdyn_copilotinteraction'/></fetch>";
        let r = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": entity_bomb})).await;
        assert_eq!(r["status"], "Rejected");
        let deep = format!(
            "<fetch><entity name='{ENTITY}'>{}{}</entity></fetch>",
            "<filter>".repeat(10_000),
            "</filter>".repeat(10_000)
        );
        let r = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": deep})).await;
        assert_eq!(r["status"], "Rejected");
        let huge = format!("<fetch><entity name='{ENTITY}'><!--{}--></entity></fetch>", "x".repeat(200_000));
        let r = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": huge})).await;
        assert_eq!(r["status"], "Rejected");
        assert_eq!(
            query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 0").await,
            10,
            "{url}"
        );
        control.stop().await;
        pipeline.stop().await;
    }
}

/// PostgreSQL: purges and replays of the same ids run at the same time, round
/// after round; a purged id never comes back as a row. Each purge deletes its
/// rows in one page while the replays stream in small batches, so replayed
/// inserts meet rows the purge has deleted but not yet committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purges_and_replays_never_resurrect_a_purged_id() {
    let Some(db) = PgDb::create().await else { return };
    const N: usize = 3000;
    const ROUNDS: u64 = 3;
    let kafka = TestKafka::new(4);
    let mut config = kafka.config_with_sink(&db.url);
    config.batch.max_records = 20;
    config.batch.linger_ms = 1;
    let pipeline = RunningPipeline::start(config.clone());
    let control = ControlService::start(config).await;
    let client = ControlClient::new(&kafka);
    let mut handled = 0u64;
    let mut resurrected = 0;
    for round in 0..ROUNDS {
        let seed = 100 + round;
        let workload = events(seed, N, 0);
        let ours = fetch(&format!("<condition attribute='msdyn_name' operator='like' value='event {seed}-%'/>"));
        kafka.produce(&workload.messages).await;
        handled += N as u64;
        pipeline.wait_handled(handled, Duration::from_secs(120)).await;
        let retain = client.call("BulkRetain", json!({"EntityName": ENTITY, "FetchXml": ours})).await;
        assert_eq!(count(&retain), N as i64, "{retain}");

        let purge_id = format!("purge-{round}");
        let purge = json!({"command_id": purge_id, "message": "PurgeRetainedContent",
            "parameters": {"EntityName": ENTITY, "PageSize": N, "FetchXml": ours}});
        let replay = async {
            for chunk in workload.messages.chunks(100) {
                kafka.produce(chunk).await;
            }
        };
        let purge_soon = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.publish(&purge).await;
        };
        tokio::join!(purge_soon, replay);
        let reply = client.reply(&purge_id, Duration::from_secs(60));
        assert_eq!(count(&reply), N as i64, "{reply}");
        handled += N as u64;
        pipeline.wait_handled(handled, Duration::from_secs(120)).await;
        resurrected += query_i64(
            &db.url,
            &format!("SELECT count(*) FROM msdyn_copilotinteraction WHERE msdyn_name LIKE 'event {seed}-%'"),
        )
        .await;
    }
    eprintln!(
        "purged_replay skips: {}",
        pipeline.metrics.records_skipped_total.with_label_values(&["purged_replay"]).get()
    );
    assert_eq!(resurrected, 0, "purged ids re-created by replays that raced the purge");
    assert_eq!(
        query_i64(&db.url, "SELECT count(*) FROM msdyn_copilotinteraction_tombstone").await,
        (ROUNDS as usize * N) as i64
    );
    control.stop().await;
    pipeline.stop().await;
}

/// The dead-letter ledger and stored replies are pruned by age; tombstones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_ledger_entries_and_replies_are_pruned_and_tombstones_kept() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(1);
        let config = kafka.config_with_sink(&url);
        let pipeline = RunningPipeline::start(config.clone());
        kafka.produce(&events(9, 3, 0).messages).await;
        pipeline.wait_handled(3, Duration::from_secs(60)).await;
        pipeline.stop().await;
        let (old, new) = ("2020-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z");
        let statements = [
            format!(
                "INSERT INTO copilot_ingest_dead_letters (ingest_topic, ingest_partition, ingest_offset, message_digest, sent_at) VALUES ('t', 0, 1, 'a', '{old}'), ('t', 0, 2, 'b', '{new}')"
            ),
            format!(
                "INSERT INTO copilot_ingest_control_reply (command_id, message, reply, created_on) VALUES ('old', 'Retain', '{{}}', '{old}'), ('new', 'Retain', '{{}}', '{new}')"
            ),
            format!(
                "INSERT INTO msdyn_copilotinteraction_tombstone (msdyn_copilotinteractionid, purgedon) VALUES ('{}', '{old}')",
                uuid::Uuid::new_v4()
            ),
        ];
        for sql in &statements {
            if let Some(path) = url.strip_prefix("sqlite://") {
                rusqlite::Connection::open(path).unwrap().execute(sql, []).unwrap();
            } else {
                copilot_ingest::backend::postgres::connect(&url)
                    .await
                    .unwrap()
                    .execute(sql.as_str(), &[])
                    .await
                    .unwrap();
            }
        }
        let backend = open_backend(&config, &Arc::new(Metrics::new())).await;
        let pruned = backend.prune(chrono::Utc::now() - chrono::Duration::hours(168)).await.unwrap();
        assert_eq!(pruned, (1, 1), "{url}");
        assert_eq!(
            query_i64(&url, "SELECT count(*) FROM copilot_ingest_dead_letters WHERE ingest_offset = 2").await,
            1
        );
        assert_eq!(query_i64(&url, "SELECT count(*) FROM copilot_ingest_control_reply").await, 1);
        assert_eq!(query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction_tombstone").await, 1, "{url}");
    }
}
