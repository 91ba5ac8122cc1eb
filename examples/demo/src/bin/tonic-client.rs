//! A tonic gRPC client that finds its servers through the service registry, balances its calls over them by their
//! measured load, and is guarded by a circuit breaker.
//!
//! ```text
//! cargo run --release -p demo --bin tonic-server                   # one or more, any ports
//! cargo run --release -p demo --bin tonic-client -- --count 20
//! # call 1: OK from echo:127.0.0.1:50051:1763... in 2 ms: "hello"
//! # ...
//! # summary {"calls":20,"codes":{"OK":20},"by_instance":{"echo:127.0.0.1:50051:...":11,...},...}
//! ```
//!
//! From the outside in, the channel is:
//!
//! 1. a `tower-breaker` [`BreakerLayer`] with gRPC classification: UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
//!    UNKNOWN, DATA_LOSS and transport errors count as failures; RESOURCE_EXHAUSTED (the server's rate limit) does
//!    not, since a server that rate-limits is healthy. Once open, a call gets `Status` UNAVAILABLE ("circuit
//!    breaker is open") at once, without touching the network; a call past `--timeout-ms` gets DEADLINE_EXCEEDED;
//! 2. `tower_redis_discovery::balance`: power of two choices over each instance's peak-EWMA latency, over the `UP`
//!    instances of `echo` in the registry (new and leaving instances are known within milliseconds through the
//!    registry's change hints). No instance, or none ready within a second, is an UNAVAILABLE `Status` at once;
//! 3. per instance, passive health (`Ejecting`: two failures in a row take it out of the choice for a growing
//!    backoff) around its own lazily connected `tonic::transport::Channel`.
//!
//! Without Redis (or with `--server`) the instances are the given addresses, by default `http://127.0.0.1:50051`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use demo::config::Config;
use demo::connection::{ConnectError, connect};
use demo::echo::{API_KEY, SERVED_BY, SERVICE};
use demo::env::Env;
use demo::lifecycle::{ServeError, stop_on_signals};
use demo::telemetry;
use grpc_echo::{EchoClient, EchoRequest};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Status};
use tower::{BoxError, ServiceBuilder};
use tower_breaker::classify::{GrpcCode, SharedClassifier};
use tower_breaker::{BreakerLayer, CircuitBreaker, GrpcClassifier};
use tower_redis_discovery::{
    BalanceOptions, Discovery, Ejecting, EjectionOptions, Instance, MemoryRegistry, NoEndpoints,
    Registration, Unavailable, WatchHandle, balance,
};

/// The name in logs.
const NAME: &str = "tonic-client";

/// The server a client without Redis calls when no `--server` is given.
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

const USAGE: &str = "\
usage: tonic-client [options]

  --count N          calls to make, one after the other (default 10; 0: until Ctrl-C)
  --interval-ms N    pause between two calls (default 200)
  --message TEXT     what to send (default hello)
  --api-key KEY      sent as x-api-key metadata: the server's rate limit is per key (else per address)
  --timeout-ms N     deadline of each call (default 2000)
  --wait-ms N        how long to wait for a first instance before calling anyway (default 5000)
  --server URL       call this server instead of discovering through Redis (repeatable), e.g. http://127.0.0.1:50051
  -h, --help         print this help

Redis comes from the environment as for every example (REDIS_URL, REDIS_PREFIX, ...). Each call prints one line on
stdout; the last line is `summary` and a JSON object. Logs go to stderr; RUST_LOG sets the level.";

/// The command line.
#[derive(Debug)]
struct Args {
    count: u64,
    interval: Duration,
    message: String,
    api_key: Option<AsciiMetadataValue>,
    timeout: Duration,
    wait: Duration,
    servers: Vec<String>,
}

impl Args {
    /// `Ok(None)` for `--help`.
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut parsed = Self {
            count: 10,
            interval: Duration::from_millis(200),
            message: "hello".to_owned(),
            api_key: None,
            timeout: Duration::from_secs(2),
            wait: Duration::from_secs(5),
            servers: Vec::new(),
        };
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(None);
            }
            let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
            let millis = |value: &str| {
                value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("{arg}: {value:?} is not a whole number of milliseconds"))
            };
            match arg.as_str() {
                "--count" => {
                    parsed.count = value
                        .parse()
                        .map_err(|_| format!("--count: {value:?} is not a whole number"))?;
                }
                "--interval-ms" => parsed.interval = millis(&value)?,
                "--timeout-ms" => {
                    parsed.timeout = millis(&value)?;
                    if parsed.timeout.is_zero() {
                        return Err("--timeout-ms must be above 0".to_owned());
                    }
                }
                "--wait-ms" => parsed.wait = millis(&value)?,
                "--message" => parsed.message = value,
                "--api-key" => {
                    parsed.api_key = Some(value.parse().map_err(|_| {
                        format!(
                            "--api-key: {value:?} is not a valid metadata value (visible ASCII)"
                        )
                    })?);
                }
                "--server" => {
                    instance_for(&value)?;
                    parsed.servers.push(value);
                }
                _ => return Err(format!("unknown option {arg}")),
            }
        }
        Ok(Some(parsed))
    }
}

/// An instance of `echo` at `url` (`http://host:port`), for a client without Redis.
fn instance_for(url: &str) -> Result<Instance, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|error| format!("--server: {url:?} is not a URL: {error}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("--server: {url:?} must start with http://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("--server: {url:?} has no host"))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| format!("--server: {url:?} has no port"))?;
    Ok(Instance::new(
        SERVICE,
        host.trim_start_matches('[').trim_end_matches(']'),
        port,
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{NAME}: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing();
    let config = match Config::from_env(0) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{NAME}: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };

    // Where the servers come from: the shared registry, or the addresses given. The registrations of given
    // addresses live as long as `_static`.
    let watched = if args.servers.is_empty() {
        match connect(&config.redis).await {
            Ok(redis) => {
                tracing::info!(
                    redis = %config.redis.target.redacted(),
                    prefix = %config.redis.prefix,
                    "connected to Redis: discovering {SERVICE} instances"
                );
                Env::shared(config, redis, None)
                    .and_then(|env| env.discover(SERVICE))
                    .map(|discovery| (discovery, Vec::new()))
            }
            Err(ConnectError::Config(message)) => {
                eprintln!("{NAME}: invalid configuration: {message}");
                return ExitCode::from(2);
            }
            Err(ConnectError::Unreachable(message)) => {
                tracing::warn!("{message}");
                tracing::warn!(
                    "SINGLE-INSTANCE MODE: no registry to discover servers in; calling {DEFAULT_SERVER} \
                     (give --server to call others)"
                );
                static_servers(config, &[DEFAULT_SERVER.to_owned()])
            }
        }
    } else {
        tracing::info!(servers = ?args.servers, "calling the given servers");
        static_servers(config, &args.servers)
    };
    let (discovery, _static) = match watched {
        Ok(watched) => watched,
        Err(error) => {
            eprintln!("{NAME}: {error}");
            return ExitCode::from(2);
        }
    };

    let watch = discovery.handle();
    let (mut client, breaker) = match echo_client(discovery, args.timeout) {
        Ok(built) => built,
        Err(error) => {
            eprintln!("{NAME}: {error}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_instances(&watch, args.wait).await;
    let summary = run_calls(&mut client, &args).await;
    println!(
        "summary {}",
        serde_json::json!({
            "calls": summary.calls,
            "codes": summary.codes,
            "by_instance": summary.by_instance,
            "max_ms": summary.max.as_millis(),
            "breaker": breaker.state(),
        })
    );
    ExitCode::SUCCESS
}

/// A registry in this process holding `urls` as `UP` instances, and its discovery.
fn static_servers(
    config: Config,
    urls: &[String],
) -> Result<(Discovery, Vec<Registration<MemoryRegistry>>), ServeError> {
    let env = Env::single(config, MemoryRegistry::default(), None);
    let registrations = urls
        .iter()
        .filter_map(|url| instance_for(url).ok())
        .map(|instance| {
            let registration = Registration::start(env.registry.clone(), instance)?;
            registration.ready();
            Ok(registration)
        })
        .collect::<Result<_, ServeError>>()?;
    Ok((env.discover(SERVICE)?, registrations))
}

/// The channel: breaker, then balancer, then per instance passive health around a lazily connected `Channel`.
type Channel = tower_breaker::Breaker<
    tower::util::MapErr<
        tower_redis_discovery::Balanced<
            http::Request<tonic::body::Body>,
            http::Response<tonic::body::Body>,
        >,
        fn(BoxError) -> BoxError,
    >,
    SharedClassifier<GrpcClassifier>,
    tower_breaker::NoFallback,
>;

fn echo_client(
    discovery: Discovery,
    timeout: Duration,
) -> Result<(EchoClient<Channel>, CircuitBreaker), String> {
    let ejection = EjectionOptions::builder()
        .consecutive_failures(2)
        .base(Duration::from_millis(500))
        .max(Duration::from_secs(10))
        .build()
        .map_err(|error| format!("ejection: {error}"))?;
    let options = BalanceOptions::builder()
        .failfast(Duration::from_secs(1))
        .build()
        .map_err(|error| format!("balance: {error}"))?;
    let balanced = balance(
        discovery,
        move |instance: &Instance| Ejecting::new(channel_to(instance), instance, ejection),
        options,
    );
    let breaker = CircuitBreaker::builder()
        .name(SERVICE)
        .count_window(20)
        .minimum_calls(5)
        .failure_rate(0.5)
        .consecutive_failures(3)
        .open_for(Duration::from_secs(5))
        .call_timeout(timeout)
        .build()
        .map_err(|error| format!("breaker: {error}"))?;
    // The server's rate limit is not a sign of ill health: RESOURCE_EXHAUSTED does not count.
    let classifier = GrpcClassifier::new().with_ignored(GrpcCode::ResourceExhausted);
    let channel: Channel = ServiceBuilder::new()
        .layer(BreakerLayer::new(breaker.clone()).classifier(SharedClassifier::new(classifier)))
        .map_err(discovery_status as fn(BoxError) -> BoxError)
        .service(balanced);
    Ok((EchoClient::new(channel), breaker))
}

/// A lazily connected channel to one instance: it connects on the first call, and again after a failure.
fn channel_to(instance: &Instance) -> tonic::transport::Channel {
    match tonic::transport::Endpoint::from_shared(instance.base_uri()) {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(error) => {
            // An address that makes no URI (a bad registry entry) gets a channel that cannot connect; passive
            // health then takes it out of the choice.
            tracing::warn!(%error, id = %instance.id, "the instance's address is not a URI");
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
        }
    }
}

/// The balancer's own failures as the gRPC status a caller expects: UNAVAILABLE.
fn discovery_status(error: BoxError) -> BoxError {
    if error.is::<NoEndpoints>() {
        Box::new(Status::unavailable(format!(
            "no instance of {SERVICE} is registered"
        )))
    } else if error.is::<Unavailable>() {
        Box::new(Status::unavailable(format!(
            "no instance of {SERVICE} is ready"
        )))
    } else {
        error
    }
}

/// Waits until discovery knows an instance, at most `wait`.
async fn wait_for_instances(watch: &WatchHandle, wait: Duration) {
    let deadline = Instant::now() + wait;
    while watch.stats().instances == 0 {
        if Instant::now() >= deadline {
            tracing::warn!(
                "no instance of {SERVICE} found within {} ms; calling anyway",
                wait.as_millis()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Default)]
struct Summary {
    calls: u64,
    codes: BTreeMap<&'static str, u64>,
    by_instance: BTreeMap<String, u64>,
    max: Duration,
}

/// Makes the calls, one line each on stdout, until `--count` or Ctrl-C.
async fn run_calls(client: &mut EchoClient<Channel>, args: &Args) -> Summary {
    let stop = stop_on_signals().wait();
    tokio::pin!(stop);
    let mut summary = Summary::default();
    let mut number = 0_u64;
    while args.count == 0 || number < args.count {
        number += 1;
        let mut request = tonic::Request::new(EchoRequest {
            message: args.message.clone(),
            ..EchoRequest::default()
        });
        if let Some(key) = &args.api_key {
            request.metadata_mut().insert(API_KEY, key.clone());
        }
        let started = Instant::now();
        // The breaker's call timeout answers first; this one only guards against a call that never returns.
        let result = tokio::select! {
            result = tokio::time::timeout(args.timeout + Duration::from_secs(1), client.say(request)) => result,
            () = &mut stop => break,
        };
        let took = started.elapsed();
        let (code, served_by, detail) = match result {
            Ok(Ok(reply)) => {
                let served_by = served_by(reply.metadata());
                (
                    Code::Ok,
                    served_by,
                    format!("{:?}", reply.into_inner().message),
                )
            }
            Ok(Err(status)) => (
                status.code(),
                served_by(status.metadata()),
                explain(&status),
            ),
            Err(_) => (
                Code::DeadlineExceeded,
                None,
                "no answer at all (client-side deadline)".to_owned(),
            ),
        };
        let from = served_by
            .as_deref()
            .map_or_else(String::new, |id| format!(" from {id}"));
        println!(
            "call {number}: {}{from} in {} ms: {detail}",
            code_name(code),
            took.as_millis()
        );
        summary.calls += 1;
        *summary.codes.entry(code_name(code)).or_default() += 1;
        if let Some(id) = served_by {
            *summary.by_instance.entry(id).or_default() += 1;
        }
        summary.max = summary.max.max(took);
        if args.count == 0 || number < args.count {
            tokio::select! {
                () = tokio::time::sleep(args.interval) => {}
                () = &mut stop => break,
            }
        }
    }
    summary
}

/// The answering instance, from the reply's (or the status's) metadata.
fn served_by(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(SERVED_BY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// The status message, with the retry time a rate limit gives.
fn explain(status: &Status) -> String {
    match status
        .metadata()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
    {
        Some(seconds) => format!("{} (retry after {seconds} s)", status.message()),
        None => status.message().to_owned(),
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
