//! The offset tracker against a model: any interleaving of receives (in
//! order, repeated, out of order), acknowledgements and revocations. The
//! released position must always equal the model's: one past the longest
//! prefix of received offsets that are all done, never past a pending one.
#![no_main]

use std::collections::BTreeMap;

use copilot_ingest::offsets::OffsetTracker;
use libfuzzer_sys::fuzz_target;

const PARTITIONS: i32 = 3;

#[derive(Default)]
struct Model {
    /// offset -> done, per partition (received and not yet released).
    pending: BTreeMap<i32, BTreeMap<i64, bool>>,
    released: BTreeMap<i32, i64>,
}

impl Model {
    fn received(&mut self, p: i32, o: i64) {
        if self.released.get(&p).is_some_and(|&r| o < r) {
            return;
        }
        self.pending.entry(p).or_default().entry(o).or_insert(false);
    }
    fn done(&mut self, p: i32, o: i64) {
        let Some(pending) = self.pending.get_mut(&p) else { return };
        if let Some(d) = pending.get_mut(&o) {
            *d = true;
        }
        while let Some((&first, &true)) = pending.iter().next() {
            pending.remove(&first);
            self.released.insert(p, first + 1);
        }
    }
    fn forget(&mut self, p: i32) {
        self.pending.remove(&p);
        self.released.remove(&p);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tracker = OffsetTracker::new();
    let mut model = Model::default();
    let mut next = [0i64; PARTITIONS as usize];
    for op in data.chunks(2) {
        let (a, b) = (op[0], *op.get(1).unwrap_or(&0));
        let p = i32::from(a % PARTITIONS as u8);
        let slot = p as usize;
        match a / PARTITIONS as u8 % 5 {
            // The next offset, in order.
            0 | 1 => {
                tracker.received(0, p, next[slot]);
                model.received(p, next[slot]);
                next[slot] += 1;
            }
            // A skipped gap (compaction, transaction markers), then an offset.
            2 => {
                next[slot] += i64::from(b % 4);
                tracker.received(0, p, next[slot]);
                model.received(p, next[slot]);
                next[slot] += 1;
            }
            // An earlier offset delivered again.
            3 => {
                let o = (next[slot] - 1 - i64::from(b % 8)).max(0);
                tracker.received(0, p, o);
                model.received(p, o);
            }
            // An acknowledgement of a recent offset, or a revocation.
            _ => {
                if b == 255 {
                    tracker.forget(0, p);
                    model.forget(p);
                } else {
                    let o = (next[slot] - 1 - i64::from(b % 16)).max(0);
                    tracker.done(0, p, o);
                    model.done(p, o);
                }
            }
        }
        assert_eq!(tracker.committable_for(0, p), model.released.get(&p).copied(), "partition {p}");
    }
});
