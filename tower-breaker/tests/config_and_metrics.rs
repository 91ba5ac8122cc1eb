//! Configuration from files (feature `serde`) and export through the `metrics` facade (feature `metrics`).

#![allow(clippy::unwrap_used)] // tests fail loudly on a broken fixture

#[cfg(feature = "serde")]
mod serde_config {
    use std::time::Duration;

    use tower_breaker::{Backoff, BreakerConfig, CircuitBreaker, OpenDuration, Window};

    #[test]
    fn a_configuration_file_with_human_durations_builds_a_breaker() {
        let json = r#"{
            "name": "payments",
            "window": { "time": { "duration": "10s", "buckets": 10 } },
            "minimum_calls": 5,
            "failure_rate_threshold": 0.25,
            "open_duration": { "backoff": { "initial": "500ms", "multiplier": 2.0, "max": "1m", "jitter": 0.1 } },
            "call_timeout": 750
        }"#;
        let config: BreakerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            config.window,
            Window::Time {
                duration: Duration::from_secs(10),
                buckets: 10
            }
        );
        assert_eq!(
            config.open_duration,
            OpenDuration::Backoff(Backoff {
                initial: Duration::from_millis(500),
                multiplier: 2.0,
                max: Duration::from_secs(60),
                jitter: 0.1
            })
        );
        assert_eq!(config.call_timeout, Some(Duration::from_millis(750)));
        assert_eq!(
            config.half_open_permits,
            BreakerConfig::default().half_open_permits
        );
        let breaker = CircuitBreaker::from_config(config).unwrap();
        assert_eq!(breaker.name(), "payments");
    }

    #[test]
    fn a_bad_value_in_a_file_is_refused_with_the_setting_named() {
        let unknown: Result<BreakerConfig, _> = serde_json::from_str(r#"{ "failure_rate": 0.5 }"#);
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("unknown field `failure_rate`")
        );
        let duration: Result<BreakerConfig, _> =
            serde_json::from_str(r#"{ "slow_call_duration": "5 parsecs" }"#);
        assert!(duration.unwrap_err().to_string().contains("not a duration"));
        let config: BreakerConfig =
            serde_json::from_str(r#"{ "failure_rate_threshold": 50 }"#).unwrap();
        let error = CircuitBreaker::from_config(config).unwrap_err();
        assert_eq!(error.field(), "failure_rate_threshold");
    }
}

#[cfg(feature = "metrics")]
mod metrics_export {
    use metrics_util::debugging::DebuggingRecorder;
    use tower_breaker::CircuitBreaker;

    #[test]
    fn counters_and_the_state_gauge_are_exported_with_the_breaker_label() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let breaker = metrics::with_local_recorder(&recorder, || {
            CircuitBreaker::builder()
                .name("exported")
                .consecutive_failures(2)
                .build()
                .unwrap()
        });
        breaker.try_acquire().unwrap().success();
        breaker.try_acquire().unwrap().failure();
        breaker.try_acquire().unwrap().failure();
        assert!(breaker.try_acquire().is_err());

        let snapshot = snapshotter.snapshot().into_vec();
        let value = |name: &str, labels: &[(&str, &str)]| -> Option<String> {
            for (key, _, _, value) in &snapshot {
                let key = key.key();
                let matches = key.name() == name
                    && labels.iter().all(|(k, v)| {
                        key.labels()
                            .any(|label| label.key() == *k && label.value() == *v)
                    });
                if matches {
                    return Some(format!("{value:?}"));
                }
            }
            None
        };
        let breaker_label = ("breaker", "exported");
        assert_eq!(
            value("tower_breaker_requests_total", &[breaker_label]),
            Some("Counter(4)".to_owned())
        );
        assert_eq!(
            value(
                "tower_breaker_calls_total",
                &[breaker_label, ("outcome", "failure")]
            ),
            Some("Counter(2)".to_owned())
        );
        assert_eq!(
            value(
                "tower_breaker_calls_total",
                &[breaker_label, ("outcome", "success")]
            ),
            Some("Counter(1)".to_owned())
        );
        assert_eq!(
            value("tower_breaker_rejects_total", &[breaker_label]),
            Some("Counter(1)".to_owned())
        );
        assert_eq!(
            value(
                "tower_breaker_transitions_total",
                &[breaker_label, ("to", "open")]
            ),
            Some("Counter(1)".to_owned())
        );
        assert_eq!(
            value("tower_breaker_state", &[breaker_label]),
            Some("Gauge(1.0)".to_owned()),
            "1 = open"
        );
    }
}
