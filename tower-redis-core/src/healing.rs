//! A connection that replaces itself when it stops answering.
//!
//! redis-rs reconnects a `ConnectionManager` only when its socket reports an error, and a `MultiplexedConnection`
//! never: a connection that goes *half-open* (a NAT entry gone, a failover that never sent FIN or RST, a proxy that
//! holds the bytes) reports nothing. Every command on it times out, for about 15 minutes of kernel retransmissions
//! or for ever when something keeps acknowledging. redis-rs chose not to reconnect after timeouts on purpose
//! (a server that is merely slow would get a reconnect storm).
//!
//! [`HealingConnection`] wraps any connection (`MultiplexedConnection`, `ConnectionManager`, a cluster connection,
//! a Sentinel-following one) together with a way to make a new one. It counts commands that got *no reply*: a
//! timeout, a broken connection, or a call abandoned by its caller's own deadline before the reply came. Any
//! reply, even an error reply, resets the count. After [`HealingConfig::replace_after`] such commands in a row
//! (default 3) it opens a fresh connection in the background, checks it with `PING`, and swaps it in; commands
//! already in flight finish (or time out) on the old one. Replacements are spaced by a backoff with jitter, from
//! [`HealingConfig::min_backoff`] (default 1 s) doubling to [`HealingConfig::max_backoff`] (default 30 s), so a
//! Redis that is slower than the callers' deadlines costs at most one new connection per backoff period per
//! process, never a storm. The first replacement after a quiet period happens at once.
//!
//! ```no_run
//! # async fn demo() -> redis::RedisResult<()> {
//! use tower_redis_core::healing::{HealingConfig, HealingConnection};
//!
//! let client = tower_redis_core::tcp::client("redis://127.0.0.1:6379")?; // TCP keepalive on
//! let connection = HealingConnection::multiplexed(client, HealingConfig::default()).await?;
//! // `connection` is `ConnectionLike + Clone + Send + Sync`: give it to the cache, the limiter or the registry.
//! # let _ = connection; Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::ConfigError;

type Connect<C> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = RedisResult<C>> + Send>> + Send + Sync>;

/// When a [`HealingConnection`] replaces its connection. Validated by [`HealingConfig::validate`] (and by every
/// constructor).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct HealingConfig {
    /// Commands in a row with no reply after which the connection is replaced. Default 3.
    pub replace_after: u32,
    /// The shortest time between two replacements (then doubling, with jitter). Default 1 s.
    pub min_backoff: Duration,
    /// The longest time between two replacements. Default 30 s.
    pub max_backoff: Duration,
    /// The deadline for opening a new connection and its `PING`. Default 1 s.
    pub connect_timeout: Duration,
}

impl Default for HealingConfig {
    fn default() -> Self {
        Self {
            replace_after: 3,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl HealingConfig {
    /// Sets [`replace_after`](Self::replace_after).
    pub fn replace_after(mut self, commands: u32) -> Self {
        self.replace_after = commands;
        self
    }

    /// Sets [`min_backoff`](Self::min_backoff) and [`max_backoff`](Self::max_backoff).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Checks the values.
    ///
    /// # Errors
    ///
    /// When `replace_after` is 0, a backoff or the connect timeout is zero, or `min_backoff > max_backoff`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replace_after == 0 {
            return Err(config_error(
                "replace_after",
                "must be at least 1 (commands in a row with no reply)",
            ));
        }
        if self.min_backoff.is_zero() || self.max_backoff.is_zero() {
            return Err(config_error(
                "backoff",
                "must be greater than zero, or a Redis slower than its callers gets a reconnect storm",
            ));
        }
        if self.min_backoff > self.max_backoff {
            return Err(config_error(
                "backoff",
                format!(
                    "min_backoff ({:?}) must not exceed max_backoff ({:?})",
                    self.min_backoff, self.max_backoff
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout", "must be greater than zero"));
        }
        Ok(())
    }
}

/// Counters of a [`HealingConnection`] (shared by all its clones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct HealingStats {
    /// Commands that got no reply (timed out, failed on a broken connection, or abandoned by their caller).
    pub no_reply: u64,
    /// Connections replaced.
    pub replacements: u64,
    /// Replacement attempts that could not connect (or whose `PING` failed): the old connection was kept.
    pub failed_replacements: u64,
    /// How many connections this one has had (1 until the first replacement).
    pub generation: u64,
}

/// A connection that replaces itself after repeated commands with no reply. See the [module docs](self).
///
/// Cloning is an `Arc` bump; all clones share one current connection and one count.
pub struct HealingConnection<C> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for HealingConnection<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C> HealingConnection<C> {
    /// The counters.
    pub fn stats(&self) -> HealingStats {
        let shared = &self.shared;
        HealingStats {
            no_reply: shared.no_reply.load(Ordering::Relaxed),
            replacements: shared.replacements.load(Ordering::Relaxed),
            failed_replacements: shared.failed_replacements.load(Ordering::Relaxed),
            generation: shared.generation.load(Ordering::Acquire),
        }
    }
}

impl<C> std::fmt::Debug for HealingConnection<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealingConnection")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Shared<C> {
    current: RwLock<Slot<C>>,
    connect: Connect<C>,
    config: HealingConfig,
    /// The generation of `current`, readable without the lock.
    generation: AtomicU64,
    /// Commands in a row on the current generation with no reply.
    no_reply_in_a_row: AtomicU32,
    replacing: AtomicBool,
    schedule: Mutex<Schedule>,
    no_reply: AtomicU64,
    replacements: AtomicU64,
    failed_replacements: AtomicU64,
    db: i64,
}

struct Slot<C> {
    connection: C,
    generation: u64,
}

struct Schedule {
    /// No replacement starts before this.
    not_before: Option<Instant>,
    /// The wait after the next replacement.
    backoff: Duration,
    /// When the last replacement started.
    last: Option<Instant>,
}

impl<C> HealingConnection<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Wraps `first`, replacing it when needed with what `connect` makes.
    ///
    /// # Errors
    ///
    /// When `config` is invalid ([`HealingConfig::validate`]).
    pub fn new<F, Fut>(first: C, connect: F, config: HealingConfig) -> Result<Self, ConfigError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RedisResult<C>> + Send + 'static,
    {
        config.validate()?;
        let db = first.get_db();
        let connect: Connect<C> = Arc::new(move || Box::pin(connect()));
        Ok(Self {
            shared: Arc::new(Shared {
                current: RwLock::new(Slot {
                    connection: first,
                    generation: 1,
                }),
                connect,
                schedule: Mutex::new(Schedule {
                    not_before: None,
                    backoff: config.min_backoff,
                    last: None,
                }),
                config,
                generation: AtomicU64::new(1),
                no_reply_in_a_row: AtomicU32::new(0),
                replacing: AtomicBool::new(false),
                no_reply: AtomicU64::new(0),
                replacements: AtomicU64::new(0),
                failed_replacements: AtomicU64::new(0),
                db,
            }),
        })
    }

    /// Makes the first connection with `connect` (within the configured connect timeout), then as [`Self::new`].
    ///
    /// # Errors
    ///
    /// When `config` is invalid, or the first connection cannot be made in time.
    pub async fn connect<F, Fut>(connect: F, config: HealingConfig) -> RedisResult<Self>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RedisResult<C>> + Send + 'static,
    {
        config.validate().map_err(invalid)?;
        let first = tokio::time::timeout(config.connect_timeout, connect())
            .await
            .map_err(|_| timed_out("connecting to Redis"))??;
        Self::new(first, connect, config).map_err(invalid)
    }

    fn current(&self) -> (C, u64) {
        let slot = self
            .shared
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        (slot.connection.clone(), slot.generation)
    }
}

impl HealingConnection<redis::aio::MultiplexedConnection> {
    /// A multiplexed connection to `client`'s server that heals: every new one is made with the client's
    /// settings (use [`crate::tcp::client`] for TCP keepalive).
    ///
    /// # Errors
    ///
    /// When `config` is invalid, or the first connection cannot be made in time.
    pub async fn multiplexed(client: redis::Client, config: HealingConfig) -> RedisResult<Self> {
        Self::connect(
            move || {
                let client = client.clone();
                async move { client.get_multiplexed_async_connection().await }
            },
            config,
        )
        .await
    }
}

#[cfg(feature = "connection-manager")]
impl HealingConnection<redis::aio::ConnectionManager> {
    /// A `ConnectionManager` to `client`'s server that heals: it reconnects by itself after socket errors, and is
    /// replaced after commands in a row with no reply.
    ///
    /// # Errors
    ///
    /// When `config` is invalid, or the first connection cannot be made in time.
    pub async fn connection_manager(
        client: redis::Client,
        manager: redis::aio::ConnectionManagerConfig,
        config: HealingConfig,
    ) -> RedisResult<Self> {
        Self::connect(
            move || {
                let client = client.clone();
                let manager = manager.clone();
                async move { client.get_connection_manager_with_config(manager).await }
            },
            config,
        )
        .await
    }
}

fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("healing connection", field, message)
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(invalid)`
fn invalid(error: ConfigError) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "invalid configuration",
        error.to_string(),
    ))
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

/// Whether a failed command got no reply from the server (as opposed to an error reply, which is an answer).
fn no_reply(error: &RedisError) -> bool {
    error.code().is_none()
        && (error.is_timeout()
            || error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal())
}

/// Counts a command as unanswered when dropped before it saw its outcome.
struct Pending<'a, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    connection: &'a HealingConnection<C>,
    generation: u64,
    settled: bool,
}

impl<C> Pending<'_, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn settle<T>(mut self, result: &RedisResult<T>) {
        self.settled = true;
        match result {
            Err(error) if no_reply(error) => self.connection.missed(self.generation),
            _ => self.connection.answered(self.generation),
        }
    }
}

impl<C> Drop for Pending<'_, C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if !self.settled {
            // The caller's deadline fired first (or the caller went away): no reply.
            self.connection.missed(self.generation);
        }
    }
}

impl<C> HealingConnection<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn answered(&self, generation: u64) {
        if self.shared.generation.load(Ordering::Acquire) == generation {
            self.shared.no_reply_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    fn missed(&self, generation: u64) {
        let shared = &self.shared;
        shared.no_reply.fetch_add(1, Ordering::Relaxed);
        if shared.generation.load(Ordering::Acquire) != generation {
            return; // a command on a connection already replaced
        }
        let in_a_row = shared.no_reply_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= shared.config.replace_after {
            self.replace(generation, in_a_row);
        }
    }

    /// Starts a replacement of `generation` in the background, unless one runs or the backoff forbids it.
    fn replace(&self, generation: u64, in_a_row: u32) {
        let shared = &self.shared;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if shared
            .replacing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let now = Instant::now();
        {
            let mut schedule = shared
                .schedule
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if schedule
                .not_before
                .is_some_and(|not_before| now < not_before)
            {
                shared.replacing.store(false, Ordering::Release);
                return;
            }
            // Quiet for a long while: start the backoff over.
            if schedule
                .last
                .is_some_and(|last| now.duration_since(last) > shared.config.max_backoff * 2)
            {
                schedule.backoff = shared.config.min_backoff;
            }
            let wait = jittered(schedule.backoff);
            schedule.not_before = Some(now + wait);
            schedule.last = Some(now);
            schedule.backoff = (schedule.backoff * 2).min(shared.config.max_backoff);
        }
        tracing::warn!(
            commands = in_a_row,
            generation,
            "a Redis connection gave no reply to several commands in a row (half-open, stalled or too slow); \
             opening a new one"
        );
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let fresh = tokio::time::timeout(shared.config.connect_timeout, async {
                let mut fresh = (shared.connect)().await?;
                redis::cmd("PING")
                    .query_async::<Value>(&mut fresh)
                    .await?;
                Ok::<_, RedisError>(fresh)
            })
            .await;
            match fresh {
                Ok(Ok(fresh)) => {
                    {
                        let mut slot = shared.current.write().unwrap_or_else(PoisonError::into_inner);
                        slot.connection = fresh;
                        slot.generation = generation + 1;
                    }
                    shared.generation.store(generation + 1, Ordering::Release);
                    shared.no_reply_in_a_row.store(0, Ordering::Relaxed);
                    shared.replacements.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(generation = generation + 1, "replaced the Redis connection");
                }
                Ok(Err(error)) => {
                    shared.failed_replacements.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "could not open a new Redis connection; keeping the old one for now");
                }
                Err(_) => {
                    shared.failed_replacements.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        timeout_ms = shared.config.connect_timeout.as_millis(),
                        "opening a new Redis connection timed out; keeping the old one for now"
                    );
                }
            }
            shared.replacing.store(false, Ordering::Release);
        });
    }
}

/// `base` scaled by a random factor in [0.75, 1.25).
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::random_range(0.75..1.25))
}

impl<C> ConnectionLike for HealingConnection<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (mut connection, generation) = self.current();
            let pending = Pending {
                connection: self,
                generation,
                settled: false,
            };
            let result = connection.req_packed_command(cmd).await;
            pending.settle(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut connection, generation) = self.current();
            let pending = Pending {
                connection: self,
                generation,
                settled: false,
            };
            let result = connection
                .req_packed_commands(pipeline, offset, count)
                .await;
            pending.settle(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

#[cfg(test)]
mod tests {
    use super::{HealingConfig, jittered, no_reply};
    use std::time::Duration;

    #[test]
    fn invalid_configurations_say_what_to_change() {
        assert!(HealingConfig::default().validate().is_ok());
        let zero = HealingConfig::default().replace_after(0).validate();
        assert!(zero.is_err_and(|error| error.to_string().contains("replace_after")));
        let inverted = HealingConfig::default()
            .backoff(Duration::from_secs(5), Duration::from_secs(1))
            .validate();
        assert!(inverted.is_err_and(|error| error.to_string().contains("min_backoff")));
        let no_wait = HealingConfig::default()
            .backoff(Duration::ZERO, Duration::from_secs(1))
            .validate();
        assert!(no_wait.is_err());
        assert!(
            HealingConfig::default()
                .connect_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn jitter_stays_within_a_quarter_of_the_backoff() {
        for _ in 0..1_000 {
            let wait = jittered(Duration::from_secs(4));
            assert!(wait >= Duration::from_secs(3) && wait < Duration::from_secs(5));
        }
    }

    #[test]
    fn an_error_reply_is_a_reply_a_timeout_is_not() {
        let reply = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!no_reply(&reply));
        let timeout = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ));
        assert!(no_reply(&timeout));
        let reset = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(no_reply(&reset));
    }
}
