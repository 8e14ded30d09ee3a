//! Fault injection against the real binary: broker request errors, the broker
//! going down and up, a high round-trip time, and a slow sink under a large
//! backlog. Each scenario ends with the same count: every valid event exactly
//! one row, every invalid one exactly one DLQ message, offsets at the log end;
//! and prints one report line (events, rows, duplicates, lost, DLQ, recovery
//! time, peak RSS of the child).

use std::time::{Duration, Instant};

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::common::*;
use crate::dataverse_emulator::{Behaviour, Emulator};

/// Peak resident set size of a process (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// What one scenario ended with, printed as one line of the report.
struct Report {
    produced: usize,
    valid: usize,
    rows: i64,
    distinct: i64,
    dead_letters: usize,
    recovery: Duration,
    peak_rss_mb: f64,
}

impl Report {
    fn print(&self, scenario: &str) {
        eprintln!(
            "scenario {scenario}: produced {}, rows {}, duplicates {}, lost {}, dlq {}, recovered in {:.1}s, peak RSS {:.0} MB",
            self.produced,
            self.rows,
            self.rows - self.distinct,
            self.valid as i64 - self.distinct,
            self.dead_letters,
            self.recovery.as_secs_f64(),
            self.peak_rss_mb
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_outage_and_latency_lose_and_duplicate_nothing() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(4);
    let cluster = kafka._broker.cluster().unwrap();
    let Stream { parts, valid, invalid, produced } = Stream::generate(300, 4, 1500, 0.1);
    let child = Service::spawn(&mut kafka.run_binary(&db.url));

    kafka.produce(&parts[0].messages).await;
    db.wait_rows(1, Duration::from_secs(60)).await;
    // Fetch and commit requests fail (retriable errors a real cluster gives
    // during leader moves and coordinator changes).
    use RDKafkaRespErr::*;
    cluster.request_errors(RDKafkaApiKey::Fetch, &[RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5]);
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    kafka.produce(&parts[1].messages).await;
    // Produce requests fail (the dead-letter producer's, and this test's own: both retry).
    cluster.request_errors(RDKafkaApiKey::Produce, &[RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 4]);
    kafka.produce(&parts[2].messages).await;
    // The broker goes away for 8 s, longer than the 6 s session: the
    // assignment is lost with uncommitted work, and everything since the last
    // commit is delivered again (rows become replays; dead letters are not
    // sent twice, by the ledger). It comes back slow: 150 ms round trips.
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.broker_up(1).unwrap();
    let up = Instant::now();
    cluster.broker_round_trip_time(1, Duration::from_millis(150)).unwrap();
    kafka.produce(&parts[3].messages).await;
    db.wait_rows(valid as i64, Duration::from_secs(180)).await;
    let recovery = up.elapsed();
    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    wait_for("offsets at the log end", Duration::from_secs(60), || kafka.committed() == kafka.log_end()).await;
    let rss = peak_rss_mb(child.id());
    child.terminate();

    let (rows, distinct) = db.row_counts().await;
    assert_eq!((rows, distinct), (valid as i64, valid as i64), "exactly one row per valid event");
    let dlq = kafka.read_dlq(invalid);
    assert_eq!(dead_letter_sources(&dlq), invalid, "every invalid event dead-lettered");
    assert_eq!(dlq.len(), invalid, "exactly one dead letter per invalid event (idempotent producer, ledger)");
    Report { produced, valid, rows, distinct, dead_letters: dlq.len(), recovery, peak_rss_mb: rss }
        .print("broker-faults");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_under_a_large_backlog_keeps_memory_bounded() {
    // The Dataverse emulator as a slow sink: 300 ms per request.
    let kafka = TestKafka::new(8);
    let emulator = Emulator::start(Behaviour { latency: Duration::from_millis(300), ..Behaviour::default() });
    let workload = Workload::generate(77, 40_000, 0.05);
    kafka.produce(&workload.messages).await;

    let mut command = kafka.run_binary("dataverse://contoso.crm.dynamics.com");
    for (k, v) in emulator.env(crate::dataverse_emulator::CLIENT_SECRET) {
        command.env(k, v);
    }
    command.env("COPILOT_INGEST__SINK__DATAVERSE__MAX_IN_FLIGHT", "2");
    let child = Service::spawn(&mut command);
    // Ten seconds of a sink far slower than the backlog can be read.
    let started = Instant::now();
    let mut peak_while_slow = 0.0f64;
    while started.elapsed() < Duration::from_secs(10) {
        peak_while_slow = peak_while_slow.max(peak_rss_mb(child.id()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows_while_slow = emulator.row_count();
    assert!(rows_while_slow < workload.valid(), "the sink was meant to be the bottleneck");
    emulator.change(|b| b.latency = Duration::ZERO);
    let fast = Instant::now();
    wait_for("every row", Duration::from_secs(180), || emulator.row_count() >= workload.valid()).await;
    let recovery = fast.elapsed();
    wait_for("offsets at the log end", Duration::from_secs(60), || kafka.committed() == kafka.log_end()).await;
    let rss = peak_rss_mb(child.id());
    child.terminate();

    assert_eq!(emulator.row_count(), workload.valid());
    let dlq = kafka.read_dlq(workload.invalid());
    assert_eq!(dlq.len(), workload.invalid());
    let rows = emulator.row_count() as i64;
    Report {
        produced: workload.messages.len(),
        valid: workload.valid(),
        rows,
        // The emulator keys rows by id: a duplicate would have been refused, not stored.
        distinct: rows,
        dead_letters: dlq.len(),
        recovery,
        peak_rss_mb: rss,
    }
    .print("slow-sink");
    eprintln!("slow-sink: {rows_while_slow} rows written while slow; peak RSS while slow {peak_while_slow:.0} MB");
    // A bound that holds by construction (chunks × 512 messages, librdkafka's
    // 16 MB prefetch cap, in-flight batches), far below the 40,000-event backlog.
    assert!(rss < 256.0, "peak RSS {rss:.0} MB");
}

/// An unreachable broker or sink at start is retried with a clear log line and
/// `/readyz` 503 (no crash loop); a topic that does not exist is named in the
/// log. SIGTERM still ends each cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_and_missing_topics_are_waited_for_and_reported() {
    let kafka = TestKafka::new(1);
    let (_dir, url) = temp_sqlite();
    let closed_port = free_port();
    let unreachable_database = format!("postgres://postgres@127.0.0.1:{closed_port}/copilot");
    let topic = kafka.config.kafka.topic.clone();
    for (brokers, topic, sink_url, expected) in [
        (format!("127.0.0.1:{closed_port}"), topic.clone(), &url, "cannot reach the Kafka brokers"),
        (kafka.bootstrap.clone(), unique("no_such_topic"), &url, "a topic does not exist"),
        (kafka.bootstrap.clone(), topic, &unreachable_database, "sink unavailable at start; retrying"),
    ] {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(unique("edge-log"));
        let mut command = kafka.run_binary(sink_url);
        command
            .env("COPILOT_INGEST__KAFKA__BROKERS", &brokers)
            .env("COPILOT_INGEST__KAFKA__TOPIC", &topic)
            .env("COPILOT_INGEST__METRICS__LISTEN", format!("127.0.0.1:{metrics_port}"))
            .stderr(std::fs::File::create(&log).unwrap());
        let mut service = Service::spawn(&mut command);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(service.is_running(), "still running and retrying after 6 s");
        let addr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
        let (status, _) = crate::observability::http_get(addr, "/readyz").await;
        assert_eq!(status, 503, "not ready while it cannot consume");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(expected), "{expected:?} missing from the log:\n{text}");
        let lines = text.lines().count();
        assert!(lines < 60, "{lines} log lines in 6 s: repeats must be throttled\n{text}");
        service.terminate();
    }
}

/// PostgreSQL refuses every connection for 30 s mid-stream while a second
/// instance joins; then the database returns and the second instance leaves
/// with SIGTERM. Both write to one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_s_database_outage_and_a_rebalance_lose_and_duplicate_nothing() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(4);
    let Stream { parts, valid, invalid, produced } = Stream::generate(400, 4, 1500, 0.1);
    let first = Service::spawn(&mut kafka.run_binary(&db.url));
    kafka.produce(&parts[0].messages).await;
    db.wait_rows(1, Duration::from_secs(60)).await;
    db.refuse_connections().await;
    kafka.produce(&parts[1].messages).await;
    // The second instance waits for its sink before it joins the group, so it
    // joins once the database is back, while the first still retries writes.
    let second_metrics = format!("127.0.0.1:{}", free_port());
    let second = Service::spawn(kafka.run_binary(&db.url).env("COPILOT_INGEST__METRICS__LISTEN", &second_metrics));
    kafka.produce(&parts[2].messages).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let committed_during_outage = kafka.committed();
    db.allow_connections().await;
    let back = Instant::now();
    wait_until_ready(&second_metrics, Duration::from_secs(60)).await;
    kafka.produce(&parts[3].messages).await;
    db.wait_rows(valid as i64, Duration::from_secs(180)).await;
    let recovery = back.elapsed();
    let rss = peak_rss_mb(first.id()).max(peak_rss_mb(second.id()));
    // The second instance leaves; the first takes its partitions back.
    second.terminate();
    wait_for("offsets at the log end", Duration::from_secs(60), || kafka.committed() == kafka.log_end()).await;
    first.terminate();

    let (rows, distinct) = db.row_counts().await;
    assert_eq!((rows, distinct), (valid as i64, valid as i64), "exactly one row per valid event");
    let end = kafka.log_end();
    assert!(
        committed_during_outage.iter().all(|(p, &c)| c < end[p]),
        "nothing past an unwritten record was committed during the outage: {committed_during_outage:?} vs {end:?}"
    );
    let dlq = kafka.read_dlq(invalid);
    assert_eq!(dlq.len(), invalid, "exactly one dead letter per invalid event");
    Report { produced, valid, rows, distinct, dead_letters: dlq.len(), recovery, peak_rss_mb: rss }
        .print("postgres-outage-30s+rebalance");
}

/// Waits for `/readyz` 200: sink and broker reachable, partitions assigned.
async fn wait_until_ready(metrics_listen: &str, timeout: Duration) {
    let addr = metrics_listen.parse().unwrap();
    let start = Instant::now();
    while crate::observability::http_get(addr, "/readyz").await.0 != 200 {
        assert!(start.elapsed() < timeout, "{metrics_listen} not ready after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
