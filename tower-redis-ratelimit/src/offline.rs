//! [`Offline`]: the connection of a limiter that has no Redis (see [`crate::RateLimiter::builder`]).

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

/// A Redis "connection" with no server behind it: every command fails at once, without I/O.
///
/// It is the connection type of a local-only limiter (a [`crate::RateLimiter`] built without `.redis(connection)`), so code that is generic over
/// the connection (or that names `RateLimiter<Offline>`) runs the same with and without Redis. The local limiter
/// never sends it a command on the decision path; only the admin calls (`inspect`, `reset`, `block`) reach it, and
/// they fail with an error saying there is no Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offline;

fn no_redis() -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "no Redis: this rate limiter is local-only",
    ))
}

impl ConnectionLike for Offline {
    fn req_packed_command<'a>(&'a mut self, _cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(std::future::ready(Err(no_redis())))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _pipeline: &'a Pipeline,
        _offset: usize,
        _count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(std::future::ready(Err(no_redis())))
    }

    fn get_db(&self) -> i64 {
        0
    }
}
