//! TCP settings for Redis connections: keepalive, and `TCP_USER_TIMEOUT` on Linux.
//!
//! Keepalive probes find a peer that vanished while the connection was idle (a NAT entry dropped, a host gone);
//! `TCP_USER_TIMEOUT` bounds how long sent data may stay unacknowledged before the kernel closes the connection
//! (Linux's default retransmits for about 15 minutes). Neither helps when something on the path keeps
//! acknowledging while Redis never answers: [`crate::healing`] covers that case.

use std::time::Duration;

use redis::io::tcp::TcpSettings;
use redis::io::tcp::socket2::TcpKeepalive;
use redis::{IntoConnectionInfo, RedisResult};

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(15);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged (Linux).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The TCP settings of every connection this workspace opens: `TCP_NODELAY`, keepalive after
/// [`KEEPALIVE_TIME`] idle, every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] probes (so a dead idle peer is
/// noticed within about 30 s), and on Linux `TCP_USER_TIMEOUT` of [`USER_TIMEOUT`].
#[must_use]
pub fn settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(USER_TIMEOUT);
    settings
}

/// A `redis::Client` for `url` (or any connection info) whose connections use [`settings`].
///
/// # Errors
///
/// When `url` is not a valid Redis URL.
pub fn client<T: IntoConnectionInfo>(url: T) -> RedisResult<redis::Client> {
    let info = url.into_connection_info()?.set_tcp_settings(settings());
    redis::Client::open(info)
}
