//! [`Registration`]: keeps one instance registered — heartbeats about every ttl/3 with jitter, re-creates an expired
//! entry, never gives up on Redis errors, reports UP only once the service says it is ready, and deregisters
//! gracefully.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::instance::{Instance, Status};
use crate::registry::Registry;
use crate::stats::{RegistrationCounters, RegistrationStats};

struct Shared {
    status: Mutex<Status>,
    wake: Notify,
    counters: RegistrationCounters,
}

impl Shared {
    fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, status: Status) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
        self.wake.notify_one();
    }
}

/// Keeps an instance registered until [`Registration::deregister`] (or drop, which stops heartbeating and lets the
/// entry expire). Must be created inside a Tokio runtime.
pub struct Registration<R> {
    registry: R,
    instance: Instance,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl<R> std::fmt::Debug for Registration<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.instance.id)
            .field("status", &self.shared.status())
            .finish_non_exhaustive()
    }
}

/// The heartbeat period for a TTL: a third of it, at least 100 ms.
fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// `period` shortened or lengthened at random by up to 10 %, so instances started together do not beat together.
fn jittered(period: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..1.1);
    period.mul_f64(factor)
}

impl<R: Registry> Registration<R> {
    /// Registers `instance` with status `STARTING` and starts heartbeating. Call [`Registration::ready`] when the
    /// service can take traffic. A failure to reach the registry is logged and retried, never returned.
    pub fn start(registry: R, mut instance: Instance) -> Self {
        instance.status = Status::Starting;
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::Starting),
            wake: Notify::new(),
            counters: RegistrationCounters::default(),
        });
        let task = tokio::spawn(heartbeat_loop(
            registry.clone(),
            instance.clone(),
            shared.clone(),
        ));
        Self {
            registry,
            instance,
            shared,
            task: Some(task),
        }
    }

    /// The instance as registered.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The status the heartbeats report.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Heartbeats and failures so far.
    pub fn stats(&self) -> RegistrationStats {
        self.shared
            .counters
            .snapshot(&self.instance.id, self.shared.status())
    }

    /// The service is ready: report `UP` now and from then on.
    pub fn ready(&self) {
        self.shared.set(Status::Up);
    }

    /// Report `status` from now on (for example `DOWN` when a dependency fails).
    pub fn set_status(&self, status: Status) {
        self.shared.set(status);
    }

    /// Graceful shutdown: with `drain`, report `OUT_OF_SERVICE` and wait that long so balancers stop sending new
    /// requests; then stop heartbeating and remove the entry.
    ///
    /// # Errors
    ///
    /// The registry's error when the final removal fails (the entry then expires after its TTL).
    pub async fn deregister(mut self, drain: Option<Duration>) -> Result<(), crate::RegistryError> {
        if let Some(drain) = drain {
            self.shared.set(Status::OutOfService);
            // The heartbeat task writes the new status right away; give it the drain time to be seen.
            tokio::time::sleep(drain).await;
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.registry.deregister(&self.instance).await?;
        // Best effort: watchers that miss it see the change at their next poll.
        let _ = self.registry.announce(&self.instance.name).await;
        Ok(())
    }
}

impl<R> Drop for Registration<R> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn heartbeat_loop<R: Registry>(registry: R, instance: Instance, shared: Arc<Shared>) {
    let period = period(registry.ttl());
    let mut failures: u32 = 0;
    // The first write registers; later ones heartbeat (and re-create the entry if it expired meanwhile).
    let mut registered = false;
    let mut announced: Option<Status> = None;
    loop {
        let status = shared.status();
        let result = if registered {
            registry.heartbeat(&instance, status).await
        } else {
            let mut first = instance.clone();
            first.status = status;
            registry.register(&first).await
        };
        shared.counters.heartbeat(&instance.name, result.is_ok());
        if result.is_ok() && announced != Some(status) {
            // A new instance or a new status: let watchers look now (best effort).
            if registry.announce(&instance.name).await.is_ok() {
                announced = Some(status);
            }
        }
        let wait = match result {
            Ok(()) => {
                registered = true;
                if failures > 0 {
                    tracing::info!(id = %instance.id, "registry reachable again; registration restored");
                }
                failures = 0;
                jittered(period)
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                // Back off from 100 ms, doubling, but never wait longer than a heartbeat period.
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << failures.min(10))
                    .min(period);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(id = %instance.id, %error, failures, "registry heartbeat failed; retrying");
                }
                jittered(backoff)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.wake.notified() => {}
        }
    }
}
