//! [`DiscoveryBuilder`]: a watch's settings, validated, and the start of its polling task.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tower_redis_core::subscription::{Listener, Subscription, SubscriptionConfig};
use tower_redis_core::{ConfigError, Subscriber};

use crate::registry::Registry;
use crate::stats::{WatchCounters, WatchHandle};

use super::Discovery;
use super::filter::Filter;
use super::poll::{WatchOptions, poll_loop};

/// Builds a [`Discovery`]: [`Discovery::builder`], then [`registry`](Self::registry),
/// [`service`](Self::service) and the settings. A builder without a registry can be kept and reused as a preset
/// (it is `Clone`).
#[derive(Clone)]
#[must_use]
pub struct DiscoveryBuilder<R> {
    registry: R,
    service: Option<String>,
    options: WatchOptions,
    preservation_off: bool,
    hints: Option<(Subscriber, String)>,
}

impl<R> fmt::Debug for DiscoveryBuilder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryBuilder")
            .field("service", &self.service)
            .field("options", &self.options)
            .field("hints", &self.hints.as_ref().map(|(_, channel)| channel))
            .finish_non_exhaustive()
    }
}

impl<R> DiscoveryBuilder<R> {
    /// The registry to read (a [`crate::RedisRegistry`], a [`crate::MemoryRegistry`], or your own [`Registry`]).
    pub fn registry<R2: Registry>(self, registry: R2) -> DiscoveryBuilder<R2> {
        DiscoveryBuilder {
            registry,
            service: self.service,
            options: self.options,
            preservation_off: self.preservation_off,
            hints: self.hints,
        }
    }

    /// The service to watch (HazelJS's `name`).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Time between two reads of the registry (default 1 s, ±10 % jitter).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.options.interval = interval;
        self
    }

    /// Which instances to keep (default [`Filter::up`]).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.options.filter = filter;
        self
    }

    /// Self-preservation threshold (default 0.5, in `(0, 1]`): when one read loses more than this fraction of the
    /// serving instances (they are missing from the registry, not merely changed status), or reads the service
    /// empty, the registry is taken to have lost its data and the missing instances are kept (no `Remove`) until
    /// they reappear or the [grace](Self::preservation_grace) ends. Fewer departures are removed at once. `1.0`
    /// preserves only on an empty read.
    pub fn max_departure_fraction(mut self, fraction: f64) -> Self {
        self.options.max_departure_fraction = fraction;
        self
    }

    /// How long a preserved instance is kept when it does not reappear (default twice the registry's TTL,
    /// [`Registry::ttl`]); above zero.
    pub fn preservation_grace(mut self, grace: Duration) -> Self {
        self.options.preservation_grace = Some(grace);
        self
    }

    /// Turns self-preservation off: every departure is removed at once, even a read that finds the service empty.
    pub fn without_self_preservation(mut self) -> Self {
        self.preservation_off = true;
        self
    }

    /// Also listens on `channel` (a [`crate::RedisRegistry::events_channel`]) through `subscriber` for change
    /// hints, so changes arrive within milliseconds instead of at the next poll. If the subscription fails or
    /// drops, polling goes on and the subscription is retried. `subscriber` is a `redis::Client` or, with the
    /// `sentinel` feature, a [`SentinelConnection`](crate::sentinel::SentinelConnection) (the subscription then
    /// follows failovers).
    pub fn hints(mut self, subscriber: impl Into<Subscriber>, channel: impl Into<String>) -> Self {
        self.hints = Some((subscriber.into(), channel.into()));
        self
    }
}

fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("discovery", field, message)
}

impl<R: Registry> DiscoveryBuilder<R> {
    /// Validates and starts watching.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the service is missing or empty, the interval or the grace is zero, the departure
    /// fraction is not in `(0, 1]`, or it is called outside a Tokio runtime (the watch is a background task).
    pub fn build(self) -> Result<Discovery, ConfigError> {
        let service = match self.service {
            Some(service) if !service.is_empty() => service,
            _ => {
                return Err(config_error(
                    "service",
                    "name the service to watch: `.service(\"users\")`",
                ));
            }
        };
        if self.options.interval.is_zero() {
            return Err(config_error("interval", "must be greater than zero"));
        }
        let fraction = self.options.max_departure_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(config_error(
                "max_departure_fraction",
                format!("must be in (0, 1] (1.0 preserves only on an empty read); got {fraction}"),
            ));
        }
        if self.options.preservation_grace == Some(Duration::ZERO) {
            return Err(config_error(
                "preservation_grace",
                "must be greater than zero; to turn self-preservation off, call `.without_self_preservation()`",
            ));
        }
        let mut options = self.options;
        if self.preservation_off {
            options.preservation_grace = Some(Duration::ZERO);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error(
                "runtime",
                "build the discovery inside a Tokio runtime (in `#[tokio::main]` or `Runtime::block_on`): it \
                 polls the registry in a background task",
            )
        })?;
        let handle = WatchHandle {
            counters: Arc::new(WatchCounters::new(&service)),
            service,
        };
        let (sender, changes) = mpsc::unbounded_channel();
        let hint = Arc::new(Notify::new());
        let watch = handle.clone();
        let registry = self.registry;
        let task = match self.hints {
            None => runtime.spawn(poll_loop(registry, watch, options, sender, hint)),
            Some((subscriber, channel)) => {
                let hints = Hints {
                    watch: handle.clone(),
                    hint: hint.clone(),
                };
                runtime.spawn(async move {
                    // Lives as long as the polling task.
                    let _listener = Subscription::spawn(
                        subscriber,
                        vec![channel],
                        SubscriptionConfig::default(),
                        hints,
                    )
                    .inspect_err(|error| {
                        tracing::warn!(%error, "discovery: no change hints; polling only");
                    });
                    poll_loop(registry, watch, options, sender, hint).await;
                })
            }
        };
        Ok(Discovery {
            changes,
            task,
            handle,
        })
    }
}

impl Discovery {
    /// A builder with the defaults: a read every second (±10 % jitter), `UP` instances only, self-preservation
    /// past half the serving instances for twice the registry's TTL, no change hints.
    ///
    /// ```no_run
    /// # async fn demo(registry: tower_redis_discovery::MemoryRegistry) -> Result<(), tower_redis_discovery::ConfigError> {
    /// use std::time::Duration;
    /// use tower_redis_discovery::Discovery;
    ///
    /// let users = Discovery::builder()
    ///     .registry(registry)
    ///     .service("users")
    ///     .interval(Duration::from_millis(500))
    ///     .build()?;
    /// # let _ = users; Ok(()) }
    /// ```
    pub fn builder() -> DiscoveryBuilder<()> {
        DiscoveryBuilder {
            registry: (),
            service: None,
            options: WatchOptions::default(),
            preservation_off: false,
            hints: None,
        }
    }
}

/// What the hint subscription does: wake the poller when its service is named.
struct Hints {
    watch: WatchHandle,
    hint: Arc<Notify>,
}

impl Listener for Hints {
    fn subscribed(
        &mut self,
        _client: &redis::Client,
    ) -> impl std::future::Future<Output = ()> + Send {
        // Read once now: anything announced while we were not subscribed.
        self.hint.notify_one();
        std::future::ready(())
    }

    fn message(&mut self, message: &redis::Msg) {
        if message.get_payload_bytes() == self.watch.service.as_bytes() {
            self.watch.counters.hint();
            self.hint.notify_one();
        }
    }
}
