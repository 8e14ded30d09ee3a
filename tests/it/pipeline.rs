//! The pipeline against the in-process broker, with both sinks: counts,
//! normalized values, dead letters, offsets, replays, refused records, outages.

use std::collections::HashMap;
use std::time::Duration;

use copilot_ingest::config::Config;
use copilot_ingest::metrics::Metrics;
use copilot_ingest::reason::Reason;

use crate::common::*;
use crate::observability::http_get;

const LONG: Duration = Duration::from_secs(90);

fn sqlite_count(url: &str, sql: &str) -> i64 {
    let path = url.trim_start_matches("sqlite://");
    let conn = rusqlite::Connection::open(path).expect("open sqlite");
    conn.query_row(sql, [], |r| r.get(0)).expect("query")
}

async fn pg_count(db: &PgDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.expect("query").get(0)
}

/// Every invalid event is one DLQ message with the reason and source headers.
fn check_dead_letters(kafka: &TestKafka, workload: &Workload, positions: &[(i32, i64)]) {
    let dlq = kafka.read_dlq(workload.invalid());
    assert_eq!(dlq.len(), workload.invalid(), "one DLQ message per invalid event");
    let mut expected: HashMap<(i32, i64), Reason> = HashMap::new();
    for (pos, reason) in positions.iter().zip(&workload.expected) {
        if let Some(r) = reason {
            expected.insert(*pos, *r);
        }
    }
    for m in &dlq {
        let partition: i32 = header(m, "x-ingest-source-partition").unwrap().parse().unwrap();
        let offset: i64 = header(m, "x-ingest-source-offset").unwrap().parse().unwrap();
        let reason = header(m, "x-ingest-error-reason").unwrap();
        assert_eq!(
            Some(reason.as_str()),
            expected.get(&(partition, offset)).map(|r| r.code()),
            "at {partition}/{offset}"
        );
        assert_eq!(header(m, "x-ingest-source-topic").as_deref(), Some(kafka.config.kafka.topic.as_str()));
        assert!(header(m, "x-ingest-error-message").is_some_and(|s| !s.is_empty()));
        assert!(header(m, "x-ingest-error-field").is_some());
        // The original value travels unchanged.
        let i = positions.iter().position(|p| *p == (partition, offset)).unwrap();
        use rdkafka::Message;
        assert_eq!(m.payload(), Some(workload.messages[i].1.as_slice()));
        assert_eq!(m.key(), Some(workload.messages[i].0.as_bytes()));
    }
}

async fn assert_committed_at_log_end(kafka: &TestKafka) {
    let end = kafka.log_end();
    let committed = kafka.committed();
    assert_eq!(committed, end, "committed offsets must equal the log end");
}

async fn run_workload(config: Config, workload: &Workload, kafka: &TestKafka) -> (Vec<(i32, i64)>, RunningPipeline) {
    let pipeline = RunningPipeline::start(config);
    let positions = kafka.produce(&workload.messages).await;
    pipeline.wait_handled(workload.messages.len() as u64, LONG).await;
    (positions, pipeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_valid_events_and_dead_letters_invalid_ones() {
    let kafka = TestKafka::new(3);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let workload = Workload::generate(11, 3000, 0.1);
    let (positions, pipeline) = run_workload(config, &workload, &kafka).await;
    assert_eq!(pipeline.written(), workload.valid() as u64);
    assert!(pipeline.readiness.is_ready(), "ready while assigned, broker and sink reachable");
    pipeline.stop().await;

    let table = "msdyn_copilotinteraction";
    assert_eq!(sqlite_count(&url, &format!("SELECT count(*) FROM {table}")), workload.valid() as i64);
    assert_eq!(
        sqlite_count(&url, &format!("SELECT count(DISTINCT msdyn_copilotinteractionid) FROM {table}")),
        workload.valid() as i64
    );
    // Normalized values: option sets as integers, lowercase GUIDs, UTC datetimes, active state.
    assert_eq!(
        sqlite_count(
            &url,
            &format!(
                "SELECT count(*) FROM {table} WHERE msdyn_interactiontype NOT BETWEEN 100230301 AND 100230309 OR msdyn_scenariotype NOT BETWEEN 100230201 AND 100230206"
            )
        ),
        0
    );
    assert_eq!(
        sqlite_count(
            &url,
            &format!("SELECT count(*) FROM {table} WHERE statecode <> 0 OR statuscode <> 1 OR msft_datastate <> 0")
        ),
        0
    );
    assert_eq!(
        sqlite_count(
            &url,
            &format!(
                "SELECT count(*) FROM {table} WHERE msdyn_copilotinteractionid <> lower(msdyn_copilotinteractionid) OR length(msdyn_copilotinteractionid) <> 36"
            )
        ),
        0
    );
    assert_eq!(
        sqlite_count(
            &url,
            &format!("SELECT count(*) FROM {table} WHERE msdyn_clienttimestamp NOT LIKE '____-__-__T__:__:__.___Z'")
        ),
        0
    );
    assert_eq!(
        sqlite_count(
            &url,
            &format!(
                "SELECT count(*) FROM {table} WHERE msdyn_interactiondataid IS NOT NULL AND (msdyn_interactiondataid LIKE '{{%' OR msdyn_interactiondataid <> lower(msdyn_interactiondataid))"
            )
        ),
        0
    );
    assert_eq!(
        sqlite_count(&url, &format!("SELECT count(DISTINCT versionnumber) FROM {table}")),
        workload.valid() as i64
    );
    // Every row knows where it came from.
    assert_eq!(
        sqlite_count(
            &url,
            &format!(
                "SELECT count(*) FROM {table} WHERE ingest_topic = '{}' AND ingest_offset >= 0",
                kafka.config.kafka.topic
            )
        ),
        workload.valid() as i64
    );

    check_dead_letters(&kafka, &workload, &positions);
    assert_committed_at_log_end(&kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_valid_events_and_dead_letters_invalid_ones() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(4);
    let config = kafka.config_with_sink(&db.url);
    let workload = Workload::generate(12, 3000, 0.1);
    let (positions, pipeline) = run_workload(config, &workload, &kafka).await;
    assert_eq!(pipeline.written(), workload.valid() as u64);
    pipeline.stop().await;

    let table = "msdyn_copilotinteraction";
    assert_eq!(pg_count(&db, &format!("SELECT count(*) FROM {table}")).await, workload.valid() as i64);
    assert_eq!(
        pg_count(&db, &format!("SELECT count(DISTINCT msdyn_copilotinteractionid) FROM {table}")).await,
        workload.valid() as i64
    );
    assert_eq!(
        pg_count(
            &db,
            &format!("SELECT count(*) FROM {table} WHERE statecode <> 0 OR statuscode <> 1 OR msft_datastate <> 0")
        )
        .await,
        0
    );
    assert_eq!(
        pg_count(&db, &format!("SELECT count(DISTINCT versionnumber) FROM {table}")).await,
        workload.valid() as i64
    );
    check_dead_letters(&kafka, &workload, &positions);
    assert_committed_at_log_end(&kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores_exactly_the_normalized_values() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(1);
    let config = kafka.config_with_sink(&db.url);
    let event = serde_json::json!({
        "msdyn_name": "Thumbs up on summary",
        "msdyn_scenariorequestid": "req-42",
        "msdyn_interactiontype": "thumbs up",
        "msdyn_scenariotype": "CASE_SUMMARY",
        "msdyn_clienttimestamp": "2024-06-01T12:30:00+02:00",
        "msdyn_interactioncontext": {"a": 1, "b": "x"},
        "msdyn_interactiondataid": "{8A3C9D5E-1F2A-4B3C-8D4E-5F6A7B8C9D0E}",
        "msdyn_interactionforid": "CAS-01234",
        "msdyn_interactionforlogicalname": "incident",
        "msdyn_copilotinteractionid": "{0B5C6A3E-1D2F-4A5B-8C7D-9E0F1A2B3C4D}",
        "overriddencreatedon": "2024-06-01",
        "importsequencenumber": 7,
        "timezoneruleversionnumber": 0,
        "utcconversiontimezonecode": 85
    });
    let workload = Workload { messages: vec![("k".into(), event.to_string().into_bytes())], expected: vec![None] };
    let (_, pipeline) = run_workload(config, &workload, &kafka).await;
    pipeline.stop().await;
    let row = db
        .client()
        .await
        .query_one(
            "SELECT msdyn_copilotinteractionid::text, msdyn_name, msdyn_interactiontype, msdyn_scenariotype,
                    to_char(msdyn_clienttimestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), msdyn_interactioncontext,
                    msdyn_interactiondataid::text, msdyn_interactionforid, to_char(createdon AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
                    importsequencenumber, timezoneruleversionnumber, utcconversiontimezonecode, statecode, statuscode
             FROM msdyn_copilotinteraction",
            &[],
        )
        .await
        .expect("one row");
    assert_eq!(row.get::<_, String>(0), "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d");
    assert_eq!(row.get::<_, String>(1), "Thumbs up on summary");
    assert_eq!(row.get::<_, i32>(2), 100230301);
    assert_eq!(row.get::<_, i32>(3), 100230205);
    assert_eq!(row.get::<_, String>(4), "2024-06-01 10:30:00");
    assert_eq!(row.get::<_, String>(5), r#"{"a":1,"b":"x"}"#);
    assert_eq!(row.get::<_, String>(6), "8a3c9d5e-1f2a-4b3c-8d4e-5f6a7b8c9d0e");
    assert_eq!(row.get::<_, String>(7), "CAS-01234");
    assert_eq!(row.get::<_, String>(8), "2024-06-01 00:00:00");
    assert_eq!((row.get::<_, i32>(9), row.get::<_, i32>(10), row.get::<_, i32>(11)), (7, 0, 85));
    assert_eq!((row.get::<_, i32>(12), row.get::<_, i32>(13)), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_events_are_skipped_as_replays_in_both_sinks() {
    let db = PgDb::create().await;
    let (_dir, sqlite_url) = temp_sqlite();
    let mut urls = vec![sqlite_url];
    if let Some(db) = &db {
        urls.push(db.url.clone());
    }
    for url in urls {
        let kafka = TestKafka::new(2);
        let mut config = kafka.config_with_sink(&url);
        let workload = Workload::generate(13, 1500, 0.05);
        let (_, first) = run_workload(config.clone(), &workload, &kafka).await;
        assert_eq!(first.written(), workload.valid() as u64);
        let postgres_paths = |metrics: &Metrics| {
            ["copy", "insert"].map(|path| metrics.postgres_batches_total.with_label_values(&[path]).get())
        };
        if !url.starts_with("sqlite") {
            let [copy, insert] = postgres_paths(&first.metrics);
            assert!(copy > 0 && insert == 0, "new rows go in with COPY: {copy} copy, {insert} insert batches");
        }
        first.stop().await;

        // A new group id re-reads the topic from the start: every record is a replay.
        config.kafka.group_id = unique("group-replay");
        let second = RunningPipeline::start(config);
        second.wait_handled(workload.messages.len() as u64, LONG).await;
        assert_eq!(second.written(), 0, "{url}: nothing is written twice");
        let skipped = |reason: &str| second.metrics.records_skipped_total.with_label_values(&[reason]).get();
        assert_eq!(skipped("replay"), workload.valid() as u64, "{url}: replays are counted");
        // The invalid events were dead-lettered by the first run: the ledger
        // keeps the second from sending them again.
        assert_eq!(skipped("dead_letter_replay"), workload.invalid() as u64, "{url}");
        assert_eq!(Metrics::total(&second.metrics.dlq_events_total), 0, "{url}: no dead letter twice");
        if !url.starts_with("sqlite") {
            let [copy, insert] = postgres_paths(&second.metrics);
            assert!(insert > 0 && copy == 0, "replays take the INSERT path: {copy} copy, {insert} insert batches");
        }
        second.stop().await;

        let count = if url.starts_with("sqlite") {
            sqlite_count(&url, "SELECT count(*) FROM msdyn_copilotinteraction")
        } else {
            pg_count(db.as_ref().unwrap(), "SELECT count(*) FROM msdyn_copilotinteraction").await
        };
        assert_eq!(count, workload.valid() as i64, "{url}");
    }
}

/// Same id, different content: the second is a conflict and goes to the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_with_different_content_is_a_conflict() {
    let kafka = TestKafka::new(1);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let id = "5d1c0c8e-7c55-4a8e-9d67-0a4c3e3b9f11";
    let event = |name: &str| {
        serde_json::json!({"msdyn_copilotinteractionid": id, "msdyn_name": name, "msdyn_scenariorequestid": "r",
                           "msdyn_interactiontype": 100230301, "msdyn_scenariotype": 100230201})
        .to_string()
        .into_bytes()
    };
    let workload = Workload {
        messages: vec![("a".into(), event("first")), ("a".into(), event("first")), ("a".into(), event("second"))],
        expected: vec![None, None, Some(Reason::DuplicateIdConflict)],
    };
    let (_, pipeline) = run_workload(config, &workload, &kafka).await;
    assert_eq!(pipeline.written(), 1);
    assert_eq!(pipeline.skipped(), 1);
    pipeline.stop().await;
    let dlq = kafka.read_dlq(1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], "x-ingest-error-reason").as_deref(), Some("duplicate_id_conflict"));
    assert_eq!(sqlite_count(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msdyn_name = 'first'"), 1);
    assert_committed_at_log_end(&kafka).await;
}

/// A record the database refuses: the rest of its batch is written, it alone is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_is_dead_lettered_and_the_rest_of_its_batch_written() {
    let db = PgDb::create().await;
    let (_dir, sqlite_url) = temp_sqlite();
    let mut targets = vec![sqlite_url];
    if let Some(db) = &db {
        targets.push(db.url.clone());
    }
    for url in targets {
        let kafka = TestKafka::new(1);
        let mut config = kafka.config_with_sink(&url);
        config.batch.linger_ms = 2000;
        // The table exists before the run so the test can add a rule that refuses one name.
        if url.starts_with("sqlite") {
            let path = url.trim_start_matches("sqlite://");
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
            let conn = copilot_ingest::backend::sqlite::open_connection(std::path::Path::new(path)).unwrap();
            copilot_ingest::backend::sqlite::migrate(&conn).unwrap();
            conn.execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON msdyn_copilotinteraction WHEN NEW.msdyn_name = 'refuse-me'
                 BEGIN SELECT RAISE(ABORT, 'refused by policy'); END;",
            )
            .unwrap();
        } else {
            let client = db.as_ref().unwrap().client().await;
            copilot_ingest::backend::postgres::migrate(&client).await.unwrap();
            client
                .batch_execute(
                    "ALTER TABLE msdyn_copilotinteraction ADD CONSTRAINT refuse CHECK (msdyn_name <> 'refuse-me')",
                )
                .await
                .unwrap();
        }
        let mut workload = Workload::generate(14, 200, 0.0);
        let bad = serde_json::json!({"msdyn_name": "refuse-me", "msdyn_scenariorequestid": "r",
                                     "msdyn_interactiontype": "Copy", "msdyn_scenariotype": "Copilot",
                                     "msdyn_clienttimestamp": "2024-01-01T00:00:00Z"});
        workload.messages.insert(77, ("bad".into(), bad.to_string().into_bytes()));
        workload.expected.insert(77, Some(Reason::SinkRejected));
        let (positions, pipeline) = run_workload(config, &workload, &kafka).await;
        assert_eq!(pipeline.written(), 200, "{url}");
        assert!(pipeline.metrics.batches_total.with_label_values(&["split"]).get() > 0, "{url}: the batch was split");
        pipeline.stop().await;
        let dlq = kafka.read_dlq(1);
        assert_eq!(dlq.len(), 1, "{url}");
        assert_eq!(header(&dlq[0], "x-ingest-error-reason").as_deref(), Some("sink_rejected"));
        assert_eq!(header(&dlq[0], "x-ingest-source-offset"), Some(positions[77].1.to_string()));
        assert!(header(&dlq[0], "x-ingest-error-message").unwrap().contains("refuse"), "{url}");
        assert_committed_at_log_end(&kafka).await;
    }
}

/// PostgreSQL refuses connections for a while: nothing is lost or duplicated,
/// and no offset is committed past a record that was not yet written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_pauses_without_loss_or_early_commits() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(2);
    let config = kafka.config_with_sink(&db.url);
    let before = Workload::generate(15, 1000, 0.0);
    let (_, pipeline) = run_workload(config, &before, &kafka).await;
    wait_for("offsets committed before the outage", LONG, || kafka.committed().values().sum::<i64>() == 1000).await;

    db.refuse_connections().await;
    let during = Workload::generate(16, 1000, 0.0);
    kafka.produce(&during.messages).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(pipeline.written(), 1000, "nothing can be written during the outage");
    let committed: i64 = kafka.committed().values().sum();
    assert_eq!(committed, 1000, "offsets stay at the last durable record during the outage");
    assert!(pipeline.metrics.batches_total.with_label_values(&["retried"]).get() > 0);

    db.allow_connections().await;
    pipeline.wait_handled(2000, LONG).await;
    pipeline.stop().await;
    assert_eq!(pg_count(&db, "SELECT count(*) FROM msdyn_copilotinteraction").await, 2000);
    assert_eq!(
        pg_count(&db, "SELECT count(DISTINCT msdyn_copilotinteractionid) FROM msdyn_copilotinteraction").await,
        2000
    );
    assert_committed_at_log_end(&kafka).await;
}

/// /metrics reports what the pipeline did; /healthz is liveness; /readyz
/// follows the broker, the sink and the assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_report_metrics_health_and_readiness() {
    let kafka = TestKafka::new(2);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let pipeline = RunningPipeline::start(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop_http, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(copilot_ingest::transport::http::serve(
        listener,
        pipeline.metrics.clone(),
        pipeline.readiness.clone(),
        stop_rx,
    ));

    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let workload = Workload::generate(31, 500, 0.1);
    kafka.produce(&workload.messages).await;
    pipeline.wait_handled(500, LONG).await;
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(value("copilot_ingest_events_received_total"), 500.0);
    assert_eq!(value("copilot_ingest_records_written_total{sink=\"sqlite\"}"), workload.valid() as f64);
    assert_eq!(value("copilot_ingest_events_rejected_total"), workload.invalid() as f64);
    assert_eq!(value("copilot_ingest_dlq_events_total"), workload.invalid() as f64);
    assert_eq!(value("copilot_ingest_batch_records_count"), value("copilot_ingest_batches_total{outcome=\"ok\"}"));
    assert!(metrics.contains("copilot_ingest_build_info{version="));
    assert_eq!(http_get(addr, "/nope").await.0, 404);

    // Readiness drops when the partitions go away.
    pipeline.readiness.assigned.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    pipeline.stop().await;
}

/// Poison never stalls a partition: every reason code interleaved with valid
/// events, an oversized message, binary garbage, empty messages, NUL bytes and
/// invalid UTF-8 are each dead-lettered once; valid events are all written.
/// (The oversized message is 4.2 MB, above the 4 MiB event limit: the mock
/// broker keeps at most ~5 MB per partition, so a 10 MB one cannot exist there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_and_never_stalls_a_partition() {
    let kafka = TestKafka::new(2);
    let (_dir, url) = temp_sqlite();
    let mut config = kafka.config_with_sink(&url);
    // The DLQ refuses records over 2 MB, as a broker with default limits would.
    config.kafka.options.insert("message.max.bytes".into(), copilot_ingest::config::Secret::new("2000000"));
    let mut workload = Workload::generate(71, 400, 0.3);
    let poison: Vec<(Vec<u8>, Reason)> = vec![
        (vec![b'{'; 4_200_000], Reason::PayloadTooLarge),
        ((0..=255u8).cycle().take(3000).collect(), Reason::MalformedJson),
        (Vec::new(), Reason::MalformedJson),
        (b"\0\0\0".to_vec(), Reason::MalformedJson),
        (b"{\"msdyn_name\":\"\xff\xfe\"}".to_vec(), Reason::MalformedJson),
        (b"{\"msdyn_name\":\"nul\\u0000\",\"msdyn_scenariorequestid\":\"r\",\"msdyn_interactiontype\":1,\"msdyn_scenariotype\":1}".to_vec(), Reason::InvalidOption),
    ];
    for (i, (value, reason)) in poison.into_iter().enumerate() {
        let at = 50 * (i + 1);
        workload.messages.insert(at, (format!("poison-{i}"), value));
        workload.expected.insert(at, Some(reason));
    }
    let (positions, pipeline) = run_workload(config, &workload, &kafka).await;
    assert_eq!(pipeline.written(), workload.valid() as u64);
    pipeline.stop().await;
    assert_eq!(sqlite_count(&url, "SELECT count(*) FROM msdyn_copilotinteraction"), workload.valid() as i64);
    let dlq = kafka.read_dlq(workload.invalid());
    assert_eq!(dlq.len(), workload.invalid());
    let big = dlq
        .iter()
        .find(|m| header(m, "x-ingest-error-reason").as_deref() == Some("payload_too_large"))
        .expect("the 10 MB message");
    use rdkafka::Message;
    let kept = big.payload().map_or(0, <[u8]>::len);
    assert_eq!(kept, 64 * 1024, "the oversized value is cut to its first 64 KiB");
    assert_eq!(header(big, "x-ingest-value-truncated").as_deref(), Some("4200000"));
    let _ = positions;
    assert_committed_at_log_end(&kafka).await;
}

/// A second instance joins mid-stream and later leaves (drained shutdown),
/// both writing to one PostgreSQL database: every event is exactly one row
/// and the group's offsets end at the log end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_loses_and_duplicates_nothing() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(4);
    let config = kafka.config_with_sink(&db.url);
    let first = RunningPipeline::start(config.clone());
    let batches: Vec<Workload> = (0..6).map(|i| Workload::generate(80 + i, 1000, 0.05)).collect();
    let total: usize = batches.iter().map(|w| w.messages.len()).sum();
    let valid: usize = batches.iter().map(Workload::valid).sum();

    kafka.produce(&batches[0].messages).await;
    kafka.produce(&batches[1].messages).await;
    let second = RunningPipeline::start(config.clone());
    for w in &batches[2..4] {
        kafka.produce(&w.messages).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for("the second instance to get partitions and work", LONG, || second.handled() > 0).await;
    // The second instance leaves while events keep coming.
    let producing = async {
        for w in &batches[4..] {
            kafka.produce(&w.messages).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::join!(second.stop(), producing);
    let deadline = std::time::Instant::now() + LONG;
    while pg_count(&db, "SELECT count(*) FROM msdyn_copilotinteraction").await < valid as i64 {
        assert!(std::time::Instant::now() < deadline, "rows never reached {valid}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("offsets committed to the log end", LONG, || kafka.committed() == kafka.log_end()).await;
    first.stop().await;
    assert_eq!(pg_count(&db, "SELECT count(*) FROM msdyn_copilotinteraction").await, valid as i64);
    assert_eq!(
        pg_count(&db, "SELECT count(DISTINCT msdyn_copilotinteractionid) FROM msdyn_copilotinteraction").await,
        valid as i64
    );
    let dlq = kafka.read_dlq(total - valid);
    assert_eq!(dead_letter_sources(&dlq), total - valid, "every invalid event dead-lettered");
    assert_eq!(dlq.len(), total - valid, "and only once");
    assert_eq!(kafka.committed(), kafka.log_end());
}

/// Two events claim one id with different contents. Whichever is stored
/// stays a replay on every later pass, whatever the batch holds beside it
/// and in whichever order: a record is never both a row and a dead letter.
/// On SQLite, PostgreSQL and the Dataverse sink (against the emulator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_record_is_a_replay_whatever_its_batch_holds() {
    use crate::dataverse_emulator::{Behaviour, CLIENT_ID, CLIENT_SECRET, Emulator, TENANT};
    use copilot_ingest::backend::{Backend, Outcome};
    use copilot_ingest::batch::Entry;
    use copilot_ingest::transport::ingest::source::Inbound;
    let (dir, sqlite) = temp_sqlite();
    let db = PgDb::create().await;
    let emulator = Emulator::start(Behaviour::default());
    let mut urls = vec![sqlite, "dataverse://contoso.crm.dynamics.com".to_owned()];
    urls.extend(db.as_ref().map(|d| d.url.clone()));
    for url in urls {
        let mut config = copilot_ingest::config::Config::default();
        config.sink.url = copilot_ingest::config::Secret::new(url.clone());
        let d = &mut config.sink.dataverse;
        (d.tenant_id, d.client_id) = (TENANT.into(), CLIENT_ID.into());
        d.client_secret = copilot_ingest::config::Secret::new(CLIENT_SECRET);
        (d.authority, d.api_url) = (emulator.url.clone(), emulator.url.clone());
        let metrics = std::sync::Arc::new(copilot_ingest::metrics::Metrics::new());
        let sink = Backend::open(&config.sink_url().unwrap(), "t", 4, &metrics).await.unwrap();
        let normalizer = copilot_ingest::normalize::Normalizer::default();
        let id = uuid::Uuid::new_v4();
        let entry = |name: &str, offset: i64| {
            let payload = format!(
                r#"{{"msdyn_copilotinteractionid":"{id}","msdyn_name":"{name}","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy","msdyn_scenariotype":"Copilot"}}"#
            );
            let record = normalizer.normalize_json(payload.as_bytes(), None, chrono::Utc::now()).unwrap();
            let message = Inbound {
                partition: (offset % 2) as i32,
                offset,
                timestamp_ms: None,
                key: None,
                payload: Some(payload.into_bytes()),
                headers: Vec::new(),
            };
            Entry { record, message }
        };
        let write = |entries: Vec<Entry>| {
            let sink = &sink;
            async move {
                let indices: Vec<usize> = (0..entries.len()).collect();
                sink.write(&std::sync::Arc::new(entries), &indices).await.unwrap()
            }
        };
        let conflict = |o: &Outcome| matches!(o, Outcome::Rejected(r) if r.reason.code() == "duplicate_id_conflict");
        let first = write(vec![entry("stored", 85), entry("other", 12)]).await;
        assert_eq!(first[0], Outcome::Written, "{url}");
        assert!(conflict(&first[1]), "{url}: {first:?}");
        for round in 0..20 {
            let pair = write(vec![entry("other", 12), entry("stored", 85)]).await;
            assert!(conflict(&pair[0]) && pair[1] == Outcome::Replay, "{url} round {round}, other first: {pair:?}");
            let pair = write(vec![entry("stored", 85), entry("other", 12)]).await;
            assert!(pair[0] == Outcome::Replay && conflict(&pair[1]), "{url} round {round}, stored first: {pair:?}");
            let alone = write(vec![entry("other", 12)]).await;
            assert!(conflict(&alone[0]), "{url}: {alone:?}");
            assert_eq!(write(vec![entry("stored", 85)]).await, [Outcome::Replay], "{url}");
        }
        let rows = if url.starts_with("dataverse://") {
            let rows = emulator.rows();
            assert_eq!(rows.len(), 1, "{rows:?}");
            rows[0]["msdyn_name"].as_str().unwrap_or_default().to_owned()
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            rusqlite::Connection::open(path)
                .unwrap()
                .query_row("SELECT msdyn_name FROM msdyn_copilotinteraction", [], |r| r.get::<_, String>(0))
                .unwrap()
        } else {
            let client = copilot_ingest::backend::postgres::connect(&url).await.unwrap();
            client.query_one("SELECT msdyn_name FROM msdyn_copilotinteraction", &[]).await.unwrap().get(0)
        };
        assert_eq!(rows, "stored", "{url}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
