//! Scheduled retention policies on SQLite and PostgreSQL, driven by a test
//! clock (each pass is given its time; nothing sleeps): runs on schedule,
//! paused runs nothing, a missed run runs once, two instances on one
//! database run each due run exactly once, and a run killed halfway resumes
//! with exact counts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use copilot_ingest::metrics::Metrics;
use copilot_ingest::operations::policy::{self, PolicySource, PolicyStatus, RetentionPolicy};
use copilot_ingest::operations::scheduler::{LEASE, RUN_MESSAGE, RunReplies, Scheduler};
use copilot_ingest::transport::control::{Reply, Status};
use serde_json::json;

use crate::common::*;
use crate::control::{query_i64, sink_urls};

const OLD_RECORDS_CRITERIA: &str = "<fetch><entity name='msdyn_copilotinteraction'><filter>\
    <condition attribute='createdon' operator='olderthan-x-days' value='365'/></filter></entity></fetch>";

fn daily(uniquename: &str, start: DateTime<Utc>, page_size: i64) -> RetentionPolicy {
    RetentionPolicy {
        uniquename: uniquename.into(),
        name: format!("policy {uniquename}"),
        entitylogicalname: "msdyn_copilotinteraction".into(),
        criteria: OLD_RECORDS_CRITERIA.into(),
        starttime: start,
        recurrence: "FREQ=DAILY;INTERVAL=1".into(),
        status: PolicyStatus::Scheduled,
        purge_after_seconds: None,
        page_size,
        source: PolicySource::Runtime,
    }
}

/// The test clock's origin: now, to the second (operation rows carry real
/// end times, which a policy's `purge_after` compares with the clock).
fn origin() -> DateTime<Utc> {
    Utc::now().duration_trunc(TimeDelta::seconds(1)).unwrap_or_else(|_| Utc::now())
}

fn hours(h: i64) -> TimeDelta {
    TimeDelta::hours(h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_policy_runs_on_schedule_pauses_and_catches_up_once_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let backend = open_backend_at(&url).await;
        seed(&backend, 0, 30, 20).await;
        let metrics = Arc::new(Metrics::new());
        let (sender, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let scheduler = Scheduler::new(Arc::clone(&backend), Arc::clone(&metrics))
            .with_replies(RunReplies { sender, every: Duration::ZERO });
        let t0 = origin();
        let start = t0 + hours(1);
        policy::save(&backend, &daily("old-feedback", start, 7), t0).await.unwrap();

        assert!(scheduler.run_due(t0).await.unwrap().is_empty(), "{url}: not due before its start time");
        let first = scheduler.run_due(start).await.unwrap();
        assert_eq!(first.len(), 1, "{url}");
        assert_eq!((first[0].outcome, first[0].retained), ("Succeeded", 30), "{url}: {first:?}");
        // The run's replies: progress page by page (7 a page), then the end.
        let replies: Vec<Reply> = std::iter::from_fn(|| reports.try_recv().ok()).map(|r| Reply::of_run(&r)).collect();
        let id = format!("policy:old-feedback:{}", first[0].operation_id);
        assert!(replies.iter().all(|r| r.command_id.as_deref() == Some(id.as_str())), "{replies:?}");
        let counts: Vec<i64> = replies
            .iter()
            .filter(|r| r.status == Status::InProgress)
            .map(|r| {
                r.response.as_ref().unwrap()["EntityCountCollection"]["msdyn_copilotinteraction"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(counts, [7, 14, 21, 28, 30], "{url}");
        let last = replies.last().unwrap();
        assert_eq!(last.status, Status::Succeeded, "{url}: {last:?}");
        assert_eq!(last.response.as_ref().unwrap()["EntityCountCollection"]["msdyn_copilotinteraction"], 30);
        assert!(scheduler.run_due(start + TimeDelta::seconds(1)).await.unwrap().is_empty(), "{url}: ran once");
        let second = scheduler.run_due(start + TimeDelta::days(1)).await.unwrap();
        assert_eq!((second.len(), second[0].retained), (1, 0), "{url}: the next day's run finds nothing new");
        assert_ne!(first[0].operation_id, second[0].operation_id, "each run is its own operation");

        // Down for nine days: one run at start-up, then the next is tomorrow's.
        let late = start + TimeDelta::days(10) + hours(2);
        assert_eq!(scheduler.run_due(late).await.unwrap().len(), 1, "{url}: a missed run runs once");
        assert!(scheduler.run_due(late + hours(1)).await.unwrap().is_empty(), "{url}: not once per missed day");
        let stored = backend.policies().await.unwrap();
        assert_eq!(stored[0].next_run, Some(start + TimeDelta::days(11)), "{url}");
        assert_eq!(stored[0].last_outcome.as_deref(), Some("Succeeded"));
        assert_eq!(stored[0].last_run, Some(late));

        // Paused: nothing runs, however long; resumed: the missed run once.
        let paused = RetentionPolicy { status: PolicyStatus::Unscheduled, ..daily("old-feedback", start, 7) };
        policy::save(&backend, &paused, late).await.unwrap();
        for day in 11..15 {
            assert!(scheduler.run_due(start + TimeDelta::days(day)).await.unwrap().is_empty(), "{url}: paused ran");
        }
        let resumed_at = start + TimeDelta::days(15) + hours(3);
        policy::save(&backend, &daily("old-feedback", start, 7), resumed_at).await.unwrap();
        assert_eq!(scheduler.run_due(resumed_at).await.unwrap().len(), 1, "{url}: resumed runs the missed one");
        assert!(scheduler.run_due(resumed_at + hours(1)).await.unwrap().is_empty(), "{url}");

        // purge_after: what was retained (by the first run, ended before
        // the cutoff) is purged in the run; live records are never touched.
        let purging = RetentionPolicy { purge_after_seconds: Some(3600), ..daily("old-feedback", start, 7) };
        policy::save(&backend, &purging, resumed_at).await.unwrap();
        let purge_run = scheduler.run_due(start + TimeDelta::days(16)).await.unwrap();
        assert_eq!((purge_run[0].retained, purge_run[0].purged), (0, 30), "{url}: {purge_run:?}");
        let tombstones = query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction_tombstone").await;
        let live = query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 0").await;
        assert_eq!((tombstones, live), (30, 20), "{url}");
        let operation = backend.operation(purge_run[0].operation_id).await.unwrap().unwrap();
        assert_eq!((operation.status.as_str(), operation.total, operation.purged), ("Succeeded", 0, 30));
        assert_eq!(operation.message, RUN_MESSAGE);
        assert_eq!(operation.policy.as_deref(), Some("old-feedback"));

        let runs = metrics.retention_runs_total.with_label_values(&["old-feedback", "Succeeded"]).get();
        assert_eq!(runs, 5, "{url}: the runs counter counts every run");
        let rendered = metrics.render();
        assert!(rendered.contains("copilot_ingest_retention_last_success_timestamp_seconds{policy=\"old-feedback\"}"));
        assert!(rendered.contains("copilot_ingest_retention_policy_interval_seconds{policy=\"old-feedback\"} 86400"));
        // A deleted policy's series go with it (the stale alert must not fire for it).
        policy::delete(&backend, "old-feedback").await.unwrap();
        scheduler.run_due(start + TimeDelta::days(17)).await.unwrap();
        assert!(!metrics.render().contains("policy=\"old-feedback\""), "{url}: series of a deleted policy remain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_postgres_database_run_each_due_run_exactly_once() {
    let Some(db) = PgDb::create().await else {
        assert!(std::env::var("CI").is_err(), "PostgreSQL is required under CI=true");
        println!("SKIPPED: PostgreSQL is not reachable on 127.0.0.1:5432");
        return;
    };
    let (a, b) = (open_backend_at(&db.url).await, open_backend_at(&db.url).await);
    seed(&a, 0, 40, 10).await;
    let t0 = origin();
    let names = ["p1", "p2", "p3"];
    for name in names {
        policy::save(&a, &daily(name, t0 + hours(1), 3), t0).await.unwrap();
    }
    let (first, second) =
        (Scheduler::new(Arc::clone(&a), Arc::new(Metrics::new())), Scheduler::new(b, Arc::new(Metrics::new())));
    let mut runs = std::collections::HashMap::<String, usize>::new();
    for day in 0..20 {
        let now = t0 + hours(1) + TimeDelta::days(day) + TimeDelta::minutes(1);
        let (x, y) = tokio::join!(first.run_due(now), second.run_due(now));
        for outcome in x.unwrap().into_iter().chain(y.unwrap()) {
            assert_eq!(outcome.outcome, "Succeeded");
            *runs.entry(outcome.policy).or_default() += 1;
        }
    }
    for name in names {
        assert_eq!(runs.get(name), Some(&20), "{name}: {runs:?}");
        let sql = format!(
            "SELECT count(*) FROM copilot_ingest_retention_operation WHERE policy = '{name}' AND status = 'Succeeded'"
        );
        assert_eq!(query_i64(&db.url, &sql).await, 20, "{name}: one operation row per run");
    }
    let retained = query_i64(&db.url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1").await;
    let counted = query_i64(&db.url, "SELECT sum(total)::bigint FROM copilot_ingest_retention_operation").await;
    assert_eq!((retained, counted), (40, 40), "every record retained once, by exactly one run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_halfway_is_resumed_with_exact_counts_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let backend = open_backend_at(&url).await;
        seed(&backend, 0, 6000, 50).await;
        let t0 = origin();
        policy::save(&backend, &daily("big", t0, 10), t0).await.unwrap();
        let metrics = Arc::new(Metrics::new());
        // Progress reported on every page: the gauge follows the run.
        let (sender, _reports) = tokio::sync::mpsc::unbounded_channel();
        let scheduler = Arc::new(
            Scheduler::new(Arc::clone(&backend), Arc::clone(&metrics))
                .with_replies(RunReplies { sender, every: Duration::ZERO }),
        );
        let gauge = || metrics.retention_operation_records.with_label_values(&[RUN_MESSAGE]).get();
        let run = {
            let scheduler = Arc::clone(&scheduler);
            tokio::spawn(async move { scheduler.run_due(t0).await })
        };
        // Killed once some pages are committed.
        let mut halfway = 0;
        for _ in 0..20_000 {
            let operations = backend.operations(10).await.unwrap();
            if let Some(op) = operations.first().filter(|op| op.total > 0) {
                halfway = op.total;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        run.abort();
        let _ = run.await;
        assert!(halfway > 0 && halfway < 6000, "{url}: the run was stopped halfway ({halfway})");
        assert!(gauge() > 0 && gauge() < 6000, "{url}: the progress gauge shows the stopped run ({})", gauge());
        let marked = query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1").await;
        assert!(marked < 6000, "{url}: {marked}");

        // Its lease runs out; the next pass takes the run over and finishes it.
        let resumed = scheduler.run_due(t0 + LEASE + TimeDelta::minutes(5)).await.unwrap();
        assert_eq!(resumed.len(), 1, "{url}");
        assert_eq!((resumed[0].outcome, resumed[0].retained), ("Succeeded", 6000), "{url}: {resumed:?}");
        let operations = backend.operations(10).await.unwrap();
        assert_eq!(operations.len(), 1, "{url}: the same operation, resumed, not a second one");
        assert_eq!((operations[0].total, operations[0].status.as_str()), (6000, "Succeeded"), "{url}");
        assert_eq!(gauge(), 0, "{url}: no run in progress");
        let marked = query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1").await;
        assert_eq!(marked, 6000, "{url}");
    }
}

/// `copilot-ingest control …` against the test broker; (exit code, stdout).
async fn cli(kafka: &TestKafka, args: &[&str]) -> (Option<i32>, String) {
    let mut command = binary();
    command
        .args(["control", "--brokers", &kafka.bootstrap, "--timeout", "30"])
        .args(args)
        .env("COPILOT_INGEST__CONTROL__HMAC_KEY", TEST_HMAC_KEY)
        .env("COPILOT_INGEST__KAFKA__CONTROL_TOPIC", &kafka.config.kafka.control_topic)
        .env("COPILOT_INGEST__KAFKA__CONTROL_REPLY_TOPIC", &kafka.config.kafka.control_reply_topic);
    let output = tokio::task::spawn_blocking(move || command.output().expect("run the CLI")).await.unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every line of the CLI's output on a pipe is one JSON document.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_operations_are_managed_and_read_over_the_control_topic_and_the_cli() {
    use crate::control::{ControlClient, ControlService};
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(1);
        let config = kafka.config_with_sink(&url);
        seed(&*open_backend_at(&url).await, 0, 12, 3).await;
        let control = ControlService::start(config.clone()).await;
        let client = ControlClient::new(&kafka);

        let created = client
            .call(
                "Create",
                json!({"EntityName": "retentionconfig", "Target": {"uniquename": "yearly-cleanup",
                    "criteria": OLD_RECORDS_CRITERIA, "starttime": "2030-01-01T00:00:00Z", "recurrence": "FREQ=YEARLY"}}),
            )
            .await;
        assert_eq!(created["status"], "Succeeded", "{url}: {created}");
        let again = client
            .call(
                "Create",
                json!({"EntityName": "retentionconfig", "Target": {"uniquename": "yearly-cleanup",
                "criteria": OLD_RECORDS_CRITERIA, "starttime": "2030-01-01T00:00:00Z"}}),
            )
            .await;
        assert_eq!(again["error"]["code"], "0x80040237", "{url}: a second policy of the same name is refused");
        let invalid = client
            .call(
                "Create",
                json!({"EntityName": "retentionconfig", "Target": {"uniquename": "bad",
                "criteria": "<fetch/>", "starttime": "2030-01-01T00:00:00Z"}}),
            )
            .await;
        assert_eq!(invalid["error"]["code"], "InvalidRetentionConfig", "{url}: {invalid}");

        let (code, table) = cli(&kafka, &["policies"]).await;
        assert_eq!(code, Some(0), "{url}: {table}");
        let row = table.lines().find(|l| l.starts_with("yearly-cleanup")).unwrap_or_else(|| panic!("{table}"));
        assert!(row.contains("Scheduled") && row.contains("FREQ=YEARLY") && row.contains("2030-01-01"), "{row}");

        let (code, out) = cli(&kafka, &["pause-policy", "--uniquename", "yearly-cleanup"]).await;
        assert_eq!(code, Some(0), "{url}: {out}");
        let policies = client.call("RetrieveMultiple", json!({"Query":
            "<fetch><entity name='retentionconfig'><filter><condition attribute='uniquename' operator='eq' value='yearly-cleanup'/></filter></entity></fetch>"})).await;
        let entity = &policies["response"]["EntityCollection"]["Entities"][0];
        assert_eq!(
            (entity["statecode"].as_i64(), entity["statuscode"].as_i64()),
            (Some(0), Some(2)),
            "{url}: {entity}"
        );

        // A long command on a pipe: JSON lines, the final reply last.
        let fetch = OLD_RECORDS_CRITERIA;
        let (code, out) = cli(&kafka, &["bulk-retain", "--fetchxml", fetch, "--page-size", "5"]).await;
        assert_eq!(code, Some(0), "{url}: {out}");
        let lines = json_lines(&out);
        let last = lines.last().unwrap();
        assert_eq!(last["status"], "Succeeded", "{url}: {out}");
        assert!(lines[..lines.len() - 1].iter().all(|l| l["status"] == "InProgress"), "{out}");
        let operation_id = last["response"]["OperationId"].as_str().unwrap().to_owned();
        let (code, out) = cli(&kafka, &["operation", "--operation-id", &operation_id]).await;
        assert_eq!(code, Some(0), "{url}: {out}");
        let operation: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((operation["statuscode"].as_i64(), operation["retainedcount"].as_i64()), (Some(5), Some(12)));
        assert_eq!(operation["operationtype"], "BulkRetain");

        // --no-wait prints the operation id at once; --watch follows it to the end.
        let (code, out) = cli(&kafka, &["--no-wait", "purge-retained-content", "--page-size", "5"]).await;
        assert_eq!(code, Some(0), "{url}: {out}");
        let queued = &json_lines(&out)[0];
        let purge_id = queued["OperationId"].as_str().unwrap().to_owned();
        let (code, out) = cli(&kafka, &["operation", "--operation-id", &purge_id, "--watch"]).await;
        assert_eq!(code, Some(0), "{url}: {out}");
        let watched = json_lines(&out);
        let done = watched.last().unwrap();
        assert_eq!((done["statuscode"].as_i64(), done["purgedcount"].as_i64()), (Some(5), Some(12)), "{url}: {out}");

        let operations = client
            .call("RetrieveMultiple", json!({"Query": "<fetch><entity name='retentionoperation'/></fetch>"}))
            .await;
        let listed = operations["response"]["EntityCollection"]["Entities"].as_array().unwrap().len();
        assert_eq!(listed, 2, "{url}: {operations}");

        let deleted = client.call("Delete", json!({"EntityName": "retentionconfig", "Target": "yearly-cleanup"})).await;
        assert_eq!(deleted["status"], "Succeeded", "{url}: {deleted}");
        let gone = client.call("Delete", json!({"EntityName": "retentionconfig", "Target": "yearly-cleanup"})).await;
        assert_eq!(gone["error"]["code"], "0x80040217", "{url}: {gone}");
        control.stop().await;
    }
}

/// Finding a retention operation's records (RollbackRetain, a policy's purge)
/// uses the partial index on the operation column, on both sinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_an_operation_are_found_by_the_partial_index_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let _backend = open_backend_at(&url).await;
        let lookup = "FROM msdyn_copilotinteraction WHERE msdyn_copilotinteraction.msft_retention_operationid = \
                      '0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d'";
        let plan = if let Some(path) = url.strip_prefix("sqlite://") {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut stmt =
                conn.prepare(&format!("EXPLAIN QUERY PLAN SELECT msdyn_copilotinteractionid {lookup}")).unwrap();
            let rows: Vec<String> =
                stmt.query_map([], |r| r.get::<_, String>(3)).unwrap().map(Result::unwrap).collect();
            rows.join("\n")
        } else {
            let client = copilot_ingest::backend::postgres::connect(&url).await.unwrap();
            client.batch_execute("SET enable_seqscan = off").await.unwrap();
            let rows = client.query(&format!("EXPLAIN SELECT msdyn_copilotinteractionid {lookup}"), &[]).await.unwrap();
            rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
        };
        assert!(plan.contains("msdyn_copilotinteraction_retention_op_partial_idx"), "{url}: {plan}");
    }
}

/// `kill -9` of the service in the middle of a scheduled run, on both sinks:
/// what the run counted is what it applied, and after a restart (the lease
/// of the dead instance's claim runs out) the same run completes with the
/// exact total, one operation, nothing retained twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_killed_with_sigkill_completes_after_a_restart_on_both_sinks() {
    const OLD: i64 = 20_000;
    let (urls, _db, dir) = sink_urls().await;
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("kill.toml");
    std::fs::write(
        &config_file,
        format!(
            "[retention]\nlease_seconds = 5\n\n[[retention.policies]]\nuniquename = \"nightly\"\n\
             starttime = \"2020-01-01T00:00:00Z\"\nrecurrence = \"FREQ=DAILY\"\npage_size = 10\ncriteria = \"{}\"\n",
            OLD_RECORDS_CRITERIA.replace('"', "\\\"")
        ),
    )
    .unwrap();
    for url in urls {
        seed(&*open_backend_at(&url).await, 0, OLD as usize, 25).await;
        let kafka = TestKafka::new(1);
        let spawn = || Service::spawn(kafka.run_binary(&url).arg("--config").arg(&config_file));
        let total = "SELECT COALESCE(max(total), 0) FROM copilot_ingest_retention_operation";
        let marked = "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1";
        let service = spawn();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while query_i64(&url, total).await == 0 {
            assert!(std::time::Instant::now() < deadline, "{url}: the due run never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::process::Command::new("kill").args(["-KILL", &service.id().to_string()]).status().unwrap();
        drop(service);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let counted = query_i64(&url, total).await;
        assert!(counted < OLD, "{url}: the run ended before the kill ({counted}); the test proves nothing");
        assert_eq!(query_i64(&url, marked).await, counted, "{url}: counted and applied differ after the kill");

        let service = spawn();
        let done = "SELECT count(*) FROM copilot_ingest_retention_policy WHERE last_outcome = 'Succeeded'";
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while query_i64(&url, done).await == 0 {
            assert!(std::time::Instant::now() < deadline, "{url}: the killed run was never resumed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(query_i64(&url, "SELECT count(*) FROM copilot_ingest_retention_operation").await, 1, "{url}");
        assert_eq!(query_i64(&url, total).await, OLD, "{url}: the resumed run's total is exact");
        assert_eq!(query_i64(&url, marked).await, OLD, "{url}");
        service.terminate();
    }
}
