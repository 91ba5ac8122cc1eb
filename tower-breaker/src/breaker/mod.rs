//! The state machine, usable without Tower: [`CircuitBreaker`], [`Permit`] and [`Rejected`].
//!
//! One concern per file, each using only the ones before it: `error` (why a call was refused), `transitions` (the
//! shared state and its transitions), `permit` (one admitted call, reporting into the shared state), `handle` (the
//! public handle over it) and `builder` (the configuration, validated into the shared state behind a handle).

mod builder;
mod error;
mod handle;
mod permit;
mod transitions;

pub use builder::BreakerBuilder;
pub use error::{CallError, RejectReason, Rejected};
pub use handle::CircuitBreaker;
pub use permit::{Outcome, Permit};
pub use transitions::OpeningHook;
pub(crate) use transitions::Shared;
