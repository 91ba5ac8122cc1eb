//! A stored instance entry, read back: bounded decoding, and whether it still says what was registered.

use std::fmt;

use crate::instance::Instance;

/// Why a stored entry is skipped.
#[derive(Debug)]
pub(crate) enum Undecodable {
    /// Longer than the size cap.
    TooLarge,
    /// Not an instance's JSON.
    Json(serde_json::Error),
}

impl fmt::Display for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("larger than the size cap"),
            Self::Json(error) => write!(f, "not an instance: {error}"),
        }
    }
}

/// Decodes a stored instance: at most `max` bytes of HazelJS JSON. Never panics, whatever the bytes.
pub(crate) fn decode_entry(bytes: &[u8], max: usize) -> Result<Instance, Undecodable> {
    if bytes.len() > max {
        return Err(Undecodable::TooLarge);
    }
    serde_json::from_slice(bytes).map_err(Undecodable::Json)
}

/// Whether the stored entry still says what was registered, where it matters for routing and filtering (status
/// and `lastHeartbeat` are the heartbeat's to write; unknown fields are others').
pub(super) fn same_registration(stored: &Instance, ours: &Instance) -> bool {
    stored.id == ours.id
        && stored.name == ours.name
        && stored.host == ours.host
        && stored.port == ours.port
        && stored.protocol == ours.protocol
        && stored.metadata == ours.metadata
        && stored.health_check_path == ours.health_check_path
        && stored.health_check_interval == ours.health_check_interval
        && stored.zone == ours.zone
        && stored.tags == ours.tags
}

#[cfg(test)]
mod tests {
    use super::{decode_entry, same_registration};
    use crate::instance::Instance;
    use proptest::prelude::*;

    const VALID: &str = r#"{"id":"user-service:127.0.0.1:3101:1795310805903","name":"user-service","host":"127.0.0.1","port":3101,"protocol":"http","metadata":{"version":"1.0.0","weight":2},"healthCheckPath":"/health","healthCheckInterval":2000,"zone":"us-east-1","tags":["api","users"],"status":"UP","lastHeartbeat":"2026-11-22T01:26:47.941Z","registeredAt":"2026-11-22T01:26:45.903Z"}"#;

    #[test]
    fn an_entry_over_the_size_cap_is_not_decoded() {
        assert!(decode_entry(VALID.as_bytes(), VALID.len()).is_ok());
        assert!(decode_entry(VALID.as_bytes(), VALID.len() - 1).is_err());
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let nested = format!(
            r#"{{"id":"a","name":"a","host":"h","port":1,"x":{}1{}}}"#,
            "[".repeat(50_000),
            "]".repeat(50_000)
        );
        assert!(decode_entry(nested.as_bytes(), usize::MAX).is_err());
    }

    #[test]
    fn a_changed_host_port_or_tag_is_a_different_registration_a_heartbeat_is_not() {
        let ours = Instance::new("svc", "10.0.0.1", 80);
        let mut stored = ours.clone();
        stored.last_heartbeat = "later".to_owned();
        stored.status = crate::Status::Up;
        stored.extra.insert("owner".to_owned(), "team-a".into());
        assert!(same_registration(&stored, &ours));
        let mut forged = ours.clone();
        forged.host = "203.0.113.9".to_owned();
        assert!(!same_registration(&forged, &ours));
        let mut forged = ours.clone();
        forged.port = 81;
        assert!(!same_registration(&forged, &ours));
        let mut forged = ours.clone();
        forged.tags.push("canary".to_owned());
        assert!(!same_registration(&forged, &ours));
    }

    /// A valid encoding with some bytes replaced, removed or inserted.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let edits =
            prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..8);
        edits.prop_map(|edits| {
            let mut bytes = VALID.as_bytes().to_vec();
            for (at, kind, byte) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] = byte,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
            }
            bytes
        })
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2_048)) {
            let _ = decode_entry(&bytes, crate::DEFAULT_MAX_ENTRY_SIZE);
        }

        #[test]
        fn decoding_a_mutated_valid_entry_never_panics(bytes in mutated()) {
            if let Ok(instance) = decode_entry(&bytes, crate::DEFAULT_MAX_ENTRY_SIZE) {
                // Whatever decodes can be written back and used.
                prop_assert!(serde_json::to_string(&instance).is_ok());
                let _ = instance.base_uri();
                let _ = instance.weight();
            }
        }

        #[test]
        fn decoding_a_truncated_valid_entry_never_panics(len in 0..VALID.len()) {
            prop_assert!(decode_entry(&VALID.as_bytes()[..len], crate::DEFAULT_MAX_ENTRY_SIZE).is_err());
        }
    }
}
