//! Record ids: `1`, `2`, `3`, ... from a Redis counter shared by every instance of a service (so two instances
//! never hand out the same id), or from a counter in memory in single-instance mode. If Redis fails mid-run, an id
//! is a random hexadecimal string instead, which cannot collide with the counter's.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::connection::Redis;

/// How long the counter key lives after its last use (every key the demo writes has a TTL).
const COUNTER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

pub(crate) struct Ids {
    redis: Option<(Redis, String)>,
    local: AtomicU64,
}

impl Ids {
    /// Ids for `kind` (`users`, `orders`), on the key `{prefix}ids:{kind}` when there is Redis.
    pub(crate) fn new(kind: &str, redis: Option<&Redis>, prefix: &str) -> Self {
        Self {
            redis: redis.map(|redis| (redis.clone(), format!("{prefix}ids:{kind}"))),
            local: AtomicU64::new(0),
        }
    }

    pub(crate) async fn next(&self) -> String {
        let Some((redis, key)) = &self.redis else {
            return (self.local.fetch_add(1, Ordering::Relaxed) + 1).to_string();
        };
        let mut connection = redis.connection.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(key)
            .cmd("EXPIRE")
            .arg(key)
            .arg(COUNTER_TTL.as_secs())
            .ignore();
        match tokio::time::timeout(
            redis.command_timeout,
            pipe.query_async::<(u64,)>(&mut connection),
        )
        .await
        {
            Ok(Ok((id,))) => id.to_string(),
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot draw an id from Redis; using a random one");
                random_id()
            }
            Err(_) => {
                tracing::warn!("Redis did not answer for an id in time; using a random one");
                random_id()
            }
        }
    }
}

/// 16 random hexadecimal digits (from the standard library's randomly keyed hasher).
fn random_id() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(SEQUENCE.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}
