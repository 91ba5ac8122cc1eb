//! The Redis connection: one server through a `ConnectionManager` (reconnects by itself), a Redis Cluster, or a
//! Sentinel-managed primary (followed across failovers), behind one type every layer accepts.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsMode, Value};
use tower_redis_core::Subscriber;
use tower_redis_core::sentinel::{SentinelConfig, SentinelConnection};
use tower_redis_core::{HealingConfig, HealingConnection};

use crate::config::{RedisConfig, RedisTarget, SentinelPrimary};

/// A connection to one Redis server or to a Redis Cluster. Cloning is cheap (both are multiplexed handles).
///
/// The node and cluster connections are [`HealingConnection`]s: replaced after commands in a row with no reply, so a
/// half-open or stalled socket heals within a few commands (a `ConnectionManager` alone only reconnects after a
/// socket error). The Sentinel connection already reconnects after a timeout.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Node(HealingConnection<ConnectionManager>),
    /// A cluster.
    Cluster(HealingConnection<ClusterConnection>),
    /// The primary the sentinels name, looked up again after a failover.
    Sentinel(SentinelConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(_) => f.write_str("RedisConnection::Node"),
            Self::Cluster(_) => f.write_str("RedisConnection::Cluster"),
            Self::Sentinel(_) => f.write_str("RedisConnection::Sentinel"),
        }
    }
}

impl RedisConnection {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
            Self::Sentinel(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
            Self::Sentinel(connection) => connection.get_db(),
        }
    }
}

/// A live Redis: the command connection and where subscriptions connect (a cluster's first node: PUBLISH reaches
/// subscribers on every node; with Sentinel, the primary the sentinels name at each (re)subscription).
#[derive(Debug, Clone)]
pub struct Redis {
    /// Commands.
    pub connection: RedisConnection,
    /// Subscriptions (discovery hints, cache invalidations).
    pub subscriber: Subscriber,
    /// Read replicas of a single primary (`REDIS_REPLICA_URLS`) that answered at start-up, for the cache's reads.
    pub replicas: Vec<HealingConnection<ConnectionManager>>,
    /// The deadline of each command.
    pub command_timeout: Duration,
}

/// Why Redis could not be used.
#[derive(Debug)]
pub enum ConnectError {
    /// The configuration cannot work (a CA file that does not read, a URL redis-rs refuses): stop.
    Config(String),
    /// Redis did not answer in time or refused: go single-instance.
    Unreachable(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(message) | Self::Unreachable(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Installs rustls' `ring` crypto provider once; redis-rs does not pick one, and the first TLS connection panics
/// without one.
pub fn install_crypto_provider() {
    // `Err` means one is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client whose connections have TCP keepalive (and `TCP_USER_TIMEOUT` on Linux).
fn client_for(url: &str, ca: Option<&[u8]>) -> Result<redis::Client, ConnectError> {
    let info = url
        .into_connection_info()
        .map_err(|error| {
            ConnectError::Config(format!(
                "cannot use {}: {error}",
                crate::config::redact(url)
            ))
        })?
        .set_tcp_settings(tower_redis_core::tcp::settings());
    let client = match ca {
        Some(root) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.to_vec()),
            },
        ),
        None => redis::Client::open(info),
    };
    client.map_err(|error| {
        ConnectError::Config(format!(
            "cannot use {}: {error}",
            crate::config::redact(url)
        ))
    })
}

/// A client for the primary that TLS sentinels (`rediss://`, all of them) name: TLS to the sentinels and to the
/// primary, both trusting `ca` when given (else the system's roots). redis-rs' builder takes one set of credentials
/// for every sentinel, which `parse_sentinels` checked they share.
fn tls_sentinel_client(
    sentinels: &[String],
    master: &str,
    primary: &SentinelPrimary,
    ca: Option<&[u8]>,
) -> redis::RedisResult<SentinelClient> {
    let infos = sentinels
        .iter()
        .map(|url| url.as_str().into_connection_info())
        .collect::<redis::RedisResult<Vec<_>>>()?;
    let mut builder = SentinelClientBuilder::new(
        infos.iter().map(|info| info.addr().clone()),
        master,
        SentinelServerType::Master,
    )?
    .set_client_to_redis_tls_mode(TlsMode::Secure)
    .set_client_to_redis_db(primary.db);
    if let Some(first) = infos.first() {
        let settings = first.redis_settings();
        if let Some(username) = settings.username() {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if let Some(password) = &primary.password {
        builder = builder.set_client_to_redis_password(password);
        if let Some(username) = &primary.username {
            builder = builder.set_client_to_redis_username(username);
        }
    }
    if let Some(root) = ca {
        let certificates = || redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root.to_vec()),
        };
        builder = builder
            .set_client_to_sentinel_certificates(certificates())
            .set_client_to_redis_certificates(certificates());
    }
    builder.build()
}

/// A `ConnectionManager` with the configured deadlines, reconnecting with a short backoff.
fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
}

/// When a connection is replaced: after 3 commands in a row with no reply, within twice the connect timeout.
fn healing_config(config: &RedisConfig) -> HealingConfig {
    HealingConfig::default().connect_timeout(config.connect_timeout * 2)
}

/// A healing `ConnectionManager` to `client`'s server, connected within twice the connect timeout.
async fn healing_manager(
    client: redis::Client,
    config: &RedisConfig,
) -> redis::RedisResult<HealingConnection<ConnectionManager>> {
    let manager = manager_config(config);
    HealingConnection::connect(
        move || {
            let client = client.clone();
            let manager = manager.clone();
            async move { client.get_connection_manager_with_config(manager).await }
        },
        healing_config(config),
    )
    .await
}

/// Connects with the configured deadlines and checks the connection with a `PING`.
///
/// # Errors
///
/// [`ConnectError::Config`] when the settings cannot work, [`ConnectError::Unreachable`] when Redis does not answer
/// within the connect timeout.
pub async fn connect(config: &RedisConfig) -> Result<Redis, ConnectError> {
    if config.target.uses_tls() {
        install_crypto_provider();
    }
    let ca = match &config.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|error| {
            ConnectError::Config(format!(
                "REDIS_CA_FILE: cannot read {}: {error}",
                path.display()
            ))
        })?),
        None => None,
    };
    let deadline = config.connect_timeout;
    let unreachable = |error: String| {
        ConnectError::Unreachable(format!(
            "Redis at {} is not reachable: {error}",
            config.target.redacted()
        ))
    };
    let (connection, subscriber) = match &config.target {
        RedisTarget::Node(url) => {
            let client = client_for(url, ca.as_deref())?;
            let connected = healing_manager(client.clone(), config)
                .await
                .map_err(|error| unreachable(error.to_string()))?;
            (RedisConnection::Node(connected), Subscriber::from(client))
        }
        RedisTarget::Cluster(nodes) => {
            let mut builder =
                redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(deadline)
                    .response_timeout(config.command_timeout)
                    .tcp_settings(tower_redis_core::tcp::settings())
                    .retries(2);
            if config.cluster_read_from_replicas {
                builder = builder
                    .read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
            }
            if let Some(root) = &ca {
                builder = builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root.clone()),
                });
            }
            let cluster = builder
                .build()
                .map_err(|error| ConnectError::Config(format!("REDIS_CLUSTER_NODES: {error}")))?;
            let connected = HealingConnection::connect(
                move || {
                    let cluster = cluster.clone();
                    async move { cluster.get_async_connection().await }
                },
                healing_config(config),
            )
            .await
            .map_err(|error| unreachable(error.to_string()))?;
            let first = nodes.first().map_or("", String::as_str);
            (
                RedisConnection::Cluster(connected),
                Subscriber::from(client_for(first, ca.as_deref())?),
            )
        }
        RedisTarget::Sentinel {
            sentinels,
            master,
            primary,
        } => {
            let mut settings = SentinelConfig::default()
                .resolve_timeout(deadline)
                .connection_timeout(deadline)
                .redis_timeout(config.command_timeout)
                .primary_db(primary.db);
            if let Some(password) = &primary.password {
                settings = settings.primary_auth(primary.username.as_deref(), password);
            }
            let connecting = async {
                if config.target.uses_tls() {
                    let client = tls_sentinel_client(sentinels, master, primary, ca.as_deref())?;
                    SentinelConnection::with_client(client, master, settings).await
                } else {
                    SentinelConnection::connect(sentinels, master, settings).await
                }
            };
            let connected = tokio::time::timeout(deadline * 2, connecting)
                .await
                .map_err(|_| unreachable(format!("no answer within {} ms", deadline.as_millis())))?
                .map_err(|error| unreachable(error.to_string()))?;
            let subscriber = Subscriber::from(&connected);
            (RedisConnection::Sentinel(connected), subscriber)
        }
    };
    let mut replicas = Vec::with_capacity(config.replicas.len());
    for url in &config.replicas {
        let client = client_for(url, ca.as_deref())?;
        match healing_manager(client, config).await {
            Ok(replica) => replicas.push(replica),
            // A replica that is down now is left out: reads go to the primary, as they would after it failed.
            Err(error) => {
                tracing::warn!(replica = %crate::config::redact(url), %error, "read replica left out");
            }
        }
    }
    let redis = Redis {
        connection,
        subscriber,
        replicas,
        command_timeout: config.command_timeout,
    };
    redis.ping().await.map_err(unreachable)?;
    Ok(redis)
}

impl Redis {
    /// One `PING` within the command timeout; the round trip on success.
    ///
    /// # Errors
    ///
    /// The Redis error, or a timeout, as text.
    pub async fn ping(&self) -> Result<Duration, String> {
        let mut connection = self.connection.clone();
        let started = Instant::now();
        let reply = tokio::time::timeout(
            self.command_timeout,
            redis::cmd("PING").query_async::<String>(&mut connection),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms",
                self.command_timeout.as_millis()
            )),
        }
    }
}
