//! The load generator (`copilot-ingest produce`, and the producer behind
//! `demo` and `bench`).

use super::*;

/// What a load generator run produces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub count: u64,
    /// Events per second; 0 = unlimited.
    pub rate: u64,
    pub invalid_ratio: f64,
    pub seed: u64,
    pub progress: bool,
    /// Confluent-framed Avro with this bundled schema id instead of JSON.
    pub avro_schema_id: Option<u32>,
    /// Spread messages round-robin over this many partitions (instead of by key).
    pub round_robin_partitions: Option<i32>,
}

/// Events the demo producer may be ahead of the pipeline: the embedded broker
/// keeps only a few MB per partition, so it must not be flooded.
pub(crate) const DEMO_WINDOW: u64 = 20_000;

/// Produces the generated events; returns how many of them are valid. With
/// `handled`, waits whenever it is more than [`DEMO_WINDOW`] events ahead.
pub(crate) async fn produce_events(
    brokers: &str,
    topic: &str,
    options: &[(String, String)],
    load: Load,
    handled: Option<Arc<Metrics>>,
) -> anyhow::Result<u64> {
    let Load { count, rate, invalid_ratio, seed, progress, avro_schema_id, round_robin_partitions } = load;
    let avro_schema = match avro_schema_id {
        Some(id) => {
            let text = crate::avro::BUNDLED
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, t)| *t)
                .ok_or_else(|| anyhow::anyhow!("no bundled schema with id {id}"))?;
            Some((id, apache_avro::Schema::parse_str(text)?))
        }
        None => None,
    };
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    let options = options.to_vec();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &brokers)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("compression.type", "none");
        for (k, v) in &options {
            cfg.set(k, v);
        }
        let producer: BaseProducer = cfg.create()?;
        let mut generator = Generator::new(seed, invalid_ratio);
        let started = Instant::now();
        let mut display = crate::progress::Progress::start(!progress, Some(count));
        let mut valid = 0u64;
        for i in 0..count {
            if rate > 0 {
                // Sleep only when a millisecond ahead: one sleep per message
                // would cost more CPU than producing it at high rates.
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                let now = Instant::now();
                if due > now + Duration::from_millis(1) {
                    std::thread::sleep(due - now);
                }
            }
            if let Some(metrics) = &handled {
                while i >= handled_total(metrics) + DEMO_WINDOW {
                    producer.poll(Duration::from_millis(5));
                }
            }
            let g = generator.next(false);
            if g.expected.is_none() {
                valid += 1;
            }
            let value = match &avro_schema {
                // Invalid events that are not even JSON travel as framed garbage (malformed_avro).
                Some((id, schema)) => match serde_json::from_slice(&g.value)
                    .map_err(|e| e.to_string())
                    .and_then(|j| crate::avro::encode_json(schema, &j))
                {
                    Ok(datum) => crate::avro::framed(*id, &datum),
                    Err(_) => crate::avro::framed(*id, &[0xff, 0xff, 0xff]),
                },
                None => g.value,
            };
            let mut record = BaseRecord::to(&topic).key(&g.key).payload(&value);
            if let Some(p) = round_robin_partitions.filter(|p| *p > 0) {
                record = record.partition((i % p as u64) as i32);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            producer.poll(Duration::ZERO);
            if i % 1000 == 0 {
                display.update(i, || {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    format!(
                        "produced {} of {} events, {} events/s",
                        crate::progress::thousands(i),
                        crate::progress::thousands(count),
                        crate::progress::thousands((i as f64 / secs) as u64)
                    )
                });
            }
        }
        display.finish();
        producer.flush(Duration::from_secs(60))?;
        Ok(valid)
    })
    .await?
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn produce_cmd(
    config: Config,
    count: u64,
    rate: u64,
    invalid_ratio: f64,
    format: ProduceFormat,
    brokers: Option<String>,
    topic: Option<String>,
    seed: u64,
    quiet: bool,
) -> anyhow::Result<i32> {
    if !(0.0..=1.0).contains(&invalid_ratio) {
        eprintln!("--invalid-ratio must be between 0 and 1");
        return Ok(EXIT_CONFIG);
    }
    let brokers = brokers.unwrap_or_else(|| config.kafka.brokers.clone());
    if brokers.trim() == "embedded" {
        eprintln!(
            "produce needs a running broker: pass --brokers host:port (see `copilot-ingest broker`) or set kafka.brokers"
        );
        return Ok(EXIT_CONFIG);
    }
    let topic = topic.unwrap_or_else(|| config.kafka.topic.clone());
    let started = Instant::now();
    let valid = produce_events(
        &brokers,
        &topic,
        &pipeline::kafka_options(&config),
        Load {
            count,
            rate,
            invalid_ratio,
            seed,
            progress: !quiet,
            avro_schema_id: (format == ProduceFormat::Avro).then_some(2),
            round_robin_partitions: None,
        },
        None,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events ({} valid, {} invalid) to {topic} in {secs:.2} s ({} events/s)",
        crate::progress::thousands(count),
        crate::progress::thousands(valid),
        crate::progress::thousands(count - valid),
        crate::progress::thousands((count as f64 / secs.max(1e-9)) as u64)
    );
    Ok(EXIT_OK)
}

/// Records written, skipped or dead-lettered so far.
pub(crate) fn handled_total(m: &Metrics) -> u64 {
    Metrics::total(&m.records_written_total)
        + Metrics::total(&m.records_skipped_total)
        + Metrics::total(&m.dlq_events_total)
}
