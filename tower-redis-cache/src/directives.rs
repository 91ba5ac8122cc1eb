//! `Cache-Control` parsing for requests and responses (RFC 9111 §5.2), and the targeted fields (RFC 9213) that
//! replace it for this cache.
//!
//! Unknown directives are ignored. A directive whose argument does not parse, or that appears twice with different
//! arguments, is treated the way RFC 9111 §4.2.1 and §1.2.2 ask of a cache: conservatively. An invalid `max-age` or
//! `s-maxage` makes the response stale (a lifetime of zero); an invalid request `max-stale` allows no staleness.

use http::HeaderMap;
use http::header::{CACHE_CONTROL, HeaderName, PRAGMA};

use crate::structured::{Value, parse_dictionary};

/// `CDN-Cache-Control` (RFC 9213 §3), the default target.
pub(crate) const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The targeted cache-control fields (RFC 9213) this cache obeys, in order of precedence, and whether it removes
/// them from the responses it passes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Targets {
    pub(crate) names: Vec<HeaderName>,
    pub(crate) strip: bool,
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            names: vec![CDN_CACHE_CONTROL],
            strip: true,
        }
    }
}

impl Targets {
    /// The directives of the first target field that is present, not empty and a valid dictionary (RFC 9213
    /// §2.2); `None` when there is none, and then `Cache-Control` applies. Several lines of one field are one
    /// dictionary (RFC 8941 §4.2).
    pub(crate) fn directives(&self, headers: &HeaderMap) -> Option<CacheControl> {
        self.names.iter().find_map(|name| {
            let mut combined = String::new();
            for line in headers.get_all(name) {
                let line = line.to_str().ok()?;
                if line.trim().is_empty() {
                    continue; // an empty line adds no member (RFC 8941 §4.2: empty fields are ignored)
                }
                if !combined.is_empty() {
                    combined.push_str(", ");
                }
                combined.push_str(line);
            }
            let members = parse_dictionary(&combined)?;
            (!members.is_empty()).then(|| CacheControl::from_dictionary(&members))
        })
    }

    /// Removes the target fields, when this cache strips them.
    pub(crate) fn strip(&self, headers: &mut HeaderMap) {
        if self.strip {
            for name in &self.names {
                headers.remove(name);
            }
        }
    }
}

/// A delta-seconds argument as written, or unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seconds {
    /// A valid value (saturated at `u32::MAX` seconds, as §1.2.2 allows for large values).
    Valid(u64),
    /// Present but unusable: not a number, negative, or given twice with different values.
    Invalid,
}

impl Seconds {
    /// The value, with an invalid one read as `invalid`.
    pub(crate) fn or(self, invalid: u64) -> u64 {
        match self {
            Self::Valid(seconds) => seconds,
            Self::Invalid => invalid,
        }
    }
}

/// The directives of one message's `Cache-Control` field lines, combined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) max_age: Option<Seconds>,
    pub(crate) s_maxage: Option<Seconds>,
    pub(crate) no_cache: bool,
    pub(crate) no_store: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) immutable: bool,
    pub(crate) stale_while_revalidate: Option<Seconds>,
    pub(crate) stale_if_error: Option<Seconds>,
    /// `max-stale` without an argument is `Some(None)`: any staleness is acceptable.
    pub(crate) max_stale: Option<Option<Seconds>>,
    pub(crate) min_fresh: Option<Seconds>,
    pub(crate) only_if_cached: bool,
}

impl CacheControl {
    /// Parses every `Cache-Control` line of `headers`. For requests, a `Pragma: no-cache` without any
    /// `Cache-Control` counts as `no-cache` (RFC 9111 §5.4 keeps that for HTTP/1.0 clients).
    pub(crate) fn parse(headers: &HeaderMap, request: bool) -> Self {
        let mut directives = Self::default();
        let mut any = false;
        for line in headers.get_all(CACHE_CONTROL) {
            any = true;
            // A line that is not visible ASCII cannot hold a directive we understand; skip it.
            let Ok(line) = line.to_str() else { continue };
            for item in split_list(line) {
                directives.apply(item);
            }
        }
        if request && !any {
            directives.no_cache = headers.get_all(PRAGMA).iter().any(|value| {
                value.to_str().is_ok_and(|value| {
                    split_list(value).any(|item| item.eq_ignore_ascii_case("no-cache"))
                })
            });
        }
        directives
    }

    /// The response directives of a targeted field. A delta-seconds directive is read only from a non-negative
    /// Integer; a flag from `?1`, or from a String for the qualified forms of `no-cache` and `private`. A
    /// directive of another type is not used (RFC 9213 §2.1: implementations should not consume values that
    /// violate the constraints `Cache-Control` implies), and unknown directives are ignored.
    pub(crate) fn from_dictionary(members: &[(String, Value)]) -> Self {
        let mut directives = Self::default();
        for (key, value) in members {
            let delta = match value {
                Value::Integer(seconds) => u64::try_from(*seconds)
                    .ok()
                    .map(|seconds| Seconds::Valid(seconds.min(i32::MAX as u64))),
                _ => None,
            };
            let flag = matches!(value, Value::Boolean(true));
            let qualified = flag || matches!(value, Value::String(_));
            match key.as_str() {
                "max-age" => directives.max_age = delta.or(directives.max_age),
                "s-maxage" => directives.s_maxage = delta.or(directives.s_maxage),
                "stale-while-revalidate" => {
                    directives.stale_while_revalidate = delta.or(directives.stale_while_revalidate);
                }
                "stale-if-error" => {
                    directives.stale_if_error = delta.or(directives.stale_if_error);
                }
                "no-cache" => directives.no_cache |= qualified,
                "private" => directives.private |= qualified,
                "no-store" => directives.no_store |= flag,
                "public" => directives.public |= flag,
                "must-revalidate" => directives.must_revalidate |= flag,
                "proxy-revalidate" => directives.proxy_revalidate |= flag,
                "immutable" => directives.immutable |= flag,
                _ => {}
            }
        }
        directives
    }

    fn apply(&mut self, item: &str) {
        let (name, argument) = match item.split_once('=') {
            Some((name, argument)) => (name.trim(), Some(unquote(argument.trim()))),
            None => (item.trim(), None),
        };
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "max-age" => merge(&mut self.max_age, seconds(argument)),
            "s-maxage" => merge(&mut self.s_maxage, seconds(argument)),
            "stale-while-revalidate" => merge(&mut self.stale_while_revalidate, seconds(argument)),
            "stale-if-error" => merge(&mut self.stale_if_error, seconds(argument)),
            "min-fresh" => merge(&mut self.min_fresh, seconds(argument)),
            "max-stale" => {
                let value = argument.map(|argument| seconds(Some(argument)));
                self.max_stale = match (self.max_stale, value) {
                    (None, value) => Some(value),
                    (Some(old), new) if old == new => Some(old),
                    // Two different max-stale values: accept no staleness rather than guess.
                    (Some(_), _) => Some(Some(Seconds::Invalid)),
                };
            }
            // The qualified forms (`no-cache="Set-Cookie"`, `private="X"`) are applied to the whole response, which
            // RFC 9111 §5.2.2.4 and §5.2.2.7 allow a cache to do.
            "no-cache" => self.no_cache = true,
            "no-store" => self.no_store = true,
            "private" => self.private = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "immutable" => self.immutable = true,
            "only-if-cached" => self.only_if_cached = true,
            _ => {}
        }
    }
}

fn merge(slot: &mut Option<Seconds>, value: Seconds) {
    *slot = match *slot {
        None => Some(value),
        Some(old) if old == value => Some(old),
        Some(_) => Some(Seconds::Invalid),
    };
}

fn seconds(argument: Option<&str>) -> Seconds {
    let Some(argument) = argument else {
        return Seconds::Invalid;
    };
    if argument.is_empty() || !argument.bytes().all(|byte| byte.is_ascii_digit()) {
        return Seconds::Invalid;
    }
    // §1.2.2: a value too large to represent is read as the largest one the cache can hold.
    Seconds::Valid(
        argument
            .parse::<u64>()
            .unwrap_or(u64::MAX)
            .min(i32::MAX as u64),
    )
}

fn unquote(argument: &str) -> &str {
    argument
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(argument)
}

/// Splits a comma-separated field value, keeping commas inside quoted strings.
pub(crate) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = value;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let mut quoted = false;
            let mut end = rest.len();
            for (index, byte) in rest.bytes().enumerate() {
                match byte {
                    b'"' => quoted = !quoted,
                    b',' if !quoted => {
                        end = index;
                        break;
                    }
                    _ => {}
                }
            }
            let item = rest[..end].trim();
            rest = rest.get(end + 1..).unwrap_or("");
            if !item.is_empty() {
                return Some(item);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(lines: &[&str], request: bool) -> CacheControl {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(CACHE_CONTROL, HeaderValue::from_str(line).unwrap());
        }
        CacheControl::parse(&headers, request)
    }

    #[test]
    fn reads_every_directive_across_lines_and_cases() {
        let cc = parse(
            &[
                "Public, MAX-AGE=60, s-maxage=\"120\"",
                "stale-while-revalidate=30,stale-if-error=600, must-revalidate, proxy-revalidate, immutable",
            ],
            false,
        );
        assert_eq!(cc.max_age, Some(Seconds::Valid(60)));
        assert_eq!(cc.s_maxage, Some(Seconds::Valid(120)));
        assert_eq!(cc.stale_while_revalidate, Some(Seconds::Valid(30)));
        assert_eq!(cc.stale_if_error, Some(Seconds::Valid(600)));
        assert!(cc.public && cc.must_revalidate && cc.proxy_revalidate && cc.immutable);
        assert!(!cc.no_cache && !cc.no_store && !cc.private);
    }

    #[test]
    fn invalid_and_conflicting_ages_are_marked_invalid() {
        assert_eq!(
            parse(&["max-age=abc"], false).max_age,
            Some(Seconds::Invalid)
        );
        assert_eq!(
            parse(&["max-age=-1"], false).max_age,
            Some(Seconds::Invalid)
        );
        assert_eq!(parse(&["max-age"], false).max_age, Some(Seconds::Invalid));
        assert_eq!(
            parse(&["max-age=10, max-age=20"], false).max_age,
            Some(Seconds::Invalid)
        );
        assert_eq!(
            parse(&["max-age=10", "max-age=10"], false).max_age,
            Some(Seconds::Valid(10))
        );
        assert_eq!(
            parse(&["max-age=99999999999999999999999"], false).max_age,
            Some(Seconds::Valid(i32::MAX as u64))
        );
    }

    #[test]
    fn qualified_no_cache_and_private_apply_to_the_whole_response() {
        let cc = parse(&["no-cache=\"set-cookie, x-a\", private=\"x-b\""], false);
        assert!(cc.no_cache);
        assert!(cc.private);
    }

    #[test]
    fn request_directives_and_pragma() {
        let cc = parse(&["max-stale, min-fresh=5, only-if-cached, foo=bar"], true);
        assert_eq!(cc.max_stale, Some(None));
        assert_eq!(cc.min_fresh, Some(Seconds::Valid(5)));
        assert!(cc.only_if_cached);
        assert_eq!(
            parse(&["max-stale=7"], true).max_stale,
            Some(Some(Seconds::Valid(7)))
        );

        let mut headers = HeaderMap::new();
        headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(CacheControl::parse(&headers, true).no_cache);
        assert!(!CacheControl::parse(&headers, false).no_cache);
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        assert!(
            !CacheControl::parse(&headers, true).no_cache,
            "Cache-Control wins over Pragma"
        );
    }

    fn targeted(
        names: &[&'static str],
        lines: &[(&'static str, &'static str)],
    ) -> Option<CacheControl> {
        let targets = Targets {
            names: names
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect(),
            strip: true,
        };
        let mut headers = HeaderMap::new();
        for (name, line) in lines {
            headers.append(*name, HeaderValue::from_static(line));
        }
        targets.directives(&headers)
    }

    #[test]
    fn the_first_valid_target_gives_the_directives() {
        let cc = targeted(
            &["acme-cache-control", "cdn-cache-control"],
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=10"),
                ("acme-cache-control", "max-age=60, stale-if-error=30"),
                ("acme-cache-control", "must-revalidate"),
            ],
        )
        .unwrap();
        assert_eq!(cc.max_age, Some(Seconds::Valid(60)));
        assert_eq!(cc.stale_if_error, Some(Seconds::Valid(30)));
        assert!(cc.must_revalidate && !cc.no_store);

        // An invalid or empty first target is skipped; the next one applies.
        for first in ["max-age=60,", "Max-Age=60", ""] {
            let cc = targeted(
                &["acme-cache-control", "cdn-cache-control"],
                &[
                    ("acme-cache-control", first),
                    ("cdn-cache-control", "no-store"),
                ],
            )
            .unwrap();
            assert!(cc.no_store, "{first:?}");
        }
        // No valid target at all: Cache-Control applies.
        assert!(
            targeted(
                &["cdn-cache-control"],
                &[("cdn-cache-control", "max-age=\"60")]
            )
            .is_none()
        );
        assert!(targeted(&["cdn-cache-control"], &[("cache-control", "max-age=60")]).is_none());
        // `none`, which is no directive, still makes a valid field: nothing is fresh, nothing is forbidden.
        let none = targeted(&["cdn-cache-control"], &[("cdn-cache-control", "none")]).unwrap();
        assert_eq!(none, CacheControl::default());
    }

    #[test]
    fn directives_of_the_wrong_type_are_not_used() {
        let cc = targeted(
            &["cdn-cache-control"],
            &[(
                "cdn-cache-control",
                "max-age=1.5, s-maxage=\"60\", stale-if-error=-1, no-store=?0, private=\"x-a\", no-cache=tok",
            )],
        )
        .unwrap();
        assert_eq!(cc.max_age, None);
        assert_eq!(cc.s_maxage, None);
        assert_eq!(cc.stale_if_error, None);
        assert!(!cc.no_store, "?0 is false");
        assert!(cc.private, "the qualified form");
        assert!(!cc.no_cache, "a token is no field list");
        assert_eq!(
            targeted(
                &["cdn-cache-control"],
                &[("cdn-cache-control", "max-age=99999999999999")]
            )
            .unwrap()
            .max_age,
            Some(Seconds::Valid(i32::MAX as u64))
        );
    }

    #[test]
    fn lists_split_outside_quotes_only() {
        let items: Vec<_> = split_list(" a, ,b=\"x,y\" ,c ").collect();
        assert_eq!(items, ["a", "b=\"x,y\"", "c"]);
    }
}
