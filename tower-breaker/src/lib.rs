//! `tower-breaker`: a lock-free circuit breaker for Tower services, with fallback, for HTTP and gRPC.
//!
//! **Status: not implemented yet.** The implementation is tracked in issue 3.
#![cfg_attr(docsrs, feature(doc_cfg))]
