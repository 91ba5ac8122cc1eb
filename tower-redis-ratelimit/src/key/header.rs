//! [`Header`], [`Extension`] and [`MethodAndRoute`]: keys from the request itself.

use std::fmt;
use std::marker::PhantomData;

use http::HeaderName;
use http::header::{AUTHORIZATION, InvalidHeaderName};

use super::{KeyExtractor, RequestParts, free_form_key};

/// Keys by the value of a header: `hdr:x-api-key:k-123`, or with [`Header::bearer`] by a bearer token:
/// `bearer:<token>`.
///
/// Works for gRPC metadata too: ASCII metadata are HTTP/2 headers (`-bin` ones are read as their base64 text).
/// `None` if the header is absent, empty, or not visible ASCII (spaces and tabs inside are allowed and escaped); with
/// several lines of the header, the first is used. Values longer than 256 bytes, or every value with
/// [`hashed`](Self::hashed), are replaced by their hash (`hdr#:x-api-key:<16 hex digits>`).
///
/// Keys hold the value itself unless hashed: for secrets such as API keys, consider [`hashed`](Self::hashed) so they
/// do not appear in Redis, or key by the identity an authentication layer stored ([`Extension`]). The hash is not
/// cryptographic.
///
/// ```
/// use http::HeaderName;
/// use tower_redis_ratelimit::key::{Header, KeyExtractor, RequestParts};
///
/// let request = http::Request::builder()
///     .header("x-api-key", "k-123")
///     .header("authorization", "Bearer abc.def")
///     .body(())?;
/// let parts = RequestParts::new(&request);
/// let api_key = Header::new(HeaderName::from_static("x-api-key"));
/// assert_eq!(api_key.extract(&parts).as_deref(), Some("hdr:x-api-key:k-123"));
/// assert_eq!(Header::bearer().extract(&parts).as_deref(), Some("bearer:abc.def"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    name: HeaderName,
    bearer: bool,
    hashed: bool,
}

impl Header {
    /// Keys by the value of header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            bearer: false,
            hashed: false,
        }
    }

    /// Keys by the value of header `name` (any case); errors if `name` is not a valid header name.
    pub fn try_new(name: &str) -> Result<Self, InvalidHeaderName> {
        HeaderName::from_bytes(name.as_bytes()).map(Self::new)
    }

    /// Keys by the token of `Authorization: Bearer <token>` (scheme in any case); `None` for other schemes or a token
    /// that is not RFC 6750 `b64token` syntax.
    pub fn bearer() -> Self {
        Self {
            name: AUTHORIZATION,
            bearer: true,
            hashed: false,
        }
    }

    /// Puts the hash of every value in the key instead of the value, keeping secrets out of Redis.
    #[must_use]
    pub fn hashed(mut self) -> Self {
        self.hashed = true;
        self
    }
}

impl KeyExtractor for Header {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        let value = request.headers.get(&self.name)?.to_str().ok()?;
        let value = value.trim_matches([' ', '\t']);
        if self.bearer {
            let token = bearer_token(value)?;
            Some(free_form_key("bearer", None, token, self.hashed))
        } else if value.is_empty() {
            None
        } else {
            Some(free_form_key(
                "hdr",
                Some(self.name.as_str()),
                value,
                self.hashed,
            ))
        }
    }
}

/// The token of a `Bearer <token>` credential (RFC 6750 §2.1).
fn bearer_token(credentials: &str) -> Option<&str> {
    let (scheme, token) = credentials.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_start_matches([' ', '\t']);
    let body = token.trim_end_matches('=');
    let valid = !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    valid.then_some(token)
}

/// Keys by a typed request extension, such as the user an earlier authentication layer stored: `ext:<value>`.
///
/// The function returns the key part (a `String`, or an `Option<String>` to return no key); it is sanitized, and
/// hashed when longer than 256 bytes. `None` if the request has no extension of type `T`. Two `Extension` extractors
/// share the `ext:` prefix: combine one with a distinct prefix in your function if you use several.
///
/// ```
/// use tower_redis_ratelimit::key::{Extension, KeyExtractor, RequestParts};
///
/// #[derive(Clone)]
/// struct User {
///     id: u64,
/// }
///
/// let by_user = Extension::new(|user: &User| user.id.to_string());
/// let mut request = http::Request::new(());
/// assert_eq!(by_user.extract(&RequestParts::new(&request)), None);
/// request.extensions_mut().insert(User { id: 42 });
/// assert_eq!(by_user.extract(&RequestParts::new(&request)).as_deref(), Some("ext:42"));
/// ```
pub struct Extension<T, F> {
    key: F,
    _extension: PhantomData<fn(&T)>,
}

impl<T, F> Extension<T, F> {
    /// Keys by `key(&extension)` when the request has an extension of type `T`.
    pub fn new<R>(key: F) -> Self
    where
        F: Fn(&T) -> R,
        R: Into<Option<String>>,
    {
        Self {
            key,
            _extension: PhantomData,
        }
    }
}

impl<T, F: Clone> Clone for Extension<T, F> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            _extension: PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for Extension<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extension")
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, F, R> KeyExtractor for Extension<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> R + Send + Sync + 'static,
    R: Into<Option<String>>,
{
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        let value = (self.key)(request.extensions.get::<T>()?).into()?;
        Some(free_form_key("ext", None, &value, false))
    }
}

/// Keys by method and route: `route:GET:/users/%7Bid%7D`.
///
/// The route is axum's `MatchedPath` when present (feature `axum`; axum sets it once a `Router` has matched, so
/// layers added with `Router::layer` or `Router::route_layer` see it, layers wrapping the whole router do not),
/// otherwise the URI path — then every distinct path (`/users/1`, `/users/2`…) is a distinct key. Long paths are
/// hashed. For gRPC the path is the method (`/package.Service/Method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodAndRoute;

impl KeyExtractor for MethodAndRoute {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        #[cfg(feature = "axum")]
        if let Some(route) = request.extensions.get::<axum::extract::MatchedPath>() {
            return Some(free_form_key(
                "route",
                Some(request.method.as_str()),
                route.as_str(),
                false,
            ));
        }
        Some(free_form_key(
            "route",
            Some(request.method.as_str()),
            request.uri.path(),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::request;
    use http::Request;

    fn key(extractor: &impl KeyExtractor, request: &Request<()>) -> Option<String> {
        extractor.extract(&RequestParts::new(request))
    }

    fn api_key() -> Header {
        Header::new(HeaderName::from_static("x-api-key"))
    }

    #[test]
    fn header_value_is_the_key() {
        let req = request(None, &[("x-api-key", "k-123"), ("x-api-key", "second")]);
        assert_eq!(
            key(&api_key(), &req).as_deref(),
            Some("hdr:x-api-key:k-123")
        );
        assert_eq!(
            key(&Header::try_new("X-Api-Key").unwrap(), &req).as_deref(),
            Some("hdr:x-api-key:k-123")
        );
        assert!(Header::try_new("bad name").is_err());
    }

    #[test]
    fn header_absent_empty_or_not_ascii_gives_none() {
        assert_eq!(key(&api_key(), &request(None, &[])), None);
        assert_eq!(key(&api_key(), &request(None, &[("x-api-key", "")])), None);
        assert_eq!(
            key(&api_key(), &request(None, &[("x-api-key", " \t ")])),
            None
        );
        let mut req = request(None, &[]);
        req.headers_mut().insert(
            "x-api-key",
            http::HeaderValue::from_bytes(b"k\xc3\xa9").unwrap(),
        );
        assert_eq!(key(&api_key(), &req), None);
    }

    #[test]
    fn header_values_are_sanitized() {
        let req = request(None, &[("x-api-key", "a {b}|c%")]);
        assert_eq!(
            key(&api_key(), &req).as_deref(),
            Some("hdr:x-api-key:a%20%7Bb%7D%7Cc%25")
        );
    }

    #[test]
    fn long_or_hashed_header_values_are_hashed() {
        let long = "x".repeat(1000);
        let req = request(None, &[("x-api-key", &long)]);
        let expected = format!(
            "hdr#:x-api-key:{:016x}",
            super::super::fnv1a64(long.as_bytes())
        );
        assert_eq!(key(&api_key(), &req), Some(expected));
        let req = request(None, &[("x-api-key", "k-123")]);
        assert_eq!(
            key(&api_key().hashed(), &req).as_deref(),
            Some("hdr#:x-api-key:a37ede99e1c5ecfb")
        );
    }

    #[test]
    fn grpc_metadata_is_a_header() {
        let mut req = request(
            None,
            &[
                ("content-type", "application/grpc"),
                ("x-api-key", "grpc-key"),
                ("te", "trailers"),
            ],
        );
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static("/echo.Echo/UnaryEcho");
        assert_eq!(
            key(&api_key(), &req).as_deref(),
            Some("hdr:x-api-key:grpc-key")
        );
        assert_eq!(
            key(&MethodAndRoute, &req).as_deref(),
            Some("route:POST:/echo.Echo/UnaryEcho")
        );
    }

    #[test]
    fn bearer_token_is_the_key() {
        let bearer = |value: &str| {
            key(
                &Header::bearer(),
                &request(None, &[("authorization", value)]),
            )
        };
        assert_eq!(
            bearer("Bearer abc.DEF-123_~+/==").as_deref(),
            Some("bearer:abc.DEF-123_~+/==")
        );
        assert_eq!(bearer("bearer   tok").as_deref(), Some("bearer:tok"));
        assert_eq!(bearer("BEARER tok ").as_deref(), Some("bearer:tok"));
        assert_eq!(
            key(
                &Header::bearer().hashed(),
                &request(None, &[("authorization", "Bearer tok")])
            ),
            Some(format!("bearer#:{:016x}", super::super::fnv1a64(b"tok")))
        );
    }

    #[test]
    fn bearer_rejects_other_schemes_and_bad_tokens() {
        let bearer = |value: &str| {
            key(
                &Header::bearer(),
                &request(None, &[("authorization", value)]),
            )
        };
        for value in [
            "Basic dXNlcjpwYXNz",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a=b",
            "Bearer ===",
            "Bearer {x}",
            "Bearerx y",
            "tok",
        ] {
            assert_eq!(bearer(value), None, "{value}");
        }
        assert_eq!(key(&Header::bearer(), &request(None, &[])), None);
    }

    #[derive(Clone)]
    struct User {
        id: u64,
        team: Option<&'static str>,
    }

    #[test]
    fn extension_reads_a_typed_extension() {
        let by_user = Extension::new(|user: &User| user.id.to_string());
        let mut req = request(None, &[]);
        assert_eq!(key(&by_user, &req), None);
        req.extensions_mut().insert(User { id: 42, team: None });
        assert_eq!(key(&by_user, &req).as_deref(), Some("ext:42"));
        assert!(format!("{by_user:?}").contains("User"));
    }

    #[test]
    fn extension_may_return_no_key_and_is_sanitized() {
        let by_team = Extension::new(|user: &User| user.team.map(|team| format!("team:{team}")));
        let mut req = request(None, &[]);
        req.extensions_mut().insert(User { id: 1, team: None });
        assert_eq!(key(&by_team, &req), None);
        req.extensions_mut().insert(User {
            id: 1,
            team: Some("red {1}"),
        });
        assert_eq!(
            key(&by_team, &req).as_deref(),
            Some("ext:team:red%20%7B1%7D")
        );
    }

    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn method_and_route_uses_axum_matched_path() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let route = |request: axum::extract::Request| async move {
            MethodAndRoute
                .extract(&RequestParts::new(&request))
                .unwrap_or_default()
        };
        let app = axum::Router::new().route("/users/{id}", axum::routing::get(route));
        let request = Request::get("/users/42")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "route:GET:/users/%7Bid%7D");
    }

    #[test]
    fn method_and_route_falls_back_to_the_uri_path() {
        let mut req = request(None, &[]);
        *req.uri_mut() = http::Uri::from_static("https://example.com/users/%7B1%7D?q=x");
        assert_eq!(
            key(&MethodAndRoute, &req).as_deref(),
            Some("route:GET:/users/%257B1%257D")
        );
        *req.method_mut() = http::Method::from_bytes(b"PURGE|X").unwrap();
        assert_eq!(
            key(&MethodAndRoute, &req).as_deref(),
            Some("route:PURGE%7CX:/users/%257B1%257D")
        );
    }
}
