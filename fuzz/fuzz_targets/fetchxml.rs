//! Any text as FetchXML criteria: parsed and compiled, or refused; never a panic.
#![no_main]

use copilot_ingest::control::fetchxml::{self, Dialect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(criteria) = fetchxml::parse(text, chrono::Utc::now()) {
            let _ = criteria.compile(Dialect::Postgres, 1);
            let _ = criteria.compile(Dialect::Sqlite, 1);
        }
    }
});
