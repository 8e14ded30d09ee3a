//! `copilot-ingest demo`: `run` on the embedded defaults with the built-in
//! producer, a progress display, the summary and the next steps.

use super::*;

pub(crate) async fn demo(
    mut config: Config,
    count: u64,
    invalid_ratio: f64,
    rate: u64,
    quiet: bool,
) -> anyhow::Result<i32> {
    use crate::progress::{Progress, thousands};
    if !(0.0..=1.0).contains(&invalid_ratio) {
        eprintln!("--invalid-ratio must be between 0 and 1");
        return Ok(EXIT_CONFIG);
    }
    if config.kafka.format == Format::Avro {
        config.kafka.format = Format::Auto;
    }
    local_defaults(&mut config);
    let (tx, shutdown) = watch::channel(false);
    let mut signal = shutdown_signal();
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let metrics_addr = start_http(&config, &metrics, &readiness, &shutdown, false).await?;
    let (_broker, brokers) = brokers_for(&config)?;
    let options = pipeline::kafka_options(&config);
    let batch_size = config.batch.max_records;
    let sink = config.sink_url().map_err(anyhow::Error::msg)?;
    let topic = config.kafka.topic.clone();

    let pipeline_task = {
        let metrics = Arc::clone(&metrics);
        let readiness = Arc::clone(&readiness);
        let brokers = brokers.clone();
        tokio::spawn(async move { pipeline::run(config, &brokers, metrics, readiness, shutdown).await })
    };
    let started = Instant::now();
    let producer = {
        let brokers = brokers.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let load = Load {
                count,
                rate,
                invalid_ratio,
                seed: 42,
                progress: false,
                avro_schema_id: None,
                round_robin_partitions: None,
            };
            produce_events(&brokers, &topic, &options, load, Some(metrics)).await
        })
    };
    // Throughput is measured from the first event received to the last one
    // handled: the consumer group's start-up is reported on its own.
    let mut progress = Progress::start(quiet, Some(count));
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut interrupted = false;
    let mut first_received: Option<Instant> = None;
    let mut last_handled = started;
    let mut handled_before = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = signal.changed() => { interrupted = true; }
        }
        let received = Metrics::total(&metrics.events_received_total);
        let done = handled_total(&metrics);
        if received > 0 && first_received.is_none() {
            first_received = Some(Instant::now());
        }
        if done > handled_before {
            handled_before = done;
            last_handled = Instant::now();
        }
        progress.update(done, || {
            let rate = first_received
                .map(|at| done as f64 / at.elapsed().as_secs_f64().max(1e-3))
                .map(|r| format!("{} events/s", thousands(r as u64)))
                .unwrap_or_else(|| "waiting for the first event".into());
            format!(
                "received {}  written {}  dead-lettered {}  {rate}",
                thousands(received),
                thousands(Metrics::total(&metrics.records_written_total)),
                thousands(Metrics::total(&metrics.dlq_events_total)),
            )
        });
        if interrupted || done >= count || pipeline_task.is_finished() {
            break;
        }
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let _ = tx.send(true);
    let produced_valid = match producer.await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            eprintln!("producer failed: {}", safe_error(&e));
            None
        }
        Err(_) => None,
    };
    match pipeline_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => anyhow::bail!("pipeline task failed: {e}"),
    }
    let written = Metrics::total(&metrics.records_written_total);
    let skipped = Metrics::total(&metrics.records_skipped_total);
    let dlq = Metrics::total(&metrics.dlq_events_total);
    let batches = metrics.batch_records.get_sample_count();
    let handled = written + skipped + dlq;
    println!("demo summary");
    println!("  sink                {sink}");
    println!(
        "  produced            {} events ({} valid)",
        thousands(count),
        produced_valid.map(thousands).unwrap_or_else(|| "?".into())
    );
    println!("  received            {}", thousands(Metrics::total(&metrics.events_received_total)));
    println!("  written             {}", thousands(written));
    println!("  skipped (replays)   {}", thousands(skipped));
    println!("  dead-lettered       {}", thousands(dlq));
    println!(
        "  batches             {} (max_records {}, mean {:.0} records)",
        thousands(batches),
        thousands(batch_size as u64),
        if batches > 0 { metrics.batch_records.get_sample_sum() / batches as f64 } else { 0.0 }
    );
    match first_received {
        Some(first) => {
            let flowing = last_handled.saturating_duration_since(first).as_secs_f64().max(1e-3);
            println!("  first event         {:.2} s after start", first.duration_since(started).as_secs_f64());
            println!(
                "  throughput          {} events/s ({} events in {flowing:.2} s, first received to last written)",
                thousands((handled as f64 / flowing) as u64),
                thousands(handled)
            );
        }
        None => println!("  first event         none received in {elapsed:.1} s"),
    }
    if let (Some(p50), Some(p99)) = (
        crate::metrics::histogram_quantile(&metrics.end_to_end_seconds, 0.5),
        crate::metrics::histogram_quantile(&metrics.end_to_end_seconds, 0.99),
    ) {
        println!("  end-to-end latency  p50 {:.0} ms, p99 {:.0} ms (Kafka timestamp to durable)", p50 * 1e3, p99 * 1e3);
    }
    if let Some(rows) = sink_rows(&sink).await {
        println!("  rows in the sink    {}", thousands(rows));
    }
    println!("  elapsed             {elapsed:.2} s");
    print_next_steps(&sink, metrics_addr);
    Ok(if interrupted { EXIT_REJECTED } else { EXIT_OK })
}

/// Rows in the sink's table, for the summary (`None` for Dataverse or if unreachable).
pub(crate) async fn sink_rows(sink: &crate::config::SinkUrl) -> Option<u64> {
    let table = &crate::table::table().logical_name;
    match sink {
        crate::config::SinkUrl::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).ok()?;
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).ok().map(|n| n as u64)
        }
        crate::config::SinkUrl::Postgres(url) => {
            let client = crate::backend::postgres::connect(url).await.ok()?;
            let row = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.ok()?;
            Some(row.get::<_, i64>(0) as u64)
        }
        crate::config::SinkUrl::Dataverse(_) => None,
    }
}

/// What to do after the demo: where the data is, how to look at it, how to go real.
pub(crate) fn print_next_steps(sink: &crate::config::SinkUrl, metrics: Option<std::net::SocketAddr>) {
    let table = &crate::table::table().logical_name;
    let query = format!("SELECT msdyn_interactiontype, count(*) FROM {table} GROUP BY 1 ORDER BY 2 DESC");
    println!();
    println!("next steps");
    match sink {
        crate::config::SinkUrl::Sqlite(path) => {
            println!("  the data is in      {}", path.display());
            println!("  look at it          sqlite3 {} \"{query}\"", path.display());
        }
        crate::config::SinkUrl::Postgres(url) => {
            println!("  the data is in      {}", crate::config::redact_url(url));
            println!("  look at it          psql \"{}\" -c \"{query}\"", crate::config::redact_url(url));
        }
        crate::config::SinkUrl::Dataverse(target) => println!("  the data is in      {}", target.api_url),
    }
    if let Some(addr) = metrics {
        println!("  metrics             copilot-ingest run, then: curl http://{addr}/metrics");
    }
    println!(
        "  the Web API         copilot-ingest run, then: curl 'http://{}/api/data/v9.2/msdyn_copilotinteractions?$top=3&$select=msdyn_name'",
        super::service::LOCAL_API_LISTEN
    );
    println!("  a real Kafka and PostgreSQL:");
    println!("    COPILOT_INGEST__KAFKA__BROKERS=broker1:9092 \\");
    println!(
        "    COPILOT_INGEST__SINK__URL='postgres://user:password@db:5432/copilot?sslmode=verify-full' copilot-ingest run"
    );
    println!("  every setting       copilot-ingest config example > copilot-ingest.toml");
}
