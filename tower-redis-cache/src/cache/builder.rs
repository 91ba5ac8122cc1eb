//! [`CacheBuilder`]: a cache's settings, validated into an [`HttpCache`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::ConnectionLike;
use tower_breaker::{CircuitBreaker, ManualClock};
use tower_redis_core::Subscriber;
use tower_redis_core::guard::Guard;
use tower_redis_core::subscription::{Subscription, SubscriptionConfig};

use super::invalidation::Invalidations;
use super::{CacheClock, HttpCache, Inner, RedisTier, rand_u64};
use crate::directives::Targets;
use crate::error::ConfigError;
use crate::invalidated::Invalidated;
use crate::memory::MemoryTier;
use crate::owed::Owed;
use crate::stats::Stats;
use crate::store::{Keys, RedisStore, Store};

/// Builds a [`HttpCache`]; see [`HttpCache::builder`].
#[must_use]
pub struct CacheBuilder {
    memory_capacity: u64,
    redis: Option<Box<dyn FnOnce(Keys) -> Box<dyn Store> + Send>>,
    replicas: Vec<Box<dyn FnOnce(Keys) -> Box<dyn Store> + Send>>,
    prefix: String,
    timeout: Duration,
    breaker: Option<CircuitBreaker>,
    subscriber: Option<Subscriber>,
    fill_lock: Option<Duration>,
    name: String,
    clock: Option<ManualClock>,
    targets: Targets,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("memory_capacity", &self.memory_capacity)
            .field("redis", &self.redis.is_some())
            .field("replicas", &self.replicas.len())
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("fill_lock", &self.fill_lock)
            .field("name", &self.name)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl CacheBuilder {
    /// Bytes the memory tier may hold (bodies, headers and bookkeeping); 100 MiB by default, 0 turns it off.
    pub fn memory_capacity(mut self, bytes: u64) -> Self {
        self.memory_capacity = bytes;
        self
    }

    /// Uses Redis as the shared tier through `connection` (a `ConnectionManager`, a `MultiplexedConnection`, a
    /// cluster connection, ...). Without it the cache is memory-only.
    pub fn redis<C>(mut self, connection: C) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.redis = Some(Box::new(move |keys| {
            Box::new(RedisStore::new(connection, keys))
        }));
        self
    }

    /// Reads from this replica too (call it once per replica): each read goes to one replica at random, and to the
    /// primary when that replica misses (it may lag), fails, times out or has its breaker open. Writes, invalidations
    /// and locks always go to the primary. On a Cluster, use the cluster client's own replica routing
    /// (`ClusterClientBuilder::read_routing_strategy(RandomReplicaStrategy)`) instead.
    pub fn read_replica<C>(mut self, connection: C) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.replicas.push(Box::new(move |keys| {
            Box::new(RedisStore::new(connection, keys))
        }));
        self
    }

    /// The prefix of every Redis key and of the invalidation channel (`"cache:"` by default).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one Redis call may take before the cache goes on without it (200 ms by default). Reads count
    /// against the request; writes run in the background.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Guards Redis with this breaker instead of the default one (opens after 3 failures in a row, probes after
    /// 500 ms).
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Subscribes through `subscriber` to the invalidation channel, so invalidations made by other instances also
    /// clear this instance's memory tier. Takes a `redis::Client` (on a Cluster, a client for any one node will
    /// do) or, with the `sentinel` feature, a [`SentinelConnection`](crate::sentinel::SentinelConnection), so the
    /// subscription moves to the promoted replica after a failover.
    pub fn subscribe(mut self, subscriber: impl Into<Subscriber>) -> Self {
        self.subscriber = Some(subscriber.into());
        self
    }

    /// Coalesces misses across instances too: the instance that misses first takes a Redis lock for at most
    /// `ttl` while it fills the entry, and the others wait for the entry instead of calling the origin. The lock
    /// fails open: when Redis errors or the lock outlives `ttl`, the others go to the origin.
    pub fn fill_lock(mut self, ttl: Duration) -> Self {
        self.fill_lock = Some(ttl);
        self
    }

    /// The targeted cache-control fields (RFC 9213) this cache obeys, in order of precedence: the first one a
    /// response carries with a valid, non-empty value replaces its `Cache-Control` and `Expires` for this cache's
    /// storage and freshness decisions (`max-age`, `s-maxage`, `no-store`, `no-cache`, `private`, `public`,
    /// `must-revalidate`, `proxy-revalidate`, `stale-while-revalidate`, `stale-if-error`, `immutable`). The
    /// default is `CDN-Cache-Control` alone; name your own first to address this cache specifically, as in
    /// `[HeaderName::from_static("acme-cache-control"), HeaderName::from_static("cdn-cache-control")]`. An empty
    /// list turns targeted fields off. Each field is parsed as a Structured Fields dictionary (RFC 8941): one
    /// that does not parse is ignored as a whole.
    pub fn targeted_fields(mut self, names: impl IntoIterator<Item = http::HeaderName>) -> Self {
        self.targets.names = names.into_iter().collect();
        self
    }

    /// Whether the target fields are removed from the responses this cache passes on (`true` by default, as a CDN
    /// does with the fields addressed to it). `Cache-Control` always goes on as the origin sent it.
    pub fn strip_targeted_fields(mut self, strip: bool) -> Self {
        self.targets.strip = strip;
        self
    }

    /// Reads the time from `clock` (offset from the wall clock at build time) instead of the system: for tests,
    /// which move it with `ManualClock::advance` rather than sleep for an entry to go stale. Redis's own key
    /// expiry still follows Redis's clock.
    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The cache's name in `Cache-Status` (`"tower-redis-cache"` by default).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the cache.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the Redis timeout or the fill lock is zero, the name is not a valid `Cache-Status`
    /// token, or it is called outside a Tokio runtime (the cache's background work runs on the runtime it is built
    /// in: it is never skipped).
    pub fn build(self) -> Result<HttpCache, ConfigError> {
        if self.timeout.is_zero() {
            return Err(crate::error::config_error(
                "redis_timeout",
                "the Redis timeout must be above zero",
            ));
        }
        if self
            .fill_lock
            .is_some_and(|ttl| ttl < Duration::from_millis(1))
        {
            return Err(crate::error::config_error(
                "fill_lock",
                "the fill lock must last at least 1 ms",
            ));
        }
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&byte))
        {
            return Err(crate::error::config_error(
                "name",
                "the Cache-Status name must be a token (letters, digits and !#$%&'*+-.^_`|~:/)",
            ));
        }
        let keys = Keys::new(self.prefix);
        let guard = |name: String| {
            CircuitBreaker::builder()
                .name(name)
                .consecutive_failures(3)
                .no_failure_rate()
                .open_for(Duration::from_millis(500))
                .half_open_permits(1)
                .half_open_max_wait(Duration::from_secs(2))
                .build()
                .map_err(|error| crate::error::config_error("breaker", error.to_string()))
        };
        if self.redis.is_none() && !self.replicas.is_empty() {
            return Err(crate::error::config_error(
                "read_replica",
                "read replicas need a primary: call `redis(connection)` too",
            ));
        }
        let redis = match self.redis {
            Some(make) => {
                let breaker = match self.breaker {
                    Some(breaker) => breaker,
                    None => guard(format!("{}-redis", self.name))?,
                };
                Some(RedisTier {
                    store: make(keys.clone()),
                    guard: Guard::new(breaker, self.timeout)?,
                })
            }
            None => None,
        };
        let mut replicas = Vec::with_capacity(self.replicas.len());
        for (index, make) in self.replicas.into_iter().enumerate() {
            replicas.push(RedisTier {
                store: make(keys.clone()),
                guard: Guard::new(
                    guard(format!("{}-replica-{index}", self.name))?,
                    self.timeout,
                )?,
            });
        }
        validate_targets(&self.targets.names)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            crate::error::config_error(
                "runtime",
                "build the cache inside a Tokio runtime (in `#[tokio::main]` or `Runtime::block_on`): it runs its \
                 Redis writes, refreshes and invalidation replays as background tasks there",
            )
        })?;
        let instance = format!("{:016x}", rand_u64());
        let clock = self.clock.map_or(CacheClock::System, CacheClock::manual);
        let memory = (self.memory_capacity > 0).then(|| MemoryTier::new(self.memory_capacity));
        let invalidated = Arc::new(Invalidated::default());
        let listener = match self.subscriber {
            Some(subscriber) => Some(
                Subscription::spawn(
                    subscriber,
                    vec![keys.channel()],
                    SubscriptionConfig::default(),
                    Invalidations {
                        clock: clock.clone(),
                        instance: instance.clone(),
                        memory: memory.clone(),
                        invalidated: invalidated.clone(),
                    },
                )
                .map_err(|error| {
                    crate::error::config_error(
                        "subscribe",
                        format!("cannot subscribe to invalidations: {error}"),
                    )
                })?,
            ),
            None => None,
        };
        Ok(HttpCache {
            inner: Arc::new(Inner {
                memory,
                redis,
                replicas,
                flights: DashMap::new(),
                writes: Arc::default(),
                stats: Stats::named(&self.name),
                name: self.name,
                fill_lock: self.fill_lock,
                instance,
                owed: Owed::default(),
                invalidated,
                runtime,
                clock,
                listener,
                targets: self.targets,
            }),
        })
    }
}

impl HttpCache {
    /// A builder: memory tier of 100 MiB, no Redis.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            memory_capacity: 100 * 1024 * 1024,
            redis: None,
            replicas: Vec::new(),
            prefix: "cache:".to_owned(),
            timeout: Duration::from_millis(200),
            breaker: None,
            subscriber: None,
            fill_lock: None,
            name: "tower-redis-cache".to_owned(),
            clock: None,
            targets: Targets::default(),
        }
    }
}

/// A target list names each field once, and never `Cache-Control` itself (which every cache obeys when no target
/// applies).
fn validate_targets(names: &[http::HeaderName]) -> Result<(), ConfigError> {
    for (index, name) in names.iter().enumerate() {
        if name == http::header::CACHE_CONTROL
            || name == http::header::PRAGMA
            || name == http::header::EXPIRES
        {
            return Err(crate::error::config_error(
                "targeted_fields",
                format!(
                    "{name} is not a targeted field: list only the fields addressed to this cache, such as \
                     CDN-Cache-Control (Cache-Control applies whenever none of them does)"
                ),
            ));
        }
        if names[..index].contains(name) {
            return Err(crate::error::config_error(
                "targeted_fields",
                format!(
                    "{name} is listed twice: name each targeted field once, in order of precedence"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::HttpCache;

    #[test]
    fn building_outside_a_runtime_is_an_error_that_says_what_to_do() {
        let error = HttpCache::builder()
            .build()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(error.contains("inside a Tokio runtime"), "{error}");
    }

    #[test]
    fn building_inside_a_runtime_works() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(
            runtime
                .block_on(async { HttpCache::builder().build() })
                .is_ok()
        );
    }
}
