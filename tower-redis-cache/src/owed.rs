//! Invalidations that could not reach Redis, owed until it answers again.
//!
//! An invalidation clears the memory tier at once, but when Redis is down, stalled or behind an open breaker the
//! entries it should delete stay in Redis; a Redis restarted from its snapshot brings them back too. Either way
//! they would be served, stale, as soon as Redis answers. So a failed invalidation is *owed*: while anything is
//! owed this instance reads nothing from Redis (every lookup is a miss answered by the origin, and what the origin
//! answers is stored as usual), and a background task replays the owed invalidations, oldest first, with backoff,
//! until Redis has taken them all. Other instances are told through the invalidation channel once each is replayed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The most invalidations owed at once; past this they collapse into one "everything" (every entry under the
/// cache's prefix is deleted when Redis is back), so memory stays bounded however long Redis is away.
pub(crate) const MAX_OWED: usize = 1_024;

/// The first wait before a replay, doubled after each failed one up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One invalidation, as it is replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owing {
    Keys(Vec<String>),
    Prefix(String),
    Tag(String),
    /// Too many were owed: every entry under the prefix.
    Everything,
}

/// The owed invalidations of one cache.
#[derive(Debug, Default)]
pub(crate) struct Owed {
    queue: Mutex<VecDeque<Owing>>,
    /// How many are owed, read on every lookup without the lock.
    len: AtomicUsize,
    /// Whether a replay task is running (at most one).
    replaying: AtomicBool,
}

impl Owed {
    /// Whether anything is owed (one atomic load).
    pub(crate) fn any(&self) -> bool {
        self.len.load(Ordering::Acquire) > 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Owes `owing`. Returns `true` when the caller should start the replay task (none is running).
    pub(crate) fn push(&self, owing: Owing) -> bool {
        let mut queue = self.lock();
        if queue.front() == Some(&Owing::Everything) {
            // Already owes everything.
        } else if queue.len() >= MAX_OWED || owing == Owing::Everything {
            queue.clear();
            queue.push_back(Owing::Everything);
        } else if !queue.contains(&owing) {
            queue.push_back(owing);
        }
        self.len.store(queue.len(), Ordering::Release);
        !self.replaying.swap(true, Ordering::AcqRel)
    }

    /// The oldest owed invalidation, left in place until [`Owed::paid`].
    pub(crate) fn oldest(&self) -> Option<Owing> {
        self.lock().front().cloned()
    }

    /// `owing` reached Redis: it is no longer owed (unless it was folded into "everything" meanwhile).
    pub(crate) fn paid(&self, owing: &Owing) {
        let mut queue = self.lock();
        if queue.front() == Some(owing) {
            queue.pop_front();
        }
        self.len.store(queue.len(), Ordering::Release);
    }

    /// Ends the replay task when nothing is owed; `false` (keep going) when something was owed meanwhile.
    pub(crate) fn finish(&self) -> bool {
        let queue = self.lock();
        if queue.is_empty() {
            self.replaying.store(false, Ordering::Release);
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Owing>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owed_invalidations_are_paid_oldest_first_and_once() {
        let owed = Owed::default();
        assert!(!owed.any());
        assert!(
            owed.push(Owing::Tag("a".into())),
            "the first starts the replay"
        );
        assert!(
            !owed.push(Owing::Prefix("p".into())),
            "one replay at a time"
        );
        assert!(!owed.push(Owing::Tag("a".into())));
        assert_eq!(owed.len(), 2, "the same invalidation is owed once");
        assert_eq!(owed.oldest(), Some(Owing::Tag("a".into())));
        owed.paid(&Owing::Tag("a".into()));
        assert!(owed.any());
        assert!(!owed.finish(), "still owes the prefix");
        owed.paid(&Owing::Prefix("p".into()));
        assert!(!owed.any());
        assert!(owed.finish());
        assert!(
            owed.push(Owing::Keys(vec!["k".into()])),
            "a new replay after the last one ended"
        );
    }

    #[test]
    fn too_many_owed_fold_into_everything() {
        let owed = Owed::default();
        for n in 0..MAX_OWED {
            owed.push(Owing::Tag(n.to_string()));
        }
        assert_eq!(owed.len(), MAX_OWED);
        owed.push(Owing::Tag("one more".into()));
        assert_eq!(owed.len(), 1);
        assert_eq!(owed.oldest(), Some(Owing::Everything));
        owed.push(Owing::Tag("and another".into()));
        assert_eq!(owed.oldest(), Some(Owing::Everything));
        assert_eq!(owed.len(), 1);
        // Paying something else (folded meanwhile) leaves "everything" owed.
        owed.paid(&Owing::Tag("0".into()));
        assert_eq!(owed.len(), 1);
        owed.paid(&Owing::Everything);
        assert!(!owed.any());
    }
}
