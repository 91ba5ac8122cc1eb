//! Configuration from the environment. Every value is checked at start-up; a bad one is an error that names its
//! variable, never a silent default.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS |
//! | `REDIS_CLUSTER_NODES` | unset | comma-separated node URLs: connect to a Redis Cluster instead of `REDIS_URL` |
//! | `REDIS_SENTINELS` | unset | comma-separated Sentinel addresses (`host:port`, or URLs carrying the sentinels' own credentials: `redis://:pw@host:26379`): connect to the primary they name, and follow failovers, instead of `REDIS_URL`. `rediss://` URLs (all of them) mean TLS to the sentinels and to the primary |
//! | `REDIS_SENTINEL_MASTER` | unset (required with `REDIS_SENTINELS`) | the name the sentinels monitor the primary under |
//! | `REDIS_USERNAME` | unset (the default user) | with `REDIS_SENTINELS` only: the ACL user to log in to the primary as (needs `REDIS_PASSWORD`) |
//! | `REDIS_PASSWORD` | unset | with `REDIS_SENTINELS` only: the primary's password (and the promoted replica's after a failover) |
//! | `REDIS_DB` | `0` | with `REDIS_SENTINELS` only: the database number to use on the primary |
//! | `REDIS_REPLICA_URLS` | unset | comma-separated URLs of read replicas of the primary (`REDIS_URL` or the Sentinel's): the gateway's cache reads from one of them at random and falls back to the primary when it misses or fails |
//! | `REDIS_CLUSTER_READ_FROM_REPLICAS` | `false` | with `REDIS_CLUSTER_NODES`: `true` routes read-only commands to the cluster's replicas (the cluster client's own routing) |
//! | `REDIS_CA_FILE` | unset | PEM file of the CA that signed the Redis server's certificate (`rediss://` only, sentinels and their primary included; default: the system's roots) |
//! | `REDIS_PREFIX` | `demo:` | namespace of every key and channel the demo writes |
//! | `REDIS_CONNECT_TIMEOUT_MS` | `1000` | how long to wait for Redis at start-up before going single-instance |
//! | `REDIS_COMMAND_TIMEOUT_MS` | `250` | the deadline of every Redis command |
//! | `HOST` | `127.0.0.1` | the address to listen on |
//! | `ADVERTISE_HOST` | `HOST` (`127.0.0.1` when `HOST` is unspecified) | the address registered for peers to call |
//! | `PORT` | per binary | the port to listen on (0: any free port) |
//! | `RATE_LIMIT_WRITES` | `10/1s` | the gateway's limit on writes per API key (else per client IP): `N/<duration>` |
//!
//! Binaries read their own limits with [`rates_from_env`] and [`policies_from_env`] (`rate-limited-api`:
//! `RATE_LIMIT_ANONYMOUS`, `RATE_LIMIT_FREE`, `RATE_LIMIT_PRO`, and `RATE_LIMIT_WRITES` with a default of its own;
//! `tonic-server`: `RATE_LIMIT_CALLS`), and any other variable with [`var`].

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// A bad environment value: the variable and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable.
    pub variable: &'static str,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl ConfigError {
    fn new(variable: &'static str, message: impl Into<String>) -> Self {
        Self {
            variable,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where Redis is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a Sentinel-managed or managed endpoint), by URL.
    Node(String),
    /// A Redis Cluster, by the URLs of some of its nodes.
    Cluster(Vec<String>),
    /// The primary that sentinels (by URL) monitor under `master`; followed across failovers.
    Sentinel {
        /// The sentinels' URLs (`redis://host:port`, with the sentinels' own credentials if any; all `rediss://` for
        /// TLS, which then applies to the primary too).
        sentinels: Vec<String>,
        /// The name the sentinels monitor the primary under.
        master: String,
        /// How to log in to the primary (`REDIS_USERNAME`, `REDIS_PASSWORD`, `REDIS_DB`).
        primary: SentinelPrimary,
    },
}

/// How to log in to the primary the sentinels name (and, after a failover, to the replica promoted in its place):
/// the sentinels tell where it is, not how to log in.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentinelPrimary {
    /// The ACL user (`REDIS_USERNAME`); `None`: the default user.
    pub username: Option<String>,
    /// The password (`REDIS_PASSWORD`).
    pub password: Option<String>,
    /// The database number (`REDIS_DB`).
    pub db: i64,
}

impl fmt::Debug for SentinelPrimary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelPrimary")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

impl RedisTarget {
    /// The URLs with their passwords hidden, for logs.
    pub fn redacted(&self) -> String {
        match self {
            Self::Node(url) => redact(url),
            Self::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|url| redact(url)).collect();
                format!("cluster {}", nodes.join(","))
            }
            Self::Sentinel {
                sentinels,
                master,
                primary,
            } => {
                let sentinels: Vec<String> = sentinels.iter().map(|url| redact(url)).collect();
                let mut text = format!("sentinel master {master} via {}", sentinels.join(","));
                if let Some(username) = &primary.username {
                    text.push_str(&format!(" as {username}"));
                }
                if primary.password.is_some() {
                    text.push_str(" with a password");
                }
                if primary.db != 0 {
                    text.push_str(&format!(" db {}", primary.db));
                }
                text
            }
        }
    }

    /// Whether the connection uses TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        match self {
            Self::Node(url) => url.starts_with("rediss://"),
            Self::Cluster(nodes) => nodes.iter().any(|url| url.starts_with("rediss://")),
            // `parse_sentinels` makes them all `redis://` or all `rediss://`.
            Self::Sentinel { sentinels, .. } => {
                sentinels.iter().any(|url| url.starts_with("rediss://"))
            }
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The server or cluster.
    pub target: RedisTarget,
    /// A CA certificate (PEM) to trust for `rediss://`, instead of the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Read replicas of a single primary (`REDIS_REPLICA_URLS`), for the cache's reads.
    pub replicas: Vec<String>,
    /// On a Cluster, send read-only commands to replicas (`REDIS_CLUSTER_READ_FROM_REPLICAS`).
    pub cluster_read_from_replicas: bool,
    /// The namespace of every key and channel (`REDIS_PREFIX`).
    pub prefix: String,
    /// How long to wait for the first connection.
    pub connect_timeout: Duration,
    /// The deadline of each command.
    pub command_timeout: Duration,
}

/// A rate-limit policy: `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// Requests allowed per window.
    pub limit: u64,
    /// The window.
    pub window: Duration,
}

impl RateSpec {
    /// The window as written in a rate: `500ms`, `1s`, `10m`, `1h`.
    pub fn window_label(&self) -> String {
        let millis = self.window.as_millis();
        if millis.is_multiple_of(3_600_000) {
            format!("{}h", millis / 3_600_000)
        } else if millis.is_multiple_of(60_000) {
            format!("{}m", millis / 60_000)
        } else if millis.is_multiple_of(1000) {
            format!("{}s", millis / 1000)
        } else {
            format!("{millis}ms")
        }
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.limit, self.window_label())
    }
}

/// Everything a demo process reads from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Redis.
    pub redis: RedisConfig,
    /// The address to listen on.
    pub host: IpAddr,
    /// The address registered for peers.
    pub advertise_host: String,
    /// The port (`PORT`, or the binary's default).
    pub port: u16,
    /// The gateway's limit on writes.
    pub write_limit: RateSpec,
}

/// The default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Config {
    /// Reads the process environment; `default_port` is used when `PORT` is unset.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first variable with a bad value.
    pub fn from_env(default_port: u16) -> Result<Self, ConfigError> {
        Self::from_lookup(default_port, |name| match std::env::var(name) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(()),
        })
    }

    /// Reads the configuration through `lookup` (`Ok(None)`: unset; `Err(())`: not valid Unicode). An empty value
    /// counts as unset.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first variable with a bad value.
    pub fn from_lookup(
        default_port: u16,
        lookup: impl Fn(&str) -> Result<Option<String>, ()>,
    ) -> Result<Self, ConfigError> {
        let get = |variable: &'static str| -> Result<Option<String>, ConfigError> {
            match lookup(variable) {
                Ok(Some(value)) if value.trim().is_empty() => Ok(None),
                Ok(value) => Ok(value.map(|value| value.trim().to_owned())),
                Err(()) => Err(ConfigError::new(variable, "is not valid UTF-8")),
            }
        };

        let sentinels = get("REDIS_SENTINELS")?;
        let sentinel_master = get("REDIS_SENTINEL_MASTER")?;
        let db = get("REDIS_DB")?;
        let primary = SentinelPrimary {
            username: get("REDIS_USERNAME")?,
            password: get("REDIS_PASSWORD")?,
            db: match &db {
                Some(db) => parse_db(db)?,
                None => 0,
            },
        };
        if sentinels.is_none() {
            let cluster = get("REDIS_CLUSTER_NODES")?.is_some();
            for (variable, set) in [
                ("REDIS_USERNAME", primary.username.is_some()),
                ("REDIS_PASSWORD", primary.password.is_some()),
                ("REDIS_DB", db.is_some()),
            ] {
                if set {
                    return Err(ConfigError::new(
                        variable,
                        if cluster {
                            "is only used with REDIS_SENTINELS; with REDIS_CLUSTER_NODES put the credentials in \
                             each node URL (redis://user:password@host:7000; a cluster has database 0 only)"
                        } else {
                            "is only used with REDIS_SENTINELS; with REDIS_URL put it in the URL \
                             (redis://user:password@host:6379/db)"
                        },
                    ));
                }
            }
        }
        if primary.username.is_some() && primary.password.is_none() {
            return Err(ConfigError::new(
                "REDIS_USERNAME",
                "needs REDIS_PASSWORD (the user's password)",
            ));
        }
        let target = match (get("REDIS_CLUSTER_NODES")?, sentinels) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "REDIS_SENTINELS",
                    "cannot be combined with REDIS_CLUSTER_NODES; set one of them",
                ));
            }
            (None, Some(sentinels)) => RedisTarget::Sentinel {
                sentinels: parse_sentinels(&sentinels)?,
                master: parse_sentinel_master(sentinel_master.as_deref())?,
                primary,
            },
            (Some(_), None) | (None, None) if sentinel_master.is_some() => {
                return Err(ConfigError::new(
                    "REDIS_SENTINEL_MASTER",
                    "is only used with REDIS_SENTINELS, which is unset",
                ));
            }
            (Some(nodes), None) => {
                RedisTarget::Cluster(parse_url_list("REDIS_CLUSTER_NODES", &nodes)?)
            }
            (None, None) => {
                let url = get("REDIS_URL")?.unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
                parse_redis_url("REDIS_URL", &url)?;
                RedisTarget::Node(url)
            }
        };
        let replicas = match get("REDIS_REPLICA_URLS")? {
            Some(_) if matches!(target, RedisTarget::Cluster(_)) => {
                return Err(ConfigError::new(
                    "REDIS_REPLICA_URLS",
                    "is not used with REDIS_CLUSTER_NODES; set REDIS_CLUSTER_READ_FROM_REPLICAS=true to read from \
                     the cluster's replicas",
                ));
            }
            Some(urls) => parse_url_list("REDIS_REPLICA_URLS", &urls)?,
            None => Vec::new(),
        };
        let cluster_read_from_replicas = match get("REDIS_CLUSTER_READ_FROM_REPLICAS")? {
            None => false,
            Some(value) => {
                let on = parse_bool("REDIS_CLUSTER_READ_FROM_REPLICAS", &value)?;
                if on && !matches!(target, RedisTarget::Cluster(_)) {
                    return Err(ConfigError::new(
                        "REDIS_CLUSTER_READ_FROM_REPLICAS",
                        "is only used with REDIS_CLUSTER_NODES; for one primary, list its replicas in \
                         REDIS_REPLICA_URLS",
                    ));
                }
                on
            }
        };
        let ca_file = get("REDIS_CA_FILE")?.map(std::path::PathBuf::from);
        if let Some(path) = &ca_file {
            if !target.uses_tls() && !replicas.iter().any(|url| url.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_CA_FILE",
                    "is only used with rediss:// URLs; REDIS_URL (or REDIS_CLUSTER_NODES, REDIS_SENTINELS) is not TLS",
                ));
            }
            if !path.is_file() {
                return Err(ConfigError::new(
                    "REDIS_CA_FILE",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        let prefix = match get("REDIS_PREFIX")? {
            Some(prefix) => parse_prefix(&prefix)?,
            None => "demo:".to_owned(),
        };
        let connect_timeout = match get("REDIS_CONNECT_TIMEOUT_MS")? {
            Some(value) => parse_millis("REDIS_CONNECT_TIMEOUT_MS", &value)?,
            None => Duration::from_millis(1000),
        };
        let command_timeout = match get("REDIS_COMMAND_TIMEOUT_MS")? {
            Some(value) => parse_millis("REDIS_COMMAND_TIMEOUT_MS", &value)?,
            None => Duration::from_millis(250),
        };
        let host = match get("HOST")? {
            Some(host) => host.parse::<IpAddr>().map_err(|_| {
                ConfigError::new(
                    "HOST",
                    format!("{host:?} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)"),
                )
            })?,
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let advertise_host = match get("ADVERTISE_HOST")? {
            Some(advertise) => {
                if advertise.contains(['/', ' ', '@']) {
                    return Err(ConfigError::new(
                        "ADVERTISE_HOST",
                        format!("{advertise:?} is not a host name or address"),
                    ));
                }
                advertise
            }
            None if host.is_unspecified() => "127.0.0.1".to_owned(),
            None => host.to_string(),
        };
        let port = match get("PORT")? {
            Some(port) => port.parse::<u16>().map_err(|_| {
                ConfigError::new(
                    "PORT",
                    format!("{port:?} is not a port number (0 to 65535)"),
                )
            })?,
            None => default_port,
        };
        let write_limit = match get("RATE_LIMIT_WRITES")? {
            Some(value) => parse_rate("RATE_LIMIT_WRITES", &value)?,
            None => RateSpec {
                limit: 10,
                window: Duration::from_secs(1),
            },
        };
        Ok(Self {
            redis: RedisConfig {
                target,
                ca_file,
                replicas,
                cluster_read_from_replicas,
                prefix,
                connect_timeout,
                command_timeout,
            },
            host,
            advertise_host,
            port,
            write_limit,
        })
    }
}

/// Reads one variable from the process environment, trimmed; `None` when it is unset or empty.
///
/// # Errors
///
/// [`ConfigError`] when the value is not valid UTF-8.
pub fn var(variable: &'static str) -> Result<Option<String>, ConfigError> {
    match std::env::var(variable) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(ConfigError::new(variable, "is not valid UTF-8"))
        }
    }
}

/// Reads `variable` from the process environment as one or more rates, comma-separated (`10/1s,300/1m`: every
/// one applies), or parses `default` when it is unset.
///
/// # Errors
///
/// [`ConfigError`] naming `variable` when a rate does not parse or two share a window.
pub fn rates_from_env(variable: &'static str, default: &str) -> Result<Vec<RateSpec>, ConfigError> {
    let value = var(variable)?;
    parse_rates(variable, value.as_deref().unwrap_or(default))
}

/// Reads `variable` as rates (see [`rates_from_env`]) and makes one sliding-window policy of
/// `tower-redis-ratelimit` per rate, named `<name>-<window>` (`pro-1s`, `pro-1m`): the names clients see in the
/// `RateLimit` fields.
///
/// # Errors
///
/// [`ConfigError`] naming `variable` when a rate does not parse or the limiter refuses it (a limit too large).
pub fn policies_from_env(
    variable: &'static str,
    name: &str,
    default: &str,
) -> Result<Vec<tower_redis_ratelimit::Policy>, ConfigError> {
    rates_from_env(variable, default)?
        .iter()
        .map(|rate| {
            tower_redis_ratelimit::Policy::new(
                format!("{name}-{}", rate.window_label()),
                rate.limit,
                rate.window,
            )
            .map_err(|error| ConfigError::new(variable, error.to_string()))
        })
        .collect()
}

/// Parses comma-separated rates (see [`rates_from_env`]); `variable` names the source in errors.
///
/// # Errors
///
/// [`ConfigError`] naming `variable` when a rate does not parse, none is given, or two share a window.
pub fn parse_rates(variable: &'static str, value: &str) -> Result<Vec<RateSpec>, ConfigError> {
    let mut rates: Vec<RateSpec> = Vec::new();
    for part in value
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let rate = parse_rate(variable, part)?;
        if rates.iter().any(|other| other.window == rate.window) {
            return Err(ConfigError::new(
                variable,
                format!("{value:?} has two rates over {}", rate.window_label()),
            ));
        }
        rates.push(rate);
    }
    if rates.is_empty() {
        return Err(ConfigError::new(
            variable,
            format!("{value:?} is not a rate such as 10/1s, or a list such as 10/1s,300/1m"),
        ));
    }
    Ok(rates)
}

/// The ports of the three services the `demo` launcher starts: `USER_SERVICE_PORT` (3001), `ORDER_SERVICE_PORT`
/// (3002) and `GATEWAY_PORT` (3003); 0 picks a free port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoPorts {
    /// The user service's port.
    pub users: u16,
    /// The order service's port.
    pub orders: u16,
    /// The gateway's port.
    pub gateway: u16,
}

impl DemoPorts {
    /// Reads the process environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the variable whose value is not a port.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the ports through `lookup` (`None`: unset).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the variable whose value is not a port.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let port = |variable: &'static str, default: u16| -> Result<u16, ConfigError> {
            match lookup(variable).map(|value| value.trim().to_owned()) {
                Some(value) if !value.is_empty() => value.parse().map_err(|_| {
                    ConfigError::new(
                        variable,
                        format!("{value:?} is not a port number (0 to 65535)"),
                    )
                }),
                _ => Ok(default),
            }
        };
        Ok(Self {
            users: port("USER_SERVICE_PORT", 3001)?,
            orders: port("ORDER_SERVICE_PORT", 3002)?,
            gateway: port("GATEWAY_PORT", 3003)?,
        })
    }
}

/// Checks a Redis URL without connecting: scheme, host, port, database.
fn parse_redis_url(variable: &'static str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(ConfigError::new(
            variable,
            format!(
                "{:?} must start with redis:// or rediss:// (e.g. redis://:password@127.0.0.1:6379/0)",
                redact(url)
            ),
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|error| {
        ConfigError::new(
            variable,
            format!("{:?} is not a valid Redis URL: {error}", redact(url)),
        )
    })?;
    Ok(())
}

/// A comma-separated list of Redis URLs, each checked.
fn parse_url_list(variable: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(ConfigError::new(
            variable,
            "lists no URL; give comma-separated URLs such as redis://10.0.0.1:6379,redis://10.0.0.2:6379",
        ));
    }
    for url in &urls {
        parse_redis_url(variable, url)?;
    }
    Ok(urls)
}

fn parse_bool(variable: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            variable,
            format!("{value:?} is not a boolean (use true or false)"),
        )),
    }
}

/// `host:port`, `redis://` or `rediss://` items, comma-separated, as URLs; all `redis://` or all `rediss://`, and
/// with TLS, the same credentials on every one (redis-rs' builder takes one set for all sentinels).
fn parse_sentinels(value: &str) -> Result<Vec<String>, ConfigError> {
    let mut sentinels = Vec::new();
    for item in value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let url = if item.contains("://") {
            item.to_owned()
        } else {
            let valid = item.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
            });
            if !valid {
                return Err(ConfigError::new(
                    "REDIS_SENTINELS",
                    format!("{item:?} is not host:port (e.g. 10.0.0.5:26379)"),
                ));
            }
            format!("redis://{item}")
        };
        parse_redis_url("REDIS_SENTINELS", &url)?;
        sentinels.push(url);
    }
    if sentinels.is_empty() {
        return Err(ConfigError::new(
            "REDIS_SENTINELS",
            "lists no sentinel; give comma-separated addresses such as 10.0.0.5:26379,10.0.0.6:26379",
        ));
    }
    let tls = sentinels
        .iter()
        .filter(|url| url.starts_with("rediss://"))
        .count();
    if tls > 0 && tls < sentinels.len() {
        return Err(ConfigError::new(
            "REDIS_SENTINELS",
            "mixes TLS (rediss://) and plain sentinels (redis:// or host:port); write every one as rediss:// for \
             TLS, or none",
        ));
    }
    if tls > 0 {
        let credentials = |url: &str| {
            redis::IntoConnectionInfo::into_connection_info(url).map(|info| {
                let settings = info.redis_settings();
                (
                    settings.username().map(str::to_owned),
                    settings.password().map(str::to_owned),
                )
            })
        };
        let first = credentials(&sentinels[0]).ok();
        if sentinels[1..]
            .iter()
            .any(|url| credentials(url).ok() != first)
        {
            return Err(ConfigError::new(
                "REDIS_SENTINELS",
                "rediss:// sentinels must all carry the same credentials (or none)",
            ));
        }
    }
    for url in &sentinels {
        if redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .is_ok_and(|info| info.redis_settings().db() != 0)
        {
            return Err(ConfigError::new(
                "REDIS_SENTINELS",
                format!(
                    "{} names a database; sentinels have none: set REDIS_DB for the primary's",
                    redact(url)
                ),
            ));
        }
    }
    Ok(sentinels)
}

fn parse_db(value: &str) -> Result<i64, ConfigError> {
    match value.parse::<i64>() {
        Ok(db) if db >= 0 => Ok(db),
        _ => Err(ConfigError::new(
            "REDIS_DB",
            format!("{value:?} is not a database number (0, 1, 2, ...)"),
        )),
    }
}

fn parse_sentinel_master(master: Option<&str>) -> Result<String, ConfigError> {
    match master {
        None => Err(ConfigError::new(
            "REDIS_SENTINEL_MASTER",
            "is required with REDIS_SENTINELS: the name the sentinels monitor the primary under",
        )),
        Some(master) if master.contains(char::is_whitespace) => Err(ConfigError::new(
            "REDIS_SENTINEL_MASTER",
            format!("{master:?} contains whitespace"),
        )),
        Some(master) => Ok(master.to_owned()),
    }
}

fn parse_prefix(prefix: &str) -> Result<String, ConfigError> {
    if prefix.contains(['{', '}']) || prefix.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "REDIS_PREFIX",
            format!(
                "{prefix:?} must not contain braces or spaces (the layers put keys in Cluster hash tags)"
            ),
        ));
    }
    if prefix.len() > 64 {
        return Err(ConfigError::new(
            "REDIS_PREFIX",
            "is longer than 64 characters",
        ));
    }
    Ok(prefix.to_owned())
}

fn parse_millis(variable: &'static str, value: &str) -> Result<Duration, ConfigError> {
    match value.parse::<u64>() {
        Ok(0) => Err(ConfigError::new(variable, "must be above 0 milliseconds")),
        Ok(millis) if millis > 600_000 => Err(ConfigError::new(
            variable,
            format!("{millis} ms is more than 10 minutes"),
        )),
        Ok(millis) => Ok(Duration::from_millis(millis)),
        Err(_) => Err(ConfigError::new(
            variable,
            format!("{value:?} is not a whole number of milliseconds"),
        )),
    }
}

/// Parses `N/<duration>`, the duration as `500ms`, `1s`, `10s`, `1m` or `1h` (`N/s` means `N/1s`).
fn parse_rate(variable: &'static str, value: &str) -> Result<RateSpec, ConfigError> {
    let bad = || {
        ConfigError::new(
            variable,
            format!("{value:?} is not a rate such as 10/1s, 100/1m or 5/500ms"),
        )
    };
    let (limit, window) = value.split_once('/').ok_or_else(bad)?;
    let limit: u64 = limit.trim().parse().map_err(|_| bad())?;
    if limit == 0 {
        return Err(ConfigError::new(variable, "the limit must be at least 1"));
    }
    let window = window.trim();
    let split = window.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (amount, unit) = window.split_at(split);
    let amount: u64 = if amount.is_empty() {
        1
    } else {
        amount.parse().map_err(|_| bad())?
    };
    let window = match unit {
        "ms" => Duration::from_millis(amount),
        "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.saturating_mul(60)),
        "h" => Duration::from_secs(amount.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if window.is_zero() {
        return Err(ConfigError::new(variable, "the window must be above zero"));
    }
    Ok(RateSpec { limit, window })
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials
                .split_once(':')
                .map_or(credentials, |(user, _)| user);
            let hidden = if credentials.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Config::from_lookup(3001, |name| Ok(vars.get(name).cloned()))
    }

    fn error_variable(vars: &[(&str, &str)]) -> &'static str {
        match config(vars) {
            Ok(config) => panic!("{vars:?} was accepted: {config:?}"),
            Err(error) => error.variable,
        }
    }

    #[test]
    fn read_replicas_are_listed_for_one_primary_and_routed_by_the_client_on_a_cluster() {
        let single = config(&[(
            "REDIS_REPLICA_URLS",
            " redis://10.0.0.2:6379 , redis://:pw@10.0.0.3:6379/0 ",
        )])
        .unwrap();
        assert_eq!(
            single.redis.replicas,
            ["redis://10.0.0.2:6379", "redis://:pw@10.0.0.3:6379/0"]
        );
        assert!(!single.redis.cluster_read_from_replicas);
        let cluster = config(&[
            ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
            ("REDIS_CLUSTER_READ_FROM_REPLICAS", "true"),
        ])
        .unwrap();
        assert!(cluster.redis.cluster_read_from_replicas);
        assert!(cluster.redis.replicas.is_empty());

        for bad in [
            &[("REDIS_REPLICA_URLS", "10.0.0.2:6379")][..],
            &[("REDIS_REPLICA_URLS", " , ")],
            &[
                ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
                ("REDIS_REPLICA_URLS", "redis://10.0.0.2:6379"),
            ],
        ] {
            assert_eq!(error_variable(bad), "REDIS_REPLICA_URLS", "{bad:?}");
        }
        for bad in [
            &[("REDIS_CLUSTER_READ_FROM_REPLICAS", "true")][..],
            &[
                ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
                ("REDIS_CLUSTER_READ_FROM_REPLICAS", "sometimes"),
            ],
        ] {
            assert_eq!(
                error_variable(bad),
                "REDIS_CLUSTER_READ_FROM_REPLICAS",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_empty_environment_gives_the_documented_defaults() {
        let config = config(&[]).unwrap();
        assert_eq!(
            config.redis.target,
            RedisTarget::Node("redis://127.0.0.1:6379".to_owned())
        );
        assert_eq!(config.redis.prefix, "demo:");
        assert_eq!(config.redis.connect_timeout, Duration::from_millis(1000));
        assert_eq!(config.redis.command_timeout, Duration::from_millis(250));
        assert_eq!(config.port, 3001);
        assert_eq!(config.host, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(config.advertise_host, "127.0.0.1");
        assert_eq!(
            config.write_limit,
            RateSpec {
                limit: 10,
                window: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn urls_with_user_password_database_and_tls_are_accepted() {
        for url in [
            "redis://:secret@10.0.0.5:6380/2",
            "redis://app:secret@redis.internal:6379",
            "rediss://default:secret@cache.example.com:6380",
            "rediss://cache.example.com/#insecure",
        ] {
            let config = config(&[("REDIS_URL", url)]).unwrap();
            assert_eq!(config.redis.target, RedisTarget::Node(url.to_owned()));
        }
    }

    #[test]
    fn cluster_nodes_take_the_place_of_the_url() {
        let config = config(&[
            ("REDIS_URL", "redis://ignored:1"),
            (
                "REDIS_CLUSTER_NODES",
                "redis://10.0.0.1:7000, redis://10.0.0.2:7000,",
            ),
        ])
        .unwrap();
        assert_eq!(
            config.redis.target,
            RedisTarget::Cluster(vec![
                "redis://10.0.0.1:7000".to_owned(),
                "redis://10.0.0.2:7000".to_owned()
            ])
        );
    }

    #[test]
    fn sentinels_and_their_master_take_the_place_of_the_url() {
        let config = config(&[
            ("REDIS_URL", "redis://ignored:1"),
            ("REDIS_SENTINELS", "10.0.0.5:26379, redis://10.0.0.6:26380,"),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
        ])
        .unwrap();
        assert_eq!(
            config.redis.target,
            RedisTarget::Sentinel {
                sentinels: vec![
                    "redis://10.0.0.5:26379".to_owned(),
                    "redis://10.0.0.6:26380".to_owned()
                ],
                master: "mymaster".to_owned(),
                primary: SentinelPrimary::default(),
            }
        );
        assert_eq!(
            config.redis.target.redacted(),
            "sentinel master mymaster via redis://10.0.0.5:26379,redis://10.0.0.6:26380"
        );
        assert!(!config.redis.target.uses_tls());
    }

    #[test]
    fn bad_sentinel_settings_are_errors_naming_their_variable() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (
                &[("REDIS_SENTINELS", "10.0.0.5:26379")],
                "REDIS_SENTINEL_MASTER",
            ),
            (
                &[("REDIS_SENTINEL_MASTER", "mymaster")],
                "REDIS_SENTINEL_MASTER",
            ),
            (
                &[("REDIS_SENTINELS", " , "), ("REDIS_SENTINEL_MASTER", "m")],
                "REDIS_SENTINELS",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "10.0.0.5"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                ],
                "REDIS_SENTINELS",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "10.0.0.5:0"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                ],
                "REDIS_SENTINELS",
            ),
            (
                &[
                    ("REDIS_SENTINELS", "10.0.0.5:26379"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
                ],
                "REDIS_SENTINELS",
            ),
        ];
        for (vars, variable) in cases {
            assert_eq!(error_variable(vars), variable, "{vars:?}");
        }
        assert_eq!(
            error_variable(&[
                ("REDIS_SENTINELS", "10.0.0.5:26379"),
                ("REDIS_SENTINEL_MASTER", "my master")
            ]),
            "REDIS_SENTINEL_MASTER"
        );
    }

    #[test]
    fn the_primarys_credentials_and_database_come_with_the_sentinels() {
        let config = config(&[
            (
                "REDIS_SENTINELS",
                "10.0.0.5:26379, redis://:sentinel-pw@10.0.0.6:26379",
            ),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_USERNAME", "app"),
            ("REDIS_PASSWORD", "hunter2"),
            ("REDIS_DB", "3"),
        ])
        .unwrap();
        let RedisTarget::Sentinel {
            sentinels, primary, ..
        } = &config.redis.target
        else {
            panic!("not a Sentinel target: {:?}", config.redis.target);
        };
        assert_eq!(
            sentinels,
            &[
                "redis://10.0.0.5:26379".to_owned(),
                "redis://:sentinel-pw@10.0.0.6:26379".to_owned()
            ]
        );
        assert_eq!(
            primary,
            &SentinelPrimary {
                username: Some("app".to_owned()),
                password: Some("hunter2".to_owned()),
                db: 3,
            }
        );
        assert!(!config.redis.target.uses_tls());
        // Neither password is printed.
        for printed in [
            format!("{config:?}"),
            config.redis.target.redacted(),
            format!("{primary:?}"),
        ] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(!printed.contains("sentinel-pw"), "{printed}");
        }
        assert_eq!(
            config.redis.target.redacted(),
            "sentinel master mymaster via redis://10.0.0.5:26379,redis://:***@10.0.0.6:26379 as app with a \
             password db 3"
        );
        // The password alone logs in as the default user.
        let default_user = config_with_sentinels(&[("REDIS_PASSWORD", "pw")]).unwrap();
        assert!(matches!(
            default_user.redis.target,
            RedisTarget::Sentinel { ref primary, .. }
                if primary.username.is_none() && primary.password.as_deref() == Some("pw") && primary.db == 0
        ));
    }

    fn config_with_sentinels(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![
            ("REDIS_SENTINELS", "10.0.0.5:26379"),
            ("REDIS_SENTINEL_MASTER", "m"),
        ];
        all.extend_from_slice(vars);
        config(&all)
    }

    #[test]
    fn rediss_sentinels_mean_tls_to_the_sentinels_and_the_primary() {
        let tls = config(&[
            (
                "REDIS_SENTINELS",
                "rediss://:pw@10.0.0.5:26379,rediss://:pw@10.0.0.6:26379",
            ),
            ("REDIS_SENTINEL_MASTER", "m"),
            ("REDIS_CA_FILE", "/etc/hostname"),
        ])
        .unwrap();
        assert!(tls.redis.target.uses_tls());
        assert_eq!(
            tls.redis.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/hostname"))
        );
        for (sentinels, why) in [
            ("rediss://10.0.0.5:26379,10.0.0.6:26379", "mixes"),
            ("rediss://10.0.0.5:26379,redis://10.0.0.6:26379", "mixes"),
            (
                "rediss://:a@10.0.0.5:26379,rediss://:b@10.0.0.6:26379",
                "same credentials",
            ),
            ("redis://10.0.0.5:26379/2", "REDIS_DB"),
        ] {
            let error = config(&[
                ("REDIS_SENTINELS", sentinels),
                ("REDIS_SENTINEL_MASTER", "m"),
            ])
            .unwrap_err();
            assert_eq!(error.variable, "REDIS_SENTINELS", "{sentinels}");
            assert!(error.message.contains(why), "{sentinels}: {error}");
        }
        // Plain sentinels: a CA file has nothing to do.
        assert_eq!(
            error_variable(&[
                ("REDIS_SENTINELS", "10.0.0.5:26379"),
                ("REDIS_SENTINEL_MASTER", "m"),
                ("REDIS_CA_FILE", "/etc/hostname"),
            ]),
            "REDIS_CA_FILE"
        );
    }

    #[test]
    fn primary_credentials_without_sentinels_or_invalid_are_errors_naming_their_variable() {
        for variable in ["REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_DB"] {
            let value = if variable == "REDIS_DB" { "1" } else { "x" };
            let alone = config(&[(variable, value)]).unwrap_err();
            assert_eq!(alone.variable, variable);
            assert!(alone.message.contains("REDIS_URL"), "{alone}");
            let url =
                config(&[("REDIS_URL", "redis://127.0.0.1:6379"), (variable, value)]).unwrap_err();
            assert_eq!(url.variable, variable);
            let cluster = config(&[
                ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
                (variable, value),
            ])
            .unwrap_err();
            assert_eq!(cluster.variable, variable);
            assert!(cluster.message.contains("REDIS_CLUSTER_NODES"), "{cluster}");
        }
        // `REDIS_DB=0` is still a setting that belongs in the URL.
        assert_eq!(error_variable(&[("REDIS_DB", "0")]), "REDIS_DB");
        for bad in ["-1", "one", "1.5"] {
            let error = config_with_sentinels(&[("REDIS_DB", bad)]).unwrap_err();
            assert_eq!(error.variable, "REDIS_DB", "{bad}");
        }
        let error = config_with_sentinels(&[("REDIS_USERNAME", "app")]).unwrap_err();
        assert_eq!(error.variable, "REDIS_USERNAME");
        assert!(error.message.contains("REDIS_PASSWORD"), "{error}");
    }

    #[test]
    fn each_bad_value_is_an_error_naming_its_variable() {
        let cases: [(&str, &str); 17] = [
            ("REDIS_URL", "http://127.0.0.1:6379"),
            ("REDIS_URL", "127.0.0.1:6379"),
            ("REDIS_URL", "redis://127.0.0.1:notaport"),
            ("REDIS_CLUSTER_NODES", " , ,"),
            ("REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000,10.0.0.2:7000"),
            ("REDIS_PREFIX", "a{b}:"),
            ("REDIS_PREFIX", "two words"),
            ("REDIS_CONNECT_TIMEOUT_MS", "1s"),
            ("REDIS_CONNECT_TIMEOUT_MS", "0"),
            ("REDIS_COMMAND_TIMEOUT_MS", "-5"),
            ("HOST", "localhost"),
            ("ADVERTISE_HOST", "http://x"),
            ("PORT", "70000"),
            ("PORT", "http"),
            ("RATE_LIMIT_WRITES", "10"),
            ("RATE_LIMIT_WRITES", "0/1s"),
            ("RATE_LIMIT_WRITES", "5/1d"),
        ];
        for (variable, value) in cases {
            assert_eq!(
                error_variable(&[(variable, value)]),
                variable,
                "{variable}={value}"
            );
        }
    }

    #[test]
    fn the_message_names_the_variable_and_hides_the_password() {
        let error = config(&[("REDIS_URL", "redis://app:hunter2@h:bad")]).unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("REDIS_URL: "), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn a_ca_file_needs_a_tls_url_and_an_existing_file() {
        assert_eq!(
            error_variable(&[("REDIS_CA_FILE", "/etc/hostname")]),
            "REDIS_CA_FILE"
        );
        assert_eq!(
            error_variable(&[
                ("REDIS_URL", "rediss://127.0.0.1:6380"),
                ("REDIS_CA_FILE", "/no/such/ca.pem")
            ]),
            "REDIS_CA_FILE"
        );
    }

    #[test]
    fn timeouts_ports_and_rates_parse() {
        let config = config(&[
            ("REDIS_CONNECT_TIMEOUT_MS", "300"),
            ("REDIS_COMMAND_TIMEOUT_MS", "75"),
            ("REDIS_PREFIX", "shop:"),
            ("PORT", "0"),
            ("HOST", "0.0.0.0"),
            ("RATE_LIMIT_WRITES", "100/1m"),
        ])
        .unwrap();
        assert_eq!(config.redis.connect_timeout, Duration::from_millis(300));
        assert_eq!(config.redis.command_timeout, Duration::from_millis(75));
        assert_eq!(config.redis.prefix, "shop:");
        assert_eq!(config.port, 0);
        assert_eq!(config.advertise_host, "127.0.0.1");
        assert_eq!(
            config.write_limit,
            RateSpec {
                limit: 100,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(
            parse_rate("X", "5/500ms").unwrap().window,
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_rate("X", "5/s").unwrap().window,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn rate_lists_parse_in_order_and_print_as_written() {
        let rates = parse_rates("X", "10/1s, 300/1m,5/500ms").unwrap();
        let printed: Vec<String> = rates.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["10/1s", "300/1m", "5/500ms"]);
        assert_eq!(parse_rates("X", "2/1h").unwrap()[0].window_label(), "1h");
        assert_eq!(parse_rates("X", "1/s,2/1s").unwrap_err().variable, "X");
        assert!(parse_rates("X", " , ").is_err());
        assert!(parse_rates("X", "10/1s,ten/1m").is_err());
    }

    #[test]
    fn a_value_that_is_not_unicode_is_named() {
        let error = Config::from_lookup(1, |name| {
            if name == "REDIS_PREFIX" {
                Err(())
            } else {
                Ok(None)
            }
        })
        .unwrap_err();
        assert_eq!(error.variable, "REDIS_PREFIX");
    }

    #[test]
    fn demo_ports_default_to_3001_3002_3003_and_name_a_bad_variable() {
        let none = DemoPorts::from_lookup(|_| None).unwrap();
        assert_eq!((none.users, none.orders, none.gateway), (3001, 3002, 3003));
        let set = DemoPorts::from_lookup(|name| (name == "GATEWAY_PORT").then(|| "0".to_owned()))
            .unwrap();
        assert_eq!(set.gateway, 0);
        let error =
            DemoPorts::from_lookup(|name| (name == "ORDER_SERVICE_PORT").then(|| "x".to_owned()))
                .unwrap_err();
        assert_eq!(error.variable, "ORDER_SERVICE_PORT");
    }

    #[test]
    fn redaction_hides_passwords_only() {
        assert_eq!(redact("redis://app:pw@h:1/0"), "redis://app:***@h:1/0");
        assert_eq!(redact("rediss://:pw@h:1"), "rediss://:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
