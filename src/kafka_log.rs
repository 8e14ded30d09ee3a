//! librdkafka's logs and errors, said once. An unreachable broker makes every
//! client report the same failure several times a second through two paths
//! (its log and its error callback); an operator needs one clear line, then
//! a reminder with a count while it lasts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// How long the same message stays quiet after it was logged.
const QUIET_FOR: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Throttle {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Throttle {
    /// `Some(repeats suppressed since it was last logged)` when `key` may be
    /// logged now, `None` while it is quiet.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let Ok(mut seen) = self.seen.lock() else { return Some(0) };
        let now = Instant::now();
        match seen.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < QUIET_FOR => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let count = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(count)
            }
            None => {
                // Bounded: keys are error kinds and broker names, but never trust that.
                if seen.len() > 1000 {
                    seen.clear();
                }
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

/// The part of a librdkafka message that identifies its kind: the text
/// without numbers (durations, counts and ports change between repeats).
fn kind(message: &str) -> String {
    message.chars().filter(|c| !c.is_ascii_digit()).take(120).collect()
}

/// Logs a librdkafka log line through `throttle`.
pub fn log(throttle: &Throttle, client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    if facility == "FAIL" {
        // Connection failures also arrive through the error callback, which says them once.
        tracing::debug!(client, facility, "librdkafka: {message}");
        return;
    }
    if skips_events(facility, message) {
        // Every one is said: each means events that will never be ingested.
        tracing::warn!(
            client,
            facility,
            "events were deleted by the broker before they were ingested (retention outran the consumer, or the \
             partition was truncated); they are skipped and lost to this consumer group. librdkafka: {message}"
        );
        return;
    }
    let Some(suppressed) = throttle.allow(&format!("log {facility} {}", kind(message))) else { return };
    let repeated = if suppressed > 0 { format!(" ({suppressed} repeats not shown)") } else { String::new() };
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::warn!(client, facility, "librdkafka: {message}{repeated}")
        }
        RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
            tracing::info!(client, facility, "librdkafka: {message}{repeated}")
        }
        _ => tracing::debug!(client, facility, "librdkafka: {message}{repeated}"),
    }
}

/// Whether a log line says the consumer's position was reset because the
/// broker no longer holds the offset it had reached: the events in between
/// are skipped. A first start without a committed offset also resets the
/// position, but skips nothing.
pub fn skips_events(facility: &str, message: &str) -> bool {
    facility == "OFFSET"
        && message.contains("offset reset")
        && (message.contains("Offset out of range") || message.contains("offset not available on the broker"))
}

/// Logs a client error through `throttle`, in words an operator can act on.
pub fn error(throttle: &Throttle, client: &str, error: &KafkaError, reason: &str) {
    let code = error.rdkafka_error_code();
    let Some(suppressed) = throttle.allow(&format!("error {code:?}")) else { return };
    let repeated = if suppressed > 0 { format!(" ({suppressed} repeats not shown)") } else { String::new() };
    match code {
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            tracing::warn!(client, "cannot reach the Kafka brokers; retrying: {reason}{repeated}")
        }
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => tracing::error!(
            client,
            "a topic does not exist: create it (the service never creates topics) or fix kafka.topic / \
             kafka.dlq_topic / kafka.control_topic; waiting for it: {reason}{repeated}"
        ),
        _ if is_fatal(error, reason) => {
            tracing::error!(client, "Kafka connection refused by security settings: {reason}{repeated}")
        }
        _ => tracing::warn!(client, error = %error, "kafka: {reason}{repeated}"),
    }
}

/// TLS verification and SASL authentication failures: no retry will fix them
/// before someone changes the configuration.
pub fn is_fatal(error: &KafkaError, reason: &str) -> bool {
    matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Authentication))
        || (matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::SSL)) && reason.contains("certificate"))
}

/// The context of the product's auxiliary clients (the dead-letter producer,
/// the control consumer and producer): quiet, named logs.
pub struct QuietContext {
    client: &'static str,
    throttle: Throttle,
}

impl QuietContext {
    pub fn new(client: &'static str) -> QuietContext {
        QuietContext { client, throttle: Throttle::default() }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(&self.throttle, self.client, level, fac, log_message);
    }

    fn error(&self, e: KafkaError, reason: &str) {
        error(&self.throttle, self.client, &e, reason);
    }
}

impl ConsumerContext for QuietContext {}

/// librdkafka's reason for refusing a configuration property, with the
/// property's value masked wherever its text quotes it (the value may be a
/// credential); `None` for any other error.
pub fn refused_property(e: &rdkafka::error::KafkaError) -> Option<(String, String)> {
    let rdkafka::error::KafkaError::ClientConfig(_, description, key, value) = e else { return None };
    let description = if value.is_empty() { description.clone() } else { description.replace(value.as_str(), "***") };
    Some((key.clone(), description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_quiet_and_counted() {
        let t = Throttle::default();
        assert_eq!(t.allow("a"), Some(0));
        assert_eq!(t.allow("a"), None);
        assert_eq!(t.allow("a"), None);
        assert_eq!(t.allow("b"), Some(0));
        // Pretend the quiet period is over.
        t.seen.lock().unwrap().get_mut("a").unwrap().0 = Instant::now() - QUIET_FOR;
        assert_eq!(t.allow("a"), Some(2));
    }

    #[test]
    fn a_reset_past_deleted_events_is_told_apart_from_a_first_start() {
        // The first as a consumer logged it when the embedded broker had
        // dropped a lagging partition's oldest events; the second in the
        // format librdkafka debug-logs a first start with.
        let deleted = "copilot.interactions [1]: offset reset (at offset 28497 (leader epoch 0), broker 1) to cached \
                       BEGINNING offset offset 28711 (leader epoch -1): fetch failed due to requested offset not \
                       available on the broker: Broker: Offset out of range";
        let first_start = "copilot.interactions [0]: offset reset (at offset INVALID (leader epoch -1), broker -1) \
                           to BEGINNING: no previously committed offset available: Local: No offset stored";
        assert!(skips_events("OFFSET", deleted));
        assert!(!skips_events("OFFSET", first_start));
        assert!(!skips_events("FETCH", deleted));
    }

    #[test]
    fn kinds_ignore_numbers() {
        assert_eq!(
            kind("127.0.0.1:9092/1: Connect failed (after 12ms)"),
            kind("127.0.0.1:9092/1: Connect failed (after 7ms)")
        );
    }

    #[test]
    fn only_security_failures_are_fatal() {
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        assert!(is_fatal(
            &ssl,
            "SSL handshake failed: certificate verify failed: unable to get local issuer certificate"
        ));
        assert!(!is_fatal(&ssl, "SSL handshake failed: Disconnected"));
        assert!(is_fatal(&KafkaError::Global(RDKafkaErrorCode::Authentication), "SASL authentication error"));
        assert!(!is_fatal(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down"));
    }
}
