//! `tower-redis-ratelimit`: distributed sliding-window rate limiting on Redis, one round trip per decision, with a local `governor` fallback, the IETF `RateLimit` headers and gRPC support.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace (features, README, changelog) and
//! exports nothing; the implementation is tracked in issue 4. Do not depend on it yet.
//!
//! # Features
//!
//! | feature | enables |
//! |---|---|
//! | `cluster` | Redis Cluster connections (redis `cluster-async`) |
//! | `tls-rustls` | `rediss://` through rustls (redis `tokio-rustls-comp`) |
//! | `sentinel` | Sentinel-managed primaries (redis `sentinel`) |
#![cfg_attr(docsrs, feature(doc_cfg))]
