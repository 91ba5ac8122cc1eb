//! [`PeerIp`] and [`ClientIp`]: keys by address.

use std::net::{IpAddr, SocketAddr};

use http::Extensions;

use super::cidr::{self, Cidr};
use super::forwarded::{self, Chain, ProxyHeader};
use super::{KeyExtractor, RequestParts};

/// The peer (socket) address of the connection, from the request extensions: axum's
/// `ConnectInfo<SocketAddr>` (feature `axum`), tonic's `TcpConnectInfo` (feature `tonic`), else a plain
/// [`SocketAddr`].
pub(crate) fn peer_addr(extensions: &Extensions) -> Option<SocketAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(*addr);
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
    {
        return Some(addr);
    }
    extensions.get::<SocketAddr>().copied()
}

/// How much of an address goes into the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mask {
    /// Bits kept of an IPv4 address.
    v4: u8,
    /// Bits kept of an IPv6 address.
    v6: u8,
}

impl Default for Mask {
    fn default() -> Self {
        Self { v4: 32, v6: 64 }
    }
}

impl Mask {
    /// `ip:<address>`, or `ip:<network>/<prefix>` when masked; IPv4-mapped IPv6 counts as IPv4.
    fn key(self, ip: IpAddr) -> String {
        let ip = cidr::canonical(ip);
        let prefix = match ip {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        };
        if prefix >= cidr::max_prefix(ip) {
            format!("ip:{ip}")
        } else {
            format!("ip:{}/{prefix}", cidr::mask(ip, prefix))
        }
    }
}

/// Keys by the socket peer address: `ip:203.0.113.7`, `ip:2001:db8:1:2::/64`.
///
/// The address is read from the request extensions, in order: axum's `ConnectInfo<SocketAddr>` (feature `axum`; serve
/// with `into_make_service_with_connect_info::<SocketAddr>()`), tonic's `TcpConnectInfo` (feature `tonic`; tonic
/// inserts it for plain TCP, but over TLS it wraps it in `TlsConnectInfo`, which is not read), then a plain
/// [`SocketAddr`]: other servers (hyper, or tonic with TLS) insert the peer address with
/// `request.extensions_mut().insert(addr)` in a layer. `None` if there is none.
///
/// Behind a reverse proxy the peer is the proxy: use [`ClientIp`].
///
/// IPv6 addresses are masked to `/64` by default, since one host usually holds a whole `/64`; IPv4 addresses are
/// kept whole (`/32`). An IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is treated as IPv4.
///
/// ```
/// use std::net::SocketAddr;
/// use tower_redis_ratelimit::key::{KeyExtractor, PeerIp, RequestParts};
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert("[2001:db8:1:2:3:4:5:6]:443".parse::<SocketAddr>()?);
/// let parts = RequestParts::new(&request);
/// assert_eq!(PeerIp::new().extract(&parts).as_deref(), Some("ip:2001:db8:1:2::/64"));
/// assert_eq!(PeerIp::new().ipv6_prefix(48).extract(&parts).as_deref(), Some("ip:2001:db8:1::/48"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerIp {
    mask: Mask,
}

impl PeerIp {
    /// Keys by peer address, IPv6 masked to `/64`, IPv4 whole.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the first `bits` bits of IPv4 addresses (default 32; values above 32 mean 32).
    #[must_use]
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        self.mask.v4 = bits.min(32);
        self
    }

    /// Keeps the first `bits` bits of IPv6 addresses (default 64; values above 128 mean 128).
    #[must_use]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.mask.v6 = bits.min(128);
        self
    }
}

impl KeyExtractor for PeerIp {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        peer_addr(request.extensions).map(|addr| self.mask.key(addr.ip()))
    }
}

/// Which proxies [`ClientIp`] believes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Trust {
    /// A fixed number of proxies in front of us.
    Hops(usize),
    /// Proxies whose addresses are in these networks.
    Proxies(Vec<Cidr>),
}

/// Keys by the client address behind trusted reverse proxies: `ip:203.0.113.7`.
///
/// Each proxy appends the address it received the request from to `X-Forwarded-For` or, as RFC 7239 `Forwarded`
/// `for=` parameters. If the request has a `Forwarded` header it is used, else `X-Forwarded-For`; several lines of
/// the header are concatenated in order. Pin the header your proxies write with [`ClientIp::proxy_header`]:
/// otherwise, behind proxies that write only `X-Forwarded-For`, a client can send a `Forwarded` header of its own,
/// which wins.
///
/// Only the right-most entries, added by proxies we trust, are believed: a client can put anything on the left. With
/// the peer (socket) address appended — read as [`PeerIp`] does — the list runs from the farthest address on the
/// left to our nearest proxy on the right:
///
/// - [`ClientIp::trusted_hops`]`(n)`: the address `n` hops from the right, where hop 0 is the peer and hop 1 the
///   right-most header entry. With fewer entries than that, the left-most one (the farthest address our proxies saw;
///   the peer when there is no header). Counting assumes every request crosses exactly `n` proxies: if clients can
///   reach the service directly, they choose their key; prefer `trusted_proxies` then.
/// - [`ClientIp::trusted_proxies`]: starting from the peer, walk left past addresses inside the trusted networks; the
///   first other address is the client. If the peer is not trusted the headers are ignored (anyone can send them)
///   and the peer is the client; if the peer address is unknown there is no key. If every address is trusted, the
///   left-most one.
///
/// The peer address is used when the header is absent or malformed (not ASCII, bad `Forwarded` syntax), or when the
/// entry chosen is not an IP address (`unknown`, an obfuscated identifier such as `_hidden`, garbage). Entries may
/// carry ports (`192.0.2.7:4711`, `"[2001:db8::1]:4711"`). Only the 64 right-most entries are read.
///
/// IPv6 addresses are masked to `/64` by default, IPv4 addresses are kept whole; IPv4-mapped IPv6 is treated as IPv4.
///
/// ```
/// use std::net::SocketAddr;
/// use tower_redis_ratelimit::key::{Cidr, ClientIp, KeyExtractor, ProxyHeader, RequestParts};
///
/// let mut request = http::Request::builder()
///     .header("x-forwarded-for", "192.0.2.1, 203.0.113.7, 10.0.0.3")
///     .body(())?;
/// request.extensions_mut().insert("10.0.0.2:41234".parse::<SocketAddr>()?);
/// let parts = RequestParts::new(&request);
///
/// // Two proxies: 10.0.0.2 (the peer) received the request from 10.0.0.3, which received it from the client.
/// assert_eq!(ClientIp::trusted_hops(2).extract(&parts).as_deref(), Some("ip:203.0.113.7"));
/// // 192.0.2.1 was written by the client itself: not believed.
/// let internal = ClientIp::trusted_proxies(["10.0.0.0/8".parse::<Cidr>()?])
///     .proxy_header(ProxyHeader::XForwardedFor);
/// assert_eq!(internal.extract(&parts).as_deref(), Some("ip:203.0.113.7"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIp {
    trust: Trust,
    header: ProxyHeader,
    mask: Mask,
}

impl ClientIp {
    /// Trusts the `hops` proxies nearest to us: the client is `hops` hops from the right (0: the peer itself).
    pub fn trusted_hops(hops: usize) -> Self {
        Self {
            trust: Trust::Hops(hops),
            header: ProxyHeader::XForwardedFor,
            mask: Mask::default(),
        }
    }

    /// Trusts proxies whose addresses are in `networks`, walking from the peer leftwards past them.
    pub fn trusted_proxies<I>(networks: I) -> Self
    where
        I: IntoIterator<Item = Cidr>,
    {
        Self {
            trust: Trust::Proxies(networks.into_iter().collect()),
            header: ProxyHeader::XForwardedFor,
            mask: Mask::default(),
        }
    }

    /// Reads the chain from `header` (default [`ProxyHeader::XForwardedFor`]; see [`ProxyHeader`] for why).
    #[must_use]
    pub fn proxy_header(mut self, header: ProxyHeader) -> Self {
        self.header = header;
        self
    }

    /// Keeps the first `bits` bits of IPv4 addresses (default 32; values above 32 mean 32).
    #[must_use]
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        self.mask.v4 = bits.min(32);
        self
    }

    /// Keeps the first `bits` bits of IPv6 addresses (default 64; values above 128 mean 128).
    #[must_use]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.mask.v6 = bits.min(128);
        self
    }

    /// The client address of `request`, unmasked, as described above; `None` if it cannot be found.
    pub fn client_ip(&self, request: &RequestParts<'_>) -> Option<IpAddr> {
        let peer = peer_addr(request.extensions).map(|addr| addr.ip());
        match &self.trust {
            Trust::Hops(0) => peer,
            Trust::Hops(hops) => match forwarded::chain(request.headers, self.header) {
                Some(chain) => by_hops(&chain, *hops).or(peer),
                None => peer,
            },
            Trust::Proxies(networks) => {
                let peer = peer?;
                let trusted = |ip: IpAddr| networks.iter().any(|network| network.contains(ip));
                if !trusted(peer) {
                    return Some(peer);
                }
                forwarded::chain(request.headers, self.header)
                    .and_then(|chain| by_walk(&chain, trusted))
                    .or(Some(peer))
            }
        }
    }
}

/// The entry `hops` (≥ 1) from the right of `chain`, else its left-most entry; `None` means "use the peer".
fn by_hops(chain: &Chain, hops: usize) -> Option<IpAddr> {
    match chain.entries.len().checked_sub(hops) {
        Some(index) => chain.entries.get(index).copied().flatten(),
        None if chain.truncated => None,
        None => chain.entries.front().copied().flatten(),
    }
}

/// The right-most untrusted entry of `chain` (the peer being trusted), else its left-most entry; `None` means "use
/// the peer".
fn by_walk(chain: &Chain, trusted: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    for entry in chain.entries.iter().rev() {
        match *entry {
            Some(ip) if trusted(ip) => {}
            Some(ip) => return Some(ip),
            None => return None,
        }
    }
    if chain.truncated {
        None
    } else {
        chain.entries.front().copied().flatten()
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, request: &RequestParts<'_>) -> Option<String> {
        self.client_ip(request).map(|ip| self.mask.key(ip))
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

    fn xff(peer: &str, value: &str) -> Request<()> {
        request(Some(peer), &[("x-forwarded-for", value)])
    }

    fn proxies(networks: &[&str]) -> ClientIp {
        ClientIp::trusted_proxies(networks.iter().map(|n| n.parse::<Cidr>().unwrap()))
    }

    const PEER: &str = "10.0.0.2:41234";

    #[test]
    fn peer_ip_reads_a_plain_socket_addr() {
        assert_eq!(
            key(&PeerIp::new(), &request(Some("203.0.113.7:5000"), &[])).as_deref(),
            Some("ip:203.0.113.7")
        );
        assert_eq!(key(&PeerIp::new(), &request(None, &[])), None);
    }

    #[test]
    fn ipv6_is_masked_to_64_by_default_and_48_on_request() {
        let req = request(Some("[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:443"), &[]);
        assert_eq!(
            key(&PeerIp::new(), &req).as_deref(),
            Some("ip:2001:db8:aaaa:bbbb::/64")
        );
        assert_eq!(
            key(&PeerIp::new().ipv6_prefix(48), &req).as_deref(),
            Some("ip:2001:db8:aaaa::/48")
        );
        assert_eq!(
            key(&PeerIp::new().ipv6_prefix(200), &req).as_deref(),
            Some("ip:2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff")
        );
        assert_eq!(
            key(&PeerIp::new().ipv6_prefix(0), &req).as_deref(),
            Some("ip:::/0")
        );
    }

    #[test]
    fn ipv4_can_be_masked() {
        let req = request(Some("203.0.113.77:1"), &[]);
        assert_eq!(
            key(&PeerIp::new().ipv4_prefix(24), &req).as_deref(),
            Some("ip:203.0.113.0/24")
        );
        assert_eq!(
            key(&PeerIp::new().ipv4_prefix(99), &req).as_deref(),
            Some("ip:203.0.113.77")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_treated_as_ipv4() {
        let req = request(Some("[::ffff:203.0.113.7]:443"), &[]);
        assert_eq!(key(&PeerIp::new(), &req).as_deref(), Some("ip:203.0.113.7"));
        assert_eq!(
            key(&PeerIp::new().ipv4_prefix(24), &req).as_deref(),
            Some("ip:203.0.113.0/24")
        );
        let mapped_client = xff("[::ffff:10.0.0.2]:1", "::ffff:198.51.100.4");
        assert_eq!(
            key(&proxies(&["10.0.0.0/8"]), &mapped_client).as_deref(),
            Some("ip:198.51.100.4")
        );
    }

    #[cfg(feature = "axum")]
    #[test]
    fn peer_ip_reads_axum_connect_info_first() {
        let mut req = request(Some("10.9.9.9:1"), &[]);
        let addr: SocketAddr = "198.51.100.1:2".parse().unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(addr));
        assert_eq!(
            key(&PeerIp::new(), &req).as_deref(),
            Some("ip:198.51.100.1")
        );
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn peer_ip_reads_tonic_tcp_connect_info() {
        let mut req = request(Some("10.9.9.9:1"), &[]);
        req.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some("198.51.100.2:3".parse().unwrap()),
            });
        assert_eq!(
            key(&PeerIp::new(), &req).as_deref(),
            Some("ip:198.51.100.2")
        );
        // Without a remote address the plain `SocketAddr` is next.
        let mut req = request(Some("10.9.9.9:1"), &[]);
        req.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            });
        assert_eq!(key(&PeerIp::new(), &req).as_deref(), Some("ip:10.9.9.9"));
    }

    #[test]
    fn xff_with_zero_one_and_two_trusted_hops() {
        let req = xff(PEER, "192.0.2.1, 203.0.113.7, 10.0.0.3");
        assert_eq!(
            key(&ClientIp::trusted_hops(0), &req).as_deref(),
            Some("ip:10.0.0.2")
        );
        assert_eq!(
            key(&ClientIp::trusted_hops(1), &req).as_deref(),
            Some("ip:10.0.0.3")
        );
        assert_eq!(
            key(&ClientIp::trusted_hops(2), &req).as_deref(),
            Some("ip:203.0.113.7")
        );
        assert_eq!(
            key(&ClientIp::trusted_hops(3), &req).as_deref(),
            Some("ip:192.0.2.1")
        );
    }

    #[test]
    fn xff_with_too_few_entries_gives_the_left_most() {
        let req = xff(PEER, "203.0.113.7");
        assert_eq!(
            key(&ClientIp::trusted_hops(2), &req).as_deref(),
            Some("ip:203.0.113.7")
        );
        assert_eq!(
            key(&ClientIp::trusted_hops(9), &req).as_deref(),
            Some("ip:203.0.113.7")
        );
        let no_header = request(Some(PEER), &[]);
        assert_eq!(
            key(&ClientIp::trusted_hops(2), &no_header).as_deref(),
            Some("ip:10.0.0.2")
        );
        let empty = xff(PEER, " , ");
        assert_eq!(
            key(&ClientIp::trusted_hops(1), &empty).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn hop_counting_needs_no_peer_but_hop_zero_does() {
        let req = request(None, &[("x-forwarded-for", "203.0.113.7, 10.0.0.3")]);
        assert_eq!(
            key(&ClientIp::trusted_hops(2), &req).as_deref(),
            Some("ip:203.0.113.7")
        );
        assert_eq!(key(&ClientIp::trusted_hops(0), &req), None);
        assert_eq!(key(&ClientIp::trusted_hops(1), &request(None, &[])), None);
    }

    #[test]
    fn cidr_trust_walks_past_trusted_proxies() {
        let trusted = proxies(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let req = xff(
            PEER,
            "192.0.2.1, 203.0.113.7, 10.1.1.1, 2001:db8:ffff::9, 10.0.0.3",
        );
        assert_eq!(key(&trusted, &req).as_deref(), Some("ip:203.0.113.7"));
        let ipv6_client = xff(PEER, "2001:db8:1:2:3:4:5:6, 10.0.0.3");
        assert_eq!(
            key(&trusted, &ipv6_client).as_deref(),
            Some("ip:2001:db8:1:2::/64")
        );
    }

    #[test]
    fn cidr_trust_with_only_trusted_addresses_gives_the_left_most() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            key(&trusted, &xff(PEER, "10.5.5.5, 10.0.0.3")).as_deref(),
            Some("ip:10.5.5.5")
        );
        assert_eq!(
            key(&trusted, &request(Some(PEER), &[])).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn spoofed_xff_from_an_untrusted_peer_is_ignored() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let spoofed = xff("198.51.100.66:5555", "1.2.3.4, 10.0.0.3");
        assert_eq!(key(&trusted, &spoofed).as_deref(), Some("ip:198.51.100.66"));
        let spoofed_forwarded =
            request(Some("198.51.100.66:5555"), &[("forwarded", "for=1.2.3.4")]);
        assert_eq!(
            key(&trusted, &spoofed_forwarded).as_deref(),
            Some("ip:198.51.100.66")
        );
        assert_eq!(
            key(&trusted, &request(None, &[("x-forwarded-for", "1.2.3.4")])),
            None
        );
        assert_eq!(
            key(&ClientIp::trusted_proxies([]), &xff(PEER, "1.2.3.4")).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn forwarded_with_quoted_ipv6_and_ports() {
        let value = r#"for="[2001:db8:cafe::17]:4711";proto=https, for="10.0.0.3:51000""#;
        let req = request(Some(PEER), &[("forwarded", value)]);
        assert_eq!(
            key(
                &ClientIp::trusted_hops(2).proxy_header(ProxyHeader::Auto),
                &req
            )
            .as_deref(),
            Some("ip:2001:db8:cafe::/64")
        );
        assert_eq!(
            key(
                &ClientIp::trusted_hops(2)
                    .proxy_header(ProxyHeader::Auto)
                    .ipv6_prefix(128),
                &req
            )
            .as_deref(),
            Some("ip:2001:db8:cafe::17")
        );
        assert_eq!(
            key(
                &proxies(&["10.0.0.0/8"]).proxy_header(ProxyHeader::Forwarded),
                &req
            )
            .as_deref(),
            Some("ip:2001:db8:cafe::/64")
        );
        // By default only X-Forwarded-For is read: a client-sent `Forwarded` cannot choose the key.
        assert_eq!(
            key(&proxies(&["10.0.0.0/8"]), &req).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for() {
        let req = request(
            Some(PEER),
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=192.0.2.60"),
            ],
        );
        assert_eq!(
            key(
                &ClientIp::trusted_hops(1).proxy_header(ProxyHeader::Auto),
                &req
            )
            .as_deref(),
            Some("ip:192.0.2.60")
        );
    }

    #[test]
    fn a_pinned_proxy_header_ignores_a_forwarded_header_sent_by_the_client() {
        let req = request(
            Some(PEER),
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("forwarded", "for=6.6.6.6"),
            ],
        );
        let xff_only = ClientIp::trusted_hops(1).proxy_header(ProxyHeader::XForwardedFor);
        assert_eq!(key(&xff_only, &req).as_deref(), Some("ip:198.51.100.1"));
        let forwarded_only = proxies(&["10.0.0.0/8"]).proxy_header(ProxyHeader::Forwarded);
        let xff = xff(PEER, "198.51.100.1");
        assert_eq!(key(&forwarded_only, &xff).as_deref(), Some("ip:10.0.0.2"));
    }

    #[test]
    fn unknown_and_obfuscated_for_values_are_skipped_for_the_peer() {
        let unknown = request(Some(PEER), &[("forwarded", "for=192.0.2.1, for=unknown")]);
        assert_eq!(
            key(
                &ClientIp::trusted_hops(1).proxy_header(ProxyHeader::Auto),
                &unknown
            )
            .as_deref(),
            Some("ip:10.0.0.2")
        );
        assert_eq!(
            key(&proxies(&["10.0.0.0/8"]), &unknown).as_deref(),
            Some("ip:10.0.0.2")
        );
        let obfuscated = request(
            Some(PEER),
            &[("forwarded", "for=192.0.2.1, for=\"_hidden:_port\"")],
        );
        assert_eq!(
            key(
                &ClientIp::trusted_hops(1).proxy_header(ProxyHeader::Auto),
                &obfuscated
            )
            .as_deref(),
            Some("ip:10.0.0.2")
        );
        assert_eq!(
            key(
                &ClientIp::trusted_hops(2).proxy_header(ProxyHeader::Auto),
                &obfuscated
            )
            .as_deref(),
            Some("ip:192.0.2.1")
        );
        assert_eq!(
            key(&proxies(&["10.0.0.0/8"]), &obfuscated).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn malformed_headers_fall_back_to_the_peer() {
        for (name, value) in [
            ("forwarded", "for=\"[2001:db8::1]"),
            ("forwarded", "for=1.2.3.4;for=5.6.7.8"),
            ("forwarded", "for=\"1.2.3.4\" x"),
            ("x-forwarded-for", "not an address"),
            ("x-forwarded-for", "1.2.3.4:99999"),
            ("x-forwarded-for", "{}|%"),
        ] {
            let req = request(Some(PEER), &[(name, value)]);
            assert_eq!(
                key(&ClientIp::trusted_hops(1), &req).as_deref(),
                Some("ip:10.0.0.2"),
                "{value}"
            );
            assert_eq!(
                key(&proxies(&["10.0.0.0/8"]), &req).as_deref(),
                Some("ip:10.0.0.2"),
                "{value}"
            );
        }
        let mut req = request(Some(PEER), &[]);
        let non_ascii = http::HeaderValue::from_bytes(b"1.2.3.4\xe9").unwrap();
        req.headers_mut().insert("x-forwarded-for", non_ascii);
        assert_eq!(
            key(&ClientIp::trusted_hops(1), &req).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    #[test]
    fn chains_longer_than_64_entries_are_cut_on_the_left() {
        let value = (0..100)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",");
        let req = xff(PEER, &value);
        assert_eq!(
            key(&ClientIp::trusted_hops(64), &req).as_deref(),
            Some("ip:10.0.0.36")
        );
        assert_eq!(
            key(&ClientIp::trusted_hops(65), &req).as_deref(),
            Some("ip:10.0.0.2")
        );
        assert_eq!(
            key(&proxies(&["10.0.0.0/8"]), &req).as_deref(),
            Some("ip:10.0.0.2")
        );
    }

    /// A tiny linear congruential generator (Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 56) as u8
        }
    }

    #[test]
    fn random_forwarding_headers_never_panic() {
        const ALPHABET: &[u8] = b"0123456789abcdefABCDEF.:[]_,; \t=\"\\forFORunknown%{}|\xff\x80";
        let mut rng = Lcg(0x5eed);
        let extractors = [
            ClientIp::trusted_hops(0),
            ClientIp::trusted_hops(1),
            ClientIp::trusted_hops(3),
            proxies(&["10.0.0.0/8", "::/0"]),
            proxies(&["198.51.100.0/24"]),
        ];
        let mut seen = 0;
        for round in 0..4000 {
            let len = usize::from(rng.next() % 48);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let byte = rng.next();
                    if round % 2 == 0 {
                        byte
                    } else {
                        ALPHABET[usize::from(byte) % ALPHABET.len()]
                    }
                })
                .collect();
            let Ok(value) = http::HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            seen += 1;
            let name = if round % 3 == 0 {
                "x-forwarded-for"
            } else {
                "forwarded"
            };
            let mut req = request(Some(PEER), &[]);
            req.headers_mut().insert(name, value);
            for extractor in &extractors {
                let got = key(extractor, &req);
                assert!(
                    got.as_deref().is_some_and(|k| k.starts_with("ip:")),
                    "{bytes:?} gave {got:?}"
                );
            }
            // The untrusted peer always wins.
            assert_eq!(key(&extractors[4], &req).as_deref(), Some("ip:10.0.0.2"));
        }
        assert!(seen > 2000, "only {seen} valid header values");
    }
}
