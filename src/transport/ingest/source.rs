//! The Kafka source: a consumer-group member polled on a dedicated thread.
//!
//! The thread forwards messages in chunks over a bounded channel. When the
//! pipeline stops draining that channel (its sink writes are at capacity) the
//! thread pauses every assigned partition instead of buffering, and keeps
//! polling so the group membership and rebalances stay serviced. Offsets are
//! never stored here: the pipeline stores the contiguous watermark
//! (`enable.auto.offset.store=false`), and librdkafka commits what was stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::transport::http::Readiness;

/// A Kafka message, owned, as the pipeline needs it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub partition: i32,
    pub offset: i64,
    /// Message timestamp (create or log-append time), epoch milliseconds.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Inbound {
    /// A position with no message behind it: records created by a message of
    /// the table (CreateMultiple through the Web API or the control topic)
    /// and the benchmark's writer-alone rows.
    pub fn without_message(partition: i32, offset: i64) -> Inbound {
        Inbound { partition, offset, timestamp_ms: None, key: None, payload: None, headers: Vec::new() }
    }

    #[cfg(test)]
    pub fn for_test(partition: i32, offset: i64, payload: Vec<u8>) -> Inbound {
        Inbound { payload: Some(payload), ..Inbound::without_message(partition, offset) }
    }

    fn from_message<M: Message>(m: &M) -> Inbound {
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        Inbound {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// What the consumer thread tells the pipeline, in order.
#[derive(Debug)]
pub enum SourceEvent {
    Messages(Vec<Inbound>),
    Assigned(Vec<i32>),
    /// The partitions are being taken away. The pipeline finishes their
    /// in-flight records, stores their offsets and then answers on `done`;
    /// the consumer thread commits synchronously before letting the rebalance
    /// proceed. At `deadline` the consumer thread stops waiting, and so does
    /// the pipeline: what is still in flight is redelivered to the new owner.
    Revoked {
        partitions: Vec<i32>,
        done: std::sync::mpsc::SyncSender<()>,
        deadline: Instant,
    },
    /// The brokers refused the connection's security settings (TLS
    /// verification, SASL authentication) before it ever worked.
    Fatal(String),
}

/// Messages per chunk sent over the channel: one channel send per chunk
/// rather than per message.
const CHUNK: usize = 512;
/// How long the thread waits for room in the channel before pausing the
/// partitions. Short waits are plain backpressure (librdkafka's bounded
/// prefetch queue stops fetching by itself); pausing on every full channel
/// would thrash, since each pause drops the prefetched data and each resume
/// fetches it again. Pausing is for a sink that stays slow or down: it lets
/// the thread keep polling, which keeps the group membership alive.
const PATIENCE: Duration = Duration::from_millis(500);

pub struct SourceContext {
    events: mpsc::Sender<SourceEvent>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    topic: String,
    revoke_timeout: Duration,
    /// Set once the pipeline has drained: rebalances caused by closing the
    /// consumer need no hand-off.
    closing: AtomicBool,
    /// Messages polled but not yet accepted by the channel.
    pending: Mutex<Vec<Inbound>>,
    throttle: crate::kafka_log::Throttle,
    /// A broker answered at least once: later security errors are retried.
    connected: AtomicBool,
    fatal: Mutex<Option<String>>,
}

impl SourceContext {
    fn send_blocking(&self, mut event: SourceEvent, deadline: Instant) -> bool {
        loop {
            match self.events.try_send(event) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(e)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    event = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if crate::kafka_log::skips_events(fac, log_message) {
            self.metrics.offset_resets_total.with_label_values(&[&self.topic]).inc();
        }
        crate::kafka_log::log(&self.throttle, "consumer", level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        if let Some(RDKafkaErrorCode::AllBrokersDown) = error.rdkafka_error_code() {
            self.readiness.broker_reachable.store(false, Ordering::Relaxed);
        }
        if !self.connected.load(Ordering::Relaxed)
            && crate::kafka_log::is_fatal(&error, reason)
            && let Ok(mut fatal) = self.fatal.lock()
        {
            fatal.get_or_insert_with(|| reason.to_owned());
        }
        crate::kafka_log::error(&self.throttle, "consumer", &error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().any(|b| b.state == "UP");
        if up {
            self.connected.store(true, Ordering::Relaxed);
        }
        self.readiness.broker_reachable.store(up || statistics.brokers.is_empty(), Ordering::Relaxed);
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (partition, p) in &topic.partitions {
                if *partition < 0 || p.fetch_state == "none" {
                    continue;
                }
                // Lag against what is committed; clamped at 0 (the committed
                // offset may be unknown or below the log start).
                let lag = if p.committed_offset >= 0 && p.hi_offset >= 0 {
                    (p.hi_offset - p.committed_offset).max(0)
                } else if p.hi_offset >= 0 && p.lo_offset >= 0 {
                    (p.hi_offset - p.lo_offset).max(0)
                } else {
                    0
                };
                self.metrics.consumer_lag.with_label_values(&[&self.topic, &partition.to_string()]).set(lag);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.connected.store(true, Ordering::Relaxed);
                self.readiness.assigned.store(true, Ordering::Relaxed);
                self.readiness.broker_reachable.store(true, Ordering::Relaxed);
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                // The lag series exist from the assignment on (0 until the
                // first statistics), so alerts see them at once.
                for p in &partitions {
                    let _ = self.metrics.consumer_lag.with_label_values(&[&self.topic, &p.to_string()]);
                }
                tracing::info!(?partitions, "partitions assigned");
                self.send_blocking(SourceEvent::Assigned(partitions), Instant::now() + self.revoke_timeout);
            }
            Rebalance::Revoke(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions revoked");
                // Messages polled but not handed over are dropped: they were
                // never processed, so their offsets were never stored.
                if let Ok(mut pending) = self.pending.lock() {
                    pending.retain(|m| !partitions.contains(&m.partition));
                }
                if !self.closing.load(Ordering::Relaxed) {
                    let deadline = Instant::now() + self.revoke_timeout;
                    let (done, wait) = std::sync::mpsc::sync_channel(1);
                    if self.send_blocking(
                        SourceEvent::Revoked { partitions: partitions.clone(), done, deadline },
                        deadline,
                    ) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if wait.recv_timeout(left).is_err() {
                            tracing::warn!(
                                ?partitions,
                                "in-flight records were not finished before the revocation deadline; they stay uncommitted and will be redelivered"
                            );
                        }
                    }
                }
                // Synchronous commit of what was stored, before the partitions go.
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => {}
                    Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "commit on revocation failed; those records will be redelivered")
                    }
                }
                // Incremental revocations leave the other partitions assigned.
                let remaining = consumer.assignment().map(|a| a.count().saturating_sub(tpl.count())).unwrap_or(0);
                self.readiness.assigned.store(remaining > 0, Ordering::Relaxed);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub type IngestConsumer = BaseConsumer<SourceContext>;

/// Default consumer-group session timeout (overridable in `[kafka.options]`).
pub const SESSION_TIMEOUT_MS: u64 = 30_000;

/// librdkafka settings shared by every consumer of the product (the
/// benchmark's raw consumer uses the same).
pub fn consumer_config(brokers: &str, group_id: &str, options: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS.to_string())
        .set("max.poll.interval.ms", "300000")
        // Bounded prefetch: a large lag must not turn into a large heap.
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "20000")
        // When the local queue is full librdkafka postpones fetching (1 s by
        // default); a short backoff resumes promptly once the pipeline drains.
        .set("fetch.queue.backoff.ms", "20")
        // A fetch that finds no new data waits this long for some. Brokers that
        // answer only at the deadline (librdkafka's mock cluster does) would add
        // it to the end-to-end latency of a live stream (p50 340 ms → 111 ms at
        // 40,000 events/s with 100 instead of the default 500); idle topics cost
        // ten fetch requests a second per broker.
        .set("fetch.wait.max.ms", "100")
        .set("fetch.max.bytes", "16777216")
        // A single oversized message (up to 16 MB) must still be fetchable,
        // or its partition would stall behind it.
        .set("max.partition.fetch.bytes", "16777216")
        .set("statistics.interval.ms", "5000")
        // Incremental rebalancing: partitions that stay with a member are never
        // revoked, so a joining or leaving instance does not stop the others
        // (and no commit has to race a stop-the-world rebalance).
        .set("partition.assignment.strategy", "cooperative-sticky");
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

pub struct Source {
    pub consumer: Arc<IngestConsumer>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Source {
    /// Creates the consumer, subscribes and starts the polling thread.
    pub fn start(
        config: ClientConfig,
        topic: &str,
        events: mpsc::Sender<SourceEvent>,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
        revoke_timeout: Duration,
    ) -> Result<Source, KafkaError> {
        let context = SourceContext {
            events: events.clone(),
            readiness,
            metrics,
            topic: topic.to_owned(),
            revoke_timeout,
            closing: AtomicBool::new(false),
            pending: Mutex::new(Vec::new()),
            throttle: crate::kafka_log::Throttle::default(),
            connected: AtomicBool::new(false),
            fatal: Mutex::new(None),
        };
        let consumer: Arc<IngestConsumer> = Arc::new(config.create_with_context(context)?);
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let consumer = Arc::clone(&consumer);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kafka-source".into())
                .spawn(move || poll_loop(&consumer, &events, &stop))
                .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
        };
        Ok(Source { consumer, stop, thread: Some(thread) })
    }

    /// Stops fetching: the polling thread ends; nothing more is sent.
    pub fn stop_fetching(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Leaves the group (after the final commit). Blocking: closing the
    /// consumer serves the final revocation and sends LeaveGroup, so the
    /// partitions move to other members at once instead of after the session
    /// timeout.
    pub fn close(mut self) {
        self.stop_fetching();
        self.consumer.context().closing.store(true, Ordering::Relaxed);
        match Arc::try_unwrap(self.consumer) {
            Ok(consumer) => drop(consumer),
            Err(consumer) => tracing::warn!(
                references = Arc::strong_count(&consumer),
                "consumer still referenced at close; the group will notice after the session timeout"
            ),
        }
        tracing::info!("left the consumer group");
    }
}

/// Sends within `patience`; gives the event back if the channel stayed full
/// (`Err(Some)`), or `Err(None)` if the pipeline is gone or stopping.
fn send_within(
    events: &mpsc::Sender<SourceEvent>,
    mut event: SourceEvent,
    patience: Duration,
    stop: &AtomicBool,
) -> Result<(), Option<SourceEvent>> {
    let deadline = Instant::now() + patience;
    loop {
        match events.try_send(event) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(None),
            Err(mpsc::error::TrySendError::Full(e)) => {
                if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    return Err(Some(e));
                }
                event = e;
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

fn poll_loop(consumer: &IngestConsumer, events: &mpsc::Sender<SourceEvent>, stop: &AtomicBool) {
    let ctx = consumer.context();
    let mut paused = false;
    while !stop.load(Ordering::Relaxed) {
        // Hand over what is pending; pause fetching while the pipeline stays full.
        let chunk = ctx.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        if !chunk.is_empty() {
            let patience = if paused { Duration::ZERO } else { PATIENCE };
            match send_within(events, SourceEvent::Messages(chunk), patience, stop) {
                Ok(()) => {
                    if paused {
                        if let Ok(assignment) = consumer.assignment() {
                            let _ = consumer.resume(&assignment);
                        }
                        paused = false;
                    }
                }
                Err(Some(SourceEvent::Messages(chunk))) => {
                    if let Ok(mut p) = ctx.pending.lock() {
                        let newer = std::mem::replace(&mut *p, chunk);
                        p.extend(newer);
                    }
                    if !paused {
                        tracing::debug!("pipeline full for {PATIENCE:?}; pausing fetch");
                        if let Ok(assignment) = consumer.assignment() {
                            let _ = consumer.pause(&assignment);
                        }
                        paused = true;
                    }
                }
                Err(_) => return,
            }
        }
        let held = ctx.pending.lock().map(|p| p.len()).unwrap_or(0);
        let timeout = if held > 0 { Duration::from_millis(5) } else { Duration::from_millis(100) };
        let mut polled = Vec::new();
        let mut next = consumer.poll(timeout);
        while let Some(result) = next {
            match result {
                Ok(m) => polled.push(Inbound::from_message(&m)),
                Err(e) => {
                    crate::kafka_log::error(&ctx.throttle, "consumer", &e, "consume");
                    break;
                }
            }
            if polled.len() >= CHUNK {
                break;
            }
            next = consumer.poll(Duration::ZERO);
        }
        let fatal = ctx.fatal.lock().ok().and_then(|mut f| f.take());
        if let Some(reason) = fatal {
            let _ = send_within(events, SourceEvent::Fatal(reason), Duration::from_secs(5), stop);
            return;
        }
        if !polled.is_empty() {
            ctx.connected.store(true, Ordering::Relaxed);
            ctx.readiness.broker_reachable.store(true, Ordering::Relaxed);
            if let Ok(mut p) = ctx.pending.lock() {
                p.extend(polled);
            }
        }
    }
}
