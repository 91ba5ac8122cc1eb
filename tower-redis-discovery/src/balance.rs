//! Balancing across discovered instances: power of two choices over peak-EWMA latency (as linkerd does), with
//! fail-fast: no endpoint is an immediate [`NoEndpoints`] error, and no ready endpoint within the fail-fast timeout
//! (default 3 s) is an [`Unavailable`] error. No request waits forever. The picker itself is in `strategy.rs`.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use tower::BoxError;
use tower::Service;
use tower::util::BoxCloneSyncService;

use tower_redis_core::ConfigError;

use crate::discover::Discovery;
use crate::instance::Instance;
use crate::strategy::{Strategy, balance_with};

/// No instance of the service is known: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoEndpoints(());

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no endpoints: discovery knows no instance of this service")
    }
}

impl std::error::Error for NoEndpoints {}

impl NoEndpoints {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// Instances are known, but none became ready within the fail-fast timeout: the request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable(());

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unavailable: no endpoint became ready within the fail-fast timeout")
    }
}

impl std::error::Error for Unavailable {}

impl Unavailable {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

/// How to balance: [`BalanceOptions::default`], or [`BalanceOptions::builder`] to change a setting.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BalanceOptions {
    pub(crate) failfast: Duration,
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
}

/// Builds [`BalanceOptions`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BalanceOptionsBuilder {
    options: BalanceOptions,
}

impl BalanceOptions {
    /// A builder starting from the defaults.
    pub fn builder() -> BalanceOptionsBuilder {
        BalanceOptionsBuilder {
            options: Self::default(),
        }
    }

    /// How long a request may wait for a ready endpoint.
    pub fn failfast(&self) -> Duration {
        self.failfast
    }

    /// The latency assumed for a new endpoint before it has answered.
    pub fn default_rtt(&self) -> Duration {
        self.default_rtt
    }

    /// How fast the peak-EWMA forgets.
    pub fn decay(&self) -> Duration {
        self.decay
    }
}

impl BalanceOptionsBuilder {
    /// How long a request may wait for a ready endpoint (default 3 s, as linkerd); above zero.
    pub fn failfast(mut self, wait: Duration) -> Self {
        self.options.failfast = wait;
        self
    }

    /// The latency assumed for a new endpoint before it has answered (default 1 ms: optimistic, so a new instance
    /// gets traffic at once; the peak-EWMA jumps to its real latency with its first slow answer).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.options.default_rtt = rtt;
        self
    }

    /// How fast the peak-EWMA forgets (default 10 s); above zero.
    pub fn decay(mut self, decay: Duration) -> Self {
        self.options.decay = decay;
        self
    }

    /// Validates.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the fail-fast wait or the decay is zero.
    pub fn build(self) -> Result<BalanceOptions, ConfigError> {
        for (field, value) in [
            ("failfast", self.options.failfast),
            ("decay", self.options.decay),
        ] {
            if value.is_zero() {
                return Err(ConfigError::in_component(
                    "balance",
                    field,
                    "must be greater than zero",
                ));
            }
        }
        Ok(self.options)
    }
}

impl Default for BalanceOptions {
    fn default() -> Self {
        Self {
            failfast: Duration::from_secs(3),
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
        }
    }
}

/// A balanced, cloneable service over a discovered set of endpoints. Errors are `BoxError`s you can downcast to
/// [`NoEndpoints`], [`Unavailable`] or the endpoint's own error.
pub type Balanced<Req, Res> = BoxCloneSyncService<Req, Res, BoxError>;

/// Balances requests over the instances `discovery` finds, making one endpoint service per instance with `make`:
/// power of two choices over peak-EWMA latency ([`Strategy::PeakEwma`]), with fail-fast. Every clone shares one
/// picker and waits for its endpoint on its own task (no buffer task in between). Must be called inside a Tokio
/// runtime. For the other strategies, see [`balance_with`].
pub fn balance<Req, S, F>(
    discovery: Discovery,
    make: F,
    options: BalanceOptions,
) -> Balanced<Req, S::Response>
where
    Req: Send + 'static,
    F: Fn(&Instance) -> S + Send + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    balance_with(discovery, make, Strategy::PeakEwma, options)
}

/// An endpoint for one instance: sends each request to the instance by rewriting the URI's scheme and authority
/// (the path and query are kept), through a shared client such as hyper-util's.
#[derive(Debug, Clone)]
pub struct HttpEndpoint<C> {
    client: C,
    scheme: Scheme,
    authority: Authority,
}

impl<C> HttpEndpoint<C> {
    /// An endpoint for `instance` using `client`. An instance whose host and port make no valid authority gets
    /// `localhost` instead (its requests then fail like any unreachable endpoint).
    pub fn new(client: C, instance: &Instance) -> Self {
        let authority = format!("{}:{}", instance.host, instance.port)
            .parse()
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        let scheme = if instance.protocol.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        Self {
            client,
            scheme,
            authority,
        }
    }
}

impl<C, B> Service<http::Request<B>> for HttpEndpoint<C>
where
    C: Service<http::Request<B>>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.client.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        self.client.call(request)
    }
}
