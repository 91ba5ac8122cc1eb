//! [`HttpCache`]: the tiers, the in-flight fills, invalidation and stats, shared by every layer built from it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use http::HeaderMap;
use redis::aio::ConnectionLike;
use tokio::sync::watch;
use tower_breaker::CircuitBreaker;
use tower_redis_core::Subscriber;
use tower_redis_core::guard::{Guard, GuardError};
use tower_redis_core::subscription::{Listener, Subscription, SubscriptionConfig};

use crate::entry::Entry;
use crate::error::ConfigError;
use crate::invalidated::Invalidated;
use crate::memory::MemoryTier;
use crate::owed::{self, Owed, Owing};
use crate::pending::PendingWrites;
use crate::policy::variant_matches;
use crate::stats::{CacheStats, Event, Stats, Tier};
use crate::store::{Keys, PLAIN_FIELD, RedisStore, Store, Write};

/// The shared cache behind every [`CacheLayer`](crate::CacheLayer) made from it: a bounded memory tier, an optional Redis tier
/// guarded by a circuit breaker, the fills in flight, and the stats. Cloning is an `Arc` bump.
#[derive(Clone)]
pub struct HttpCache {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) memory: Option<MemoryTier>,
    pub(crate) redis: Option<RedisTier>,
    replicas: Vec<RedisTier>,
    flights: DashMap<String, Arc<watch::Sender<Option<Arc<Entry>>>>>,
    /// Every background write from the moment it is queued until it is done: an invalidation waits for the ones
    /// it concerns, so they reach Redis before it deletes (otherwise a write still queued could store an entry just
    /// after the invalidation removed it).
    writes: Arc<PendingWrites>,
    pub(crate) stats: Stats,
    pub(crate) name: String,
    pub(crate) fill_lock: Option<Duration>,
    instance: String,
    /// Invalidations that could not reach Redis, replayed when it answers.
    owed: Owed,
    /// When keys, prefixes and tags were last invalidated: a fill sent before is not stored.
    invalidated: Arc<Invalidated>,
    /// Where background work runs (the Redis writes, refreshes, lock releases, body drains, replays): the
    /// runtime `build` was called in.
    runtime: tokio::runtime::Handle,
    /// Dropping it stops the subscription.
    _listener: Option<Subscription>,
}

pub(crate) struct RedisTier {
    pub(crate) store: Box<dyn Store>,
    /// The breaker and the deadline of every call to this tier.
    pub(crate) guard: Guard,
}

impl fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("name", &self.inner.name)
            .field("memory", &self.inner.memory)
            .field("redis", &self.inner.redis.is_some())
            .finish()
    }
}

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
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            crate::error::config_error(
                "runtime",
                "build the cache inside a Tokio runtime (in `#[tokio::main]` or `Runtime::block_on`): it runs its \
                 Redis writes, refreshes and invalidation replays as background tasks there",
            )
        })?;
        let instance = format!("{:016x}", rand_u64());
        let memory = (self.memory_capacity > 0).then(|| MemoryTier::new(self.memory_capacity));
        let invalidated = Arc::new(Invalidated::default());
        let listener = match self.subscriber {
            Some(subscriber) => Some(
                Subscription::spawn(
                    subscriber,
                    vec![keys.channel()],
                    SubscriptionConfig::default(),
                    Invalidations {
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
                _listener: listener,
            }),
        })
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Where a fill stands: the leader publishes the entry it ends with; waiters see the channel close when the leader
/// gives up (uncacheable response, error, cancelled request).
pub(crate) enum Flight {
    Lead(FlightGuard),
    Wait(watch::Receiver<Option<Arc<Entry>>>),
}

/// Held by the request filling a key; dropping it ends the flight.
pub(crate) struct FlightGuard {
    cache: HttpCache,
    key: String,
    sender: Arc<watch::Sender<Option<Arc<Entry>>>>,
}

impl FlightGuard {
    pub(crate) fn publish(&self, entry: Arc<Entry>) {
        self.sender.send_replace(Some(entry));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.cache
            .inner
            .flights
            .remove_if(&self.key, |_, sender| Arc::ptr_eq(sender, &self.sender));
    }
}

/// How an invalidation is described on the channel.
enum Message<'a> {
    Keys(&'a [String]),
    Tag(&'a str),
    Prefix(&'a str),
    All,
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
        }
    }

    /// Runs `future` in the background on the runtime the cache was built in.
    pub(crate) fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        drop(self.inner.runtime.spawn(future));
    }

    /// The breaker guarding Redis, when there is a Redis tier.
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.redis.as_ref().map(|redis| redis.guard.breaker())
    }

    /// Counters, tier usage and the Redis breaker's state.
    pub fn stats(&self) -> CacheStats {
        let memory = self.inner.memory.as_ref().map(|memory| {
            let (bytes, entries) = memory.usage();
            (bytes, entries, memory.capacity())
        });
        self.inner.stats.snapshot(
            memory,
            self.inner
                .redis
                .as_ref()
                .map(|redis| redis.guard.breaker().state()),
            &self
                .inner
                .redis
                .iter()
                .chain(&self.inner.replicas)
                .map(|tier| tier.guard.stats())
                .collect::<Vec<_>>(),
            self.inner.owed.len(),
        )
    }

    /// The Redis key an entry for `key` is stored under (for inspection; see the README's key layout).
    pub fn redis_key(&self, key: &str) -> Option<String> {
        self.inner
            .redis
            .as_ref()
            .map(|redis| redis.store.entry_key(key))
    }

    /// Removes every variant stored under these cache keys, here and (through Redis) on every instance.
    /// Returns how many Redis entries were deleted.
    ///
    /// When Redis cannot take it (down, stalled, too slow), the invalidation is *owed*: the memory tier is cleared
    /// at once, this instance reads nothing from Redis until Redis has taken every owed invalidation, and a
    /// background task replays them, with backoff, as soon as Redis answers (also after a restart from a snapshot
    /// that brought the deleted entries back). See the README's failure semantics.
    ///
    /// # Errors
    ///
    /// The Redis error, or a timeout, when Redis could not be reached: the invalidation is owed (above).
    pub async fn invalidate(&self, keys: &[String]) -> Result<u64, InvalidateError> {
        let owing = Owing::Keys(keys.to_vec());
        self.inner.invalidated.record(&owing, now_ms());
        if let Some(memory) = &self.inner.memory {
            for key in keys {
                memory.remove(key);
            }
        }
        self.inner.stats.bump(Event::Invalidations);
        self.pay_or_owe(owing).await
    }

    /// Removes every entry whose cache key starts with `prefix` (for the default key, a URL prefix such as
    /// `"http://api.example.com/users/"`), here and on every instance. Returns how many keys were removed from Redis.
    ///
    /// # Errors
    ///
    /// As for [`invalidate`](Self::invalidate): the invalidation is then owed.
    pub async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, InvalidateError> {
        let owing = Owing::Prefix(prefix.to_owned());
        self.inner.invalidated.record(&owing, now_ms());
        if let Some(memory) = &self.inner.memory {
            memory.remove_prefix(prefix);
        }
        self.inner.stats.bump(Event::Invalidations);
        self.pay_or_owe(owing).await
    }

    /// Removes every entry stored with this tag (from the `Surrogate-Key` response header or the route's tag
    /// function), here and on every instance. Returns how many entries were removed: from Redis when there is a
    /// Redis tier, otherwise from memory.
    ///
    /// # Errors
    ///
    /// As for [`invalidate`](Self::invalidate): the invalidation is then owed. The memory tier is cleared of the
    /// tag regardless.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, InvalidateError> {
        let owing = Owing::Tag(tag.to_owned());
        self.inner.invalidated.record(&owing, now_ms());
        self.inner.stats.bump(Event::Invalidations);
        let in_memory = self
            .inner
            .memory
            .as_ref()
            .map_or(0, |memory| memory.remove_tag(tag));
        if self.inner.redis.is_none() {
            return Ok(in_memory as u64);
        }
        let paid = self.pay_or_owe(owing).await;
        if paid.is_err()
            && let Some(memory) = &self.inner.memory
        {
            // Entries promoted from Redis keep their tags there only: any of them may carry this one.
            memory.remove_untracked();
        }
        paid
    }

    /// Runs `owing` against Redis, or owes it when Redis cannot take it.
    async fn pay_or_owe(&self, owing: Owing) -> Result<u64, InvalidateError> {
        let Some(redis) = &self.inner.redis else {
            return Ok(0);
        };
        self.inner
            .writes
            .settle(&owing, redis.guard.timeout() * 4)
            .await;
        match self.invalidate_in_redis(redis, &owing).await {
            Ok(deleted) => Ok(deleted),
            Err(error) => {
                // An error reply (an ACL refusal, say) would fail the same way again: not owed.
                if unreachable(&error) {
                    self.owe(owing);
                }
                Err(error)
            }
        }
    }

    /// The Redis half of an invalidation: delete, then tell the other instances.
    async fn invalidate_in_redis(
        &self,
        redis: &RedisTier,
        owing: &Owing,
    ) -> Result<u64, InvalidateError> {
        match owing {
            Owing::Keys(keys) => {
                let deleted = admin(redis, || redis.store.delete(keys)).await?;
                self.announce(redis, Message::Keys(keys)).await;
                Ok(deleted)
            }
            Owing::Prefix(prefix) => self.invalidate_prefix_in_redis(redis, prefix).await,
            Owing::Everything => self.invalidate_prefix_in_redis(redis, "").await,
            Owing::Tag(tag) => {
                let keys = admin(redis, || redis.store.tagged(tag)).await?;
                if let Some(memory) = &self.inner.memory {
                    for key in &keys {
                        memory.remove(key);
                    }
                }
                let deleted = admin(redis, || redis.store.delete(&keys)).await?;
                admin(redis, || redis.store.forget_tag(tag)).await?;
                self.announce(redis, Message::Keys(&keys)).await;
                self.announce(redis, Message::Tag(tag)).await;
                Ok(deleted)
            }
        }
    }

    async fn invalidate_prefix_in_redis(
        &self,
        redis: &RedisTier,
        prefix: &str,
    ) -> Result<u64, InvalidateError> {
        let keys = admin(redis, || redis.store.keys_with_prefix(prefix)).await?;
        let deleted = admin(redis, || redis.store.delete(&keys)).await?;
        self.announce(redis, Message::Prefix(prefix)).await;
        Ok(deleted)
    }

    /// Owes `owing`, and starts the replay when none is running.
    fn owe(&self, owing: Owing) {
        self.inner.stats.bump(Event::InvalidationsOwed);
        if !self.inner.owed.push(owing) {
            return;
        }
        tracing::warn!(
            "an invalidation could not reach Redis; reading nothing from Redis until it is replayed there"
        );
        self.spawn(replay(Arc::downgrade(&self.inner)));
    }

    /// Empties the memory tier here and on every subscribed instance. Redis entries stay (they expire by their TTL;
    /// use [`invalidate_prefix`](Self::invalidate_prefix) with `""` to remove them all).
    pub async fn clear_memory(&self) {
        if let Some(memory) = &self.inner.memory {
            memory.clear();
        }
        if let Some(redis) = &self.inner.redis {
            self.announce(redis, Message::All).await;
        }
    }

    async fn announce(&self, redis: &RedisTier, message: Message<'_>) {
        let mut text = format!("{}\n", self.inner.instance);
        match message {
            Message::Keys([]) => return,
            Message::Keys(keys) => {
                text.push('k');
                for key in keys {
                    text.push('\n');
                    text.push_str(key);
                }
            }
            Message::Prefix(prefix) => {
                text.push_str("p\n");
                text.push_str(prefix);
            }
            Message::Tag(tag) => {
                text.push_str("t\n");
                text.push_str(tag);
            }
            Message::All => text.push('*'),
        }
        if let Err(error) = admin(redis, || redis.store.publish(&text)).await {
            tracing::warn!(%error, "could not announce an invalidation to other instances");
        }
    }

    /// The entry for this request from the memory tier.
    pub(crate) fn memory_lookup(&self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let memory = self.inner.memory.as_ref()?;
        let slot = memory.get(key)?;
        slot.variants
            .iter()
            .find(|entry| variant_matches(entry, request))
            .cloned()
    }

    /// The `Vary` the memory tier last saw for this key, to read the right variant from Redis in one round trip.
    pub(crate) fn known_vary(&self, key: &str) -> Option<Arc<str>> {
        Some(self.inner.memory.as_ref()?.get(key)?.vary.clone())
    }

    /// Joins the fill in flight for `key`, or starts one.
    pub(crate) fn flight(&self, key: &str) -> Flight {
        match self.inner.flights.entry(key.to_owned()) {
            MapEntry::Occupied(occupied) => Flight::Wait(occupied.get().subscribe()),
            MapEntry::Vacant(vacant) => {
                let sender = Arc::new(watch::Sender::new(None));
                vacant.insert(sender.clone());
                Flight::Lead(FlightGuard {
                    cache: self.clone(),
                    key: key.to_owned(),
                    sender,
                })
            }
        }
    }

    /// Starts a flight only when none is running (a background refresh).
    pub(crate) fn try_lead(&self, key: &str) -> Option<FlightGuard> {
        match self.flight(key) {
            Flight::Lead(guard) => Some(guard),
            Flight::Wait(_) => None,
        }
    }

    /// Stores a complete entry in the memory tier now and in Redis in the background.
    pub(crate) fn store(
        &self,
        key: &str,
        vary: &str,
        entry: &Arc<Entry>,
        keep_ms: u64,
        tags: Vec<String>,
        lock: Option<String>,
    ) {
        if self.inner.invalidated.since(key, &tags, entry.request_time) {
            // Sent before an invalidation of its key or tags: it may hold what was invalidated.
            self.inner.stats.bump(Event::NotStored);
            tracing::debug!(
                key,
                "not storing a response whose request was sent before an invalidation"
            );
            if let Some(token) = lock {
                let cache = self.clone();
                let key = key.to_owned();
                self.spawn(async move { cache.unlock(&key, &token).await });
            }
            return;
        }
        self.inner.stats.bump(Event::Stores);
        let keep = Duration::from_millis(keep_ms);
        if let Some(memory) = &self.inner.memory {
            memory.insert(key, vary, entry, keep, Some(&tags));
        }
        if self.inner.redis.is_none() || keep_ms == 0 {
            if let Some(token) = lock {
                let cache = self.clone();
                let key = key.to_owned();
                self.spawn(async move { cache.unlock(&key, &token).await });
            }
            return;
        }
        let write = Write {
            key: key.to_owned(),
            vary: vary.to_owned(),
            field: variant_field(&entry.selecting),
            bytes: entry.encode(),
            ttl_ms: keep_ms,
            now_ms: now_ms(),
            tags,
        };
        let cache = self.clone();
        let key = key.to_owned();
        // Registered now, not when the task runs: an invalidation that starts before the task does still waits
        // for it.
        let queued = self.inner.writes.queue(&key, &write.tags);
        self.spawn(async move {
            let _queued = queued;
            cache.write(write).await;
            // Other instances waiting on our fill lock find the entry now; release it for the next fill.
            if let Some(token) = lock {
                cache.unlock(&key, &token).await;
            }
        });
    }

    async fn write(&self, write: Write) {
        {
            let cache = self;
            let Some(redis) = &cache.inner.redis else {
                return;
            };
            // Writes may carry large bodies: allow them a few timeouts before calling Redis unreachable.
            let deadline = redis.guard.timeout() * 4;
            match redis
                .guard
                .call_within(deadline, redis.store.write(write))
                .await
            {
                Ok(()) => {}
                Err(GuardError::Open) => cache.inner.stats.bump(Event::RedisSkipped),
                Err(GuardError::Timeout(_)) => {
                    cache.inner.stats.bump(Event::RedisTimeouts);
                    tracing::warn!("storing a response in Redis timed out");
                }
                Err(error) => {
                    cache.inner.stats.bump(Event::RedisErrors);
                    tracing::warn!(%error, "could not store a response in Redis");
                }
            }
        }
    }

    /// Reads the variant for this request from Redis (a replica first, when there are any): `Ok(None)` on a miss,
    /// `Err(())` when Redis failed, timed out or its breaker is open (the caller goes on without it).
    pub(crate) async fn redis_lookup(
        &self,
        key: &str,
        request: &HeaderMap,
        rules: &crate::policy::Rules,
    ) -> Result<Option<Arc<Entry>>, ()> {
        let Some(redis) = &self.inner.redis else {
            return Ok(None);
        };
        if self.inner.owed.any() {
            // Redis may still hold what an owed invalidation deletes: a miss, answered by the origin.
            self.inner.stats.bump(Event::OwedBypasses);
            return Ok(None);
        }
        let replicas = &self.inner.replicas;
        let mut found = None;
        if !replicas.is_empty() {
            use rand::Rng;
            let replica = &replicas[rand::rng().random_range(0..replicas.len())];
            if let Ok(Some(hit)) = self.read_from(replica, key, request).await {
                self.inner.stats.bump(Event::ReplicaHits);
                found = Some(hit);
            } else {
                // A miss may only be lag, and a failed replica is the primary's job: ask the primary.
                self.inner.stats.bump(Event::ReplicaFallbacks);
            }
        }
        let (entry, vary) = match found {
            Some(hit) => hit,
            None => match self.read_from(redis, key, request).await? {
                Some(hit) => hit,
                None => return Ok(None),
            },
        };
        if let Some(memory) = &self.inner.memory {
            // Promote for as long as it stays useful; the Redis TTL already bounds it.
            let keep = crate::policy::storage_ttl(&entry, rules, now_ms()).max(1);
            // Tags live in Redis for this entry; a tag invalidation reaches it through the keys it resolves to.
            memory.insert(key, &vary, &entry, Duration::from_millis(keep), None);
        }
        Ok(Some(entry))
    }

    /// One tier's answer: the entry for this request's variant and the `Vary` it was stored with.
    async fn read_from(
        &self,
        tier: &RedisTier,
        key: &str,
        request: &HeaderMap,
    ) -> Result<Option<(Arc<Entry>, String)>, ()> {
        let guess_vary = self.known_vary(key);
        let guess_field = guess_vary
            .as_deref()
            .map_or_else(|| PLAIN_FIELD.to_owned(), |vary| field_for(vary, request));
        let read = self
            .redis_call(tier, tier.store.read(key, &guess_field))
            .await?;
        let Some(vary) = read.vary else {
            return Ok(None);
        };
        let field = field_for(&vary, request);
        let bytes = if field == guess_field {
            read.entry
        } else {
            self.redis_call(tier, tier.store.read_field(key, &field))
                .await?
        };
        let Some(bytes) = bytes else { return Ok(None) };
        let Some(entry) = Entry::decode(bytes) else {
            self.inner.stats.bump(Event::Undecodable);
            tracing::debug!(
                key,
                "an entry in Redis did not decode; treating it as a miss"
            );
            return Ok(None);
        };
        if !variant_matches(&entry, request) {
            return Ok(None);
        }
        Ok(Some((Arc::new(entry), vary)))
    }

    async fn redis_call<T>(
        &self,
        redis: &RedisTier,
        call: crate::store::BoxFuture<'_, redis::RedisResult<T>>,
    ) -> Result<T, ()> {
        match redis.guard.call(call).await {
            Ok(value) => Ok(value),
            Err(GuardError::Open) => {
                self.inner.stats.bump(Event::RedisSkipped);
                Err(())
            }
            Err(GuardError::Timeout(deadline)) => {
                self.inner.stats.bump(Event::RedisTimeouts);
                tracing::warn!(
                    timeout_ms = deadline.as_millis(),
                    "Redis read timed out; going on without the shared tier"
                );
                Err(())
            }
            Err(error) => {
                self.inner.stats.bump(Event::RedisErrors);
                tracing::warn!(%error, "Redis read failed; going on without the shared tier");
                Err(())
            }
        }
    }

    /// Tries the cross-instance fill lock; `None` when it is not configured or Redis is unavailable.
    pub(crate) async fn lock(&self, key: &str, token: &str) -> Option<bool> {
        let ttl = self.inner.fill_lock?;
        let redis = self.inner.redis.as_ref()?;
        self.redis_call(
            redis,
            redis.store.lock(key, token, crate::policy::millis(ttl)),
        )
        .await
        .ok()
    }

    /// Whether another instance still holds the fill lock (`false` when Redis cannot say: the lock fails open).
    pub(crate) async fn locked(&self, key: &str) -> bool {
        match &self.inner.redis {
            Some(redis) => self
                .redis_call(redis, redis.store.locked(key))
                .await
                .unwrap_or(false),
            None => false,
        }
    }

    pub(crate) async fn unlock(&self, key: &str, token: &str) {
        if let Some(redis) = &self.inner.redis {
            let _ = self.redis_call(redis, redis.store.unlock(key, token)).await;
        }
    }

    pub(crate) fn hit(&self, tier: Tier) {
        self.inner.stats.hit(tier);
    }

    pub(crate) fn token(&self) -> String {
        format!("{}-{:016x}", self.inner.instance, rand_u64())
    }
}

/// Replays the owed invalidations, oldest first, until Redis has taken them all; waits with backoff and jitter
/// after each failed attempt. Holds the cache weakly: dropping the last handle stops it.
async fn replay(inner: std::sync::Weak<Inner>) {
    let mut backoff = owed::MIN_BACKOFF;
    loop {
        tokio::time::sleep(backoff.mul_f64(rand::random_range(0.75..1.25))).await;
        let Some(inner) = inner.upgrade() else { return };
        let cache = HttpCache { inner };
        let Some(redis) = &cache.inner.redis else {
            return;
        };
        while let Some(owing) = cache.inner.owed.oldest() {
            match cache.invalidate_in_redis(redis, &owing).await {
                Ok(_) => {
                    cache.inner.owed.paid(&owing);
                    cache.inner.stats.bump(Event::InvalidationsReplayed);
                    backoff = owed::MIN_BACKOFF;
                }
                Err(error) if unreachable(&error) => {
                    tracing::debug!(%error, owed = cache.inner.owed.len(), "owed invalidations: Redis still unavailable");
                    backoff = (backoff * 2).min(owed::MAX_BACKOFF);
                    break;
                }
                Err(error) => {
                    // Redis answered, with an error that a retry would meet again: give this one up.
                    tracing::warn!(%error, ?owing, "Redis refused an owed invalidation; giving it up");
                    cache.inner.owed.paid(&owing);
                }
            }
        }
        if !cache.inner.owed.any() && cache.inner.owed.finish() {
            tracing::info!("every owed invalidation reached Redis; reading from Redis again");
            return;
        }
    }
}

/// An admin call: the same timeout as reads, but not counted against the breaker (an admin call failing says
/// nothing new about the request path).
async fn admin<'a, T>(
    redis: &'a RedisTier,
    call: impl Fn() -> crate::store::BoxFuture<'a, redis::RedisResult<T>>,
) -> Result<T, InvalidateError> {
    // Every administrative command is idempotent (reads, DEL, ZREM), so one that met a connection broken since the
    // last command (a restarted server, a Sentinel failover) is sent once more on the reconnected connection.
    let mut retried = false;
    loop {
        match tokio::time::timeout(redis.guard.timeout() * 4, call()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) if !retried && connection_lost(&error) => retried = true,
            Ok(Err(error)) => return Err(InvalidateError::Redis(error)),
            Err(_) => return Err(InvalidateError::Timeout),
        }
    }
}

/// Whether an invalidation failed in a way that a later try can get past: Redis could not be reached, or answered
/// that it cannot serve yet (`LOADING` after a restart, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`), rather than with
/// a refusal that would come again (an ACL denial, say).
fn unreachable(error: &InvalidateError) -> bool {
    match error {
        InvalidateError::Timeout => true,
        InvalidateError::Redis(error) => {
            connection_lost(error)
                || error.is_timeout()
                || !matches!(error.retry_method(), redis::RetryMethod::NoRetry)
        }
        InvalidateError::NoRedis => false,
    }
}

/// Whether `error` says the connection broke (rather than that the command failed).
fn connection_lost(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
}

/// The hash field of the variant `request` selects under `vary` (comma-separated lowercase names).
pub(crate) fn field_for(vary: &str, request: &HeaderMap) -> String {
    if vary.is_empty() {
        return PLAIN_FIELD.to_owned();
    }
    let selecting: Vec<_> = vary
        .split(',')
        .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
        .map(|name| {
            let value = crate::policy::selecting_value(request, &name);
            (name, value)
        })
        .collect();
    variant_field(&selecting)
}

/// A stable name for a variant: FNV-1a over the selecting headers. Collisions only cost a miss, because the entry
/// keeps the selecting values and is checked on every read.
pub(crate) fn variant_field(selecting: &[(http::HeaderName, Option<http::HeaderValue>)]) -> String {
    if selecting.is_empty() {
        return PLAIN_FIELD.to_owned();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, value) in selecting {
        feed(name.as_str().as_bytes());
        match value {
            Some(value) => {
                feed(b"=");
                feed(value.as_bytes());
            }
            None => feed(b"!"),
        }
        feed(b"\n");
    }
    format!("v{hash:016x}")
}

/// What the invalidation subscription does: apply other instances' invalidations to the memory tier.
struct Invalidations {
    instance: String,
    memory: Option<MemoryTier>,
    invalidated: Arc<Invalidated>,
}

impl Listener for Invalidations {
    fn subscribed(
        &mut self,
        _client: &redis::Client,
    ) -> impl std::future::Future<Output = ()> + Send {
        // Whatever was invalidated while we were not listening may still sit in memory: start clean.
        if let Some(memory) = &self.memory {
            memory.clear();
        }
        std::future::ready(())
    }

    fn message(&mut self, message: &redis::Msg) {
        if let Ok(text) = message.get_payload::<String>() {
            apply(
                &text,
                &self.instance,
                self.memory.as_ref(),
                &self.invalidated,
            );
        }
    }
}

fn apply(text: &str, instance: &str, memory: Option<&MemoryTier>, invalidated: &Invalidated) {
    let mut lines = text.split('\n');
    if lines.next() == Some(instance) {
        return;
    }
    let now = now_ms();
    match lines.next() {
        Some("k") => {
            let keys: Vec<String> = lines.map(str::to_owned).collect();
            if let Some(memory) = memory {
                for key in &keys {
                    memory.remove(key);
                }
            }
            invalidated.record(&Owing::Keys(keys), now);
        }
        Some("p") => {
            let prefix = lines.collect::<Vec<_>>().join("\n");
            invalidated.record(&Owing::Prefix(prefix.clone()), now);
            if let Some(memory) = memory {
                memory.remove_prefix(&prefix);
            }
        }
        Some("t") => {
            let tag = lines.collect::<Vec<_>>().join("\n");
            invalidated.record(&Owing::Tag(tag.clone()), now);
            if let Some(memory) = memory {
                memory.remove_tag(&tag);
            }
        }
        Some("*") => {
            if let Some(memory) = memory {
                memory.clear();
            }
        }
        _ => tracing::debug!("ignoring an invalidation message in an unknown format"),
    }
}

/// Why an invalidation could not reach Redis.
#[derive(Debug)]
#[non_exhaustive]
pub enum InvalidateError {
    /// Redis answered with an error.
    Redis(redis::RedisError),
    /// Redis did not answer in time.
    Timeout,
    /// The operation needs the Redis tier and the cache has none.
    NoRedis,
}

impl fmt::Display for InvalidateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => write!(f, "redis error: {error}"),
            Self::Timeout => f.write_str("redis did not answer in time"),
            Self::NoRedis => f.write_str("this needs a Redis tier and the cache has none"),
        }
    }
}

impl std::error::Error for InvalidateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    use super::{HttpCache, InvalidateError, unreachable};

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

    fn server(kind: ServerErrorKind) -> InvalidateError {
        InvalidateError::Redis(RedisError::from((
            ErrorKind::Server(kind),
            "from the server",
        )))
    }

    #[test]
    fn only_what_a_later_try_can_get_past_is_owed() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(unreachable(&InvalidateError::Redis(refused.into())));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(unreachable(&InvalidateError::Redis(reset.into())));
        assert!(unreachable(&InvalidateError::Timeout));
        assert!(unreachable(&server(ServerErrorKind::BusyLoading)));
        assert!(unreachable(&server(ServerErrorKind::TryAgain)));
        assert!(unreachable(&server(ServerErrorKind::MasterDown)));
        assert!(!unreachable(&server(ServerErrorKind::NoPerm)));
        assert!(!unreachable(&server(ServerErrorKind::CrossSlot)));
        assert!(!unreachable(&InvalidateError::NoRedis));
    }
}
