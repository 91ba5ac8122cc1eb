//! [`Filter`]: which instances discovery keeps.

use serde_json::{Map, Value};

use crate::instance::{Instance, Status};

/// Which instances discovery keeps (HazelJS's filter semantics): [`Filter::up`] or [`Filter::any`], then the
/// setters.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Filter {
    /// Keep only this status (`None`: any). Default: `Some(Status::Up)`.
    pub status: Option<Status>,
    /// Keep only this zone.
    pub zone: Option<String>,
    /// Keep only instances that have every one of these tags.
    pub tags: Vec<String>,
    /// Keep only instances whose metadata has each of these keys with an equal value.
    pub metadata: Map<String, Value>,
}

impl Filter {
    /// Instances with status `UP` (the default).
    pub fn up() -> Self {
        Self {
            status: Some(Status::Up),
            ..Self::default()
        }
    }

    /// Instances of any status.
    pub fn any() -> Self {
        Self::default()
    }

    /// Keeps only instances in `zone`.
    #[must_use]
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Keeps only instances that have `tag` (as well as every tag given before).
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Keeps only instances whose metadata has `key` equal to `value` (as well as the pairs given before).
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Whether `instance` passes.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.status.is_none_or(|status| instance.status == status)
            && self
                .zone
                .as_ref()
                .is_none_or(|zone| instance.zone.as_ref() == Some(zone))
            && self.tags.iter().all(|tag| instance.tags.contains(tag))
            && self
                .metadata
                .iter()
                .all(|(key, value)| instance.metadata.get(key) == Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_has_hazeljs_semantics() {
        let mut instance = Instance::new("svc", "10.0.0.1", 1);
        instance.status = Status::Up;
        instance.zone = Some("eu".to_owned());
        instance.tags = vec!["api".to_owned(), "v2".to_owned()];
        instance.metadata.insert("tier".to_owned(), "gold".into());
        assert!(Filter::up().matches(&instance));
        let mut starting = Instance::new("svc", "10.0.0.1", 2);
        starting.status = Status::Starting;
        assert!(!Filter::up().matches(&starting));
        let mut filter = Filter::up();
        filter.zone = Some("eu".to_owned());
        filter.tags = vec!["v2".to_owned()];
        filter.metadata.insert("tier".to_owned(), "gold".into());
        assert!(filter.matches(&instance));
        filter.tags.push("v3".to_owned());
        assert!(!filter.matches(&instance), "every listed tag is required");
    }
}
