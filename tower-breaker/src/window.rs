//! Sliding windows of outcomes, lock-free and of fixed size whatever the call rate.
//!
//! The count window holds the last `size` calls. A success (neither failed nor slow, the common case) is only
//! counted, in a per-thread stripe: it writes no cache line that another thread writes, so threads sharing a
//! breaker do not contend. A failure or a slow call (a "mark") takes its place in the order of calls from those
//! counts (its position is the number of calls recorded before it) and is kept in a ring of the last `size`
//! marks; marks whose position has fallen out of the last `size` calls are evicted, each once, when the next
//! mark is recorded or the totals are read (subtract on evict). With calls from one thread at a time this is
//! exactly "the last `size` calls"; with threads racing, a success still in flight on another core may be
//! counted a moment late. The time window keeps one bucket per `duration / buckets`; a bucket is recycled when
//! time moves past it. There too a success is only counted in its thread's stripe, for the current bucket; a thread
//! adds its count to the shared bucket when it first records in a later bucket, and the totals add the stripes'
//! counts that are still inside the window.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::padded::{Lane, Padded, STRIPES, Striped};

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
    /// A success that was not slow.
    pub(crate) const SUCCESS: Self = Self {
        failure: false,
        slow: false,
    };

    /// Mark encoding: bit 0 = failure, bit 1 = slow.
    fn code(self) -> u64 {
        u64::from(self.failure) | (u64::from(self.slow) << 1)
    }
}

/// Failures in the low 32 bits, slow calls in the high 32 bits (a window holds fewer than 2^21 calls).
fn packed(code: u64) -> u64 {
    (code & 1) | ((code >> 1) << 32)
}

/// One failure or slow call in the ring.
#[derive(Debug, Default)]
struct Mark {
    /// The mark's index among all marks, plus one (0: never written). Written last, so a reader that sees its
    /// index sees its position too.
    index: AtomicU64,
    /// Its position among all calls, shifted left by 2, with its [`Sample::code`] in the low bits.
    position_code: AtomicU64,
}

/// Where the marks' bookkeeping stands; written only by failures, slow calls and resets.
#[derive(Debug, Default)]
struct MarkState {
    /// Marks ever recorded: the next mark's index.
    count: AtomicU64,
    /// The index of the oldest mark still counted in `totals`.
    tail: AtomicU64,
    /// Failures and slow calls counted now, packed (see [`packed`]).
    totals: AtomicU64,
    /// The position of the first call after the last reset: earlier calls are out of the window.
    base: AtomicU64,
}

/// The last `size` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    size: u64,
    marks: Padded<MarkState>,
    ring: Box<[Mark]>,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            size: u64::from(size.max(1)),
            marks: Padded(MarkState::default()),
            ring: (0..size.max(1)).map(|_| Mark::default()).collect(),
        }
    }

    fn mark(&self, index: u64) -> &Mark {
        // The ring has `size` (at most MAX_COUNT_WINDOW) entries, so the index fits in usize.
        &self.ring[usize::try_from(index % self.size).unwrap_or(0)]
    }

    /// How many outcomes were ever recorded here (never reset): the success count derives from it.
    pub(crate) fn recorded(&self, successes: &Striped) -> u64 {
        self.marks.0.count.load(Ordering::Acquire) + successes.sum(Lane::WindowSuccesses)
    }

    /// Records one outcome. Returns the totals after it when the outcome was a failure or slow (the only outcomes
    /// that can raise a rate), `None` otherwise.
    #[inline]
    pub(crate) fn record(&self, successes: &Striped, sample: Sample) -> Option<Totals> {
        if !(sample.failure || sample.slow) {
            successes.increment(Lane::WindowSuccesses);
            return None;
        }
        Some(self.record_mark(successes, sample.code()))
    }

    #[inline(never)]
    fn record_mark(&self, successes: &Striped, code: u64) -> Totals {
        let state = &self.marks.0;
        let index = state.count.fetch_add(1, Ordering::AcqRel);
        // Calls recorded before this one: the marks before it and every success counted so far.
        let position = index + successes.sum(Lane::WindowSuccesses);
        // The mark `size` places back has `size` marks after it, so it is out of the window: it leaves the ring
        // (and the totals) before this one takes its entry.
        if let Some(previous) = index.checked_sub(self.size) {
            self.evict_through(previous);
        }
        state.totals.fetch_add(packed(code), Ordering::AcqRel);
        let mark = self.mark(index);
        mark.position_code
            .store((position << 2) | code, Ordering::Relaxed);
        mark.index.store(index + 1, Ordering::Release);
        let base = state.base.load(Ordering::Acquire);
        let first = (position + 1).saturating_sub(self.size).max(base);
        self.evict_before(first, index);
        self.read_totals((position + 1).saturating_sub(base))
    }

    /// Evicts marks older than `limit` whose position is before `first`, in order, stopping at the first one that
    /// is still in the window or not written yet (a later mark or reading evicts it).
    fn evict_before(&self, first: u64, limit: u64) {
        let state = &self.marks.0;
        loop {
            let tail = state.tail.load(Ordering::Acquire);
            if tail >= limit {
                return;
            }
            let mark = self.mark(tail);
            if mark.index.load(Ordering::Acquire) != tail + 1 {
                return;
            }
            let position_code = mark.position_code.load(Ordering::Relaxed);
            if position_code >> 2 >= first {
                return;
            }
            // While the tail is here, no mark reuses this entry (it would evict this one first).
            if state
                .tail
                .compare_exchange(tail, tail + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                state
                    .totals
                    .fetch_sub(packed(position_code & 3), Ordering::AcqRel);
            }
        }
    }

    /// Evicts every mark up to and including `last`, waiting for a mark still being written (a few instructions
    /// away on another thread; only `size` marks racing at once can get here).
    fn evict_through(&self, last: u64) {
        let state = &self.marks.0;
        loop {
            let tail = state.tail.load(Ordering::Acquire);
            if tail > last {
                return;
            }
            let mark = self.mark(tail);
            if mark.index.load(Ordering::Acquire) != tail + 1 {
                std::thread::yield_now();
                continue;
            }
            let position_code = mark.position_code.load(Ordering::Relaxed);
            if state
                .tail
                .compare_exchange(tail, tail + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                state
                    .totals
                    .fetch_sub(packed(position_code & 3), Ordering::AcqRel);
            }
        }
    }

    fn read_totals(&self, calls: u64) -> Totals {
        let word = self.marks.0.totals.load(Ordering::Acquire);
        let calls = calls.min(self.size);
        let totals = Totals {
            calls,
            failures: word & u64::from(u32::MAX),
            slow: word >> 32,
        };
        // Records racing a reset can leave a mark of before it counted for a moment: never report more than the
        // calls.
        Totals {
            failures: totals.failures.min(calls),
            slow: totals.slow.min(calls),
            ..totals
        }
    }

    /// The current totals (marks that have left the window are evicted first).
    pub(crate) fn totals(&self, successes: &Striped) -> Totals {
        let state = &self.marks.0;
        let count = state.count.load(Ordering::Acquire);
        let recorded = count + successes.sum(Lane::WindowSuccesses);
        let base = state.base.load(Ordering::Acquire);
        self.evict_before(recorded.saturating_sub(self.size).max(base), count);
        self.read_totals(recorded.saturating_sub(base))
    }

    /// Empties the window: calls recorded so far no longer count, and their marks are evicted.
    pub(crate) fn reset(&self, successes: &Striped) {
        let state = &self.marks.0;
        let count = state.count.load(Ordering::Acquire);
        let recorded = count + successes.sum(Lane::WindowSuccesses);
        state.base.fetch_max(recorded, Ordering::AcqRel);
        self.evict_before(u64::MAX, count);
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
    /// Per thread stripe: the successes it recorded in one bucket epoch, not yet added to that bucket, as
    /// `epoch << 32 | count` (the epoch's low 32 bits). Only the stripes that threads own are used.
    current: Box<[Padded<AtomicU64>]>,
}

const COUNT_BITS: u32 = 32;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl TimeWindow {
    pub(crate) fn new(duration_ms: u64, buckets: u32) -> Self {
        Self {
            bucket_ms: (duration_ms / u64::from(buckets)).max(1),
            head: Padded(AtomicU64::new(0)),
            advancing: AtomicBool::new(false),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            current: (0..STRIPES).map(|_| Padded::default()).collect(),
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

    /// Records a success (neither failed nor slow) at `now_ms`, from the thread of `stripe`, which it owns when
    /// `owned` (see [`crate::padded::this_thread_stripe`]).
    #[inline]
    pub(crate) fn record_success(&self, now_ms: u64, stripe: usize, owned: bool) {
        if !owned {
            self.record(now_ms, Sample::SUCCESS);
            return;
        }
        let epoch = now_ms / self.bucket_ms;
        let current = &self.current[stripe].0;
        let word = current.load(Ordering::Relaxed);
        if word >> COUNT_BITS == epoch & COUNT_MASK && word & COUNT_MASK < COUNT_MASK {
            current.store(word + 1, Ordering::Release);
            return;
        }
        self.start_epoch(now_ms, current, word);
    }

    /// The thread records in a new bucket epoch: its count for the previous one goes to that bucket, added before
    /// the stripe moves on (see [`TimeWindow::totals`] for why that order). A `reset` racing the owner of a stripe
    /// can see up to a bucket of its pre-reset successes come back: successes only, which can only delay an
    /// opening.
    #[inline(never)]
    fn start_epoch(&self, now_ms: u64, current: &AtomicU64, word: u64) {
        let epoch = now_ms / self.bucket_ms;
        if self.enter(epoch).is_none() {
            return;
        }
        let count = word & COUNT_MASK;
        let newest = self.head.0.load(Ordering::Acquire).max(epoch);
        if count > 0
            && let Some(previous) = self.epoch_in_window(word >> COUNT_BITS, newest)
        {
            self.bucket(previous)
                .calls_failures
                .fetch_add(count, Ordering::AcqRel);
        }
        current.store(((epoch & COUNT_MASK) << COUNT_BITS) | 1, Ordering::Release);
    }

    /// The full epoch whose low 32 bits are `truncated`, if it lies in the window that ends at `newest`.
    fn epoch_in_window(&self, truncated: u64, newest: u64) -> Option<u64> {
        let back = (newest & COUNT_MASK).wrapping_sub(truncated) & COUNT_MASK;
        (back < self.len())
            .then(|| newest.checked_sub(back))
            .flatten()
    }

    /// Advances the window to `epoch` if it is newer; `None` if `epoch` is already older than the window.
    fn enter(&self, epoch: u64) -> Option<()> {
        let head = self.head.0.load(Ordering::Acquire);
        if epoch > head {
            self.advance_to(epoch);
        } else if epoch + self.len() <= head {
            // Older than the window (a call that took longer than the whole window to report): not counted.
            return None;
        }
        Some(())
    }

    /// Records one outcome at `now_ms` in the shared bucket. Returns the totals after it for a failure or a slow
    /// call.
    pub(crate) fn record(&self, now_ms: u64, sample: Sample) -> Option<Totals> {
        let epoch = now_ms / self.bucket_ms;
        self.enter(epoch)?;
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
        // The stripes first, then the buckets: a thread changing epoch adds its count to the bucket before its
        // stripe moves on, so a count read in neither place is impossible (read in both, it counts twice, for a
        // moment: a moment's excess of successes can only delay an opening).
        for current in &*self.current {
            let word = current.0.load(Ordering::Acquire);
            if self
                .epoch_in_window(word >> COUNT_BITS, newest)
                .is_some_and(|epoch| epoch >= oldest)
            {
                totals.calls += word & COUNT_MASK;
            }
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
        for current in &*self.current {
            current.0.store(0, Ordering::Relaxed);
        }
        self.advancing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader racing a thread's move to the next bucket never sees fewer than the successes already recorded:
    /// the count is in the stripe, in the bucket, or (for a moment) in both.
    #[test]
    fn a_time_window_never_loses_successes_while_a_thread_changes_bucket() {
        use std::sync::atomic::AtomicI64;
        const SUCCESSES: u64 = 200;
        const ROUNDS: i64 = 2_000;
        let window = TimeWindow::new(100, 10); // buckets of 10 ms
        let recorded = AtomicI64::new(-1); // the round whose successes are all recorded
        let watching = AtomicI64::new(-1); // the round the reader is watching
        let moved = AtomicI64::new(-1); // the round whose thread moved to the next bucket
        let read = AtomicI64::new(-1); // the round the reader is done with
        let (mut short, mut lowest) = (0, u64::MAX);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..ROUNDS {
                    let epoch = 1 + round.unsigned_abs() * 100;
                    for _ in 0..SUCCESSES {
                        window.record_success(epoch * 10, 0, true);
                    }
                    recorded.store(round, Ordering::Release);
                    while watching.load(Ordering::Acquire) != round {
                        std::thread::yield_now();
                    }
                    window.record_success((epoch + 1) * 10, 0, true);
                    moved.store(round, Ordering::Release);
                    while read.load(Ordering::Acquire) != round {
                        std::thread::yield_now();
                    }
                }
            });
            for round in 0..ROUNDS {
                let epoch = 1 + round.unsigned_abs() * 100;
                while recorded.load(Ordering::Acquire) != round {
                    std::thread::yield_now();
                }
                watching.store(round, Ordering::Release);
                loop {
                    let last = moved.load(Ordering::Acquire) == round;
                    let calls = window.totals((epoch + 1) * 10).calls;
                    if calls < SUCCESSES {
                        short += 1;
                        lowest = lowest.min(calls);
                    }
                    if last {
                        break;
                    }
                }
                read.store(round, Ordering::Release);
            }
        });
        assert_eq!(
            short, 0,
            "totals fell short {short} times (lowest {lowest})"
        );
    }

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
        let successes = Striped::default();
        let window = CountWindow::new(4);
        for _ in 0..3 {
            window.record(&successes, FAIL);
        }
        assert_eq!(
            window.totals(&successes),
            Totals {
                calls: 3,
                failures: 3,
                slow: 0
            }
        );
        for _ in 0..4 {
            window.record(&successes, OK);
        }
        assert_eq!(
            window.totals(&successes),
            Totals {
                calls: 4,
                failures: 0,
                slow: 0
            }
        );
        let after = window.record(&successes, FAIL).unwrap();
        assert_eq!(
            after,
            Totals {
                calls: 4,
                failures: 1,
                slow: 0
            }
        );
        assert_eq!(window.recorded(&successes), 8);
    }

    #[test]
    fn a_count_window_reset_empties_it() {
        let successes = Striped::default();
        let window = CountWindow::new(3);
        window.record(&successes, FAIL);
        window.record(
            &successes,
            Sample {
                failure: false,
                slow: true,
            },
        );
        window.reset(&successes);
        assert_eq!(window.totals(&successes), Totals::default());
        window.record(&successes, FAIL);
        assert_eq!(window.totals(&successes).calls, 1);
    }

    #[test]
    fn a_count_window_matches_a_ring_of_the_last_n_outcomes() {
        // A reference model: the last N outcomes, kept in order.
        for size in [1u32, 2, 3, 7, 10] {
            let successes = Striped::default();
            let window = CountWindow::new(size);
            let mut model = std::collections::VecDeque::new();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(size);
            for step in 0..5_000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if step.is_multiple_of(997) {
                    window.reset(&successes);
                    model.clear();
                }
                let sample = Sample {
                    failure: x.is_multiple_of(3),
                    slow: x.is_multiple_of(5),
                };
                let after = window.record(&successes, sample);
                model.push_back(sample);
                if model.len() > size as usize {
                    model.pop_front();
                }
                let expected = Totals {
                    calls: model.len() as u64,
                    failures: model.iter().filter(|s| s.failure).count() as u64,
                    slow: model.iter().filter(|s| s.slow).count() as u64,
                };
                if sample.failure || sample.slow {
                    assert_eq!(after, Some(expected), "size {size}, step {step}");
                }
                assert_eq!(
                    window.totals(&successes),
                    expected,
                    "size {size}, step {step}"
                );
            }
        }
    }

    #[test]
    fn concurrent_records_keep_the_totals_within_the_window() {
        let successes = std::sync::Arc::new(Striped::default());
        let window = std::sync::Arc::new(CountWindow::new(64));
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let window = window.clone();
                let successes = successes.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let failure = (i + thread) % 3 == 0;
                        window.record(
                            &successes,
                            Sample {
                                failure,
                                slow: false,
                            },
                        );
                        if i % 5_000 == 0 {
                            window.reset(&successes);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(window.recorded(&successes), 80_000);
        // At rest, 64 more failures fill the window exactly.
        for _ in 0..64 {
            window.record(&successes, FAIL);
        }
        assert_eq!(
            window.totals(&successes),
            Totals {
                calls: 64,
                failures: 64,
                slow: 0
            }
        );
        for _ in 0..64 {
            window.record(&successes, OK);
        }
        assert_eq!(
            window.totals(&successes),
            Totals {
                calls: 64,
                failures: 0,
                slow: 0
            }
        );
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
