//! Any bytes through the decoder (JSON or framed Avro, routed by `auto`):
//! a record or a rejection, never a panic or an unbounded allocation.
#![no_main]

use copilot_ingest::avro::AvroSchemas;
use copilot_ingest::config::{AvroConfig, Format};
use copilot_ingest::decode::Decoder;
use copilot_ingest::normalize::Normalizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static DECODER: Decoder = Decoder {
            normalizer: Normalizer::default(),
            format: Format::Auto,
            avro: AvroSchemas::load(&AvroConfig::default()).expect("bundled schemas"),
        };
    }
    DECODER.with(|d| {
        let _ = d.decode(data, None, chrono::Utc::now());
    });
});
