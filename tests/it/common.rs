//! Helpers: an in-process broker, producers and readers for it, a fresh
//! PostgreSQL database per test, and the pipeline run in-process.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use copilot_ingest::backend::Backend;
use copilot_ingest::config::Config;
use copilot_ingest::embedded::EmbeddedBroker;
use copilot_ingest::generator::Generator;
use copilot_ingest::metrics::Metrics;
use copilot_ingest::normalize::Normalizer;
use copilot_ingest::reason::Reason;
use copilot_ingest::transport::http::Readiness;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

/// The built binary, isolated from a developer's configuration and environment.
pub fn binary() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_copilot-ingest"));
    c.current_dir(std::env::temp_dir());
    for (k, _) in std::env::vars() {
        if k.starts_with("COPILOT_INGEST__") {
            c.env_remove(k);
        }
    }
    c
}

/// A TCP port nothing listens on (for a moment).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process (the service, a broker, a proxy), killed if the test ends
/// before it does.
pub struct Service(Option<std::process::Child>);

impl Service {
    pub fn spawn(command: &mut std::process::Command) -> Service {
        Service(Some(command.spawn().unwrap_or_else(|e| panic!("starting {command:?}: {e}"))))
    }

    /// Takes over a process started by the caller (e.g. with its stdout piped).
    pub fn from_child(child: std::process::Child) -> Service {
        Service(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.0.as_ref().map(std::process::Child::id).unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.0.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM; the service must drain and exit 0.
    pub fn terminate(mut self) {
        let Some(mut child) = self.0.take() else { return };
        std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0), "SIGTERM ends with exit 0");
    }

    /// Waits for the process to end by itself (stderr piped): its exit code and
    /// stderr. Panics if it still runs after `limit`.
    pub fn exit_within(mut self, limit: Duration) -> (Option<i32>, String) {
        use std::io::Read;
        let mut child = self.0.take().expect("a running child");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    e.read_to_string(&mut stderr).unwrap();
                }
                return (status.code(), stderr);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("still running after {limit:?}: this failure must end the process, not retry forever");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `condition` holds, or panics with `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The control key of every test service: commands are signed as in production.
pub const TEST_HMAC_KEY: &str = "copilot-ingest-test-key-0123456789abcdef";

/// The signature headers of a control command (or reply) under [`TEST_HMAC_KEY`].
pub fn signed(value: &[u8]) -> rdkafka::message::OwnedHeaders {
    copilot_ingest::transport::control::signature_headers(TEST_HMAC_KEY, value)
}

/// A broker with the product's topics, and a config pointing at it.
pub struct TestKafka {
    pub _broker: EmbeddedBroker,
    pub bootstrap: String,
    pub config: Config,
    pub partitions: i32,
}

impl TestKafka {
    pub fn new(partitions: i32) -> TestKafka {
        let mut config = Config::default();
        config.kafka.topic = unique("events");
        config.kafka.dlq_topic = unique("dlq");
        config.kafka.group_id = unique("group");
        config.kafka.embedded_partitions = partitions;
        config.metrics.listen = "127.0.0.1:0".into();
        config.batch.linger_ms = 50;
        config.shutdown.drain_timeout_ms = 10_000;
        config.control.hmac_key = copilot_ingest::config::Secret::new(TEST_HMAC_KEY);
        // The mock broker holds a new member's join until departed members'
        // sessions expire; a short session keeps restarts quick.
        config.kafka.options.insert("session.timeout.ms".into(), copilot_ingest::config::Secret::new("6000"));
        let broker = EmbeddedBroker::start_with_default_group_delay(&config.kafka).expect("mock cluster");
        let bootstrap = broker.bootstrap_servers();
        config.kafka.brokers = bootstrap.clone();
        TestKafka { _broker: broker, bootstrap, config, partitions }
    }

    /// The test configuration writing to the sink at `url`.
    pub fn config_with_sink(&self, url: &str) -> Config {
        let mut config = self.config.clone();
        config.sink.url = copilot_ingest::config::Secret::new(url.to_owned());
        config
    }

    /// The service binary (`run`) against this broker and the sink at `url`.
    pub fn run_binary(&self, url: &str) -> std::process::Command {
        let mut c = binary();
        c.arg("run")
            .env("COPILOT_INGEST__KAFKA__BROKERS", &self.bootstrap)
            .env("COPILOT_INGEST__KAFKA__TOPIC", &self.config.kafka.topic)
            .env("COPILOT_INGEST__KAFKA__DLQ_TOPIC", &self.config.kafka.dlq_topic)
            .env("COPILOT_INGEST__KAFKA__GROUP_ID", &self.config.kafka.group_id)
            .env("COPILOT_INGEST__SINK__URL", url)
            .env("COPILOT_INGEST__CONTROL__HMAC_KEY", TEST_HMAC_KEY)
            .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
            .env("COPILOT_INGEST__KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "6000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }

    /// Publishes messages (key, value), round-robin over partitions; waits for every ack.
    pub async fn produce(&self, messages: &[(String, Vec<u8>)]) -> Vec<(i32, i64)> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("message.max.bytes", "16777216")
            .create()
            .expect("producer");
        let mut positions = Vec::with_capacity(messages.len());
        let mut futures = Vec::new();
        for (i, (key, value)) in messages.iter().enumerate() {
            let partition = i as i32 % self.partitions;
            let record = FutureRecord::to(&self.config.kafka.topic).key(key).payload(value).partition(partition);
            futures.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
            if futures.len() >= 5000 {
                for f in futures.drain(..) {
                    let d = f.await.expect("delivery").expect("ack");
                    positions.push((d.partition, d.offset));
                }
            }
        }
        for f in futures {
            let d = f.await.expect("delivery").expect("ack");
            positions.push((d.partition, d.offset));
        }
        positions
    }

    /// Committed offsets of the pipeline's group, per partition.
    pub fn committed(&self) -> HashMap<i32, i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.config.kafka.group_id)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.config.kafka.topic, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { o } else { 0 }))
            .collect()
    }

    /// Log end offsets of the event topic, per partition.
    pub fn log_end(&self) -> HashMap<i32, i64> {
        self.watermarks().into_iter().map(|(p, (_, high))| (p, high)).collect()
    }

    /// Log start offsets of the event topic (the oldest offset the broker
    /// still holds), per partition.
    pub fn log_start(&self) -> HashMap<i32, i64> {
        self.watermarks().into_iter().map(|(p, (low, _))| (p, low)).collect()
    }

    fn watermarks(&self) -> HashMap<i32, (i64, i64)> {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().expect("consumer");
        (0..self.partitions)
            .map(|p| {
                let marks = consumer
                    .fetch_watermarks(&self.config.kafka.topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, marks)
            })
            .collect()
    }

    /// Reads `expected` messages from the DLQ (waits up to 30 s), then checks no more arrive briefly.
    pub fn read_dlq(&self, expected: usize) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(&self.config.kafka.dlq_topic, p, Offset::Beginning).expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut quiet_until: Option<Instant> = None;
        loop {
            if out.len() >= expected && quiet_until.is_none() {
                quiet_until = Some(Instant::now() + Duration::from_millis(500));
            }
            if quiet_until.is_some_and(|q| Instant::now() > q) || Instant::now() > deadline {
                break;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
            }
        }
        out
    }
}

/// Distinct source messages (partition, offset) among dead letters.
pub fn dead_letter_sources(dlq: &[OwnedMessage]) -> usize {
    let mut sources: Vec<(String, String)> = dlq
        .iter()
        .map(|m| (header(m, "x-ingest-source-partition").unwrap(), header(m, "x-ingest-source-offset").unwrap()))
        .collect();
    sources.sort();
    sources.dedup();
    sources.len()
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A generated workload: messages and the reason each invalid one must get.
pub struct Workload {
    pub messages: Vec<(String, Vec<u8>)>,
    pub expected: Vec<Option<Reason>>,
}

impl Workload {
    pub fn generate(seed: u64, count: usize, invalid_ratio: f64) -> Workload {
        let mut g = Generator::new(seed, invalid_ratio);
        let mut messages = Vec::with_capacity(count);
        let mut expected = Vec::with_capacity(count);
        for _ in 0..count {
            let m = g.next(false);
            messages.push((m.key, m.value));
            expected.push(m.expected);
        }
        Workload { messages, expected }
    }
    pub fn valid(&self) -> usize {
        self.expected.iter().filter(|e| e.is_none()).count()
    }
    pub fn invalid(&self) -> usize {
        self.expected.len() - self.valid()
    }
}

/// A stream produced in parts (faults are injected between them), with its totals.
pub struct Stream {
    pub parts: Vec<Workload>,
    pub valid: usize,
    pub invalid: usize,
    pub produced: usize,
}

impl Stream {
    pub fn generate(first_seed: u64, parts: u64, per_part: usize, invalid_ratio: f64) -> Stream {
        let parts: Vec<Workload> =
            (0..parts).map(|i| Workload::generate(first_seed + i, per_part, invalid_ratio)).collect();
        Stream {
            valid: parts.iter().map(Workload::valid).sum(),
            invalid: parts.iter().map(Workload::invalid).sum(),
            produced: parts.iter().map(|w| w.messages.len()).sum(),
            parts,
        }
    }
}

/// The pipeline running in-process.
pub struct RunningPipeline {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningPipeline {
    pub fn start(config: Config) -> RunningPipeline {
        // Logs for debugging a failing test: RUST_LOG=copilot_ingest=debug cargo nextest run …
        if std::env::var("RUST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::default());
        let (stop, rx) = watch::channel(false);
        let brokers = config.kafka.brokers.clone();
        let task = {
            let metrics = Arc::clone(&metrics);
            let readiness = Arc::clone(&readiness);
            tokio::spawn(async move {
                copilot_ingest::transport::ingest::pipeline::run(config, &brokers, metrics, readiness, rx).await
            })
        };
        RunningPipeline { metrics, readiness, stop, task }
    }

    /// Records written + skipped + dead-lettered.
    pub fn handled(&self) -> u64 {
        let m = &self.metrics;
        Metrics::total(&m.records_written_total)
            + Metrics::total(&m.records_skipped_total)
            + Metrics::total(&m.dlq_events_total)
    }

    pub fn written(&self) -> u64 {
        Metrics::total(&self.metrics.records_written_total)
    }

    pub fn skipped(&self) -> u64 {
        Metrics::total(&self.metrics.records_skipped_total)
    }

    pub async fn wait_handled(&self, n: u64, timeout: Duration) {
        wait_for(&format!("{n} records handled"), timeout, || self.handled() >= n).await;
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("pipeline task").expect("pipeline result");
    }
}

/// A fresh PostgreSQL database, dropped at the end.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl PgDb {
    /// `None` (test skipped) when PostgreSQL is not running — except under
    /// CI, where a missing server fails the test.
    pub async fn create() -> Option<PgDb> {
        let admin = match copilot_ingest::backend::postgres::connect(PG_ADMIN_URL).await {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("PostgreSQL is required under CI: {e}");
                }
                eprintln!("skipping: PostgreSQL not reachable at {PG_ADMIN_URL}: {e}");
                return None;
            }
        };
        let name = unique("copilot_test");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Some(PgDb { name, url })
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        copilot_ingest::backend::postgres::connect(&self.url).await.expect("connect to test database")
    }

    /// Takes the database away: new connections are refused and open ones are
    /// terminated, as in an outage.
    /// (rows, distinct ids) of the table; (0, 0) while the database refuses connections.
    pub async fn row_counts(&self) -> (i64, i64) {
        let Ok(client) = tokio::time::timeout(Duration::from_secs(5), self.client()).await else { return (0, 0) };
        client
            .query_one("SELECT count(*), count(DISTINCT msdyn_copilotinteractionid) FROM msdyn_copilotinteraction", &[])
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0))
    }

    /// Waits until the table holds at least `rows` rows; panics with the counts after `timeout`.
    pub async fn wait_rows(&self, rows: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.row_counts().await.0 < rows {
            assert!(Instant::now() < deadline, "rows stuck at {:?} of {rows}", self.row_counts().await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn refuse_connections(&self) {
        let admin = Self::admin().await;
        admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name)).await.unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap();
    }

    /// Ends the outage started by [`PgDb::refuse_connections`].
    pub async fn allow_connections(&self) {
        Self::admin()
            .await
            .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name))
            .await
            .unwrap();
    }

    pub async fn admin() -> tokio_postgres::Client {
        copilot_ingest::backend::postgres::connect(PG_ADMIN_URL).await.expect("connect as admin")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let admin = copilot_ingest::backend::postgres::connect(PG_ADMIN_URL).await.ok()?;
                admin.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await.ok();
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.ok()
            })
        })
        .join();
    }
}

pub fn temp_sqlite() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(unique("copilot-ingest-test"));
    let path = dir.join("test.db");
    (dir, format!("sqlite://{}", path.display()))
}

/// The backend on a test sink URL, parsed and opened as the service does.
pub async fn open_backend_at(url: &str) -> Arc<Backend> {
    let mut config = Config::default();
    config.sink.url = copilot_ingest::config::Secret::new(url.to_owned());
    let sink = config.sink_url().expect("a sink URL");
    Arc::new(Backend::open(&sink, "t", 2, &Arc::new(Metrics::new())).await.expect("open the sink"))
}

/// `old` records created in 2020 (the criteria's) and `recent` ones created now.
pub async fn seed(backend: &Backend, first: usize, old: usize, recent: usize) {
    let normalizer = Normalizer::default();
    let metrics = Metrics::new();
    let mut records = Vec::new();
    for i in first..first + old + recent {
        let mut e = serde_json::json!({"msdyn_name": format!("event {i}"), "msdyn_scenariorequestid": format!("req-{i}"),
                           "msdyn_interactiontype": "ThumbsUp", "msdyn_scenariotype": "Copilot",
                           "msdyn_copilotinteractionid": uuid::Uuid::new_v4().to_string()});
        if i < first + old {
            e["overriddencreatedon"] = serde_json::json!("2020-01-01T00:00:00Z");
        }
        records.push(
            normalizer.normalize_json(e.to_string().as_bytes(), None, chrono::Utc::now()).expect("a valid event"),
        );
        if records.len() == 1000 {
            copilot_ingest::operations::create_multiple::create_records(
                backend,
                std::mem::take(&mut records),
                &metrics,
            )
            .await
            .expect("seed");
        }
    }
    if !records.is_empty() {
        copilot_ingest::operations::create_multiple::create_records(backend, records, &metrics).await.expect("seed");
    }
}
