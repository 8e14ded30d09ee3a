//! CreateMultiple: a batch of validated records written as one atomic write.
//! Transient failures are retried until they pass; a batch the backend
//! refuses is split so that only the records at fault are rejected.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, BackendError, Outcome};
use crate::backoff::Backoff;
use crate::batch::Batch;
use crate::metrics::Metrics;
use crate::reason::{Reason, Rejection};

/// Writes a whole batch: retries transient failures until they pass, and
/// splits a batch that fails permanently so that only the records the store
/// refuses on their own are rejected. Returns one outcome per entry.
pub async fn write_batch(sink: &Backend, batch: Arc<Batch>, metrics: &Metrics) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut work: Vec<Vec<usize>> = vec![(0..batch.len()).collect()];
    let label = sink.kind();
    while let Some(indices) = work.pop() {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            let result = sink.write(&batch, &indices).await;
            metrics.sink_write_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
            match result {
                Ok(results) => {
                    metrics.batches_total.with_label_values(&["ok"]).inc();
                    metrics.batch_records.observe(indices.len() as f64);
                    for (&i, outcome) in indices.iter().zip(results) {
                        outcomes[i] = Some(outcome);
                    }
                    break;
                }
                Err(BackendError::Transient(message) | BackendError::Fatal(message)) => {
                    metrics.batches_total.with_label_values(&["retried"]).inc();
                    let delay = backoff.next_delay();
                    if backoff.attempts() == 1 {
                        tracing::warn!(sink = label, records = indices.len(), error = %message, "sink write failed; retrying with backoff");
                    } else if backoff.attempts() % 10 == 0 {
                        tracing::error!(sink = label, attempts = backoff.attempts(), error = %message, "sink still failing; consumption is paused");
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(BackendError::Permanent(message)) => {
                    metrics.batches_total.with_label_values(&["split"]).inc();
                    if indices.len() == 1 {
                        outcomes[indices[0]] =
                            Some(Outcome::Rejected(Rejection::new(Reason::SinkRejected, None, message)));
                    } else {
                        tracing::info!(sink = label, records = indices.len(), error = %message, "batch refused; splitting to isolate the records at fault");
                        let (left, right) = indices.split_at(indices.len() / 2);
                        work.push(right.to_vec());
                        work.push(left.to_vec());
                    }
                    break;
                }
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Rejected(Rejection::new(Reason::SinkRejected, None, "no outcome"))))
        .collect()
}

/// CreateMultiple for a request/response transport (the Web API): the
/// records, already validated, in one atomic write, one outcome each. A
/// failing database is reported at once rather than retried: the caller
/// retries (the ids make a retry a replay).
pub async fn create_records(
    sink: &Backend,
    records: Vec<crate::record::Record>,
    metrics: &Metrics,
) -> Result<Vec<Outcome>, BackendError> {
    use crate::batch::Entry;
    use crate::transport::ingest::source::Inbound;
    // Records that came from no Kafka message: partition and offset -1.
    let batch: Arc<Batch> = Arc::new(
        records.into_iter().map(|record| Entry { record, message: Inbound::without_message(-1, -1) }).collect(),
    );
    let indices: Vec<usize> = (0..batch.len()).collect();
    let label = sink.kind();
    let started = Instant::now();
    let outcomes = sink.write(&batch, &indices).await;
    metrics.sink_write_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
    let outcomes = outcomes?;
    let written = outcomes.iter().filter(|o| matches!(o, Outcome::Written)).count();
    metrics.records_written_total.with_label_values(&[label]).inc_by(written as u64);
    Ok(outcomes)
}
