//! Openings shared across processes through Redis (feature `redis`).
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
//! share one Redis. Payloads are `{"origin":"<process id>","open_for_ms":<n>}`; a payload that does not decode is
//! ignored.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_breaker::CircuitBreaker;
//! use tower_breaker::redis::RedisSharing;
//!
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let publisher = client.get_connection_manager().await?;
//! let breaker = CircuitBreaker::builder().name("payments").build()?;
//! let sharing = RedisSharing::new().prefix("shop:breaker:").start(&breaker, publisher, client);
//! // ... keep `sharing` alive as long as the breaker should share its openings.
//! # drop(sharing); Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::breaker::CircuitBreaker;
use crate::pubsub::Subscriber;

/// How many openings may wait to be published; more are dropped (a breaker that opens that often has already
/// told its peers).
const QUEUE: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
struct Opening {
    origin: String,
    open_for_ms: u64,
}

/// Configures sharing a breaker's openings through Redis. See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisSharing {
    prefix: String,
    command_timeout: Duration,
    max_reconnect_delay: Duration,
}

impl Default for RedisSharing {
    fn default() -> Self {
        Self {
            prefix: "tower-breaker:".to_owned(),
            command_timeout: Duration::from_millis(250),
            max_reconnect_delay: Duration::from_secs(2),
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Keeps the sharing running; dropping it stops it (the breaker then works locally only).
#[derive(Debug)]
pub struct SharingHandle {
    status: Arc<Status>,
    tasks: Vec<JoinHandle<()>>,
    breaker: CircuitBreaker,
}

impl SharingHandle {
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

impl Drop for SharingHandle {
    fn drop(&mut self) {
        self.breaker.shared.set_opening_sink(None);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn origin_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

impl RedisSharing {
    /// The defaults: prefix `tower-breaker:`, 250 ms per Redis command, reconnecting with backoff up to 2 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The key and channel prefix (namespace), for example `orders:breaker:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The deadline of each Redis command (publishing, reading the key, subscribing).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The longest wait between two attempts to re-subscribe after Redis went away.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// Starts sharing `breaker`'s openings: `publisher` publishes and stores this process's openings (any
    /// connection: a `ConnectionManager`, a cluster connection, ...), and `subscriber` makes the dedicated pub/sub
    /// connection (a `redis::Client`, or with the `sentinel` feature a `SentinelConnection`, whose subscription
    /// follows failovers; see [`crate::pubsub`]). Must be called inside a Tokio runtime.
    pub fn start<C>(
        self,
        breaker: &CircuitBreaker,
        publisher: C,
        subscriber: impl Into<Subscriber>,
    ) -> SharingHandle
    where
        C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let status = Arc::new(Status::default());
        let origin = origin_id();
        let name = breaker.name().to_owned();
        let channel = format!("{}{name}:openings", self.prefix);
        let key = format!("{}{name}:open", self.prefix);
        breaker.shared.set_opening_sink(Some(sender));
        let publish = tokio::spawn(publish_openings(
            receiver,
            publisher,
            PublishTarget {
                channel: channel.clone(),
                key: key.clone(),
                origin: origin.clone(),
                timeout: self.command_timeout,
            },
            status.clone(),
        ));
        let subscribe = tokio::spawn(follow_openings(
            breaker.clone(),
            subscriber.into(),
            channel,
            key,
            origin,
            self,
            status.clone(),
        ));
        SharingHandle {
            status,
            tasks: vec![publish, subscribe],
            breaker: breaker.clone(),
        }
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

fn decode(payload: &[u8]) -> Option<Opening> {
    serde_json::from_slice(payload).ok()
}

async fn follow_openings(
    breaker: CircuitBreaker,
    subscriber: Subscriber,
    channel: String,
    key: String,
    origin: String,
    config: RedisSharing,
    status: Arc<Status>,
) {
    let mut delay = Duration::from_millis(50);
    let mut warned_undecodable = false;
    loop {
        let subscribed = tokio::time::timeout(config.command_timeout * 4, async {
            let client = subscriber.client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((client, pubsub))
        })
        .await;
        let (client, pubsub) = match subscribed {
            Ok(Ok(subscribed)) => subscribed,
            Ok(Err(error)) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, %channel, "breaker sharing: cannot subscribe; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.max_reconnect_delay);
                continue;
            }
            Err(_) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.max_reconnect_delay);
                continue;
            }
        };
        delay = Duration::from_millis(50);
        status.connected.store(true, Ordering::Release);
        tracing::debug!(%channel, "breaker sharing: subscribed");
        // An opening published while we were away is still in the key, with the time it has left.
        catch_up(&breaker, &client, &key, &origin, &config, &status).await;
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            match decode(message.get_payload_bytes()) {
                Some(opening) if opening.origin != origin => {
                    status.received.fetch_add(1, Ordering::Relaxed);
                    breaker.open_remotely(Duration::from_millis(opening.open_for_ms));
                }
                Some(_) => {}
                None if !warned_undecodable => {
                    warned_undecodable = true;
                    tracing::warn!(%channel, "ignoring a breaker opening that does not decode (logged once)");
                }
                None => {}
            }
        }
        status.connected.store(false, Ordering::Release);
        status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%channel, "breaker sharing: subscription lost; working locally until Redis is back");
        tokio::time::sleep(delay).await;
    }
}

async fn catch_up(
    breaker: &CircuitBreaker,
    client: &redis::Client,
    key: &str,
    origin: &str,
    config: &RedisSharing,
    status: &Status,
) {
    let read = tokio::time::timeout(config.command_timeout * 4, async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::pipe()
            .cmd("GET")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
            .await
    })
    .await;
    match read {
        Ok(Ok((Some(payload), left_ms))) if left_ms > 0 => {
            if let Some(opening) = decode(&payload)
                && opening.origin != origin
            {
                status.received.fetch_add(1, Ordering::Relaxed);
                breaker.open_remotely(Duration::from_millis(left_ms.unsigned_abs()));
            }
        }
        Ok(Ok(_)) => {}
        _ => {
            status.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
