//! One progress display for every long-running command (`demo`, `produce`,
//! `bench`): on a terminal a live line that log lines print above, never
//! through ([`LogWriter`] suspends it while a log line is written); anywhere
//! else one complete plain line per interval; nothing with `--quiet`. The
//! display and the logs both go to stderr, so stdout keeps only results.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar currently drawn, if any: log lines suspend it.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How often a plain line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    display: Display,
}

enum Display {
    Bar(ProgressBar),
    Lines { every: Duration, last: Option<Instant> },
    Quiet,
}

impl Progress {
    /// A display out of `total` items (`None`: open-ended).
    pub fn start(quiet: bool, total: Option<u64>) -> Progress {
        let display = if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr_with_hz(4)),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4)),
            };
            let template = if total.is_some() {
                "{elapsed:>4} [{bar:28}] {percent:>3}%  {msg}"
            } else {
                "{elapsed:>4} {spinner} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            if let Ok(mut active) = ACTIVE.lock() {
                *active = Some(bar.clone());
            }
            Display::Bar(bar)
        } else {
            Display::Lines { every: LINE_EVERY, last: None }
        };
        Progress { display }
    }

    /// Reports `position` with a one-line message (built only when shown).
    pub fn update(&mut self, position: u64, message: impl FnOnce() -> String) {
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_position(position);
                bar.set_message(message());
            }
            Display::Lines { every, last } => {
                if last.is_none_or(|at| at.elapsed() >= *every) {
                    *last = Some(Instant::now());
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(err, "{}", message());
                }
            }
            Display::Quiet => {}
        }
    }

    /// Removes the live display (plain lines stay as printed).
    pub fn finish(&mut self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
            if let Ok(mut active) = ACTIVE.lock() {
                *active = None;
            }
        }
        self.display = Display::Quiet;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether output for people may carry colour: on a terminal, unless `NO_COLOR` is set.
pub fn colour_allowed(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The tracing writer: stderr, with an active progress line suspended while
/// a log line is written so the two never interleave.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let active = ACTIVE.lock().ok().and_then(|a| a.clone());
        match active {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write_all(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        for (n, text) in [(0, "0"), (999, "999"), (1000, "1,000"), (1_234_567, "1,234,567"), (100_000, "100,000")] {
            assert_eq!(thousands(n), text);
        }
    }

    #[test]
    fn colour_only_on_a_terminal() {
        assert!(!colour_allowed(false));
    }
}
