//! The ingest pipeline: source → normalize → batch → sink, with dead-lettering
//! and the offset watermark. One task owns all the state and reacts, in a
//! `biased` select, to (1) shutdown, (2) completed writes and dead letters,
//! (3) the linger timer, (4) new messages — the last only while fewer than
//! `max_in_flight` batches are being written, which is what pauses the source.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::{Backend, Outcome};
use crate::backoff::Backoff;
use crate::batch::{Batch, Batcher, Entry};
use crate::config::{Config, SinkUrl};
use crate::decode::{Decoded, Decoder};
use crate::metrics::Metrics;
use crate::normalize::Normalizer;
use crate::reason::{Reason, Rejection};
use crate::record::Origin;
use crate::transport::http::Readiness;
use crate::transport::ingest::dlq;
use crate::transport::ingest::offsets::OffsetTracker;
use crate::transport::ingest::source::{Inbound, Source, SourceEvent, consumer_config};

/// Dead letters in flight before the source is paused.
const MAX_DLQ_IN_FLIGHT: usize = 10_000;
/// Messages held back while their partition waits for a schema; past this,
/// consumption pauses (the source's bounded channel fills).
const MAX_PARKED: usize = 20_000;
/// Registry look-ups in flight at once.
const MAX_SCHEMA_FETCHES: usize = 8;
/// The single subscribed topic's index in the offset tracker.
const TOPIC: u32 = 0;

enum Completion {
    Batch {
        batch: Arc<Batch>,
        outcomes: Vec<Outcome>,
    },
    /// `resent`: the ledger says it was dead-lettered before (a redelivery); not sent again.
    DeadLetter {
        partition: i32,
        offset: i64,
        reason: Reason,
        resent: bool,
    },
}

/// How often the INFO summary line is logged (instead of per-event logs).
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The periodic summary: rates since the previous line, and the lag.
struct Summary {
    at: std::time::Instant,
    received: u64,
    written: u64,
    dead_lettered: u64,
}

impl Summary {
    fn new(metrics: &Metrics) -> Summary {
        Summary {
            at: std::time::Instant::now(),
            received: Metrics::total(&metrics.events_received_total),
            written: Metrics::total(&metrics.records_written_total),
            dead_lettered: Metrics::total(&metrics.dlq_events_total),
        }
    }

    fn log(&mut self, metrics: &Metrics, batches_in_flight: usize) {
        let now = Summary::new(metrics);
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let lag: i64 = {
            use prometheus::core::Collector;
            metrics
                .consumer_lag
                .collect()
                .iter()
                .flat_map(|mf| mf.get_metric().iter().map(|m| m.get_gauge().get_value() as i64))
                .sum()
        };
        tracing::info!(
            received_per_s = ((now.received - self.received) as f64 / secs).round(),
            written_per_s = ((now.written - self.written) as f64 / secs).round(),
            dead_lettered_per_s = ((now.dead_lettered - self.dead_lettered) as f64 / secs).round(),
            written_total = now.written,
            lag,
            batches_in_flight,
            "progress"
        );
        *self = now;
    }
}

/// Runs a sink call until it succeeds, with backoff: the ledger is as
/// necessary as the write itself, and its outage pauses like the sink's.
async fn retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::backend::BackendError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                // Every waiting dead letter retries on its own: one warning for all of them.
                static WARNINGS: std::sync::LazyLock<crate::kafka_log::Throttle> =
                    std::sync::LazyLock::new(crate::kafka_log::Throttle::default);
                if backoff.attempts() == 0
                    && let Some(suppressed) = WARNINGS.allow("ledger")
                {
                    tracing::warn!(error = %e, suppressed, "dead-letter ledger unavailable; retrying");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Opens the configured sink, retrying while it is unreachable.
/// A configuration the sink refuses (credentials, permissions) ends it with
/// [`crate::config::FatalConfig`]. `None`: shutdown came first.
pub async fn open_sink(
    config: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<Backend>>> {
    let url: SinkUrl = config.sink_url().map_err(anyhow::Error::msg)?;
    // Connections beyond the batches in flight, so that control commands and
    // Web API reads never wait for a batch write to return its connection.
    const READ_CONNECTIONS: usize = 4;
    let connections = config.batches_in_flight() + READ_CONNECTIONS;
    let mut backoff = Backoff::default();
    loop {
        match Backend::open(&url, &config.kafka.topic, connections, metrics).await {
            Ok(s) => return Ok(Some(Arc::new(s))),
            Err(crate::backend::BackendError::Fatal(message)) => {
                return Err(crate::config::FatalConfig(format!("sink configuration: {message}")).into());
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "sink unavailable at start; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // Nothing was consumed yet, so stopping here is as clean as
                    // any other shutdown.
                    _ = shutdown.changed() => return Ok(None),
                }
            }
        }
    }
}

/// How long a revocation may wait for in-flight records: two thirds of the
/// session timeout, so a slow drain never costs the group membership.
fn revoke_timeout(options: &[(String, String)]) -> Duration {
    let session_ms = options
        .iter()
        .find(|(k, _)| k == "session.timeout.ms")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(crate::transport::ingest::source::SESSION_TIMEOUT_MS);
    Duration::from_millis(session_ms * 2 / 3)
}

/// Librdkafka options from `[kafka.options]`.
pub fn kafka_options(config: &Config) -> Vec<(String, String)> {
    config.kafka.options.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect()
}

/// Schema ids being looked up in the registry, off the ordered path: a
/// message whose schema is unknown parks its partition (that partition's
/// later messages queue behind it, in order), while every other partition
/// goes on. Looked-up answers release the parked messages.
#[derive(Default)]
struct SchemaFetches {
    parked: HashMap<i32, VecDeque<Inbound>>,
    parked_total: usize,
    /// Ids being fetched (or waiting to retry), and those waiting for a slot.
    in_flight: HashSet<u32>,
    queued: VecDeque<u32>,
    backoff: HashMap<u32, Backoff>,
    /// The wait before an id's next attempt, after a transient failure.
    retry_delay: HashMap<u32, Duration>,
    tasks: JoinSet<(u32, Result<Option<String>, String>)>,
}

impl SchemaFetches {
    fn park(&mut self, message: Inbound) {
        self.parked_total += 1;
        self.parked.entry(message.partition).or_default().push_back(message);
    }

    /// Asks the registry for `id` unless it is already being asked.
    fn request(&mut self, id: u32, registry: Option<crate::avro::Registry>) {
        if self.in_flight.contains(&id) || self.queued.contains(&id) {
            return;
        }
        if self.tasks.len() >= MAX_SCHEMA_FETCHES {
            self.queued.push_back(id);
            return;
        }
        self.in_flight.insert(id);
        let delay = self.retry_delay.remove(&id).unwrap_or_default();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(registry) = registry else { return (id, Ok(None)) };
            let answer = tokio::task::spawn_blocking(move || registry.schema(id))
                .await
                .unwrap_or_else(|e| Err(format!("registry look-up failed: {e}")));
            (id, answer)
        });
    }

    /// Drops the parked messages of partitions that are gone (revoked): they
    /// were never received, so they are redelivered to the new owner.
    fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            if let Some(queue) = self.parked.remove(p) {
                self.parked_total -= queue.len();
            }
        }
    }
}

struct State {
    config: Config,
    metrics: Arc<Metrics>,
    sink: Arc<Backend>,
    producer: Arc<dlq::Producer>,
    decoder: Decoder,
    tracker: OffsetTracker,
    batcher: Batcher,
    tasks: JoinSet<Completion>,
    schemas: SchemaFetches,
    max_batches_in_flight: usize,
    batches_in_flight: usize,
    dead_letters_in_flight: usize,
    assigned: HashSet<i32>,
    touched: HashSet<i32>,
    topic: Arc<str>,
    received: prometheus::IntCounter,
    replays: prometheus::IntCounter,
    purged_replays: prometheus::IntCounter,
    deleted_replays: prometheus::IntCounter,
    written: prometheus::IntCounter,
}

impl State {
    fn handle_messages(&mut self, messages: Vec<Inbound>) {
        let mut full = Vec::new();
        // One shared handle per chunk, not a String per message.
        let topic = Arc::clone(&self.topic);
        let mut received = 0u64;
        for message in messages {
            if self.schemas.parked.contains_key(&message.partition) {
                // Behind a message that waits for its schema: keep the order.
                self.prefetch_schema(&message);
                self.schemas.park(message);
                continue;
            }
            if let Some(message) = self.accept(message, &topic, &mut full) {
                self.schemas.park(message);
            } else {
                received += 1;
            }
        }
        self.received.inc_by(received);
        for batch in full {
            self.spawn_batch(batch);
        }
    }

    /// Decodes one message and hands it on (batch or dead letter). A message
    /// whose schema must first be fetched is returned, to be parked.
    fn accept(&mut self, message: Inbound, topic: &Arc<str>, full: &mut Vec<Batch>) -> Option<Inbound> {
        let now = Utc::now();
        let origin = Origin { topic, partition: message.partition, offset: message.offset };
        let decoded = match &message.payload {
            Some(payload) => self.decoder.decode(payload, Some(&origin), now),
            None => Decoded::Rejected(Rejection::new(Reason::MalformedJson, None, "message has no value")),
        };
        if !matches!(decoded, Decoded::NeedsSchema(_))
            && !self.tracker.received(TOPIC, message.partition, message.offset)
        {
            tracing::debug!(partition = message.partition, offset = message.offset, "message delivered again");
        }
        match decoded {
            Decoded::Record(record) => self.batcher.push(Entry { record, message }, full),
            Decoded::Rejected(rejection) => {
                self.metrics.events_rejected_total.with_label_values(&[rejection.reason.code()]).inc();
                self.spawn_dead_letter(message, rejection);
            }
            Decoded::NeedsSchema(id) => {
                self.schemas.request(id, self.decoder.avro.registry());
                return Some(message);
            }
        }
        None
    }

    /// Starts the look-up of a parked message's schema early, so that many
    /// unknown ids on one partition are fetched side by side.
    fn prefetch_schema(&mut self, message: &Inbound) {
        if let Some((id, _)) = message.payload.as_deref().and_then(crate::avro::frame)
            && matches!(self.decoder.avro.lookup(id), crate::avro::Lookup::Fetch)
        {
            self.schemas.request(id, self.decoder.avro.registry());
        }
    }

    /// A registry answer arrived: record it, or retry a transient failure
    /// with backoff (consumption of that partition waits; nothing is
    /// dead-lettered for an outage). Then parked messages go on.
    fn handle_schema(&mut self, id: u32, answer: Result<Option<String>, String>) {
        self.schemas.in_flight.remove(&id);
        match answer {
            Ok(schema) => {
                self.schemas.backoff.remove(&id);
                self.decoder.avro.apply_fetched(id, schema);
            }
            Err(e) => {
                let backoff = self.schemas.backoff.entry(id).or_default();
                let delay = backoff.next_delay();
                tracing::warn!(schema_id = id, error = %e, retry_in_ms = delay.as_millis() as u64, "schema registry unavailable; that partition waits");
                self.schemas.retry_delay.insert(id, delay);
                self.schemas.request(id, self.decoder.avro.registry());
            }
        }
        while self.schemas.tasks.len() < MAX_SCHEMA_FETCHES
            && let Some(next) = self.schemas.queued.pop_front()
        {
            self.schemas.request(next, self.decoder.avro.registry());
        }
        self.release_parked();
    }

    /// Runs parked messages whose schema is now known, partition by
    /// partition, in order, up to the next one still waiting.
    fn release_parked(&mut self) {
        let topic = Arc::clone(&self.topic);
        let mut full = Vec::new();
        let mut received = 0u64;
        let partitions: Vec<i32> = self.schemas.parked.keys().copied().collect();
        for p in partitions {
            let Some(mut queue) = self.schemas.parked.remove(&p) else { continue };
            while let Some(message) = queue.pop_front() {
                self.schemas.parked_total -= 1;
                if let Some(waiting) = self.accept(message, &topic, &mut full) {
                    queue.push_front(waiting);
                    self.schemas.parked_total += 1;
                    break;
                }
                received += 1;
            }
            if !queue.is_empty() {
                self.schemas.parked.insert(p, queue);
            }
        }
        self.received.inc_by(received);
        for batch in full {
            self.spawn_batch(batch);
        }
    }

    fn flush(&mut self) {
        if let Some(batch) = self.batcher.take() {
            self.spawn_batch(batch);
        }
    }

    fn spawn_batch(&mut self, batch: Batch) {
        let sink = Arc::clone(&self.sink);
        let metrics = Arc::clone(&self.metrics);
        self.batches_in_flight += 1;
        tracing::debug!(records = batch.len(), "batch closed");
        self.tasks.spawn(async move {
            let batch = Arc::new(batch);
            let outcomes = crate::operations::create_multiple::write_batch(&sink, Arc::clone(&batch), &metrics).await;
            Completion::Batch { batch, outcomes }
        });
    }

    fn spawn_dead_letter(&mut self, message: Inbound, rejection: Rejection) {
        let producer = Arc::clone(&self.producer);
        let dlq_topic = self.config.kafka.dlq_topic.clone();
        let topic = self.config.kafka.topic.clone();
        let sink = Arc::clone(&self.sink);
        self.dead_letters_in_flight += 1;
        self.tasks.spawn(async move {
            let (partition, offset) = (message.partition, message.offset);
            // The ledger makes a redelivered invalid message (after a crash or a
            // lost session) not a second dead letter. A crash between the
            // broker's ack and the ledger write can still repeat one.
            let letter = crate::backend::DeadLetterKey::new(
                &topic,
                partition,
                offset,
                message.key.as_deref(),
                message.payload.as_deref(),
            );
            let resent = retry(|| sink.dead_letter_sent(&letter)).await;
            if !resent {
                dlq::dead_letter(&producer, &dlq_topic, &topic, &message, &rejection).await;
                retry(|| sink.record_dead_letter(&letter)).await;
            }
            Completion::DeadLetter { partition, offset, reason: rejection.reason, resent }
        });
    }

    fn handle_completion(&mut self, completion: Completion) {
        match completion {
            Completion::Batch { batch, outcomes } => {
                self.batches_in_flight -= 1;
                let now_ms = Utc::now().timestamp_millis();
                let mut written = 0u64;
                for (entry, outcome) in batch.iter().zip(outcomes) {
                    let m = &entry.message;
                    match outcome {
                        Outcome::Written => {
                            written += 1;
                            if let Some(ts) = m.timestamp_ms {
                                self.metrics.end_to_end_seconds.observe(((now_ms - ts).max(0) as f64) / 1000.0);
                            }
                        }
                        Outcome::Replay => self.replays.inc(),
                        Outcome::PurgedReplay => self.purged_replays.inc(),
                        Outcome::DeletedReplay => self.deleted_replays.inc(),
                        Outcome::Rejected(rejection) => {
                            tracing::warn!(partition = m.partition, offset = m.offset, reason = %rejection.reason, "record refused by the sink; dead-lettering");
                            self.spawn_dead_letter(m.clone(), rejection);
                            continue;
                        }
                    }
                    if self.tracker.done(TOPIC, m.partition, m.offset) {
                        self.touched.insert(m.partition);
                    }
                }
                self.written.inc_by(written);
            }
            Completion::DeadLetter { partition, offset, reason, resent } => {
                self.dead_letters_in_flight -= 1;
                if resent {
                    self.metrics.records_skipped_total.with_label_values(&["dead_letter_replay"]).inc();
                } else {
                    self.metrics.dlq_events_total.with_label_values(&[reason.code()]).inc();
                }
                if self.tracker.done(TOPIC, partition, offset) {
                    self.touched.insert(partition);
                }
            }
        }
    }

    /// Stores the watermark of every partition that advanced; librdkafka
    /// commits stored offsets (periodically, and synchronously on revocation
    /// and shutdown).
    fn store_offsets(&mut self, source: &Source) {
        if self.touched.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for partition in self.touched.drain() {
            if !self.assigned.contains(&partition) {
                continue;
            }
            if let Some(next) = self.tracker.committable_for(TOPIC, partition) {
                let _ = tpl.add_partition_offset(&self.config.kafka.topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() > 0
            && let Err(e) = source.consumer.store_offsets(&tpl)
        {
            tracing::debug!(error = %e, "storing offsets failed (partition no longer assigned?)");
        }
    }

    fn can_take(&self) -> bool {
        self.batches_in_flight < self.max_batches_in_flight
            && self.dead_letters_in_flight < MAX_DLQ_IN_FLIGHT
            && self.schemas.parked_total < MAX_PARKED
    }
}

/// Runs the pipeline until `shutdown` turns true, then drains: stop fetching,
/// flush, wait for in-flight writes (up to the drain timeout), commit.
pub async fn run(
    config: Config,
    brokers: &str,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(sink) = open_sink(&config, &metrics, &mut shutdown).await? else {
        tracing::info!("stopped while waiting for the sink; nothing was consumed");
        return Ok(());
    };
    run_on(config, brokers, sink, metrics, readiness, shutdown).await
}

/// [`run`] on a backend already open (the service shares it with the control consumer).
pub async fn run_on(
    config: Config,
    brokers: &str,
    sink: Arc<Backend>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let max_batches_in_flight = config.batches_in_flight();
    readiness.sink_reachable.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(sink = sink.kind(), "sink ready");
    // The sink's own series exist from here on, at 0.
    metrics.sink_write_seconds.with_label_values(&[sink.kind()]);
    if sink.kind() == "postgres" {
        for path in ["copy", "insert"] {
            metrics.postgres_batches_total.with_label_values(&[path]);
        }
    }
    let ping = {
        let sink = Arc::clone(&sink);
        let readiness = Arc::clone(&readiness);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let ok = tokio::time::timeout(Duration::from_secs(5), sink.ping()).await.unwrap_or(false);
                readiness.sink_reachable.store(ok, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };

    let options = kafka_options(&config);
    let producer = Arc::new(dlq::create_producer(&dlq::producer_config(brokers, &options), "dead-letter producer")?);
    let (events_tx, mut events) = mpsc::channel::<SourceEvent>(4);
    let drain_timeout = Duration::from_millis(config.shutdown.drain_timeout_ms);
    let mut source = Source::start(
        consumer_config(brokers, &config.kafka.group_id, &options),
        &config.kafka.topic,
        events_tx,
        Arc::clone(&readiness),
        Arc::clone(&metrics),
        revoke_timeout(&options),
    )?;
    tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, "consuming");

    let received = metrics.events_received_total.with_label_values(&[&config.kafka.topic]);
    metrics.offset_resets_total.with_label_values(&[&config.kafka.topic]);
    let written = metrics.records_written_total.with_label_values(&[sink.kind()]);
    let replays = metrics.records_skipped_total.with_label_values(&["replay"]);
    let purged_replays = metrics.records_skipped_total.with_label_values(&["purged_replay"]);
    let deleted_replays = metrics.records_skipped_total.with_label_values(&["deleted_replay"]);
    let topic: Arc<str> = Arc::from(config.kafka.topic.as_str());
    let mut state = State {
        decoder: Decoder {
            normalizer: Normalizer { unknown_fields: config.validation.unknown_fields, ..Normalizer::default() },
            format: config.kafka.format,
            avro: crate::avro::AvroSchemas::load(&config.avro).map_err(|e| anyhow::anyhow!(e.join("; ")))?,
        },
        batcher: Batcher::new(
            config.batch.max_records,
            config.batch.max_bytes,
            Duration::from_millis(config.batch.linger_ms),
        ),
        config,
        metrics,
        sink,
        producer,
        tracker: OffsetTracker::new(),
        tasks: JoinSet::new(),
        schemas: SchemaFetches::default(),
        max_batches_in_flight,
        batches_in_flight: 0,
        dead_letters_in_flight: 0,
        assigned: HashSet::new(),
        touched: HashSet::new(),
        topic,
        replays,
        purged_replays,
        deleted_replays,
        received,
        written,
    };
    let mut revoking: Option<(Vec<i32>, std::sync::mpsc::SyncSender<()>, tokio::time::Instant)> = None;
    let mut summary = Summary::new(&state.metrics);
    let mut summary_tick = tokio::time::interval_at(tokio::time::Instant::now() + SUMMARY_EVERY, SUMMARY_EVERY);

    loop {
        let linger = state.batcher.deadline();
        let taking = revoking.is_none() && state.can_take();
        let revoke_deadline = revoking.as_ref().map(|(_, _, deadline)| *deadline);
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(joined) = state.tasks.join_next(), if !state.tasks.is_empty() => {
                match joined {
                    Ok(c) => state.handle_completion(c),
                    Err(e) => tracing::error!(error = %e, "write task failed; its records stay uncommitted"),
                }
                state.store_offsets(&source);
            }
            Some(fetched) = state.schemas.tasks.join_next(), if !state.schemas.tasks.is_empty() => {
                match fetched {
                    Ok((id, answer)) => state.handle_schema(id, answer),
                    Err(e) => tracing::error!(error = %e, "schema look-up task failed"),
                }
            }
            _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() => state.flush(),
            _ = summary_tick.tick() => summary.log(&state.metrics, state.batches_in_flight),
            // The consumer thread stopped waiting for the hand-off: stop too, or
            // the events behind the revocation (the next assignment) would wait
            // for writes that may retry for a long time.
            _ = tokio::time::sleep_until(revoke_deadline.unwrap_or_else(tokio::time::Instant::now)), if revoke_deadline.is_some() => {
                if let Some((partitions, _done, _)) = revoking.take() {
                    state.store_offsets(&source);
                    state.schemas.forget(&partitions);
                    for p in &partitions {
                        state.tracker.forget(TOPIC, *p);
                        state.assigned.remove(p);
                    }
                }
            }
            event = events.recv(), if taking => match event {
                Some(SourceEvent::Messages(m)) => state.handle_messages(m),
                Some(SourceEvent::Assigned(ps)) => state.assigned.extend(ps),
                Some(SourceEvent::Fatal(reason)) => {
                    ping.abort();
                    return Err(crate::config::FatalConfig(format!(
                        "Kafka refused the connection's security settings ({reason}); check [kafka.options] \
                         (ssl.ca.location, sasl.username, sasl.password, security.protocol)"
                    ))
                    .into());
                }
                Some(SourceEvent::Revoked { partitions, done, deadline }) => {
                    // Finish everything received so far before the partitions go.
                    state.flush();
                    revoking = Some((partitions, done, tokio::time::Instant::from_std(deadline)));
                }
                None => break,
            },
        }
        if state.tasks.is_empty()
            && let Some((partitions, done, _)) = revoking.take()
        {
            state.store_offsets(&source);
            state.schemas.forget(&partitions);
            for p in &partitions {
                state.tracker.forget(TOPIC, *p);
                state.assigned.remove(p);
            }
            let _ = done.send(());
        }
    }

    tracing::info!("shutting down: stop fetching, flush, commit");
    tokio::task::block_in_place(|| source.stop_fetching());
    while let Ok(event) = events.try_recv() {
        match event {
            SourceEvent::Messages(m) => state.handle_messages(m),
            SourceEvent::Assigned(ps) => state.assigned.extend(ps),
            SourceEvent::Revoked { done, .. } => drop(done),
            SourceEvent::Fatal(_) => {}
        }
    }
    state.flush();
    let deadline = tokio::time::Instant::now() + drain_timeout;
    while !state.tasks.is_empty() {
        match tokio::time::timeout_at(deadline, state.tasks.join_next()).await {
            Ok(Some(Ok(c))) => state.handle_completion(c),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    in_flight = state.tasks.len(),
                    "drain timeout: unfinished records stay uncommitted and will be redelivered"
                );
                break;
            }
        }
    }
    state.tasks.abort_all();
    // Parked messages were never received: they stay uncommitted and are redelivered.
    state.schemas.tasks.abort_all();
    state.store_offsets(&source);
    let committed = tokio::task::block_in_place(|| source.consumer.commit_consumer_state(CommitMode::Sync));
    match committed {
        Ok(()) => tracing::info!("offsets committed"),
        Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed; uncommitted records will be redelivered"),
    }
    tokio::task::block_in_place(|| source.close());
    ping.abort();
    Ok(())
}
