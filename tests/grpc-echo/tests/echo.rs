//! The hand-written `echo.Echo` server and client talk over a real loopback socket: unary and
//! server-streaming calls, failures as trailers-only and trailing statuses, the call counter,
//! and a tower layer on the server builder.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use grpc_echo::{
    EchoClient, EchoReply, EchoRequest, EchoServer, FAILURE_MESSAGE, StreamRequest, serve,
    serve_with_layer,
};
use tonic::Code;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::transport::Channel;

async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

fn say(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..Default::default()
    }
}

/// Reads every message of `stream`, then its end: `Ok(())` or the trailing status.
async fn drain(stream: &mut Streaming<EchoReply>) -> (Vec<String>, Result<(), tonic::Status>) {
    let mut messages = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(reply)) => messages.push(reply.message),
            Ok(None) => return (messages, Ok(())),
            Err(status) => return (messages, Err(status)),
        }
    }
}

#[tokio::test]
async fn unary_call_echoes_the_message() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let reply = client.say(say("hello")).await.unwrap();

    assert_eq!(reply.into_inner().message, "hello");
}

#[tokio::test]
async fn unary_fail_with_comes_back_as_that_status_code() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let status = client
        .say(EchoRequest {
            fail_with: 14,
            ..say("boom")
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), FAILURE_MESSAGE);
}

#[tokio::test]
async fn unary_delay_is_waited_before_answering() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let started = Instant::now();
    let reply = client
        .say(EchoRequest {
            delay_ms: 100,
            ..say("late")
        })
        .await
        .unwrap();

    assert_eq!(reply.into_inner().message, "late");
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn unary_delay_runs_into_a_client_deadline() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let mut request = tonic::Request::new(EchoRequest {
        delay_ms: 2_000,
        ..say("too late")
    });
    request.set_timeout(Duration::from_millis(50));
    let status = client.say(request).await.unwrap_err();

    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
}

#[tokio::test]
async fn stream_sends_count_messages_then_ok() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let mut stream = client
        .stream(StreamRequest {
            count: 3,
            fail_with: 0,
            interval_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let (messages, end) = drain(&mut stream).await;

    assert_eq!(messages, ["0", "1", "2"]);
    end.unwrap();
}

#[tokio::test]
async fn stream_ends_with_the_status_from_the_trailers_after_the_messages() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    // The headers say OK: the call itself starts fine.
    let mut stream = client
        .stream(StreamRequest {
            count: 2,
            fail_with: 13,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (messages, end) = drain(&mut stream).await;

    assert_eq!(messages, ["0", "1"]);
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), FAILURE_MESSAGE);
}

#[tokio::test]
async fn stream_of_nothing_that_fails_is_a_trailers_only_error() {
    let (addr, _server) = serve(EchoServer::new()).await;
    let mut client = client(addr).await;

    let status = client
        .stream(StreamRequest {
            count: 0,
            fail_with: 8,
            interval_ms: 0,
        })
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn calls_counts_every_request_across_clones_and_clients() {
    let server = EchoServer::new();
    let (addr, _server) = serve(server.clone()).await;
    assert_eq!(server.calls(), 0);

    let mut first = client(addr).await;
    let mut second = client(addr).await;
    first.say(say("a")).await.unwrap();
    second.say(say("b")).await.unwrap();
    let _ = first
        .say(EchoRequest {
            fail_with: 2,
            ..say("c")
        })
        .await
        .unwrap_err();
    let mut stream = second
        .stream(StreamRequest {
            count: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    drain(&mut stream).await.1.unwrap();

    assert_eq!(server.calls(), 4);
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let server = EchoServer::new();
    let (addr, _server) = serve(server.clone()).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();

    let status = grpc
        .unary::<EchoRequest, EchoReply, _>(
            tonic::Request::new(say("?")),
            http::uri::PathAndQuery::from_static("/echo.Echo/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(server.calls(), 1);
}

/// Counts the requests that pass through it, answers `Unavailable` itself while `open`, and
/// records the `grpc-status` response header (present only in trailers-only responses).
#[derive(Debug, Clone, Default)]
struct Gate {
    seen: Arc<AtomicU64>,
    open: Arc<std::sync::atomic::AtomicBool>,
    header_statuses: Arc<Mutex<Vec<Option<String>>>>,
}

impl Gate {
    fn header_statuses(&self) -> Vec<Option<String>> {
        self.header_statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            gate: self.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
struct GateService<S> {
    gate: Gate,
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for GateService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.gate.seen.fetch_add(1, Ordering::SeqCst);
        if self.gate.open.load(Ordering::SeqCst) {
            let status = tonic::Status::unavailable("gate open");
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let response = self.inner.call(req);
        let header_statuses = Arc::clone(&self.gate.header_statuses);
        Box::pin(async move {
            let response = response.await?;
            let status = response
                .headers()
                .get("grpc-status")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            header_statuses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(status);
            Ok(response)
        })
    }
}

#[tokio::test]
async fn serve_with_layer_puts_the_layer_in_front_of_the_server() {
    let gate = Gate::default();
    let server = EchoServer::new();
    let (addr, _server) = serve_with_layer(gate.clone(), server.clone()).await;
    let mut client = client(addr).await;

    client.say(say("through")).await.unwrap();
    gate.open.store(true, Ordering::SeqCst);
    let status = client.say(say("blocked")).await.unwrap_err();

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "gate open");
    assert_eq!(gate.seen.load(Ordering::SeqCst), 2);
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn failed_unary_is_trailers_only_and_failed_stream_has_ok_headers() {
    let gate = Gate::default();
    let (addr, _server) = serve_with_layer(gate.clone(), EchoServer::new()).await;
    let mut client = client(addr).await;

    client.say(say("fine")).await.unwrap();
    let _ = client
        .say(EchoRequest {
            fail_with: 14,
            ..say("boom")
        })
        .await
        .unwrap_err();
    let mut stream = client
        .stream(StreamRequest {
            count: 2,
            fail_with: 13,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        drain(&mut stream).await.1.unwrap_err().code(),
        Code::Internal
    );
    let _ = client
        .stream(StreamRequest {
            count: 0,
            fail_with: 13,
            interval_ms: 0,
        })
        .await
        .unwrap_err();

    assert_eq!(
        gate.header_statuses(),
        [None, Some("14".to_owned()), None, Some("13".to_owned())]
    );
}
