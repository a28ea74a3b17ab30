//! Streaming the UNet's weights: which blocks stay mapped, which are read again every step, and
//! when each is read. The planner charges exactly what the watch does, from the same functions.
//!
//! Every block read again costs its bytes of disk reads and page-cache work per step, and on a
//! 2-core machine that work competes with the compute, so the room the budget leaves the denoise
//! stage goes to pinning blocks (kept mapped for the whole denoise, read once). The others run in
//! a cycle (the last output block is followed by the next step's first input block): each is read
//! while the streamed block before it runs, and released after it ran.

/// Which blocks to pin within `room` bytes of block weights: largest first (fewest bytes read per
/// step and the smallest streaming pairs left), each one that still fits.
pub fn pin(block_bytes: &[u64], room: u64) -> Vec<bool> {
    let mut pinned = vec![false; block_bytes.len()];
    let mut order: Vec<usize> = (0..block_bytes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(block_bytes[i]));
    for i in order {
        pinned[i] = true;
        if peak_bytes(block_bytes, &pinned) > room {
            pinned[i] = false;
        }
    }
    pinned
}

/// The streamed block that runs after `k` (cyclic), if any block is streamed.
pub fn next_streamed(pinned: &[bool], k: usize) -> Option<usize> {
    let n = pinned.len();
    (1..=n).map(|j| (k + j) % n).find(|&b| !pinned[b])
}

/// Bytes of block weights charged at the worst moment of a step: the pinned blocks, plus a
/// streamed block running while the next streamed one is read.
pub fn peak_bytes(block_bytes: &[u64], pinned: &[bool]) -> u64 {
    let kept: u64 = (0..block_bytes.len())
        .filter(|&b| pinned[b])
        .map(|b| block_bytes[b])
        .sum();
    let pair = (0..block_bytes.len())
        .filter(|&k| !pinned[k])
        .map(|k| match next_streamed(pinned, k) {
            Some(next) if next != k => block_bytes[k] + block_bytes[next],
            _ => block_bytes[k],
        })
        .max()
        .unwrap_or(0);
    kept + pair
}

/// The read state of one run: which blocks have been asked for since they last ran. The watch
/// hands its answers to the `weights::Reader` thread and releases the streamed blocks.
pub struct ReadAhead {
    pinned: Vec<bool>,
    requested: Vec<bool>,
}

impl ReadAhead {
    pub fn new(pinned: Vec<bool>) -> Self {
        let requested = vec![false; pinned.len()];
        ReadAhead { pinned, requested }
    }

    /// Whether block `i` is read again every step (released after it runs).
    pub fn streamed(&self, i: usize) -> bool {
        !self.pinned[i]
    }

    /// Block `k` is about to run: the blocks to start reading now, each asked for once between two
    /// runs of it (a pinned block only once): `k` itself, if it was not (the first step), and the
    /// next streamed block, read while `k` runs.
    pub fn before(&mut self, k: usize) -> Vec<usize> {
        let mut asked = Vec::new();
        for b in std::iter::once(k).chain(next_streamed(&self.pinned, k)) {
            if !std::mem::replace(&mut self.requested[b], true) {
                asked.push(b);
            }
        }
        asked
    }

    /// Streamed block `i` ran and its pages are released: the next run of it needs a new read.
    pub fn released(&mut self, i: usize) {
        self.requested[i] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_the_largest_blocks_that_fit_and_charges_the_worst_streaming_pair() {
        let blocks = [10, 40, 20, 30];
        let none = [false; 4];
        // Pairs of consecutive blocks, cyclic: 10+40, 40+20, 20+30, 30+10.
        assert_eq!(peak_bytes(&blocks, &none), 60);
        assert_eq!(pin(&blocks, 60), none);
        // Pinning 40 leaves the pairs 10+20, 20+30, 30+10: 40 + 50.
        assert_eq!(pin(&blocks, 90), [false, true, false, false]);
        assert_eq!(peak_bytes(&blocks, &[false, true, false, false]), 90);
        // Pinning 30 as well would need 70 + (10+20) = 100; smaller ones would not fit either.
        assert_eq!(pin(&blocks, 99), [false, true, false, false]);
        // At 100 all fit in turn: 40, 30 (70 + 30), 20 (90 + 10 streaming alone), then 10.
        assert_eq!(pin(&blocks, 100), [true; 4]);
        assert_eq!(peak_bytes(&blocks, &[true; 4]), 100);
        assert_eq!(peak_bytes(&[], &[]), 0);
    }

    /// Over three steps: every block has been asked for before it runs, no block is asked for
    /// twice between two of its runs, pinned blocks only once, and what is asked for and not yet
    /// released never exceeds the peak the planner charges.
    #[test]
    fn reads_each_block_once_before_it_runs_within_the_peak() {
        let blocks = [10, 40, 20, 30, 5, 25];
        for room in [0, 75, 100, 130, 1000] {
            let pinned = pin(&blocks, room);
            let mut reads = ReadAhead::new(pinned.clone());
            let mut charged = [false; 6];
            let mut times_asked = [0; 6];
            let mut ask = |asked: Vec<usize>, charged: &mut [bool; 6]| {
                for b in asked {
                    assert!(!charged[b], "block {b} asked for twice (room {room})");
                    charged[b] = true;
                    times_asked[b] += 1;
                }
            };
            ask(reads.before(0), &mut charged);
            for step in 0..3 {
                for k in 0..blocks.len() {
                    assert!(charged[k], "step {step}: block {k} runs unread");
                    if let Some(next) = next_streamed(&pinned, k) {
                        assert!(charged[next], "step {step}: {next} not read during {k}");
                    }
                    let bytes: u64 = (0..6).filter(|&b| charged[b]).map(|b| blocks[b]).sum();
                    assert!(bytes <= peak_bytes(&blocks, &pinned), "{bytes} at {k}");
                    if reads.streamed(k) {
                        reads.released(k);
                        charged[k] = false;
                    }
                    ask(reads.before((k + 1) % blocks.len()), &mut charged);
                }
            }
            for b in 0..6 {
                let want = if pinned[b] { 1 } else { 3 };
                assert!(times_asked[b] >= want, "room {room}: block {b}");
                if pinned[b] {
                    assert_eq!(times_asked[b], 1, "room {room}: pinned {b} read again");
                }
            }
        }
    }
}
