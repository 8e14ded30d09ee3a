//! Observability against real consumers: a Prometheus server scraping the
//! service, the lag gauge, and /readyz following the sink.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return (0, String::new()) };
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let response = String::from_utf8_lossy(&raw).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

async fn serve_http(pipeline: &RunningPipeline) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(copilot_ingest::transport::http::serve(
        listener,
        pipeline.metrics.clone(),
        pipeline.readiness.clone(),
        rx,
    ));
    (addr, stop)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus server scrapes a running pipeline; its query API reports
/// the number of records written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_sees_every_written_record() {
    if Command::new("prometheus").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the prometheus binary is required under CI (Debian package prometheus)");
        }
        eprintln!("skipping: prometheus not installed");
        return;
    }
    let kafka = TestKafka::new(2);
    let (dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let pipeline = RunningPipeline::start(config);
    let (addr, _stop_http) = serve_http(&pipeline).await;
    let workload = Workload::generate(41, 2000, 0.05);
    kafka.produce(&workload.messages).await;
    pipeline.wait_handled(2000, Duration::from_secs(90)).await;

    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("prometheus.yml");
    std::fs::write(
        &config_file,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: copilot-ingest\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let expected = workload.valid().to_string();
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(api, "/api/v1/query?query=sum(copilot_ingest_records_written_total)").await;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(value) = v["data"]["result"][0]["value"][1].as_str() {
                if value == expected {
                    break;
                }
                last = value.to_owned();
            }
        }
        assert!(std::time::Instant::now() < deadline, "Prometheus never reported {expected} (last: {last:?})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pipeline.stop().await;
}

/// The lag gauge is fed from the consumer's statistics and reaches 0 once
/// everything is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_reaches_zero_when_caught_up() {
    let kafka = TestKafka::new(2);
    let (_dir, url) = temp_sqlite();
    let config = kafka.config_with_sink(&url);
    let pipeline = RunningPipeline::start(config.clone());
    let workload = Workload::generate(42, 1000, 0.0);
    kafka.produce(&workload.messages).await;
    pipeline.wait_handled(1000, Duration::from_secs(90)).await;
    let topic = config.kafka.topic.clone();
    let lag = |p: i32| pipeline.metrics.consumer_lag.with_label_values(&[&topic, &p.to_string()]).get();
    wait_for("a lag reading", Duration::from_secs(30), || {
        use prometheus::core::Collector;
        pipeline.metrics.consumer_lag.collect().iter().map(|mf| mf.get_metric().len()).sum::<usize>() >= 2
    })
    .await;
    wait_for("lag 0 on both partitions", Duration::from_secs(30), || lag(0) == 0 && lag(1) == 0).await;
    pipeline.stop().await;
}

/// /readyz turns 503 while PostgreSQL refuses connections and 200 again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_sink() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(1);
    let config = kafka.config_with_sink(&db.url);
    let pipeline = RunningPipeline::start(config);
    let (addr, _stop_http) = serve_http(&pipeline).await;
    kafka.produce(&Workload::generate(43, 10, 0.0).messages).await;
    pipeline.wait_handled(10, Duration::from_secs(60)).await;
    let mut ready = 0;
    for _ in 0..100 {
        ready = http_get(addr, "/readyz").await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200);

    db.refuse_connections().await;
    wait_for("sink unreachable", Duration::from_secs(20), || {
        !pipeline.readiness.sink_reachable.load(Ordering::Relaxed)
    })
    .await;
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("sink_reachable=false"), "{body}");
    assert_eq!(http_get(addr, "/healthz").await.0, 200, "liveness does not depend on the sink");

    db.allow_connections().await;
    wait_for("sink reachable again", Duration::from_secs(20), || {
        pipeline.readiness.sink_reachable.load(Ordering::Relaxed)
    })
    .await;
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    pipeline.stop().await;
}

/// Right after start, before any event, `/metrics` already holds every
/// metric of the README's table that applies to the sink (counters at 0),
/// and the lag series appear once partitions are assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_from_the_start() {
    let readme = include_str!("../../README.md");
    let table =
        readme.split("### Metrics").nth(1).and_then(|s| s.split("\n### ").next()).expect("README metrics table");
    let mut documented: Vec<&str> = table
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("copilot_ingest_"))
        .collect();
    documented.sort_unstable();
    documented.dedup();
    assert!(documented.len() >= 12, "{documented:?}");
    let Some(db) = PgDb::create().await else { return };
    let (dir, sqlite) = temp_sqlite();
    // One declared policy: the per-policy series exist from start-up too.
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("policies.toml");
    std::fs::write(
        &config_file,
        "[[retention.policies]]\nuniquename = \"nightly\"\nstarttime = \"2030-01-01T02:00:00Z\"\nrecurrence = \"FREQ=DAILY\"\n\
         criteria = \"<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='createdon' operator='olderthan-x-days' value='90'/></filter></entity></fetch>\"\n",
    )
    .unwrap();
    for url in [sqlite, db.url.clone()] {
        let kafka = TestKafka::new(2);
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let service = Service::spawn(
            kafka
                .run_binary(&url)
                .arg("--config")
                .arg(&config_file)
                .env("COPILOT_INGEST__METRICS__LISTEN", addr.to_string()),
        );
        // The first scrape that answers, as soon as the sink is open.
        let mut body = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !body.contains("copilot_ingest_records_written_total{") {
            assert!(std::time::Instant::now() < deadline, "no /metrics answer:\n{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            body = http_get(addr, "/metrics").await.1;
        }
        let applies =
            |name: &str| !name.contains("dataverse") && (url.starts_with("postgres") || !name.contains("postgres"));
        for name in documented.iter().filter(|n| applies(n) && **n != "copilot_ingest_consumer_lag") {
            assert!(body.contains(&format!("\n{name}")), "{url}: {name} missing right after start:\n{body}");
        }
        assert!(body.contains("copilot_ingest_control_commands_total{message=\"BulkRetain\",status=\"Succeeded\"} 0"));
        assert!(body.contains("copilot_ingest_events_rejected_total{reason=\"malformed_json\"} 0"));
        assert!(
            body.contains("copilot_ingest_retention_runs_total{outcome=\"Failed\",policy=\"nightly\"} 0"),
            "{body}"
        );
        assert!(body.contains("copilot_ingest_retention_policy_interval_seconds{policy=\"nightly\"} 86400"), "{body}");
        assert!(body.contains("copilot_ingest_retention_operation_records{operation_kind=\"BulkRetain\"} 0"));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while http_get(addr, "/readyz").await.0 != 200 {
            assert!(std::time::Instant::now() < deadline, "{url}: never ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lag = http_get(addr, "/metrics").await.1;
        assert!(lag.contains("copilot_ingest_consumer_lag{partition=\"0\""), "{url}: lag on assignment:\n{lag}");
        service.terminate();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Events the broker deleted before the service read them are never silent:
/// the service, stopped after ten events, comes back to a partition whose
/// oldest events the embedded broker has dropped (it keeps 5 MB per
/// partition), counts the reset in `copilot_ingest_offset_resets_total`, says
/// so in a WARN, and ingests what is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_past_events_the_broker_deleted_is_counted_and_said() {
    let kafka = TestKafka::new(1);
    let (dir, url) = temp_sqlite();
    let first = Workload::generate(31, 10, 0.0);
    kafka.produce(&first.messages).await;
    let service = Service::spawn(&mut kafka.run_binary(&url));
    wait_for("the first ten events committed", Duration::from_secs(60), || {
        kafka.committed().get(&0).copied().unwrap_or(0) >= 10
    })
    .await;
    service.terminate();

    // About 7 MB more: the broker drops its oldest message sets, the first
    // ten events among them.
    let flood = Workload::generate(32, 14_000, 0.0);
    for chunk in flood.messages.chunks(1_000) {
        kafka.produce(chunk).await;
    }
    let log_start = kafka.log_start().get(&0).copied().unwrap_or(0);
    assert!(log_start > 10, "the broker still holds offset 10 (log start {log_start})");

    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut command = kafka.run_binary(&url);
    command.env("COPILOT_INGEST__METRICS__LISTEN", addr.to_string()).stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let mut service = Service::from_child(child);
    let resets = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("copilot_ingest_offset_resets_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut body = String::new();
    while resets(&body) < 1 {
        assert!(std::time::Instant::now() < deadline, "no reset counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = http_get(addr, "/metrics").await.1;
    }
    // What the broker still holds is ingested: the log from its start.
    let end = kafka.log_end().get(&0).copied().unwrap_or(0);
    wait_for("the remaining events committed", Duration::from_secs(60), || {
        kafka.committed().get(&0).copied().unwrap_or(0) >= end
    })
    .await;
    assert_eq!(resets(&http_get(addr, "/metrics").await.1), 1, "one reset, once");
    assert!(service.is_running());
    std::process::Command::new("kill").args(["-TERM", &service.id().to_string()]).status().unwrap();
    let (code, stderr) = service.exit_within(Duration::from_secs(30));
    assert_eq!(code, Some(0));
    assert!(stderr.contains("events were deleted by the broker before they were ingested"), "{stderr}");
    let rows =
        copilot_ingest::backend::sqlite::open_connection(std::path::Path::new(url.trim_start_matches("sqlite://")))
            .unwrap()
            .query_row("SELECT count(*) FROM msdyn_copilotinteraction", [], |r| r.get::<_, i64>(0))
            .unwrap();
    assert_eq!(rows, 10 + (end - log_start), "the first ten, then the log from its start");
    let _ = std::fs::remove_dir_all(dir);
}
