//! Groups validated records into batches: flushed on `max_records`,
//! `max_bytes`, a `linger_ms` timer started at the first record, and on
//! demand (shutdown, revocation).

use std::time::Duration;

use tokio::time::Instant;

use crate::record::Record;
use crate::transport::ingest::source::Inbound;

/// One record with the Kafka message it came from (kept for the DLQ, which
/// must carry the original key, value and headers).
#[derive(Debug)]
pub struct Entry {
    pub record: Record,
    pub message: Inbound,
}

pub type Batch = Vec<Entry>;

#[derive(Debug)]
pub struct Batcher {
    max_records: usize,
    max_bytes: usize,
    linger: Duration,
    entries: Batch,
    bytes: usize,
    deadline: Option<Instant>,
}

impl Batcher {
    pub fn new(max_records: usize, max_bytes: usize, linger: Duration) -> Self {
        Batcher { max_records, max_bytes, linger, entries: Vec::new(), bytes: 0, deadline: None }
    }

    /// Adds a record; returns the batches that became full. A record that
    /// would overflow `max_bytes` closes the current batch first.
    pub fn push(&mut self, entry: Entry, out: &mut Vec<Batch>) {
        let size = entry.record.approx_bytes();
        if !self.entries.is_empty() && self.bytes + size > self.max_bytes {
            out.extend(self.take());
        }
        if self.entries.is_empty() {
            self.deadline = Some(Instant::now() + self.linger);
            self.entries.reserve(self.max_records.min(4096));
        }
        self.bytes += size;
        self.entries.push(entry);
        if self.entries.len() >= self.max_records || self.bytes >= self.max_bytes {
            out.extend(self.take());
        }
    }

    /// When the linger timer of the open batch fires, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Closes the open batch, if any.
    pub fn take(&mut self) -> Option<Batch> {
        self.deadline = None;
        self.bytes = 0;
        if self.entries.is_empty() { None } else { Some(std::mem::take(&mut self.entries)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::Normalizer;

    fn entry(i: usize) -> Entry {
        let payload = format!(
            r#"{{"msdyn_name":"n{i}","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy","msdyn_scenariotype":"Copilot"}}"#
        );
        let record = Normalizer::default().normalize_json(payload.as_bytes(), None, chrono::Utc::now()).unwrap();
        Entry { record, message: Inbound::for_test(0, i as i64, payload.into_bytes()) }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_count() {
        let mut b = Batcher::new(3, 1 << 20, Duration::from_millis(200));
        let mut out = Vec::new();
        for i in 0..7 {
            b.push(entry(i), &mut out);
        }
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3]);
        assert_eq!(b.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_bytes_before_overflowing() {
        let one = entry(0).record.approx_bytes();
        let mut b = Batcher::new(1000, one * 2 + one / 2, Duration::from_millis(200));
        let mut out = Vec::new();
        for i in 0..5 {
            b.push(entry(i), &mut out);
        }
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn linger_timer_starts_at_the_first_record() {
        let mut b = Batcher::new(1000, 1 << 20, Duration::from_millis(200));
        let mut out = Vec::new();
        assert!(b.deadline().is_none());
        let start = Instant::now();
        b.push(entry(0), &mut out);
        tokio::time::advance(Duration::from_millis(150)).await;
        b.push(entry(1), &mut out);
        assert_eq!(b.deadline(), Some(start + Duration::from_millis(200)));
        let batch = b.take().unwrap();
        assert_eq!(batch.len(), 2);
        assert!(b.deadline().is_none());
        assert!(b.take().is_none());
    }
}
