//! The user service: `POST /users`, `GET /users/{id}`, `PUT /users/{id}`, `GET /health`, registered in Redis as
//! `user-service`.
//!
//! ```text
//! PORT=3001 cargo run -p demo --bin user-service
//! ```
//!
//! Environment: see `demo::config` (`REDIS_URL`, `REDIS_PREFIX`, `PORT`, ...). Without Redis it runs alone on
//! in-memory backends and says so.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    demo::roles::run_process(demo::roles::Role::Users).await
}
