//! The demo: starts the user service, the order service and the gateway as three processes that find each other
//! through Redis, forwards their output with a prefix, and on Ctrl-C (or SIGTERM) stops them all; each one drains
//! and deregisters before it exits.
//!
//! ```text
//! cargo run --release -p demo --bin demo          # then: curl localhost:3003/services
//! ```
//!
//! The children are the `user-service`, `order-service` and `gateway` binaries next to this one. When a sibling is
//! missing or more than a minute older than this executable (`cargo run --bin demo` builds only `demo`), the demo runs that service
//! from its own executable instead (`demo --serve <name>`), which holds the same code.
//!
//! With no Redis reachable it runs the three services in this one process on in-memory backends (single-instance
//! mode) and says so. Environment: `REDIS_URL` and the other `REDIS_*` variables (see `demo::config`, passed on
//! to the children), `USER_SERVICE_PORT`, `ORDER_SERVICE_PORT`, `GATEWAY_PORT` (3001, 3002, 3003).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use demo::config::{Config, DemoPorts};
use demo::connection::{ConnectError, connect};
use demo::lifecycle::{SUPERVISED_VAR, stop_on_signals};
use demo::roles::{Role, run_in_one_process, run_process};
use demo::telemetry;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// A sibling binary older than this executable by more than this is not used (it was not rebuilt with it).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// How long the children get to drain and deregister after the stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, name] if flag == "--serve" => {
            return match Role::from_name(name) {
                Some(role) => run_process(role).await,
                None => {
                    eprintln!(
                        "demo: unknown service {name:?} (user-service, order-service, gateway)"
                    );
                    ExitCode::from(2)
                }
            };
        }
        _ => {
            eprintln!(
                "usage: demo\n\nStarts user-service, order-service and gateway; Ctrl-C stops them. Configuration comes \
                 from the environment (REDIS_URL, REDIS_PREFIX, USER_SERVICE_PORT, ORDER_SERVICE_PORT, GATEWAY_PORT, ...)."
            );
            return ExitCode::from(2);
        }
    }

    telemetry::init_tracing();
    let config = match Config::from_env(demo::gateway::PORT) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("demo: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let ports = match DemoPorts::from_env() {
        Ok(ports) => ports,
        Err(error) => {
            eprintln!("demo: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    match connect(&config.redis).await {
        Ok(_) => {
            println!(
                "demo: Redis at {} is up: starting user-service, order-service and gateway as separate processes \
                 (key prefix {:?})",
                config.redis.target.redacted(),
                config.redis.prefix
            );
            supervise(&ports).await
        }
        Err(ConnectError::Config(message)) => {
            eprintln!("demo: invalid configuration: {message}");
            ExitCode::from(2)
        }
        Err(ConnectError::Unreachable(message)) => single_instance(config, ports, &message).await,
    }
}

/// No Redis: the three services in this process, on in-memory backends.
async fn single_instance(config: Config, ports: DemoPorts, why: &str) -> ExitCode {
    let banner = format!(
        "demo: SINGLE-INSTANCE MODE. {why}.\n\
         demo: running user-service, order-service and gateway in this one process on in-memory backends \
         (registry, cache, rate limits); nothing is shared with other processes. Start Redis (or set REDIS_URL) \
         and restart for the multi-process demo."
    );
    println!("{banner}");
    tracing::warn!("single-instance mode: {why}");
    let metrics = telemetry::install_metrics();
    let stop = stop_on_signals();
    match run_in_one_process(config, ports, stop, metrics).await {
        Ok(()) => {
            println!("demo: stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("demo: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What to run for a role: the sibling binary when it is there and not older than this executable, else this
/// executable with `--serve <name>`.
fn program_for(role: Role) -> (PathBuf, Vec<String>) {
    let own = std::env::current_exe().ok();
    let sibling = own
        .as_deref()
        .and_then(Path::parent)
        .map(|dir| dir.join(format!("{}{}", role.name(), std::env::consts::EXE_SUFFIX)));
    let modified = |path: &Path| path.metadata().and_then(|meta| meta.modified()).ok();
    if let (Some(own), Some(sibling)) = (&own, &sibling) {
        // Binaries linked by one `cargo build` are seconds apart: only a sibling much older than this executable
        // is taken for stale.
        let fresh = match (modified(sibling), modified(own)) {
            (Some(theirs), Some(ours)) => theirs + STALE_AFTER >= ours,
            (Some(_), None) => true,
            _ => false,
        };
        if fresh {
            return (sibling.clone(), Vec::new());
        }
        if sibling.exists() {
            tracing::info!(
                "{} is older than demo: running the service from demo itself (cargo build -p demo --bins \
                 refreshes it)",
                sibling.display()
            );
        }
        return (
            own.clone(),
            vec!["--serve".to_owned(), role.name().to_owned()],
        );
    }
    (PathBuf::from(role.name()), Vec::new())
}

struct Running {
    role: Role,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The prefix of a child's lines: its name, padded, coloured on a terminal.
fn prefix(role: Role, colour: bool) -> String {
    let code = match role {
        Role::Users => "36",
        Role::Orders => "35",
        Role::Gateway => "33",
    };
    if colour {
        format!("\x1b[{code}m{:<13}|\x1b[0m ", role.name())
    } else {
        format!("{:<13}| ", role.name())
    }
}

/// Copies a child's output line by line with its prefix; tells `ready` when the child says it listens.
fn forward(
    output: impl AsyncRead + Unpin + Send + 'static,
    role: Role,
    to_stderr: bool,
    ready: mpsc::UnboundedSender<(Role, String)>,
) {
    let colour = if to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let prefix = prefix(role, colour);
    tokio::spawn(async move {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // The "<name> listening on http://<address>" line a service prints on its standard output.
            if !to_stderr && let Some(at) = line.find(" listening on http://") {
                let address = &line[at + " listening on ".len()..];
                let address = address.split_whitespace().next().unwrap_or(address);
                let _ = ready.send((role, address.to_owned()));
            }
            if to_stderr {
                eprintln!("{prefix}{line}");
            } else {
                println!("{prefix}{line}");
            }
        }
    });
}

fn spawn(
    role: Role,
    port: u16,
    ready: &mpsc::UnboundedSender<(Role, String)>,
) -> Result<Running, String> {
    let (program, args) = program_for(role);
    let mut child = Command::new(&program)
        .args(&args)
        .env("PORT", port.to_string())
        .env(SUPERVISED_VAR, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| {
            format!(
                "cannot start {} ({}): {error}",
                role.name(),
                program.display()
            )
        })?;
    if let Some(stdout) = child.stdout.take() {
        forward(stdout, role, false, ready.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        forward(stderr, role, true, ready.clone());
    }
    let stdin = child.stdin.take();
    Ok(Running { role, child, stdin })
}

/// Redis is up: the three services as child processes until Ctrl-C, SIGTERM or a child's exit.
async fn supervise(ports: &DemoPorts) -> ExitCode {
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut running = Vec::new();
    for role in Role::ALL {
        match spawn(role, role.port_in(ports), &ready_tx) {
            Ok(child) => running.push(child),
            Err(error) => {
                eprintln!("demo: {error}");
                stop_all(&mut running).await;
                return ExitCode::FAILURE;
            }
        }
    }
    drop(ready_tx);

    let stop = stop_on_signals();
    let mut stop_requested = false;
    let mut up = 0;
    let mut exited: Option<(Role, String)> = None;
    let mut stopped = std::pin::pin!(stop.wait());
    loop {
        tokio::select! {
            () = &mut stopped => {
                stop_requested = true;
                break;
            }
            Some((role, address)) = ready_rx.recv() => {
                up += 1;
                if role == Role::Gateway {
                    println!("demo: the gateway is at {address}");
                }
                if up == Role::ALL.len() {
                    println!(
                        "demo: all three services are up. Try `curl {}/services` (README.md has the walkthrough); \
                         Ctrl-C stops them.",
                        gateway_url(ports)
                    );
                }
            }
            (role, status) = first_exit(&mut running) => {
                exited = Some((role, status));
                break;
            }
        }
    }
    if let Some((role, status)) = &exited {
        eprintln!(
            "demo: {} exited ({status}); stopping the others",
            role.name()
        );
    } else {
        println!("demo: stopping: each service drains and deregisters");
    }
    let clean = stop_all(&mut running).await;
    if stop_requested && clean {
        println!("demo: stopped");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn gateway_url(ports: &DemoPorts) -> String {
    format!("http://localhost:{}", ports.gateway)
}

/// Resolves when any child exits, with its role and exit status.
async fn first_exit(running: &mut [Running]) -> (Role, String) {
    if running.is_empty() {
        return std::future::pending().await;
    }
    let waits = running.iter_mut().map(|run| {
        let role = run.role;
        Box::pin(async move {
            let status = run
                .child
                .wait()
                .await
                .map_or_else(|error| error.to_string(), |status| status.to_string());
            (role, status)
        })
    });
    futures_select_all(waits).await
}

/// The first of several futures to finish (a tiny `select_all`, to keep the dependencies few).
async fn futures_select_all<F, T>(futures: impl IntoIterator<Item = F>) -> T
where
    F: std::future::Future<Output = T> + Unpin,
{
    let mut futures: Vec<F> = futures.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for future in &mut futures {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(output);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Closes every child's input (they stop: drain, deregister, exit), waits up to [`STOP_GRACE`], kills the rest.
/// `true` when every child exited by itself with success.
async fn stop_all(running: &mut [Running]) -> bool {
    for run in running.iter_mut() {
        drop(run.stdin.take());
    }
    let mut clean = true;
    for run in running.iter_mut() {
        match tokio::time::timeout(STOP_GRACE, run.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                clean = false;
                eprintln!("demo: {} exited with {status}", run.role.name());
            }
            Ok(Err(error)) => {
                clean = false;
                eprintln!("demo: cannot wait for {}: {error}", run.role.name());
            }
            Err(_) => {
                clean = false;
                eprintln!(
                    "demo: {} did not stop within {} s; killing it",
                    run.role.name(),
                    STOP_GRACE.as_secs()
                );
                let _ = run.child.kill().await;
            }
        }
    }
    clean
}
