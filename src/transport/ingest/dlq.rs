//! The dead-letter producer (SPEC §5): the original key, value and headers,
//! plus `x-ingest-*` headers saying why and where from. A DLQ record counts as
//! handled only once the broker acknowledged it; failures are retried.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::backoff::Backoff;
use crate::kafka_log::QuietContext;
use crate::reason::Rejection;
use crate::transport::ingest::source::Inbound;

pub fn producer_config(brokers: &str, options: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        // Idempotence: a retried DLQ send never appears twice.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", "16777216");
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

/// The product's producer: its logs go through [`QuietContext`].
pub type Producer = FutureProducer<QuietContext>;

pub fn create_producer(config: &ClientConfig, client: &'static str) -> Result<Producer, KafkaError> {
    config.create_with_context(QuietContext::new(client))
}

/// How much of the original value a dead letter keeps when the whole message
/// is larger than the broker accepts.
const TRUNCATED_VALUE_BYTES: usize = 64 * 1024;

/// Sends one dead letter, retrying until the broker acknowledges it. A value
/// the broker refuses as too large is cut to its first 64 KiB (header
/// `x-ingest-value-truncated` gives the original size), so a poison message
/// can never stall its partition.
pub async fn dead_letter(
    producer: &Producer,
    dlq_topic: &str,
    source_topic: &str,
    message: &Inbound,
    rejection: &Rejection,
) {
    let mut backoff = Backoff::default();
    let mut value_limit: Option<usize> = None;
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 6);
        for (k, v) in &message.headers {
            headers = headers.insert(Header { key: k, value: v.as_deref() });
        }
        let partition = message.partition.to_string();
        let offset = message.offset.to_string();
        let field = rejection.field.as_deref().unwrap_or("");
        headers = headers
            .insert(Header { key: "x-ingest-error-reason", value: Some(rejection.reason.code()) })
            .insert(Header { key: "x-ingest-error-field", value: Some(field) })
            .insert(Header { key: "x-ingest-error-message", value: Some(rejection.message.as_str()) })
            .insert(Header { key: "x-ingest-source-topic", value: Some(source_topic) })
            .insert(Header { key: "x-ingest-source-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "x-ingest-source-offset", value: Some(offset.as_str()) });
        let original_size = message.payload.as_ref().map_or(0, Vec::len).to_string();
        if value_limit.is_some() {
            headers = headers.insert(Header { key: "x-ingest-value-truncated", value: Some(original_size.as_str()) });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic).headers(headers);
        if let Some(k) = &message.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &message.payload {
            record = record.payload(&p[..p.len().min(value_limit.unwrap_or(usize::MAX))]);
        }
        if let Some(ts) = message.timestamp_ms {
            record = record.timestamp(ts);
        }
        match producer.send(record, Timeout::After(Duration::from_secs(60))).await {
            Ok(_) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))
                if value_limit != Some(0) =>
            {
                // Too large even for the DLQ: keep a prefix, then nothing.
                value_limit = Some(if value_limit.is_none() { TRUNCATED_VALUE_BYTES } else { 0 });
                tracing::warn!(
                    partition = message.partition,
                    offset = message.offset,
                    "dead letter too large for the broker; truncating its value"
                );
            }
            Err((e, _)) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, partition = message.partition, offset = message.offset, "dead-letter send failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
