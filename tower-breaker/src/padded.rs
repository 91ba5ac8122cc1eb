//! Cache-line padding, so that atomics written by every call do not share a line with each other.

/// A value alone on its own 128-byte region (two 64-byte lines, as adjacent-line prefetching pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How many stripes a [`Striped`] counter has.
const STRIPES: usize = 8;

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe: threads take stripes in turn, so up to `STRIPES` threads never share one.
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// A counter written by every call from many threads: each thread adds to its own stripe (its own cache line),
/// so concurrent callers do not fight over one line; reading sums the stripes.
#[derive(Debug, Default)]
pub(crate) struct Striped {
    stripes: [Padded<AtomicU64>; STRIPES],
}

impl Striped {
    /// Adds one and returns this stripe's previous value.
    #[inline]
    pub(crate) fn increment(&self) -> u64 {
        let stripe = STRIPE.with(|stripe| *stripe);
        self.stripes[stripe].0.fetch_add(1, Ordering::Relaxed)
    }

    /// The total.
    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| stripe.0.load(Ordering::Acquire))
            .sum()
    }
}
