//! The code behind the example binaries: the workspace demo (a gateway, a user service and an order service
//! that find each other through Redis), composed from the workspace's four layers.
//!
//! - [`config`]: configuration from the environment (`REDIS_URL`, `REDIS_CLUSTER_NODES`, `REDIS_PREFIX`,
//!   timeouts, `PORT`, ...), checked at start-up with errors that name the variable.
//! - [`connection`]: one Redis server or a Redis Cluster behind one connection type, connected with a deadline.
//! - [`env`](mod@env): what a service runs on: the Redis registry and connection, or in-memory backends in single-instance
//!   mode.
//! - [`lifecycle`]: bind, register, report ready, and on a stop signal drain, deregister and stop.
//! - [`downstream`]: a client for another service: discovery, balancing, passive health, retries of requests that
//!   were never sent, and a circuit breaker with a JSON fallback.
//! - [`users`], [`orders`], [`gateway`]: the three services; [`roles`] runs them, one per process or all in one.
//! - [`events`]: live events (Server-Sent Events on the gateway), through a Redis Stream or in memory.
//! - [`echo`]: what the tonic example's server and client agree on.
//!
//! ```no_run
//! # async fn demo() -> std::process::ExitCode {
//! // What the `user-service` binary does:
//! demo::roles::run_process(demo::roles::Role::Users).await
//! # }
//! ```

pub mod config;
pub mod connection;
pub mod downstream;
pub mod echo;
pub mod env;
pub mod events;
pub mod gateway;
mod ids;
mod json;
pub mod lifecycle;
pub mod orders;
mod peers;
pub mod roles;
pub mod server;
pub mod telemetry;
pub mod users;

/// Every process of the demo allocates through mimalloc: under load glibc's malloc and free were about a tenth of the
/// gateway's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
