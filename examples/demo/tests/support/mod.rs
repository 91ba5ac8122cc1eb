//! What the end-to-end tests of the package's binaries share: running them
//! as child processes that are killed when dropped (even on a panic), polling with a deadline, and a tiny HTTP/1.1
//! client. Each test binary (`demo.rs`, `examples.rs`) uses a part of it.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) mod sse;

// ---------------------------------------------------------------------------------------------------------------
// Building and running the binaries.

/// The path of the package's binary `name`, which cargo builds before the tests (`CARGO_BIN_EXE_<name>`).
pub(crate) fn binary(name: &str) -> PathBuf {
    let path = match name {
        "demo" => env!("CARGO_BIN_EXE_demo"),
        "gateway" => env!("CARGO_BIN_EXE_gateway"),
        "order-service" => env!("CARGO_BIN_EXE_order-service"),
        "rate-limited-api" => env!("CARGO_BIN_EXE_rate-limited-api"),
        "tonic-client" => env!("CARGO_BIN_EXE_tonic-client"),
        "tonic-server" => env!("CARGO_BIN_EXE_tonic-server"),
        "user-service" => env!("CARGO_BIN_EXE_user-service"),
        other => panic!("the demo package has no binary {other:?}"),
    };
    PathBuf::from(path)
}

/// A process started by a test; killed (and waited for) when dropped.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    output: Arc<Mutex<Output>>,
    /// The threads reading standard output and error, which end at end of file.
    readers: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    /// `(service, address)` for every "<service> listening on http://<address>" line on standard output.
    listening: Vec<(String, SocketAddr)>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.log());
        }
    }
}

fn read_lines(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<Output>>,
    stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut output = output.lock().unwrap();
            if stdout && let Some(at) = line.find(" listening on http://") {
                let service = line[..at].rsplit(' ').next().unwrap_or("").to_owned();
                let address = line[at + " listening on http://".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                if let Ok(address) = address.parse() {
                    output.listening.push((service, address));
                }
            }
            output.lines.push(line);
        }
    })
}

/// Starts the example binary `binary` with `env` on top of a clean environment (no REDIS_*, RATE_LIMIT_* or PORT
/// from outside).
pub(crate) fn start(binary: &str, env: &[(&str, String)]) -> Proc {
    start_with_args(binary, &[], env)
}

/// Like [`start`], with command-line arguments.
pub(crate) fn start_with_args(binary: &str, args: &[&str], env: &[(&str, String)]) -> Proc {
    let path = self::binary(binary);
    let mut command = Command::new(&path);
    for (name, _) in std::env::vars() {
        if name.starts_with("REDIS_")
            || name.starts_with("RATE_LIMIT_")
            || name.ends_with("_PORT")
            || ["PORT", "HOST", "ADVERTISE_HOST", "TRUSTED_PROXIES"].contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", path.display()));
    let output = Arc::new(Mutex::new(Output::default()));
    let readers = vec![
        read_lines(child.stdout.take().unwrap(), output.clone(), true),
        read_lines(child.stderr.take().unwrap(), output.clone(), false),
    ];
    Proc {
        name: binary.to_owned(),
        child,
        output,
        readers,
    }
}

impl Proc {
    pub(crate) fn log(&self) -> String {
        self.output.lock().unwrap().lines.join("\n")
    }

    /// Every line of output (standard output and error, in the order they were read) so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.output.lock().unwrap().lines.clone()
    }

    /// The address `service` printed it listens on.
    pub(crate) fn address_of(&self, service: &str) -> SocketAddr {
        let found = poll(Duration::from_secs(30), || {
            self.output
                .lock()
                .unwrap()
                .listening
                .iter()
                .find(|(name, _)| name == service)
                .map(|(_, address)| *address)
        });
        found.unwrap_or_else(|| panic!("{service} never said it listens; output:\n{}", self.log()))
    }

    /// The address of the binary's own service.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address_of(&self.name.clone())
    }

    /// Waits for the process to exit by itself, and for its output to be read to the end (at most 5 s more: a
    /// child it left behind may hold the pipes open).
    pub(crate) fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let read = poll(Duration::from_secs(5), || {
                    self.readers
                        .iter()
                        .all(std::thread::JoinHandle::is_finished)
                        .then_some(())
                });
                if read.is_none() {
                    eprintln!("{}: output still open 5 s after exit", self.name);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}; output:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The user and order services and two gateways started with `env`; the gateways' addresses once the discovery of
/// each knows an instance of both services (listed in the registry is not enough: a gateway balances over what
/// its own watch has read).
pub(crate) fn two_gateways(env: &[(&str, String)]) -> (Vec<Proc>, SocketAddr, SocketAddr) {
    let procs = vec![
        start("user-service", env),
        start("order-service", env),
        start("gateway", env),
        start("gateway", env),
    ];
    let (a, b) = (procs[2].address(), procs[3].address());
    for gateway in [a, b] {
        wait_for_discovery(gateway);
    }
    (procs, a, b)
}

/// Waits until the discovery of `gateway` knows an instance of both services (listed in the registry is not
/// enough: a gateway balances over what its own watch has read).
pub(crate) fn wait_for_discovery(gateway: SocketAddr) {
    poll(Duration::from_secs(20), || {
        let health = get(gateway, "/health").json();
        ["user-service", "order-service"]
            .iter()
            .all(|service| {
                health["downstream"][service]["discovery"]["instances"]
                    .as_u64()
                    .is_some_and(|instances| instances > 0)
            })
            .then_some(())
    })
    .expect("the gateway's discovery never knew both services");
}

/// Waits until the order service at `orders` has discovered a user-service instance (its watch polls on its own
/// schedule, so the gateway knowing one says nothing of it).
pub(crate) fn wait_for_orders_discovery(orders: SocketAddr) {
    poll(Duration::from_secs(20), || {
        get(orders, "/health").json()["downstream"]["user-service"]["discovery"]["instances"]
            .as_u64()
            .is_some_and(|instances| instances > 0)
            .then_some(())
    })
    .expect("the order service never discovered the user service");
}

/// Polls `check` every 50 ms until it gives a value or `within` runs out.
pub(crate) fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A key prefix no other test uses.
pub(crate) fn prefix(test: &str) -> String {
    format!("e2e-{test}-{}:", std::process::id())
}

/// A port nothing listens on.
pub(crate) fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one request per connection), so the tests read like the curl walkthrough.

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

pub(crate) fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|error| panic!("{method} {path}: cannot read the answer: {error}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line: {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub(crate) fn get(address: SocketAddr, path: &str) -> Reply {
    request(address, "GET", path, None, &[])
}
