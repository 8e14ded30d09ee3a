//! Retry pacing shared by every loop that waits for something to recover
//! (a sink, the broker, the registry, a command's database).

use std::time::Duration;

/// Exponential backoff with jitter: 100 ms doubling to 10 s, so a recovered
/// sink is used again within seconds.
pub struct Backoff {
    attempt: u32,
    seed: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Backoff { attempt: 0, seed: seed | 1 }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let base_ms = 100u64.saturating_mul(1 << self.attempt.min(9)).min(10_000);
        self.attempt += 1;
        // xorshift: jitter needs no cryptographic randomness.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = self.seed % (base_ms / 2 + 1);
        Duration::from_millis(base_ms / 2 + jitter)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_below_ten_seconds() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[5] > delays[0]);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays[19] >= Duration::from_secs(5), "half of the cap at least, once grown");
    }
}
