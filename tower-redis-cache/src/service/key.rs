//! The cache key of a request, and of the URLs a write invalidates.

use http::header::HOST;
use http::request::Parts;
use http::{Method, Request};

use super::Call;

impl Call {
    /// The route's key for a request: its key function's, or [`default_key`].
    pub(super) fn key(&self, parts: &Parts) -> Option<String> {
        match &self.route.key {
            Some(key) => key(parts),
            None => Some(default_key(parts)),
        }
    }
}

/// `scheme://authority/path?query`, with the authority from the URI or the `Host` header.
pub(super) fn default_key(parts: &Parts) -> String {
    let scheme = parts.uri.scheme_str().unwrap_or("http");
    let authority = parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| parts.headers.get(HOST).and_then(|host| host.to_str().ok()))
        .unwrap_or("");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut key = String::with_capacity(scheme.len() + 3 + authority.len() + path.len());
    key.push_str(scheme);
    key.push_str("://");
    key.extend(authority.chars().map(|c| c.to_ascii_lowercase()));
    key.push_str(path);
    key
}

/// The parts a GET for `uri` (or the request's own URI) would have, for computing its key.
pub(super) fn as_get(parts: &Parts, uri: Option<http::Uri>) -> Parts {
    let mut get = Request::new(()).into_parts().0;
    get.method = Method::GET;
    get.uri = uri.unwrap_or_else(|| parts.uri.clone());
    get.headers = parts.headers.clone();
    get
}

/// `location` resolved against the request, when it names the same origin (RFC 9111 §4.4 forbids invalidating
/// other hosts' URLs).
pub(super) fn same_origin(parts: &Parts, location: &str) -> Option<http::Uri> {
    if location.starts_with('/') && !location.starts_with("//") {
        let mut builder = http::Uri::builder();
        if let Some(scheme) = parts.uri.scheme() {
            builder = builder.scheme(scheme.clone());
        }
        if let Some(authority) = parts.uri.authority() {
            builder = builder.authority(authority.clone());
        }
        return builder.path_and_query(location).build().ok();
    }
    let uri: http::Uri = location.parse().ok()?;
    let own = parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| parts.headers.get(HOST).and_then(|host| host.to_str().ok()))?;
    let theirs = uri.authority()?.as_str();
    if !theirs.eq_ignore_ascii_case(own) {
        return None;
    }
    // Keep the path relative when the request was, so the key function sees what it would for a direct GET.
    if parts.uri.authority().is_none() {
        return uri
            .path_and_query()
            .and_then(|path| path.as_str().parse().ok());
    }
    Some(uri)
}
