//! Retention policies: Dataverse's `retentionconfig` (criteria, start time,
//! recurrence, state) plus our `purge_after` and `page_size`. A policy is
//! declared in the TOML, saved by a control message or by the Web API's
//! `retentionconfigs`: one store of policies, whichever way it came. The
//! scheduler ([`super::scheduler`]) runs each one when it is due.

use chrono::{DateTime, Datelike, Months, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::OperationError;
use crate::backend::Backend;
use crate::query::fetchxml;
use crate::table::table;

/// The longest `uniquename` or `name`, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// The policies one store holds at most (each is a scheduled job).
pub const MAX_POLICIES: usize = 1000;

/// How often a policy recurs: `FREQ=DAILY|WEEKLY|MONTHLY|YEARLY;INTERVAL=n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recurrence {
    pub frequency: Frequency,
    pub interval: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frequency {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Recurrence {
    /// Parses Dataverse's recurrence text; an empty text is `None` (run once).
    pub fn parse(text: &str) -> Result<Option<Recurrence>, String> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let (mut frequency, mut interval) = (None, 1u32);
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                part.split_once('=').ok_or_else(|| format!("recurrence part '{part}' is not KEY=VALUE"))?;
            match key.trim().to_ascii_uppercase().as_str() {
                "FREQ" => {
                    frequency = Some(match value.trim().to_ascii_uppercase().as_str() {
                        "DAILY" => Frequency::Daily,
                        "WEEKLY" => Frequency::Weekly,
                        "MONTHLY" => Frequency::Monthly,
                        "YEARLY" => Frequency::Yearly,
                        other => {
                            return Err(format!("recurrence FREQ '{other}' is not DAILY, WEEKLY, MONTHLY or YEARLY"));
                        }
                    })
                }
                "INTERVAL" => {
                    interval =
                        value.trim().parse::<u32>().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                            format!("recurrence INTERVAL '{value}' is not a whole number from 1 to 1000")
                        })?
                }
                other => return Err(format!("recurrence key '{other}' is not FREQ or INTERVAL")),
            }
        }
        let frequency = frequency.ok_or("recurrence needs FREQ=DAILY|WEEKLY|MONTHLY|YEARLY")?;
        Ok(Some(Recurrence { frequency, interval }))
    }

    /// The `k`-th occurrence after `start` (counted from `start`, not from the
    /// previous one, so a monthly policy on the 31st keeps to month ends).
    fn occurrence(&self, start: DateTime<Utc>, k: u32) -> Option<DateTime<Utc>> {
        let n = k.checked_mul(self.interval)?;
        match self.frequency {
            Frequency::Daily => start.checked_add_signed(TimeDelta::days(i64::from(n))),
            Frequency::Weekly => start.checked_add_signed(TimeDelta::weeks(i64::from(n))),
            Frequency::Monthly => start.checked_add_months(Months::new(n)),
            Frequency::Yearly => start.checked_add_months(Months::new(n.checked_mul(12)?)),
        }
    }

    /// The nominal length of one interval, in seconds (months as 31 days,
    /// years as 366): what "has not succeeded within twice its interval" means.
    pub fn nominal_seconds(&self) -> i64 {
        let days = match self.frequency {
            Frequency::Daily => 1,
            Frequency::Weekly => 7,
            Frequency::Monthly => 31,
            Frequency::Yearly => 366,
        };
        i64::from(self.interval) * days * 86_400
    }
}

/// The first occurrence of a schedule strictly after `after`: the start time
/// itself when it is still ahead; `None` for a one-time policy whose start has
/// passed. A run missed while the service was down is therefore run once
/// (the scheduler finds it due) and the next one is the first future one,
/// never a catch-up of every missed interval.
pub fn next_occurrence(
    start: DateTime<Utc>,
    recurrence: Option<&Recurrence>,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if start > after {
        return Some(start);
    }
    bracket(start, recurrence?, after).map(|(_, next)| next)
}

/// For a schedule that has started by `at`: its latest occurrence at or
/// before `at` and its first one after.
fn bracket(start: DateTime<Utc>, recurrence: &Recurrence, at: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    // An estimate from the elapsed time over the longest interval (so never
    // past the answer), then steps forward.
    let elapsed_days = (at - start).num_days().max(0);
    let longest_interval_days = recurrence.nominal_seconds() / 86_400;
    let mut k = u32::try_from(elapsed_days / longest_interval_days.max(1)).ok()?;
    let mut previous = recurrence.occurrence(start, k)?;
    loop {
        let next = recurrence.occurrence(start, k.checked_add(1)?)?;
        if next > at {
            return Some((previous, next));
        }
        previous = next;
        k += 1;
    }
}

/// A policy's state and status, after `retentionconfig`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PolicyStatus {
    /// Active: runs when due.
    #[default]
    Scheduled,
    /// Active but paused: keeps its schedule, runs nothing.
    Unscheduled,
    /// Inactive: retired.
    Cancelled,
}

impl PolicyStatus {
    pub const ALL: [PolicyStatus; 3] = [PolicyStatus::Scheduled, PolicyStatus::Unscheduled, PolicyStatus::Cancelled];

    pub fn name(self) -> &'static str {
        match self {
            PolicyStatus::Scheduled => "Scheduled",
            PolicyStatus::Unscheduled => "Unscheduled",
            PolicyStatus::Cancelled => "Cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<PolicyStatus> {
        PolicyStatus::ALL.into_iter().find(|s| s.name().eq_ignore_ascii_case(text.trim()))
    }

    /// `statecode`: 0 Active, 1 Inactive.
    pub fn statecode(self) -> i64 {
        match self {
            PolicyStatus::Scheduled | PolicyStatus::Unscheduled => 0,
            PolicyStatus::Cancelled => 1,
        }
    }

    /// `statuscode`: 1 Scheduled, 2 Unscheduled (state Active), 3 Cancelled (state Inactive).
    pub fn statuscode(self) -> i64 {
        match self {
            PolicyStatus::Scheduled => 1,
            PolicyStatus::Unscheduled => 2,
            PolicyStatus::Cancelled => 3,
        }
    }

    pub fn from_statuscode(code: i64) -> Option<PolicyStatus> {
        PolicyStatus::ALL.into_iter().find(|s| s.statuscode() == code)
    }
}

/// Where a policy came from: the TOML is reconciled at start (a policy it no
/// longer declares is removed), one saved at run time is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    Config,
    Runtime,
}

impl PolicySource {
    pub fn name(self) -> &'static str {
        match self {
            PolicySource::Config => "config",
            PolicySource::Runtime => "runtime",
        }
    }

    pub fn parse(text: &str) -> PolicySource {
        if text == "config" { PolicySource::Config } else { PolicySource::Runtime }
    }
}

/// A policy's definition: what the operator declares.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    pub uniquename: String,
    pub name: String,
    pub entitylogicalname: String,
    /// FetchXML, validated as `ValidateRetentionConfig` validates it.
    pub criteria: String,
    pub starttime: DateTime<Utc>,
    /// `FREQ=…;INTERVAL=n`, empty for once.
    pub recurrence: String,
    pub status: PolicyStatus,
    /// Retained rows whose retention is older than this are purged in the same run.
    pub purge_after_seconds: Option<i64>,
    pub page_size: i64,
    pub source: PolicySource,
}

impl RetentionPolicy {
    /// Every problem with the definition, each naming its field.
    pub fn validate(&self) -> Result<(), String> {
        let named = |field: &str, value: &str| {
            if value.trim().is_empty() {
                Err(format!("{field} is required"))
            } else if value.chars().count() > MAX_NAME_CHARS || value.chars().any(char::is_control) {
                Err(format!("{field} must be at most {MAX_NAME_CHARS} printable characters"))
            } else {
                Ok(())
            }
        };
        named("uniquename", &self.uniquename)?;
        named("name", &self.name)?;
        if self.entitylogicalname != table().logical_name {
            return Err(format!(
                "entitylogicalname must be {} (the only table served), not '{}'",
                table().logical_name,
                self.entitylogicalname
            ));
        }
        let criteria = fetchxml::parse(&self.criteria, Utc::now()).map_err(|e| format!("criteria: {e}"))?;
        if criteria.filter.is_none() {
            return Err("criteria: a policy must filter (a policy over every record is not accepted)".into());
        }
        if criteria.retained {
            return Err("criteria: a policy retains live records; datasource='retained' is not accepted".into());
        }
        Recurrence::parse(&self.recurrence)?;
        if !(1..=crate::query::page::MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(format!("page_size must be from 1 to {}", crate::query::page::MAX_PAGE_SIZE));
        }
        if self.purge_after_seconds.is_some_and(|s| s < 0) {
            return Err("purge_after must not be negative".into());
        }
        if self.starttime.year() < 2000 || self.starttime.year() > 9000 {
            return Err("starttime must be a date from 2000 to 9000".into());
        }
        Ok(())
    }

    pub fn recurrence(&self) -> Option<Recurrence> {
        Recurrence::parse(&self.recurrence).ok().flatten()
    }

    /// The run after `after`, or `None` (a one-time policy that ran, or retired).
    pub fn next_run_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.status == PolicyStatus::Cancelled {
            return None;
        }
        next_occurrence(self.starttime, self.recurrence().as_ref(), after)
    }

    /// The first run of a newly saved definition: the start time when it is
    /// ahead, else the latest occurrence that has passed (a new daily policy
    /// that started last week runs today, once), and for a one-time policy
    /// whose start has passed, now.
    pub fn first_run(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.status == PolicyStatus::Cancelled {
            return None;
        }
        if self.starttime > now {
            return Some(self.starttime);
        }
        match self.recurrence() {
            None => Some(now),
            Some(recurrence) => bracket(self.starttime, &recurrence, now).map(|(latest, _)| latest),
        }
    }
}

/// A stored policy: its definition and its schedule's state.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRecord {
    pub policy: RetentionPolicy,
    pub next_run: Option<DateTime<Utc>>,
    pub last_run: Option<DateTime<Utc>>,
    pub last_outcome: Option<String>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_operation_id: Option<uuid::Uuid>,
    /// The run in progress (or left by a killed instance), if any.
    pub running_operation_id: Option<uuid::Uuid>,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
}

/// Saves a policy's definition, validated. Its next run is kept when the
/// schedule (start, recurrence) did not change, so re-declaring the same TOML
/// at every start never moves or repeats a run; otherwise it is the new
/// schedule's first run.
pub async fn save(backend: &Backend, policy: &RetentionPolicy, now: DateTime<Utc>) -> Result<(), OperationError> {
    policy.validate().map_err(|e| OperationError::failed(INVALID_POLICY, e))?;
    let stored = backend.policies().await?;
    let existing = stored.iter().find(|r| r.policy.uniquename == policy.uniquename);
    if existing.is_none() && stored.len() >= MAX_POLICIES {
        return Err(OperationError::failed(INVALID_POLICY, format!("at most {MAX_POLICIES} policies are kept")));
    }
    // The same schedule (a re-declared file, a new name, a pause, a resume):
    // the next run stays, and one that passed while paused is due at once,
    // so it runs once. A new schedule starts over; a retired policy has none.
    let active = |status: PolicyStatus| status != PolicyStatus::Cancelled;
    let next_run = match existing {
        Some(r)
            if r.policy.starttime == policy.starttime
                && r.policy.recurrence == policy.recurrence
                && active(r.policy.status)
                && active(policy.status) =>
        {
            r.next_run
        }
        _ => policy.first_run(now),
    };
    backend.save_policy(policy, next_run, now).await?;
    Ok(())
}

/// Removes a policy (its past runs' operations stay).
pub async fn delete(backend: &Backend, uniquename: &str) -> Result<(), OperationError> {
    if backend.delete_policy(uniquename).await? {
        Ok(())
    } else {
        Err(OperationError::failed(
            super::NOT_FOUND,
            format!("retentionconfig With uniquename = {uniquename} Does Not Exist"),
        ))
    }
}

/// Makes the store hold exactly the TOML's policies among those the TOML
/// declared: each declared one saved, each one declared before and no longer
/// removed; policies saved at run time are left alone. Returns (saved, removed).
pub async fn reconcile(
    backend: &Backend,
    declared: &[RetentionPolicy],
    now: DateTime<Utc>,
) -> Result<(usize, usize), OperationError> {
    for policy in declared {
        save(backend, &RetentionPolicy { source: PolicySource::Config, ..policy.clone() }, now).await?;
    }
    let mut removed = 0;
    for record in backend.policies().await? {
        let name = &record.policy.uniquename;
        if record.policy.source == PolicySource::Config && !declared.iter().any(|p| &p.uniquename == name) {
            backend.delete_policy(name).await?;
            removed += 1;
        }
    }
    Ok((declared.len(), removed))
}

/// The error code of a policy definition that is refused.
pub const INVALID_POLICY: &str = "InvalidRetentionConfig";

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn recurrences_parse_or_say_why_not() {
        assert_eq!(Recurrence::parse("").unwrap(), None);
        assert_eq!(
            Recurrence::parse("FREQ=DAILY;INTERVAL=2").unwrap(),
            Some(Recurrence { frequency: Frequency::Daily, interval: 2 })
        );
        assert_eq!(
            Recurrence::parse("freq=monthly").unwrap(),
            Some(Recurrence { frequency: Frequency::Monthly, interval: 1 })
        );
        for bad in ["FREQ=HOURLY", "INTERVAL=2", "FREQ=DAILY;INTERVAL=0", "FREQ=DAILY;BYDAY=MO", "DAILY"] {
            assert!(Recurrence::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_next_occurrence_is_the_first_after_now_never_a_catch_up() {
        let start = at(2026, 1, 1, 3);
        let daily = Recurrence::parse("FREQ=DAILY").unwrap();
        assert_eq!(next_occurrence(start, daily.as_ref(), at(2025, 12, 1, 0)), Some(start));
        assert_eq!(next_occurrence(start, daily.as_ref(), start), Some(at(2026, 1, 2, 3)));
        // Down for ten days: the next run is tomorrow's, not ten runs.
        assert_eq!(next_occurrence(start, daily.as_ref(), at(2026, 1, 11, 12)), Some(at(2026, 1, 12, 3)));
        let weekly = Recurrence::parse("FREQ=WEEKLY;INTERVAL=2").unwrap();
        assert_eq!(next_occurrence(start, weekly.as_ref(), at(2026, 1, 10, 0)), Some(at(2026, 1, 15, 3)));
        let monthly = Recurrence::parse("FREQ=MONTHLY").unwrap();
        let month_end = at(2026, 1, 31, 0);
        assert_eq!(next_occurrence(month_end, monthly.as_ref(), month_end), Some(at(2026, 2, 28, 0)));
        assert_eq!(next_occurrence(month_end, monthly.as_ref(), at(2026, 3, 1, 0)), Some(at(2026, 3, 31, 0)));
        let yearly = Recurrence::parse("FREQ=YEARLY").unwrap();
        assert_eq!(next_occurrence(start, yearly.as_ref(), at(2030, 6, 1, 0)), Some(at(2031, 1, 1, 3)));
        assert_eq!(next_occurrence(start, None, at(2026, 2, 1, 0)), None, "a one-time policy ran");
    }

    fn policy(start: DateTime<Utc>, recurrence: &str) -> RetentionPolicy {
        RetentionPolicy {
            uniquename: "old-feedback".into(),
            name: "Old feedback".into(),
            entitylogicalname: "msdyn_copilotinteraction".into(),
            criteria: "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='createdon' operator='olderthan-x-days' value='90'/></filter></entity></fetch>".into(),
            starttime: start,
            recurrence: recurrence.into(),
            status: PolicyStatus::Scheduled,
            purge_after_seconds: None,
            page_size: 5000,
            source: PolicySource::Config,
        }
    }

    #[test]
    fn a_new_policy_runs_its_latest_past_occurrence_first() {
        let p = policy(at(2026, 1, 1, 3), "FREQ=DAILY");
        assert_eq!(p.first_run(at(2025, 1, 1, 0)), Some(at(2026, 1, 1, 3)));
        assert_eq!(p.first_run(at(2026, 1, 5, 12)), Some(at(2026, 1, 5, 3)));
        let once = policy(at(2026, 1, 1, 3), "");
        assert_eq!(once.first_run(at(2026, 1, 5, 12)), Some(at(2026, 1, 5, 12)));
        let retired = RetentionPolicy { status: PolicyStatus::Cancelled, ..p };
        assert_eq!(retired.first_run(at(2026, 1, 5, 12)), None);
    }

    #[test]
    fn definitions_are_validated_field_by_field() {
        let good = policy(at(2026, 1, 1, 3), "FREQ=DAILY");
        assert_eq!(good.validate(), Ok(()));
        let cases = [
            (RetentionPolicy { uniquename: " ".into(), ..good.clone() }, "uniquename"),
            (RetentionPolicy { name: "x\ny".into(), ..good.clone() }, "name"),
            (RetentionPolicy { entitylogicalname: "account".into(), ..good.clone() }, "entitylogicalname"),
            (RetentionPolicy { criteria: "<fetch/>".into(), ..good.clone() }, "criteria"),
            (
                RetentionPolicy {
                    criteria: "<fetch><entity name='msdyn_copilotinteraction'/></fetch>".into(),
                    ..good.clone()
                },
                "must filter",
            ),
            (RetentionPolicy { recurrence: "FREQ=HOURLY".into(), ..good.clone() }, "FREQ"),
            (RetentionPolicy { page_size: 0, ..good.clone() }, "page_size"),
            (RetentionPolicy { purge_after_seconds: Some(-1), ..good.clone() }, "purge_after"),
        ];
        for (p, field) in cases {
            let problem = p.validate().unwrap_err();
            assert!(problem.contains(field), "{problem} should name {field}");
        }
    }

    #[test]
    fn statuses_round_trip_through_their_codes() {
        for s in PolicyStatus::ALL {
            assert_eq!(PolicyStatus::from_statuscode(s.statuscode()), Some(s));
            assert_eq!(PolicyStatus::parse(s.name()), Some(s));
        }
        assert_eq!(PolicyStatus::Unscheduled.statecode(), 0);
        assert_eq!(PolicyStatus::Cancelled.statecode(), 1);
    }
}
