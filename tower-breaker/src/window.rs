//! Sliding windows of outcomes, lock-free and of fixed size whatever the call rate.
//!
//! The count window is a ring of one-byte slots: recording a call claims the next slot with one `fetch_add` and
//! writes the outcome there; the running totals change only when the outcome differs from the one it replaces
//! (subtract on evict), so a steady stream of successes costs one atomic add. The time window keeps one bucket per
//! `duration / buckets`; a bucket is recycled when time moves past it.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::padded::Padded;

/// What a window reports after a failure or a slow call: the totals the thresholds are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// One recorded outcome, as the windows see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

impl Sample {
    /// Slot encoding: 0 = empty, bit 0 = a call, bit 1 = failure, bit 2 = slow.
    fn code(self) -> u8 {
        1 | (u8::from(self.failure) << 1) | (u8::from(self.slow) << 2)
    }
}

// Count-window totals are packed in one word: calls, failures and slow calls, 21 bits each. The window holds at most
// `MAX_COUNT_WINDOW` (< 2^21 - 1) calls, so a field can only exceed the window size while a concurrent reset and
// record interleave; readers treat such a reading as inconsistent and skip it.
const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;

fn packed(code: u8) -> u64 {
    if code == 0 {
        return 0;
    }
    1 | (u64::from((code >> 1) & 1) << FIELD_BITS)
        | (u64::from((code >> 2) & 1) << (2 * FIELD_BITS))
}

/// The last `size` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    seq: Padded<AtomicU64>,
    totals: Padded<AtomicU64>,
    slots: Box<[AtomicU8]>,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            seq: Padded(AtomicU64::new(0)),
            totals: Padded(AtomicU64::new(0)),
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// How many outcomes were ever recorded here (never reset): the success count derives from it.
    pub(crate) fn recorded(&self) -> u64 {
        self.seq.0.load(Ordering::Relaxed)
    }

    /// Records one outcome. Returns the totals after it when the outcome was a failure or slow (the only outcomes
    /// that can raise a rate), `None` otherwise.
    #[inline]
    pub(crate) fn record(&self, sample: Sample) -> Option<Totals> {
        let seq = self.seq.0.fetch_add(1, Ordering::Relaxed);
        // The slot count is at most MAX_COUNT_WINDOW, so the index fits in usize on every platform we build for.
        let index = usize::try_from(seq % self.slots.len() as u64).unwrap_or(0);
        let slot = &self.slots[index];
        let code = sample.code();
        // Steady state (the same outcome as the call it replaces) changes no total: skip the write entirely.
        if slot.load(Ordering::Relaxed) != code {
            let old = slot.swap(code, Ordering::AcqRel);
            if old != code {
                // Add before subtracting, so no field dips below zero in between.
                self.totals.0.fetch_add(packed(code), Ordering::AcqRel);
                self.totals.0.fetch_sub(packed(old), Ordering::AcqRel);
            }
        }
        (sample.failure || sample.slow).then(|| self.totals())
    }

    /// The current totals, or zeros if a concurrent reset left them momentarily inconsistent.
    pub(crate) fn totals(&self) -> Totals {
        let word = self.totals.0.load(Ordering::Acquire);
        let totals = Totals {
            calls: word & FIELD_MASK,
            failures: (word >> FIELD_BITS) & FIELD_MASK,
            slow: (word >> (2 * FIELD_BITS)) & FIELD_MASK,
        };
        let size = self.slots.len() as u64;
        if totals.calls > size || totals.failures > totals.calls || totals.slow > totals.calls {
            return Totals::default();
        }
        totals
    }

    /// Empties the window. Each slot is cleared with the same swap-and-adjust step a record uses, so the totals
    /// stay equal to the slots' contents even with records racing the reset.
    pub(crate) fn reset(&self) {
        for slot in &*self.slots {
            if slot.load(Ordering::Relaxed) != 0 {
                let old = slot.swap(0, Ordering::AcqRel);
                self.totals.0.fetch_sub(packed(old), Ordering::AcqRel);
            }
        }
    }
}

/// One time bucket: calls in the low 32 bits and failures in the high 32 bits of one word, slow calls in another.
#[derive(Debug, Default)]
struct Bucket {
    calls_failures: AtomicU64,
    slow: AtomicU64,
}

/// The calls of the last `buckets * bucket_ms` milliseconds.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    bucket_ms: u64,
    /// The newest bucket epoch (`now_ms / bucket_ms`) the window has been advanced to.
    head: Padded<AtomicU64>,
    /// Held while buckets are recycled, once per bucket period at most.
    advancing: AtomicBool,
    buckets: Box<[Bucket]>,
}

impl TimeWindow {
    pub(crate) fn new(duration_ms: u64, buckets: u32) -> Self {
        Self {
            bucket_ms: (duration_ms / u64::from(buckets)).max(1),
            head: Padded(AtomicU64::new(0)),
            advancing: AtomicBool::new(false),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn bucket(&self, epoch: u64) -> &Bucket {
        &self.buckets[usize::try_from(epoch % self.len()).unwrap_or(0)]
    }

    /// Moves the head to `epoch`, zeroing the buckets it passes. Only one thread recycles at a time; the others
    /// wait for it, which happens at most once per bucket period and takes at most `buckets` stores.
    fn advance_to(&self, epoch: u64) {
        loop {
            let head = self.head.0.load(Ordering::Acquire);
            if head >= epoch {
                return;
            }
            if self
                .advancing
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let head = self.head.0.load(Ordering::Acquire);
                if head < epoch {
                    let first = head
                        .saturating_add(1)
                        .max(epoch.saturating_sub(self.len() - 1));
                    for stale in first..=epoch {
                        let bucket = self.bucket(stale);
                        bucket.calls_failures.store(0, Ordering::Relaxed);
                        bucket.slow.store(0, Ordering::Relaxed);
                    }
                    self.head.0.store(epoch, Ordering::Release);
                }
                self.advancing.store(false, Ordering::Release);
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Records one outcome at `now_ms`. Returns the totals after it for a failure or a slow call.
    pub(crate) fn record(&self, now_ms: u64, sample: Sample) -> Option<Totals> {
        let epoch = now_ms / self.bucket_ms;
        let head = self.head.0.load(Ordering::Acquire);
        if epoch > head {
            self.advance_to(epoch);
        } else if epoch + self.len() <= head {
            // Older than the window (a call that took longer than the whole window to report): not counted.
            return None;
        }
        let bucket = self.bucket(epoch);
        bucket
            .calls_failures
            .fetch_add(1 | (u64::from(sample.failure) << 32), Ordering::AcqRel);
        if sample.slow {
            bucket.slow.fetch_add(1, Ordering::AcqRel);
        }
        (sample.failure || sample.slow).then(|| self.totals(now_ms))
    }

    /// The totals of the buckets that are still inside the window at `now_ms`.
    pub(crate) fn totals(&self, now_ms: u64) -> Totals {
        let now_epoch = now_ms / self.bucket_ms;
        let head = self.head.0.load(Ordering::Acquire);
        let newest = head.min(now_epoch);
        let oldest = now_epoch
            .saturating_sub(self.len() - 1)
            .max(head.saturating_sub(self.len() - 1));
        let mut totals = Totals::default();
        if newest < oldest {
            return totals;
        }
        for epoch in oldest..=newest {
            let bucket = self.bucket(epoch);
            let calls_failures = bucket.calls_failures.load(Ordering::Acquire);
            totals.calls += calls_failures & u64::from(u32::MAX);
            totals.failures += calls_failures >> 32;
            totals.slow += bucket.slow.load(Ordering::Acquire);
        }
        totals
    }

    /// Empties every bucket.
    pub(crate) fn reset(&self) {
        while self
            .advancing
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        for bucket in &*self.buckets {
            bucket.calls_failures.store(0, Ordering::Relaxed);
            bucket.slow.store(0, Ordering::Relaxed);
        }
        self.advancing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Sample = Sample {
        failure: false,
        slow: false,
    };
    const FAIL: Sample = Sample {
        failure: true,
        slow: false,
    };

    #[test]
    fn a_count_window_holds_only_the_last_n_outcomes() {
        let window = CountWindow::new(4);
        for _ in 0..3 {
            window.record(FAIL);
        }
        assert_eq!(
            window.totals(),
            Totals {
                calls: 3,
                failures: 3,
                slow: 0
            }
        );
        for _ in 0..4 {
            window.record(OK);
        }
        assert_eq!(
            window.totals(),
            Totals {
                calls: 4,
                failures: 0,
                slow: 0
            }
        );
        let after = window.record(FAIL).unwrap();
        assert_eq!(
            after,
            Totals {
                calls: 4,
                failures: 1,
                slow: 0
            }
        );
        assert_eq!(window.recorded(), 8);
    }

    #[test]
    fn a_count_window_reset_empties_it() {
        let window = CountWindow::new(3);
        window.record(FAIL);
        window.record(Sample {
            failure: false,
            slow: true,
        });
        window.reset();
        assert_eq!(window.totals(), Totals::default());
        window.record(FAIL);
        assert_eq!(window.totals().calls, 1);
    }

    #[test]
    fn concurrent_records_keep_the_totals_equal_to_the_slots() {
        let window = std::sync::Arc::new(CountWindow::new(64));
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let window = window.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let failure = (i + thread) % 3 == 0;
                        window.record(Sample {
                            failure,
                            slow: false,
                        });
                        if i % 5_000 == 0 {
                            window.reset();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let from_slots = window
            .slots
            .iter()
            .fold(Totals::default(), |mut totals, slot| {
                let code = slot.load(Ordering::Relaxed);
                if code != 0 {
                    totals.calls += 1;
                    totals.failures += u64::from((code >> 1) & 1);
                }
                totals
            });
        assert_eq!(window.totals(), from_slots);
    }

    #[test]
    fn a_time_window_forgets_buckets_older_than_its_span() {
        let window = TimeWindow::new(1_000, 10);
        window.record(0, FAIL);
        window.record(150, FAIL);
        window.record(950, OK);
        assert_eq!(
            window.totals(950),
            Totals {
                calls: 3,
                failures: 2,
                slow: 0
            }
        );
        // At 1000 ms the bucket [0, 100) has left the window; [100, 200) is still in.
        assert_eq!(
            window.totals(1_000),
            Totals {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        let after = window.record(1_100, FAIL).unwrap();
        assert_eq!(
            after,
            Totals {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        assert_eq!(window.totals(5_000), Totals::default());
    }

    #[test]
    fn a_time_window_recycles_buckets_after_a_long_silence() {
        let window = TimeWindow::new(1_000, 10);
        window.record(50, FAIL);
        // 10 s later, the same bucket index is reused for a new epoch and starts from zero.
        window.record(10_050, OK);
        assert_eq!(
            window.totals(10_050),
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
    }
}
