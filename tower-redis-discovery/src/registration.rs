//! [`Registration`]: keeps one instance registered — heartbeats about every ttl/3 with jitter, re-creates an expired
//! entry, never gives up on Redis errors, reports UP only once the service says it is ready, and deregisters
//! gracefully.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use tower_redis_core::ConfigError;

use crate::instance::{Instance, Status};
use crate::registry::{Heartbeat, Registry};
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

/// The wait before retrying after `failures` failed writes in a row (at least 1): 100 ms, doubling, ±10 % jitter,
/// never longer than a heartbeat `period`.
fn retry_delay(failures: u32, period: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    jittered(Duration::from_millis(100).saturating_mul(1 << exponent)).min(period)
}

impl<R: Registry> Registration<R> {
    /// Registers `instance` with status `STARTING` and starts heartbeating. Call [`Registration::ready`] when the
    /// service can take traffic. A failure to reach the registry is logged and retried, never returned.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] outside a Tokio runtime (the heartbeats are a background task), or when the registry's TTL is
    /// zero.
    pub fn start(registry: R, mut instance: Instance) -> Result<Self, ConfigError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::in_component(
                "registration",
                "runtime",
                "start the registration inside a Tokio runtime (in `#[tokio::main]` or `Runtime::block_on`): it \
                 heartbeats in a background task",
            )
        })?;
        if registry.ttl().is_zero() {
            return Err(ConfigError::in_component(
                "registration",
                "ttl",
                "the registry's TTL must be above zero: heartbeats go every third of it",
            ));
        }
        instance.status = Status::Starting;
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::Starting),
            wake: Notify::new(),
            counters: RegistrationCounters::new(&instance.name),
        });
        let task = runtime.spawn(heartbeat_loop(
            registry.clone(),
            instance.clone(),
            shared.clone(),
        ));
        Ok(Self {
            registry,
            instance,
            shared,
            task: Some(task),
        })
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
            registry
                .register(&first)
                .await
                .map(|()| Heartbeat::Refreshed)
        };
        shared.counters.heartbeat(result.is_ok());
        match result {
            Ok(Heartbeat::Recreated) => {
                tracing::info!(id = %instance.id, "the registry had lost this entry; re-created it");
                shared.counters.recreated();
                // Watchers that keep it only by self-preservation: tell them to look now.
                announced = None;
            }
            Ok(Heartbeat::Healed) => {
                shared.counters.healed();
                // Watchers may be routing to a forged address: tell them to look now.
                announced = None;
            }
            _ => {}
        }
        if result.is_ok() && announced != Some(status) {
            // A new instance or a new status: let watchers look now (best effort).
            if registry.announce(&instance.name).await.is_ok() {
                announced = Some(status);
            }
        }
        let wait = match result {
            Ok(_) => {
                registered = true;
                if failures > 0 {
                    tracing::info!(id = %instance.id, "registry reachable again; registration restored");
                }
                failures = 0;
                jittered(period)
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(id = %instance.id, %error, failures, "registry heartbeat failed; retrying");
                }
                retry_delay(failures, period)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(delay: Duration, millis: u64) -> bool {
        let expected = Duration::from_millis(millis);
        delay >= expected.mul_f64(0.9) && delay <= expected.mul_f64(1.1)
    }

    #[test]
    fn the_first_retry_after_a_failed_heartbeat_comes_after_about_100_ms() {
        let period = Duration::from_secs(30);
        for _ in 0..100 {
            let delay = retry_delay(1, period);
            assert!(within(delay, 100), "{delay:?}");
        }
    }

    #[test]
    fn retries_double_with_jitter() {
        let period = Duration::from_secs(30);
        for (failures, millis) in [(2, 200), (3, 400), (4, 800), (8, 12_800)] {
            let delay = retry_delay(failures, period);
            assert!(
                within(delay, millis),
                "after {failures} failures: {delay:?}"
            );
        }
    }

    #[test]
    fn retries_never_wait_longer_than_a_heartbeat_period() {
        let period = Duration::from_secs(1);
        for failures in [5, 6, 20, u32::MAX] {
            assert!(retry_delay(failures, period) <= period);
        }
        assert_eq!(retry_delay(5, period), period, "1.6 s ± 10 %, capped");
    }
}
