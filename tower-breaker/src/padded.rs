//! Cache-line padding, so that atomics written by every call do not share a line with each other.

/// A value alone on its own 128-byte region (two 64-byte lines, as adjacent-line prefetching pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How many stripes a [`Striped`] counter gives threads of their own.
const OWNED_STRIPES: usize = 16;

/// Which owned stripes are taken, one bit each, by the threads alive now.
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// A thread's stripe: one it owns alone while it lives, or the shared one when all are taken.
struct Slot {
    index: usize,
    owned: bool,
}

impl Slot {
    fn claim() -> Self {
        let mut taken = TAKEN.load(Ordering::Acquire);
        loop {
            let free = (!taken).trailing_zeros() as usize;
            if free >= OWNED_STRIPES {
                return Self {
                    index: OWNED_STRIPES,
                    owned: false,
                };
            }
            match TAKEN.compare_exchange_weak(
                taken,
                taken | (1 << free),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Self {
                        index: free,
                        owned: true,
                    };
                }
                Err(actual) => taken = actual,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.owned {
            // Release: the next owner of this stripe sees every count this thread wrote.
            TAKEN.fetch_and(!(1 << self.index), Ordering::Release);
        }
    }
}

thread_local! {
    static SLOT: Slot = Slot::claim();
}

/// Counters written by every call from many threads. Up to 16 threads each own a stripe (a cache line of its
/// own, holding one value per [`Lane`]) and add to it with a plain load and store, no atomic read-modify-write;
/// further threads share one stripe with `fetch_add`. Reading sums the stripes.
#[derive(Debug, Default)]
pub(crate) struct Striped {
    stripes: [Padded<[AtomicU64; LANES]>; STRIPES],
}

/// How many counters a [`Striped`] keeps per stripe.
const LANES: usize = 2;

/// Which counter of a [`Striped`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lane {
    /// Calls offered to the breaker.
    Requests = 0,
    /// Successes recorded in the window (neither failed nor slow).
    WindowSuccesses = 1,
}

/// This thread's stripe index (`OWNED_STRIPES` for the shared one) and whether the thread owns it; the shared
/// stripe while the thread is being torn down.
#[inline(always)]
pub(crate) fn this_thread_stripe() -> (usize, bool) {
    SLOT.try_with(|slot| (slot.index, slot.owned))
        .unwrap_or((OWNED_STRIPES, false))
}

/// Adds `value` to a counter of a stripe and returns its previous value: a plain load and store when this thread
/// owns the stripe alone (`owned`, from [`this_thread_stripe`]), `fetch_add` on the shared stripe.
#[inline(always)]
pub(crate) fn add_to_stripe(counter: &AtomicU64, value: u64, owned: bool) -> u64 {
    if owned {
        let previous = counter.load(Ordering::Relaxed);
        counter.store(previous.wrapping_add(value), Ordering::Relaxed);
        previous
    } else {
        counter.fetch_add(value, Ordering::Relaxed)
    }
}

/// How many stripes there are in all: the owned ones and the shared one.
pub(crate) const STRIPES: usize = OWNED_STRIPES + 1;

impl Striped {
    /// Adds one to `lane` and returns this stripe's previous value of it.
    #[inline(always)]
    pub(crate) fn increment(&self, lane: Lane) -> u64 {
        let (index, owned) = this_thread_stripe();
        self.increment_at(index, owned, lane)
    }

    /// [`Striped::increment`] for the thread whose stripe is `index` ([`this_thread_stripe`]).
    #[inline(always)]
    pub(crate) fn increment_at(&self, index: usize, owned: bool, lane: Lane) -> u64 {
        add_to_stripe(&self.stripes[index].0[lane as usize], 1, owned)
    }

    /// The total of `lane`.
    pub(crate) fn sum(&self, lane: Lane) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| stripe.0[lane as usize].load(Ordering::Acquire))
            .sum()
    }
}
