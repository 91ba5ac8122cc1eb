//! `tower-discovery`: a service registry on Redis (wire-compatible with HazelJS) or in memory, with heartbeats and TTLs, feeding `tower::balance` and tonic clients.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace (features, README, changelog) and
//! exports nothing; the implementation is tracked in issue 6. Do not depend on it yet.
//!
//! # Features
//!
//! | feature | enables |
//! |---|---|
//! | `cluster` | Redis Cluster connections (redis `cluster-async`) |
//! | `tls-rustls` | `rediss://` through rustls (redis `tokio-rustls-comp`) |
//! | `sentinel` | Sentinel-managed primaries (redis `sentinel`) |
#![cfg_attr(docsrs, feature(doc_cfg))]
