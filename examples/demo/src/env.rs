//! What a service runs on: the registry, Redis when there is one, the metrics handle and an HTTP client.
//!
//! With Redis every process shares the Redis registry (`{REDIS_PREFIX}discovery:`), rate limits and cache. Without
//! it (single-instance mode) the registry is a [`MemoryRegistry`] shared by the services of one process.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_redis_discovery::{Discovery, MemoryRegistry, RedisRegistry, Registry, Status};

use crate::config::Config;
use crate::connection::{Redis, RedisConnection};
use crate::lifecycle::ServeError;

/// How long a registration lives without a heartbeat (heartbeats come about every third of it).
pub const REGISTRY_TTL: Duration = Duration::from_secs(15);

/// The HTTP client every service uses to call the others.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with a short connect timeout (an instance that is gone fails fast) and pooled connections.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Shared or alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Redis is shared by every process.
    Redis,
    /// No Redis: in-memory backends in one process.
    SingleInstance,
}

impl Mode {
    /// `"redis"` or `"single-instance"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::SingleInstance => "single-instance",
        }
    }
}

/// Everything a service needs besides its own state.
#[derive(Debug, Clone)]
pub struct Env<R> {
    /// The configuration.
    pub config: Config,
    /// The service registry.
    pub registry: R,
    /// Redis, in shared mode.
    pub redis: Option<Redis>,
    /// The registry's change-hint channel, in shared mode.
    pub hints: Option<String>,
    /// The Prometheus handle, when the recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// The HTTP client for calls to other services.
    pub client: HttpClient,
    /// How long an instance reports `OUT_OF_SERVICE` before it leaves the registry.
    pub drain: Duration,
}

impl Env<RedisRegistry<RedisConnection>> {
    /// Shared mode: the Redis registry under `{REDIS_PREFIX}discovery:`.
    ///
    /// # Errors
    ///
    /// [`ServeError`] when the registry's settings are invalid.
    pub fn shared(
        config: Config,
        redis: Redis,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, ServeError> {
        let registry = RedisRegistry::builder()
            .redis(redis.connection.clone())
            .prefix(format!("{}discovery:", config.redis.prefix))
            .ttl(REGISTRY_TTL)
            .redis_timeout(redis.command_timeout.max(Duration::from_millis(500)))
            .build()
            .map_err(|error| ServeError(format!("registry: {error}")))?;
        let hints = Some(registry.events_channel());
        Ok(Self {
            config,
            registry,
            redis: Some(redis),
            hints,
            metrics,
            client: http_client(),
            drain: Duration::from_secs(1),
        })
    }
}

impl Env<MemoryRegistry> {
    /// Single-instance mode: `registry` is shared by the services of this process.
    pub fn single(
        config: Config,
        registry: MemoryRegistry,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            config,
            registry,
            redis: None,
            hints: None,
            metrics,
            client: http_client(),
            drain: Duration::from_millis(200),
        }
    }
}

impl<R: Registry> Env<R> {
    /// Shared or alone.
    pub fn mode(&self) -> Mode {
        if self.redis.is_some() {
            Mode::Redis
        } else {
            Mode::SingleInstance
        }
    }

    /// Watches the `UP` instances of `service`: with Redis, change hints make a new or leaving instance known
    /// within milliseconds, and a poll every 2 s catches anything a hint missed.
    ///
    /// # Errors
    ///
    /// [`ServeError`] outside a Tokio runtime.
    pub fn discover(&self, service: &str) -> Result<Discovery, ServeError> {
        let discovery = match (&self.redis, &self.hints) {
            (Some(redis), Some(channel)) => Discovery::builder()
                .interval(Duration::from_secs(2))
                .registry(self.registry.clone())
                .service(service)
                .hints(redis.subscriber.clone(), channel.clone())
                .build()?,
            _ => Discovery::builder()
                .interval(Duration::from_millis(250))
                .registry(self.registry.clone())
                .service(service)
                .build()?,
        };
        Ok(discovery)
    }

    /// The `UP` instances of `service` other than `self_id` (for peer lookups).
    ///
    /// # Errors
    ///
    /// The registry's error: the peers are then unknown, which is not the same as having none.
    pub async fn peers(
        &self,
        service: &str,
        self_id: &str,
    ) -> Result<Vec<tower_redis_discovery::Instance>, tower_redis_discovery::RegistryError> {
        match self.registry.instances(service).await {
            Ok(instances) => Ok(instances
                .into_iter()
                .filter(|instance| instance.id != self_id && instance.status == Status::Up)
                .collect()),
            Err(error) => {
                tracing::warn!(%error, service, "cannot list peers");
                Err(error)
            }
        }
    }
}
