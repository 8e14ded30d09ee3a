//! Transports: how requests reach the table's operations. Each one parses,
//! authenticates, calls an operation and encodes the answer; none of them
//! touches a database itself.
//!
//! - [`ingest`]: Kafka events → validated records → CreateMultiple batches (with dead letters and offsets).
//! - [`control`]: signed commands on the control topic → one operation each → a reply.
//! - [`http`]: the HTTP listener stack, and `/metrics`, `/healthz`, `/readyz` on it.
//! - [`webapi`]: the Dataverse-compatible Web API → the same operations as the control topic.

pub mod control;
pub mod http;
pub mod ingest;
pub mod webapi;
