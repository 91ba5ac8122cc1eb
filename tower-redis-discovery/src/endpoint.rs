//! [`HttpEndpoint`]: the service for one discovered instance, over a shared HTTP client.

use std::task::{Context, Poll};

use http::Uri;
use http::uri::{Authority, Scheme};
use tower::Service;

use crate::instance::Instance;

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
