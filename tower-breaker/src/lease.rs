//! How handles and permits reach a breaker's shared state, and the references that keep it alive.
//!
//! A permit must keep the state alive, so it holds a counted reference. Were it a clone of one `Arc<Shared>`, every
//! call on every core would write that one reference count, and its cache line would move between cores on each
//! call (measured: a quarter of the throughput of 8 tasks on 2 cores). So each thread's permits clone a lease of the
//! thread's own (an `Arc` to a reference of its own to the state, made on the thread's first call), and a finished
//! permit leaves its lease in a small per-thread spare list, from which the thread's next permit takes it back: in
//! the steady state a call touches no reference count at all. A lease is the only thing that keeps the state alive
//! beyond its handles; when the last handle goes, the leases are marked retired and are dropped, not kept, by the
//! permits that still hold them.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::breaker::Shared;
use crate::padded::STRIPES;

/// How a handle reaches the shared state: counted (dropped with the last handle and the last permit), or leaked for
/// the life of the process, so handles and permits are copied without touching a reference count.
#[derive(Clone)]
pub(crate) enum Handle {
    Counted(Arc<Counted>),
    Static(&'static Shared),
}

/// A counted breaker's state, and one lease of it per thread stripe.
// Aligned so that the reference count of this allocation (written by every clone of the handle) has a cache line of
// its own, away from the fields every call reads.
#[repr(align(128))]
pub(crate) struct Counted {
    shared: Arc<Shared>,
    leases: [OnceLock<Arc<Lease>>; STRIPES],
}

/// One thread's reference to a counted breaker's state. Aligned so that its reference count has a cache line of
/// its own.
#[repr(align(128))]
pub(crate) struct Lease {
    shared: Arc<Shared>,
    /// Set when the last handle is dropped: the lease is no longer kept in spare lists.
    retired: AtomicBool,
}

impl Handle {
    pub(crate) fn counted(shared: Shared) -> Self {
        Self::Counted(Arc::new(Counted {
            shared: Arc::new(shared),
            leases: std::array::from_fn(|_| OnceLock::new()),
        }))
    }

    /// A reference to the state for a permit made on the thread of `stripe`.
    #[inline(always)]
    pub(crate) fn lease(&self, stripe: usize) -> SharedRef {
        match self {
            Self::Static(shared) => SharedRef::Static(shared),
            Self::Counted(counted) => SharedRef::Leased(
                take_spare(&counted.shared).unwrap_or_else(|| counted.new_lease(stripe)),
            ),
        }
    }
}

impl Counted {
    #[inline(never)]
    fn new_lease(&self, stripe: usize) -> Arc<Lease> {
        Arc::clone(self.leases[stripe].get_or_init(|| {
            Arc::new(Lease {
                shared: Arc::clone(&self.shared),
                retired: AtomicBool::new(false),
            })
        }))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        for lease in self.leases.iter().filter_map(OnceLock::get) {
            lease.retired.store(true, Ordering::Relaxed);
        }
        // This thread's spare list lets go of them (and of any other retired lease) now; other threads' lists do
        // when they next fill up or see a breaker dropped.
        let _ = SPARE_LEASES.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut() {
                spare.retain(|(_, lease)| !lease.retired.load(Ordering::Relaxed));
            }
        });
    }
}

impl std::ops::Deref for Handle {
    type Target = Shared;

    #[inline]
    fn deref(&self) -> &Shared {
        match self {
            Self::Counted(counted) => &counted.shared,
            Self::Static(shared) => shared,
        }
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// What a permit (and a running fallback) holds to reach the state: a lease, or the leaked state.
#[derive(Clone)]
pub(crate) enum SharedRef {
    Leased(Arc<Lease>),
    Static(&'static Shared),
}

impl SharedRef {
    /// Lets go of the reference, keeping a lease in this thread's spare list for the next permit.
    #[inline]
    pub(crate) fn release(self) {
        if let Self::Leased(lease) = self {
            keep_spare(lease);
        }
    }
}

impl std::ops::Deref for SharedRef {
    type Target = Shared;

    #[inline]
    fn deref(&self) -> &Shared {
        match self {
            Self::Leased(lease) => &lease.shared,
            Self::Static(shared) => shared,
        }
    }
}

impl fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// How many finished permits' leases a thread keeps, of every breaker together.
const SPARE_LEASES_PER_THREAD: usize = 8;

thread_local! {
    /// Leases that permits finished on this thread left behind, for the thread's next permits of the same breakers.
    /// A retired breaker's leases linger here until the list fills up or a breaker is dropped on this thread (at
    /// most `SPARE_LEASES_PER_THREAD` per thread, freed at the latest when the thread ends).
    /// Each lease is kept with the address of its state, so a lookup compares addresses without reading the leases.
    static SPARE_LEASES: RefCell<Vec<(usize, Arc<Lease>)>> = const { RefCell::new(Vec::new()) };
}

#[inline]
fn take_spare(shared: &Arc<Shared>) -> Option<Arc<Lease>> {
    SPARE_LEASES
        .try_with(|spare| {
            let mut spare = spare.try_borrow_mut().ok()?;
            let address = Arc::as_ptr(shared).addr();
            let index = spare.iter().rposition(|(kept, _)| *kept == address)?;
            Some(spare.swap_remove(index).1)
        })
        .ok()
        .flatten()
}

#[inline]
fn keep_spare(lease: Arc<Lease>) {
    if lease.retired.load(Ordering::Relaxed) {
        return;
    }
    // A lease that is not kept is dropped at the end of the closure (or with it, when the thread is being torn down).
    let _ = SPARE_LEASES.try_with(move |spare| {
        let Ok(mut spare) = spare.try_borrow_mut() else {
            return;
        };
        if spare.len() >= SPARE_LEASES_PER_THREAD {
            spare.retain(|(_, lease)| !lease.retired.load(Ordering::Relaxed));
        }
        if spare.len() < SPARE_LEASES_PER_THREAD {
            spare.push((Arc::as_ptr(&lease.shared).addr(), lease));
        }
    });
}
