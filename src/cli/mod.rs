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
use crate::metrics::Metrics;
use crate::normalize::Normalizer;
use crate::transport::http::{self, Readiness};
use crate::transport::ingest::pipeline;

mod control_client;
mod demo;
mod load;
mod service;
mod validate;

use control_client::*;
use demo::*;
use load::*;
pub(crate) use load::{Load, produce_events};
use service::*;
use validate::*;

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
        /// Publish the command, print its OperationId and exit without waiting
        /// (follow it with `control operation --operation-id ID --watch`).
        #[arg(long, global = true)]
        no_wait: bool,
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
    /// Read one record (live or retained): its id and the given columns (default: all).
    #[command(alias = "Retrieve")]
    Retrieve {
        #[arg(long)]
        target: String,
        /// Comma-separated logical names.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// Read records matching a FetchXML query; prints one JSON object per record (JSON Lines).
    #[command(alias = "RetrieveMultiple")]
    RetrieveMultiple {
        #[arg(long)]
        fetchxml: String,
        /// Follow the paging cookie until the last page.
        #[arg(long)]
        all_pages: bool,
    },
    /// Change columns of one live record (validated as ingestion validates events).
    #[command(alias = "Update")]
    Update {
        #[arg(long)]
        target: String,
        /// `column=value`, repeatable; `column=null` clears one.
        #[arg(long = "set", required = true)]
        set: Vec<String>,
        /// Only if the record is still at this versionnumber (IfRowVersionMatches).
        #[arg(long)]
        row_version: Option<i64>,
    },
    /// Delete one record (live or retained); its id is tombstoned, so a replay never re-creates it.
    #[command(alias = "Delete")]
    Delete {
        #[arg(long)]
        target: String,
    },
    /// Set a record's state and status: 0/1 (Active), 1/2 (Inactive); status -1 = the state's default.
    #[command(alias = "SetState")]
    SetState {
        #[arg(long)]
        target: String,
        #[arg(long)]
        state: i32,
        #[arg(long, allow_hyphen_values = true, default_value_t = -1)]
        status: i32,
    },
    /// Whether a record may move to this state and status (changes nothing).
    #[command(alias = "IsValidStateTransition")]
    IsValidStateTransition {
        #[arg(long)]
        target: String,
        /// `Active` or `Inactive`.
        #[arg(long)]
        new_state: String,
        #[arg(long)]
        new_status: i32,
    },
    /// Delete every record matching the criteria (live, or retained with --retained), page by page.
    #[command(alias = "BulkDelete")]
    BulkDelete {
        #[arg(long)]
        fetchxml: String,
        #[arg(long)]
        retained: bool,
        #[arg(long)]
        page_size: Option<i64>,
    },
    /// The retention policies: status, recurrence, next run, last run and outcome, as a table.
    Policies,
    /// One operation (a long command or a scheduled run) as JSON; --watch follows it until it completes.
    Operation {
        #[arg(long)]
        operation_id: String,
        /// Poll every 2 s (a progress bar on a terminal, JSON lines otherwise) until it completes.
        #[arg(long)]
        watch: bool,
    },
    /// Pause a retention policy: it keeps its schedule and runs nothing.
    PausePolicy {
        #[arg(long)]
        uniquename: String,
    },
    /// Resume a paused retention policy (a run it missed while paused runs once).
    ResumePolicy {
        #[arg(long)]
        uniquename: String,
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
            Command::Control { action, brokers, timeout, command_id, no_wait } => {
                let options = ControlOptions { brokers, timeout: Duration::from_secs(timeout), command_id, no_wait };
                control_cmd(config, action, options).await
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
        if let Some((key, description)) =
            cause.downcast_ref::<rdkafka::error::KafkaError>().and_then(crate::kafka_log::refused_property)
        {
            return format!("librdkafka refused the property {key}: {description}");
        }
    }
    format!("{e:#}")
}

fn config_error(e: &ConfigErrors) -> i32 {
    eprint!("{e}");
    EXIT_CONFIG
}
