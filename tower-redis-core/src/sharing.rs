//! Breaker openings shared across processes through Redis.
//!
//! When a breaker opens by itself, it publishes the opening on a Redis channel and stores it in a key that expires
//! when the open period ends. Every other process sharing the breaker's name opens its own breaker until the same
//! moment: at once through pub/sub, or on (re)connecting through the key. Nothing on the request path touches Redis:
//! the transition hands the opening to a background task through a bounded channel, and whenever Redis is slow or
//! gone each process simply keeps working on its local breaker.
//!
//! | key or channel | type | written | TTL |
//! |---|---|---|---|
//! | `{prefix}{name}:openings` | pub/sub channel | on each local opening | n/a |
//! | `{prefix}{name}:open` | string (JSON) | on each local opening | the open duration |
//!
//! The default prefix is `tower-breaker:`; give each service its own (for example `orders:breaker:`) when several
//! share one Redis. Payloads are `{"origin":"<process id>","open_for_ms":<n>}`; a payload that does not decode (or is
//! longer than 1 KiB) is ignored, logged once, and a remote opening lasts at most [`SharingBuilder::max_open`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_breaker::CircuitBreaker;
//! use tower_redis_core::sharing::RedisSharing;
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let publisher = client.get_connection_manager().await?;
//! let breaker = CircuitBreaker::builder().name("payments").build()?;
//! let sharing = RedisSharing::builder()
//!     .breaker(&breaker)
//!     .redis(publisher)
//!     .subscribe(client)
//!     .prefix("shop:breaker:")
//!     .build()?;
//! // ... keep `sharing` alive as long as the breaker should share its openings.
//! # drop(sharing); Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower_breaker::CircuitBreaker;

use crate::ConfigError;
use crate::pubsub::Subscriber;
use crate::subscription::{Listener, Subscription, SubscriptionConfig};

/// How many openings may wait to be published; more are dropped (a breaker that opens that often has already
/// told its peers).
const QUEUE: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
struct Opening {
    origin: String,
    open_for_ms: u64,
}

/// Builds a [`RedisSharing`]: [`RedisSharing::builder`], then the breaker, the connection, the subscriber and the
/// settings. See the [module docs](self).
#[must_use]
pub struct SharingBuilder<C> {
    connection: C,
    settings: SharingSettings,
}

/// Everything but the connection, carried over as is when [`SharingBuilder::redis`] changes its type.
struct SharingSettings {
    breaker: Option<CircuitBreaker>,
    subscriber: Option<Subscriber>,
    prefix: String,
    redis_timeout: Duration,
    max_reconnect_delay: Duration,
    max_open: Duration,
}

impl<C> std::fmt::Debug for SharingBuilder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharingBuilder")
            .field(
                "breaker",
                &self.settings.breaker.as_ref().map(CircuitBreaker::name),
            )
            .field("prefix", &self.settings.prefix)
            .field("redis_timeout", &self.settings.redis_timeout)
            .field("max_reconnect_delay", &self.settings.max_reconnect_delay)
            .field("max_open", &self.settings.max_open)
            .finish_non_exhaustive()
    }
}

/// Counters of a running [`RedisSharing`].
#[derive(Debug, Default)]
struct Status {
    connected: AtomicBool,
    published: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of the sharing's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct SharingStats {
    /// Whether the subscription is up right now.
    pub connected: bool,
    /// Local openings published.
    pub published: u64,
    /// Openings received from other processes and applied.
    pub received: u64,
    /// Redis errors and timeouts (each one left the breaker working locally).
    pub errors: u64,
}

/// A breaker's openings shared through Redis, running: built by [`RedisSharing::builder`]. Dropping it stops the
/// sharing (the breaker then works locally only).
#[derive(Debug)]
pub struct RedisSharing {
    status: Arc<Status>,
    publisher: JoinHandle<()>,
    _subscription: Subscription,
    breaker: CircuitBreaker,
}

impl RedisSharing {
    /// A builder with the defaults: prefix `tower-breaker:`, 250 ms per Redis command, reconnecting with backoff up
    /// to 2 s, remote openings of at most 1 h. It needs a breaker ([`breaker`](SharingBuilder::breaker)), a
    /// connection ([`redis`](SharingBuilder::redis)) and a subscriber ([`subscribe`](SharingBuilder::subscribe)).
    pub fn builder() -> SharingBuilder<()> {
        SharingBuilder {
            connection: (),
            settings: SharingSettings {
                breaker: None,
                subscriber: None,
                prefix: "tower-breaker:".to_owned(),
                redis_timeout: Duration::from_millis(250),
                max_reconnect_delay: Duration::from_secs(2),
                max_open: Duration::from_secs(3600),
            },
        }
    }

    /// Health and counters.
    pub fn stats(&self) -> SharingStats {
        SharingStats {
            connected: self.status.connected.load(Ordering::Acquire),
            published: self.status.published.load(Ordering::Relaxed),
            received: self.status.received.load(Ordering::Relaxed),
            errors: self.status.errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RedisSharing {
    fn drop(&mut self) {
        self.breaker.set_opening_hook(None);
        self.publisher.abort();
    }
}

fn origin_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("sharing", field, message)
}

impl<C> SharingBuilder<C> {
    /// The breaker whose openings are shared (its name names the key and the channel).
    pub fn breaker(mut self, breaker: &CircuitBreaker) -> Self {
        self.settings.breaker = Some(breaker.clone());
        self
    }

    /// The connection that publishes and stores this process's openings (any connection: a `ConnectionManager`, a
    /// cluster connection, a `HealingConnection`, ...).
    pub fn redis<C2>(self, connection: C2) -> SharingBuilder<C2>
    where
        C2: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        SharingBuilder {
            connection,
            settings: self.settings,
        }
    }

    /// Where the dedicated pub/sub connection connects: a `redis::Client`, or with the `sentinel` feature a
    /// `SentinelConnection`, whose subscription follows failovers (see [`crate::pubsub`]). The subscription is a
    /// [`Subscription`]: resubscribed with backoff and jitter, and checked with a `PING` so that a silent
    /// (half-open) one is replaced.
    pub fn subscribe(mut self, subscriber: impl Into<Subscriber>) -> Self {
        self.settings.subscriber = Some(subscriber.into());
        self
    }

    /// The key and channel prefix (namespace), for example `orders:breaker:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// The deadline of each Redis command (publishing, reading the key, subscribing); default 250 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// The longest wait between two attempts to re-subscribe after Redis went away.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.settings.max_reconnect_delay = delay;
        self
    }

    /// The longest a remote opening may keep this breaker open (default 1 h); a longer one, from a peer's long
    /// backoff or from a payload written by hand, is cut to this.
    pub fn max_open(mut self, max: Duration) -> Self {
        self.settings.max_open = max;
        self
    }
}

impl<C> SharingBuilder<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Validates, then starts sharing the breaker's openings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the breaker or the subscriber is missing, a duration is zero, or there is no Tokio
    /// runtime to run on.
    pub fn build(self) -> Result<RedisSharing, ConfigError> {
        let Some(breaker) = self.settings.breaker else {
            return Err(config_error(
                "breaker",
                "give the breaker whose openings to share: `.breaker(&breaker)`",
            ));
        };
        let Some(subscriber) = self.settings.subscriber else {
            return Err(config_error(
                "subscribe",
                "give where openings are received from: `.subscribe(client)` (a redis::Client or a \
                 SentinelConnection)",
            ));
        };
        for (field, value) in [
            ("redis_timeout", self.settings.redis_timeout),
            ("max_reconnect_delay", self.settings.max_reconnect_delay),
            ("max_open", self.settings.max_open),
        ] {
            if value.is_zero() {
                return Err(config_error(field, "must be greater than zero"));
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error(
                "runtime",
                "needs a Tokio runtime: build it from inside one (for example in `#[tokio::main]`)",
            )
        })?;
        let status = Arc::new(Status::default());
        let origin = origin_id();
        let name = breaker.name().to_owned();
        let channel = format!("{}{name}:openings", self.settings.prefix);
        let key = format!("{}{name}:open", self.settings.prefix);
        let min_backoff = Duration::from_millis(50).min(self.settings.max_reconnect_delay);
        let subscription = Subscription::spawn(
            subscriber,
            vec![channel.clone()],
            SubscriptionConfig::default()
                .connect_timeout(self.settings.redis_timeout * 4)
                .backoff(min_backoff, self.settings.max_reconnect_delay),
            Follower {
                breaker: breaker.clone(),
                key: key.clone(),
                origin: origin.clone(),
                timeout: self.settings.redis_timeout,
                max_open: self.settings.max_open,
                status: status.clone(),
                warned_undecodable: false,
            },
        )?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        breaker.set_opening_hook(Some(Arc::new(move |open_for: Duration| {
            // Never waits: a full queue drops the opening (a breaker that opens that often has told its peers).
            let _ = sender.try_send(u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX));
        })));
        let publisher = runtime.spawn(publish_openings(
            receiver,
            self.connection,
            PublishTarget {
                channel,
                key,
                origin,
                timeout: self.settings.redis_timeout,
            },
            status.clone(),
        ));
        Ok(RedisSharing {
            status,
            publisher,
            _subscription: subscription,
            breaker,
        })
    }
}

struct PublishTarget {
    channel: String,
    key: String,
    origin: String,
    timeout: Duration,
}

async fn publish_openings<C>(
    mut openings: mpsc::Receiver<u64>,
    mut connection: C,
    target: PublishTarget,
    status: Arc<Status>,
) where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    while let Some(open_for_ms) = openings.recv().await {
        let opening = Opening {
            origin: target.origin.clone(),
            open_for_ms,
        };
        let Ok(payload) = serde_json::to_string(&opening) else {
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&target.key)
            .arg(&payload)
            .arg("PX")
            .arg(open_for_ms.max(1))
            .ignore()
            .cmd("PUBLISH")
            .arg(&target.channel)
            .arg(&payload)
            .ignore();
        match tokio::time::timeout(target.timeout, pipe.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => {
                status.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, channel = %target.channel, "could not publish a breaker opening; peers keep their own state");
            }
            Err(_) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel = %target.channel, timeout_ms = target.timeout.as_millis(), "publishing a breaker opening timed out");
            }
        }
    }
}

/// The longest payload read from the channel or the key; an opening is about 60 bytes, so anything longer is not
/// one of ours.
const MAX_PAYLOAD: usize = 1024;

/// Decodes an opening; `None` for anything that is not one (too long, not JSON, wrong fields).
fn decode(payload: &[u8]) -> Option<Opening> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    serde_json::from_slice(payload).ok()
}

/// Follows the other processes' openings: one [`Subscription`] to the channel, which catches up on the key after
/// each (re)subscription.
struct Follower {
    breaker: CircuitBreaker,
    key: String,
    origin: String,
    timeout: Duration,
    max_open: Duration,
    status: Arc<Status>,
    warned_undecodable: bool,
}

impl Follower {
    fn apply(&self, open_for: Duration) {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        self.breaker.open_remotely(open_for.min(self.max_open));
    }

    fn undecodable(&mut self) {
        if !self.warned_undecodable {
            self.warned_undecodable = true;
            tracing::warn!(key = %self.key, "ignoring a breaker opening that does not decode (logged once)");
        }
    }
}

impl Listener for Follower {
    /// An opening published while this process was away is still in the key, with the time it has left.
    async fn subscribed(&mut self, client: &redis::Client) {
        self.status.connected.store(true, Ordering::Release);
        let read = tokio::time::timeout(self.timeout * 4, async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::pipe()
                .cmd("GET")
                .arg(&self.key)
                .cmd("PTTL")
                .arg(&self.key)
                .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                .await
        })
        .await;
        match read {
            Ok(Ok((Some(payload), left_ms))) if left_ms > 0 => match decode(&payload) {
                Some(opening) if opening.origin != self.origin => {
                    self.apply(Duration::from_millis(left_ms.unsigned_abs()));
                }
                Some(_) => {}
                None => self.undecodable(),
            },
            Ok(Ok(_)) => {}
            _ => {
                self.status.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn message(&mut self, message: &redis::Msg) {
        match decode(message.get_payload_bytes()) {
            Some(opening) if opening.origin != self.origin => {
                self.apply(Duration::from_millis(opening.open_for_ms));
            }
            Some(_) => {}
            None => self.undecodable(),
        }
    }

    fn lost(&mut self) {
        self.status.connected.store(false, Ordering::Release);
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(key = %self.key, "breaker sharing: subscription lost; working locally until Redis is back");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn an_opening_decodes() {
        let opening = decode(br#"{"origin":"1-a","open_for_ms":5000}"#);
        assert!(
            matches!(opening, Some(Opening { ref origin, open_for_ms: 5000 }) if origin == "1-a")
        );
    }

    #[test]
    fn what_is_not_an_opening_does_not_decode() {
        for payload in [
            &b""[..],
            b"{}",
            br#"{"origin":"1-a"}"#,
            br#"{"origin":"1-a","open_for_ms":-1}"#,
            br#"{"origin":"1-a","open_for_ms":1e30}"#,
            br#"{"origin":7,"open_for_ms":1}"#,
            b"\xff\xfe",
        ] {
            assert!(decode(payload).is_none(), "{payload:?}");
        }
        let long = format!(
            r#"{{"origin":"{}","open_for_ms":1}}"#,
            "x".repeat(MAX_PAYLOAD)
        );
        assert!(decode(long.as_bytes()).is_none());
    }

    proptest! {
        #[test]
        fn any_payload_decodes_or_not_without_panicking(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&payload);
        }

        #[test]
        fn any_duration_is_a_bounded_opening(open_for_ms in any::<u64>(), origin in "[ -~]{0,40}") {
            let payload = serde_json::to_vec(&Opening { origin: origin.clone(), open_for_ms }).unwrap_or_default();
            let opening = decode(&payload);
            prop_assert!(opening.is_some_and(|o| o.open_for_ms == open_for_ms && o.origin == origin));
        }
    }
}
