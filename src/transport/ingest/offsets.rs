//! The contiguous offset watermark (SPEC §5), written once, here.
//!
//! Invariant: for each partition, the released position `p` means every
//! message this consumer received with an offset below `p` has been durably
//! written, skipped as a replay, or acknowledged by the DLQ broker. An
//! acknowledgement never releases past an earlier offset that is still
//! pending, whatever order acknowledgements arrive in.

use std::collections::{HashMap, VecDeque};

#[derive(Debug, Default)]
struct PartitionState {
    /// Received offsets in increasing order, with their done flag.
    pending: VecDeque<(i64, bool)>,
    /// Next offset to commit (one past the last released offset), if any.
    released: Option<i64>,
}

/// Tracks, per (topic, partition), which received offsets are done.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(u32, i32), PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was received. Offsets of one partition normally
    /// arrive in increasing order; a message delivered again (after a pause,
    /// a seek or a fetch retry) never discards the pending state of the ones
    /// before it: it is either already tracked, or already released.
    /// Returns false for such a repeat.
    pub fn received(&mut self, topic: u32, partition: i32, offset: i64) -> bool {
        let state = self.partitions.entry((topic, partition)).or_default();
        match state.pending.back() {
            None if state.released.is_some_and(|r| offset < r) => false,
            None => {
                state.pending.push_back((offset, false));
                true
            }
            Some(&(last, _)) if offset > last => {
                state.pending.push_back((offset, false));
                true
            }
            Some(_) => match state.pending.binary_search_by_key(&offset, |&(o, _)| o) {
                Ok(_) => false,
                Err(0) if state.released.is_some_and(|r| offset < r) => false,
                Err(i) => {
                    state.pending.insert(i, (offset, false));
                    true
                }
            },
        }
    }

    /// Marks `offset` done. Unknown offsets (from a revoked or reset
    /// partition) are ignored. Returns true if the watermark advanced.
    pub fn done(&mut self, topic: u32, partition: i32, offset: i64) -> bool {
        let Some(state) = self.partitions.get_mut(&(topic, partition)) else { return false };
        if let Ok(i) = state.pending.binary_search_by_key(&offset, |&(o, _)| o) {
            state.pending[i].1 = true;
        } else {
            return false;
        }
        let mut advanced = false;
        while let Some(&(o, true)) = state.pending.front() {
            state.pending.pop_front();
            state.released = Some(o + 1);
            advanced = true;
        }
        advanced
    }

    pub fn committable_for(&self, topic: u32, partition: i32) -> Option<i64> {
        self.partitions.get(&(topic, partition)).and_then(|s| s.released)
    }

    /// Number of received offsets not yet done.
    pub fn pending(&self) -> usize {
        self.partitions.values().map(|s| s.pending.iter().filter(|(_, d)| !d).count()).sum()
    }

    /// Forgets a partition (revoked): its late acknowledgements are ignored.
    pub fn forget(&mut self, topic: u32, partition: i32) {
        self.partitions.remove(&(topic, partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn releases_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.received(0, 0, o);
        }
        assert!(!t.done(0, 0, 12));
        assert_eq!(t.committable_for(0, 0), None);
        assert!(t.done(0, 0, 10));
        assert_eq!(t.committable_for(0, 0), Some(11));
        assert!(t.done(0, 0, 11));
        assert_eq!(t.committable_for(0, 0), Some(13));
        assert_eq!(t.pending(), 2);
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_watermark() {
        let mut t = OffsetTracker::new();
        for o in [3, 7, 8] {
            t.received(0, 1, o);
        }
        t.done(0, 1, 8);
        t.done(0, 1, 3);
        assert_eq!(t.committable_for(0, 1), Some(4));
        t.done(0, 1, 7);
        assert_eq!(t.committable_for(0, 1), Some(9));
    }

    #[test]
    fn a_redelivered_offset_never_discards_pending_ones() {
        let mut t = OffsetTracker::new();
        for o in 0..10 {
            t.received(0, 0, o);
        }
        t.done(0, 0, 0);
        // Offsets 5.. delivered again while 1..=4 are still being written.
        for o in 5..10 {
            assert!(!t.received(0, 0, o));
        }
        for o in 5..10 {
            t.done(0, 0, o);
        }
        assert_eq!(t.committable_for(0, 0), Some(1), "1..=4 are not done");
        assert!(!t.received(0, 0, 0), "already released");
        for o in 1..5 {
            t.done(0, 0, o);
        }
        assert_eq!(t.committable_for(0, 0), Some(10));
    }

    #[test]
    fn forgotten_partitions_ignore_late_acknowledgements() {
        let mut t = OffsetTracker::new();
        t.received(0, 0, 1);
        t.forget(0, 0);
        assert!(!t.done(0, 0, 1));
        assert_eq!(t.committable_for(0, 0), None);
    }

    proptest! {
        /// Acknowledgements in any order never release an offset above an
        /// unacknowledged one, and all acknowledged releases everything.
        #[test]
        fn never_releases_past_an_unacknowledged_offset(
            offsets in proptest::collection::btree_set(0i64..10_000, 1..200),
            order_seed in proptest::collection::vec(any::<u32>(), 200),
            ack_count in 0usize..200,
        ) {
            let offsets: Vec<i64> = offsets.into_iter().collect();
            let mut t = OffsetTracker::new();
            for &o in &offsets { t.received(0, 3, o); }
            let mut order: Vec<usize> = (0..offsets.len()).collect();
            for i in (1..order.len()).rev() {
                let j = order_seed[i] as usize % (i + 1);
                order.swap(i, j);
            }
            let acked: Vec<usize> = order.iter().copied().take(ack_count.min(offsets.len())).collect();
            let mut is_acked = vec![false; offsets.len()];
            for &i in &acked {
                t.done(0, 3, offsets[i]);
                is_acked[i] = true;
                if let Some(released) = t.committable_for(0, 3) {
                    for (k, &o) in offsets.iter().enumerate() {
                        if o < released { prop_assert!(is_acked[k], "released {} past unacked {}", released, o); }
                    }
                }
            }
            if acked.len() == offsets.len() {
                prop_assert_eq!(t.committable_for(0, 3), Some(offsets[offsets.len() - 1] + 1));
                prop_assert_eq!(t.pending(), 0);
            }
        }
    }
}
