//! The ingest transport: Kafka events become CreateMultiple batches.
//!
//! - [`source`]: the Kafka consumer thread, pause-based backpressure, rebalances.
//! - [`pipeline`]: decode → normalize → batch → write, the select loop tying them together, and the drain.
//! - [`dlq`]: dead letters with `x-ingest-*` headers.
//! - [`offsets`]: the contiguous offset watermark.

pub mod dlq;
pub mod offsets;
pub mod pipeline;
pub mod source;
