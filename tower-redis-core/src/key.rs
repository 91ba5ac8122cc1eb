//! Keys that stay in one Redis Cluster slot.
//!
//! A multi-key script on a Cluster needs all its keys in one hash slot, which the `{...}` hash tag gives: only the
//! part between the first `{` and the next `}` is hashed. A user-supplied part placed inside the tag must therefore
//! not contain a brace (it would end the tag early, or start another), and the escape must be injective, or two
//! different keys would share one slot *and one value*: escaping only the braces maps both `a{b` and `a%7Bb` to
//! `a%7Bb`. [`hash_tag`] escapes `%` first, then the braces, which is reversible and therefore collision-free.

use std::borrow::Cow;

/// Escapes `part` for use inside a `{...}` hash tag: `%` becomes `%25`, `{` becomes `%7B` and `}` becomes `%7D`;
/// everything else is kept. Distinct inputs always give distinct outputs. Borrows when there is nothing to escape.
///
/// ```
/// use tower_redis_core::key::hash_tag;
///
/// assert_eq!(hash_tag("user:42"), "user:42");
/// assert_eq!(hash_tag("a{b}"), "a%7Bb%7D");
/// assert_ne!(hash_tag("a{b"), hash_tag("a%7Bb"));
/// ```
#[must_use]
pub fn hash_tag(part: &str) -> Cow<'_, str> {
    if !part.contains(['%', '{', '}']) {
        return Cow::Borrowed(part);
    }
    let mut out = String::with_capacity(part.len() + 8);
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `{prefix}{{part}}` followed by `:suffix`, with `part` escaped by [`hash_tag`]: the key layout of every
/// slot-bound key of the workspace, built with one allocation.
///
/// ```
/// use tower_redis_core::key::tagged;
///
/// assert_eq!(tagged("rl:", "api:k{1}", "w"), "rl:{api:k%7B1%7D}:w");
/// ```
#[must_use]
pub fn tagged(prefix: &str, part: &str, suffix: &str) -> String {
    let part = hash_tag(part);
    let mut out = String::with_capacity(prefix.len() + part.len() + suffix.len() + 3);
    out.push_str(prefix);
    out.push('{');
    out.push_str(&part);
    out.push_str("}:");
    out.push_str(suffix);
    out
}

/// Reverses [`hash_tag`]; `None` when `escaped` is not something it produced.
#[must_use]
pub fn unescape_hash_tag(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find(['%', '{', '}']) {
        out.push_str(&rest[..at]);
        let code = rest.get(at..at + 3)?;
        out.push(match code {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{hash_tag, tagged, unescape_hash_tag};
    use proptest::prelude::*;

    #[test]
    fn braces_and_percent_signs_are_escaped_so_no_two_keys_collide() {
        assert_eq!(hash_tag("a{b"), "a%7Bb");
        assert_eq!(hash_tag("a%7Bb"), "a%257Bb");
        assert_eq!(hash_tag("}{%"), "%7D%7B%25");
        assert_eq!(hash_tag("é{"), "é%7B");
        assert!(matches!(hash_tag("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(tagged("p:", "", "s"), "p:{}:s");
    }

    #[test]
    fn something_hash_tag_never_produces_does_not_unescape() {
        assert_eq!(unescape_hash_tag("a{b"), None);
        assert_eq!(unescape_hash_tag("a%7"), None);
        assert_eq!(unescape_hash_tag("a%41"), None);
        assert_eq!(unescape_hash_tag("a%7Bb").as_deref(), Some("a{b"));
    }

    proptest! {
        #[test]
        fn the_escape_is_injective_and_brace_free(a in ".{0,24}", b in ".{0,24}") {
            let (x, y) = (hash_tag(&a), hash_tag(&b));
            prop_assert!(!x.contains(['{', '}']), "a brace in {}", x);
            prop_assert_eq!(unescape_hash_tag(&x), Some(a.clone()));
            if a != b {
                prop_assert_ne!(x, y);
            }
        }

        #[test]
        fn collisions_are_searched_among_escape_like_strings(
            a in "[a%{}7BD25]{0,10}",
            b in "[a%{}7BD25]{0,10}",
        ) {
            prop_assert_eq!(a == b, hash_tag(&a) == hash_tag(&b));
            prop_assert_eq!(a == b, tagged("p", &a, "s") == tagged("p", &b, "s"));
        }
    }
}
