//! The [`Registry`] trait and its two implementations: [`MemoryRegistry`] and [`RedisRegistry`] (HazelJS's wire
//! format).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as Clock};

use crate::instance::{Instance, Status, iso8601};

/// Why a registry call failed. Registry errors never take a service down: [`crate::Registration`] retries, and
/// discovery keeps the last good set.
#[derive(Debug)]
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
/// The prefix defaults to `hazeljs:discovery:` and is used exactly as given (end it with `:`). On a single node (the
/// default) a write is one MULTI/EXEC pipeline and a read is `SMEMBERS` then one pipeline of `GET`s. HazelJS's
/// layout has no hash tag, so the keys of one write live in different Cluster slots: with
/// [`RedisRegistry::cluster_mode`] each command is sent on its own (the reads concurrently) and a write is not
/// atomic, and [`Registry::services`] uses `KEYS` (sent to every primary) instead of `SCAN` (one node). Every call
/// has a timeout.
#[derive(Clone)]
pub struct RedisRegistry<C> {
    connection: C,
    prefix: Arc<str>,
    ttl: Duration,
    timeout: Duration,
    cluster: bool,
}

impl<C> fmt::Debug for RedisRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl<C> RedisRegistry<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A registry on `connection` with HazelJS's defaults: prefix `hazeljs:discovery:`, TTL 90 s; 1 s per call.
    pub fn new(connection: C) -> Self {
        Self {
            connection,
            prefix: Arc::from("hazeljs:discovery:"),
            ttl: Duration::from_secs(90),
            timeout: Duration::from_secs(1),
            cluster: false,
        }
    }

    /// The key prefix, used exactly as given (HazelJS's default is `hazeljs:discovery:`).
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// The instance TTL (the service set gets twice as long). Whole seconds; at least 1 s.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The deadline of each registry call.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Set when the connection is a Redis Cluster connection: the keys of one write are in different slots, so
    /// commands go one by one instead of in MULTI/EXEC or multi-slot pipelines.
    #[must_use]
    pub fn cluster_mode(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
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
        tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut connection))
            .await
            .map_err(|_| RegistryError::Timeout)?
            .map_err(RegistryError::Redis)
    }

    /// Runs write commands: one MULTI/EXEC on a single node, one by one on a cluster.
    async fn write_all(&self, commands: Vec<redis::Cmd>) -> Result<(), RegistryError> {
        if self.cluster {
            for command in commands {
                let mut connection = self.connection.clone();
                tokio::time::timeout(
                    self.timeout,
                    command.query_async::<redis::Value>(&mut connection),
                )
                .await
                .map_err(|_| RegistryError::Timeout)??;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for command in commands {
            pipe.add_command(command).ignore();
        }
        self.run::<()>(pipe).await
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

    /// `GET`s of many keys: one pipeline on a single node, concurrent commands on a cluster.
    async fn get_all(&self, keys: Vec<String>) -> Result<Vec<Option<String>>, RegistryError> {
        if self.cluster {
            let reads = keys.into_iter().map(|key| {
                let mut connection = self.connection.clone();
                async move {
                    tokio::time::timeout(
                        self.timeout,
                        redis::cmd("GET").arg(key).query_async(&mut connection),
                    )
                    .await
                    .map_err(|_| RegistryError::Timeout)?
                    .map_err(RegistryError::Redis)
                }
            });
            return futures_util::future::try_join_all(reads).await;
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("GET").arg(key);
        }
        self.run(pipe).await
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
        // the entry from our own copy if it expired (HazelJS's heartbeat never does, and its instance vanishes).
        let (stored, set_pttl): (Option<String>, i64) = if self.cluster {
            // Two slots: two single-key reads.
            let mut get = redis::pipe();
            get.cmd("GET").arg(self.instance_key(&instance.id));
            let ((stored,), set_pttl) =
                futures_util::future::try_join(self.run(get), self.set_pttl(&instance.name))
                    .await?;
            (stored, set_pttl)
        } else {
            let mut pipe = redis::pipe();
            pipe.cmd("GET")
                .arg(self.instance_key(&instance.id))
                .cmd("PTTL")
                .arg(self.service_key(&instance.name));
            self.run(pipe).await?
        };
        let (mut current, outcome) = match stored {
            None => (instance.clone(), Heartbeat::Recreated),
            Some(json) => (
                serde_json::from_str::<Instance>(&json)
                    .ok()
                    .filter(|stored| stored.id == instance.id)
                    .unwrap_or_else(|| instance.clone()),
                Heartbeat::Refreshed,
            ),
        };
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
            .get_all(ids.iter().map(|id| self.instance_key(id)).collect())
            .await?;
        let mut instances = Vec::with_capacity(values.len());
        for (id, value) in ids.iter().zip(values) {
            let Some(json) = value else {
                continue; // expired: HazelJS's cleanup (or ours) removes the member later
            };
            match serde_json::from_str::<Instance>(&json) {
                Ok(instance) => instances.push(instance),
                Err(error) => {
                    tracing::warn!(%id, %error, "skipping a registry entry that does not decode");
                }
            }
        }
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
        if self.cluster {
            // SCAN walks one node only; the cluster client sends KEYS to every primary and joins the answers. KEYS
            // walks the whole keyspace, so this is for an occasional listing, not a hot path.
            let mut connection = self.connection.clone();
            let keys: Vec<String> = tokio::time::timeout(
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
    use super::extends_set_ttl;

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
