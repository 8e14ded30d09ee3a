//! Prometheus metrics (SPEC §7): base units, `_total` counters, low-cardinality labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub events_received_total: IntCounterVec,
    pub events_rejected_total: IntCounterVec,
    pub records_written_total: IntCounterVec,
    pub records_skipped_total: IntCounterVec,
    pub dlq_events_total: IntCounterVec,
    pub batches_total: IntCounterVec,
    pub batch_records: Histogram,
    pub sink_write_seconds: HistogramVec,
    pub end_to_end_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub control_commands_total: IntCounterVec,
    pub build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
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
        registry.register(Box::new(build_info.clone())).unwrap_or_else(|e| panic!("{e}"));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
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
                "Records not written because they were already there (replay) or purged (purged_replay).",
                &["reason"],
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
            batch_records,
            sink_write_seconds,
            end_to_end_seconds,
            consumer_lag,
            build_info,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
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
