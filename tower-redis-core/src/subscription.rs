//! One pub/sub subscription loop for the whole workspace.
//!
//! Cache invalidations, discovery's change hints and shared breaker openings all hold a subscription that must
//! survive Redis going away, failing over or going quiet. [`Subscription::spawn`] runs that loop once, for a
//! [`Listener`]:
//!
//! - it connects through a [`Subscriber`] (a fixed server, or with Sentinel the primary the sentinels name *now*,
//!   so a failover is followed) and subscribes to the channels, within [`SubscriptionConfig::connect_timeout`];
//! - after every (re)subscription it calls [`Listener::subscribed`], where the listener catches up on what it may
//!   have missed while it was not subscribed;
//! - it sends a `PING` on the subscription every [`SubscriptionConfig::ping_every`]; a `PING` not answered within
//!   [`SubscriptionConfig::ping_timeout`] means the connection is silent (half-open, stalled): it is dropped and
//!   a new one is made, since a dead subscription otherwise looks exactly like a quiet channel;
//! - when the connection ends it calls [`Listener::lost`] and resubscribes with exponential backoff and jitter,
//!   from [`SubscriptionConfig::min_backoff`] to [`SubscriptionConfig::max_backoff`].
//!
//! Dropping the [`Subscription`] stops the loop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use tokio::task::JoinHandle;

use crate::{ConfigError, Subscriber};

/// What a [`Subscription`] does with what it receives.
pub trait Listener: Send + 'static {
    /// Called after each successful (re)subscription, before any message of it: catch up on anything missed
    /// while not subscribed (read a key, clear a local tier, poll once). `client` reaches the server subscribed
    /// to. The default does nothing.
    fn subscribed(&mut self, client: &redis::Client) -> impl Future<Output = ()> + Send {
        let _ = client;
        async {}
    }

    /// One message, on one of the channels.
    fn message(&mut self, message: &redis::Msg);

    /// The subscription ended (the connection closed, or a `PING` went unanswered); a new one follows after a
    /// backoff. The default does nothing.
    fn lost(&mut self) {}
}

/// How a [`Subscription`] connects and watches its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct SubscriptionConfig {
    /// The deadline for connecting and subscribing. Default 2 s.
    pub connect_timeout: Duration,
    /// How often a `PING` checks that the subscription is alive. Default 5 s.
    pub ping_every: Duration,
    /// How long a `PING` may go unanswered. Default 2 s.
    pub ping_timeout: Duration,
    /// The first wait before resubscribing. Default 100 ms.
    pub min_backoff: Duration,
    /// The longest wait before resubscribing. Default 5 s.
    pub max_backoff: Duration,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            ping_every: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(2),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl SubscriptionConfig {
    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ping_every`](Self::ping_every) and [`ping_timeout`](Self::ping_timeout).
    pub fn ping(mut self, every: Duration, timeout: Duration) -> Self {
        self.ping_every = every;
        self.ping_timeout = timeout;
        self
    }

    /// Sets [`min_backoff`](Self::min_backoff) and [`max_backoff`](Self::max_backoff).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// Checks the values.
    ///
    /// # Errors
    ///
    /// When a duration is zero or `min_backoff > max_backoff`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let error = |field, message: &str| {
            Err(ConfigError::in_component(
                "subscription",
                field,
                message.to_owned(),
            ))
        };
        if self.connect_timeout.is_zero() {
            return error("connect_timeout", "must be greater than zero");
        }
        if self.ping_every.is_zero() || self.ping_timeout.is_zero() {
            return error(
                "ping",
                "the interval and the timeout must be greater than zero",
            );
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return error(
                "backoff",
                "min_backoff must be greater than zero and at most max_backoff",
            );
        }
        Ok(())
    }
}

/// Counters of a [`Subscription`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Whether the subscription is up now.
    pub connected: bool,
    /// Successful (re)subscriptions.
    pub subscriptions: u64,
    /// Messages received.
    pub messages: u64,
    /// Subscriptions dropped because a `PING` went unanswered.
    pub silent: u64,
    /// Failed attempts to connect or subscribe, and subscriptions that ended.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connected: AtomicBool,
    subscriptions: AtomicU64,
    messages: AtomicU64,
    silent: AtomicU64,
    errors: AtomicU64,
}

/// A running subscription; dropping it stops it. See the [module docs](self).
#[derive(Debug)]
pub struct Subscription {
    task: JoinHandle<()>,
    counters: Arc<Counters>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// Subscribes to `channels` through `subscriber` and feeds `listener`, until dropped.
    ///
    /// # Errors
    ///
    /// When `config` is invalid, or there is no Tokio runtime to run on.
    pub fn spawn<L: Listener>(
        subscriber: impl Into<Subscriber>,
        channels: Vec<String>,
        config: SubscriptionConfig,
        listener: L,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ConfigError::in_component(
                "subscription",
                "runtime",
                "needs a Tokio runtime: start it from inside one (for example in `#[tokio::main]`)",
            )
        })?;
        let counters = Arc::new(Counters::default());
        let task = runtime.spawn(run(
            subscriber.into(),
            channels,
            config,
            listener,
            counters.clone(),
        ));
        Ok(Self { task, counters })
    }

    /// The counters.
    pub fn stats(&self) -> SubscriptionStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SubscriptionStats {
            connected: self.counters.connected.load(Ordering::Acquire),
            subscriptions: load(&self.counters.subscriptions),
            messages: load(&self.counters.messages),
            silent: load(&self.counters.silent),
            errors: load(&self.counters.errors),
        }
    }
}

async fn run<L: Listener>(
    subscriber: Subscriber,
    channels: Vec<String>,
    config: SubscriptionConfig,
    mut listener: L,
    counters: Arc<Counters>,
) {
    let mut backoff = config.min_backoff;
    loop {
        let subscribed = tokio::time::timeout(config.connect_timeout, async {
            let client = subscriber.client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in &channels {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>((client, pubsub))
        })
        .await;
        let (client, pubsub) = match subscribed {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(error)) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, ?channels, "cannot subscribe; retrying");
                backoff = wait(backoff, &config).await;
                continue;
            }
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?channels, "subscribing timed out; retrying");
                backoff = wait(backoff, &config).await;
                continue;
            }
        };
        backoff = config.min_backoff;
        counters.subscriptions.fetch_add(1, Ordering::Relaxed);
        counters.connected.store(true, Ordering::Release);
        tracing::debug!(?channels, "subscribed");
        listener.subscribed(&client).await;
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(config.ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!(?channels, "the subscription's connection closed; resubscribing");
                        break;
                    };
                    counters.messages.fetch_add(1, Ordering::Relaxed);
                    listener.message(&message);
                }
                _ = ping.tick() => {
                    let answered =
                        tokio::time::timeout(config.ping_timeout, sink.ping::<Value>()).await;
                    if !matches!(answered, Ok(Ok(_))) {
                        counters.silent.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            ?channels,
                            timeout_ms = config.ping_timeout.as_millis(),
                            "the subscription did not answer a PING (half-open or stalled); resubscribing"
                        );
                        break;
                    }
                }
            }
        }
        counters.connected.store(false, Ordering::Release);
        counters.errors.fetch_add(1, Ordering::Relaxed);
        listener.lost();
        backoff = wait(backoff, &config).await;
    }
}

/// Sleeps `backoff` with jitter; returns the next backoff.
async fn wait(backoff: Duration, config: &SubscriptionConfig) -> Duration {
    tokio::time::sleep(backoff.mul_f64(rand::random_range(0.75..1.25))).await;
    (backoff * 2).min(config.max_backoff)
}
