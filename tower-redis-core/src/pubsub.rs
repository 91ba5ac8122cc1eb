//! Where dedicated connections come from: the pub/sub subscriptions and blocking reads that cannot share a
//! multiplexed command connection.
//!
//! A [`Subscriber`] is made from a `redis::Client` (a fixed server: one node, or any node of a Cluster, since
//! `PUBLISH` reaches subscribers on every node) or, with the `sentinel` feature, from a
//! [`SentinelConnection`](crate::sentinel::SentinelConnection): then every (re)connection asks the sentinels for the
//! primary *now*, so a subscription dropped by a failover comes back on the promoted replica instead of retrying the
//! dead primary forever. Every subscribing API of the workspace takes `impl Into<Subscriber>`.

use redis::RedisResult;
use redis::aio::PubSub;

/// The source of dedicated (pub/sub or blocking) connections. Cloning it is cheap.
#[derive(Clone)]
pub struct Subscriber {
    source: Source,
}

#[derive(Clone)]
enum Source {
    /// Boxed: a `Client` is large, the other variant a pointer.
    Client(Box<redis::Client>),
    #[cfg(feature = "sentinel")]
    Sentinel(crate::sentinel::SentinelConnection),
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Client(client) => f
                .debug_tuple("Subscriber::Client")
                .field(&client.get_connection_info().addr())
                .finish(),
            #[cfg(feature = "sentinel")]
            Source::Sentinel(connection) => f
                .debug_tuple("Subscriber::Sentinel")
                .field(connection)
                .finish(),
        }
    }
}

impl Subscriber {
    /// A client for the server to connect to now: the configured one, or the primary the sentinels name at this
    /// moment.
    ///
    /// # Errors
    ///
    /// With Sentinel, when no sentinel names a primary within the lookup timeout.
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match &self.source {
            Source::Client(client) => Ok((**client).clone()),
            #[cfg(feature = "sentinel")]
            Source::Sentinel(connection) => connection.primary_client().await,
        }
    }

    /// A new pub/sub connection to [`Subscriber::client`]'s server.
    ///
    /// # Errors
    ///
    /// When the server cannot be looked up or connected to.
    pub async fn pubsub(&self) -> RedisResult<PubSub> {
        self.client().await?.get_async_pubsub().await
    }
}

impl From<redis::Client> for Subscriber {
    fn from(client: redis::Client) -> Self {
        Self {
            source: Source::Client(Box::new(client)),
        }
    }
}

#[cfg(feature = "sentinel")]
impl From<crate::sentinel::SentinelConnection> for Subscriber {
    fn from(connection: crate::sentinel::SentinelConnection) -> Self {
        Self {
            source: Source::Sentinel(connection),
        }
    }
}

#[cfg(feature = "sentinel")]
impl From<&crate::sentinel::SentinelConnection> for Subscriber {
    fn from(connection: &crate::sentinel::SentinelConnection) -> Self {
        Self::from(connection.clone())
    }
}
