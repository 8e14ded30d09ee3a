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
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
