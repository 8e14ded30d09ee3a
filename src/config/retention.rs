//! `[retention]`: the retention policies declared in the file, reconciled
//! into the policy store at start (GitOps: the file is the truth for the
//! policies it declares; those saved at run time are left alone).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::operations::policy::{PolicySource, PolicyStatus, RetentionPolicy};
use crate::table::table;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub policies: Vec<PolicyConfig>,
    /// How long a claimed run stays an instance's without a renewal (one per
    /// page): a run whose instance died resumes elsewhere after this long.
    pub lease_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { policies: Vec::new(), lease_seconds: 120 }
    }
}

/// One `[[retention.policies]]`: Dataverse's `retentionconfig` fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub uniquename: String,
    /// Display name; the uniquename when not given.
    #[serde(default)]
    pub name: Option<String>,
    /// FetchXML criteria over msdyn_copilotinteraction.
    pub criteria: String,
    /// RFC 3339, e.g. 2026-01-01T02:00:00Z.
    pub starttime: String,
    /// `FREQ=DAILY|WEEKLY|MONTHLY|YEARLY;INTERVAL=n`; empty = once.
    #[serde(default)]
    pub recurrence: String,
    /// Scheduled (runs), Unscheduled (paused) or Cancelled.
    #[serde(default = "scheduled")]
    pub status: String,
    /// Purge retained records this long after their retention: `30d`, `12h`, `90m`.
    #[serde(default)]
    pub purge_after: Option<String>,
    #[serde(default = "default_page_size")]
    pub page_size: i64,
}

fn scheduled() -> String {
    PolicyStatus::Scheduled.name().to_owned()
}

fn default_page_size() -> i64 {
    crate::operations::parameters::DEFAULT_PAGE_SIZE
}

/// `30d`, `12h`, `90m`, `45s` in seconds.
pub fn parse_age(text: &str) -> Option<i64> {
    let text = text.trim();
    let unit = text.chars().last()?;
    let n: i64 = text[..text.len() - unit.len_utf8()].parse().ok().filter(|n| *n >= 0)?;
    let seconds = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(seconds)
}

impl PolicyConfig {
    /// The policy this entry declares, or what is wrong with it.
    pub fn policy(&self) -> Result<RetentionPolicy, String> {
        let starttime = DateTime::parse_from_rfc3339(&self.starttime)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| format!("starttime: '{}' is not RFC 3339 ({e})", self.starttime))?;
        let status = PolicyStatus::parse(&self.status)
            .ok_or_else(|| format!("status: '{}' is not Scheduled, Unscheduled or Cancelled", self.status))?;
        let purge_after_seconds = match &self.purge_after {
            None => None,
            Some(text) => {
                Some(parse_age(text).ok_or_else(|| format!("purge_after: '{text}' is not like 30d, 12h or 90m"))?)
            }
        };
        let policy = RetentionPolicy {
            uniquename: self.uniquename.clone(),
            name: self.name.clone().unwrap_or_else(|| self.uniquename.clone()),
            entitylogicalname: table().logical_name.clone(),
            criteria: self.criteria.clone(),
            starttime,
            recurrence: self.recurrence.clone(),
            status,
            purge_after_seconds,
            page_size: self.page_size,
            source: PolicySource::Config,
        };
        policy.validate()?;
        Ok(policy)
    }
}

impl RetentionConfig {
    pub(super) fn check(&self, errors: &mut Vec<String>) {
        if !(5..=3600).contains(&self.lease_seconds) {
            errors.push("retention.lease_seconds: must be between 5 and 3600".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.policies.iter().enumerate() {
            if let Err(e) = entry.policy() {
                errors.push(format!(
                    "retention.policies[{i}] ({}): {e}",
                    crate::transport::control::loggable(&entry.uniquename)
                ));
            }
            if !seen.insert(entry.uniquename.as_str()) {
                errors.push(format!("retention.policies[{i}].uniquename: '{}' is declared twice", entry.uniquename));
            }
        }
    }

    /// The declared policies (call after the configuration checked them).
    pub fn declared(&self) -> Vec<RetentionPolicy> {
        self.policies.iter().filter_map(|p| p.policy().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_from_the_file_are_checked_entry_by_entry() {
        let text = r#"
            [[retention.policies]]
            uniquename = "old-feedback"
            criteria = "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='createdon' operator='olderthan-x-days' value='90'/></filter></entity></fetch>"
            starttime = "2026-01-01T02:00:00Z"
            recurrence = "FREQ=DAILY"
            purge_after = "30d"

            [[retention.policies]]
            uniquename = "broken"
            criteria = "<fetch/>"
            starttime = "yesterday"
        "#;
        let errors = crate::config::Config::from_sources(Some(text), &[]).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("retention.policies[1] (broken): starttime"), "{errors:?}");
        let good = text.split("[[retention.policies]]\n            uniquename = \"broken\"").next().unwrap();
        let config = crate::config::Config::from_sources(Some(good), &[]).unwrap();
        let declared = config.retention.declared();
        assert_eq!(declared.len(), 1);
        assert_eq!(declared[0].name, "old-feedback");
        assert_eq!(declared[0].purge_after_seconds, Some(30 * 86_400));
        assert_eq!(declared[0].source, PolicySource::Config);
    }

    #[test]
    fn ages_read_days_hours_minutes_seconds() {
        assert_eq!(parse_age("30d"), Some(2_592_000));
        assert_eq!(parse_age("12h"), Some(43_200));
        assert_eq!(parse_age("90m"), Some(5_400));
        assert_eq!(parse_age("0s"), Some(0));
        for bad in ["", "d", "-1d", "3w", "1.5h"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }
}
