//! Peer lookups. Each instance keeps its records in memory, so a record lives on the instance that created it. When
//! an instance does not have a record, it asks the other `UP` instances of its service (from the registry) before
//! answering 404. A request from a peer carries `x-peer-lookup: 1` and is never forwarded again.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower_redis_discovery::Registry;

use crate::env::Env;

/// The header that marks a request from a peer.
pub(crate) const PEER_HEADER: &str = "x-peer-lookup";

/// Whether this request came from a peer (and so must not be forwarded).
pub(crate) fn from_peer(headers: &HeaderMap) -> bool {
    headers.contains_key(PEER_HEADER)
}

/// What asking the peers found.
pub(crate) enum Lookup {
    /// A peer answered with something other than 404.
    Found(Response<Body>),
    /// Every peer answered 404 (or there is no other instance): the record does not exist.
    Absent,
    /// Nobody had it, but the registry or a peer did not answer: the record may exist. Never a 404.
    Unknown(&'static str),
}

impl Lookup {
    /// The answer for a request whose record this instance does not have: the peer's answer, a 404 built by
    /// `absent`, or a 503 with `Retry-After` when it is not known whether the record exists.
    pub(crate) fn into_response(self, absent: impl FnOnce() -> Response<Body>) -> Response<Body> {
        match self {
            Self::Found(response) => response,
            Self::Absent => absent(),
            Self::Unknown(reason) => {
                let mut response = crate::json::error(StatusCode::SERVICE_UNAVAILABLE, reason);
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(1));
                response
            }
        }
    }
}

/// Sends the request to each peer in turn until one answers with something other than 404.
pub(crate) async fn ask<R: Registry>(
    env: &Env<R>,
    service: &str,
    self_id: &str,
    method: Method,
    path: &str,
    body: Bytes,
) -> Lookup {
    let Ok(peers) = env.peers(service, self_id).await else {
        return Lookup::Unknown("the registry did not answer, so the other instances are unknown");
    };
    let mut unanswered = false;
    for peer in peers {
        let uri = format!("{}{path}", peer.base_uri());
        let Ok(request) = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(PEER_HEADER, HeaderValue::from_static("1"))
            .header("content-type", HeaderValue::from_static("application/json"))
            .body(Full::new(body.clone()))
        else {
            continue;
        };
        let answer =
            tokio::time::timeout(Duration::from_secs(1), env.client.request(request)).await;
        match answer {
            Ok(Ok(response)) if response.status() != StatusCode::NOT_FOUND => {
                let (parts, incoming) = response.into_parts();
                let Ok(collected) = incoming.collect().await else {
                    unanswered = true;
                    continue;
                };
                return Lookup::Found(Response::from_parts(
                    parts,
                    Body::from(collected.to_bytes()),
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, peer = %peer.id, "peer lookup failed");
                unanswered = true;
            }
            Err(_) => {
                tracing::debug!(peer = %peer.id, "peer lookup timed out");
                unanswered = true;
            }
        }
    }
    if unanswered {
        Lookup::Unknown("another instance that may hold the record did not answer")
    } else {
        Lookup::Absent
    }
}
