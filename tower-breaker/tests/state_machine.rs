//! The breaker's state machine, without Tower: trip models, half-open admission, accounting, manual control.

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_breaker::{
    Backoff, BreakerStats, CallError, CircuitBreaker, ManualClock, Outcome, ProbePolicy,
    RejectReason, State, TransitionReason,
};

fn assert_accounting(stats: &BreakerStats) {
    assert_eq!(
        stats.requests,
        stats.successes + stats.failures + stats.ignored + stats.rejects,
        "requests must equal successes + failures + ignored + rejects at rest: {stats:#?}"
    );
}

/// Records `count` failures and returns after which one (1-based) the breaker opened, if it did.
fn failures_until_open(breaker: &CircuitBreaker, count: u32) -> Option<u32> {
    for n in 1..=count {
        breaker
            .try_acquire()
            .expect("closed breaker admits")
            .failure();
        if breaker.state() == State::Open {
            return Some(n);
        }
    }
    None
}

#[test]
fn a_count_window_opens_on_exactly_the_ceil_p_times_n_th_failure_after_any_history() {
    for (size, rate) in [
        (100u32, 0.5),
        (10, 0.3),
        (20, 0.25),
        (7, 0.5),
        (1000, 0.1),
        (50, 1.0),
        (3, 0.34),
    ] {
        let breaker = CircuitBreaker::builder()
            .count_window(size)
            .minimum_calls(size)
            .failure_rate(rate)
            .build()
            .unwrap();
        for _ in 0..10_000 {
            breaker.try_acquire().unwrap().success();
        }
        let expected = (rate * f64::from(size)).ceil() as u32;
        assert_eq!(
            failures_until_open(&breaker, size),
            Some(expected),
            "window {size} at {rate} should open on failure {expected}"
        );
    }
}

#[test]
fn a_breaker_built_for_the_life_of_the_process_behaves_the_same_and_its_clones_share_it() {
    let breaker = CircuitBreaker::builder()
        .count_window(10)
        .minimum_calls(10)
        .failure_rate(0.5)
        .build_static()
        .unwrap();
    let clone = breaker.clone();
    for _ in 0..100 {
        clone.try_acquire().unwrap().success();
    }
    assert_eq!(failures_until_open(&breaker, 10), Some(5));
    assert_eq!(clone.state(), State::Open);
    assert_accounting(&clone.stats());
}

/// A counted breaker's permits hold references of their thread's own: the state lives while any permit does, even
/// one taken on another thread after every handle is gone, and is freed with the last of them. A listener's
/// captured value shows when the state is dropped.
#[test]
fn a_counted_breaker_is_freed_with_its_last_handle_and_its_last_permit() {
    let token = Arc::new(());
    let captured = Arc::clone(&token);
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(3)
        .on_transition(move |_| {
            let _ = &captured;
        })
        .build()
        .unwrap();
    // Finished permits leave their reference in their thread's spare list, for the thread's next permit.
    let mut permits: Vec<_> = std::thread::scope(|scope| {
        (0..4)
            .map(|_| {
                scope.spawn(|| {
                    breaker.try_acquire().unwrap().success();
                    breaker.try_acquire().unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    });
    breaker.try_acquire().unwrap().success();
    permits.push(breaker.try_acquire().unwrap());
    drop(breaker);
    assert_eq!(Arc::strong_count(&token), 2, "freed while permits were out");
    let last = permits.pop().unwrap();
    for permit in permits {
        permit.failure();
    }
    assert_eq!(Arc::strong_count(&token), 2, "freed while a permit was out");
    last.success();
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "not freed after the last permit"
    );
}

/// A thread that finished a permit keeps its reference for its next permit, even once the breaker's handles are gone
/// elsewhere; the reference is let go of as soon as the thread's spare list fills up with other breakers'.
#[test]
fn a_dropped_breaker_lingers_in_another_thread_only_until_its_spare_list_fills_up() {
    let token = Arc::new(());
    let captured = Arc::clone(&token);
    let breaker = CircuitBreaker::builder()
        .on_transition(move |_| {
            let _ = &captured;
        })
        .build()
        .unwrap();
    let (to_worker, work) = std::sync::mpsc::channel::<CircuitBreaker>();
    let (to_main, done) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        for breaker in work {
            breaker.try_acquire().unwrap().success();
            drop(breaker);
            to_main.send(()).unwrap();
        }
    });
    to_worker.send(breaker.clone()).unwrap();
    done.recv().unwrap();
    drop(breaker);
    assert_eq!(
        Arc::strong_count(&token),
        2,
        "the worker's spare list keeps it"
    );
    let others: Vec<CircuitBreaker> = (0..8)
        .map(|_| CircuitBreaker::builder().build().unwrap())
        .collect();
    for (sent, other) in others.iter().enumerate() {
        assert_eq!(
            Arc::strong_count(&token),
            2,
            "let go of after {sent} others"
        );
        to_worker.send(other.clone()).unwrap();
        done.recv().unwrap();
    }
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "still kept by a full spare list"
    );
    drop(to_worker);
    worker.join().unwrap();
}

/// Each thread times calls into its own stripe; the summary adds them all up.
#[test]
fn the_latency_summary_counts_timed_calls_from_every_thread() {
    let breaker = CircuitBreaker::builder()
        .latency_sample_every(1)
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..250 {
                    breaker.try_acquire().unwrap().success();
                }
            });
        }
    });
    let permit = breaker.try_acquire().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    permit.success();
    let latency = breaker.stats().latency;
    assert_eq!(latency.samples, 1_001);
    assert!(latency.max_micros >= 3_000, "{latency:?}");
    assert!(latency.p50_micros < 3_000, "{latency:?}");
}

#[test]
fn only_the_last_n_calls_count() {
    let breaker = CircuitBreaker::builder()
        .count_window(10)
        .minimum_calls(10)
        .failure_rate(0.5)
        .build()
        .unwrap();
    // Four failures, then ten successes push them all out of the window.
    for _ in 0..4 {
        breaker.try_acquire().unwrap().failure();
    }
    for _ in 0..10 {
        breaker.try_acquire().unwrap().success();
    }
    assert_eq!(breaker.stats().window.failures, 0);
    assert_eq!(failures_until_open(&breaker, 10), Some(5));
}

#[test]
fn no_rate_trips_before_the_minimum_number_of_calls() {
    let breaker = CircuitBreaker::builder()
        .count_window(100)
        .minimum_calls(20)
        .failure_rate(0.5)
        .build()
        .unwrap();
    assert_eq!(failures_until_open(&breaker, 19), None);
    assert_eq!(breaker.stats().window.failure_rate, 1.0);
    assert_eq!(failures_until_open(&breaker, 1), Some(1));
}

#[test]
fn consecutive_failures_trip_whatever_the_window_says_and_a_success_resets_them() {
    let breaker = CircuitBreaker::builder()
        .no_failure_rate()
        .consecutive_failures(3)
        .build()
        .unwrap();
    breaker.try_acquire().unwrap().failure();
    breaker.try_acquire().unwrap().failure();
    breaker.try_acquire().unwrap().success();
    assert_eq!(breaker.stats().consecutive_failures, 0);
    breaker.try_acquire().unwrap().failure();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Closed);
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn ignored_outcomes_do_not_count_in_the_window() {
    let breaker = CircuitBreaker::builder()
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(0.5)
        .build()
        .unwrap();
    for _ in 0..100 {
        breaker.try_acquire().unwrap().ignore();
    }
    assert_eq!(breaker.stats().window.calls, 0);
    assert_eq!(breaker.stats().ignored, 100);
}

#[test]
fn a_slow_call_rate_trips_the_breaker() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .no_failure_rate()
        .slow_call_rate(0.5, Duration::from_millis(100))
        .count_window(4)
        .minimum_calls(4)
        .clock(clock.clone())
        .build()
        .unwrap();
    for slow in [false, true, false] {
        let permit = breaker.try_acquire().unwrap();
        if slow {
            clock.advance(Duration::from_millis(100));
        }
        permit.success();
    }
    assert_eq!(breaker.state(), State::Closed);
    let permit = breaker.try_acquire().unwrap();
    clock.advance(Duration::from_millis(150));
    permit.success();
    assert_eq!(breaker.state(), State::Open);
    let stats = breaker.stats();
    assert_eq!((stats.slow_calls, stats.successes), (2, 4));
}

/// A time window counts a success in its thread's stripe for the current bucket, and moves it to the shared bucket
/// when the thread records in a later one: successes count exactly while they are in the window, from every
/// thread, and leave it with their bucket.
#[test]
fn a_time_window_counts_successes_from_every_thread_until_their_bucket_leaves_it() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(1)
        .failure_rate(0.5)
        .clock(clock.clone())
        .build()
        .unwrap();
    let successes = |count: usize| {
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..count {
                        breaker.try_acquire().unwrap().success();
                    }
                });
            }
        });
        for _ in 0..count {
            breaker.try_acquire().unwrap().success();
        }
    };
    successes(10); // t = 0 s: 50 successes from 5 threads
    assert_eq!(breaker.stats().window.calls, 50);
    clock.advance(Duration::from_secs(5));
    successes(2); // t = 5 s: 10 more
    assert_eq!(breaker.stats().window.calls, 60);
    clock.advance(Duration::from_millis(5_500));
    // t = 10.5 s: the bucket of t = 0 s has left the window, the one of t = 5 s has not.
    assert_eq!(breaker.stats().window.calls, 10);
    clock.advance(Duration::from_secs(5));
    assert_eq!(breaker.stats().window.calls, 0);
    // Alone in the window, one failure is a 100 % failure rate.
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open);
    let stats = breaker.stats();
    assert_eq!((stats.successes, stats.failures), (60, 1));
    assert_accounting(&stats);
}

#[test]
fn a_time_window_forgets_failures_older_than_its_span() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(4)
        .failure_rate(0.5)
        .clock(clock.clone())
        .build()
        .unwrap();
    for _ in 0..3 {
        breaker.try_acquire().unwrap().failure();
    }
    // 10 s later the three failures have left the window (bucket [0 s, 1 s) is out at t = 10 s).
    clock.advance(Duration::from_secs(10));
    assert_eq!(breaker.stats().window.calls, 0);
    breaker.try_acquire().unwrap().success();
    breaker.try_acquire().unwrap().success();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(
        breaker.state(),
        State::Closed,
        "1 failure in 3 calls is below both thresholds"
    );
    breaker.try_acquire().unwrap().failure();
    assert_eq!(
        breaker.state(),
        State::Open,
        "2 failures in 4 calls reaches 50 %"
    );
}

fn tripped_breaker(clock: &ManualClock, permits: u32, policy: ProbePolicy) -> CircuitBreaker {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(5))
        .half_open_permits(permits)
        .probe_policy(policy)
        .half_open_max_wait(Duration::from_secs(30))
        .clock(clock.clone())
        .build()
        .unwrap();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open);
    breaker
}

#[test]
fn an_open_breaker_rejects_with_the_time_left_until_it_probes() {
    let clock = ManualClock::new();
    let breaker = tripped_breaker(&clock, 1, ProbePolicy::RateBelowThreshold);
    clock.advance(Duration::from_secs(2));
    let rejected = breaker.try_acquire().unwrap_err();
    assert_eq!(rejected.reason(), RejectReason::Open);
    assert_eq!(rejected.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(breaker.stats().retry_after_millis, Some(3_000));
    assert_eq!(breaker.retry_after(), Some(Duration::from_secs(3)));
}

#[test]
fn half_open_admits_exactly_the_permitted_probes_and_closes_when_they_succeed() {
    let clock = ManualClock::new();
    let breaker = tripped_breaker(&clock, 3, ProbePolicy::RateBelowThreshold);
    clock.advance(Duration::from_secs(5));
    let probes: Vec<_> = (0..3).map(|_| breaker.try_acquire().unwrap()).collect();
    assert!(probes.iter().all(tower_breaker::Permit::is_probe));
    assert_eq!(breaker.state(), State::HalfOpen);
    assert_eq!(
        breaker.try_acquire().unwrap_err().reason(),
        RejectReason::HalfOpenFull
    );
    for probe in probes {
        probe.success();
    }
    assert_eq!(breaker.state(), State::Closed);
    let stats = breaker.stats();
    assert_eq!(
        (
            stats.transitions.opened,
            stats.transitions.half_opened,
            stats.transitions.closed
        ),
        (1, 1, 1)
    );
    assert_accounting(&stats);
}

#[test]
fn a_failed_probe_reopens_the_breaker() {
    let clock = ManualClock::new();
    let breaker = tripped_breaker(&clock, 2, ProbePolicy::AllSucceed);
    clock.advance(Duration::from_secs(5));
    let first = breaker.try_acquire().unwrap();
    let second = breaker.try_acquire().unwrap();
    first.failure();
    assert_eq!(
        breaker.state(),
        State::Open,
        "one failure is enough under AllSucceed"
    );
    // The other probe's late result belongs to a finished cycle and changes nothing.
    second.success();
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn the_probe_failure_rate_decides_as_soon_as_the_outcome_is_certain() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .count_window(10)
        .minimum_calls(1)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(1))
        .half_open_permits(4)
        .clock(clock.clone())
        .build()
        .unwrap();
    breaker.try_acquire().unwrap().failure();
    clock.advance(Duration::from_secs(1));
    let probes: Vec<_> = (0..4).map(|_| breaker.try_acquire().unwrap()).collect();
    let mut probes = probes.into_iter();
    probes.next().unwrap().failure();
    assert_eq!(
        breaker.state(),
        State::HalfOpen,
        "1 of 4 failed: still undecided"
    );
    probes.next().unwrap().failure();
    assert_eq!(
        breaker.state(),
        State::Open,
        "2 of 4 is 50 %: reopens without waiting for the rest"
    );
}

#[test]
fn a_cancelled_probe_gives_its_permit_back() {
    let clock = ManualClock::new();
    let breaker = tripped_breaker(&clock, 1, ProbePolicy::RateBelowThreshold);
    clock.advance(Duration::from_secs(5));
    let probe = breaker.try_acquire().unwrap();
    assert!(breaker.try_acquire().is_err());
    drop(probe);
    let probe = breaker.try_acquire().expect("the permit came back");
    probe.success();
    assert_eq!(breaker.state(), State::Closed);
    let stats = breaker.stats();
    assert_eq!(stats.cancelled, 1);
    assert_accounting(&stats);
}

#[test]
fn the_watchdog_starts_a_fresh_cycle_when_probes_never_report() {
    let clock = ManualClock::new();
    let breaker = tripped_breaker(&clock, 1, ProbePolicy::RateBelowThreshold);
    clock.advance(Duration::from_secs(5));
    let hung = breaker.try_acquire().unwrap();
    clock.advance(Duration::from_secs(29));
    assert!(
        breaker.try_acquire().is_err(),
        "before the watchdog: no permit left"
    );
    clock.advance(Duration::from_secs(1));
    let fresh = breaker
        .try_acquire()
        .expect("the watchdog granted a fresh permit");
    assert_eq!(breaker.stats().transitions.half_opened, 2);
    // The hung probe's late failure belongs to the old cycle and decides nothing.
    hung.failure();
    assert_eq!(breaker.state(), State::HalfOpen);
    fresh.success();
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn results_of_calls_admitted_before_a_transition_are_not_counted_after_it() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .count_window(4)
        .minimum_calls(2)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(1))
        .half_open_permits(1)
        .clock(clock.clone())
        .build()
        .unwrap();
    let slow_calls: Vec<_> = (0..3).map(|_| breaker.try_acquire().unwrap()).collect();
    breaker.try_acquire().unwrap().failure();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open);
    clock.advance(Duration::from_secs(1));
    breaker.try_acquire().unwrap().success();
    assert_eq!(breaker.state(), State::Closed);
    // The three calls admitted in the first closed period fail now: they must not trip the new closed period.
    for call in slow_calls {
        call.failure();
    }
    let stats = breaker.stats();
    assert_eq!(stats.state, State::Closed);
    assert_eq!(stats.window.calls, 0);
    assert_eq!(stats.failures, 5);
    assert_accounting(&stats);
}

#[test]
fn a_backoff_lengthens_each_consecutive_opening_up_to_its_cap() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_backoff(Backoff {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(5),
            jitter: 0.0,
        })
        .half_open_permits(1)
        .clock(clock.clone())
        .build()
        .unwrap();
    let mut open_for = Vec::new();
    breaker.try_acquire().unwrap().failure();
    for _ in 0..4 {
        let retry_after = breaker.try_acquire().unwrap_err().retry_after().unwrap();
        open_for.push(retry_after.as_secs());
        clock.advance(retry_after);
        breaker.try_acquire().unwrap().failure(); // the probe fails: open again, longer
    }
    assert_eq!(open_for, vec![1, 2, 4, 5]);
    // A close resets the streak.
    let retry_after = breaker.try_acquire().unwrap_err().retry_after().unwrap();
    clock.advance(retry_after);
    breaker.try_acquire().unwrap().success();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn jitter_shortens_openings_by_at_most_its_fraction() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_backoff(Backoff {
            initial: Duration::from_secs(10),
            multiplier: 1.0,
            max: Duration::from_secs(10),
            jitter: 0.5,
        })
        .half_open_permits(1)
        .clock(clock.clone())
        .build()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    breaker.try_acquire().unwrap().failure();
    for _ in 0..50 {
        let retry_after = breaker.try_acquire().unwrap_err().retry_after().unwrap();
        assert!(
            (5_000..=10_000).contains(&retry_after.as_millis()),
            "{retry_after:?}"
        );
        seen.insert(retry_after.as_millis());
        clock.advance(retry_after);
        breaker.try_acquire().unwrap().failure();
    }
    assert!(
        seen.len() > 10,
        "jitter should spread the openings: {seen:?}"
    );
}

#[test]
fn manual_controls_override_the_state_until_reset() {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    breaker.force_open();
    assert_eq!(
        breaker.try_acquire().unwrap_err().reason(),
        RejectReason::ForcedOpen
    );

    breaker.force_closed();
    for _ in 0..5 {
        breaker.try_acquire().unwrap().failure();
    }
    assert_eq!(breaker.state(), State::ForcedClosed);
    assert_eq!(breaker.stats().thresholds_crossed, 5);

    breaker.metrics_only();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::MetricsOnly);

    breaker.disable();
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Disabled);

    breaker.reset();
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.stats().window.calls, 0);
    breaker.try_acquire().unwrap().failure();
    assert_eq!(breaker.state(), State::Open);
    let stats = breaker.stats();
    assert_eq!(stats.transitions.forced_open, 1);
    assert_eq!(stats.transitions.closed, 1);
    assert_accounting(&stats);
}

#[test]
fn listeners_see_every_transition_with_its_reason() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .name("orders")
        .consecutive_failures(2)
        .open_for(Duration::from_secs(1))
        .half_open_permits(1)
        .clock(clock.clone())
        .on_transition({
            let seen = seen.clone();
            move |transition| seen.lock().unwrap().push(transition.clone())
        })
        .build()
        .unwrap();
    breaker.try_acquire().unwrap().failure();
    breaker.try_acquire().unwrap().failure();
    clock.advance(Duration::from_secs(1));
    breaker.try_acquire().unwrap().success();
    let seen = seen.lock().unwrap();
    let steps: Vec<_> = seen.iter().map(|t| (t.from, t.to, t.reason)).collect();
    assert_eq!(
        steps,
        vec![
            (
                State::Closed,
                State::Open,
                TransitionReason::ConsecutiveFailures { count: 2 }
            ),
            (State::Open, State::HalfOpen, TransitionReason::OpenElapsed),
            (
                State::HalfOpen,
                State::Closed,
                TransitionReason::ProbesSucceeded
            ),
        ]
    );
    assert_eq!(seen[0].breaker, "orders");
    assert_eq!(seen[0].open_for_millis, Some(1_000));
}

#[tokio::test]
async fn call_counts_ok_as_success_err_as_failure_and_a_timeout_as_both_failure_and_timeout() {
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(10)
        .call_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let ok: Result<u8, CallError<&str>> = breaker.call(async { Ok(1) }).await;
    assert_eq!(ok.unwrap(), 1);
    let err: Result<u8, CallError<&str>> = breaker.call(async { Err("boom") }).await;
    assert!(matches!(err, Err(CallError::Inner("boom"))));
    let slow: Result<u8, CallError<&str>> = breaker
        .call(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(2)
        })
        .await;
    assert!(matches!(slow, Err(CallError::Timeout(_))));
    let ignored: Result<u8, CallError<&str>> = breaker
        .call_classified(async { Err("not found") }, |_| Outcome::Ignored)
        .await;
    assert!(ignored.is_err());
    let stats = breaker.stats();
    assert_eq!(
        (
            stats.successes,
            stats.failures,
            stats.timeouts,
            stats.ignored
        ),
        (1, 2, 1, 1)
    );
    breaker.force_open();
    let rejected: Result<u8, CallError<&str>> = breaker.call(async { Ok(3) }).await;
    assert!(matches!(rejected, Err(CallError::Rejected(_))));
    assert_accounting(&breaker.stats());
}

/// 64 tasks race through thousands of open → half-open → closed/open cycles, holding probes across a yield so they
/// overlap. In no cycle are more than `half_open_permits` probes outstanding at once (a cancelled or ignored probe
/// gives its permit back, so it may be re-granted), the breaker never stays stuck half-open, and the accounting
/// balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_never_over_admit_probes_and_never_get_stuck_half_open() {
    const PERMITS: u32 = 3;
    const CYCLES: u64 = 3_000;
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_millis(1))
        .half_open_permits(PERMITS)
        .half_open_max_wait(Duration::from_millis(50))
        .clock(clock.clone())
        .build()
        .unwrap();
    // generation -> (outstanding probes, most outstanding at once)
    let outstanding = Arc::new(Mutex::new(HashMap::<u32, (u32, u32)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let (breaker, outstanding, stop) = (breaker.clone(), outstanding.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = task;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if let Ok(permit) = breaker.try_acquire() {
                    let probe = permit.is_probe().then(|| permit.generation());
                    if let Some(generation) = probe {
                        let mut map = outstanding.lock().unwrap();
                        let entry = map.entry(generation).or_default();
                        entry.0 += 1;
                        entry.1 = entry.1.max(entry.0);
                    }
                    tokio::task::yield_now().await;
                    if let Some(generation) = probe {
                        // Decrement before reporting: the report may free the permit for another task.
                        outstanding.lock().unwrap().entry(generation).or_default().0 -= 1;
                    }
                    match (n >> 33) % 8 {
                        0 | 1 => permit.failure(),
                        2 => drop(permit), // cancelled
                        3 => permit.ignore(),
                        _ => permit.success(),
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut last_cycles = 0;
    let mut idle_rounds = 0;
    while breaker.stats().transitions.half_opened < CYCLES {
        clock.advance(Duration::from_millis(1));
        tokio::time::sleep(Duration::from_micros(100)).await;
        let cycles = breaker.stats().transitions.half_opened;
        if cycles == last_cycles {
            idle_rounds += 1;
            assert!(
                idle_rounds < 20_000,
                "no progress: stuck in {:?}",
                breaker.state()
            );
        } else {
            idle_rounds = 0;
            last_cycles = cycles;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let stats = breaker.stats();
    let map = outstanding.lock().unwrap();
    let most = map.values().map(|(_, most)| *most).max().unwrap_or(0);
    assert_eq!(
        most, PERMITS,
        "the most probes outstanding in one cycle must be exactly the permits"
    );
    assert!(
        map.len() as u64 >= CYCLES,
        "probes ran in {} cycles",
        map.len()
    );
    assert!(
        stats.transitions.closed > 0 && stats.transitions.opened > CYCLES / 2,
        "{stats:#?}"
    );
    assert!(stats.cancelled > 0);
    assert_accounting(&stats);
}
