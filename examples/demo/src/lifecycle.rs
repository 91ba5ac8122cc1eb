//! A service's life: bind, register (status `STARTING`), report `UP` once the socket listens, serve; on a stop
//! signal report `OUT_OF_SERVICE` for the drain time, remove the registration, and finish the requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::watch;
use tower_redis_discovery::{Instance, Registration, Registry};

use crate::env::Env;

/// A stop signal shared by the services of a process. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

/// Triggers a [`Stop`].
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    /// Tells every holder of the [`Stop`] to stop.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// A new stop signal and its trigger.
pub fn stop_pair() -> (StopHandle, Stop) {
    let (sender, receiver) = watch::channel(false);
    (StopHandle(Arc::new(sender)), Stop(receiver))
}

impl Stop {
    /// Resolves once stopped (or once the trigger is gone).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

/// The environment variable a supervisor (the `demo` launcher) sets so a child also stops when its standard input
/// closes.
pub const SUPERVISED_VAR: &str = "DEMO_SUPERVISED";

/// A stop signal triggered by Ctrl-C, SIGTERM and, when `SUPERVISED_VAR` is `1`, the end of standard input.
pub fn stop_on_signals() -> Stop {
    let (handle, stop) = stop_pair();
    let supervised = std::env::var(SUPERVISED_VAR).is_ok_and(|value| value == "1");
    tokio::spawn(async move {
        tokio::select! {
            () = ctrl_c() => tracing::info!("Ctrl-C: stopping"),
            () = terminate() => tracing::info!("SIGTERM: stopping"),
            () = stdin_closed(), if supervised => tracing::info!("the supervisor closed our input: stopping"),
        }
        handle.stop();
    });
    stop
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await;
}

/// Resolves when standard input reaches its end. The read runs on a plain thread of its own, not on tokio's
/// blocking pool: a runtime waits for its blocking tasks when it shuts down, so a service that failed at start-up
/// (its port taken, say) would never exit while the read waits, and the launcher would wait for it for good.
async fn stdin_closed() {
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    let started = std::thread::Builder::new()
        .name("stdin-watch".to_owned())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buffer = [0_u8; 256];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = closed.send(());
        });
    if started.is_err() {
        return std::future::pending().await;
    }
    let _ = on_close.await;
}

/// Counts the requests an instance served and names it in an `x-served-by` header on every response.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// The registered instance id.
    pub id: Arc<str>,
    /// The service name.
    pub service: &'static str,
    requests: Arc<AtomicU64>,
}

impl InstanceInfo {
    fn new(instance: &Instance, service: &'static str) -> Self {
        Self {
            id: Arc::from(instance.id.as_str()),
            service,
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A router with the counting and `x-served-by` middleware around `router`.
    pub fn wrap(&self, router: Router) -> Router {
        let info = self.clone();
        router.layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let info = info.clone();
                async move {
                    info.requests.fetch_add(1, Ordering::Relaxed);
                    let mut response: Response = next.run(request).await;
                    if let Ok(value) = HeaderValue::from_str(&info.id) {
                        response.headers_mut().insert("x-served-by", value);
                    }
                    response
                }
            },
        ))
    }
}

/// Why a service could not run.
#[derive(Debug)]
pub struct ServeError(pub String);

impl From<tower_redis_core::ConfigError> for ServeError {
    fn from(error: tower_redis_core::ConfigError) -> Self {
        Self(error.to_string())
    }
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServeError {}

/// Serves `service` on `port` until `stop`: binds, registers, calls `make` with the instance to build the router,
/// reports ready, and shuts down gracefully. Prints `<service> listening on http://<addr>` on standard output
/// once it accepts connections (supervisors and tests wait for that line).
///
/// # Errors
///
/// [`ServeError`] when the port cannot be bound or the server fails.
pub async fn serve<R, M>(
    service: &'static str,
    env: &Env<R>,
    port: u16,
    make: M,
    stop: Stop,
) -> Result<(), ServeError>
where
    R: Registry,
    M: FnOnce(InstanceInfo) -> Result<Router, ServeError>,
{
    let bind = SocketAddr::new(env.config.host, port);
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|error| ServeError(format!("{service}: cannot listen on {bind}: {error}")))?;
    let local = listener.local_addr().map_err(|error| {
        ServeError(format!("{service}: cannot read the bound address: {error}"))
    })?;
    let mut instance = Instance::new(service, env.config.advertise_host.clone(), local.port());
    instance
        .metadata
        .insert("version".to_owned(), env!("CARGO_PKG_VERSION").into());
    instance
        .metadata
        .insert("pid".to_owned(), std::process::id().into());
    instance
        .metadata
        .insert("mode".to_owned(), env.mode().as_str().into());
    let info = InstanceInfo::new(&instance, service);
    let router = info.wrap(make(info.clone())?);

    let registration = Registration::start(env.registry.clone(), instance)?;
    // The socket is bound, so connections queue from now on: the instance can take traffic.
    registration.ready();
    println!("{service} listening on http://{local}");
    tracing::info!(
        id = %info.id,
        mode = env.mode().as_str(),
        "{service} listening on http://{local}"
    );

    let drain = env.drain;
    let shutdown = async move {
        stop.wait().await;
        tracing::info!(
            drain_ms = drain.as_millis(),
            "{service}: out of service; draining, then leaving the registry"
        );
        if let Err(error) = registration.deregister(Some(drain)).await {
            tracing::warn!(%error, "{service}: could not remove the registration; it expires on its own");
        } else {
            tracing::info!("{service}: deregistered");
        }
    };
    crate::server::serve(listener, router, shutdown)
        .await
        .map_err(|error| ServeError(format!("{service}: server error: {error}")))?;
    tracing::info!("{service}: stopped");
    Ok(())
}
