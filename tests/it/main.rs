//! Integration tests: one binary, one module per area.

mod avro;
mod cli;
mod common;
mod control;
mod dataverse;
mod dataverse_emulator;
mod faults;
mod interop;
mod messages;
mod observability;
mod pipeline;
mod postgres_tls;
mod scheduler;
mod webapi;
