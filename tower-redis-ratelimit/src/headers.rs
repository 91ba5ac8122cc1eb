//! The rate-limit response fields: IETF `RateLimit` and `RateLimit-Policy` (draft 10 and later) by default, the
//! older `RateLimit-Limit/-Remaining/-Reset` (draft 6 and before) and `X-RateLimit-*` on request, and `Retry-After`.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::decision::{Decision, PolicyState};

/// Which rate-limit fields to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // independent switches, one per header family
#[non_exhaustive]
pub struct HeaderStyle {
    /// `RateLimit` and `RateLimit-Policy` (IETF draft 10+). Default on.
    pub ietf: bool,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft 6 and earlier). Default off.
    pub legacy: bool,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`. Default off.
    pub x_ratelimit: bool,
    /// Also on allowed responses, not only on 429s. Default off.
    pub on_allowed: bool,
}

impl HeaderStyle {
    /// Sends (or not) `RateLimit` and `RateLimit-Policy` (IETF draft 10+).
    #[must_use]
    pub fn ietf(mut self, on: bool) -> Self {
        self.ietf = on;
        self
    }

    /// Sends (or not) `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft 6 and earlier).
    #[must_use]
    pub fn legacy(mut self, on: bool) -> Self {
        self.legacy = on;
        self
    }

    /// Sends (or not) `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    #[must_use]
    pub fn x_ratelimit(mut self, on: bool) -> Self {
        self.x_ratelimit = on;
        self
    }

    /// Sends the fields on allowed responses too, not only on 429s.
    #[must_use]
    pub fn on_allowed(mut self, on: bool) -> Self {
        self.on_allowed = on;
        self
    }
}

impl Default for HeaderStyle {
    fn default() -> Self {
        Self {
            ietf: true,
            legacy: false,
            x_ratelimit: false,
            on_allowed: false,
        }
    }
}

/// Whole seconds, rounded up (a client that waits this long finds room).
pub(crate) fn seconds_up(duration: Duration) -> u64 {
    duration
        .as_millis()
        .div_ceil(1000)
        .try_into()
        .unwrap_or(u64::MAX)
}

fn number(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

/// The policy clients should watch: the one with the least left, then the longest wait.
fn most_restrictive(policies: &[PolicyState]) -> Option<&PolicyState> {
    policies
        .iter()
        .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
}

/// Writes the configured fields for `decision` into `headers` (existing fields are replaced).
pub(crate) fn write(headers: &mut HeaderMap, decision: &Decision, style: HeaderStyle) {
    if let Some(retry_after) = decision.retry_after.filter(|_| !decision.allowed) {
        headers.insert(
            http::header::RETRY_AFTER,
            number(seconds_up(retry_after).max(1)),
        );
    }
    if decision.policies.is_empty() {
        return;
    }
    // A denied policy's quota comes back at the retry time, so `t` is never earlier than `Retry-After`.
    let reset_of = |policy: &PolicyState| -> u64 {
        match decision.retry_after {
            Some(retry_after) if !decision.allowed && policy.remaining == 0 => {
                seconds_up(retry_after).max(1)
            }
            _ => seconds_up(policy.reset),
        }
    };
    if style.ietf {
        let mut policy_field = String::new();
        let mut state_field = String::new();
        for policy in &decision.policies {
            if !policy_field.is_empty() {
                policy_field.push_str(", ");
                state_field.push_str(", ");
            }
            let window = seconds_up(policy.window).max(1);
            policy_field.push_str(&format!(
                "\"{}\";q={};w={window}",
                policy.name, policy.limit
            ));
            state_field.push_str(&format!(
                "\"{}\";r={};t={}",
                policy.name,
                policy.remaining,
                reset_of(policy)
            ));
        }
        if let Ok(value) = HeaderValue::from_str(&policy_field) {
            headers.insert(HeaderName::from_static("ratelimit-policy"), value);
        }
        if let Ok(value) = HeaderValue::from_str(&state_field) {
            headers.insert(HeaderName::from_static("ratelimit"), value);
        }
    }
    let Some(policy) = most_restrictive(&decision.policies) else {
        return;
    };
    let fields: [(bool, [&'static str; 3]); 2] = [
        (
            style.legacy,
            ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"],
        ),
        (
            style.x_ratelimit,
            [
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ],
        ),
    ];
    for (enabled, [limit, remaining, reset]) in fields {
        if enabled {
            headers.insert(HeaderName::from_static(limit), number(policy.limit));
            headers.insert(HeaderName::from_static(remaining), number(policy.remaining));
            headers.insert(HeaderName::from_static(reset), number(reset_of(policy)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::decision::DecisionSource;

    fn decision(allowed: bool) -> Decision {
        Decision {
            allowed,
            source: DecisionSource::Redis,
            retry_after: (!allowed).then(|| Duration::from_millis(1_500)),
            blocked: false,
            policies: vec![
                PolicyState {
                    name: Arc::from("burst"),
                    limit: 10,
                    window: Duration::from_secs(1),
                    remaining: if allowed { 4 } else { 0 },
                    reset: Duration::from_millis(400),
                },
                PolicyState {
                    name: Arc::from("daily"),
                    limit: 1000,
                    window: Duration::from_secs(86_400),
                    remaining: 900,
                    reset: Duration::from_secs(3_600),
                },
            ],
            redis_time_micros: None,
        }
    }

    #[test]
    fn ietf_fields_list_every_policy() {
        let mut headers = HeaderMap::new();
        write(&mut headers, &decision(true), HeaderStyle::default());
        assert_eq!(
            headers["ratelimit-policy"],
            "\"burst\";q=10;w=1, \"daily\";q=1000;w=86400"
        );
        assert_eq!(
            headers["ratelimit"],
            "\"burst\";r=4;t=1, \"daily\";r=900;t=3600"
        );
        assert!(headers.get("retry-after").is_none());
    }

    #[test]
    fn a_denial_sends_retry_after_and_a_reset_no_earlier_than_it() {
        let mut headers = HeaderMap::new();
        let style = HeaderStyle {
            legacy: true,
            x_ratelimit: true,
            ..HeaderStyle::default()
        };
        write(&mut headers, &decision(false), style);
        assert_eq!(headers["retry-after"], "2");
        assert_eq!(
            headers["ratelimit"],
            "\"burst\";r=0;t=2, \"daily\";r=900;t=3600"
        );
        assert_eq!(
            (
                &headers["ratelimit-limit"],
                &headers["ratelimit-remaining"],
                &headers["ratelimit-reset"]
            ),
            (&number(10), &number(0), &number(2))
        );
        assert_eq!(headers["x-ratelimit-remaining"], "0");
    }
}
