//! The order service: `POST /orders` (checks the user with the user service, found through discovery),
//! `GET /orders/{id}`, `PATCH /orders/{id}`, `GET /health`, registered in Redis as `order-service`. Start a second
//! one on another port and the gateway balances across both.
//!
//! ```text
//! PORT=3012 cargo run -p demo --bin order-service
//! ```
//!
//! Environment: see `demo::config` (`REDIS_URL`, `REDIS_PREFIX`, `PORT`, ...). Without Redis it runs alone on
//! in-memory backends and says so.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    demo::roles::run_process(demo::roles::Role::Orders).await
}
