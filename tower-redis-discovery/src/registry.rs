//! The [`Registry`] trait and its two implementations: [`MemoryRegistry`] and [`RedisRegistry`] (HazelJS's wire
//! format).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as Clock};

use tower_redis_core::{CallRecorder, ConfigError, GuardStats};

use crate::instance::{Instance, Status, iso8601};

/// Why a registry call failed. Registry errors never take a service down: [`crate::Registration`] retries, and
/// discovery keeps the last good set.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegistryError {
    /// Redis answered with an error.
    Redis(redis::RedisError),
    /// Redis did not answer in time.
    Timeout,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redis(error) => write!(f, "registry redis error: {error}"),
            Self::Timeout => f.write_str("the registry did not answer in time"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Redis(error) => Some(error),
            Self::Timeout => None,
        }
    }
}

impl From<redis::RedisError> for RegistryError {
    fn from(error: redis::RedisError) -> Self {
        Self::Redis(error)
    }
}

/// What a heartbeat found in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Heartbeat {
    /// The entry was there: its status and `lastHeartbeat` were refreshed, fields written by others kept.
    Refreshed,
    /// The entry was missing (it expired, or the registry lost its data): it was written again in full.
    Recreated,
    /// The stored entry differed from the registered instance where it matters (host, port, protocol, name,
    /// metadata, tags, zone, health check), did not decode, or was not a string: it was rewritten in full from the
    /// registered instance, so a forged or corrupted address heals within one heartbeat.
    Healed,
}

/// A service registry: instances register and heartbeat; clients list them.
pub trait Registry: Clone + Send + Sync + 'static {
    /// How long an entry lives without a heartbeat.
    fn ttl(&self) -> Duration;

    /// Writes `instance` (creating or replacing it) with the registry's TTL.
    fn register(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Refreshes `instance`: sets `lastHeartbeat` to now and the given status, keeps fields written by others, and
    /// re-creates the whole entry from `instance` if it is missing (expired, or lost by the registry); the answer
    /// says which.
    fn heartbeat(
        &self,
        instance: &Instance,
        status: Status,
    ) -> impl Future<Output = Result<Heartbeat, RegistryError>> + Send;

    /// Removes the instance (a missing entry is fine).
    fn deregister(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Every instance of `service` that has not expired, whatever its status.
    fn instances(
        &self,
        service: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, RegistryError>> + Send;

    /// The names of the services with a registration.
    fn services(&self) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;

    /// Tells watchers that `service` changed, so they read it now instead of at their next poll (a hint: HazelJS
    /// ignores it, and a lost hint only delays a change by one poll).
    fn announce(&self, service: &str) -> impl Future<Output = Result<(), RegistryError>> + Send {
        let _ = service;
        std::future::ready(Ok(()))
    }
}

#[derive(Debug, Default)]
struct MemoryState {
    instances: HashMap<String, (Instance, Clock)>,
}

/// An in-memory registry for one process (tests, single-instance mode). Entries expire after the TTL like
/// Redis's.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    state: Arc<Mutex<MemoryState>>,
    ttl: Duration,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new(Duration::from_secs(90))
    }
}

impl MemoryRegistry {
    /// An empty registry whose entries expire `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(MemoryState::default())),
            ttl,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Clock::now();
        state.instances.retain(|_, (_, expires)| *expires > now);
        f(&mut state)
    }
}

impl Registry for MemoryRegistry {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register(&self, instance: &Instance) -> Result<(), RegistryError> {
        let expires = Clock::now() + self.ttl;
        self.with(|state| {
            state
                .instances
                .insert(instance.id.clone(), (instance.clone(), expires));
        });
        Ok(())
    }

    async fn heartbeat(
        &self,
        instance: &Instance,
        status: Status,
    ) -> Result<Heartbeat, RegistryError> {
        let expires = Clock::now() + self.ttl;
        let now = iso8601(std::time::SystemTime::now());
        Ok(self.with(|state| {
            let mut outcome = Heartbeat::Refreshed;
            let entry = state
                .instances
                .entry(instance.id.clone())
                .or_insert_with(|| {
                    outcome = Heartbeat::Recreated;
                    (instance.clone(), expires)
                });
            entry.0.status = status;
            entry.0.last_heartbeat = now;
            entry.1 = expires;
            outcome
        }))
    }

    async fn deregister(&self, instance: &Instance) -> Result<(), RegistryError> {
        self.with(|state| state.instances.remove(&instance.id));
        Ok(())
    }

    async fn instances(&self, service: &str) -> Result<Vec<Instance>, RegistryError> {
        Ok(self.with(|state| {
            let mut found: Vec<Instance> = state
                .instances
                .values()
                .filter(|(instance, _)| instance.name == service)
                .map(|(instance, _)| instance.clone())
                .collect();
            found.sort_by(|a, b| a.id.cmp(&b.id));
            found
        }))
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.with(|state| {
            state
                .instances
                .values()
                .map(|(instance, _)| instance.name.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        }))
    }
}

/// The Redis registry, wire-compatible with HazelJS's `RedisRegistryBackend`:
///
/// | key | type | TTL | content |
/// |---|---|---|---|
/// | `{prefix}instance:{id}` | string | `ttl` (default 90 s) | the instance JSON |
/// | `{prefix}service:{name}` | set | `2 × ttl`, never shortened | instance ids |
///
/// The prefix defaults to `hazeljs:discovery:` and is used exactly as given (end it with `:`). Built with
/// [`RedisRegistry::builder`]. On a single node a write is one MULTI/EXEC pipeline and a read is `SMEMBERS` then one
/// pipeline of `GETRANGE`s. HazelJS's layout has no hash tag, so the keys of one write live in different Cluster
/// slots: on a Cluster each command is sent on its own (the reads concurrently), a write is not atomic, and
/// [`Registry::services`] uses `KEYS` (sent to every primary) instead of `SCAN` (one node). Which one applies is
/// found out, not configured: the first call asks the server (`INFO cluster`), and a `CROSSSLOT` reply switches to
/// the Cluster way and sends the call again. Every call has a timeout.
#[derive(Clone)]
pub struct RedisRegistry<C> {
    connection: C,
    prefix: Arc<str>,
    ttl: Duration,
    timeout: Duration,
    topology: Arc<AtomicU8>,
    max_entry_size: usize,
    warned: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Every Redis call's outcome and latency, counted as the other crates count theirs.
    calls: CallRecorder,
}

/// Not asked yet (or the server could not be asked): the single-node way, and ask again on the next call.
const UNKNOWN: u8 = 0;
const SINGLE_NODE: u8 = 1;
const CLUSTER: u8 = 2;

/// Builds a [`RedisRegistry`]: [`RedisRegistry::builder`], then [`redis`](Self::redis) and the settings.
#[must_use]
pub struct RedisRegistryBuilder<C> {
    connection: C,
    settings: RegistrySettings,
}

/// Everything but the connection, carried over as is when [`RedisRegistryBuilder::redis`] changes its type.
struct RegistrySettings {
    prefix: String,
    ttl: Duration,
    redis_timeout: Duration,
    max_entry_size: usize,
}

impl<C> fmt::Debug for RedisRegistryBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistryBuilder")
            .field("prefix", &self.settings.prefix)
            .field("ttl", &self.settings.ttl)
            .field("redis_timeout", &self.settings.redis_timeout)
            .field("max_entry_size", &self.settings.max_entry_size)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry<()> {
    /// A builder with HazelJS's defaults: prefix `hazeljs:discovery:`, TTL 90 s; 1 s per Redis call, entries up to
    /// [`DEFAULT_MAX_ENTRY_SIZE`]. Give it its connection with [`RedisRegistryBuilder::redis`] (`build` needs one).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_redis_discovery::RedisRegistry;
    ///
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let registry = RedisRegistry::builder()
    ///     .redis(client.get_connection_manager().await?)
    ///     .prefix("shop:discovery:")
    ///     .ttl(Duration::from_secs(15))
    ///     .build()?;
    /// # let _ = registry; Ok(()) }
    /// ```
    pub fn builder() -> RedisRegistryBuilder<()> {
        RedisRegistryBuilder {
            connection: (),
            settings: RegistrySettings {
                prefix: "hazeljs:discovery:".to_owned(),
                ttl: Duration::from_secs(90),
                redis_timeout: Duration::from_secs(1),
                max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
            },
        }
    }
}

impl<C> RedisRegistryBuilder<C> {
    /// The connection (a `ConnectionManager`, a `MultiplexedConnection`, a cluster connection, a
    /// `HealingConnection`, a `SentinelConnection`, ...). A Cluster is recognised on its own.
    pub fn redis<C2>(self, connection: C2) -> RedisRegistryBuilder<C2>
    where
        C2: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        RedisRegistryBuilder {
            connection,
            settings: self.settings,
        }
    }

    /// The key prefix, used exactly as given (HazelJS's default is `hazeljs:discovery:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// The instance TTL (the service set gets twice as long): whole seconds, at least 1 s, since HazelJS's layout
    /// writes it with `EX`. Heartbeats go every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// The deadline of each Redis call (default 1 s).
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// The largest instance entry read, in bytes (default [`DEFAULT_MAX_ENTRY_SIZE`], 64 KiB): a longer one is
    /// skipped (that instance only; at most this many bytes plus one are transferred). HazelJS's entries are well
    /// under 1 KiB.
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.settings.max_entry_size = bytes;
        self
    }
}

impl<C> RedisRegistryBuilder<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the TTL is under 1 s or not whole seconds, the Redis timeout is zero, or the entry size
    /// cap is zero.
    pub fn build(self) -> Result<RedisRegistry<C>, ConfigError> {
        if self.settings.ttl < Duration::from_secs(1) || self.settings.ttl.subsec_nanos() != 0 {
            return Err(config_error(
                "ttl",
                format!(
                    "the registry TTL is written with EX (HazelJS's layout), so it is whole seconds, at least 1 s; \
                     got {:?}",
                    self.settings.ttl
                ),
            ));
        }
        if self.settings.redis_timeout.is_zero() {
            return Err(config_error(
                "redis_timeout",
                "the Redis timeout must be above zero",
            ));
        }
        if self.settings.max_entry_size == 0 {
            return Err(config_error(
                "max_entry_size",
                "the entry size cap must be at least 1 byte (HazelJS's entries are well under 1 KiB)",
            ));
        }
        Ok(RedisRegistry {
            connection: self.connection,
            ttl: self.settings.ttl,
            timeout: self.settings.redis_timeout,
            topology: Arc::new(AtomicU8::new(UNKNOWN)),
            max_entry_size: self.settings.max_entry_size,
            warned: Arc::default(),
            calls: CallRecorder::new(&format!("registry:{}", self.settings.prefix)),
            prefix: Arc::from(self.settings.prefix),
        })
    }
}

/// An invalid registry configuration: `field` is the setting to change.
fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("registry", field, message)
}

/// Whether an `INFO cluster` reply says `cluster_enabled:1`: one node's text, or, through a cluster client (which
/// sends `INFO` to every node), a map of node to text.
fn says_cluster_enabled(info: &redis::Value) -> bool {
    let text_says = |text: &str| text.lines().any(|line| line.trim() == "cluster_enabled:1");
    match info {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).is_ok_and(text_says),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            text_says(text)
        }
        redis::Value::Map(entries) => entries.iter().any(|(_, text)| says_cluster_enabled(text)),
        redis::Value::Array(values) => values.iter().any(says_cluster_enabled),
        _ => false,
    }
}

/// Whether `error` is a `CROSSSLOT` reply: the keys of one command or transaction are in different Cluster slots.
fn is_cross_slot(error: &RegistryError) -> bool {
    matches!(error, RegistryError::Redis(error) if error.code() == Some("CROSSSLOT"))
}

/// The default [`RedisRegistryBuilder::max_entry_size`]: 64 KiB.
pub const DEFAULT_MAX_ENTRY_SIZE: usize = 64 * 1024;

/// At most this many expired ids are removed from a service's set per read.
const PRUNE_PER_READ: usize = 100;

/// Removes from the set `KEYS[1]` each member `ARGV[i]` whose instance key `KEYS[i + 1]` does not exist, checked
/// atomically (a heartbeat re-creating the entry meanwhile is not undone).
const PRUNE_SCRIPT: &str = r"
local removed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return removed
";

/// Why a stored entry is skipped.
#[derive(Debug)]
pub(crate) enum Undecodable {
    /// Longer than the size cap.
    TooLarge,
    /// Not an instance's JSON.
    Json(serde_json::Error),
}

impl fmt::Display for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("larger than the size cap"),
            Self::Json(error) => write!(f, "not an instance: {error}"),
        }
    }
}

/// Decodes a stored instance: at most `max` bytes of HazelJS JSON. Never panics, whatever the bytes.
pub(crate) fn decode_entry(bytes: &[u8], max: usize) -> Result<Instance, Undecodable> {
    if bytes.len() > max {
        return Err(Undecodable::TooLarge);
    }
    serde_json::from_slice(bytes).map_err(Undecodable::Json)
}

/// Whether the stored entry still says what was registered, where it matters for routing and filtering (status
/// and `lastHeartbeat` are the heartbeat's to write; unknown fields are others').
fn same_registration(stored: &Instance, ours: &Instance) -> bool {
    stored.id == ours.id
        && stored.name == ours.name
        && stored.host == ours.host
        && stored.port == ours.port
        && stored.protocol == ours.protocol
        && stored.metadata == ours.metadata
        && stored.health_check_path == ours.health_check_path
        && stored.health_check_interval == ours.health_check_interval
        && stored.zone == ours.zone
        && stored.tags == ours.tags
}

impl<C> fmt::Debug for RedisRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field(
                "cluster",
                &(self.topology.load(Ordering::Relaxed) == CLUSTER),
            )
            .field("max_entry_size", &self.max_entry_size)
            .finish_non_exhaustive()
    }
}

impl<C> RedisRegistry<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Whether the server is a Redis Cluster: asked once (`INFO cluster`), or learnt from a `CROSSSLOT` reply. One
    /// that refuses `INFO` (an ACL without it) is a single node until a `CROSSSLOT` says otherwise. A server that
    /// cannot be asked now (down, late) fails the call at once, as its command would: the call waits one deadline,
    /// not two, and the question is asked again on the next call.
    async fn is_cluster(&self) -> Result<bool, RegistryError> {
        match self.topology.load(Ordering::Acquire) {
            CLUSTER => return Ok(true),
            SINGLE_NODE => return Ok(false),
            _ => {}
        }
        let mut connection = self.connection.clone();
        let info = self
            .calls
            .within(
                self.timeout,
                redis::cmd("INFO")
                    .arg("cluster")
                    .query_async::<redis::Value>(&mut connection),
            )
            .await;
        let learnt = match info {
            Ok(Ok(info)) => {
                if says_cluster_enabled(&info) {
                    CLUSTER
                } else {
                    SINGLE_NODE
                }
            }
            Ok(Err(error)) if error.code().is_some() => SINGLE_NODE,
            Ok(Err(error)) => return Err(RegistryError::Redis(error)),
            Err(_) => return Err(RegistryError::Timeout),
        };
        // Never downgrade a CROSSSLOT's verdict.
        let _ =
            self.topology
                .compare_exchange(UNKNOWN, learnt, Ordering::AcqRel, Ordering::Acquire);
        Ok(self.topology.load(Ordering::Acquire) == CLUSTER)
    }

    /// Learnt from a `CROSSSLOT` reply: the server is a Cluster.
    fn learn_cluster(&self) {
        if self.topology.swap(CLUSTER, Ordering::AcqRel) != CLUSTER {
            tracing::info!(
                prefix = %self.prefix,
                "the registry's Redis is a Cluster (CROSSSLOT): sending each command on its own from now on"
            );
        }
    }

    /// Its Redis calls so far: answered, failed, timed out, and the latency of the answered ones. With the
    /// `metrics` feature they are also `tower_redis_calls_total{client="registry:<prefix>"}` and
    /// `tower_redis_call_duration_seconds`, as every crate of the workspace reports its Redis calls.
    pub fn redis_stats(&self) -> GuardStats {
        self.calls.stats()
    }

    /// The instance TTL.
    pub fn instance_ttl(&self) -> Duration {
        self.ttl
    }

    /// The pub/sub channel of change hints: `{prefix}events`.
    pub fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The key of an instance.
    pub fn instance_key(&self, id: &str) -> String {
        format!("{}instance:{id}", self.prefix)
    }

    /// The key of a service's set.
    pub fn service_key(&self, name: &str) -> String {
        format!("{}service:{name}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue + Send>(
        &self,
        pipe: redis::Pipeline,
    ) -> Result<T, RegistryError> {
        let mut connection = self.connection.clone();
        self.calls
            .within(self.timeout, pipe.query_async::<T>(&mut connection))
            .await
            .map_err(|_| RegistryError::Timeout)?
            .map_err(RegistryError::Redis)
    }

    /// Runs write commands: one MULTI/EXEC on a single node, one by one on a cluster.
    async fn write_all(&self, commands: Vec<redis::Cmd>) -> Result<(), RegistryError> {
        if !self.is_cluster().await? {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for command in &commands {
                pipe.add_command(command.clone()).ignore();
            }
            match self.run::<()>(pipe).await {
                Err(error) if is_cross_slot(&error) => self.learn_cluster(),
                written => return written,
            }
        }
        for command in commands {
            let mut connection = self.connection.clone();
            self.calls
                .within(
                    self.timeout,
                    command.query_async::<redis::Value>(&mut connection),
                )
                .await
                .map_err(|_| RegistryError::Timeout)??;
        }
        Ok(())
    }

    /// The commands that write `instance`; `set_pttl` is the service set's current `PTTL` (negative: no TTL, or
    /// no set).
    fn write(&self, instance: &Instance, set_pttl: i64) -> Vec<redis::Cmd> {
        let ttl = self.ttl.as_secs().max(1);
        let json = serde_json::to_string(instance).unwrap_or_default();
        let mut set = redis::cmd("SET");
        set.arg(self.instance_key(&instance.id))
            .arg(json)
            .arg("EX")
            .arg(ttl);
        let mut add = redis::cmd("SADD");
        add.arg(self.service_key(&instance.name)).arg(&instance.id);
        let mut commands = vec![set, add];
        if extends_set_ttl(set_pttl, ttl * 2) {
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(self.service_key(&instance.name)).arg(ttl * 2);
            commands.push(expire);
        }
        commands
    }

    /// The service set's `PTTL` (negative: no TTL, or no set).
    async fn set_pttl(&self, service: &str) -> Result<i64, RegistryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PTTL").arg(self.service_key(service));
        let (pttl,): (i64,) = self.run(pipe).await?;
        Ok(pttl)
    }

    /// Reads many instance keys, each at most `max_entry_size + 1` bytes (`GETRANGE`; a missing key reads empty):
    /// one pipeline on a single node, concurrent commands on a cluster. A key's own error reply (a wrong type) is
    /// that key's `Err`; a connection error or a timeout fails the whole read.
    async fn read_all(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<redis::RedisResult<Vec<u8>>>, RegistryError> {
        let end = self.max_entry_size;
        if self.is_cluster().await? {
            let reads = keys.into_iter().map(|key| {
                let mut connection = self.connection.clone();
                async move {
                    let read = self
                        .calls
                        .within(
                            self.timeout,
                            redis::cmd("GETRANGE")
                                .arg(key)
                                .arg(0)
                                .arg(end)
                                .query_async::<Vec<u8>>(&mut connection),
                        )
                        .await
                        .map_err(|_| RegistryError::Timeout)?;
                    match read {
                        Err(error) if error.code().is_none() => Err(RegistryError::Redis(error)),
                        read => Ok(read),
                    }
                }
            });
            return futures_util::future::try_join_all(reads).await;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("GETRANGE").arg(key).arg(0).arg(end);
        }
        self.run(pipe).await
    }

    /// Removes up to [`PRUNE_PER_READ`] `ids` whose instance key does not exist from `service`'s set. Best effort:
    /// a failure (a reader whose ACL does not allow it, say) is logged and changes nothing else.
    async fn prune(&self, service: &str, ids: &[&str]) {
        let ids = &ids[..ids.len().min(PRUNE_PER_READ)];
        if ids.is_empty() {
            return;
        }
        let mut connection = self.connection.clone();
        let set = self.service_key(service);
        let Ok(cluster) = self.is_cluster().await else {
            tracing::debug!(%service, "not removing expired ids: Redis did not answer");
            return;
        };
        let mut removed = None;
        if !cluster {
            let script = redis::Script::new(PRUNE_SCRIPT);
            let mut invocation = script.key(&set);
            for id in ids {
                invocation.key(self.instance_key(id)).arg(*id);
            }
            let checked = self
                .calls
                .within(self.timeout, invocation.invoke_async(&mut connection))
                .await;
            match checked {
                Ok(Err(error)) if error.code() == Some("CROSSSLOT") => self.learn_cluster(),
                checked => removed = Some(checked),
            }
        }
        let removed: Result<redis::RedisResult<u64>, _> = match removed {
            Some(removed) => removed,
            None => {
                // The set and the instance keys are in different slots: a plain SREM (a heartbeat re-adds its id).
                let mut remove = redis::cmd("SREM");
                remove.arg(&set).arg(ids);
                self.calls
                    .within(self.timeout, remove.query_async(&mut connection))
                    .await
            }
        };
        match removed {
            Ok(Ok(removed)) => {
                tracing::debug!(%service, removed, "removed expired ids from the service set");
            }
            Ok(Err(error)) => self.warn_once(
                format!("prune:{service}"),
                format_args!("cannot remove expired ids from {set}: {error}"),
            ),
            Err(_) => tracing::debug!(%service, "removing expired ids timed out"),
        }
    }

    /// Logs `message` at warn the first time `what` goes wrong, at debug after that (every poll would repeat it).
    fn warn_once(&self, what: String, message: fmt::Arguments<'_>) {
        let first = {
            let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
            if warned.len() >= 1_024 {
                warned.clear();
            }
            warned.insert(what)
        };
        if first {
            tracing::warn!("{message}");
        } else {
            tracing::debug!("{message}");
        }
    }

    /// Removes set members whose instance key has expired, and deletes empty sets, as HazelJS's cleanup does.
    ///
    /// # Errors
    ///
    /// [`RegistryError`] when Redis fails or is late.
    pub async fn cleanup(&self, service: &str) -> Result<usize, RegistryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.service_key(service));
        let (members,): (Vec<String>,) = self.run(pipe).await?;
        let mut removed = 0;
        for id in members {
            let mut pipe = redis::pipe();
            pipe.cmd("EXISTS").arg(self.instance_key(&id));
            let (exists,): (bool,) = self.run(pipe).await?;
            if !exists {
                let mut pipe = redis::pipe();
                pipe.cmd("SREM")
                    .arg(self.service_key(service))
                    .arg(&id)
                    .ignore();
                self.run::<()>(pipe).await?;
                removed += 1;
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SCARD").arg(self.service_key(service));
        let (left,): (u64,) = self.run(pipe).await?;
        if left == 0 {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(self.service_key(service)).ignore();
            self.run::<()>(pipe).await?;
        }
        Ok(removed)
    }
}

/// Whether to (re)set a service set's TTL to `wanted_secs`, given its `PTTL` now: only to lengthen it. HazelJS's
/// heartbeat refreshes the set's TTL but never re-adds its id, so an instance with a shorter TTL than the others in
/// its service must not shorten the set's: once it stopped, the set would expire and take the other (HazelJS)
/// instances with it for good.
fn extends_set_ttl(pttl: i64, wanted_secs: u64) -> bool {
    u64::try_from(pttl).map_or(true, |pttl| pttl < wanted_secs.saturating_mul(1_000))
}

impl<C> Registry for RedisRegistry<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn register(&self, instance: &Instance) -> Result<(), RegistryError> {
        let set_pttl = self.set_pttl(&instance.name).await?;
        self.write_all(self.write(instance, set_pttl)).await
    }

    async fn heartbeat(
        &self,
        instance: &Instance,
        status: Status,
    ) -> Result<Heartbeat, RegistryError> {
        // Read what is stored, so fields written by others (HazelJS keeps unknown fields too) survive; re-create
        // the entry from our own copy if it is missing (HazelJS's heartbeat never does, and its instance vanishes),
        // and rewrite it from our own copy if someone changed where it routes to (or broke it).
        let key = self.instance_key(&instance.id);
        let (stored, set_pttl): (redis::RedisResult<Option<Vec<u8>>>, i64) =
            if self.is_cluster().await? {
                // Two slots: two single-key reads.
                let mut connection = self.connection.clone();
                let get = async {
                    self.calls
                        .within(
                            self.timeout,
                            redis::cmd("GET")
                                .arg(&key)
                                .query_async::<Option<Vec<u8>>>(&mut connection),
                        )
                        .await
                        .map_err(|_| RegistryError::Timeout)
                };
                futures_util::future::try_join(get, self.set_pttl(&instance.name)).await?
            } else {
                let mut pipe = redis::pipe();
                pipe.ignore_errors()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("PTTL")
                    .arg(self.service_key(&instance.name));
                let (stored, pttl): (redis::RedisResult<Option<Vec<u8>>>, redis::RedisResult<i64>) =
                    self.run(pipe).await?;
                (stored, pttl?)
            };
        let (mut current, outcome) = match stored {
            Ok(None) => (instance.clone(), Heartbeat::Recreated),
            Ok(Some(bytes)) => match decode_entry(&bytes, self.max_entry_size) {
                Ok(stored) if same_registration(&stored, instance) => {
                    (stored, Heartbeat::Refreshed)
                }
                Ok(_) | Err(_) => (instance.clone(), Heartbeat::Healed),
            },
            // A wrong-typed key (SET replaces it); a connection error fails the heartbeat.
            Err(error) if error.code().is_some() => (instance.clone(), Heartbeat::Healed),
            Err(error) => return Err(RegistryError::Redis(error)),
        };
        if outcome == Heartbeat::Healed {
            tracing::warn!(
                id = %instance.id,
                "the stored registry entry differs from the registered instance; rewriting it"
            );
        }
        current.status = status;
        current.last_heartbeat = iso8601(std::time::SystemTime::now());
        self.write_all(self.write(&current, set_pttl)).await?;
        Ok(outcome)
    }

    async fn deregister(&self, instance: &Instance) -> Result<(), RegistryError> {
        let mut remove = redis::cmd("SREM");
        remove
            .arg(self.service_key(&instance.name))
            .arg(&instance.id);
        let mut delete = redis::cmd("DEL");
        delete.arg(self.instance_key(&instance.id));
        self.write_all(vec![remove, delete]).await
    }

    async fn instances(&self, service: &str) -> Result<Vec<Instance>, RegistryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.service_key(service));
        let (mut ids,): (Vec<String>,) = self.run(pipe).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let values = self
            .read_all(ids.iter().map(|id| self.instance_key(id)).collect())
            .await?;
        let mut instances = Vec::with_capacity(values.len());
        let mut expired: Vec<&str> = Vec::new();
        for (id, value) in ids.iter().zip(values) {
            let bytes = match value {
                Ok(bytes) if bytes.is_empty() => {
                    expired.push(id); // no such key (GETRANGE reads it empty): expired
                    continue;
                }
                Ok(bytes) => bytes,
                Err(error) => {
                    self.warn_once(
                        format!("{service}/{id}"),
                        format_args!("skipping registry entry {id} of {service}: {error}"),
                    );
                    continue;
                }
            };
            match decode_entry(&bytes, self.max_entry_size) {
                Ok(instance) if instance.id == *id && instance.name == service => {
                    instances.push(instance);
                }
                Ok(instance) => self.warn_once(
                    format!("{service}/{id}"),
                    format_args!(
                        "skipping registry entry {id} of {service}: it names {} of {}",
                        instance.id, instance.name
                    ),
                ),
                Err(error) => self.warn_once(
                    format!("{service}/{id}"),
                    format_args!("skipping registry entry {id} of {service}: {error}"),
                ),
            }
        }
        self.prune(service, &expired).await;
        Ok(instances)
    }

    async fn announce(&self, service: &str) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(self.events_channel())
            .arg(service)
            .ignore();
        self.run::<()>(pipe).await
    }

    async fn services(&self) -> Result<Vec<String>, RegistryError> {
        let service_prefix = format!("{}service:", self.prefix);
        let pattern = format!("{service_prefix}*");
        let mut names = BTreeSet::new();
        if self.is_cluster().await? {
            // SCAN walks one node only; the cluster client sends KEYS to every primary and joins the answers. KEYS
            // walks the whole keyspace, so this is for an occasional listing, not a hot path.
            let mut connection = self.connection.clone();
            let keys: Vec<String> = self
                .calls
                .within(
                    self.timeout,
                    redis::cmd("KEYS")
                        .arg(&pattern)
                        .query_async(&mut connection),
                )
                .await
                .map_err(|_| RegistryError::Timeout)??;
            names.extend(
                keys.iter()
                    .filter_map(|key| key.strip_prefix(&service_prefix).map(str::to_owned)),
            );
            return Ok(names.into_iter().collect());
        }
        let mut cursor: u64 = 0;
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(100);
            let ((next, keys),): ((u64, Vec<String>),) = self.run(pipe).await?;
            names.extend(
                keys.iter()
                    .filter_map(|key| key.strip_prefix(&service_prefix).map(str::to_owned)),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(names.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_entry, extends_set_ttl, same_registration, says_cluster_enabled};

    #[test]
    fn info_cluster_is_read_from_one_node_or_from_every_node_of_a_cluster() {
        use redis::Value;
        let text = |enabled: u8| {
            Value::BulkString(format!("# Cluster\r\ncluster_enabled:{enabled}\r\n").into_bytes())
        };
        assert!(says_cluster_enabled(&text(1)));
        assert!(!says_cluster_enabled(&text(0)));
        let nodes = Value::Map(vec![
            (Value::BulkString(b"127.0.0.1:7000".to_vec()), text(1)),
            (Value::BulkString(b"127.0.0.1:7001".to_vec()), text(1)),
        ]);
        assert!(says_cluster_enabled(&nodes));
        assert!(!says_cluster_enabled(&Value::Nil));
    }
    use crate::instance::Instance;
    use proptest::prelude::*;

    const VALID: &str = r#"{"id":"user-service:127.0.0.1:3101:1795310805903","name":"user-service","host":"127.0.0.1","port":3101,"protocol":"http","metadata":{"version":"1.0.0","weight":2},"healthCheckPath":"/health","healthCheckInterval":2000,"zone":"us-east-1","tags":["api","users"],"status":"UP","lastHeartbeat":"2026-11-22T01:26:47.941Z","registeredAt":"2026-11-22T01:26:45.903Z"}"#;

    #[test]
    fn an_entry_over_the_size_cap_is_not_decoded() {
        assert!(decode_entry(VALID.as_bytes(), VALID.len()).is_ok());
        assert!(decode_entry(VALID.as_bytes(), VALID.len() - 1).is_err());
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let nested = format!(
            r#"{{"id":"a","name":"a","host":"h","port":1,"x":{}1{}}}"#,
            "[".repeat(50_000),
            "]".repeat(50_000)
        );
        assert!(decode_entry(nested.as_bytes(), usize::MAX).is_err());
    }

    #[test]
    fn a_changed_host_port_or_tag_is_a_different_registration_a_heartbeat_is_not() {
        let ours = Instance::new("svc", "10.0.0.1", 80);
        let mut stored = ours.clone();
        stored.last_heartbeat = "later".to_owned();
        stored.status = crate::Status::Up;
        stored.extra.insert("owner".to_owned(), "team-a".into());
        assert!(same_registration(&stored, &ours));
        let mut forged = ours.clone();
        forged.host = "203.0.113.9".to_owned();
        assert!(!same_registration(&forged, &ours));
        let mut forged = ours.clone();
        forged.port = 81;
        assert!(!same_registration(&forged, &ours));
        let mut forged = ours.clone();
        forged.tags.push("canary".to_owned());
        assert!(!same_registration(&forged, &ours));
    }

    /// A valid encoding with some bytes replaced, removed or inserted.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let edits =
            prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..8);
        edits.prop_map(|edits| {
            let mut bytes = VALID.as_bytes().to_vec();
            for (at, kind, byte) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] = byte,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
            }
            bytes
        })
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2_048)) {
            let _ = decode_entry(&bytes, super::DEFAULT_MAX_ENTRY_SIZE);
        }

        #[test]
        fn decoding_a_mutated_valid_entry_never_panics(bytes in mutated()) {
            if let Ok(instance) = decode_entry(&bytes, super::DEFAULT_MAX_ENTRY_SIZE) {
                // Whatever decodes can be written back and used.
                prop_assert!(serde_json::to_string(&instance).is_ok());
                let _ = instance.base_uri();
                let _ = instance.weight();
            }
        }

        #[test]
        fn decoding_a_truncated_valid_entry_never_panics(len in 0..VALID.len()) {
            prop_assert!(decode_entry(&VALID.as_bytes()[..len], super::DEFAULT_MAX_ENTRY_SIZE).is_err());
        }
    }

    #[test]
    fn the_service_set_ttl_is_only_ever_lengthened() {
        // A new set (-2) or one without a TTL (-1) gets one.
        assert!(extends_set_ttl(-2, 4));
        assert!(extends_set_ttl(-1, 4));
        // Our own set, some time after our last heartbeat: refreshed.
        assert!(extends_set_ttl(3_400, 4));
        assert!(!extends_set_ttl(4_000, 4));
        // A HazelJS instance's set (2 x 90 s): not shortened to our 2 x 2 s.
        assert!(!extends_set_ttl(179_000, 4));
        assert!(extends_set_ttl(179_000, 180));
    }
}
