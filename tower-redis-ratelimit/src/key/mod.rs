//! Rate-limit keys: which bucket a request is counted in.
//!
//! A [`KeyExtractor`] reads the head of a request (a [`RequestParts`], so it needs no body type) and returns its key,
//! or `None` when the request has no key (the layer then applies its configured behaviour).
//!
//! | extractor | key |
//! |---|---|
//! | [`PeerIp`] | the socket peer address: `ip:203.0.113.7`, `ip:2001:db8:1:2::/64` |
//! | [`ClientIp`] | the client address behind trusted proxies ([`Cidr`], [`ProxyHeader`]): `ip:…` |
//! | [`Header`] | a header (or gRPC metadata) value: `hdr:x-api-key:k-123`; [`Header::bearer`]: `bearer:<token>` |
//! | [`Extension`] | a typed request extension, such as the user an authentication layer stored: `ext:42` |
//! | [`MethodAndRoute`] | the method and axum's matched route, else the URI path: `route:GET:/users/%7Bid%7D` |
//! | [`Global`] | one key for every request: `global` |
//! | `(A, B)`, `(A, B, C)` | every part, joined with `\|`; `None` if any part is `None` |
//! | [`FirstOf`], [`KeyExtractor::or`] | the key of the first extractor that has one |
//!
//! Any `Fn(&RequestParts<'_>) -> Option<String>` closure is an extractor too.
//!
//! Every built-in key starts with its kind (`ip:`, `hdr:`, `bearer:`, `ext:`, `route:`, `global`), so keys of
//! different extractors never collide, and is already [`sanitize`]d: it can go inside a Redis Cluster hash tag
//! (`{…}`). Values taken from the request that are longer than 256 bytes once sanitized are replaced by their 64-bit
//! FNV-1a hash, marked by a `#` after the kind (`hdr#:x-api-key:5f0c…`), so Redis keys stay short. Keys returned by
//! your own closures are used as they are: pass request data through [`sanitize`] yourself.
//!
//! Extractors never panic on request data: a missing or malformed value gives `None`, or for [`ClientIp`] the peer
//! address.
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//!
//! use http::{HeaderName, Request};
//! use tower_redis_ratelimit::key::{sanitize, ClientIp, Header, KeyExtractor, RequestParts};
//!
//! // By API key, else by the client address behind one reverse proxy.
//! let key = Header::new(HeaderName::from_static("x-api-key")).or(ClientIp::trusted_hops(1));
//!
//! let mut request = Request::builder()
//!     .header("x-forwarded-for", "203.0.113.7")
//!     .body(())?;
//! // axum's `ConnectInfo` and tonic's `TcpConnectInfo` are read too (features `axum`, `tonic`).
//! request.extensions_mut().insert("10.0.0.2:41234".parse::<SocketAddr>()?);
//! assert_eq!(key.extract(&RequestParts::new(&request)).as_deref(), Some("ip:203.0.113.7"));
//!
//! request.headers_mut().insert("x-api-key", "k-123".parse()?);
//! assert_eq!(key.extract(&RequestParts::new(&request)).as_deref(), Some("hdr:x-api-key:k-123"));
//!
//! // A closure is an extractor; it must sanitize what it takes from the request.
//! let by_tenant = |request: &RequestParts<'_>| {
//!     let tenant = request.headers.get("x-tenant")?.to_str().ok()?;
//!     Some(format!("tenant:{}", sanitize(tenant)))
//! };
//! request.headers_mut().insert("x-tenant", "a b".parse()?);
//! assert_eq!(by_tenant.extract(&RequestParts::new(&request)).as_deref(), Some("tenant:a%20b"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;

mod cidr;
mod forwarded;
mod header;
mod ip;

pub use cidr::{Cidr, CidrParseError};
pub use forwarded::ProxyHeader;
pub use header::{Extension, Header, MethodAndRoute};
pub use ip::{ClientIp, PeerIp};

/// Sanitized values longer than this many bytes are replaced by their hash.
const MAX_VALUE_LEN: usize = 256;

/// A borrowed view of a request's head, so extractors need no generic body type (and closures work).
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// The request method.
    pub method: &'a http::Method,
    /// The request URI.
    pub uri: &'a http::Uri,
    /// The request headers (for gRPC, also the metadata).
    pub headers: &'a http::HeaderMap,
    /// The request extensions (connection info, matched route, authenticated user…).
    pub extensions: &'a http::Extensions,
}

impl<'a> RequestParts<'a> {
    /// Borrows the head of `request`.
    pub fn new<B>(request: &'a http::Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
        }
    }

    /// Borrows the head of a request split with [`http::Request::into_parts`].
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
}

/// Extracts the rate-limit key of a request; `None` means "no key" (the layer then applies its configured behaviour).
pub trait KeyExtractor: Send + Sync + 'static {
    /// Returns the key of `request`, or `None` when it has none.
    fn extract(&self, request: &RequestParts<'_>) -> Option<String>;

    /// Tries `self`, then `other` when `self` has no key: the same as [`FirstOf`]`(self, other)`.
    fn or<B>(self, other: B) -> FirstOf<Self, B>
    where
        Self: Sized,
        B: KeyExtractor,
    {
        FirstOf(self, other)
    }
}

impl<F> KeyExtractor for F
where
    F: Fn(&RequestParts<'_>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        self(request)
    }
}

/// One key for every request: `global`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _request: &RequestParts<'_>) -> Option<String> {
        Some("global".to_owned())
    }
}

/// Tries the first extractor, then the second when the first has no key (e.g. by API key, else by client IP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirstOf<A, B>(pub A, pub B);

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for FirstOf<A, B> {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        self.0.extract(request).or_else(|| self.1.extract(request))
    }
}

/// Both keys joined with `|` (e.g. per user and route); `None` if either is `None`.
impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for (A, B) {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        let a = self.0.extract(request)?;
        let b = self.1.extract(request)?;
        Some(format!("{a}|{b}"))
    }
}

/// The three keys joined with `|`; `None` if any is `None`.
impl<A: KeyExtractor, B: KeyExtractor, C: KeyExtractor> KeyExtractor for (A, B, C) {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        let a = self.0.extract(request)?;
        let b = self.1.extract(request)?;
        let c = self.2.extract(request)?;
        Some(format!("{a}|{b}|{c}"))
    }
}

/// Percent-escapes (`%XX` per UTF-8 byte) `{`, `}`, `%`, `|`, control characters and whitespace in `key`, borrowing
/// it when nothing needs escaping.
///
/// The result can go inside a Redis Cluster hash tag (`{…}`) without ending it early, has no spaces or line breaks to
/// confuse logs, and contains no `|`, so the parts of a composite key (`(A, B)`) stay unambiguous. Distinct inputs
/// give distinct outputs. Built-in extractors already return sanitized keys; use this in your own closures. Escaping
/// is not idempotent (`%` becomes `%25`): sanitize raw request data once.
///
/// ```
/// use std::borrow::Cow;
/// use tower_redis_ratelimit::key::sanitize;
///
/// assert_eq!(sanitize("user:{42} x"), "user:%7B42%7D%20x");
/// assert!(matches!(sanitize("user:42"), Cow::Borrowed("user:42")));
/// ```
pub fn sanitize(key: &str) -> Cow<'_, str> {
    let Some(first) = key.find(needs_escape) else {
        return Cow::Borrowed(key);
    };
    let (clean, rest) = key.split_at(first);
    let mut out = String::with_capacity(key.len() + 8);
    out.push_str(clean);
    for c in rest.chars() {
        if needs_escape(c) {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Whether [`sanitize`] escapes `c`.
fn needs_escape(c: char) -> bool {
    matches!(c, '{' | '}' | '%' | '|') || c.is_control() || c.is_whitespace()
}

/// The 64-bit FNV-1a hash of `bytes`: stable across Rust versions and platforms, unlike `DefaultHasher`.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds `kind:label:value` from request data, sanitized, or `kind#:label:<hash>` when the value is long or `hash`
/// is set (the `#` keeps hashed and literal values apart).
fn free_form_key(kind: &str, label: Option<&str>, value: &str, hash: bool) -> String {
    let clean = sanitize(value);
    let hash = hash || clean.len() > MAX_VALUE_LEN;
    let mut key = String::with_capacity(
        kind.len() + 2 + label.map_or(0, |l| l.len() + 1) + clean.len().min(16),
    );
    key.push_str(kind);
    if hash {
        key.push('#');
    }
    key.push(':');
    if let Some(label) = label {
        key.push_str(&sanitize(label));
        key.push(':');
    }
    if hash {
        let _ = write!(key, "{:016x}", fnv1a64(value.as_bytes()));
    } else {
        key.push_str(&clean);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::net::SocketAddr;

    /// A request with `headers` whose peer is `peer`.
    pub(super) fn request(peer: Option<&str>, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/users/42");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap_or_default();
        if let Some(peer) = peer.and_then(|p| p.parse::<SocketAddr>().ok()) {
            request.extensions_mut().insert(peer);
        }
        request
    }

    fn key(extractor: &impl KeyExtractor, request: &Request<()>) -> Option<String> {
        extractor.extract(&RequestParts::new(request))
    }

    #[test]
    fn sanitize_leaves_plain_keys_borrowed() {
        assert!(matches!(
            sanitize("ip:203.0.113.7"),
            Cow::Borrowed("ip:203.0.113.7")
        ));
        assert!(matches!(sanitize(""), Cow::Borrowed("")));
        assert!(matches!(sanitize("héllo"), Cow::Borrowed("héllo")));
    }

    #[test]
    fn sanitize_escapes_braces_percent_pipe_controls_and_whitespace() {
        assert_eq!(sanitize("{tag}"), "%7Btag%7D");
        assert_eq!(sanitize("100%"), "100%25");
        assert_eq!(sanitize("a|b"), "a%7Cb");
        assert_eq!(sanitize("a b\tc\r\nd\0"), "a%20b%09c%0D%0Ad%00");
        assert_eq!(sanitize("x\u{a0}y\u{85}"), "x%C2%A0y%C2%85");
        assert_eq!(sanitize("é{"), "é%7B");
    }

    #[test]
    fn sanitize_output_never_holds_escaped_characters() {
        let mut state = 7_u64;
        for _ in 0..2000 {
            let text: String = (0..24)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    char::from_u32((state >> 40) as u32 % 0x3000).unwrap_or('?')
                })
                .collect();
            let clean = sanitize(&text);
            assert!(
                !clean.contains(|c: char| c != '%' && needs_escape(c)),
                "{clean:?}"
            );
        }
    }

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn long_values_are_hashed_and_marked() {
        let long = "k".repeat(300);
        assert_eq!(
            free_form_key("hdr", Some("x-api-key"), &long, false),
            format!("hdr#:x-api-key:{:016x}", fnv1a64(long.as_bytes()))
        );
        let short = "k".repeat(256);
        assert_eq!(
            free_form_key("hdr", Some("x-api-key"), &short, false),
            format!("hdr:x-api-key:{short}")
        );
        // 100 spaces become 300 bytes once escaped.
        assert!(free_form_key("ext", None, &" ".repeat(100), false).starts_with("ext#:"));
        assert_eq!(
            free_form_key("ext", None, "7", true),
            format!("ext#:{:016x}", fnv1a64(b"7"))
        );
    }

    #[test]
    fn global_is_one_key() {
        assert_eq!(key(&Global, &request(None, &[])).as_deref(), Some("global"));
    }

    #[test]
    fn closures_are_extractors() {
        let by_path =
            |request: &RequestParts<'_>| Some(format!("path:{}", sanitize(request.uri.path())));
        assert_eq!(
            key(&by_path, &request(None, &[])).as_deref(),
            Some("path:/users/42")
        );
    }

    #[test]
    fn request_parts_from_parts_sees_the_same_head() {
        let (parts, ()) = request(Some("10.0.0.1:1"), &[("x-api-key", "k")]).into_parts();
        let view = RequestParts::from_parts(&parts);
        assert_eq!(
            Header::try_new("x-api-key")
                .ok()
                .and_then(|h| h.extract(&view))
                .as_deref(),
            Some("hdr:x-api-key:k")
        );
        assert_eq!(PeerIp::new().extract(&view).as_deref(), Some("ip:10.0.0.1"));
    }

    #[test]
    fn pair_joins_keys_with_a_pipe() {
        let req = request(Some("198.51.100.9:5000"), &[("x-api-key", "k-1")]);
        let api_key = Header::new(http::HeaderName::from_static("x-api-key"));
        let pair = (Header::bearer().or(api_key), PeerIp::new());
        assert_eq!(
            key(&pair, &req).as_deref(),
            Some("hdr:x-api-key:k-1|ip:198.51.100.9")
        );
        let triple = (Global, MethodAndRoute, PeerIp::new());
        assert_eq!(
            key(&triple, &req).as_deref(),
            Some("global|route:GET:/users/42|ip:198.51.100.9")
        );
    }

    #[test]
    fn composite_is_none_when_any_part_is_none() {
        let req = request(None, &[("x-api-key", "k-1")]);
        assert_eq!(key(&(Header::bearer(), Global), &req), None);
        assert_eq!(key(&(Global, MethodAndRoute, PeerIp::new()), &req), None);
    }

    #[test]
    fn first_of_tries_in_order() {
        let api_key_else_ip = FirstOf(
            Header::new(http::HeaderName::from_static("x-api-key")),
            PeerIp::new(),
        );
        let with_key = request(Some("198.51.100.9:5000"), &[("x-api-key", "k-1")]);
        let without_key = request(Some("198.51.100.9:5000"), &[]);
        let neither = request(None, &[]);
        assert_eq!(
            key(&api_key_else_ip, &with_key).as_deref(),
            Some("hdr:x-api-key:k-1")
        );
        assert_eq!(
            key(&api_key_else_ip, &without_key).as_deref(),
            Some("ip:198.51.100.9")
        );
        assert_eq!(key(&api_key_else_ip, &neither), None);
        assert_eq!(
            key(&Header::bearer().or(Global), &neither).as_deref(),
            Some("global")
        );
    }
}
