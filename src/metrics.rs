//! Prometheus metrics (SPEC §7): base units, `_total` counters, low-cardinality labels.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub events_received_total: IntCounterVec,
    pub events_rejected_total: IntCounterVec,
    pub records_written_total: IntCounterVec,
    pub records_skipped_total: IntCounterVec,
    /// Consumer position resets past events the broker had already deleted.
    pub offset_resets_total: IntCounterVec,
    pub dlq_events_total: IntCounterVec,
    pub batches_total: IntCounterVec,
    pub batch_records: Histogram,
    pub sink_write_seconds: HistogramVec,
    pub end_to_end_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub control_commands_total: IntCounterVec,
    pub api_requests_total: IntCounterVec,
    pub retention_records_total: IntCounterVec,
    /// Scheduled policy runs by policy and outcome (Succeeded, Failed).
    pub retention_runs_total: IntCounterVec,
    /// When each policy last succeeded (its start time until it first does).
    pub retention_last_success_timestamp_seconds: GaugeVec,
    /// Each policy's nominal interval, for "has not succeeded within twice it".
    pub retention_policy_interval_seconds: GaugeVec,
    /// Records changed so far by the running operation of each kind.
    pub retention_operation_records: IntGaugeVec,
    /// Dataverse sink: HTTP responses by status class and throttling (429).
    pub dataverse_responses_total: IntCounterVec,
    pub postgres_batches_total: IntCounterVec,
    pub dataverse_token_renewals_total: IntCounterVec,
    /// Dataverse sink: the adaptive limit of concurrent requests.
    pub dataverse_concurrency_limit: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// Every registered metric's name, recorded as it was registered.
    names: Vec<String>,
}

/// The registry, keeping the name of each metric registered in it: a vector
/// with no series yet is left out of `gather`, but its name is exported all
/// the same (dashboards and alerts are checked against these names).
struct Registrar {
    registry: Registry,
    names: std::cell::RefCell<Vec<String>>,
}

impl Registrar {
    fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.names.borrow_mut().extend(collector.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(collector)
    }
}

fn gauge(registry: &Registrar, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn int_gauge(registry: &Registrar, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

/// The kinds of long operation the progress gauge reports.
pub const OPERATION_KINDS: [&str; 4] = ["BulkRetain", "PurgeRetainedContent", "BulkDelete", "RetentionPolicy"];

fn counter(registry: &Registrar, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

impl Metrics {
    /// Every series whose label values are known in advance exists from the
    /// start at 0 (Prometheus practice: `rate()` and alerts work before the
    /// first event). Per-topic and per-sink series appear when the pipeline
    /// starts, per-partition lag on assignment.
    fn export_known_series(&self) {
        for reason in crate::reason::Reason::ALL {
            self.events_rejected_total.with_label_values(&[reason.code()]);
            self.dlq_events_total.with_label_values(&[reason.code()]);
        }
        for reason in ["replay", "purged_replay", "deleted_replay", "dead_letter_replay"] {
            self.records_skipped_total.with_label_values(&[reason]);
        }
        for outcome in ["ok", "retried", "split"] {
            self.batches_total.with_label_values(&[outcome]);
        }
        for message in crate::transport::control::Message::ALL {
            for status in [
                crate::transport::control::Status::Succeeded,
                crate::transport::control::Status::Failed,
                crate::transport::control::Status::Rejected,
            ] {
                self.control_commands_total.with_label_values(&[message.name(), status.name()]);
            }
        }
        self.control_commands_total.with_label_values(&["invalid", crate::transport::control::Status::Rejected.name()]);
        for method in ["GET", "POST", "PATCH", "DELETE"] {
            for status in ["2xx", "4xx", "5xx"] {
                self.api_requests_total.with_label_values(&[method, status]);
            }
        }
        for action in ["retained", "rolled_back", "purged"] {
            self.retention_records_total.with_label_values(&[action]);
        }
        for kind in OPERATION_KINDS {
            self.retention_operation_records.with_label_values(&[kind]);
        }
    }

    pub fn new() -> Metrics {
        let registry = Registrar { registry: Registry::new(), names: Default::default() };
        let seconds_buckets =
            vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let batch_records = Histogram::with_opts(
            HistogramOpts::new("copilot_ingest_batch_records", "Records per batch written to the sink.")
                .buckets(vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sink_write_seconds = HistogramVec::new(
            HistogramOpts::new("copilot_ingest_sink_write_seconds", "Duration of one atomic batch write to the sink.")
                .buckets(seconds_buckets.clone()),
            &["sink"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let end_to_end_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "copilot_ingest_end_to_end_seconds",
                "From the Kafka message timestamp to the record being durable in the sink.",
            )
            .buckets(seconds_buckets),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "copilot_ingest_consumer_lag",
                "High watermark minus committed offset, per partition (messages).",
            ),
            &["topic", "partition"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let build_info =
            IntGaugeVec::new(Opts::new("copilot_ingest_build_info", "Build information; always 1."), &["version"])
                .unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(batch_records.clone())).unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(sink_write_seconds.clone())).unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(end_to_end_seconds.clone())).unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(consumer_lag.clone())).unwrap_or_else(|e| panic!("{e}"));
        let dataverse_concurrency_limit = IntGaugeVec::new(
            Opts::new(
                "copilot_ingest_dataverse_concurrency_limit",
                "Concurrent CreateMultiple requests the Dataverse sink currently allows (halved on 429).",
            ),
            &["sink"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(dataverse_concurrency_limit.clone())).unwrap_or_else(|e| panic!("{e}"));
        registry.register(Box::new(build_info.clone())).unwrap_or_else(|e| panic!("{e}"));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let metrics = Metrics {
            events_received_total: counter(
                &registry,
                "copilot_ingest_events_received_total",
                "Kafka messages received from the event topic.",
                &["topic"],
            ),
            events_rejected_total: counter(
                &registry,
                "copilot_ingest_events_rejected_total",
                "Events that failed decoding or validation, by reason code.",
                &["reason"],
            ),
            records_written_total: counter(
                &registry,
                "copilot_ingest_records_written_total",
                "Records durably created in the sink.",
                &["sink"],
            ),
            records_skipped_total: counter(
                &registry,
                "copilot_ingest_records_skipped_total",
                "Records not written because they were already there (replay) or purged (purged_replay) or deleted (deleted_replay), and redelivered invalid events already dead-lettered (dead_letter_replay).",
                &["reason"],
            ),
            offset_resets_total: counter(
                &registry,
                "copilot_ingest_offset_resets_total",
                "Times the consumer's position was reset past events the broker had already deleted (retention, truncation): those events are lost to the consumer group.",
                &["topic"],
            ),
            dlq_events_total: counter(
                &registry,
                "copilot_ingest_dlq_events_total",
                "Events acknowledged by the dead-letter topic, by reason code.",
                &["reason"],
            ),
            batches_total: counter(
                &registry,
                "copilot_ingest_batches_total",
                "Batch write attempts by outcome (ok, retried, split).",
                &["outcome"],
            ),
            control_commands_total: counter(
                &registry,
                "copilot_ingest_control_commands_total",
                "Control commands handled, by message and status.",
                &["message", "status"],
            ),
            api_requests_total: counter(
                &registry,
                "copilot_ingest_api_requests_total",
                "Web API requests answered, by method and status class (2xx, 4xx, 5xx).",
                &["method", "status"],
            ),
            retention_records_total: counter(
                &registry,
                "copilot_ingest_retention_records_total",
                "Records changed by control commands, by action (retained, rolled_back, purged).",
                &["action"],
            ),
            dataverse_responses_total: counter(
                &registry,
                "copilot_ingest_dataverse_responses_total",
                "Dataverse Web API responses by request (create, lookup, whoami) and status code; 429 = throttled.",
                &["request", "status"],
            ),
            postgres_batches_total: counter(
                &registry,
                "copilot_ingest_postgres_batches_total",
                "PostgreSQL batch writes by path: copy (bulk load, no replay in the batch) or insert \
                 (INSERT … ON CONFLICT after COPY met an existing id or a refused value).",
                &["path"],
            ),
            dataverse_token_renewals_total: counter(
                &registry,
                "copilot_ingest_dataverse_token_renewals_total",
                "OAuth2 access tokens acquired, by outcome (ok, failed).",
                &["outcome"],
            ),
            retention_runs_total: counter(
                &registry,
                "copilot_ingest_retention_runs_total",
                "Scheduled retention policy runs, by policy and outcome (Succeeded, Failed).",
                &["policy", "outcome"],
            ),
            retention_last_success_timestamp_seconds: gauge(
                &registry,
                "copilot_ingest_retention_last_success_timestamp_seconds",
                "Unix time of each retention policy's last successful run (its start time until the first).",
                &["policy"],
            ),
            retention_policy_interval_seconds: gauge(
                &registry,
                "copilot_ingest_retention_policy_interval_seconds",
                "Each scheduled retention policy's nominal interval (months as 31 days, years as 366).",
                &["policy"],
            ),
            retention_operation_records: int_gauge(
                &registry,
                "copilot_ingest_retention_operation_records",
                "Records changed so far by the running long operation of each kind (0 when none runs).",
                &["operation_kind"],
            ),
            dataverse_concurrency_limit,
            batch_records,
            sink_write_seconds,
            end_to_end_seconds,
            consumer_lag,
            build_info,
            names: registry.names.into_inner(),
            registry: registry.registry,
        };
        metrics.export_known_series();
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Every metric name this process exports.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Sum of a counter over all label values.
    pub fn total(counter: &IntCounterVec) -> u64 {
        use prometheus::core::Collector;
        counter.collect().iter().flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().get_value() as u64)).sum()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `q` quantile of a histogram given as `(upper bound, cumulative count)`
/// buckets in ascending order, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does). `None` without observations.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last().map(|b| b.1).filter(|t| *t > 0.0)?;
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(upper, count) in buckets {
        if count >= rank {
            if upper.is_infinite() {
                return Some(prev.0);
            }
            let within = ((rank - prev.1) / (count - prev.1).max(1.0)).clamp(0.0, 1.0);
            return Some(prev.0 + (upper - prev.0) * within);
        }
        prev = (upper, count);
    }
    Some(prev.0)
}

/// The `q` quantile of a registered histogram (see [`bucket_quantile`]).
pub fn histogram_quantile(histogram: &Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let families = histogram.collect();
    let h = families.first()?.get_metric().first()?.get_histogram().clone();
    let mut buckets: Vec<(f64, f64)> =
        h.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count() as f64)).collect();
    buckets.push((f64::INFINITY, h.get_sample_count() as f64));
    bucket_quantile(&buckets, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names an operator file refers to (histogram series map to their family).
    fn referenced(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("copilot_ingest_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            names.push(family.to_owned());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn dashboards_and_alerts_reference_only_exported_metrics() {
        let exported = Metrics::new().names();
        let root = env!("CARGO_MANIFEST_DIR");
        for file in ["deploy/grafana/dashboards/copilot-ingest.json", "deploy/prometheus/alerts.yml"] {
            let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            if file.ends_with(".json") {
                serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is JSON");
            }
            let names = referenced(&text);
            assert!(!names.is_empty(), "{file} references no metric");
            for name in names {
                assert!(exported.contains(&name), "{file} references {name}, which is not exported");
            }
        }
    }

    #[test]
    fn every_spec_metric_is_exported_with_help() {
        let m = Metrics::new();
        let names = m.names();
        for name in [
            "copilot_ingest_events_received_total",
            "copilot_ingest_events_rejected_total",
            "copilot_ingest_records_written_total",
            "copilot_ingest_records_skipped_total",
            "copilot_ingest_dlq_events_total",
            "copilot_ingest_batches_total",
            "copilot_ingest_batch_records",
            "copilot_ingest_sink_write_seconds",
            "copilot_ingest_end_to_end_seconds",
            "copilot_ingest_consumer_lag",
            "copilot_ingest_control_commands_total",
            "copilot_ingest_build_info",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
        assert!(m.render().contains("copilot_ingest_build_info{version=\""));
        // Every family the exposition holds is among the names, and the
        // PostgreSQL batch counter too, which a hand-kept list once missed.
        for family in m.render().lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap_or_default();
            assert!(names.iter().any(|n| n == name), "{name} not among the names");
        }
        assert!(names.iter().any(|n| n == "copilot_ingest_postgres_batches_total"));
        assert!(names.iter().any(|n| n == "copilot_ingest_offset_resets_total"));
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(bucket_quantile(&buckets, 0.5), Some(0.1));
        assert!((bucket_quantile(&buckets, 0.7).unwrap() - 0.3).abs() < 1e-9);
        assert!((bucket_quantile(&buckets, 0.99).unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(bucket_quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        let beyond = [(1.0, 10.0), (f64::INFINITY, 20.0)];
        assert_eq!(bucket_quantile(&beyond, 0.99), Some(1.0), "the +Inf bucket reports its lower bound");
        let m = Metrics::new();
        assert_eq!(histogram_quantile(&m.end_to_end_seconds, 0.5), None);
        for _ in 0..10 {
            m.end_to_end_seconds.observe(0.2);
        }
        let p50 = histogram_quantile(&m.end_to_end_seconds, 0.5).unwrap();
        assert!((0.1..=0.25).contains(&p50), "{p50}");
    }
}
