//! The gateway on :3003: the public API, with rate limiting on writes, caching on reads, a breaker with a fallback
//! around each service, and balancing across the instances discovery finds; plus `/services`, `/health`,
//! `/health/redis` and `/metrics`.
//!
//! ```text
//! PORT=3003 cargo run -p demo --bin gateway
//! ```
//!
//! Environment: see `demo::config` (`REDIS_URL`, `REDIS_PREFIX`, `PORT`, `RATE_LIMIT_WRITES`, ...).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    demo::roles::run_process(demo::roles::Role::Gateway).await
}
