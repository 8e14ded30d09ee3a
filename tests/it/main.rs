//! Integration tests: one binary, one module per area.

mod avro;
mod cli;
mod common;
mod control;
mod observability;
mod pipeline;
