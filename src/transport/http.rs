//! The HTTP endpoints of SPEC §7: `/metrics`, `/healthz`, `/readyz`, served
//! by hyper (HTTP/1.1) with axum's routing. Bounded like any listener facing
//! a network: at most [`MAX_CONNECTIONS`] at once (more wait in the kernel's
//! backlog), [`HEAD_TIMEOUT`] to send a request head of at most
//! [`MAX_HEAD_BYTES`], [`CONNECTION_TIMEOUT`] for a whole exchange, and a
//! failing `accept` (e.g. out of file descriptors) backs off instead of
//! spinning. On shutdown, answers under way finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Connections served at once; the rest wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read (hyper's minimum buffer).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Longest a connection is kept, answer included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What `/readyz` reports: the pipeline sets these as it learns them.
#[derive(Debug, Default)]
pub struct Readiness {
    pub broker_reachable: AtomicBool,
    pub sink_reachable: AtomicBool,
    /// Partitions assigned, or an assignment in progress.
    pub assigned: AtomicBool,
    /// The control consumer could not start or stopped: ingestion goes on,
    /// but retention commands are not executed.
    pub control_failed: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
            && self.sink_reachable.load(Ordering::Relaxed)
            && self.assigned.load(Ordering::Relaxed)
            && !self.control_failed.load(Ordering::Relaxed)
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) {
    serve_bounded(listener, metrics, readiness, shutdown, MAX_CONNECTIONS).await
}

async fn serve_bounded(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
    max_connections: usize,
) {
    let limits = Limits {
        max_connections,
        max_head_bytes: MAX_HEAD_BYTES,
        head_timeout: HEAD_TIMEOUT,
        connection_timeout: CONNECTION_TIMEOUT,
        keep_alive: false,
    };
    serve_app(listener, router(metrics, readiness), None, limits, shutdown).await
}

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the rest wait in the kernel's backlog.
    pub max_connections: usize,
    /// Largest request head.
    pub max_head_bytes: usize,
    /// Time to send a request head (and, between requests, how long an idle
    /// kept-alive connection is held), TLS handshake included.
    pub head_timeout: Duration,
    /// Longest a connection is kept, answers included.
    pub connection_timeout: Duration,
    pub keep_alive: bool,
}

/// Serves `app` on `listener` (https when `tls` is given) within `limits`
/// until `shutdown` turns true; answers under way then finish.
pub async fn serve_app(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        // A permit before accepting: past the limit, connections queue in the backlog.
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_backoff = Duration::from_millis(10);
                    stream
                }
                Err(e) => {
                    // e.g. out of file descriptors: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP listener: accept failed; backing off");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_buf_size(limits.max_head_bytes.max(8192))
            .keep_alive(limits.keep_alive);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        match &tls {
            None => {
                let connection =
                    connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _permit = permit;
                    // A client that reads its answer slowly is cut off as well.
                    let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
                });
            }
            Some(acceptor) => {
                let Ok(stream) = openssl::ssl::Ssl::new(acceptor.context())
                    .and_then(|ssl| tokio_openssl::SslStream::new(ssl, stream))
                else {
                    continue;
                };
                // The handshake runs in the connection's task, bounded like a request head.
                let mut stream = Box::pin(stream);
                let watcher = connections.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(limits.head_timeout, stream.as_mut().accept()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                    let connection =
                        watcher.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
                    let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
                });
            }
        }
    }
    // Answers being written finish; the rest are dropped after a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.shutdown()).await;
}

/// The routes; a request for anything else is 404, another method 405.
fn router(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let metrics_route = get(move || {
        let metrics = Arc::clone(&metrics);
        async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render()) }
    });
    let readyz = get(move || {
        let r = Arc::clone(&readiness);
        async move {
            if r.is_ready() {
                (StatusCode::OK, "ready\n".to_owned())
            } else {
                let body = format!(
                    "not ready: broker_reachable={} sink_reachable={} partitions_assigned={} control_consumer={}\n",
                    r.broker_reachable.load(Ordering::Relaxed),
                    r.sink_reachable.load(Ordering::Relaxed),
                    r.assigned.load(Ordering::Relaxed),
                    if r.control_failed.load(Ordering::Relaxed) { "failed" } else { "ok" }
                );
                (StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
    });
    axum::Router::new()
        .route("/metrics", metrics_route)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", readyz)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        s
    }

    /// Past the connection limit a client waits (in the backlog) until a
    /// served connection ends; it is then answered.
    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve_bounded(listener, Arc::new(Metrics::new()), Arc::new(Readiness::default()), rx, 2));
        // Two idle clients hold both slots (they never send a request).
        let idle_a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _idle_b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut waiting = get(addr).await;
        let mut buf = Vec::new();
        let early = tokio::time::timeout(Duration::from_millis(500), waiting.read_to_end(&mut buf)).await;
        assert!(early.is_err(), "answered although both slots are taken: {}", String::from_utf8_lossy(&buf));
        drop(idle_a);
        tokio::time::timeout(Duration::from_secs(10), waiting.read_to_end(&mut buf)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
    }

    /// A request head over the limit is refused without reading it all; a
    /// wrong method or path gets its status; others are still served.
    #[tokio::test]
    async fn oversized_heads_wrong_methods_and_paths_are_answered_and_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve_bounded(listener, Arc::new(Metrics::new()), Arc::new(Readiness::default()), rx, 4));
        let exchange = |request: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&request).await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        };
        let big =
            [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(), vec![b'a'; 100 * 1024], b"\r\n\r\n".to_vec()]
                .concat();
        let answer = exchange(big).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
        let answer = exchange(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        let answer = exchange(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        let answer = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("copilot_ingest_build_info"), "{answer}");
        assert!(answer.contains("text/plain; version=0.0.4"), "{answer}");
    }
}
