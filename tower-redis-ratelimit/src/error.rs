//! Configuration errors: the workspace's one [`ConfigError`], owned by `tower-breaker`, which every Redis-backed
//! crate already depends on.

pub use tower_breaker::ConfigError;

/// An invalid rate limit configuration: `field` is the setting to change.
pub(crate) fn config_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::in_component("rate limit", field, message)
}
