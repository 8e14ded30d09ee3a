//! The embedded Kafka-protocol broker: librdkafka's mock cluster, in-process,
//! with real TCP listeners on 127.0.0.1 that any Kafka client can reach. For
//! local use, the demo and tests — it keeps only a few MB per partition.

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

use crate::config::KafkaConfig;

/// The mock cluster lives inside this client (librdkafka's
/// `test.mock.num.brokers`), which gives access to its native handle for the
/// settings the Rust wrapper does not expose.
pub struct EmbeddedBroker {
    owner: BaseProducer,
}

impl EmbeddedBroker {
    /// Starts the broker for `run`, `demo` and `broker`, and creates the
    /// product's topics. A new consumer group forms at once: the mock waits
    /// 3 s by default (like a real broker's `group.initial.rebalance.delay.ms`)
    /// before the first assignment, which a local demo would spend idle.
    pub fn start(kafka: &KafkaConfig) -> Result<EmbeddedBroker, KafkaError> {
        let broker = EmbeddedBroker::start_with_default_group_delay(kafka)?;
        // SAFETY: the pointer is the live client `broker.owner`; librdkafka
        // returns its mock cluster, or null if it has none (checked below).
        let handle = unsafe { rdkafka_sys::rd_kafka_handle_mock_cluster(broker.owner.client().native_ptr()) };
        if handle.is_null() {
            return Err(KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail));
        }
        // SAFETY: `handle` is the live mock cluster owned by `broker.owner`, which outlives this call.
        unsafe { rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(handle, 0) };
        Ok(broker)
    }

    /// The broker with the mock's default group delay (3 s), for the
    /// multi-instance tests: their timing (a joining member gets its first
    /// work from events produced while it joins) was written against it.
    pub fn start_with_default_group_delay(kafka: &KafkaConfig) -> Result<EmbeddedBroker, KafkaError> {
        let owner: BaseProducer = ClientConfig::new().set("test.mock.num.brokers", "1").create()?;
        let broker = EmbeddedBroker { owner };
        broker.create_topic(&kafka.topic, kafka.embedded_partitions)?;
        broker.create_topic(&kafka.dlq_topic, kafka.embedded_partitions)?;
        broker.create_topic(&kafka.control_topic, 1)?;
        broker.create_topic(&kafka.control_reply_topic, 1)?;
        Ok(broker)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster()?.create_topic(name, partitions, 1)
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster().map(|c| c.bootstrap_servers()).unwrap_or_default()
    }

    /// The mock cluster itself, for fault injection (request errors, broker
    /// down and up, round-trip time). Its single broker has id 1.
    pub fn cluster(&self) -> Result<MockCluster<'_, DefaultProducerContext>, KafkaError> {
        self.owner.client().mock_cluster().ok_or(KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail))
    }
}
