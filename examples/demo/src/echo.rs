//! What the tonic example's server and client agree on: the registered service name, the default port and the
//! metadata they exchange. The service itself is `grpc-echo`'s `echo.Echo` (a hand-written tonic service, so no
//! `protoc` is needed).

/// The name `tonic-server` registers under and `tonic-client` discovers.
pub const SERVICE: &str = "echo";

/// The server's default port (gRPC's customary one).
pub const PORT: u16 = 50051;

/// The metadata naming the server instance that answered (on replies, rejections included).
pub const SERVED_BY: &str = "x-served-by";

/// The metadata carrying the caller's API key, which the server's rate limit is keyed by (else the peer address).
pub const API_KEY: &str = "x-api-key";
