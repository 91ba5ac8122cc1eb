//! Discovery: a stream of `tower::discover::Change`s for one service, from polling a [`Registry`](crate::Registry).
//!
//! A background task reads the service's instances every `interval` (±10 % jitter), keeps those that pass the
//! [`Filter`] (status `UP` by default, like HazelJS's strategies), and sends the difference with the previous set:
//! `Insert(id, instance)` for a new instance or a changed one (when host, port or protocol change, a `Remove` comes
//! first), `Remove(id)` for one that left. A registry error keeps the last good set: the stream never yields an
//! error, because an error from a `Discover` poisons `tower::balance` (and every caller behind its `Buffer`).
//!
//! Self-preservation (as Eureka's, or Envoy's panic threshold): a read that finds the service empty, or that misses
//! more than [`DiscoveryBuilder::max_departure_fraction`] of the serving instances at once, is taken as a registry that
//! lost its data (a restart without persistence, a `FLUSHALL`, a partition that let every entry expire), not as a
//! mass departure. The missing instances stay (no `Remove`) until they reappear or the grace period ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower::discover::Change;

use crate::instance::Instance;
use crate::stats::WatchHandle;

mod builder;
mod filter;
mod poll;
mod reconcile;

pub use builder::DiscoveryBuilder;
pub use filter::Filter;

/// A `tower::discover::Discover` of a service's instances (a stream of `Change<String, Instance>` that never
/// fails). Map the instances to services (`Change::Insert(id, make_client(instance))`) to feed a balancer. Dropping
/// it stops the polling task.
#[derive(Debug)]
pub struct Discovery {
    changes: mpsc::UnboundedReceiver<Change<String, Instance>>,
    task: JoinHandle<()>,
    handle: WatchHandle,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Discovery {
    type Item = Result<Change<String, Instance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.changes.poll_recv(cx) {
            Poll::Ready(Some(change)) => Poll::Ready(Some(Ok(change))),
            // The task only ends when the stream is dropped; a closed channel is a stream that has no more news,
            // which tower's balancer treats like an idle source.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Discovery {
    /// A handle on this watch's counters, usable after the stream has moved into a balancer.
    pub fn handle(&self) -> WatchHandle {
        self.handle.clone()
    }
}
