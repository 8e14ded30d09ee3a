//! copilot-ingest: Kafka → validated `msdyn_copilotinteraction` records →
//! CreateMultiple batches into SQLite or PostgreSQL, with dead-lettering and
//! at-least-once offsets.
//!
//! Module map, in data-path order:
//! - [`config`]: the TOML + environment configuration, checked once.
//! - [`table`]: the table definition read from `schemas/` (one source of truth).
//! - [`source`]: the Kafka consumer thread, pause-based backpressure, rebalances.
//! - [`decode`] (`decode/json.rs` with its direct reader `decode/flat_json.rs`, or `decode/avro.rs`) → event fields →
//!   [`normalize`] → [`record`]: bytes → validated record; [`reason`]: rejection codes.
//! - [`batch`]: count / bytes / linger batching.
//! - [`sink`]: CreateMultiple writes (SQLite, PostgreSQL), retry and bisection.
//! - [`dlq`]: dead letters with `x-ingest-*` headers.
//! - [`offsets`]: the contiguous offset watermark.
//! - [`pipeline`]: the select loop tying them together, and the drain.
//! - [`metrics`], [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`embedded`]: the in-process Kafka-protocol broker; [`generator`]: demo events.
//! - [`control`]: retention and purge commands from the control topic (FetchXML criteria).
//! - [`cli`]: the subcommands (`cli/service.rs` wiring for `run`, `cli/control_client.rs` the control
//!   request/reply client, `cli/load.rs` the load generator, `cli/demo.rs`, `cli/validate.rs`);
//!   [`progress`]: the progress display and the log writer beside it.

pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod decode;
/// The Avro decoder, also reachable at the crate root.
pub use decode::avro;
pub mod dlq;
pub mod embedded;
pub mod generator;
pub mod http;
pub mod http_client;
pub mod kafka_log;
pub mod metrics;
pub mod normalize;
pub mod offsets;
pub mod pipeline;
pub mod progress;
pub mod reason;
pub mod record;
pub mod sink;
pub mod source;
pub mod table;
