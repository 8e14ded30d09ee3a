//! The command line (SPEC §3). Exit codes: 0 success, 1 rejected input or
//! failed command, 2 bad configuration or usage.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::sync::watch;

use crate::config::{Config, ConfigErrors, Format};
use crate::embedded::EmbeddedBroker;
use crate::generator::Generator;
use crate::http::{self, Readiness};
use crate::metrics::Metrics;
use crate::normalize::Normalizer;
use crate::pipeline;

pub const EXIT_OK: i32 = 0;
pub const EXIT_REJECTED: i32 = 1;
pub const EXIT_CONFIG: i32 = 2;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(name = "copilot-ingest", version, about = "Kafka → msdyn_copilotinteraction ingestor (SQLite, PostgreSQL)")]
pub struct Cli {
    /// Configuration file (default: ./copilot-ingest.toml if present).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// No progress display (demo, produce, bench).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (embedded broker and SQLite when nothing is configured).
    Run,
    /// Run on the embedded defaults with a built-in producer, print a summary, exit.
    Demo {
        /// Events to produce.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Share of invalid events (0.0–1.0).
        #[arg(long, default_value_t = 0.05)]
        invalid_ratio: f64,
        /// Events per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Validate events (one JSON per line) from FILE or stdin; print each result.
    Validate {
        /// A file, or - for standard input.
        #[arg(default_value = "-")]
        file: String,
    },
    /// Create or upgrade the sink's tables (idempotent).
    Migrate,
    /// Load generator: publish events to the configured (or given) broker.
    Produce {
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Events per second (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 0.0)]
        invalid_ratio: f64,
        #[arg(long, value_enum, default_value = "json")]
        format: ProduceFormat,
        /// Overrides kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
        /// Overrides kafka.topic.
        #[arg(long)]
        topic: Option<String>,
        /// Seed of the event generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Publish one control command (retention, purge), wait for its reply and print it.
    Control {
        #[command(subcommand)]
        action: ControlAction,
        /// Overrides kafka.brokers.
        #[arg(long, global = true)]
        brokers: Option<String>,
        /// Seconds to wait for the reply.
        #[arg(long, global = true, default_value_t = 60)]
        timeout: u64,
        /// The command id (default: a new UUID). Re-sending an id returns the stored reply.
        #[arg(long, global = true)]
        command_id: Option<String>,
    },
    /// End-to-end benchmark: raw consume and raw sink limits, then copilot-ingest, on one data set.
    Bench(crate::bench::BenchArgs),
    /// Run the embedded Kafka-protocol broker alone and print its address.
    Broker {
        /// Partitions of the event and DLQ topics.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Check, show or write out the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Print a shell completion script (e.g. `copilot-ingest completions bash > /etc/bash_completion.d/copilot-ingest`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `copilot-ingest man | man -l -`.
    Man,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ConfigAction {
    /// Validate the file and the environment without connecting; every problem, then exit 2.
    Check,
    /// The effective configuration after the environment overrides, secrets masked.
    Show,
    /// A commented configuration file with every key and its default.
    Example,
}

#[derive(Debug, Subcommand)]
pub enum ControlAction {
    /// Check FetchXML criteria against the table definition (changes nothing).
    #[command(alias = "ValidateRetentionConfig")]
    ValidateRetentionConfig {
        #[arg(long)]
        fetchxml: String,
    },
    /// Mark one live record retained.
    #[command(alias = "Retain")]
    Retain {
        #[arg(long)]
        target: String,
    },
    /// Mark every live record matching the criteria retained.
    #[command(alias = "BulkRetain")]
    BulkRetain {
        #[arg(long, conflicts_with = "older_than", required_unless_present = "older_than")]
        fetchxml: Option<String>,
        /// Shorthand criteria on createdon: 90d, 12h or 6m (months).
        #[arg(long)]
        older_than: Option<String>,
        #[arg(long)]
        page_size: Option<i64>,
    },
    /// Return the records of an operation (or one record) to live.
    #[command(alias = "RollbackRetain")]
    RollbackRetain {
        #[arg(long, required_unless_present = "target")]
        operation_id: Option<String>,
        #[arg(long)]
        target: Option<String>,
    },
    /// Permanently delete retained records (tombstoning their ids).
    #[command(alias = "PurgeRetainedContent")]
    PurgeRetainedContent {
        #[arg(long)]
        max_version: Option<i64>,
        #[arg(long)]
        fetchxml: Option<String>,
        #[arg(long)]
        page_size: Option<i64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProduceFormat {
    Json,
    Avro,
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    // Colour only on a terminal (never into files, pipes or CI logs) and never with NO_COLOR.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(crate::progress::colour_allowed(std::io::stderr().is_terminal()))
        .with_writer(crate::progress::LogWriter);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK };
        }
    };
    init_tracing(cli.log_format);
    match &cli.command {
        Command::Config { action: ConfigAction::Example } => {
            print!("{}", crate::config::example());
            return EXIT_OK;
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "copilot-ingest", &mut std::io::stdout());
            return EXIT_OK;
        }
        Command::Man => {
            use clap::CommandFactory;
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("cannot write the manual page: {e}");
                    EXIT_REJECTED
                }
            };
        }
        _ => {}
    }
    if let Command::Validate { file } = &cli.command {
        let config = match Config::load(cli.config.as_deref()) {
            Ok(c) => c,
            Err(e) => return config_error(&e),
        };
        return validate(&config, file);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    match &cli.command {
        Command::Config { action: ConfigAction::Check } => {
            let source = match &cli.config {
                Some(path) => path.display().to_string(),
                None if std::path::Path::new(crate::config::DEFAULT_CONFIG_FILE).exists() => {
                    crate::config::DEFAULT_CONFIG_FILE.to_owned()
                }
                None => "defaults".to_owned(),
            };
            println!("configuration is valid ({source}, with the COPILOT_INGEST__ environment overrides)");
            return EXIT_OK;
        }
        Command::Config { action: ConfigAction::Show } => {
            print!("{}", crate::config::show(&config));
            return EXIT_OK;
        }
        _ => {}
    }
    let quiet = cli.quiet;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return EXIT_REJECTED;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(config).await,
            Command::Demo { count, invalid_ratio, rate } => demo(config, count, invalid_ratio, rate, quiet).await,
            Command::Migrate => migrate(config).await,
            Command::Produce { count, rate, invalid_ratio, format, brokers, topic, seed } => {
                produce_cmd(config, count, rate, invalid_ratio, format, brokers, topic, seed, quiet).await
            }
            Command::Broker { partitions } => broker(config, partitions).await,
            Command::Bench(args) => crate::bench::run(config, args, quiet).await,
            Command::Control { action, brokers, timeout, command_id } => {
                control_cmd(config, action, brokers, Duration::from_secs(timeout), command_id).await
            }
            Command::Validate { .. } | Command::Config { .. } | Command::Completions { .. } | Command::Man => {
                Ok(EXIT_OK)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<crate::config::FatalConfig>().is_some() || is_config_refusal(&e) => {
            eprintln!("error: {}", safe_error(&e));
            EXIT_CONFIG
        }
        Err(e) => {
            eprintln!("error: {}", safe_error(&e));
            EXIT_REJECTED
        }
    }
}

/// librdkafka refused a configuration property (a configuration error, exit 2).
fn is_config_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(cause.downcast_ref::<rdkafka::error::KafkaError>(), Some(rdkafka::error::KafkaError::ClientConfig(..)))
    })
}

/// An error chain for people and logs. rdkafka's text for a refused property
/// ends with the property's value, which may be a credential: that one is
/// described by its key alone.
pub(crate) fn safe_error(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(rdkafka::error::KafkaError::ClientConfig(_, description, key, value)) =
            cause.downcast_ref::<rdkafka::error::KafkaError>()
        {
            let description =
                if value.is_empty() { description.clone() } else { description.replace(value.as_str(), "***") };
            return format!("librdkafka refused the property {key}: {description}");
        }
    }
    format!("{e:#}")
}

fn config_error(e: &ConfigErrors) -> i32 {
    eprint!("{e}");
    EXIT_CONFIG
}

/// A watch that turns true on SIGTERM or Ctrl-C.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn start_http(
    config: &Config,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    shutdown: &watch::Receiver<bool>,
    required: bool,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match tokio::net::TcpListener::bind(&config.metrics.listen).await {
        Ok(listener) => {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "metrics and health endpoints listening");
            tokio::spawn(http::serve(listener, Arc::clone(metrics), Arc::clone(readiness), shutdown.clone()));
            Ok(Some(addr))
        }
        Err(e) if !required => {
            tracing::warn!(listen = %config.metrics.listen, error = %e, "metrics endpoint not started");
            Ok(None)
        }
        Err(e) => anyhow::bail!("metrics.listen {}: {e}", config.metrics.listen),
    }
}

/// Starts the embedded broker when configured; returns it (to keep it alive) and the bootstrap list.
fn brokers_for(config: &Config) -> anyhow::Result<(Option<EmbeddedBroker>, String)> {
    if config.kafka.is_embedded() {
        let broker = EmbeddedBroker::start(&config.kafka)?;
        let addr = broker.bootstrap_servers();
        println!(
            "embedded Kafka broker listening on {addr} (topic {}, dlq {})",
            config.kafka.topic, config.kafka.dlq_topic
        );
        let _ = std::io::stdout().flush();
        Ok((Some(broker), addr))
    } else {
        Ok((None, config.kafka.brokers.clone()))
    }
}

async fn run(mut config: Config) -> anyhow::Result<i32> {
    local_defaults(&mut config);
    if config.kafka.is_embedded() && config.control.hmac_key.is_empty() {
        // The in-process broker is reachable only from this machine's
        // loopback; local tools send unsigned commands to it.
        config.control.allow_unsigned = true;
    } else if config.control.allow_unsigned && config.control.hmac_key.is_empty() {
        tracing::warn!(
            brokers = %config.kafka.brokers,
            "control.allow_unsigned = true: anyone who can write to the control topic can retain and purge records"
        );
    }
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    start_http(&config, &metrics, &readiness, &shutdown, true).await?;
    let (_broker, brokers) = brokers_for(&config)?;
    let control = tokio::spawn(crate::control::consumer::supervised(
        crate::control::consumer::run(config.clone(), brokers.clone(), Arc::clone(&metrics), shutdown.clone()),
        Arc::clone(&readiness),
    ));
    tokio::spawn(crate::control::consumer::prune_periodically(config.clone(), shutdown.clone()));
    pipeline::run(config, &brokers, metrics, readiness, shutdown).await?;
    let _ = control.await;
    Ok(EXIT_OK)
}

/// The command JSON for a CLI control action.
fn control_command(action: ControlAction, command_id: &str, entity: &str) -> Result<serde_json::Value, String> {
    use serde_json::json;
    let (message, parameters) = match action {
        ControlAction::ValidateRetentionConfig { fetchxml } => {
            ("ValidateRetentionConfig", json!({"EntityName": entity, "FetchXml": fetchxml}))
        }
        ControlAction::Retain { target } => ("Retain", json!({"Target": target})),
        ControlAction::BulkRetain { fetchxml, older_than, page_size } => {
            let fetchxml = match (fetchxml, older_than) {
                (Some(x), _) => x,
                (None, Some(age)) => older_than_fetchxml(entity, &age)?,
                (None, None) => return Err("bulk-retain needs --fetchxml or --older-than".into()),
            };
            let mut p = json!({"EntityName": entity, "FetchXml": fetchxml});
            if let Some(n) = page_size {
                p["PageSize"] = json!(n);
            }
            ("BulkRetain", p)
        }
        ControlAction::RollbackRetain { operation_id, target } => {
            let mut p = json!({});
            if let Some(op) = operation_id {
                p["OperationId"] = json!(op);
            }
            if let Some(t) = target {
                p["Target"] = json!(t);
            }
            ("RollbackRetain", p)
        }
        ControlAction::PurgeRetainedContent { max_version, fetchxml, page_size } => {
            let mut p = json!({"EntityName": entity});
            if let Some(v) = max_version {
                p["MaxVersionToPurge"] = json!(v);
            }
            if let Some(x) = fetchxml {
                p["FetchXml"] = json!(x);
            }
            if let Some(n) = page_size {
                p["PageSize"] = json!(n);
            }
            ("PurgeRetainedContent", p)
        }
    };
    Ok(json!({"command_id": command_id, "message": message, "parameters": parameters}))
}

/// `90d` / `12h` / `6m` → FetchXML on createdon.
fn older_than_fetchxml(entity: &str, age: &str) -> Result<String, String> {
    let age = age.trim();
    let (number, unit) = age.split_at(age.len().saturating_sub(1));
    let operator = match unit {
        "d" => "olderthan-x-days",
        "h" => "olderthan-x-hours",
        "m" => "olderthan-x-months",
        _ => return Err(format!("--older-than '{age}': use a number with d, h or m (e.g. 90d)")),
    };
    let n: u32 = number.parse().map_err(|_| format!("--older-than '{age}': not a number"))?;
    Ok(format!(
        "<fetch><entity name='{entity}'><filter><condition attribute='createdon' operator='{operator}' value='{n}'/></filter></entity></fetch>"
    ))
}

async fn control_cmd(
    config: Config,
    action: ControlAction,
    brokers: Option<String>,
    timeout: Duration,
    command_id: Option<String>,
) -> anyhow::Result<i32> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = brokers.unwrap_or_else(|| config.kafka.brokers.clone());
    if brokers.trim() == "embedded" {
        eprintln!("control needs the service's broker: pass --brokers host:port or set kafka.brokers");
        return Ok(EXIT_CONFIG);
    }
    let command_id = command_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let command = match control_command(action, &command_id, &crate::table::table().logical_name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(EXIT_CONFIG);
        }
    };
    let value = serde_json::to_vec(&command)?;
    let options = pipeline::kafka_options(&config);
    let reply_topic = config.kafka.control_reply_topic.clone();
    let control_topic = config.kafka.control_topic.clone();
    let auth = crate::control::Authenticator::new(&config.control);
    let reply = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<serde_json::Value>> {
        // Start reading replies at the current end, before the command goes out.
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("group.id", format!("copilot-ingest-cli-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false");
        for (k, v) in &options {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg.create()?;
        let metadata = consumer.fetch_metadata(Some(&reply_topic), Duration::from_secs(10))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        if partitions.is_empty() {
            anyhow::bail!("reply topic {reply_topic} does not exist");
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in partitions {
            let (_, high) = consumer.fetch_watermarks(&reply_topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&reply_topic, p, rdkafka::Offset::Offset(high))?;
        }
        consumer.assign(&tpl)?;

        let producer: BaseProducer = crate::dlq::producer_config(&brokers, &options).create()?;
        let mut record = BaseRecord::to(&control_topic).key(&command_id).payload(&value);
        if let Some(key) = auth.signing_key() {
            record = record.headers(crate::control::signature_headers(key, &value));
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.flush(Duration::from_secs(30))?;

        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
            if m.key() != Some(command_id.as_bytes()) {
                continue;
            }
            match accept_reply(&auth, &command_id, &m) {
                Ok(reply) => return Ok(Some(reply)),
                Err(problem) => eprintln!("ignored a reply to {command_id}: {problem}"),
            }
        }
        Ok(None)
    })
    .await??;
    match reply {
        Some(reply) => {
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(if reply["status"] == "Succeeded" { EXIT_OK } else { EXIT_REJECTED })
        }
        None => {
            eprintln!("no reply within {}s (is copilot-ingest running against this broker?)", timeout.as_secs());
            Ok(EXIT_REJECTED)
        }
    }
}

/// A reply the CLI believes: for the command id it sent, and, when a key is
/// configured, signed by the instance (anyone may write to the reply topic).
fn accept_reply(
    auth: &crate::control::Authenticator,
    command_id: &str,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<serde_json::Value, String> {
    use rdkafka::Message as _;
    use rdkafka::message::Headers;
    let body = message.payload().unwrap_or_default();
    if let Some(key) = auth.signing_key() {
        let header =
            |name: &str| message.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value));
        let (Some(timestamp), Some(signature)) =
            (header(crate::control::SIGNATURE_TIMESTAMP_HEADER), header(crate::control::SIGNATURE_HEADER))
        else {
            return Err("it is not signed".into());
        };
        crate::control::verify_signature(&[key], body, timestamp, signature, chrono::Utc::now().timestamp())?;
    }
    let reply: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if reply["command_id"].as_str() != Some(command_id) {
        return Err("its command_id is not the one sent".into());
    }
    Ok(reply)
}

async fn migrate(config: Config) -> anyhow::Result<i32> {
    let (_tx, mut rx) = watch::channel(false);
    let Some(sink) = pipeline::open_sink(&config, &Arc::new(Metrics::new()), &mut rx).await? else {
        return Ok(EXIT_REJECTED);
    };
    println!("{} sink migrated", sink.kind());
    Ok(EXIT_OK)
}

async fn broker(mut config: Config, partitions: i32) -> anyhow::Result<i32> {
    config.kafka.embedded_partitions = partitions;
    let broker = EmbeddedBroker::start(&config.kafka)?;
    println!("{}", broker.bootstrap_servers());
    let _ = std::io::stdout().flush();
    eprintln!(
        "embedded Kafka broker on {} — topics {} and {} with {partitions} partitions; Ctrl-C to stop",
        broker.bootstrap_servers(),
        config.kafka.topic,
        config.kafka.dlq_topic
    );
    let mut shutdown = shutdown_signal();
    let _ = shutdown.changed().await;
    Ok(EXIT_OK)
}

fn validate(config: &Config, file: &str) -> i32 {
    let normalizer = Normalizer { unknown_fields: config.validation.unknown_fields, ..Normalizer::default() };
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("{file}: {e}");
                return EXIT_CONFIG;
            }
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut rejected = 0u64;
    let mut total = 0u64;
    for (n, line) in reader.split(b'\n').enumerate() {
        let Ok(mut line) = line else { break };
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        total += 1;
        let result = match normalizer.normalize_json(&line, None, chrono::Utc::now()) {
            Ok(record) => serde_json::json!({"line": n + 1, "status": "ok", "record": record.to_json()}),
            Err(r) => {
                rejected += 1;
                serde_json::json!({"line": n + 1, "status": "rejected", "reason": r.reason.code(), "field": r.field, "message": r.message})
            }
        };
        if writeln!(out, "{result}").is_err() {
            break;
        }
    }
    eprintln!("{total} events: {} valid, {rejected} rejected", total - rejected);
    if rejected > 0 { EXIT_REJECTED } else { EXIT_OK }
}

/// What a load generator run produces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub count: u64,
    /// Events per second; 0 = unlimited.
    pub rate: u64,
    pub invalid_ratio: f64,
    pub seed: u64,
    pub progress: bool,
    /// Confluent-framed Avro with this bundled schema id instead of JSON.
    pub avro_schema_id: Option<u32>,
    /// Spread messages round-robin over this many partitions (instead of by key).
    pub round_robin_partitions: Option<i32>,
}

/// Events the demo producer may be ahead of the pipeline: the embedded broker
/// keeps only a few MB per partition, so it must not be flooded.
const DEMO_WINDOW: u64 = 20_000;

/// Produces the generated events; returns how many of them are valid. With
/// `handled`, waits whenever it is more than [`DEMO_WINDOW`] events ahead.
pub(crate) async fn produce_events(
    brokers: &str,
    topic: &str,
    options: &[(String, String)],
    load: Load,
    handled: Option<Arc<Metrics>>,
) -> anyhow::Result<u64> {
    let Load { count, rate, invalid_ratio, seed, progress, avro_schema_id, round_robin_partitions } = load;
    let avro_schema = match avro_schema_id {
        Some(id) => {
            let text = crate::avro::BUNDLED
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, t)| *t)
                .ok_or_else(|| anyhow::anyhow!("no bundled schema with id {id}"))?;
            Some((id, apache_avro::Schema::parse_str(text)?))
        }
        None => None,
    };
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    let options = options.to_vec();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("compression.type", "none");
        for (k, v) in &options {
            cfg.set(k, v);
        }
        let producer: BaseProducer = cfg.create()?;
        let mut generator = Generator::new(seed, invalid_ratio);
        let started = Instant::now();
        let mut display = crate::progress::Progress::start(!progress, Some(count));
        let mut valid = 0u64;
        for i in 0..count {
            if rate > 0 {
                // Sleep only when a millisecond ahead: one sleep per message
                // would cost more CPU than producing it at high rates.
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                let now = Instant::now();
                if due > now + Duration::from_millis(1) {
                    std::thread::sleep(due - now);
                }
            }
            if let Some(metrics) = &handled {
                while i >= handled_total(metrics) + DEMO_WINDOW {
                    producer.poll(Duration::from_millis(5));
                }
            }
            let g = generator.next(false);
            if g.expected.is_none() {
                valid += 1;
            }
            let value = match &avro_schema {
                // Invalid events that are not even JSON travel as framed garbage (malformed_avro).
                Some((id, schema)) => match serde_json::from_slice(&g.value)
                    .map_err(|e| e.to_string())
                    .and_then(|j| crate::avro::encode_json(schema, &j))
                {
                    Ok(datum) => crate::avro::framed(*id, &datum),
                    Err(_) => crate::avro::framed(*id, &[0xff, 0xff, 0xff]),
                },
                None => g.value,
            };
            let mut record = BaseRecord::to(&topic).key(&g.key).payload(&value);
            if let Some(p) = round_robin_partitions.filter(|p| *p > 0) {
                record = record.partition((i % p as u64) as i32);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            producer.poll(Duration::ZERO);
            if i % 1000 == 0 {
                display.update(i, || {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    format!(
                        "produced {} of {} events, {} events/s",
                        crate::progress::thousands(i),
                        crate::progress::thousands(count),
                        crate::progress::thousands((i as f64 / secs) as u64)
                    )
                });
            }
        }
        display.finish();
        producer.flush(Duration::from_secs(60))?;
        Ok(valid)
    })
    .await?
}

#[allow(clippy::too_many_arguments)]
async fn produce_cmd(
    config: Config,
    count: u64,
    rate: u64,
    invalid_ratio: f64,
    format: ProduceFormat,
    brokers: Option<String>,
    topic: Option<String>,
    seed: u64,
    quiet: bool,
) -> anyhow::Result<i32> {
    if !(0.0..=1.0).contains(&invalid_ratio) {
        eprintln!("--invalid-ratio must be between 0 and 1");
        return Ok(EXIT_CONFIG);
    }
    let brokers = brokers.unwrap_or_else(|| config.kafka.brokers.clone());
    if brokers.trim() == "embedded" {
        eprintln!(
            "produce needs a running broker: pass --brokers host:port (see `copilot-ingest broker`) or set kafka.brokers"
        );
        return Ok(EXIT_CONFIG);
    }
    let topic = topic.unwrap_or_else(|| config.kafka.topic.clone());
    let started = Instant::now();
    let valid = produce_events(
        &brokers,
        &topic,
        &pipeline::kafka_options(&config),
        Load {
            count,
            rate,
            invalid_ratio,
            seed,
            progress: !quiet,
            avro_schema_id: (format == ProduceFormat::Avro).then_some(2),
            round_robin_partitions: None,
        },
        None,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events ({} valid, {} invalid) to {topic} in {secs:.2} s ({} events/s)",
        crate::progress::thousands(count),
        crate::progress::thousands(valid),
        crate::progress::thousands(count - valid),
        crate::progress::thousands((count as f64 / secs.max(1e-9)) as u64)
    );
    Ok(EXIT_OK)
}

/// Records written, skipped or dead-lettered so far.
fn handled_total(m: &Metrics) -> u64 {
    Metrics::total(&m.records_written_total)
        + Metrics::total(&m.records_skipped_total)
        + Metrics::total(&m.dlq_events_total)
}

async fn demo(mut config: Config, count: u64, invalid_ratio: f64, rate: u64, quiet: bool) -> anyhow::Result<i32> {
    use crate::progress::{Progress, thousands};
    if !(0.0..=1.0).contains(&invalid_ratio) {
        eprintln!("--invalid-ratio must be between 0 and 1");
        return Ok(EXIT_CONFIG);
    }
    if config.kafka.format == Format::Avro {
        config.kafka.format = Format::Auto;
    }
    local_defaults(&mut config);
    let (tx, shutdown) = watch::channel(false);
    let mut signal = shutdown_signal();
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let metrics_addr = start_http(&config, &metrics, &readiness, &shutdown, false).await?;
    let (_broker, brokers) = brokers_for(&config)?;
    let options = pipeline::kafka_options(&config);
    let batch_size = config.batch.max_records;
    let sink = config.sink_url().map_err(anyhow::Error::msg)?;
    let topic = config.kafka.topic.clone();

    let pipeline_task = {
        let metrics = Arc::clone(&metrics);
        let readiness = Arc::clone(&readiness);
        let brokers = brokers.clone();
        tokio::spawn(async move { pipeline::run(config, &brokers, metrics, readiness, shutdown).await })
    };
    let started = Instant::now();
    let producer = {
        let brokers = brokers.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let load = Load {
                count,
                rate,
                invalid_ratio,
                seed: 42,
                progress: false,
                avro_schema_id: None,
                round_robin_partitions: None,
            };
            produce_events(&brokers, &topic, &options, load, Some(metrics)).await
        })
    };
    // Throughput is measured from the first event received to the last one
    // handled: the consumer group's start-up is reported on its own.
    let mut progress = Progress::start(quiet, Some(count));
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut interrupted = false;
    let mut first_received: Option<Instant> = None;
    let mut last_handled = started;
    let mut handled_before = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = signal.changed() => { interrupted = true; }
        }
        let received = Metrics::total(&metrics.events_received_total);
        let done = handled_total(&metrics);
        if received > 0 && first_received.is_none() {
            first_received = Some(Instant::now());
        }
        if done > handled_before {
            handled_before = done;
            last_handled = Instant::now();
        }
        progress.update(done, || {
            let rate = first_received
                .map(|at| done as f64 / at.elapsed().as_secs_f64().max(1e-3))
                .map(|r| format!("{} events/s", thousands(r as u64)))
                .unwrap_or_else(|| "waiting for the first event".into());
            format!(
                "received {}  written {}  dead-lettered {}  {rate}",
                thousands(received),
                thousands(Metrics::total(&metrics.records_written_total)),
                thousands(Metrics::total(&metrics.dlq_events_total)),
            )
        });
        if interrupted || done >= count || pipeline_task.is_finished() {
            break;
        }
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let _ = tx.send(true);
    let produced_valid = match producer.await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            eprintln!("producer failed: {}", safe_error(&e));
            None
        }
        Err(_) => None,
    };
    match pipeline_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => anyhow::bail!("pipeline task failed: {e}"),
    }
    let written = Metrics::total(&metrics.records_written_total);
    let skipped = Metrics::total(&metrics.records_skipped_total);
    let dlq = Metrics::total(&metrics.dlq_events_total);
    let batches = metrics.batch_records.get_sample_count();
    let handled = written + skipped + dlq;
    println!("demo summary");
    println!("  sink                {sink}");
    println!(
        "  produced            {} events ({} valid)",
        thousands(count),
        produced_valid.map(thousands).unwrap_or_else(|| "?".into())
    );
    println!("  received            {}", thousands(Metrics::total(&metrics.events_received_total)));
    println!("  written             {}", thousands(written));
    println!("  skipped (replays)   {}", thousands(skipped));
    println!("  dead-lettered       {}", thousands(dlq));
    println!(
        "  batches             {} (max_records {}, mean {:.0} records)",
        thousands(batches),
        thousands(batch_size as u64),
        if batches > 0 { metrics.batch_records.get_sample_sum() / batches as f64 } else { 0.0 }
    );
    match first_received {
        Some(first) => {
            let flowing = last_handled.saturating_duration_since(first).as_secs_f64().max(1e-3);
            println!("  first event         {:.2} s after start", first.duration_since(started).as_secs_f64());
            println!(
                "  throughput          {} events/s ({} events in {flowing:.2} s, first received to last written)",
                thousands((handled as f64 / flowing) as u64),
                thousands(handled)
            );
        }
        None => println!("  first event         none received in {elapsed:.1} s"),
    }
    if let (Some(p50), Some(p99)) =
        (histogram_quantile(&metrics.end_to_end_seconds, 0.5), histogram_quantile(&metrics.end_to_end_seconds, 0.99))
    {
        println!("  end-to-end latency  p50 {:.0} ms, p99 {:.0} ms (Kafka timestamp to durable)", p50 * 1e3, p99 * 1e3);
    }
    if let Some(rows) = sink_rows(&sink).await {
        println!("  rows in the sink    {}", thousands(rows));
    }
    println!("  elapsed             {elapsed:.2} s");
    print_next_steps(&sink, metrics_addr);
    Ok(if interrupted { EXIT_REJECTED } else { EXIT_OK })
}

/// `run` and `demo` on the embedded broker are local: their metrics listen
/// on loopback unless `metrics.listen` was set to something else.
fn local_defaults(config: &mut Config) {
    if config.kafka.is_embedded() && config.metrics.listen == crate::config::MetricsConfig::default().listen {
        config.metrics.listen = "127.0.0.1:9464".into();
    }
}

/// The `q` quantile of a histogram, interpolated inside its bucket.
fn histogram_quantile(histogram: &prometheus::Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let families = histogram.collect();
    let h = families.first()?.get_metric().first()?.get_histogram().clone();
    let total = h.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for bucket in h.get_bucket() {
        let (upper, cumulative) = (bucket.upper_bound(), bucket.cumulative_count());
        if cumulative as f64 >= rank {
            let inside = (cumulative - below).max(1) as f64;
            return Some(lower + (upper - lower) * ((rank - below as f64) / inside).clamp(0.0, 1.0));
        }
        (lower, below) = (upper, cumulative);
    }
    Some(lower)
}

/// Rows in the sink's table, for the summary (`None` for Dataverse or if unreachable).
async fn sink_rows(sink: &crate::config::SinkUrl) -> Option<u64> {
    let table = &crate::table::table().logical_name;
    match sink {
        crate::config::SinkUrl::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).ok()?;
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).ok().map(|n| n as u64)
        }
        crate::config::SinkUrl::Postgres(url) => {
            let client = crate::sink::postgres::connect(url).await.ok()?;
            let row = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.ok()?;
            Some(row.get::<_, i64>(0) as u64)
        }
        crate::config::SinkUrl::Dataverse(_) => None,
    }
}

/// What to do after the demo: where the data is, how to look at it, how to go real.
fn print_next_steps(sink: &crate::config::SinkUrl, metrics: Option<std::net::SocketAddr>) {
    let table = &crate::table::table().logical_name;
    let query = format!("SELECT msdyn_interactiontype, count(*) FROM {table} GROUP BY 1 ORDER BY 2 DESC");
    println!();
    println!("next steps");
    match sink {
        crate::config::SinkUrl::Sqlite(path) => {
            println!("  the data is in      {}", path.display());
            println!("  look at it          sqlite3 {} \"{query}\"", path.display());
        }
        crate::config::SinkUrl::Postgres(url) => {
            println!("  the data is in      {}", crate::config::redact_url(url));
            println!("  look at it          psql \"{}\" -c \"{query}\"", crate::config::redact_url(url));
        }
        crate::config::SinkUrl::Dataverse(target) => println!("  the data is in      {}", target.api_url),
    }
    if let Some(addr) = metrics {
        println!("  metrics             copilot-ingest run, then: curl http://{addr}/metrics");
    }
    println!("  a real Kafka and PostgreSQL:");
    println!("    COPILOT_INGEST__KAFKA__BROKERS=broker1:9092 \\");
    println!(
        "    COPILOT_INGEST__SINK__URL='postgres://user:password@db:5432/copilot?sslmode=verify-full' copilot-ingest run"
    );
    println!("  every setting       copilot-ingest config example > copilot-ingest.toml");
}
