//! The breaker's state, and how it is packed into the one atomic word every call reads.
//!
//! Word layout (64 bits): state in bits 0–2, generation in bits 3–23, a time in milliseconds since the breaker was
//! built in bits 24–63 (when open: the end of the open period; when half-open: when the watchdog starts a fresh
//! cycle). Every transition bumps the generation, so a call admitted under one state can tell that the breaker has
//! moved on when it finishes, and its result is not counted in the new state.

use std::fmt;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum State {
    /// Calls go through and their outcomes are recorded.
    Closed,
    /// Calls are rejected until the open period ends.
    Open,
    /// A limited number of probe calls go through; their outcomes decide between closed and open.
    HalfOpen,
    /// Held open by hand ([`crate::CircuitBreaker::force_open`]) until released.
    ForcedOpen,
    /// Held closed by hand: calls go through and are recorded, but never trip the breaker.
    ForcedClosed,
    /// Switched off: calls go through and only the counters are kept.
    Disabled,
    /// Calls go through and are recorded; crossing a threshold is counted (`thresholds_crossed` in the stats) and
    /// logged at debug level, but rejects nothing. Useful to tune thresholds in production.
    MetricsOnly,
}

impl State {
    const ALL: [Self; 7] = [
        Self::Closed,
        Self::Open,
        Self::HalfOpen,
        Self::ForcedOpen,
        Self::ForcedClosed,
        Self::Disabled,
        Self::MetricsOnly,
    ];

    pub(crate) const COUNT: usize = Self::ALL.len();

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
            Self::ForcedOpen => 3,
            Self::ForcedClosed => 4,
            Self::Disabled => 5,
            Self::MetricsOnly => 6,
        }
    }

    /// The state's name in logs and metrics: `closed`, `open`, `half_open`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::ForcedClosed => "forced_closed",
            Self::Disabled => "disabled",
            Self::MetricsOnly => "metrics_only",
        }
    }

    /// Whether calls in this state are recorded in the window (and could trip a closed breaker).
    pub(crate) fn records_window(self) -> bool {
        matches!(self, Self::Closed | Self::ForcedClosed | Self::MetricsOnly)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const STATE_BITS: u32 = 3;
const GEN_BITS: u32 = 21;
pub(crate) const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
const TIME_SHIFT: u32 = STATE_BITS + GEN_BITS;
/// The largest time the word can hold: about 34 years of milliseconds.
pub(crate) const MAX_TIME_MS: u64 = (1 << (64 - TIME_SHIFT)) - 1;

/// The packed state word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word(pub(crate) u64);

impl Word {
    pub(crate) fn new(state: State, generation: u32, time_ms: u64) -> Self {
        let state = state.index() as u64;
        let generation = u64::from(generation & GEN_MASK) << STATE_BITS;
        Self(state | generation | (time_ms.min(MAX_TIME_MS) << TIME_SHIFT))
    }

    pub(crate) fn state(self) -> State {
        // The low bits always hold an index written by `new`.
        State::ALL[usize::try_from(self.0 & ((1 << STATE_BITS) - 1)).unwrap_or(0) % State::COUNT]
    }

    pub(crate) fn generation(self) -> u32 {
        u32::try_from((self.0 >> STATE_BITS) & u64::from(GEN_MASK)).unwrap_or(0)
    }

    pub(crate) fn time_ms(self) -> u64 {
        self.0 >> TIME_SHIFT
    }

    /// The word for the next state, one generation on.
    pub(crate) fn next(self, state: State, time_ms: u64) -> Self {
        Self::new(state, self.generation().wrapping_add(1), time_ms)
    }
}

// The half-open probe word: generation (21 bits), permits left, successes, failures, slow calls (10 bits each).
const PROBE_FIELD_BITS: u32 = 10;
const PROBE_FIELD_MASK: u64 = (1 << PROBE_FIELD_BITS) - 1;
const PERMITS_SHIFT: u32 = GEN_BITS;
const SUCCESS_SHIFT: u32 = PERMITS_SHIFT + PROBE_FIELD_BITS;
const FAILURE_SHIFT: u32 = SUCCESS_SHIFT + PROBE_FIELD_BITS;
const SLOW_SHIFT: u32 = FAILURE_SHIFT + PROBE_FIELD_BITS;

/// The half-open cycle's tally, packed so that taking a permit and recording a result are each one CAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probes(pub(crate) u64);

impl Probes {
    pub(crate) fn fresh(generation: u32, permits: u32) -> Self {
        Self(u64::from(generation & GEN_MASK) | (u64::from(permits) << PERMITS_SHIFT))
    }

    pub(crate) fn generation(self) -> u32 {
        u32::try_from(self.0 & u64::from(GEN_MASK)).unwrap_or(0)
    }

    fn field(self, shift: u32) -> u32 {
        u32::try_from((self.0 >> shift) & PROBE_FIELD_MASK).unwrap_or(0)
    }

    pub(crate) fn permits_left(self) -> u32 {
        self.field(PERMITS_SHIFT)
    }

    pub(crate) fn successes(self) -> u32 {
        self.field(SUCCESS_SHIFT)
    }

    pub(crate) fn failures(self) -> u32 {
        self.field(FAILURE_SHIFT)
    }

    pub(crate) fn slow(self) -> u32 {
        self.field(SLOW_SHIFT)
    }

    pub(crate) fn take_permit(self) -> Self {
        Self(self.0 - (1 << PERMITS_SHIFT))
    }

    pub(crate) fn return_permit(self) -> Self {
        Self(self.0 + (1 << PERMITS_SHIFT))
    }

    pub(crate) fn with_result(self, failure: bool, slow: bool) -> Self {
        let mut word = self.0
            + if failure {
                1 << FAILURE_SHIFT
            } else {
                1 << SUCCESS_SHIFT
            };
        if slow {
            word += 1 << SLOW_SHIFT;
        }
        Self(word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_round_trips_state_generation_and_time() {
        for state in State::ALL {
            let word = Word::new(state, 123_456, 987_654_321);
            assert_eq!(word.state(), state);
            assert_eq!(word.generation(), 123_456);
            assert_eq!(word.time_ms(), 987_654_321);
        }
        let wrapped = Word::new(State::Open, GEN_MASK, 5).next(State::HalfOpen, 6);
        assert_eq!(wrapped.generation(), 0);
        assert_eq!(wrapped.state(), State::HalfOpen);
    }

    #[test]
    fn the_probe_word_counts_permits_and_results() {
        let probes = Probes::fresh(42, 5).take_permit().take_permit();
        assert_eq!(probes.permits_left(), 3);
        let probes = probes
            .with_result(false, false)
            .with_result(true, true)
            .return_permit();
        assert_eq!(
            (
                probes.generation(),
                probes.permits_left(),
                probes.successes(),
                probes.failures(),
                probes.slow()
            ),
            (42, 4, 1, 1, 1)
        );
    }
}
