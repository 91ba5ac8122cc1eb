//! A connection to a Sentinel-managed primary that follows failovers.
//!
//! redis-rs' `SentinelClient` asks the sentinels for the primary once and hands back a `MultiplexedConnection` to
//! it; when the primary dies or is demoted, that connection fails for good. [`SentinelConnection`] keeps the current
//! connection behind a lock and, after a connection error, a timeout or a `READONLY` reply (the server it talks to
//! became a replica), asks the sentinels for the primary again and reconnects. It implements
//! `redis::aio::ConnectionLike + Clone + Send + Sync`, so it plugs into every Redis-backed type of this workspace.
//!
//! The command that met the failure still returns its error (it may have been applied, so it is not replayed);
//! the layers' failure policies hide it from clients. While the sentinels cannot be reached, calls fail at once
//! for a backoff period instead of waiting, so an outage costs no waiting (the layers' breakers open as usual).
//!
//! ```no_run
//! # async fn demo() -> redis::RedisResult<()> {
//! use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
//!
//! let con = SentinelConnection::connect(
//!     &["redis://127.0.0.1:26379"],
//!     "mymaster",
//!     SentinelConfig::default(),
//! )
//! .await?;
//! let mut con2 = con.clone();
//! let () = redis::cmd("SET").arg("k").arg("v").query_async(&mut con2).await?;
//! # Ok(()) }
//! ```
//!
//! The sentinels' own credentials (and TLS) go in their URLs (`redis://:sentinel-pw@host:26379`); the primary's
//! go in the [`SentinelConfig`], because the sentinels only tell where the primary is:
//!
//! ```no_run
//! # async fn demo() -> redis::RedisResult<()> {
//! use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
//!
//! let con = SentinelConnection::connect(
//!     &["redis://:sentinel-pw@10.0.0.5:26379"],
//!     "mymaster",
//!     SentinelConfig::default()
//!         .primary_auth(Some("app"), "primary-pw")
//!         .primary_db(2),
//! )
//! .await?;
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisError, RedisFuture, RedisResult, TlsMode, Value,
};

/// How a [`SentinelConnection`] asks for and connects to the primary.
#[derive(Clone)]
#[must_use]
#[non_exhaustive]
pub struct SentinelConfig {
    resolve_timeout: Duration,
    connection_timeout: Duration,
    redis_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    primary_username: Option<String>,
    primary_password: Option<String>,
    primary_db: i64,
    primary_tls: Option<TlsMode>,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("resolve_timeout", &self.resolve_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("redis_timeout", &self.redis_timeout)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("primary_username", &self.primary_username)
            // Never the password itself: configs end up in logs.
            .field(
                "primary_password",
                &self.primary_password.as_ref().map(|_| "***"),
            )
            .field("primary_db", &self.primary_db)
            .field("primary_tls", &self.primary_tls)
            .finish()
    }
}

impl Default for SentinelConfig {
    fn default() -> Self {
        Self {
            resolve_timeout: Duration::from_secs(1),
            connection_timeout: Duration::from_millis(500),
            redis_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            primary_username: None,
            primary_password: None,
            primary_db: 0,
            primary_tls: None,
        }
    }
}

impl SentinelConfig {
    /// The longest a lookup of the primary (sentinels asked, primary connected) may take. Default 1 s.
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.resolve_timeout = timeout;
        self
    }

    /// The connect timeout for the primary. Default 500 ms.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The deadline of each command on the primary (redis-rs' response timeout). Default 500 ms.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// After a failed lookup, calls fail at once for `min`, doubling per further failure up to `max`.
    /// Defaults 50 ms and 2 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// Every setting that would make the connection unusable, as an error naming it.
    fn validate(&self) -> RedisResult<()> {
        let invalid = |message: &str| -> RedisResult<()> {
            Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "invalid SentinelConfig",
                message.to_owned(),
            )))
        };
        for (name, value) in [
            ("resolve_timeout", self.resolve_timeout),
            ("connection_timeout", self.connection_timeout),
            ("redis_timeout", self.redis_timeout),
            ("backoff (min)", self.min_backoff),
        ] {
            if value.is_zero() {
                return invalid(&format!("{name} must be greater than zero"));
            }
        }
        if self.max_backoff < self.min_backoff {
            return invalid(&format!(
                "backoff: max ({:?}) is below min ({:?})",
                self.max_backoff, self.min_backoff
            ));
        }
        Ok(())
    }

    /// Authenticates to the primary (and, after a failover, to the replica promoted in its place) as `username`
    /// (`None`: the default user, i.e. `requirepass`) with `password`. The sentinels' own credentials go in their
    /// URLs instead (`redis://user:pw@host:26379`). Default: no authentication.
    pub fn primary_auth(mut self, username: Option<&str>, password: &str) -> Self {
        self.primary_username = username.map(str::to_owned);
        self.primary_password = Some(password.to_owned());
        self
    }

    /// Selects database `db` on the primary; [`ConnectionLike::get_db`] reports it. Default 0.
    pub fn primary_db(mut self, db: i64) -> Self {
        self.primary_db = db;
        self
    }

    /// Connects to the primary over TLS: [`TlsMode::Secure`] verifies its certificate against the system's roots
    /// (or the WebPKI roots with redis-rs' `tls-rustls-webpki-roots`), [`TlsMode::Insecure`] does not verify it (it
    /// needs redis-rs' `tls-rustls-insecure`). redis-rs must be built with a TLS feature (`tokio-rustls-comp` or
    /// `tokio-native-tls-comp`), or the connection fails with an error saying so. For a private CA, build the
    /// client with `redis::sentinel::SentinelClientBuilder::set_client_to_redis_certificates` and pass it to
    /// [`SentinelConnection::with_client`]. Default: plain TCP.
    pub fn primary_tls(mut self, mode: TlsMode) -> Self {
        self.primary_tls = Some(mode);
        self
    }

    /// What redis-rs needs to connect to the primary the sentinels name: credentials, database and TLS mode.
    fn primary_connection_info(&self) -> SentinelNodeConnectionInfo {
        let mut redis = RedisConnectionInfo::default().set_db(self.primary_db);
        if let Some(username) = &self.primary_username {
            redis = redis.set_username(username);
        }
        if let Some(password) = &self.primary_password {
            redis = redis.set_password(password);
        }
        let info = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
        match self.primary_tls {
            Some(mode) => info.set_tls_mode(mode),
            None => info,
        }
    }
}

/// A connection to the primary the sentinels name, re-resolved after a failover. Cloning it is an `Arc` bump; all
/// clones share one multiplexed connection.
#[derive(Clone)]
pub struct SentinelConnection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SentinelConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = read(&self.inner.current);
        f.debug_struct("SentinelConnection")
            .field("master", &self.inner.master)
            .field("connected", &current.connection.is_some())
            .field("generation", &current.generation)
            .finish_non_exhaustive()
    }
}

struct Inner {
    master: String,
    db: i64,
    config: SentinelConfig,
    /// Held only while looking the primary up; a `tokio` mutex so one lookup runs at a time and others wait for it.
    client: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<Current>,
    backoff: Mutex<Backoff>,
}

#[derive(Default)]
struct Current {
    connection: Option<MultiplexedConnection>,
    /// Bumped at every reconnect, so an error on an old connection does not drop a newer one.
    generation: u64,
}

#[derive(Default)]
struct Backoff {
    retry_after: Option<Instant>,
    delay: Duration,
}

impl SentinelConnection {
    /// Connects to the primary that the sentinels at `sentinels` (URLs like `redis://host:26379`, with the
    /// sentinels' own credentials if they need any) name `master`, with the primary's credentials, database and TLS
    /// mode from `config` ([`SentinelConfig::primary_auth`], [`SentinelConfig::primary_db`],
    /// [`SentinelConfig::primary_tls`]).
    ///
    /// # Errors
    ///
    /// If a setting of `config` is invalid (a zero timeout, a backoff whose max is below its min), a sentinel URL is
    /// invalid, or no sentinel names a reachable primary within the resolve timeout.
    pub async fn connect<T: IntoConnectionInfo + Clone>(
        sentinels: &[T],
        master: &str,
        config: SentinelConfig,
    ) -> RedisResult<Self> {
        config.validate()?;
        // An owned name fits both signatures of `build` (redis-rs changes it with its `tls-rustls` feature).
        let name: String = master.into();
        let client = SentinelClient::build(
            sentinels.to_vec(),
            name,
            Some(config.primary_connection_info()),
            SentinelServerType::Master,
        )?;
        Self::with_client(client, master, config).await
    }

    /// Like [`SentinelConnection::connect`] with a `SentinelClient` built by the caller (for example with a
    /// private CA through `SentinelClientBuilder`). The client carries the primary's credentials, database and
    /// TLS mode, so `config`'s `primary_auth` and `primary_tls` are not used; set [`SentinelConfig::primary_db`]
    /// to the client's database so that [`ConnectionLike::get_db`] reports it. `master` is used for logs only.
    ///
    /// # Errors
    ///
    /// If a setting of `config` is invalid, or no sentinel names a reachable primary within the resolve timeout.
    pub async fn with_client(
        client: SentinelClient,
        master: &str,
        config: SentinelConfig,
    ) -> RedisResult<Self> {
        config.validate()?;
        let connection = Self::unconnected(client, master, config);
        connection.inner.connection().await?;
        Ok(connection)
    }

    fn unconnected(client: SentinelClient, master: &str, config: SentinelConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                master: master.to_owned(),
                db: config.primary_db,
                config,
                client: tokio::sync::Mutex::new(client),
                current: RwLock::new(Current::default()),
                backoff: Mutex::new(Backoff::default()),
            }),
        }
    }

    /// How many times the primary was looked up and connected (1 after [`SentinelConnection::connect`]; each
    /// failover adds one).
    pub fn reconnects(&self) -> u64 {
        read(&self.inner.current).generation
    }

    /// A client for the primary the sentinels name now, for connections that cannot share this one (pub/sub,
    /// blocking reads). [`crate::pubsub::Subscriber`] calls it at every (re)subscription, so subscriptions follow
    /// failovers too.
    ///
    /// # Errors
    ///
    /// If no sentinel names a primary within the resolve timeout.
    pub async fn primary_client(&self) -> RedisResult<redis::Client> {
        let mut client = self.inner.client.lock().await;
        tokio::time::timeout(self.inner.config.resolve_timeout, client.async_get_client())
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    ErrorKind::Io,
                    "timed out looking up the primary through the sentinels",
                )))
            })
    }
}

impl Inner {
    /// The current connection and its generation, looking the primary up first when there is none.
    async fn connection(&self) -> RedisResult<(MultiplexedConnection, u64)> {
        if let Some(found) = self.cached() {
            return Ok(found);
        }
        self.check_backoff()?;
        let mut client = self.client.lock().await;
        // Another call may have reconnected while this one waited for the lock.
        if let Some(found) = self.cached() {
            return Ok(found);
        }
        self.check_backoff()?;
        match self.resolve(&mut client).await {
            Ok(connection) => {
                let mut current = write(&self.current);
                current.generation += 1;
                current.connection = Some(connection.clone());
                *lock(&self.backoff) = Backoff::default();
                tracing::info!(master = %self.master, generation = current.generation, "connected to the primary");
                Ok((connection, current.generation))
            }
            Err(error) => {
                let mut backoff = lock(&self.backoff);
                backoff.delay = (backoff.delay * 2)
                    .max(self.config.min_backoff)
                    .min(self.config.max_backoff);
                backoff.retry_after = Some(Instant::now() + backoff.delay);
                tracing::warn!(master = %self.master, %error, retry_in = ?backoff.delay, "cannot reach the primary");
                Err(error)
            }
        }
    }

    fn cached(&self) -> Option<(MultiplexedConnection, u64)> {
        let current = read(&self.current);
        current
            .connection
            .clone()
            .map(|connection| (connection, current.generation))
    }

    fn check_backoff(&self) -> RedisResult<()> {
        match lock(&self.backoff).retry_after {
            Some(at) if Instant::now() < at => Err(RedisError::from((
                ErrorKind::Io,
                "the Sentinel primary was unreachable moments ago; retrying after a backoff",
            ))),
            _ => Ok(()),
        }
    }

    async fn resolve(&self, client: &mut SentinelClient) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connection_timeout))
            .set_response_timeout(Some(self.config.redis_timeout));
        match tokio::time::timeout(
            self.config.resolve_timeout,
            client.get_async_connection_with_config(&config),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "timed out looking up the primary through the sentinels",
            ))),
        }
    }

    /// Forgets the connection of `generation` after `error` showed that it no longer reaches the primary.
    fn note(&self, generation: u64, error: &RedisError) {
        if !needs_new_primary(error) {
            return;
        }
        let mut current = write(&self.current);
        if current.generation == generation && current.connection.take().is_some() {
            tracing::warn!(master = %self.master, %error, "lost the primary; asking the sentinels again");
        }
    }
}

/// Whether `error` means the connection no longer reaches a writable primary: it broke, timed out, or the server
/// answers `READONLY` because it is a replica now.
pub(crate) fn needs_new_primary(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.code() == Some("READONLY")
        // A script's write refused on a replica comes back wrapped in the script error.
        || error.to_string().contains("READONLY")
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (mut connection, generation) = self.inner.connection().await?;
            let result = connection.req_packed_command(cmd).await;
            if let Err(error) = &result {
                self.inner.note(generation, error);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut connection, generation) = self.inner.connection().await?;
            let result = connection
                .req_packed_commands(pipeline, offset, count)
                .await;
            if let Err(error) = &result {
                self.inner.note(generation, error);
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.db
    }
}

// A panic while holding one of these locks leaves plain data behind, still consistent: ignore the poison.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_errors_naming_the_setting_never_clamped() {
        let cases = [
            (
                SentinelConfig::default().redis_timeout(Duration::ZERO),
                "redis_timeout",
            ),
            (
                SentinelConfig::default().resolve_timeout(Duration::ZERO),
                "resolve_timeout",
            ),
            (
                SentinelConfig::default().connection_timeout(Duration::ZERO),
                "connection_timeout",
            ),
            (
                SentinelConfig::default().backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "backoff",
            ),
        ];
        for (config, setting) in cases {
            let error = config.validate().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidClientConfig);
            assert!(error.to_string().contains(setting), "{error}");
        }
        assert!(SentinelConfig::default().validate().is_ok());
    }

    #[test]
    fn broken_connections_timeouts_and_readonly_replies_ask_for_a_new_primary() {
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let timed_out = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let readonly = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        for error in [&dropped, &refused, &timed_out, &readonly] {
            assert!(needs_new_primary(error), "{error}");
        }
    }

    #[test]
    fn ordinary_command_errors_keep_the_connection() {
        let wrong_type = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        let parse = RedisError::from((ErrorKind::UnexpectedReturnType, "not a number"));
        assert!(!needs_new_primary(&wrong_type));
        assert!(!needs_new_primary(&parse));
    }

    #[test]
    fn the_primary_gets_the_configured_credentials_database_and_tls_mode() {
        let plain = format!("{:?}", SentinelConfig::default().primary_connection_info());
        assert!(plain.contains("db: 0"), "{plain}");
        assert!(plain.contains("username: None"), "{plain}");
        assert!(plain.contains("password: None"), "{plain}");
        assert!(plain.contains("tls_mode: None"), "{plain}");

        let config = SentinelConfig::default()
            .primary_auth(Some("app"), "s3cret")
            .primary_db(3)
            .primary_tls(TlsMode::Secure);
        let info = format!("{:?}", config.primary_connection_info());
        assert!(info.contains("db: 3"), "{info}");
        assert!(info.contains(r#"username: Some("app")"#), "{info}");
        assert!(info.contains("password: Some("), "{info}");
        assert!(info.contains("tls_mode: Some(Secure)"), "{info}");

        let default_user = format!(
            "{:?}",
            SentinelConfig::default()
                .primary_auth(None, "pw")
                .primary_connection_info()
        );
        assert!(default_user.contains("username: None"), "{default_user}");
        assert!(default_user.contains("password: Some("), "{default_user}");
    }

    #[test]
    fn the_config_never_prints_the_password() {
        let config = SentinelConfig::default().primary_auth(Some("app"), "s3cret");
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains(r#"primary_password: Some("***")"#),
            "{printed}"
        );
        assert!(
            printed.contains(r#"primary_username: Some("app")"#),
            "{printed}"
        );
    }

    #[test]
    fn get_db_reports_the_configured_database() {
        let client = SentinelClient::build(
            vec!["redis://127.0.0.1:1"],
            String::from("m"),
            Some(SentinelConfig::default().primary_connection_info()),
            SentinelServerType::Master,
        )
        .expect("a valid sentinel URL");
        let connection =
            SentinelConnection::unconnected(client, "m", SentinelConfig::default().primary_db(5));
        assert_eq!(connection.get_db(), 5);
        let client = SentinelClient::build(
            vec!["redis://127.0.0.1:1"],
            String::from("m"),
            None,
            SentinelServerType::Master,
        )
        .expect("a valid sentinel URL");
        let default = SentinelConnection::unconnected(client, "m", SentinelConfig::default());
        assert_eq!(default.get_db(), 0);
    }

    #[tokio::test]
    async fn unreachable_sentinels_fail_the_lookup_and_later_calls_fail_at_once_during_the_backoff()
    {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free loopback port");
        let url = format!("redis://127.0.0.1:{port}");
        let client = SentinelClient::build(
            vec![url.as_str()],
            String::from("m"),
            None,
            SentinelServerType::Master,
        )
        .expect("a valid sentinel URL");
        let connection = SentinelConnection::unconnected(
            client,
            "m",
            SentinelConfig::default().backoff(Duration::from_secs(30), Duration::from_secs(30)),
        );
        let mut con = connection.clone();
        let first: RedisResult<Value> = redis::cmd("PING").query_async(&mut con).await;
        assert!(first.is_err());
        let started = Instant::now();
        let second: RedisResult<Value> = redis::cmd("PING").query_async(&mut con).await;
        let error = second.expect_err("still backing off");
        assert!(error.to_string().contains("backoff"), "{error}");
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(connection.reconnects(), 0);
    }
}
