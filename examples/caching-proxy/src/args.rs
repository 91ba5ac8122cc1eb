//! The command line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use axum::http::header::{HeaderName, HeaderValue};
use axum::http::uri::{Scheme, Uri};

use crate::forward::Upstream;

pub(crate) const USAGE: &str = "\
usage: caching-proxy --listen ADDR --upstream URL [options]

  --listen ADDR             address to serve on, e.g. 127.0.0.1:8080 (port 0 picks a free one)
  --upstream URL            the origin, http://host[:port] (no path)
  --redis-url URL           Redis for the shared tier, e.g. redis://127.0.0.1:6379 (memory tier alone without it)
  --prefix PREFIX           prefix of every Redis key and of the invalidation channel (default caching-proxy:)
  --memory-mb N             size of the in-memory tier in MiB, 0 turns it off (default 100)
  --connect-timeout-ms N    how long to wait for a connection to the upstream (default 5000)
  --heuristic-max-secs N    heuristic freshness (RFC 9111 4.2.2): a response with Last-Modified and no lifetime of
                            its own is fresh for 10 % of its age, at most N seconds (off by default)
  --stale-if-unreachable-secs N
                            how stale a stored response may be to stand in for an unreachable upstream (default
                            600; 0 turns it off and the client gets 502)
  --cache-control-field F   a targeted cache-control field (RFC 9213) this proxy obeys in place of Cache-Control;
                            repeat it to list several, the first one first (default CDN-Cache-Control)
  --allow-purge             answer PURGE from loopback clients: it invalidates the URL, or marks it stale with
                            Soft-Purge: 1 (other clients get 403; without the flag PURGE is forwarded)
  --keep-targeted-fields    pass the targeted fields on to the client (they are removed by default)
  -h, --help                print this help

Logs go to stderr; RUST_LOG sets the level (default info).";

/// The command line.
pub(crate) struct Args {
    pub(crate) listen: SocketAddr,
    pub(crate) upstream: Upstream,
    pub(crate) upstream_text: String,
    /// The URL as given (for the logs) and a client for it.
    pub(crate) redis: Option<(String, redis::Client)>,
    pub(crate) prefix: String,
    pub(crate) memory_bytes: u64,
    pub(crate) connect_timeout: Duration,
    /// The cap of heuristic freshness; `None` (the default) leaves it off.
    pub(crate) heuristic_max: Option<Duration>,
    pub(crate) stale_if_unreachable: Duration,
    /// The targeted fields, in order; `None` keeps the cache's default (`CDN-Cache-Control`).
    pub(crate) targeted_fields: Option<Vec<HeaderName>>,
    pub(crate) keep_targeted_fields: bool,
    pub(crate) allow_purge: bool,
}

impl Args {
    /// `Ok(None)` when help was asked for; `Err` names the argument that is wrong.
    pub(crate) fn parse(mut raw: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut listen = None;
        let mut upstream = None;
        let mut redis = None;
        let mut prefix = "caching-proxy:".to_owned();
        let mut memory_mb: u64 = 100;
        let mut connect_timeout_ms: u64 = 5000;
        let mut heuristic_max = None;
        let mut stale_if_unreachable = Duration::from_secs(600);
        let mut targeted_fields: Option<Vec<HeaderName>> = None;
        let mut keep_targeted_fields = false;
        let mut allow_purge = false;
        while let Some(arg) = raw.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(None);
            }
            if arg == "--keep-targeted-fields" {
                keep_targeted_fields = true;
                continue;
            }
            if arg == "--allow-purge" {
                allow_purge = true;
                continue;
            }
            // Both `--flag value` and `--flag=value`.
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| raw.next())
                    .ok_or_else(|| format!("{flag}: a value is required"))
            };
            match flag.as_str() {
                "--listen" => listen = Some(parse_listen(&value()?)?),
                "--upstream" => {
                    let text = value()?;
                    upstream = Some((parse_upstream(&text)?, text));
                }
                "--redis-url" => {
                    let url = value()?;
                    let client = redis::Client::open(url.as_str()).map_err(|error| {
                        format!("--redis-url: {url:?} is not a Redis URL ({error})")
                    })?;
                    redis = Some((url, client));
                }
                "--prefix" => prefix = value()?,
                "--memory-mb" => {
                    let text = value()?;
                    memory_mb = text.parse().map_err(|_| {
                        format!("--memory-mb: expected a whole number of MiB, got {text:?}")
                    })?;
                }
                "--connect-timeout-ms" => {
                    let text = value()?;
                    connect_timeout_ms = text
                        .parse()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| {
                            format!(
                                "--connect-timeout-ms: expected a number of milliseconds above 0, got {text:?}"
                            )
                        })?;
                }
                "--heuristic-max-secs" => {
                    let text = value()?;
                    let seconds: u64 = text.parse().ok().filter(|seconds| *seconds > 0).ok_or_else(|| {
                        format!("--heuristic-max-secs: expected a number of seconds above 0, got {text:?}")
                    })?;
                    heuristic_max = Some(Duration::from_secs(seconds));
                }
                "--stale-if-unreachable-secs" => {
                    let text = value()?;
                    let seconds: u64 = text.parse().map_err(|_| {
                        format!("--stale-if-unreachable-secs: expected a whole number of seconds, got {text:?}")
                    })?;
                    stale_if_unreachable = Duration::from_secs(seconds);
                }
                "--cache-control-field" => {
                    let text = value()?;
                    let name = HeaderName::from_bytes(text.as_bytes()).map_err(|_| {
                        format!("--cache-control-field: expected a header field name such as CDN-Cache-Control, got {text:?}")
                    })?;
                    targeted_fields.get_or_insert_with(Vec::new).push(name);
                }
                other => return Err(format!("{other}: unknown argument")),
            }
        }
        let listen = listen.ok_or("--listen: required (for example --listen 127.0.0.1:8080)")?;
        let (upstream, upstream_text) = upstream
            .ok_or("--upstream: required (for example --upstream http://127.0.0.1:3000)")?;
        let memory_bytes = memory_mb
            .checked_mul(1024 * 1024)
            .ok_or_else(|| format!("--memory-mb: {memory_mb} MiB is too large"))?;
        Ok(Some(Self {
            listen,
            upstream,
            upstream_text,
            redis,
            prefix,
            memory_bytes,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            heuristic_max,
            stale_if_unreachable,
            targeted_fields,
            keep_targeted_fields,
            allow_purge,
        }))
    }
}

pub(crate) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| {
            format!(
                "--listen: expected an address with a port such as 127.0.0.1:8080, got {text:?}"
            )
        })
}

pub(crate) fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let invalid = |why: &str| format!("--upstream: {why}, got {text:?}");
    let uri: Uri = text
        .parse()
        .map_err(|_| invalid("expected a URL such as http://127.0.0.1:3000"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| invalid("expected a URL with a scheme, such as http://127.0.0.1:3000"))?;
    if scheme != Scheme::HTTP {
        return Err(invalid("only http:// upstreams are supported"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| invalid("expected a URL with a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("credentials in the URL are not supported"));
    }
    if uri
        .path_and_query()
        .is_some_and(|path| path.as_str() != "/")
    {
        return Err(invalid(
            "expected no path or query (requests keep their own path)",
        ));
    }
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| invalid("the host is not a valid Host header"))?;
    Ok(Upstream {
        scheme,
        authority,
        host,
    })
}
