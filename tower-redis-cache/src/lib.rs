//! `tower-redis-cache`: HTTP shared caching (RFC 9111) with Redis as the shared tier and a bounded in-memory tier in front, with revalidation, stale-while-revalidate, stale-if-error and request coalescing.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace (features, README, changelog) and
//! exports nothing; the implementation is tracked in issue 5. Do not depend on it yet.
//!
//! # Features
//!
//! | feature | enables |
//! |---|---|
//! | `cluster` | Redis Cluster connections (redis `cluster-async`) |
//! | `tls-rustls` | `rediss://` through rustls (redis `tokio-rustls-comp`) |
//! | `sentinel` | Sentinel-managed primaries (redis `sentinel`) |
#![cfg_attr(docsrs, feature(doc_cfg))]
