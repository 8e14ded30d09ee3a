//! The embedded Kafka-protocol broker: librdkafka's mock cluster, in-process,
//! with real TCP listeners any Kafka client can reach. For local use, the demo
//! and tests — it keeps only a few MB per partition.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::KafkaConfig;

pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts the broker and creates the product's topics.
    pub fn start(kafka: &KafkaConfig) -> Result<EmbeddedBroker, KafkaError> {
        let cluster = MockCluster::new(1)?;
        let broker = EmbeddedBroker { cluster };
        broker.create_topic(&kafka.topic, kafka.embedded_partitions)?;
        broker.create_topic(&kafka.dlq_topic, kafka.embedded_partitions)?;
        broker.create_topic(&kafka.control_topic, 1)?;
        broker.create_topic(&kafka.control_reply_topic, 1)?;
        Ok(broker)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster.create_topic(name, partitions, 1)
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The mock cluster itself, for fault injection (request errors, broker
    /// down and up, round-trip time). Its single broker has id 1.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
