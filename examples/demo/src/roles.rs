//! Runs the services: one per process (the `user-service`, `order-service` and `gateway` binaries, and the
//! `demo` launcher's children), or all three in one process (the launcher's single-instance mode).

use std::process::ExitCode;

use tower_redis_discovery::MemoryRegistry;
use tower_redis_ratelimit::{FailurePolicy, Policy, RateLimiter};

use crate::config::{Config, DemoPorts};
use crate::connection::{ConnectError, Redis, RedisConnection, connect};
use crate::env::{Env, REGISTRY_TTL};
use crate::lifecycle::{ServeError, Stop, stop_on_signals};
use crate::{gateway, orders, telemetry, users};

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `user-service`.
    Users,
    /// `order-service`.
    Orders,
    /// `gateway`.
    Gateway,
}

impl Role {
    /// The three, in start-up order.
    pub const ALL: [Self; 3] = [Self::Users, Self::Orders, Self::Gateway];

    /// The registered name, which is also the binary's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Users => users::NAME,
            Self::Orders => orders::NAME,
            Self::Gateway => gateway::NAME,
        }
    }

    /// The port used when `PORT` is unset.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Users => users::PORT,
            Self::Orders => orders::PORT,
            Self::Gateway => gateway::PORT,
        }
    }

    /// This role's port among the launcher's.
    pub fn port_in(self, ports: &DemoPorts) -> u16 {
        match self {
            Self::Users => ports.users,
            Self::Orders => ports.orders,
            Self::Gateway => ports.gateway,
        }
    }

    /// The role with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.name() == name)
    }
}

/// The gateway's write limit on Redis: shared by every gateway, with a local limiter while Redis is unavailable.
fn shared_limiter(
    config: &Config,
    redis: &Redis,
) -> Result<RateLimiter<RedisConnection>, ServeError> {
    let policy = Policy::new(
        "writes",
        config.write_limit.limit,
        config.write_limit.window,
    )
    .map_err(|error| ServeError(format!("RATE_LIMIT_WRITES: {error}")))?;
    RateLimiter::builder()
        .redis(redis.connection.clone())
        .name("gateway-writes")
        .prefix(format!("{}rl:", config.redis.prefix))
        .policy(policy)
        .redis_timeout(redis.command_timeout)
        .on_redis_failure(FailurePolicy::Local { share: 1 })
        .build()
        .map_err(|error| ServeError(format!("gateway rate limiter: {error}")))
}

/// The gateway's write limit without Redis: local to this process.
fn local_limiter(
    config: &Config,
) -> Result<RateLimiter<tower_redis_ratelimit::Offline>, ServeError> {
    let policy = Policy::new(
        "writes",
        config.write_limit.limit,
        config.write_limit.window,
    )
    .map_err(|error| ServeError(format!("RATE_LIMIT_WRITES: {error}")))?;
    RateLimiter::builder()
        .name("gateway-writes")
        .policy(policy)
        .build()
        .map_err(|error| ServeError(format!("gateway rate limiter: {error}")))
}

/// `role` on the shared Redis.
async fn serve_shared(
    role: Role,
    config: Config,
    redis: Redis,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    stop: Stop,
) -> Result<(), ServeError> {
    let port = config.port;
    match role {
        Role::Users => users::run(Env::shared(config, redis, metrics)?, port, stop).await,
        Role::Orders => orders::run(Env::shared(config, redis, metrics)?, port, stop).await,
        Role::Gateway => {
            let limiter = shared_limiter(&config, &redis)?;
            let env = Env::shared(config, redis, metrics)?;
            let cache = gateway::cache(&env)?;
            gateway::run(env, limiter, cache, port, stop).await
        }
    }
}

/// `role` alone, on in-memory backends.
async fn serve_alone(
    role: Role,
    config: Config,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    stop: Stop,
) -> Result<(), ServeError> {
    let port = config.port;
    let single = |config| Env::single(config, MemoryRegistry::new(REGISTRY_TTL), metrics);
    match role {
        Role::Users => users::run(single(config), port, stop).await,
        Role::Orders => orders::run(single(config), port, stop).await,
        Role::Gateway => {
            let limiter = local_limiter(&config)?;
            let env = single(config);
            let cache = gateway::cache(&env)?;
            gateway::run(env, limiter, cache, port, stop).await
        }
    }
}

/// Runs `role` as this process: reads the environment, connects to Redis (or goes single-instance), serves until
/// Ctrl-C or SIGTERM, and returns the exit code (2 for a bad configuration, 1 for a failure).
pub async fn run_process(role: Role) -> ExitCode {
    telemetry::init_tracing();
    let config = match Config::from_env(role.default_port()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{}: invalid configuration: {error}", role.name());
            return ExitCode::from(2);
        }
    };
    let metrics = telemetry::install_metrics();
    let stop = stop_on_signals();
    let result = match connect(&config.redis).await {
        Ok(redis) => {
            tracing::info!(
                redis = %config.redis.target.redacted(),
                prefix = %config.redis.prefix,
                "connected to Redis: registry, rate limits and cache are shared"
            );
            serve_shared(role, config, redis, metrics, stop).await
        }
        Err(ConnectError::Config(message)) => {
            eprintln!("{}: invalid configuration: {message}", role.name());
            return ExitCode::from(2);
        }
        Err(ConnectError::Unreachable(message)) => {
            tracing::warn!("{message}");
            tracing::warn!(
                "SINGLE-INSTANCE MODE: {} runs on in-memory backends (registry, cache, rate limits) and cannot find \
                 services in other processes; start Redis, or run the `demo` binary to get all three services in \
                 one process",
                role.name()
            );
            serve_alone(role, config, metrics, stop).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => failed(role, &error),
    }
}

fn failed(role: Role, error: &ServeError) -> ExitCode {
    tracing::error!("{}: {error}", role.name());
    eprintln!("{}: {error}", role.name());
    ExitCode::FAILURE
}

/// Runs the three services in this process on in-memory backends (one [`MemoryRegistry`], a memory-only cache, a
/// local rate limiter), on `ports`, until `stop`.
///
/// # Errors
///
/// The first service's failure (a port already taken, for example).
pub async fn run_in_one_process(
    config: Config,
    ports: DemoPorts,
    stop: Stop,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), ServeError> {
    let limiter = local_limiter(&config)?;
    let env = Env::single(config, MemoryRegistry::new(REGISTRY_TTL), metrics);
    let cache = gateway::cache(&env)?;
    tokio::try_join!(
        users::run(env.clone(), ports.users, stop.clone()),
        orders::run(env.clone(), ports.orders, stop.clone()),
        gateway::run(env, limiter, cache, ports.gateway, stop),
    )?;
    Ok(())
}
