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

/// How an invalidation treats what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Purge {
    /// Delete the entries, in both tiers and on every instance (what [`HttpCache::invalidate`] and its siblings
    /// do).
    #[default]
    Hard,
    /// Keep the entries but mark them stale as of now, in both tiers and on every subscribed instance: the next
    /// request revalidates. Where stale-while-revalidate allows it (the response's directive or the route's
    /// setting), it gets the stale response while one background refetch runs; otherwise it waits for that one
    /// refetch, which the requests that come meanwhile share (per instance; across instances with `fill_lock`).
    /// The stale entries also stay usable where staleness is allowed (`max-stale`, stale-if-error, an
    /// unreachable origin). A soft purge that cannot reach Redis is owed as a hard one.
    Soft,
}

/// How an invalidation is described on the channel.
enum Message<'a> {
    Keys(&'a [String]),
    Tag(&'a str),
    Prefix(&'a str),
    All,
    SoftKeys(&'a [String]),
    SoftTag(&'a str),
    SoftPrefix(&'a str),
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
        self.invalidate_with(keys, Purge::Hard).await
    }

    /// [`invalidate`](Self::invalidate), or with [`Purge::Soft`] a soft purge of these keys: they are marked stale
    /// instead of deleted. Returns how many entries were deleted or marked (in Redis when there is a Redis tier).
    ///
    /// # Errors
    ///
    /// As for [`invalidate`](Self::invalidate): the invalidation is then owed (a soft one as a hard one).
    pub async fn invalidate_with(
        &self,
        keys: &[String],
        purge: Purge,
    ) -> Result<u64, InvalidateError> {
        if purge == Purge::Soft {
            return self.soft(Owing::Keys(keys.to_vec())).await;
        }
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
        self.invalidate_prefix_with(prefix, Purge::Hard).await
    }

    /// [`invalidate_prefix`](Self::invalidate_prefix), or with [`Purge::Soft`] a soft purge of every key under
    /// `prefix`.
    ///
    /// # Errors
    ///
    /// As for [`invalidate`](Self::invalidate).
    pub async fn invalidate_prefix_with(
        &self,
        prefix: &str,
        purge: Purge,
    ) -> Result<u64, InvalidateError> {
        if purge == Purge::Soft {
            return self.soft(Owing::Prefix(prefix.to_owned())).await;
        }
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
        self.invalidate_tag_with(tag, Purge::Hard).await
    }

    /// [`invalidate_tag`](Self::invalidate_tag), or with [`Purge::Soft`] a soft purge of every entry with this
    /// tag.
    ///
    /// # Errors
    ///
    /// As for [`invalidate`](Self::invalidate).
    pub async fn invalidate_tag_with(
        &self,
        tag: &str,
        purge: Purge,
    ) -> Result<u64, InvalidateError> {
        if purge == Purge::Soft {
            return self.soft(Owing::Tag(tag.to_owned())).await;
        }
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

    /// A soft purge: fills sent before it are not stored, the memory tier's entries are marked stale at once, then
    /// Redis's (their tier's mark, beside each entry), and the other instances are told. Owed as a hard
    /// invalidation when Redis cannot take it.
    async fn soft(&self, owing: Owing) -> Result<u64, InvalidateError> {
        let now = self.now_ms();
        self.inner.invalidated.record(&owing, now);
        self.inner.stats.bump(Event::Invalidations);
        let mark_memory = || {
            self.inner.memory.as_ref().map_or(0, |memory| match &owing {
                Owing::Keys(keys) => keys
                    .iter()
                    .filter(|key| memory.mark_stale(key, now))
                    .count(),
                Owing::Prefix(prefix) => memory.mark_stale_prefix(prefix, now),
                Owing::Tag(tag) => memory.mark_stale_tag(tag, now),
                Owing::Everything => memory.mark_stale_prefix("", now),
            })
        };
        let in_memory = mark_memory();
        let Some(redis) = &self.inner.redis else {
            return Ok(in_memory as u64);
        };
        self.inner
            .writes
            .settle(&owing, redis.guard.timeout() * 4)
            .await;
        let marked = self.soft_in_redis(redis, &owing, now).await;
        // Once more: a copy read from Redis before its mark, and promoted meanwhile, is marked too.
        mark_memory();
        match marked {
            Ok(marked) => Ok(marked),
            Err(error) => {
                if let (Owing::Tag(_), Some(memory)) = (&owing, &self.inner.memory) {
                    // Entries promoted from Redis keep their tags there only: any of them may carry this one.
                    memory.remove_untracked();
                }
                if unreachable(&error) {
                    self.owe(owing);
                }
                Err(error)
            }
        }
    }

    async fn soft_in_redis(
        &self,
        redis: &RedisTier,
        owing: &Owing,
        now: u64,
    ) -> Result<u64, InvalidateError> {
        match owing {
            Owing::Keys(keys) => {
                let messages = self.messages(&[Message::SoftKeys(keys)]);
                admin(redis, || redis.store.soft_purge(keys, now, &messages)).await
            }
            Owing::Prefix(prefix) => {
                let keys = admin(redis, || redis.store.keys_with_prefix(prefix)).await?;
                let messages = self.messages(&[Message::SoftPrefix(prefix)]);
                admin(redis, || redis.store.soft_purge(&keys, now, &messages)).await
            }
            Owing::Everything => {
                let keys = admin(redis, || redis.store.keys_with_prefix("")).await?;
                let messages = self.messages(&[Message::SoftPrefix("")]);
                admin(redis, || redis.store.soft_purge(&keys, now, &messages)).await
            }
            Owing::Tag(tag) => {
                let keys = admin(redis, || redis.store.tagged(tag)).await?;
                // The tag's members by key, so a Redis read of any of them is judged stale (the read does not
                // know the entry's tags).
                let members = Owing::Keys(keys.clone());
                self.inner.invalidated.record(&members, now);
                if let Some(memory) = &self.inner.memory {
                    for key in &keys {
                        memory.mark_stale(key, now);
                    }
                }
                let messages = self.messages(&[Message::SoftKeys(&keys), Message::SoftTag(tag)]);
                admin(redis, || redis.store.soft_purge(&keys, now, &messages)).await
            }
        }
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
                    Message::Keys([]) | Message::SoftKeys([]) => return None,
                    Message::Keys(keys) | Message::SoftKeys(keys) => {
                        text.push(if matches!(message, Message::Keys(_)) {
                            'k'
                        } else {
                            'K'
                        });
                        for key in *keys {
                            text.push('\n');
                            text.push_str(key);
                        }
                    }
                    Message::Prefix(prefix) => {
                        text.push_str("p\n");
                        text.push_str(prefix);
                    }
                    Message::SoftPrefix(prefix) => {
                        text.push_str("P\n");
                        text.push_str(prefix);
                    }
                    Message::Tag(tag) => {
                        text.push_str("t\n");
                        text.push_str(tag);
                    }
                    Message::SoftTag(tag) => {
                        text.push_str("T\n");
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
        // A soft purge: marked stale here as of its arrival, and fills sent before it are not stored.
        Some("K") => {
            let keys: Vec<String> = lines.map(str::to_owned).collect();
            if let Some(memory) = memory {
                for key in &keys {
                    memory.mark_stale(key, now);
                }
            }
            invalidated.record(&Owing::Keys(keys), now);
        }
        Some("P") => {
            let prefix = lines.collect::<Vec<_>>().join("\n");
            invalidated.record(&Owing::Prefix(prefix.clone()), now);
            if let Some(memory) = memory {
                memory.mark_stale_prefix(&prefix, now);
            }
        }
        Some("T") => {
            let tag = lines.collect::<Vec<_>>().join("\n");
            invalidated.record(&Owing::Tag(tag.clone()), now);
            if let Some(memory) = memory {
                memory.mark_stale_tag(&tag, now);
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
