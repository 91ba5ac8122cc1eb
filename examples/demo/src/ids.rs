//! Record ids: numbers from a Redis counter shared by every instance of a service (so two instances never hand out
//! the same id), or from a counter in memory in single-instance mode. If Redis fails mid-run, an id is a random
//! hexadecimal string instead, which cannot collide with the counter's.
//!
//! A Redis that comes back empty must not hand out ids again that records already carry (records live in the
//! instances' memory, not in Redis, and nothing in an emptied Redis tells a first start from a restart). So when
//! the script finds the counter missing it seeds it from the Redis clock in microseconds, which stays ahead of
//! every id drawn before (catching up would take more than a million ids a second), and never below the highest id
//! this instance has drawn (in case the clock went back).

use std::hash::{BuildHasher, Hasher};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::connection::Redis;

/// How long the counter key lives after its last use (every key the demo writes has a TTL).
const COUNTER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// KEYS[1] the counter; ARGV[1] its TTL in seconds, ARGV[2] the highest id the caller has drawn. Returns the next
/// id, as a string (Lua numbers are doubles, exact up to 2^53: the clock in microseconds is about 2^51).
static NEXT_ID: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[2]) or 0
if n == 1 then
  local now = redis.call('TIME')
  n = tonumber(now[1]) * 1000000 + tonumber(now[2])
end
if n <= floor then n = floor + 1 end
redis.call('SET', KEYS[1], string.format('%.0f', n), 'EX', ARGV[1])
return string.format('%.0f', n)
",
    )
});

pub(crate) struct Ids {
    redis: Option<(Redis, String)>,
    local: AtomicU64,
    /// The highest id drawn from Redis here: the counter never goes below it.
    highest: AtomicU64,
}

impl Ids {
    /// Ids for `kind` (`users`, `orders`), on the key `{prefix}ids:{kind}` when there is Redis.
    pub(crate) fn new(kind: &str, redis: Option<&Redis>, prefix: &str) -> Self {
        Self {
            redis: redis.map(|redis| (redis.clone(), format!("{prefix}ids:{kind}"))),
            local: AtomicU64::new(0),
            highest: AtomicU64::new(0),
        }
    }

    pub(crate) async fn next(&self) -> String {
        let Some((redis, key)) = &self.redis else {
            return (self.local.fetch_add(1, Ordering::Relaxed) + 1).to_string();
        };
        let mut connection = redis.connection.clone();
        let mut invocation = NEXT_ID.key(key);
        invocation
            .arg(COUNTER_TTL.as_secs())
            .arg(self.highest.load(Ordering::Relaxed));
        match tokio::time::timeout(
            redis.command_timeout,
            invocation.invoke_async::<String>(&mut connection),
        )
        .await
        {
            Ok(Ok(id)) => match id.parse::<u64>() {
                Ok(number) => {
                    self.highest.fetch_max(number, Ordering::Relaxed);
                    id
                }
                Err(_) => {
                    tracing::warn!(%id, "the id counter is not a number; using a random id");
                    random_id()
                }
            },
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

/// A random id, for a record whose counter id is taken (which the counter's floor should make impossible).
pub(crate) fn fresh_random() -> String {
    random_id()
}

/// 16 random hexadecimal digits (from the standard library's randomly keyed hasher).
fn random_id() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(SEQUENCE.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}
