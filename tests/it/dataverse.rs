//! The Dataverse sink end to end: the mock cluster → the pipeline → the Web API
//! emulator, with throttling, outages, expiring tokens, lost responses,
//! replays, record-level refusals and misconfiguration.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use copilot_ingest::config::{Config, Secret};
use copilot_ingest::generator::Generator;
use copilot_ingest::metrics::Metrics;

use crate::common::*;
use crate::dataverse_emulator::{Behaviour, CLIENT_ID, CLIENT_SECRET, Emulator, TENANT};

const LONG: Duration = Duration::from_secs(120);

fn dataverse_config(kafka: &TestKafka, emulator: &Emulator) -> Config {
    let mut config = kafka.config_with_sink("dataverse://contoso.crm.dynamics.com");
    let d = &mut config.sink.dataverse;
    d.tenant_id = TENANT.into();
    d.client_id = CLIENT_ID.into();
    d.client_secret = Secret::new(CLIENT_SECRET);
    d.authority = emulator.url.clone();
    d.api_url = emulator.url.clone();
    d.max_in_flight = 4;
    config.batch.max_records = 100;
    config
}

fn skipped(metrics: &Metrics, reason: &str) -> u64 {
    metrics.records_skipped_total.with_label_values(&[reason]).get()
}

/// No CreateMultiple may arrive while a 429's Retry-After runs. Requests
/// already on the wire when the 429 left are allowed a small grace.
fn assert_retry_after_respected(emulator: &Emulator) {
    let (throttled, arrivals) = emulator.observed(|o| (o.throttled.clone(), o.create_arrivals.clone()));
    assert!(!throttled.is_empty(), "the emulator throttled nothing");
    let grace = Duration::from_millis(250);
    for (at, retry_after) in &throttled {
        let early: Vec<Duration> =
            arrivals.iter().filter(|a| **a > *at + grace && **a < *at + *retry_after).map(|a| *a - *at).collect();
        assert!(early.is_empty(), "requests {early:?} after a 429 that said Retry-After {retry_after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataverse_exactly_once_through_throttling_outages_token_expiry_and_replay() {
    let kafka = TestKafka::new(4);
    // Tokens live an hour: the revocation below is then certain to meet a
    // cached token (a 401, one renewal, one retry); renewal ahead of expiry is
    // a unit test (`tokens_are_renewed_ahead_of_expiry`).
    let emulator = Emulator::start(Behaviour { latency: Duration::from_millis(5), ..Behaviour::default() });
    let config = dataverse_config(&kafka, &emulator);
    let workload = Workload::generate(81, 3000, 0.1);

    let pipeline = RunningPipeline::start(config.clone());
    let first_half = workload.messages.len() / 2;
    kafka.produce(&workload.messages[..first_half]).await;
    wait_for("some rows", LONG, || emulator.row_count() > 200).await;
    // Faults while the stream flows: throttling, a burst of 503s, a response
    // lost after the write happened, and every token revoked.
    emulator.change(|b| {
        b.throttle_next = 3;
        b.retry_after_secs = 1;
        b.unavailable_next = 4;
        b.lose_response_next = 2;
    });
    emulator.expire_tokens();
    kafka.produce(&workload.messages[first_half..]).await;
    pipeline.wait_handled(workload.messages.len() as u64, LONG).await;
    let metrics = std::sync::Arc::clone(&pipeline.metrics);
    pipeline.stop().await;

    assert_eq!(emulator.row_count(), workload.valid(), "every valid event is exactly one row");
    assert_eq!(kafka.read_dlq(workload.invalid()).len(), workload.invalid());
    assert_eq!(kafka.committed(), kafka.log_end(), "committed offsets equal the log end");
    assert_eq!(metrics.dlq_events_total.with_label_values(&["duplicate_id_conflict"]).get(), 0);
    assert_retry_after_respected(&emulator);
    let (tokens, unauthorized, missing) =
        emulator.observed(|o| (o.token_requests, o.unauthorized, o.missing_headers.clone()));
    assert!(unauthorized >= 1, "revoked tokens were refused");
    assert!(tokens >= 2, "tokens were renewed ({tokens} requested)");
    assert!(missing.is_empty(), "OData headers missing: {missing:?}");
    assert!(skipped(&metrics, "replay") >= 1, "the lost responses were resolved as replays");
    assert!(Metrics::total(&metrics.dataverse_responses_total) > 0);
    assert!(metrics.dataverse_responses_total.with_label_values(&["create", "429"]).get() >= 3);

    // Crash-and-replay: a consumer group that never committed reads it all
    // again. Every CreateMultiple now hits duplicate keys; identical content
    // is a replay, never a conflict.
    let mut replay = config.clone();
    replay.kafka.group_id = unique("replay");
    let pipeline = RunningPipeline::start(replay);
    pipeline.wait_handled(workload.messages.len() as u64, LONG).await;
    let metrics = std::sync::Arc::clone(&pipeline.metrics);
    pipeline.stop().await;
    assert_eq!(emulator.row_count(), workload.valid());
    assert_eq!(skipped(&metrics, "replay"), workload.valid() as u64);
    assert_eq!(metrics.dlq_events_total.with_label_values(&["duplicate_id_conflict"]).get(), 0);
    assert!(emulator.observed(|o| o.lookups) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataverse_refusals_dead_letter_only_the_offending_records_with_their_codes() {
    let kafka = TestKafka::new(1);
    // This environment's schema is stricter than ours: shorter names, one choice missing.
    let emulator = Emulator::start(Behaviour {
        max_name_length: 20,
        refused_interaction_types: vec![100230308],
        ..Behaviour::default()
    });
    let mut config = dataverse_config(&kafka, &emulator);
    config.batch.linger_ms = 500;
    let mut generator = Generator::new(5, 0.0);
    let mut messages = Vec::new();
    for i in 0..60 {
        let mut event = generator.valid_event();
        event["msdyn_name"] = format!("name {i}").into();
        event["msdyn_interactiontype"] = 100230301.into();
        if i == 17 {
            event["msdyn_name"] = "a name of thirty characters!!".into();
        }
        if i == 42 {
            event["msdyn_interactiontype"] = 100230308.into();
        }
        messages.push((format!("k{i}"), event.to_string().into_bytes()));
    }
    let pipeline = RunningPipeline::start(config);
    kafka.produce(&messages).await;
    pipeline.wait_handled(60, LONG).await;
    pipeline.stop().await;

    assert_eq!(emulator.row_count(), 58);
    let names: HashSet<String> = emulator
        .rows()
        .iter()
        .filter_map(|r| r.get("msdyn_name").and_then(|n| n.as_str()).map(str::to_owned))
        .collect();
    assert!(!names.contains("a name of thirty characters!!"));
    assert!(!names.contains("name 42"));
    let dlq = kafka.read_dlq(2);
    assert_eq!(dlq.len(), 2);
    let mut found: Vec<(i64, String, String)> = dlq
        .iter()
        .map(|m| {
            (
                header(m, "x-ingest-source-offset").unwrap().parse().unwrap(),
                header(m, "x-ingest-error-reason").unwrap(),
                header(m, "x-ingest-error-message").unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!((found[0].0, found[0].1.as_str()), (17, "sink_rejected"));
    assert!(found[0].2.contains("0x80044331"), "{}", found[0].2);
    assert_eq!((found[1].0, found[1].1.as_str()), (42, "sink_rejected"));
    assert!(found[1].2.contains("0x8004431A"), "{}", found[1].2);
    assert_eq!(kafka.committed(), kafka.log_end());
}

/// The binary against the emulator, with `[sink.dataverse]` from the environment.
fn run_against(kafka: &TestKafka, emulator: &Emulator, secret: &str) -> std::process::Command {
    let mut c = kafka.run_binary("dataverse://contoso.crm.dynamics.com");
    for (k, v) in emulator.env(secret) {
        c.env(k, v);
    }
    c
}

#[test]
fn dataverse_misconfiguration_exits_2_with_a_clear_reason() {
    let kafka = TestKafka::new(1);
    let emulator = Emulator::start(Behaviour::default());

    let wrong_secret = "wrong-secret-must-not-be-printed";
    let child = Service::spawn(run_against(&kafka, &emulator, wrong_secret).stderr(std::process::Stdio::piped()));
    let (code, stderr) = child.exit_within(Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused the client credentials"), "{stderr}");
    assert!(!stderr.contains(wrong_secret) && !stderr.contains(CLIENT_SECRET));

    emulator.change(|b| b.application_user = false);
    let child = Service::spawn(run_against(&kafka, &emulator, CLIENT_SECRET).stderr(std::process::Stdio::piped()));
    let (code, stderr) = child.exit_within(Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("0x80072560") && stderr.contains("application user"), "{stderr}");

    // Missing settings are configuration errors listed before anything connects.
    let out =
        kafka.run_binary("dataverse://contoso.crm.dynamics.com").stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["sink.dataverse.tenant_id", "sink.dataverse.client_id", "sink.dataverse.client_secret"] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
}

/// Events/s into the emulator at 50 ms per request, by `max_in_flight`.
/// Printed for BENCHMARKS.md (`--no-capture`); asserts only the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataverse_throughput_by_concurrency() {
    let events = 10_000;
    let workload = Workload::generate(99, events, 0.0);
    for max_in_flight in [1, 4, 16] {
        let kafka = TestKafka::new(4);
        let emulator = Emulator::start(Behaviour {
            latency: Duration::from_millis(50),
            dop_hint: Some(52),
            ..Behaviour::default()
        });
        let mut config = dataverse_config(&kafka, &emulator);
        config.sink.dataverse.max_in_flight = max_in_flight;
        kafka.produce(&workload.messages).await;
        let pipeline = RunningPipeline::start(config);
        // Timed from the first row, so group join and start-up are left out.
        wait_for("the first row", LONG, || emulator.row_count() > 0).await;
        let (started, rows_at_start) = (Instant::now(), emulator.row_count());
        pipeline.wait_handled(events as u64, LONG).await;
        let elapsed = started.elapsed();
        let timed = events - rows_at_start;
        pipeline.stop().await;
        assert_eq!(emulator.row_count(), events);
        let concurrent = emulator.observed(|o| o.max_concurrent_creates);
        assert!(concurrent <= max_in_flight, "{concurrent} concurrent requests with max_in_flight {max_in_flight}");
        eprintln!(
            "dataverse max_in_flight={max_in_flight:>2}: {timed} events in {:.2}s = {:.0} events/s (100 per request, 50 ms latency, peak {concurrent} concurrent)",
            elapsed.as_secs_f64(),
            timed as f64 / elapsed.as_secs_f64()
        );
    }
}
