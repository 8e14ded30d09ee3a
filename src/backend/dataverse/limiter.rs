//! Adaptive concurrency for the Dataverse sink: additive increase,
//! multiplicative decrease on 429, starting from the service's hint.

use super::*;

pub(super) struct LimitState {
    limit: f64,
    in_use: usize,
    hinted: bool,
}

/// Additive increase, multiplicative decrease on 429.
pub(super) struct Limiter {
    state: Mutex<LimitState>,
    released: tokio::sync::Notify,
    max: usize,
    gauge: prometheus::IntGauge,
}

pub(super) struct Permit<'a>(&'a Limiter);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.in_use = s.in_use.saturating_sub(1);
        }
        self.0.released.notify_waiters();
    }
}

impl Limiter {
    pub(super) fn new(max: usize, gauge: prometheus::IntGauge) -> Limiter {
        let max = max.clamp(1, SERVICE_MAX_CONCURRENCY);
        gauge.set(max as i64);
        Limiter {
            state: Mutex::new(LimitState { limit: max as f64, in_use: 0, hinted: false }),
            released: tokio::sync::Notify::new(),
            max,
            gauge,
        }
    }

    pub(super) async fn acquire(&self) -> Permit<'_> {
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.released.notified();
            if let Ok(mut s) = self.state.lock()
                && (s.in_use as f64) < s.limit.floor().max(1.0)
            {
                s.in_use += 1;
                return Permit(self);
            }
            released.await;
        }
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut LimitState, usize)) {
        if let Ok(mut s) = self.state.lock() {
            change(&mut s, self.max);
            self.gauge.set(s.limit.floor() as i64);
        }
        self.released.notify_waiters();
    }

    /// The service's suggested degree of parallelism, taken once as the starting point.
    pub(super) fn hint(&self, dop: usize) {
        self.update(|s, max| {
            if !s.hinted {
                s.hinted = true;
                s.limit = dop.clamp(1, max) as f64;
            }
        });
    }

    pub(super) fn succeeded(&self) {
        self.update(|s, max| s.limit = (s.limit + 1.0 / s.limit).min(max as f64));
    }

    pub(super) fn throttled(&self) {
        self.update(|s, _| s.limit = (s.limit / 2.0).max(1.0));
    }

    #[cfg(test)]
    pub(super) fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit.floor() as usize).unwrap_or(0)
    }
}
