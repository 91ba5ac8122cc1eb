//! [`RedisRegistry`]: the registry in Redis, in HazelJS's layout, on a single node or a Cluster.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tower_redis_core::topology::{self, Topology};
use tower_redis_core::{CallRecorder, GuardStats};

use crate::instance::{Instance, Status, iso8601};

use super::entry::{decode_entry, same_registration};
use super::{Heartbeat, Registry, RegistryError};

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
    pub(super) connection: C,
    pub(super) prefix: Arc<str>,
    pub(super) ttl: Duration,
    pub(super) timeout: Duration,
    pub(super) topology: Topology,
    pub(super) max_entry_size: usize,
    pub(super) warned: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Every Redis call's outcome and latency, counted as the other crates count theirs.
    pub(super) calls: CallRecorder,
}

/// Whether `error` is a `CROSSSLOT` reply: the keys of one command or transaction are in different Cluster slots.
fn is_cross_slot(error: &RegistryError) -> bool {
    matches!(error, RegistryError::Redis(error) if topology::is_cross_slot(error))
}

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

impl<C> fmt::Debug for RedisRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("cluster", &(self.topology.known() == Some(true)))
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
        if let Some(known) = self.topology.known() {
            return Ok(known);
        }
        let mut connection = self.connection.clone();
        match self
            .calls
            .within(self.timeout, self.topology.is_cluster(&mut connection))
            .await
        {
            Ok(Ok(cluster)) => Ok(cluster),
            Ok(Err(error)) => Err(RegistryError::Redis(error)),
            Err(_) => Err(RegistryError::Timeout),
        }
    }

    /// Learnt from a `CROSSSLOT` reply: the server is a Cluster.
    fn learn_cluster(&self) {
        if self.topology.learn_cluster() {
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
