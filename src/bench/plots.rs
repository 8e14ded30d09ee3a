//! `bench --plots DIR`: the run's measurements as CSV files that
//! `scripts/plot_bench.py` draws as SVG: each drain's progress over time
//! against its sink's raw limits, and end-to-end latency against load.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub(super) struct Plots {
    dir: PathBuf,
    limits: String,
    latency: String,
}

impl Plots {
    pub(super) fn new(dir: &Path) -> anyhow::Result<Plots> {
        std::fs::create_dir_all(dir)?;
        Ok(Plots {
            dir: dir.to_owned(),
            limits: "sink,name,events_per_s\n".into(),
            latency: "sink,offered_events_per_s,p50_ms,p99_ms\n".into(),
        })
    }

    /// A raw limit (`sink` "all" for the consume limit).
    pub(super) fn limit(&mut self, sink: &str, name: &str, rate: f64) {
        let _ = writeln!(self.limits, "{sink},\"{}\",{rate:.0}", name.replace('"', "'"));
    }

    /// One drain's progress: seconds since its first event, records written.
    pub(super) fn drain(&self, sink: &str, samples: &[(f64, f64)]) -> anyhow::Result<()> {
        let mut csv = String::from("seconds,written\n");
        for (t, written) in samples {
            let _ = writeln!(csv, "{t:.2},{written:.0}");
        }
        std::fs::write(self.dir.join(format!("drain_{sink}.csv")), csv)?;
        Ok(())
    }

    pub(super) fn latency(&mut self, sink: &str, offered: u64, p50: f64, p99: f64) {
        let _ = writeln!(self.latency, "{sink},{offered},{:.1},{:.1}", p50 * 1000.0, p99 * 1000.0);
    }

    pub(super) fn finish(&self) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("limits.csv"), &self.limits)?;
        std::fs::write(self.dir.join("latency.csv"), &self.latency)?;
        Ok(())
    }
}
