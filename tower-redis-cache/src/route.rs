//! The settings of one route (or of a whole router), as a [`CacheLayer`](crate::CacheLayer) sets them and its
//! services read them: the storage rules, the key, bypass, tags, body bound, coalescing and purge.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::request::Parts;

use crate::policy::Rules;

/// Computes the cache key of a request; `None` passes the request through uncached.
pub type KeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
/// Says whether a request passes through without a lookup.
pub type BypassFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;
/// Extra tags for a stored response, from the request and the response.
pub type TagFn = Arc<dyn Fn(&Parts, &http::response::Parts) -> Vec<String> + Send + Sync>;
/// Says whether a `PURGE` request may invalidate its URL.
pub type PurgeFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The settings of one route (or of a whole router).
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) rules: Rules,
    pub(crate) key: Option<KeyFn>,
    pub(crate) bypass: Option<BypassFn>,
    pub(crate) tags: Option<TagFn>,
    pub(crate) tag_header: Option<HeaderName>,
    pub(crate) max_body: usize,
    pub(crate) coalesce: bool,
    pub(crate) coalesce_wait: Duration,
    pub(crate) origin_timeout: Option<Duration>,
    pub(crate) purge: Option<PurgeFn>,
}

impl Default for Route {
    fn default() -> Self {
        Self {
            rules: Rules::default(),
            key: None,
            bypass: None,
            tags: None,
            tag_header: Some(HeaderName::from_static("surrogate-key")),
            max_body: 8 * 1024 * 1024,
            coalesce: true,
            coalesce_wait: Duration::from_secs(5),
            origin_timeout: None,
            purge: None,
        }
    }
}
