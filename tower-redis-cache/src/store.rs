//! The Redis tier: entries, the key index, tags, the cross-instance fill lock, and the invalidation channel.
//!
//! The connection type is erased behind [`Store`] so the layer and its service are not generic over it.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use tower_redis_core::key::hash_tag;
use tower_redis_core::topology::{Topology, is_cross_slot};

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The hash field holding the `Vary` a key's variants were stored with.
pub(crate) const VARY_FIELD: &str = "~vary";
/// The hash field of the one variant of a response without `Vary`.
pub(crate) const PLAIN_FIELD: &str = "~";
/// The hash field holding when a soft purge marked the key's variants stale (ms since the epoch).
pub(crate) const PURGED_FIELD: &str = "~purged";
/// More variants than this under one key start the key afresh.
const MAX_FIELDS: usize = 64;

/// Writes one variant: a key of the wrong type, a different `Vary`, or too many variants start the hash afresh; the
/// TTL only ever grows.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local kind = redis.call('TYPE', key).ok
if kind ~= 'none' then
  if kind ~= 'hash' or redis.call('HGET', key, '~vary') ~= ARGV[1]
     or redis.call('HLEN', key) > tonumber(ARGV[5]) then
    redis.call('DEL', key)
  end
end
redis.call('HSET', key, '~vary', ARGV[1], ARGV[2], ARGV[3])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return 1
",
    )
});

/// Adds a member to a sorted set scored by expiry, drops expired members, and keeps the set alive as long as its
/// longest-lived member.
static INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
if redis.call('TYPE', key).ok ~= 'zset' then redis.call('DEL', key) end
redis.call('ZADD', key, ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[3])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return 1
",
    )
});

/// Marks an existing entry's variants stale as of `ARGV[1]` (a soft purge); an earlier mark stands. Returns whether
/// the key held an entry.
static SOFT_PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
local earlier = tonumber(redis.call('HGET', KEYS[1], '~purged') or '')
if earlier == nil or earlier > tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], '~purged', ARGV[1]) end
return 1
",
    )
});

/// Releases the fill lock only if it is still ours.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

// Reads that decide what to delete or whether to wait run as scripts: a cluster client that routes reads to replicas
// (`read_routing_strategy`) sends scripts to the primary, so these never see a replica's lagging copy.

/// Whether the fill lock is held.
static LOCKED: LazyLock<Script> =
    LazyLock::new(|| Script::new("return redis.call('EXISTS', KEYS[1])"));

/// The members of a tag's sorted set (none for a key of another type).
static TAGGED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return {} end
return redis.call('ZRANGE', KEYS[1], 0, -1)
",
    )
});

/// One `ZSCAN` page of the key index (an empty last page for a key of another type).
static INDEX_PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return {'0', {}} end
return redis.call('ZSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
",
    )
});

/// What one read of a key returned.
#[derive(Debug, Default)]
pub(crate) struct Read {
    /// The `Vary` the key's variants were stored with (`""` for none); `None` when the key does not exist.
    pub(crate) vary: Option<String>,
    /// The requested variant's bytes.
    pub(crate) entry: Option<Bytes>,
    /// When a soft purge marked the key's variants stale, if one did.
    pub(crate) purged: Option<u64>,
}

/// A write of one variant.
#[derive(Debug)]
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) vary: String,
    pub(crate) field: String,
    pub(crate) bytes: Bytes,
    pub(crate) ttl_ms: u64,
    pub(crate) now_ms: u64,
    pub(crate) tags: Vec<String>,
}

/// The Redis operations the cache needs, over any connection.
pub(crate) trait Store: Send + Sync + 'static {
    fn read<'a>(&'a self, key: &'a str, field: &'a str) -> BoxFuture<'a, RedisResult<Read>>;
    fn read_field<'a>(
        &'a self,
        key: &'a str,
        field: &'a str,
    ) -> BoxFuture<'a, RedisResult<Option<Bytes>>>;
    fn write(&self, write: Write) -> BoxFuture<'_, RedisResult<()>>;
    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, RedisResult<Vec<String>>>;
    fn tagged<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, RedisResult<Vec<String>>>;
    fn forget_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, RedisResult<()>>;
    /// The Redis half of an invalidation: deletes these entries (and their index members), forgets `tag`'s set,
    /// then publishes `messages` on the invalidation channel, in that order. Returns how many entries were deleted.
    /// One round trip on one server (a pipeline); on a Cluster, whose slots a pipeline may not cross, the deletes go
    /// out together and the messages after them. A message that cannot be published is logged, not an error.
    fn purge<'a>(
        &'a self,
        keys: &'a [String],
        tag: Option<&'a str>,
        messages: &'a [String],
    ) -> BoxFuture<'a, RedisResult<u64>>;
    /// A soft purge: marks these entries stale as of `at` (their variants stored by then), then publishes
    /// `messages`. Returns how many entries were marked.
    fn soft_purge<'a>(
        &'a self,
        keys: &'a [String],
        at: u64,
        messages: &'a [String],
    ) -> BoxFuture<'a, RedisResult<u64>>;
    fn lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, RedisResult<bool>>;
    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> BoxFuture<'a, RedisResult<()>>;
    fn locked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, RedisResult<bool>>;
    fn publish<'a>(&'a self, message: &'a str) -> BoxFuture<'a, RedisResult<()>>;
    /// The Redis key of an entry, for tests and documentation.
    fn entry_key(&self, key: &str) -> String;
}

/// Redis key names under a prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: String) -> Self {
        Self { prefix }
    }

    /// `{prefix}e:{<key>}`: the whole cache key is the Cluster hash tag.
    pub(crate) fn entry(&self, key: &str) -> String {
        format!("{}e:{{{}}}", self.prefix, hash_tag(key))
    }

    pub(crate) fn lock(&self, key: &str) -> String {
        format!("{}l:{{{}}}", self.prefix, hash_tag(key))
    }

    pub(crate) fn tag(&self, tag: &str) -> String {
        format!("{}t:{{{}}}", self.prefix, hash_tag(tag))
    }

    pub(crate) fn index(&self) -> String {
        format!("{}index", self.prefix)
    }

    pub(crate) fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }
}

pub(crate) struct RedisStore<C> {
    connection: C,
    keys: Keys,
    topology: Topology,
}

impl<C> RedisStore<C> {
    pub(crate) fn new(connection: C, keys: Keys) -> Self {
        Self {
            connection,
            keys,
            topology: Topology::new(),
        }
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// [`Store::purge`] on one server: one pipeline, run in order. `None` when a `CROSSSLOT` reply says the server
    /// is a Cluster after all (nothing was deleted then: Redis refuses a cross-slot command whole).
    async fn purge_pipelined(
        &self,
        keys: &[String],
        tag: Option<&str>,
        messages: &[String],
    ) -> RedisResult<Option<u64>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if !keys.is_empty() {
            let del = pipe.cmd("DEL");
            for key in keys {
                del.arg(self.keys.entry(key));
            }
            pipe.cmd("ZREM").arg(self.keys.index()).arg(keys);
        }
        if let Some(tag) = tag {
            pipe.cmd("DEL").arg(self.keys.tag(tag));
        }
        for message in messages {
            pipe.cmd("PUBLISH").arg(self.keys.channel()).arg(message);
        }
        if pipe.is_empty() {
            return Ok(Some(0));
        }
        let mut connection = self.connection.clone();
        let mut replies = pipe
            .query_async::<Vec<RedisResult<redis::Value>>>(&mut connection)
            .await?
            .into_iter();
        let mut deleted = 0;
        if !keys.is_empty() {
            match replies.next() {
                Some(Ok(reply)) => deleted = redis::from_redis_value(reply)?,
                Some(Err(error)) if is_cross_slot(&error) => return Ok(None),
                Some(Err(error)) => return Err(error),
                None => {}
            }
            // A stray index of another type: the entries are gone, which is what counts.
            replies.next();
        }
        if tag.is_some()
            && let Some(Err(error)) = replies.next()
        {
            return Err(error);
        }
        for reply in replies {
            if let Err(error) = reply {
                tracing::warn!(%error, "could not announce an invalidation to other instances");
            }
        }
        Ok(Some(deleted))
    }

    /// [`Store::purge`] on a Cluster: the deletes concurrently (a multi-slot `DEL` is split per node by the cluster
    /// client), then the messages.
    async fn purge_on_cluster(
        &self,
        keys: &[String],
        tag: Option<&str>,
        messages: &[String],
    ) -> RedisResult<u64> {
        let entries = async {
            if keys.is_empty() {
                return Ok(0);
            }
            let mut connection = self.connection.clone();
            let mut del = redis::cmd("DEL");
            for key in keys {
                del.arg(self.keys.entry(key));
            }
            del.query_async::<u64>(&mut connection).await
        };
        let index = async {
            if !keys.is_empty() {
                let mut connection = self.connection.clone();
                let _: RedisResult<u64> = redis::cmd("ZREM")
                    .arg(self.keys.index())
                    .arg(keys)
                    .query_async(&mut connection)
                    .await;
            }
        };
        let forget = async {
            match tag {
                Some(tag) => self.forget_tag(tag).await,
                None => Ok(()),
            }
        };
        let (deleted, (), forgot) = tokio::join!(entries, index, forget);
        let deleted = deleted?;
        forgot?;
        for message in messages {
            if let Err(error) = self.publish(message).await {
                tracing::warn!(%error, "could not announce an invalidation to other instances");
            }
        }
        Ok(deleted)
    }
}

fn is_wrong_type(error: &redis::RedisError) -> bool {
    error.code() == Some("WRONGTYPE")
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn read<'a>(&'a self, key: &'a str, field: &'a str) -> BoxFuture<'a, RedisResult<Read>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let reply: RedisResult<(Option<String>, Option<Vec<u8>>, Option<String>)> =
                redis::cmd("HMGET")
                    .arg(self.keys.entry(key))
                    .arg(VARY_FIELD)
                    .arg(field)
                    .arg(PURGED_FIELD)
                    .query_async(&mut connection)
                    .await;
            match reply {
                Ok((vary, entry, purged)) => Ok(Read {
                    vary,
                    entry: entry.map(Bytes::from),
                    // Anything but a number is no mark.
                    purged: purged.and_then(|purged| purged.parse().ok()),
                }),
                // Something else lives under our key (garbage written by hand, an old format): a miss.
                Err(error) if is_wrong_type(&error) => Ok(Read::default()),
                Err(error) => Err(error),
            }
        })
    }

    fn read_field<'a>(
        &'a self,
        key: &'a str,
        field: &'a str,
    ) -> BoxFuture<'a, RedisResult<Option<Bytes>>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let reply: RedisResult<Option<Vec<u8>>> = redis::cmd("HGET")
                .arg(self.keys.entry(key))
                .arg(field)
                .query_async(&mut connection)
                .await;
            match reply {
                Ok(bytes) => Ok(bytes.map(Bytes::from)),
                Err(error) if is_wrong_type(&error) => Ok(None),
                Err(error) => Err(error),
            }
        })
    }

    fn write(&self, write: Write) -> BoxFuture<'_, RedisResult<()>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let ttl = write.ttl_ms.max(1);
            let expires = write.now_ms.saturating_add(ttl);
            let () = WRITE
                .key(self.keys.entry(&write.key))
                .arg(&write.vary)
                .arg(&write.field)
                .arg(write.bytes.as_ref())
                .arg(ttl)
                .arg(MAX_FIELDS)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)?;
            // The index and the tag sets live in other hash slots, so they are separate calls (not atomic with the
            // write: a crash in between leaves an index member whose entry expires on its own).
            let mut sets = vec![self.keys.index()];
            sets.extend(write.tags.iter().map(|tag| self.keys.tag(tag)));
            for set in sets {
                INDEX
                    .key(set)
                    .arg(&write.key)
                    .arg(expires)
                    .arg(write.now_ms)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut connection)
                    .await?;
            }
            Ok(())
        })
    }

    fn soft_purge<'a>(
        &'a self,
        keys: &'a [String],
        at: u64,
        messages: &'a [String],
    ) -> BoxFuture<'a, RedisResult<u64>> {
        Box::pin(async move {
            // One script call per key (each key is its own slot on a Cluster), all in flight at once on the
            // multiplexed connection; the messages only once every mark is in.
            let marks = keys.iter().map(|key| {
                let mut connection = self.connection.clone();
                let entry = self.keys.entry(key);
                async move {
                    SOFT_PURGE
                        .key(entry)
                        .arg(at)
                        .invoke_async::<u64>(&mut connection)
                        .await
                }
            });
            let mut marked = 0;
            for result in futures_util::future::join_all(marks).await {
                marked += result?;
            }
            for message in messages {
                if let Err(error) = self.publish(message).await {
                    tracing::warn!(%error, "could not announce a soft purge to other instances");
                }
            }
            Ok(marked)
        })
    }

    fn purge<'a>(
        &'a self,
        keys: &'a [String],
        tag: Option<&'a str>,
        messages: &'a [String],
    ) -> BoxFuture<'a, RedisResult<u64>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            if !self.topology.is_cluster(&mut connection).await? {
                if let Some(deleted) = self.purge_pipelined(keys, tag, messages).await? {
                    return Ok(deleted);
                }
                if self.topology.learn_cluster() {
                    tracing::info!(
                        "the cache's Redis is a Cluster (CROSSSLOT): invalidating slot by slot from now on"
                    );
                }
            }
            self.purge_on_cluster(keys, tag, messages).await
        })
    }

    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, RedisResult<Vec<String>>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut cursor: u64 = 0;
            let mut found = Vec::new();
            loop {
                let (next, page): (u64, Vec<String>) = INDEX_PAGE
                    .key(self.keys.index())
                    .arg(cursor)
                    .arg(1000)
                    .invoke_async(&mut connection)
                    .await?;
                // ZSCAN pages alternate member, score.
                found.extend(
                    page.into_iter()
                        .step_by(2)
                        .filter(|member| member.starts_with(prefix)),
                );
                if next == 0 {
                    return Ok(found);
                }
                cursor = next;
            }
        })
    }

    fn tagged<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, RedisResult<Vec<String>>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            TAGGED
                .key(self.keys.tag(tag))
                .invoke_async(&mut connection)
                .await
        })
    }

    fn forget_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            redis::cmd("DEL")
                .arg(self.keys.tag(tag))
                .query_async::<u64>(&mut connection)
                .await
                .map(drop)
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> BoxFuture<'a, RedisResult<bool>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let reply: Option<String> = redis::cmd("SET")
                .arg(self.keys.lock(key))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query_async(&mut connection)
                .await?;
            Ok(reply.is_some())
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            UNLOCK
                .key(self.keys.lock(key))
                .arg(token)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
    }

    fn locked<'a>(&'a self, key: &'a str) -> BoxFuture<'a, RedisResult<bool>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let exists: u64 = LOCKED
                .key(self.keys.lock(key))
                .invoke_async(&mut connection)
                .await?;
            Ok(exists == 1)
        })
    }

    fn publish<'a>(&'a self, message: &'a str) -> BoxFuture<'a, RedisResult<()>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            redis::cmd("PUBLISH")
                .arg(self.keys.channel())
                .arg(message)
                .query_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
    }

    fn entry_key(&self, key: &str) -> String {
        self.keys.entry(key)
    }
}
