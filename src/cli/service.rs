//! Service wiring: `run` (the pipeline, the control consumer, the HTTP
//! endpoints and the embedded broker when configured), `migrate`, `broker`,
//! and the shutdown signal they share.

use super::*;

/// A watch that turns true on SIGTERM or Ctrl-C.
pub(crate) fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

pub(crate) async fn start_http(
    config: &Config,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    shutdown: &watch::Receiver<bool>,
    required: bool,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match tokio::net::TcpListener::bind(&config.metrics.listen).await {
        Ok(listener) => {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "metrics and health endpoints listening");
            tokio::spawn(http::serve(listener, Arc::clone(metrics), Arc::clone(readiness), shutdown.clone()));
            Ok(Some(addr))
        }
        Err(e) if !required => {
            tracing::warn!(listen = %config.metrics.listen, error = %e, "metrics endpoint not started");
            Ok(None)
        }
        Err(e) => anyhow::bail!("metrics.listen {}: {e}", config.metrics.listen),
    }
}

/// Starts the Web API when `api.listen` is set, over the service's backend;
/// the task ends once requests under way have been answered after shutdown.
pub(crate) async fn start_api(
    config: &Config,
    backend: &Arc<crate::backend::Backend>,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    use crate::transport::webapi;
    if !config.api.is_enabled() {
        return Ok(None);
    }
    if backend.kind() == "dataverse" {
        if config.api.local_default {
            return Ok(None);
        }
        anyhow::bail!(
            "api.listen: the Web API serves a SQLite or PostgreSQL sink; with dataverse:// use Dataverse's own Web API"
        );
    }
    let tls = webapi::tls_acceptor(&config.api)?;
    let listener = match tokio::net::TcpListener::bind(&config.api.listen).await {
        Ok(l) => l,
        Err(e) if config.api.local_default => {
            tracing::warn!(listen = %config.api.listen, error = %e, "local Web API not started; set api.listen to choose a port");
            return Ok(None);
        }
        Err(e) => anyhow::bail!("api.listen {}: {e}", config.api.listen),
    };
    let addr = listener.local_addr()?;
    // The Web API refuses unknown properties whatever validation.unknown_fields
    // says for Kafka events: Dataverse does.
    let api = Arc::new(webapi::WebApi::new(
        &config.api,
        Arc::clone(backend),
        crate::normalize::Normalizer::default(),
        Arc::clone(metrics),
    )?);
    let scheme = if config.api.tls() { "https" } else { "http" };
    println!("Web API listening on {scheme}://{addr}/api/data/v9.2/ (auth: {:?})", config.api.auth);
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, scheme, "Web API listening");
    Ok(Some(tokio::spawn(webapi::serve(listener, api, config.api.clone(), tls, shutdown.clone()))))
}

/// Starts the embedded broker when configured; returns it (to keep it alive) and the bootstrap list.
pub(crate) fn brokers_for(config: &Config) -> anyhow::Result<(Option<EmbeddedBroker>, String)> {
    if config.kafka.is_embedded() {
        let broker = EmbeddedBroker::start(&config.kafka)?;
        let addr = broker.bootstrap_servers();
        println!(
            "embedded Kafka broker listening on {addr} (topic {}, dlq {})",
            config.kafka.topic, config.kafka.dlq_topic
        );
        let _ = std::io::stdout().flush();
        Ok((Some(broker), addr))
    } else {
        Ok((None, config.kafka.brokers.clone()))
    }
}

pub(crate) async fn run(mut config: Config) -> anyhow::Result<i32> {
    local_defaults(&mut config);
    if config.kafka.is_embedded() && config.control.hmac_key.is_empty() {
        // The in-process broker is reachable only from this machine's
        // loopback; local tools send unsigned commands to it.
        config.control.allow_unsigned = true;
    } else if config.control.allow_unsigned && config.control.hmac_key.is_empty() {
        tracing::warn!(
            brokers = %config.kafka.brokers,
            "control.allow_unsigned = true: anyone who can write to the control topic can retain and purge records"
        );
    }
    let shutdown = shutdown_signal();
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    start_http(&config, &metrics, &readiness, &shutdown, true).await?;
    let (_broker, brokers) = brokers_for(&config)?;
    // One backend for ingestion and the control commands alike.
    let mut waiting = shutdown.clone();
    let Some(backend) = pipeline::open_sink(&config, &metrics, &mut waiting).await? else {
        tracing::info!("stopped while waiting for the sink; nothing was consumed");
        return Ok(EXIT_OK);
    };
    let api = start_api(&config, &backend, &metrics, &shutdown).await?;
    let control = tokio::spawn(crate::transport::control::consumer::supervised(
        crate::transport::control::consumer::run(
            config.clone(),
            brokers.clone(),
            Arc::clone(&backend),
            Arc::clone(&metrics),
            shutdown.clone(),
        ),
        Arc::clone(&readiness),
    ));
    tokio::spawn(crate::transport::control::consumer::prune_periodically(
        config.clone(),
        Arc::clone(&backend),
        shutdown.clone(),
    ));
    start_retention(&config, &brokers, &backend, &metrics, &shutdown).await?;
    pipeline::run_on(config, &brokers, backend, metrics, readiness, shutdown).await?;
    let _ = control.await;
    // The pipeline has drained; requests the Web API is still answering finish too.
    if let Some(api) = api {
        let _ = api.await;
    }
    Ok(EXIT_OK)
}

/// Reconciles the policies the file declares into the store, then runs the
/// retention scheduler until shutdown.
async fn start_retention(
    config: &Config,
    brokers: &str,
    backend: &Arc<crate::backend::Backend>,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use crate::operations::{policy, scheduler::Scheduler};
    let declared = config.retention.declared();
    if backend.kind() == "dataverse" {
        if !declared.is_empty() {
            tracing::warn!(
                policies = declared.len(),
                "retention.policies are not run with the dataverse:// sink: create them as retentionconfig rows in the Dataverse environment"
            );
        }
        return Ok(());
    }
    let (saved, removed) = policy::reconcile(backend, &declared, chrono::Utc::now())
        .await
        .map_err(|e| anyhow::anyhow!("retention.policies: {e}"))?;
    if saved + removed > 0 {
        tracing::info!(declared = saved, removed, "retention policies reconciled with the configuration");
    }
    // Each run's progress and outcome go out as replies, as a command's do.
    let (sender, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let options = pipeline::kafka_options(config);
    let producer = crate::transport::ingest::dlq::create_producer(
        &crate::transport::ingest::dlq::producer_config(brokers, &options),
        "retention replies",
    )?;
    let (topic, auth) =
        (config.kafka.control_reply_topic.clone(), crate::transport::control::Authenticator::new(&config.control));
    tokio::spawn(async move {
        while let Some(report) = reports.recv().await {
            let reply = crate::transport::control::Reply::of_run(&report);
            crate::transport::control::consumer::publish(&producer, &topic, &auth, &reply).await;
        }
    });
    let replies = crate::operations::scheduler::RunReplies { sender, every: crate::operations::report::REPORT_EVERY };
    let lease = chrono::TimeDelta::seconds(i64::try_from(config.retention.lease_seconds).unwrap_or(120));
    let scheduler = Scheduler::new(Arc::clone(backend), Arc::clone(metrics)).with_replies(replies).with_lease(lease);
    scheduler.export_policies().await.map_err(|e| anyhow::anyhow!("retention policies: {e}"))?;
    tokio::spawn(scheduler.run(shutdown.clone()));
    Ok(())
}

pub(crate) async fn migrate(config: Config) -> anyhow::Result<i32> {
    let (_tx, mut rx) = watch::channel(false);
    let Some(sink) = pipeline::open_sink(&config, &Arc::new(Metrics::new()), &mut rx).await? else {
        return Ok(EXIT_REJECTED);
    };
    println!("{} sink migrated", sink.kind());
    Ok(EXIT_OK)
}

pub(crate) async fn broker(mut config: Config, partitions: i32) -> anyhow::Result<i32> {
    config.kafka.embedded_partitions = partitions;
    let broker = EmbeddedBroker::start(&config.kafka)?;
    println!("{}", broker.bootstrap_servers());
    let _ = std::io::stdout().flush();
    eprintln!(
        "embedded Kafka broker on {} — topics {} and {} with {partitions} partitions; Ctrl-C to stop",
        broker.bootstrap_servers(),
        config.kafka.topic,
        config.kafka.dlq_topic
    );
    let mut shutdown = shutdown_signal();
    let _ = shutdown.changed().await;
    Ok(EXIT_OK)
}

/// The Web API `run` serves on the embedded defaults when `[api]` is not configured.
pub(crate) const LOCAL_API_LISTEN: &str = "127.0.0.1:8080";

/// `run` and `demo` on the embedded broker are local: their metrics listen
/// on loopback unless `metrics.listen` was set to something else, and the
/// Web API, unless configured, listens on loopback without authentication
/// (like the embedded broker, reachable from this machine only).
pub(crate) fn local_defaults(config: &mut Config) {
    if config.kafka.is_embedded() && !config.metrics.listen_set {
        config.metrics.listen = "127.0.0.1:9464".into();
    }
    if config.kafka.is_embedded() && !config.api.is_enabled() && config.api.tokens.is_empty() {
        config.api.listen = LOCAL_API_LISTEN.into();
        config.api.auth = crate::config::AuthMode::None;
        config.api.local_default = true;
    }
}
