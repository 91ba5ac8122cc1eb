//! A real tonic gRPC server and client for tests, written by hand: no `build.rs`, no `protoc`.
//!
//! The service is `echo.Echo`, as if generated from this `.proto`:
//!
//! ```proto
//! syntax = "proto3";
//! package echo;
//!
//! service Echo {
//!   rpc Say(EchoRequest) returns (EchoReply);
//!   rpc Stream(StreamRequest) returns (stream EchoReply);
//! }
//!
//! message EchoRequest { string message = 1; int32 fail_with = 2; uint64 delay_ms = 3; }
//! message StreamRequest { uint32 count = 1; int32 fail_with = 2; uint64 interval_ms = 3; }
//! message EchoReply { string message = 1; }
//! ```
//!
//! The messages are `prost` structs derived by hand, [`EchoServer`] drives
//! [`tonic::server::Grpc`] with [`tonic_prost::ProstCodec`] the way generated servers do, and
//! [`EchoClient`] drives [`tonic::client::Grpc`] the way generated clients do.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use grpc_echo::{EchoClient, EchoRequest, EchoServer, serve};
//!
//! let server = EchoServer::new();
//! let (addr, _handle) = serve(server.clone()).await;
//! let mut client = EchoClient::connect(format!("http://{addr}")).await?;
//! let reply = client
//!     .say(EchoRequest { message: "hi".to_owned(), ..Default::default() })
//!     .await?;
//! assert_eq!(reply.into_inner().message, "hi");
//! assert_eq!(server.calls(), 1);
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http_body::Body as HttpBody;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, GrpcMethod, IntoRequest, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::Layer;

/// Boxed error, as tonic and tower use for `Into<BoxError>` bounds.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Boxed `Send` future, as generated tonic code uses.
type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The stream of replies the server sends for `Stream`.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

/// The fully qualified gRPC service name, `echo.Echo`.
pub const SERVICE_NAME: &str = "echo.Echo";

/// The HTTP/2 path of the unary `Say` method.
pub const SAY_PATH: &str = "/echo.Echo/Say";

/// The HTTP/2 path of the server-streaming `Stream` method.
pub const STREAM_PATH: &str = "/echo.Echo/Stream";

/// The status message the server uses for every failure asked for with `fail_with`.
pub const FAILURE_MESSAGE: &str = "requested failure";

/// Request of the unary `Say` method.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct EchoRequest {
    /// Text echoed back in [`EchoReply::message`].
    #[prost(string, tag = "1")]
    pub message: String,
    /// When non-zero, the call fails with this gRPC status code (see [`tonic::Code`]) and the
    /// message [`FAILURE_MESSAGE`], sent as a trailers-only response.
    #[prost(int32, tag = "2")]
    pub fail_with: i32,
    /// When non-zero, the server sleeps this many milliseconds before answering (or failing).
    #[prost(uint64, tag = "3")]
    pub delay_ms: u64,
}

/// Request of the server-streaming `Stream` method.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct StreamRequest {
    /// How many replies to send; their messages are `"0"`, `"1"`, ...
    #[prost(uint32, tag = "1")]
    pub count: u32,
    /// When non-zero, the stream ends with this gRPC status code (see [`tonic::Code`]) in the
    /// trailers, after all `count` replies. With `count == 0` the call fails straight away with a
    /// trailers-only response.
    #[prost(int32, tag = "2")]
    pub fail_with: i32,
    /// Milliseconds the server waits between two consecutive replies (not before the first).
    #[prost(uint64, tag = "3")]
    pub interval_ms: u64,
}

/// Reply of both methods.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct EchoReply {
    /// For `Say`, the request's message; for `Stream`, the index of the reply.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The `Status` the server returns for a non-zero `fail_with`.
fn requested_failure(code: i32) -> Status {
    Status::new(Code::from(code), FAILURE_MESSAGE)
}

/// The `echo.Echo` server, a hand-written equivalent of a tonic-generated `EchoServer`.
///
/// It is a `tower::Service<http::Request<B>>` for any request body tonic can read (in
/// particular [`tonic::body::Body`]) with `Response = http::Response<tonic::body::Body>` and
/// `Error = Infallible`, plus [`NamedService`], so it goes straight into
/// [`Server::add_service`] and behind any tower layer.
///
/// Clones share one call counter, see [`EchoServer::calls`].
#[derive(Debug, Clone, Default)]
pub struct EchoServer {
    calls: Arc<AtomicU64>,
}

impl EchoServer {
    /// A server whose call counter starts at zero.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many requests this server (or any clone of it) has received, whatever their path and
    /// outcome. A request is counted when it reaches the server, before it is decoded.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> tower::Service<http::Request<B>> for EchoServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req.uri().path() {
            SAY_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(SaySvc, req).await)
            }),
            STREAM_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.server_streaming(StreamSvc, req).await)
            }),
            path => {
                let status =
                    Status::unimplemented(format!("{SERVICE_NAME} has no method at {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Handler of `Say`.
#[derive(Debug, Clone, Copy)]
struct SaySvc;

impl UnaryService<EchoRequest> for SaySvc {
    type Response = EchoReply;
    type Future = BoxFuture<Response<EchoReply>, Status>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        Box::pin(async move {
            if request.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(request.delay_ms)).await;
            }
            if request.fail_with != 0 {
                return Err(requested_failure(request.fail_with));
            }
            Ok(Response::new(EchoReply {
                message: request.message,
            }))
        })
    }
}

/// Handler of `Stream`.
#[derive(Debug, Clone, Copy)]
struct StreamSvc;

impl ServerStreamingService<StreamRequest> for StreamSvc {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Response<ReplyStream>, Status>;

    fn call(&mut self, request: Request<StreamRequest>) -> Self::Future {
        let request = request.into_inner();
        Box::pin(async move {
            if request.count == 0 && request.fail_with != 0 {
                return Err(requested_failure(request.fail_with));
            }
            Ok(Response::new(reply_stream(&request)))
        })
    }
}

/// `count` replies `interval_ms` apart, then the `fail_with` status if it is non-zero.
fn reply_stream(request: &StreamRequest) -> ReplyStream {
    let count = u64::from(request.count);
    let interval = Duration::from_millis(request.interval_ms);
    let fail_with = request.fail_with;
    Box::pin(futures_util::stream::unfold(
        0_u64,
        move |next| async move {
            if next < count {
                if next > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let reply = EchoReply {
                    message: next.to_string(),
                };
                Some((Ok(reply), next + 1))
            } else if next == count && fail_with != 0 {
                Some((Err(requested_failure(fail_with)), next + 1))
            } else {
                None
            }
        },
    ))
}

/// The `echo.Echo` client, a hand-written equivalent of a tonic-generated `EchoClient`.
///
/// `T` is any [`tonic::client::GrpcService`], e.g. a [`Channel`] or a channel wrapped in tower
/// layers.
#[derive(Debug, Clone)]
pub struct EchoClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl EchoClient<Channel> {
    /// Connects a [`Channel`] to `dst` (e.g. `"http://127.0.0.1:50051"`) and wraps it.
    ///
    /// # Errors
    ///
    /// When `dst` is not a valid endpoint or the connection fails.
    pub async fn connect<D>(dst: D) -> Result<Self, tonic::transport::Error>
    where
        D: TryInto<Endpoint>,
        D::Error: Into<BoxError>,
    {
        let channel = Endpoint::new(dst)?.connect().await?;
        Ok(Self::new(channel))
    }
}

impl<T> EchoClient<T>
where
    T: tonic::client::GrpcService<Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: HttpBody<Data = Bytes> + Send + 'static,
    <T::ResponseBody as HttpBody>::Error: Into<BoxError> + Send,
{
    /// A client sending its requests through `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner: tonic::client::Grpc::new(inner),
        }
    }

    /// A client sending its requests through `inner`, with the scheme and authority of `origin`.
    pub fn with_origin(inner: T, origin: http::Uri) -> Self {
        Self {
            inner: tonic::client::Grpc::with_origin(inner, origin),
        }
    }

    /// Calls the unary `Say`. Takes an [`EchoRequest`] or a [`tonic::Request`] of one (to add
    /// metadata or a timeout).
    ///
    /// # Errors
    ///
    /// The status the server answered with, or the transport error turned into a status.
    pub async fn say(
        &mut self,
        request: impl IntoRequest<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        self.ready().await?;
        let mut request = request.into_request();
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE_NAME, "Say"));
        let path = http::uri::PathAndQuery::from_static(SAY_PATH);
        self.inner.unary(request, path, ProstCodec::default()).await
    }

    /// Calls the server-streaming `Stream`. Takes a [`StreamRequest`] or a [`tonic::Request`]
    /// of one.
    ///
    /// A status sent in the trailers after the messages comes out of the returned
    /// [`Streaming`] (from [`Streaming::message`]) once the messages are read.
    ///
    /// # Errors
    ///
    /// The status of a trailers-only answer, or the transport error turned into a status.
    pub async fn stream(
        &mut self,
        request: impl IntoRequest<StreamRequest>,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let mut request = request.into_request();
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE_NAME, "Stream"));
        let path = http::uri::PathAndQuery::from_static(STREAM_PATH);
        self.inner
            .server_streaming(request, path, ProstCodec::default())
            .await
    }

    /// Waits until the inner service is ready, as generated clients do.
    async fn ready(&mut self) -> Result<(), Status> {
        self.inner.ready().await.map_err(|e| {
            let e: BoxError = e.into();
            Status::unknown(format!("Service was not ready: {e}"))
        })
    }
}

/// Binds a listener on `127.0.0.1` with a free port.
async fn bind_loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap_or_else(|e| panic!("grpc-echo: cannot bind 127.0.0.1:0: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("grpc-echo: no local address for the listener: {e}"));
    (listener, addr)
}

/// The accepted-connection stream for `listener`, with `TCP_NODELAY` set.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `server` on `127.0.0.1` with a free port, in a spawned task, and returns the address
/// and the task.
///
/// The listener is bound before this returns, so clients can connect at once. Aborting the
/// task closes the listener; connections already accepted keep being served by their own
/// tasks until the client drops them.
///
/// # Panics
///
/// When the port cannot be bound. The task panics if the server fails.
pub async fn serve(server: EchoServer) -> (SocketAddr, JoinHandle<()>) {
    let (listener, addr) = bind_loopback().await;
    let handle = tokio::spawn(async move {
        let served = Server::builder()
            .add_service(server)
            .serve_with_incoming(incoming(listener))
            .await;
        if let Err(e) = served {
            panic!("grpc-echo server on {addr} failed: {e}");
        }
    });
    (addr, handle)
}

/// Like [`serve`], with `layer` applied around the server's routes through
/// [`Server::layer`], so it sees every request (and every response) of the connection.
///
/// `layer` wraps [`Routes`], which holds the [`EchoServer`]; its service must be a
/// `Service<http::Request<tonic::body::Body>>` as tonic requires of server layers.
///
/// # Panics
///
/// When the port cannot be bound. The task panics if the server fails.
pub async fn serve_with_layer<L, ResBody>(
    layer: L,
    server: EchoServer,
) -> (SocketAddr, JoinHandle<()>)
where
    L: Layer<Routes> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<http::Request<Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<Body>>>::Future: Send + 'static,
    <L::Service as tower::Service<http::Request<Body>>>::Error: Into<BoxError> + Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (listener, addr) = bind_loopback().await;
    let handle = tokio::spawn(async move {
        let served = Server::builder()
            .layer(layer)
            .add_service(server)
            .serve_with_incoming(incoming(listener))
            .await;
        if let Err(e) = served {
            panic!("grpc-echo server on {addr} failed: {e}");
        }
    });
    (addr, handle)
}
