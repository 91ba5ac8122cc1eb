//! Parsing of `Forwarded` (RFC 7239) and `X-Forwarded-For` into the chain of addresses proxies recorded.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};

/// The most entries a [`Chain`] keeps (the right-most ones): trusted proxies are on the right.
pub(super) const MAX_ENTRIES: usize = 64;

/// The `X-Forwarded-For` header name.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The addresses recorded by proxies, left (farthest, the client) to right (added by our nearest proxy).
///
/// An entry is `None` when it is not an IP address (`unknown`, an obfuscated identifier, garbage, or a `Forwarded`
/// element without `for=`): it keeps its position so hop counts stay right.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Chain {
    /// At most [`MAX_ENTRIES`] entries, the right-most ones.
    pub(super) entries: VecDeque<Option<IpAddr>>,
    /// Whether entries were dropped on the left.
    pub(super) truncated: bool,
}

impl Chain {
    /// Appends an entry on the right, dropping the left-most one when full.
    fn push(&mut self, entry: Option<IpAddr>) {
        if self.entries.len() == MAX_ENTRIES {
            self.entries.pop_front();
            self.truncated = true;
        }
        self.entries.push_back(entry);
    }
}

/// Which header [`ClientIp`](super::ClientIp) reads the proxy chain from.
///
/// The default is `X-Forwarded-For`, which nearly every proxy writes. Pin [`Forwarded`](Self::Forwarded) if your
/// proxies write RFC 7239 `Forwarded`. [`Auto`](Self::Auto) is only safe when your proxies write both: behind proxies
/// that write only `X-Forwarded-For`, a client could send its own `Forwarded` header, which would then win.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `Forwarded` if the request has one, else `X-Forwarded-For`.
    Auto,
    /// Only RFC 7239 `Forwarded` (its `for=` parameters).
    Forwarded,
    /// Only `X-Forwarded-For` (the default).
    #[default]
    XForwardedFor,
}

/// The chain from the header `source` selects; `None` if it is absent or malformed (not ASCII, or bad `Forwarded`
/// syntax). Header lines are concatenated in order.
pub(super) fn chain(headers: &HeaderMap, source: ProxyHeader) -> Option<Chain> {
    let forwarded = match source {
        ProxyHeader::Auto => headers.contains_key(FORWARDED),
        ProxyHeader::Forwarded => true,
        ProxyHeader::XForwardedFor => false,
    };
    let mut chain = Chain::default();
    if forwarded {
        let mut lines = headers.get_all(FORWARDED).iter().peekable();
        lines.peek()?;
        for line in lines {
            parse_forwarded(line.to_str().ok()?, &mut chain)?;
        }
    } else {
        let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
        lines.peek()?;
        for line in lines {
            for entry in line.to_str().ok()?.split(',') {
                let entry = entry.trim_matches([' ', '\t']);
                if !entry.is_empty() {
                    chain.push(parse_node(entry));
                }
            }
        }
    }
    Some(chain)
}

/// A node (RFC 7239 §6: `ip`, `ip:port`, `[ipv6]`, `[ipv6]:port`, `unknown`, `_obfuscated`) as an address, if it is
/// one; a bare IPv6 address is accepted too.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let ip = host.parse::<Ipv6Addr>().ok()?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(is_port))
            .then_some(IpAddr::V6(ip));
    }
    let (host, port) = node.split_once(':')?;
    let ip = host.parse::<Ipv4Addr>().ok()?;
    is_port(port).then_some(IpAddr::V4(ip))
}

/// A port: a number up to 65535 in at most 5 digits, or an obfuscated port (`_` then letters, digits, `.`, `_`, `-`).
fn is_port(port: &str) -> bool {
    match port.strip_prefix('_') {
        Some(obfuscated) => {
            !obfuscated.is_empty()
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => {
            port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok()
        }
    }
}

/// Appends the `for=` node of every element of one `Forwarded` line; `None` if the line is malformed.
///
/// Grammar (RFC 7239 §4): `1#forwarded-element`, `forwarded-element = [ pair ] *( ";" [ pair ] )`,
/// `pair = token "=" ( token / quoted-string )`; a parameter may appear once per element.
fn parse_forwarded(line: &str, chain: &mut Chain) -> Option<()> {
    let mut cursor = Cursor {
        bytes: line.as_bytes(),
        at: 0,
    };
    loop {
        cursor.skip_whitespace();
        match cursor.peek() {
            None => return Some(()),
            Some(b',') => {
                cursor.at += 1;
                continue;
            }
            Some(_) => {}
        }
        let mut node = None;
        loop {
            cursor.skip_whitespace();
            match cursor.peek() {
                None | Some(b',') => break,
                Some(b';') => {
                    cursor.at += 1;
                    continue;
                }
                Some(_) => {}
            }
            let name = cursor.token()?;
            cursor.eat(b'=')?;
            let value = cursor.value()?;
            if name.eq_ignore_ascii_case("for") {
                if node.is_some() {
                    return None;
                }
                node = Some(parse_node(&value));
            }
            cursor.skip_whitespace();
            match cursor.peek() {
                None | Some(b',') => break,
                Some(b';') => cursor.at += 1,
                Some(_) => return None,
            }
        }
        chain.push(node.flatten());
    }
}

/// A position in a header line.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The next byte, if any.
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Skips spaces and tabs.
    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// Consumes `byte`, or fails.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// Consumes a non-empty token (RFC 9110 `tchar`s).
    fn token(&mut self) -> Option<&'a str> {
        self.run(is_tchar)
    }

    /// Consumes a non-empty run of bytes satisfying `accept`.
    fn run(&mut self, accept: impl Fn(u8) -> bool) -> Option<&'a str> {
        let start = self.at;
        while self.peek().is_some_and(&accept) {
            self.at += 1;
        }
        let run = self.bytes.get(start..self.at)?;
        if run.is_empty() {
            return None;
        }
        std::str::from_utf8(run).ok()
    }

    /// Consumes a token or a quoted string, returning its (unescaped) content. Tokens may also hold `:`, `[` and `]`:
    /// some proxies do not quote `for=[2001:db8::1]:80` as RFC 7239 requires.
    fn value(&mut self) -> Option<Cow<'a, str>> {
        if self.peek() != Some(b'"') {
            return self
                .run(|b| is_tchar(b) || matches!(b, b':' | b'[' | b']'))
                .map(Cow::Borrowed);
        }
        self.at += 1;
        let mut content = String::new();
        loop {
            let byte = self.peek()?;
            self.at += 1;
            match byte {
                b'"' => return Some(Cow::Owned(content)),
                b'\\' => {
                    let escaped = self
                        .peek()
                        .filter(|&b| b == b'\t' || (b' '..=b'~').contains(&b))?;
                    self.at += 1;
                    content.push(char::from(escaped));
                }
                b'\t' | b' '..=b'~' => content.push(char::from(byte)),
                _ => return None,
            }
        }
    }
}

/// Whether `byte` may appear in a token (RFC 9110 §5.6.2).
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn chain_of(headers: &[(&str, &str)]) -> Option<Vec<Option<IpAddr>>> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        chain(&map, ProxyHeader::Auto).map(|chain| chain.entries.into())
    }

    #[test]
    fn nodes_with_ports_brackets_and_quotes() {
        assert_eq!(parse_node("192.0.2.43"), ip("192.0.2.43"));
        assert_eq!(parse_node("192.0.2.43:47011"), ip("192.0.2.43"));
        assert_eq!(parse_node("192.0.2.43:_port"), ip("192.0.2.43"));
        assert_eq!(parse_node("192.0.2.43:65535"), ip("192.0.2.43"));
        assert_eq!(parse_node("[2001:db8:cafe::17]"), ip("2001:db8:cafe::17"));
        assert_eq!(
            parse_node("[2001:db8:cafe::17]:4711"),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(parse_node("2001:db8:cafe::17"), ip("2001:db8:cafe::17"));
    }

    #[test]
    fn unknown_obfuscated_and_garbage_nodes_are_not_addresses() {
        for node in [
            "unknown",
            "UNKNOWN",
            "_hidden",
            "_SEVKISEK",
            "",
            "192.0.2.43:",
            "192.0.2.43:123456",
            "192.0.2.43:65536",
            "192.0.2.43:_",
            "192.0.2.43:x",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[192.0.2.1]",
            "fe80::1%eth0",
            "999.0.0.1",
            "example.com",
        ] {
            assert_eq!(parse_node(node), None, "{node}");
        }
    }

    #[test]
    fn forwarded_takes_for_of_each_element() {
        let value = r#"for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711", for=unknown"#;
        assert_eq!(
            chain_of(&[("forwarded", value)]),
            Some(vec![ip("192.0.2.60"), ip("2001:db8:cafe::17"), None])
        );
    }

    #[test]
    fn forwarded_elements_without_for_keep_their_place() {
        assert_eq!(
            chain_of(&[(
                "forwarded",
                "for=192.0.2.1, proto=https;by=10.0.0.1, ;, for=\"_x\""
            )]),
            Some(vec![ip("192.0.2.1"), None, None, None])
        );
        assert_eq!(chain_of(&[("forwarded", " , ,, ")]), Some(vec![]));
    }

    #[test]
    fn forwarded_quoted_strings_may_hold_separators_and_escapes() {
        let value = r#"for="[2001:db8::1]:80";host="a,b;c=\"d\"", for="\1\9\2.0.2.7""#;
        assert_eq!(
            chain_of(&[("forwarded", value)]),
            Some(vec![ip("2001:db8::1"), ip("192.0.2.7")])
        );
    }

    #[test]
    fn unquoted_ports_and_ipv6_are_tolerated() {
        assert_eq!(
            chain_of(&[(
                "forwarded",
                "for=[2001:db8::1]:80, for=2001:db8::2, for=192.0.2.1:8080"
            )]),
            Some(vec![ip("2001:db8::1"), ip("2001:db8::2"), ip("192.0.2.1")])
        );
    }

    #[test]
    fn malformed_forwarded_is_rejected() {
        for value in [
            "for",
            "for=",
            "=1.2.3.4",
            "for=\"1.2.3.4",
            "for=1.2.3.4 proto=http",
            "for=1.2.3.4;for=5.6.7.8",
            "for=\"a\\",
            "for=\"\"x",
        ] {
            assert_eq!(chain_of(&[("forwarded", value)]), None, "{value}");
        }
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for_and_lines_are_concatenated() {
        let headers = [
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=192.0.2.1"),
            ("forwarded", "for=192.0.2.2, for=192.0.2.3"),
        ];
        assert_eq!(
            chain_of(&headers),
            Some(vec![ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")])
        );
        let xff = [
            ("x-forwarded-for", "198.51.100.1, 10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ];
        assert_eq!(
            chain_of(&xff),
            Some(vec![ip("198.51.100.1"), ip("10.0.0.1"), ip("10.0.0.2")])
        );
    }

    #[test]
    fn a_pinned_header_ignores_the_other() {
        let mut map = HeaderMap::new();
        map.insert(FORWARDED, HeaderValue::from_static("for=192.0.2.1"));
        map.insert(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        let entries =
            |map: &HeaderMap, source| chain(map, source).map(|chain| Vec::from(chain.entries));
        assert_eq!(
            entries(&map, ProxyHeader::Forwarded),
            Some(vec![ip("192.0.2.1")])
        );
        assert_eq!(
            entries(&map, ProxyHeader::XForwardedFor),
            Some(vec![ip("198.51.100.1")])
        );
        map.remove(FORWARDED);
        assert_eq!(entries(&map, ProxyHeader::Forwarded), None);
        assert_eq!(
            entries(&map, ProxyHeader::Auto),
            Some(vec![ip("198.51.100.1")])
        );
    }

    #[test]
    fn x_forwarded_for_skips_empty_items_and_keeps_junk_in_place() {
        let xff = [(
            "x-forwarded-for",
            " 198.51.100.1 ,, junk,\t[2001:db8::2]:443 , 10.0.0.1:80,",
        )];
        assert_eq!(
            chain_of(&xff),
            Some(vec![
                ip("198.51.100.1"),
                None,
                ip("2001:db8::2"),
                ip("10.0.0.1")
            ])
        );
        assert_eq!(chain_of(&[]), None);
    }

    #[test]
    fn non_ascii_headers_are_malformed() {
        let mut map = HeaderMap::new();
        map.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"198.51.100.1, \xff").unwrap(),
        );
        assert_eq!(chain(&map, ProxyHeader::Auto), None);
    }

    #[test]
    fn long_chains_keep_the_right_most_entries() {
        let value = (0..100)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",");
        let mut map = HeaderMap::new();
        map.insert(&X_FORWARDED_FOR, HeaderValue::from_str(&value).unwrap());
        let chain = chain(&map, ProxyHeader::Auto).unwrap();
        assert!(chain.truncated);
        assert_eq!(chain.entries.len(), MAX_ENTRIES);
        assert_eq!(chain.entries.front().copied().flatten(), ip("10.0.0.36"));
        assert_eq!(chain.entries.back().copied().flatten(), ip("10.0.0.99"));
    }
}
