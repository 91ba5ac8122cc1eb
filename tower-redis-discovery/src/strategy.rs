//! The HazelJS load-balancing strategies (round robin, random, least connections, weighted by
//! `metadata.weight`, hash of a request key, zone preference) over discovered instances, with the same fail-fast
//! and readiness handling as [`balance`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_core::Stream;
use rand::Rng;
use tower::BoxError;
use tower::Service;
use tower::discover::Change;
use tower::util::BoxCloneSyncService;

use crate::balance::{BalanceOptions, Balanced, NoEndpoints, Unavailable};
use crate::discover::Discovery;
use crate::instance::Instance;

/// Extracts the key a [`Strategy::Hash`] routes by (a client IP, a user id, a tenant).
pub type HashKey<Req> = Arc<dyn Fn(&Req) -> Option<u64> + Send + Sync>;

/// How [`balance_with`] chooses an instance for each request.
pub enum Strategy<Req> {
    /// Power of two choices over peak-EWMA latency (as linkerd): two instances at random, and the one with the
    /// lower `latency estimate × (requests in flight + 1)` is chosen (by a chance that grows with the gap, so two
    /// equally fast instances share the traffic even one request at a time). The estimate jumps to any slower
    /// answer at once, decays toward faster ones (and toward zero while idle) over `BalanceOptions::decay`, and is
    /// at least the time a busy instance has gone without answering. The default.
    PeakEwma,
    /// Each instance in turn.
    RoundRobin,
    /// An instance at random.
    Random,
    /// The instance with the fewest requests in flight (ties go round robin).
    LeastConnections,
    /// Smooth weighted round robin by each instance's `metadata.weight` (1 when absent or not a positive number).
    Weighted,
    /// The same key always goes to the same instance while it is there (rendezvous hashing: when an instance
    /// leaves, only its keys move). Requests without a key go round robin.
    Hash(HashKey<Req>),
    /// Instances in `zone` first (by `then`); instances elsewhere only when none in the zone is ready.
    ZonePreference {
        /// The preferred zone (usually the caller's own).
        zone: String,
        /// The strategy among the preferred instances, and among the others when it falls back.
        then: Box<Self>,
    },
}

impl<Req> fmt::Debug for Strategy<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeakEwma => f.write_str("PeakEwma"),
            Self::RoundRobin => f.write_str("RoundRobin"),
            Self::Random => f.write_str("Random"),
            Self::LeastConnections => f.write_str("LeastConnections"),
            Self::Weighted => f.write_str("Weighted"),
            Self::Hash(_) => f.write_str("Hash"),
            Self::ZonePreference { zone, then } => f
                .debug_struct("ZonePreference")
                .field("zone", zone)
                .field("then", then)
                .finish(),
        }
    }
}

// Not derived: a derive would demand `Req: Default`.
#[allow(clippy::derivable_impls)]
impl<Req> Default for Strategy<Req> {
    fn default() -> Self {
        Self::PeakEwma
    }
}

impl<Req> Strategy<Req> {
    /// Routes by a key taken from the request; hash it with any stable hash (the key itself can be the hash).
    pub fn hash_by(key: impl Fn(&Req) -> Option<u64> + Send + Sync + 'static) -> Self {
        Self::Hash(Arc::new(key))
    }

    /// Prefers instances in `zone`, choosing among them with `then`.
    pub fn zone_preference(zone: impl Into<String>, then: Self) -> Self {
        Self::ZonePreference {
            zone: zone.into(),
            then: Box::new(then),
        }
    }
}

impl<B> Strategy<http::Request<B>> {
    /// Routes by the value of a request header (for example `x-user-id`, or `x-forwarded-for` for the client IP
    /// behind a proxy); requests without it go round robin.
    pub fn hash_header(name: http::HeaderName) -> Self {
        Self::hash_by(move |request: &http::Request<B>| {
            request
                .headers()
                .get(&name)
                .map(|value| fnv(value.as_bytes()))
        })
    }
}

/// FNV-1a: stable across processes and versions, so every instance of the caller routes a key alike.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A 64-bit mix (splitmix64's finaliser) for rendezvous scores.
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

struct Endpoint<S> {
    id: String,
    id_hash: u64,
    zone: Option<String>,
    weight: f64,
    current: f64,
    service: S,
    load: Arc<Load>,
}

/// What an endpoint carries: requests in flight and a peak-EWMA latency estimate.
struct Load {
    in_flight: AtomicUsize,
    state: Mutex<Estimate>,
    decay_ns: f64,
}

struct Estimate {
    /// The latency estimate in ns.
    rtt: f64,
    /// When `rtt` was last brought up to date.
    updated: Instant,
    /// When the endpoint last answered, or last went from idle to busy: while requests are in flight, the time
    /// since then is a lower bound on its latency.
    quiet_since: Instant,
}

impl Load {
    fn new(options: &BalanceOptions) -> Self {
        let now = Instant::now();
        Self {
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(Estimate {
                rtt: options.default_rtt.as_nanos() as f64,
                updated: now,
                quiet_since: now,
            }),
            decay_ns: options.decay.as_nanos().max(1) as f64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Estimate> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `estimate × (in flight + 1)`. The estimate decays toward zero while nothing updates it, so an endpoint that
    /// was slow is tried again in time; and it is at least the time a busy endpoint has gone without answering, so
    /// a new endpoint that turns out slow is avoided before its first answer arrives.
    fn cost(&self, now: Instant) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let mut state = self.lock();
        let elapsed = now.saturating_duration_since(state.updated).as_nanos() as f64;
        state.rtt *= (-elapsed / self.decay_ns).exp();
        state.updated = now;
        let mut rtt = state.rtt;
        if in_flight > 0 {
            rtt = rtt.max(now.saturating_duration_since(state.quiet_since).as_nanos() as f64);
        }
        rtt * (in_flight as f64 + 1.0)
    }

    fn dispatched(&self) {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.lock().quiet_since = Instant::now();
        }
    }

    fn observe(&self, rtt: std::time::Duration) {
        let rtt = rtt.as_nanos() as f64;
        let now = Instant::now();
        let mut state = self.lock();
        let elapsed = now.saturating_duration_since(state.updated).as_nanos() as f64;
        let kept = (-elapsed / self.decay_ns).exp();
        // Peak: a slower answer counts in full at once; faster ones pull the estimate down with recency.
        state.rtt = if rtt > state.rtt {
            rtt
        } else {
            state.rtt * kept + rtt * (1.0 - kept)
        };
        state.updated = now;
        state.quiet_since = now;
    }
}

/// Of two costs, the index (0 or 1) to use: the cheaper one, by a chance that grows with the gap. Costs within
/// noise of each other split the traffic instead of sending all of it to whichever measured a hair faster; a cost
/// twice the other is chosen one time in seventeen, twenty times the other practically never.
fn softer_choice(costs: [f64; 2], draw: f64) -> usize {
    let [a, b] = costs.map(|cost| cost.max(1.0));
    // Weights cost^-4, normalised: the chance of choosing `a` is b^4 / (a^4 + b^4).
    let ratio = (a / b).powi(4);
    usize::from(draw >= 1.0 / (1.0 + ratio))
}

/// Chooses endpoints by a [`Strategy`]; shared by every clone of the balanced service behind a mutex.
struct Picker<Req, S, F> {
    discovery: Pin<Box<Discovery>>,
    make: F,
    endpoints: Vec<Endpoint<S>>,
    strategy: Strategy<Req>,
    cursor: usize,
    options: BalanceOptions,
}

impl<Req, S, F> Picker<Req, S, F>
where
    F: Fn(&Instance) -> S,
{
    fn apply(&mut self, change: Change<String, Instance>) {
        match change {
            Change::Insert(id, instance) => {
                let endpoint = Endpoint {
                    id_hash: fnv(id.as_bytes()),
                    zone: instance.zone.clone(),
                    weight: instance.weight(),
                    current: 0.0,
                    service: (self.make)(&instance),
                    load: Arc::new(Load::new(&self.options)),
                    id,
                };
                match self
                    .endpoints
                    .iter_mut()
                    .find(|known| known.id == endpoint.id)
                {
                    Some(known) => *known = endpoint,
                    None => self.endpoints.push(endpoint),
                }
            }
            Change::Remove(id) => self.endpoints.retain(|known| known.id != id),
        }
    }

    /// Every endpoint index, the strategy's choice first and the fallbacks after it.
    fn rank(&mut self, request: &Req) -> Vec<usize> {
        let all: Vec<usize> = (0..self.endpoints.len()).collect();
        let mut cursor = self.cursor;
        let ranked = rank(
            &self.strategy,
            &mut self.endpoints,
            &all,
            request,
            &mut cursor,
        );
        self.cursor = cursor.wrapping_add(1);
        ranked
    }
}

fn rank<Req, S>(
    strategy: &Strategy<Req>,
    endpoints: &mut [Endpoint<S>],
    among: &[usize],
    request: &Req,
    cursor: &mut usize,
) -> Vec<usize> {
    let rotate = |start: usize| -> Vec<usize> {
        let start = start % among.len().max(1);
        among[start..]
            .iter()
            .chain(&among[..start])
            .copied()
            .collect()
    };
    if among.is_empty() {
        return Vec::new();
    }
    match strategy {
        Strategy::PeakEwma => {
            let mut ranked = rotate(rand::rng().random_range(0..among.len()));
            if ranked.len() > 1 {
                let other = rand::rng().random_range(1..ranked.len());
                ranked.swap(1, other);
                let now = Instant::now();
                let costs = [
                    endpoints[ranked[0]].load.cost(now),
                    endpoints[ranked[1]].load.cost(now),
                ];
                if softer_choice(costs, rand::rng().random::<f64>()) == 1 {
                    ranked.swap(0, 1);
                }
            }
            ranked
        }
        Strategy::RoundRobin => rotate(*cursor),
        Strategy::Random => rotate(rand::rng().random_range(0..among.len())),
        Strategy::LeastConnections => {
            let mut ranked = rotate(*cursor);
            // Stable: among equals, the round-robin order stays.
            ranked.sort_by_key(|index| endpoints[*index].load.in_flight.load(Ordering::Relaxed));
            ranked
        }
        Strategy::Weighted => {
            // Smooth weighted round robin (as nginx): every endpoint gains its weight, the richest is chosen
            // and pays the total. The rest follow by their standing.
            let total: f64 = among.iter().map(|index| endpoints[*index].weight).sum();
            for index in among {
                let endpoint = &mut endpoints[*index];
                endpoint.current += endpoint.weight;
            }
            let mut ranked = among.to_vec();
            ranked.sort_by(|a, b| endpoints[*b].current.total_cmp(&endpoints[*a].current));
            endpoints[ranked[0]].current -= total;
            ranked
        }
        Strategy::Hash(key) => match key(request) {
            Some(key) => {
                let mut scored: Vec<(u64, usize)> = among
                    .iter()
                    .map(|index| (mix(key ^ endpoints[*index].id_hash), *index))
                    .collect();
                scored.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
                scored.into_iter().map(|(_, index)| index).collect()
            }
            None => rotate(*cursor),
        },
        Strategy::ZonePreference { zone, then } => {
            let (near, far): (Vec<usize>, Vec<usize>) = among
                .iter()
                .partition(|index| endpoints[**index].zone.as_deref() == Some(zone.as_str()));
            let mut ranked = rank(then, endpoints, &near, request, cursor);
            ranked.extend(rank(then, endpoints, &far, request, cursor));
            ranked
        }
    }
}

impl<Req, S, F> Picker<Req, S, F>
where
    F: Fn(&Instance) -> S,
    S: Clone,
{
    /// Takes every change discovery has queued, then ranks the endpoints for `request`.
    fn candidates(&mut self, request: &Req) -> Vec<(S, Arc<Load>)> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Polled on every call rather than woken: changes wait in the channel until the next request needs them.
        while let Poll::Ready(Some(Ok(change))) = self.discovery.as_mut().poll_next(&mut cx) {
            self.apply(change);
        }
        self.rank(request)
            .into_iter()
            .map(|index| {
                let endpoint = &self.endpoints[index];
                (endpoint.service.clone(), endpoint.load.clone())
            })
            .collect()
    }
}

/// The shared picker: every clone of the balanced service ranks under one short lock and then awaits its chosen
/// endpoint on its own task, with no hop through a buffer task.
struct Shared<Req, S, F> {
    picker: Arc<Mutex<Picker<Req, S, F>>>,
    failfast: std::time::Duration,
}

impl<Req, S, F> Clone for Shared<Req, S, F> {
    fn clone(&self) -> Self {
        Self {
            picker: self.picker.clone(),
            failfast: self.failfast,
        }
    }
}

impl<Req, S, F> Service<Req> for Shared<Req, S, F>
where
    F: Fn(&Instance) -> S,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness belongs to the chosen endpoint and is awaited in the call, under the fail-fast timeout.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let candidates = self
            .picker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .candidates(&request);
        let failfast = self.failfast;
        Box::pin(async move {
            if candidates.is_empty() {
                // Let discovery's task run before the caller tries again: a caller that retries at once on a
                // current-thread runtime would otherwise never let the first poll of the registry happen.
                tokio::task::yield_now().await;
                return Err(NoEndpoints::new().into());
            }
            let (mut service, load) = first_ready(candidates, failfast).await?;
            load.dispatched();
            let _done = InFlight(load.clone());
            let sent = Instant::now();
            let response = service.call(request).await.map_err(Into::into);
            // Failures count too: an endpoint that fails slowly is slow.
            load.observe(sent.elapsed());
            response
        })
    }
}

struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The first candidate, in rank order, that is ready now; otherwise the first to become ready within `failfast`.
async fn first_ready<Req, S, T>(
    mut candidates: Vec<(S, T)>,
    failfast: std::time::Duration,
) -> Result<(S, T), BoxError>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    let ready = std::future::poll_fn(|cx| {
        let mut alive = false;
        for (index, (service, _)) in candidates.iter_mut().enumerate() {
            match service.poll_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Some(index)),
                // A failed endpoint is skipped (passive health reports it this way).
                Poll::Ready(Err(_)) => {}
                Poll::Pending => alive = true,
            }
        }
        if alive {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    });
    match tokio::time::timeout(failfast, ready).await {
        Ok(Some(index)) => Ok(candidates.swap_remove(index)),
        Ok(None) | Err(_) => Err(Unavailable::new().into()),
    }
}

/// Balances requests over the instances `discovery` finds, making one endpoint service per instance with `make`:
/// power of two choices over peak-EWMA latency ([`Strategy::PeakEwma`]), with fail-fast. Every clone shares one
/// picker and waits for its endpoint on its own task (no buffer task in between). Must be called inside a Tokio
/// runtime. For the other strategies, see [`balance_with`].
pub fn balance<Req, S, F>(
    discovery: Discovery,
    make: F,
    options: BalanceOptions,
) -> Balanced<Req, S::Response>
where
    Req: Send + 'static,
    F: Fn(&Instance) -> S + Send + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    balance_with(discovery, make, Strategy::PeakEwma, options)
}

/// Balances requests over the instances `discovery` finds with `strategy`, making one endpoint service per
/// instance with `make` (it must be `Clone`, as HTTP clients and tonic channels are). Fail-fast as in
/// [`balance`]: no instance is an immediate [`NoEndpoints`], no ready instance within
/// `options.failfast` is [`Unavailable`]. Must be called inside a Tokio runtime.
pub fn balance_with<Req, S, F>(
    discovery: Discovery,
    make: F,
    strategy: Strategy<Req>,
    options: BalanceOptions,
) -> Balanced<Req, S::Response>
where
    Req: Send + 'static,
    F: Fn(&Instance) -> S + Send + 'static,
    S: Service<Req> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Strategy<Req>: Send,
{
    let picker = Picker {
        discovery: Box::pin(discovery),
        make,
        endpoints: Vec::new(),
        strategy,
        cursor: 0,
        options,
    };
    BoxCloneSyncService::new(Shared {
        picker: Arc::new(Mutex::new(picker)),
        failfast: options.failfast,
    })
}

#[cfg(test)]
mod tests {
    use super::softer_choice;

    fn share_of_first(costs: [f64; 2]) -> f64 {
        let draws = 10_000;
        let first = (0..draws)
            .filter(|i| softer_choice(costs, (f64::from(*i) + 0.5) / f64::from(draws)) == 0)
            .count();
        first as f64 / f64::from(draws)
    }

    #[test]
    fn the_cheaper_endpoint_wins_by_a_margin_that_grows_with_the_gap() {
        assert!((share_of_first([1e6, 1e6]) - 0.5).abs() < 0.01);
        assert!((share_of_first([1e6, 2e6]) - 16.0 / 17.0).abs() < 0.01);
        assert!(share_of_first([1e6, 20e6]) > 0.9999);
        assert!(share_of_first([20e6, 1e6]) < 0.0001);
    }
}
