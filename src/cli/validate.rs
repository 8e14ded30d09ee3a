//! `copilot-ingest validate`: events in, one JSON result per line out.

use super::*;

pub(crate) fn validate(config: &Config, file: &str) -> i32 {
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
