//! The `Cache-Status` member this cache adds to every response (RFC 9211).

use std::fmt::Write as _;

use http::HeaderValue;

/// Why the request went forward to the origin (the `fwd` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    /// Not looked up: a bypass predicate, a range request, or a key function that declined.
    Bypass,
    /// The method is not cacheable (its response is never stored; unsafe methods invalidate).
    Method,
    /// Nothing stored for the URL.
    UriMiss,
    /// Something stored for the URL, but not for this variant.
    VaryMiss,
    /// The stored response was stale and had to be validated.
    Stale,
    /// The request's directives (no-cache, max-age, min-fresh) asked for the origin.
    Request,
}

impl Forward {
    fn token(self) -> &'static str {
        match self {
            Self::Bypass => "bypass",
            Self::Method => "method",
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Stale => "stale",
            Self::Request => "request",
        }
    }
}

/// One response's `Cache-Status` parameters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CacheStatus {
    pub(crate) hit: bool,
    pub(crate) fwd: Option<Forward>,
    pub(crate) fwd_status: Option<u16>,
    pub(crate) stored: bool,
    pub(crate) collapsed: bool,
    pub(crate) ttl: Option<i64>,
    pub(crate) detail: Option<&'static str>,
}

impl CacheStatus {
    pub(crate) fn hit(ttl: i64) -> Self {
        Self {
            hit: true,
            ttl: Some(ttl),
            ..Self::default()
        }
    }

    pub(crate) fn forward(fwd: Forward) -> Self {
        Self {
            fwd: Some(fwd),
            ..Self::default()
        }
    }

    pub(crate) fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    pub(crate) fn header(&self, name: &str) -> HeaderValue {
        let mut value = String::with_capacity(64);
        value.push_str(name);
        if self.hit {
            value.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            let _ = write!(value, "; fwd={}", fwd.token());
        }
        if let Some(status) = self.fwd_status {
            let _ = write!(value, "; fwd-status={status}");
        }
        if self.stored {
            value.push_str("; stored");
        }
        if self.collapsed {
            value.push_str("; collapsed");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(value, "; ttl={ttl}");
        }
        if let Some(detail) = self.detail {
            let _ = write!(value, "; detail={detail}");
        }
        // The name was checked to be a token at build time and every parameter is a token or a number.
        HeaderValue::try_from(value)
            .unwrap_or_else(|_| HeaderValue::from_static("tower-redis-cache"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rfc_9211_parameters_in_order() {
        let mut status = CacheStatus::forward(Forward::UriMiss);
        status.fwd_status = Some(200);
        status.stored = true;
        status.ttl = Some(60);
        assert_eq!(
            status.header("edge"),
            "edge; fwd=uri-miss; fwd-status=200; stored; ttl=60"
        );
        let mut hit = CacheStatus::hit(-3).detail("stale-while-revalidate");
        hit.collapsed = true;
        assert_eq!(
            hit.header("edge"),
            "edge; hit; collapsed; ttl=-3; detail=stale-while-revalidate"
        );
    }
}
