//! [`RedisRegistryBuilder`]: the Redis registry's settings, validated.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_redis_core::{CallRecorder, ConfigError, Topology};

use super::redis_registry::RedisRegistry;

/// Builds a [`RedisRegistry`]: [`RedisRegistry::builder`], then [`redis`](Self::redis) and the settings.
#[must_use]
pub struct RedisRegistryBuilder<C> {
    connection: C,
    settings: RegistrySettings,
}

/// Everything but the connection, carried over as is when [`RedisRegistryBuilder::redis`] changes its type.
struct RegistrySettings {
    prefix: String,
    ttl: Duration,
    redis_timeout: Duration,
    max_entry_size: usize,
}

impl<C> fmt::Debug for RedisRegistryBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistryBuilder")
            .field("prefix", &self.settings.prefix)
            .field("ttl", &self.settings.ttl)
            .field("redis_timeout", &self.settings.redis_timeout)
            .field("max_entry_size", &self.settings.max_entry_size)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry<()> {
    /// A builder with HazelJS's defaults: prefix `hazeljs:discovery:`, TTL 90 s; 1 s per Redis call, entries up to
    /// [`DEFAULT_MAX_ENTRY_SIZE`]. Give it its connection with [`RedisRegistryBuilder::redis`] (`build` needs one).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_redis_discovery::RedisRegistry;
    ///
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let registry = RedisRegistry::builder()
    ///     .redis(client.get_connection_manager().await?)
    ///     .prefix("shop:discovery:")
    ///     .ttl(Duration::from_secs(15))
    ///     .build()?;
    /// # let _ = registry; Ok(()) }
    /// ```
    pub fn builder() -> RedisRegistryBuilder<()> {
        RedisRegistryBuilder {
            connection: (),
            settings: RegistrySettings {
                prefix: "hazeljs:discovery:".to_owned(),
                ttl: Duration::from_secs(90),
                redis_timeout: Duration::from_secs(1),
                max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
            },
        }
    }
}

impl<C> RedisRegistryBuilder<C> {
    /// The connection (a `ConnectionManager`, a `MultiplexedConnection`, a cluster connection, a
    /// `HealingConnection`, a `SentinelConnection`, ...). A Cluster is recognised on its own.
    pub fn redis<C2>(self, connection: C2) -> RedisRegistryBuilder<C2>
    where
        C2: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        RedisRegistryBuilder {
            connection,
            settings: self.settings,
        }
    }

    /// The key prefix, used exactly as given (HazelJS's default is `hazeljs:discovery:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// The instance TTL (the service set gets twice as long): whole seconds, at least 1 s, since HazelJS's layout
    /// writes it with `EX`. Heartbeats go every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// The deadline of each Redis call (default 1 s).
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.settings.redis_timeout = timeout;
        self
    }

    /// The largest instance entry read, in bytes (default [`DEFAULT_MAX_ENTRY_SIZE`], 64 KiB): a longer one is
    /// skipped (that instance only; at most this many bytes plus one are transferred). HazelJS's entries are well
    /// under 1 KiB.
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.settings.max_entry_size = bytes;
        self
    }
}

impl<C> RedisRegistryBuilder<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the TTL is under 1 s or not whole seconds, the Redis timeout is zero, or the entry size
    /// cap is zero.
    pub fn build(self) -> Result<RedisRegistry<C>, ConfigError> {
        if self.settings.ttl < Duration::from_secs(1) || self.settings.ttl.subsec_nanos() != 0 {
            return Err(config_error(
                "ttl",
                format!(
                    "the registry TTL is written with EX (HazelJS's layout), so it is whole seconds, at least 1 s; \
                     got {:?}",
                    self.settings.ttl
                ),
            ));
        }
        if self.settings.redis_timeout.is_zero() {
            return Err(config_error(
                "redis_timeout",
                "the Redis timeout must be above zero",
            ));
        }
        if self.settings.max_entry_size == 0 {
            return Err(config_error(
                "max_entry_size",
                "the entry size cap must be at least 1 byte (HazelJS's entries are well under 1 KiB)",
            ));
        }
        Ok(RedisRegistry {
            connection: self.connection,
            ttl: self.settings.ttl,
            timeout: self.settings.redis_timeout,
            topology: Topology::new(),
            max_entry_size: self.settings.max_entry_size,
            warned: Arc::default(),
            calls: CallRecorder::new(&format!("registry:{}", self.settings.prefix)),
            prefix: Arc::from(self.settings.prefix),
        })
    }
}

/// An invalid registry configuration: `field` is the setting to change.
pub(super) fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("registry", field, message)
}

/// The default [`RedisRegistryBuilder::max_entry_size`]: 64 KiB.
pub const DEFAULT_MAX_ENTRY_SIZE: usize = 64 * 1024;
