//! Cross-crate integration tests for the workspace. The tests live in `tests/tests/`; the Redis fixtures they use
//! are the `redis-fixtures` package in `tests/fixtures/`, which every crate can also use as a dev-dependency.

pub use redis_fixtures as fixtures;
