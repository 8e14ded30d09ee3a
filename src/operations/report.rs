//! Progress of the long operations (BulkRetain, PurgeRetainedContent,
//! BulkDelete, scheduled policy runs): each page adds to a [`Tracker`], which
//! hands a [`ProgressReport`] to the transport's [`ProgressSink`] at most
//! every [`REPORT_EVERY`]. The control transport turns reports into
//! `"status": "InProgress"` replies; the scheduler into a metric.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

/// The shortest time between two reports of one operation.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Counts so far of one running operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProgressReport {
    pub operation_id: Uuid,
    /// The message running (`BulkRetain`, …, `RetentionPolicy`).
    pub message: &'static str,
    /// The step: `Marking` (retaining) or `Deleting` (deleting, purging).
    pub step: &'static str,
    /// Records this operation changed so far (including before a resume).
    pub count: i64,
    /// Pages done in this run.
    pub pages_done: u64,
    /// Records per second over this run.
    pub rows_per_second: f64,
    /// The count this step should end at, estimated when it started (what
    /// matched then), when anyone listens; `None` when not estimated.
    pub expected: Option<i64>,
}

/// Where reports go: called on the operation's task, so it must not block.
#[derive(Clone)]
pub struct ProgressSink {
    report: Arc<dyn Fn(&ProgressReport) + Send + Sync>,
    /// The shortest time between two reports ([`REPORT_EVERY`] but in tests).
    every: Duration,
}

impl ProgressSink {
    pub fn new(f: impl Fn(&ProgressReport) + Send + Sync + 'static) -> ProgressSink {
        ProgressSink::every(REPORT_EVERY, f)
    }

    pub fn every(every: Duration, f: impl Fn(&ProgressReport) + Send + Sync + 'static) -> ProgressSink {
        ProgressSink { report: Arc::new(f), every }
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// Counts one operation's pages and reports them, throttled.
pub struct Tracker {
    sink: Option<ProgressSink>,
    report: ProgressReport,
    /// The count when this run started (a resumed run's earlier pages).
    resumed_from: i64,
    started: Instant,
    last_report: Option<Instant>,
}

impl Tracker {
    pub fn new(
        sink: Option<ProgressSink>,
        operation_id: Uuid,
        message: &'static str,
        step: &'static str,
        count: i64,
    ) -> Tracker {
        Tracker {
            sink,
            report: ProgressReport {
                operation_id,
                message,
                step,
                count,
                pages_done: 0,
                rows_per_second: 0.0,
                expected: None,
            },
            resumed_from: count,
            started: Instant::now(),
            last_report: None,
        }
    }

    /// Whether anyone follows the progress (an estimate is worth a count query).
    pub fn listening(&self) -> bool {
        self.sink.is_some()
    }

    /// Sets what the step should end at: the count so far plus `remaining`.
    pub fn expect(&mut self, remaining: i64) {
        self.report.expected = Some(self.report.count + remaining);
    }

    /// Moves to the next step, its count starting at `count`.
    pub fn step(&mut self, step: &'static str, count: i64) {
        self.report.step = step;
        self.report.expected = None;
        self.report.count = count;
        self.resumed_from = count;
        self.report.pages_done = 0;
        self.started = Instant::now();
    }

    /// Adds one page of `n` records; reports when the last report is old enough.
    pub fn page(&mut self, n: i64) {
        self.report.count += n;
        self.report.pages_done += 1;
        let Some(sink) = &self.sink else { return };
        let now = Instant::now();
        // The first report waits a full interval too: a short operation
        // sends its final reply only.
        let since = self.last_report.unwrap_or(self.started);
        if now.duration_since(since) < sink.every {
            return;
        }
        self.last_report = Some(now);
        let seconds = now.duration_since(self.started).as_secs_f64();
        self.report.rows_per_second =
            if seconds > 0.0 { (self.report.count - self.resumed_from) as f64 / seconds } else { 0.0 };
        (sink.report)(&self.report);
    }

    pub fn count(&self) -> i64 {
        self.report.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn reports_are_throttled_and_counts_include_a_resume() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let seen = Arc::clone(&seen);
            ProgressSink::new(move |r| seen.lock().unwrap().push(r.clone()))
        };
        let mut tracker = Tracker::new(Some(sink), Uuid::nil(), "BulkRetain", "Marking", 100);
        for _ in 0..1000 {
            tracker.page(10);
        }
        assert_eq!(tracker.count(), 10_100);
        assert!(seen.lock().unwrap().is_empty(), "no report before {REPORT_EVERY:?}");
        tracker.started -= REPORT_EVERY;
        tracker.page(10);
        tracker.page(10);
        let reports = seen.lock().unwrap().clone();
        assert_eq!(reports.len(), 1, "one report per interval");
        assert_eq!((reports[0].count, reports[0].pages_done), (10_110, 1001));
        assert!(reports[0].rows_per_second > 0.0);
    }
}
