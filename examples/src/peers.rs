//! Peer lookups. Each instance keeps its records in memory, so a record lives on the instance that created it. When
//! an instance does not have a record, it asks the other `UP` instances of its service (from the registry) before
//! answering 404. A request from a peer carries `x-peer-lookup: 1` and is never forwarded again.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower_discovery::Registry;

use crate::env::Env;

/// The header that marks a request from a peer.
pub(crate) const PEER_HEADER: &str = "x-peer-lookup";

/// Whether this request came from a peer (and so must not be forwarded).
pub(crate) fn from_peer(headers: &HeaderMap) -> bool {
    headers.contains_key(PEER_HEADER)
}

/// Sends the request to each peer in turn until one answers with something other than 404; `None` if none has it.
pub(crate) async fn ask<R: Registry>(
    env: &Env<R>,
    service: &str,
    self_id: &str,
    method: Method,
    path: &str,
    body: Bytes,
) -> Option<Response<Body>> {
    for peer in env.peers(service, self_id).await {
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
                    continue;
                };
                return Some(Response::from_parts(
                    parts,
                    Body::from(collected.to_bytes()),
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, peer = %peer.id, "peer lookup failed"),
            Err(_) => tracing::debug!(peer = %peer.id, "peer lookup timed out"),
        }
    }
    None
}
