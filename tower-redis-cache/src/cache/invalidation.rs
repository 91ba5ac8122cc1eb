//! Invalidation by key, prefix and tag: in both tiers, owed and replayed while Redis is away, and announced to
//! every subscribed instance.

use std::fmt;
use std::sync::Arc;

use tower_redis_core::subscription::Listener;

use super::{CacheClock, HttpCache, Inner, RedisTier};
use crate::invalidated::Invalidated;
use crate::memory::MemoryTier;
use crate::owed::{self, Owing};
use crate::stats::Event;

/// How an invalidation is described on the channel.
enum Message<'a> {
    Keys(&'a [String]),
    Tag(&'a str),
    Prefix(&'a str),
    All,
}

impl HttpCache {
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
        self.inner.invalidated.record(&owing, self.now_ms());
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
        self.inner.invalidated.record(&owing, self.now_ms());
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
        self.inner.invalidated.record(&owing, self.now_ms());
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

    /// The Redis half of an invalidation: delete, then tell the other instances (one round trip on one server once
    /// a tag's members or a prefix's keys are known).
    async fn invalidate_in_redis(
        &self,
        redis: &RedisTier,
        owing: &Owing,
    ) -> Result<u64, InvalidateError> {
        match owing {
            Owing::Keys(keys) => {
                let messages = self.messages(&[Message::Keys(keys)]);
                admin(redis, || redis.store.purge(keys, None, &messages)).await
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
                // The keys' message first: an instance that does not know the tag's members still drops them.
                let messages = self.messages(&[Message::Keys(&keys), Message::Tag(tag)]);
                admin(redis, || redis.store.purge(&keys, Some(tag), &messages)).await
            }
        }
    }

    async fn invalidate_prefix_in_redis(
        &self,
        redis: &RedisTier,
        prefix: &str,
    ) -> Result<u64, InvalidateError> {
        let keys = admin(redis, || redis.store.keys_with_prefix(prefix)).await?;
        let messages = self.messages(&[Message::Prefix(prefix)]);
        admin(redis, || redis.store.purge(&keys, None, &messages)).await
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
        for text in self.messages(&[message]) {
            if let Err(error) = admin(redis, || redis.store.publish(&text)).await {
                tracing::warn!(%error, "could not announce an invalidation to other instances");
            }
        }
    }

    /// The channel's text for each of `messages` (none for an empty list of keys).
    fn messages(&self, messages: &[Message<'_>]) -> Vec<String> {
        messages
            .iter()
            .filter_map(|message| {
                let mut text = format!("{}\n", self.inner.instance);
                match message {
                    Message::Keys([]) => return None,
                    Message::Keys(keys) => {
                        text.push('k');
                        for key in *keys {
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
                Some(text)
            })
            .collect()
    }
}

/// Replays the owed invalidations, oldest first, until Redis has taken them all; waits with backoff and jitter
/// after each failed attempt. Holds the cache weakly: dropping the last handle stops it.
pub(super) async fn replay(inner: std::sync::Weak<Inner>) {
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
pub(super) fn unreachable(error: &InvalidateError) -> bool {
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

/// What the invalidation subscription does: apply other instances' invalidations to the memory tier.
pub(super) struct Invalidations {
    pub(super) clock: CacheClock,
    pub(super) instance: String,
    pub(super) memory: Option<MemoryTier>,
    pub(super) invalidated: Arc<Invalidated>,
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
                self.clock.now_ms(),
            );
        }
    }
}

/// Applies another instance's invalidation message (received at `now`) to this instance's memory tier.
fn apply(
    text: &str,
    instance: &str,
    memory: Option<&MemoryTier>,
    invalidated: &Invalidated,
    now: u64,
) {
    let mut lines = text.split('\n');
    if lines.next() == Some(instance) {
        return;
    }
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

    use super::{InvalidateError, unreachable};

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
