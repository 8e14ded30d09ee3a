//! copilot-ingest: Kafka → validated `msdyn_copilotinteraction` records →
//! CreateMultiple batches into SQLite or PostgreSQL, with dead-lettering and
//! at-least-once offsets.
//!
//! Module map — the table, its backends, its operations, its transports:
//! - [`table`]: the table definition read from `schemas/` (one source of truth); [`config`]: TOML + environment.
//! - [`decode`] (JSON, Avro) → [`normalize`] → [`record`]: bytes → validated record; [`reason`]: rejection codes.
//! - [`backend`]: one folder per backend (SQLite, PostgreSQL, Dataverse), each owning its DDL, connections,
//!   error classification, writes, reads, retention pages, tombstones and dead-letter ledger.
//! - [`operations`]: one function per Dataverse message of the table (CreateMultiple, Retrieve, the retention
//!   messages, …), over the backend interface; [`query`]: FetchXML criteria compiled to bound SQL.
//! - [`transport`]: how requests arrive — [`transport::ingest`] (Kafka events → CreateMultiple, dead letters,
//!   offsets), [`transport::control`] (signed commands on the control topic), [`transport::http`] (metrics, health).
//! - [`batch`]: count / bytes / linger batching; [`backoff`]: retry pacing; [`metrics`]: Prometheus series.
//! - [`embedded`]: the in-process Kafka-protocol broker; [`generator`]: demo events.
//! - [`cli`]: the subcommands (`cli/service.rs` wiring for `run`, `cli/control_client.rs` the control
//!   request/reply client, `cli/load.rs` the load generator, `cli/demo.rs`, `cli/validate.rs`);
//!   [`progress`]: the progress display and the log writer beside it.

pub mod backend;
pub mod backoff;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod decode;
/// The Avro decoder, also reachable at the crate root.
pub use decode::avro;
pub mod embedded;
pub mod generator;
pub mod http_client;
pub mod kafka_log;
pub mod metrics;
pub mod normalize;
pub mod operations;
pub mod progress;
pub mod query;
pub mod reason;
pub mod record;
pub mod table;
pub mod transport;
