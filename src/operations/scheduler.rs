//! The retention scheduler: runs each stored policy when it is due, as
//! Dataverse's platform runs a `retentionconfig`. One pass
//! ([`Scheduler::run_due`]) takes the time as an argument, so tests drive the
//! schedule with their own clock and never sleep; the service calls it from
//! [`Scheduler::run`] with the wall clock.
//!
//! A run is claimed in the database first (one compare-and-set statement), so
//! of many instances sharing a PostgreSQL database exactly one runs it; the
//! claim carries a lease the runner renews after every page, and a run whose
//! lease expired (its instance was killed) is taken over and resumed under
//! its own operation id: pages already committed are counted, never redone.
//! A run retains the policy's live records page by page ("Marking"), then,
//! with `purge_after`, purges retained records whose retention ended that
//! long ago ("Deleting"), and ends Succeeded or Failed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use super::OperationError;
use super::policy::{PolicyRecord, PolicyStatus, RetentionPolicy};
use super::report::{ProgressSink, Tracker};
use super::retention::page_by_page;
use crate::backend::{Backend, BackendError, DeletePage, OperationCounter, OperationStart, PolicyClaim};
use crate::metrics::Metrics;
use crate::query::fetchxml::{self, Criteria};

/// The message name of a scheduled run's operation row.
pub const RUN_MESSAGE: &str = "RetentionPolicy";

/// How long a claimed run is this instance's without a renewal, by default:
/// longer than any one page takes, short enough that a killed instance's run
/// resumes soon.
pub const LEASE: TimeDelta = TimeDelta::seconds(120);

/// The longest the service waits between two passes (a policy saved at run
/// time is picked up within this).
pub const POLL_EVERY: Duration = Duration::from_secs(15);

/// How one claimed run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub policy: String,
    pub operation_id: Uuid,
    /// `Succeeded` or `Failed`.
    pub outcome: &'static str,
    pub retained: i64,
    pub purged: i64,
    /// Why a Failed run failed.
    pub error: Option<String>,
}

pub struct Scheduler {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    /// How long a claim lasts without a renewal ([`LEASE`] unless configured).
    lease: TimeDelta,
    /// The policies whose series are exported.
    exported: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Where runs publish their replies (the service: the reply topic).
    replies: Option<RunReplies>,
}

/// What a run tells whoever follows it (the service publishes these as
/// replies on the reply topic): progress at most every `every`, then the end.
pub struct RunReplies {
    pub sender: tokio::sync::mpsc::UnboundedSender<RunReport>,
    pub every: Duration,
}

#[derive(Debug, Clone)]
pub enum RunReport {
    Progress { reply_id: String, report: super::report::ProgressReport },
    Finished { reply_id: String, outcome: RunOutcome },
}

/// The reply id of a scheduled run.
pub fn reply_id(uniquename: &str, operation_id: Uuid) -> String {
    format!("policy:{uniquename}:{operation_id}")
}

/// The operation id of a policy's run due at `due`: the same on every
/// instance, so the run's row is one row whoever runs it.
pub fn run_id(uniquename: &str, due: DateTime<Utc>) -> Uuid {
    const NS: Uuid = Uuid::from_u128(0x2d7e_51a4_9c3b_4f10_8a6e_5b0c_3d9f_1e27);
    Uuid::new_v5(&NS, format!("{uniquename}@{}", due.timestamp_millis()).as_bytes())
}

impl Scheduler {
    pub fn new(backend: Arc<Backend>, metrics: Arc<Metrics>) -> Scheduler {
        Scheduler { backend, metrics, lease: LEASE, exported: Default::default(), replies: None }
    }

    /// Claims last `lease` without a renewal (`retention.lease_seconds`).
    pub fn with_lease(self, lease: TimeDelta) -> Scheduler {
        Scheduler { lease, ..self }
    }

    /// Publishes each run's progress and outcome as replies.
    pub fn with_replies(self, replies: RunReplies) -> Scheduler {
        Scheduler { replies: Some(replies), ..self }
    }

    /// Where one run's progress goes: the progress gauge, and its replies.
    fn progress_of(&self, uniquename: &str, operation_id: Uuid) -> ProgressSink {
        let gauge = self.metrics.retention_operation_records.clone();
        let every = self.replies.as_ref().map_or(super::report::REPORT_EVERY, |r| r.every);
        let sender = self.replies.as_ref().map(|r| r.sender.clone());
        let id = reply_id(uniquename, operation_id);
        ProgressSink::every(every, move |report| {
            gauge.with_label_values(&[report.message]).set(report.count);
            if let Some(sender) = &sender {
                let _ = sender.send(RunReport::Progress { reply_id: id.clone(), report: report.clone() });
            }
        })
    }

    /// The end of a run, to whoever follows it.
    fn publish_outcome(&self, outcome: &RunOutcome) {
        if let Some(replies) = &self.replies {
            let reply_id = reply_id(&outcome.policy, outcome.operation_id);
            let _ = replies.sender.send(RunReport::Finished { reply_id, outcome: outcome.clone() });
        }
    }

    /// Runs, one after another, every policy due at `now` that this instance
    /// claims; returns how each run ended. A transient failure leaves the run
    /// claimed: its lease expires and a later pass resumes it.
    pub async fn run_due(&self, now: DateTime<Utc>) -> Result<Vec<RunOutcome>, BackendError> {
        let mut outcomes = Vec::new();
        let records = self.backend.policies().await?;
        self.forget_deleted(&records);
        for record in records {
            self.export(&record);
            if record.policy.status != PolicyStatus::Scheduled {
                continue;
            }
            let policy = &record.policy;
            let claim = PolicyClaim {
                uniquename: policy.uniquename.clone(),
                operation_id: run_id(&policy.uniquename, record.next_run.unwrap_or(now)),
                now,
                next_run: policy.next_run_after(now),
                lease_until: now + self.lease,
            };
            let Some((operation_id, due)) = self.backend.claim_policy_run(&claim).await? else { continue };
            tracing::info!(policy = %policy.uniquename, %operation_id, due = %due, "retention policy run: starting");
            let outcome = self.run_claimed(policy, operation_id, now).await?;
            self.backend.finish_policy_run(&policy.uniquename, operation_id, outcome.outcome, now).await?;
            self.publish_outcome(&outcome);
            self.metrics.retention_runs_total.with_label_values(&[&policy.uniquename, outcome.outcome]).inc();
            if outcome.outcome == "Succeeded" {
                self.metrics
                    .retention_last_success_timestamp_seconds
                    .with_label_values(&[&policy.uniquename])
                    .set(now.timestamp() as f64);
            }
            tracing::info!(
                policy = %policy.uniquename,
                %operation_id,
                outcome = outcome.outcome,
                retained = outcome.retained,
                purged = outcome.purged,
                "retention policy run: ended"
            );
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Exports every stored policy's series (at start, before the first pass).
    pub async fn export_policies(&self) -> Result<(), BackendError> {
        let records = self.backend.policies().await?;
        self.forget_deleted(&records);
        for record in &records {
            self.export(record);
        }
        Ok(())
    }

    /// Drops the series of policies deleted since the last pass, so that a
    /// deleted policy never looks stale to the alert.
    fn forget_deleted(&self, records: &[PolicyRecord]) {
        let mut exported = self.exported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        exported.retain(|name| {
            let kept = records.iter().any(|r| &r.policy.uniquename == name);
            if !kept {
                let m = &self.metrics;
                let _ = m.retention_policy_interval_seconds.remove_label_values(&[name]);
                let _ = m.retention_last_success_timestamp_seconds.remove_label_values(&[name]);
                for outcome in ["Succeeded", "Failed"] {
                    let _ = m.retention_runs_total.remove_label_values(&[name, outcome]);
                }
            }
            kept
        });
        exported.extend(records.iter().map(|r| r.policy.uniquename.clone()));
    }

    /// Keeps the policy's gauges current (the alert reads them).
    fn export(&self, record: &PolicyRecord) {
        let name = record.policy.uniquename.as_str();
        // Only a scheduled, recurring policy can be late (the alert skips 0).
        let interval = match record.policy.status {
            PolicyStatus::Scheduled => record.policy.recurrence().map_or(0, |r| r.nominal_seconds()),
            _ => 0,
        };
        self.metrics.retention_policy_interval_seconds.with_label_values(&[name]).set(interval as f64);
        let since = record.last_success.unwrap_or(record.policy.starttime);
        self.metrics.retention_last_success_timestamp_seconds.with_label_values(&[name]).set(since.timestamp() as f64);
        for outcome in ["Succeeded", "Failed"] {
            self.metrics.retention_runs_total.with_label_values(&[name, outcome]);
        }
    }

    /// Runs (or resumes) one claimed run. `Err` only for a transient failure.
    async fn run_claimed(
        &self,
        policy: &RetentionPolicy,
        operation_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<RunOutcome, BackendError> {
        let mut outcome = RunOutcome {
            policy: policy.uniquename.clone(),
            operation_id,
            outcome: "Succeeded",
            retained: 0,
            purged: 0,
            error: None,
        };
        let result = self.run_steps(policy, operation_id, now, &mut outcome).await;
        let failure = match result {
            Ok(()) => None,
            Err(OperationError::Backend(BackendError::Transient(e))) => return Err(BackendError::Transient(e)),
            Err(OperationError::Backend(e)) => Some(e.to_string()),
            Err(OperationError::Failed { code, message }) => Some(format!("{code}: {message}")),
        };
        if let Some(problem) = failure {
            tracing::warn!(policy = %policy.uniquename, %operation_id, problem = %problem, "retention policy run failed");
            self.backend.set_operation_error(operation_id, &problem).await?;
            self.backend.set_operation_status(operation_id, "Failed", true).await?;
            outcome.outcome = "Failed";
            outcome.error = Some(problem);
        }
        Ok(outcome)
    }

    async fn run_steps(
        &self,
        policy: &RetentionPolicy,
        operation_id: Uuid,
        now: DateTime<Utc>,
        outcome: &mut RunOutcome,
    ) -> Result<(), OperationError> {
        let backend = &self.backend;
        let start = OperationStart {
            operation_id,
            command_id: format!("policy:{}", policy.uniquename),
            message: RUN_MESSAGE,
            criteria: Some(policy.criteria.clone()),
            policy: Some(policy.uniquename.clone()),
        };
        let retained_before_resume = backend.begin_operation(&start).await?;
        let row = backend.operation(operation_id).await?;
        let (status, purged_before_resume) = row.as_ref().map_or(("Marking", 0), |r| (r.status.as_str(), r.purged));
        if matches!(status, "Succeeded" | "Failed") {
            // Ended before the instance that ran it could record so.
            outcome.outcome = if status == "Succeeded" { "Succeeded" } else { "Failed" };
            (outcome.retained, outcome.purged) = (retained_before_resume, purged_before_resume);
            return Ok(());
        }
        // Relative criteria (olderthan-x-days) are read at the run's time.
        let criteria =
            fetchxml::parse(&policy.criteria, now).map_err(|e| OperationError::failed("InvalidFetchXml", e))?;
        let lease = self.lease;
        let renew = || backend.renew_policy_lease(&policy.uniquename, operation_id, Utc::now().max(now) + lease);
        let progress = self.progress_of(&policy.uniquename, operation_id);
        let mut tracker = Tracker::new(Some(progress), operation_id, RUN_MESSAGE, "Marking", retained_before_resume);
        if status != "Deleting" {
            tracker.expect(backend.count(&criteria).await?);
            let size = policy.page_size;
            page_by_page(size, &mut tracker, || backend.retain_page(operation_id, &criteria, size), renew).await?;
        }
        outcome.retained = if status == "Deleting" { retained_before_resume } else { tracker.count() };
        if let Some(seconds) = policy.purge_after_seconds {
            backend.set_operation_status(operation_id, "Deleting", false).await?;
            let page = DeletePage {
                retained: true,
                max_version: None,
                criteria: Criteria { filter: criteria.filter.clone(), retained: true },
                deleted_by: None,
                retained_before: Some(now - TimeDelta::seconds(seconds)),
                counter: OperationCounter::Purged,
            };
            tracker.step("Deleting", purged_before_resume);
            // An upper bound: records retained too recently to purge are counted.
            tracker.expect(backend.count(&page.criteria).await?);
            let size = policy.page_size;
            page_by_page(size, &mut tracker, || backend.delete_page(operation_id, &page, size), renew).await?;
            outcome.purged = tracker.count();
        }
        self.metrics.retention_operation_records.with_label_values(&[RUN_MESSAGE]).set(0);
        backend.set_operation_status(operation_id, "Succeeded", true).await?;
        Ok(())
    }

    /// Runs passes on the wall clock until `shutdown`: at each policy's next
    /// run, and at least every [`POLL_EVERY`] (policies change at run time).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if self.backend.kind() == "dataverse" {
            return;
        }
        let mut failures = crate::backoff::Backoff::default();
        loop {
            let wait = match self.run_due(Utc::now()).await {
                Ok(_) => {
                    failures = crate::backoff::Backoff::default();
                    self.until_next_due().await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention scheduler: a pass failed; retrying");
                    failures.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn until_next_due(&self) -> Duration {
        let next = match self.backend.policies().await {
            Ok(records) => {
                records.iter().filter(|r| r.policy.status == PolicyStatus::Scheduled).filter_map(|r| r.next_run).min()
            }
            Err(_) => None,
        };
        next.and_then(|at| (at - Utc::now()).to_std().ok()).map_or(POLL_EVERY, |d| d.min(POLL_EVERY))
    }
}
