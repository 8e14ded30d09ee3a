//! The HTTP endpoints of SPEC §7: `/metrics`, `/healthz`, `/readyz`. A tiny
//! HTTP/1.1 responder (GET only, bounded request size) is all three need.
//! It is bounded like any listener facing a network: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the kernel's backlog), 5 s to
//! send a request head, and a failing `accept` (e.g. out of file
//! descriptors) backs off instead of spinning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Connections served at once; the rest wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;

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
    mut shutdown: watch::Receiver<bool>,
    max_connections: usize,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut accept_backoff = std::time::Duration::from_millis(10);
    loop {
        // A permit before accepting: past the limit, connections queue in the backlog.
        let permit = tokio::select! {
            _ = shutdown.changed() => return,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let mut stream = match accepted {
                    Ok((stream, _)) => {
                        accept_backoff = std::time::Duration::from_millis(10);
                        stream
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed; backing off");
                        tokio::time::sleep(accept_backoff).await;
                        accept_backoff = (accept_backoff * 2).min(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                let metrics = Arc::clone(&metrics);
                let readiness = Arc::clone(&readiness);
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut buf = [0u8; 2048];
                    let mut len = 0;
                    // Read the request head only; anything beyond 2 KiB is refused.
                    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        while len < buf.len() {
                            match stream.read(&mut buf[len..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    len += n;
                                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") { break; }
                                }
                            }
                        }
                    }).await;
                    if read.is_err() { return; }
                    let head = String::from_utf8_lossy(&buf[..len]);
                    let mut parts = head.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let path = path.split('?').next().unwrap_or("");
                    let (status, content_type, body) = match (method, path) {
                        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
                        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                        ("GET", "/readyz") => {
                            if readiness.is_ready() {
                                ("200 OK", "text/plain", "ready\n".to_owned())
                            } else {
                                let r = &readiness;
                                let body = format!(
                                    "not ready: broker_reachable={} sink_reachable={} partitions_assigned={} control_consumer={}\n",
                                    r.broker_reachable.load(Ordering::Relaxed),
                                    r.sink_reachable.load(Ordering::Relaxed),
                                    r.assigned.load(Ordering::Relaxed),
                                    if r.control_failed.load(Ordering::Relaxed) { "failed" } else { "ok" }
                                );
                                ("503 Service Unavailable", "text/plain", body)
                            }
                        }
                        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                        _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".to_owned()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
