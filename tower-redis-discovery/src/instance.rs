//! A service instance as HazelJS's discovery registry stores it: the same JSON, field for field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An instance's status, as HazelJS writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Ready for traffic.
    Up,
    /// Failing its checks.
    Down,
    /// Registered, not ready yet.
    Starting,
    /// Draining before a shutdown: no new traffic.
    OutOfService,
    /// Unknown (also any status string this crate does not know).
    #[serde(other)]
    Unknown,
}

/// How to reach an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Plain HTTP (the default, also when the field is missing).
    #[default]
    Http,
    /// HTTPS.
    Https,
    /// gRPC (HTTP/2).
    Grpc,
}

impl Protocol {
    /// The URI scheme to call it with (`grpc` instances are called over `http`).
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Http | Self::Grpc => "http",
            Self::Https => "https",
        }
    }
}

fn default_health_check_path() -> String {
    "/health".to_owned()
}

fn default_health_check_interval() -> u64 {
    30_000
}

/// HazelJS takes any positive number of milliseconds (`healthCheckInterval: 750.5` is valid there and is written as
/// is); read the nearest whole millisecond instead of rejecting the whole entry. Not a non-negative number: the default.
fn lenient_millis<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    Ok(number
        .as_u64()
        .or_else(|| {
            number
                .as_f64()
                .filter(|millis| millis.is_finite() && *millis >= 0.0)
                .map(|millis| millis.round() as u64)
        })
        .unwrap_or_else(default_health_check_interval))
}

/// One registered instance. Serialized exactly as HazelJS's `ServiceInstance` (field names, types, order,
/// ISO-8601 timestamps with milliseconds, `zone` left out when unset). Fields this crate does not know are kept in
/// `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// `{name}:{host}:{port}:{epoch_ms}`, as HazelJS makes it.
    pub id: String,
    /// The service name.
    pub name: String,
    /// An address peers can reach.
    pub host: String,
    /// The port.
    pub port: u16,
    /// How to call it.
    #[serde(default)]
    pub protocol: Protocol,
    /// Free-form metadata; `weight` (a number) drives weighted balancing.
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// The health endpoint HazelJS probes.
    #[serde(default = "default_health_check_path")]
    pub health_check_path: String,
    /// The heartbeat period HazelJS uses, in milliseconds (a fractional value HazelJS wrote is rounded).
    #[serde(
        default = "default_health_check_interval",
        deserialize_with = "lenient_millis"
    )]
    pub health_check_interval: u64,
    /// The zone, if any (left out of the JSON when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The status.
    #[serde(default = "unknown_status")]
    pub status: Status,
    /// The last heartbeat, `YYYY-MM-DDTHH:MM:SS.sssZ`.
    #[serde(default)]
    pub last_heartbeat: String,
    /// When it registered, same format.
    #[serde(default)]
    pub registered_at: String,
    /// Fields written by someone else that this crate does not know; kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn unknown_status() -> Status {
    Status::Unknown
}

impl Instance {
    /// A new instance of `name` at `host:port`, with HazelJS's defaults and id format, status `STARTING`.
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        let name = name.into();
        let host = host.into();
        let now = SystemTime::now();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis());
        let stamp = iso8601(now);
        Self {
            id: format!("{name}:{host}:{port}:{millis}"),
            name,
            host,
            port,
            protocol: Protocol::Http,
            metadata: Map::new(),
            health_check_path: default_health_check_path(),
            health_check_interval: default_health_check_interval(),
            zone: None,
            tags: Vec::new(),
            status: Status::Starting,
            last_heartbeat: stamp.clone(),
            registered_at: stamp,
            extra: Map::new(),
        }
    }

    /// The instance's base URI, `{scheme}://{host}:{port}`.
    pub fn base_uri(&self) -> String {
        format!("{}://{}:{}", self.protocol.scheme(), self.host, self.port)
    }

    /// `metadata.weight` when it is a positive number, else 1.
    pub fn weight(&self) -> f64 {
        self.metadata
            .get("weight")
            .and_then(Value::as_f64)
            .filter(|weight| *weight > 0.0 && weight.is_finite())
            .unwrap_or(1.0)
    }
}

/// `time` as `YYYY-MM-DDTHH:MM:SS.sssZ` (JavaScript's `Date.toISOString`).
pub fn iso8601(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let seconds = since.as_secs();
    let millis = since.subsec_millis();
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let rest = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3_600,
        (rest % 3_600) / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_javascripts_to_iso_string() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-11-22T01:26:47.941Z, from the captured HazelJS value.
        let time = UNIX_EPOCH + Duration::from_millis(1_795_310_807_941);
        assert_eq!(iso8601(time), "2026-11-22T01:26:47.941Z");
        // A leap day.
        let time = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(iso8601(time), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_hazeljs_instance_round_trips_with_its_fields_in_order() {
        let captured = r#"{"id":"user-service:127.0.0.1:3101:1795310805903","name":"user-service","host":"127.0.0.1","port":3101,"protocol":"http","metadata":{"version":"1.0.0","weight":2},"healthCheckPath":"/health","healthCheckInterval":2000,"zone":"us-east-1","tags":["api","users"],"status":"UP","lastHeartbeat":"2026-11-22T01:26:47.941Z","registeredAt":"2026-11-22T01:26:45.903Z"}"#;
        let instance: Instance = serde_json::from_str(captured).unwrap();
        assert_eq!(instance.status, Status::Up);
        assert!((instance.weight() - 2.0).abs() < f64::EPSILON);
        assert_eq!(serde_json::to_string(&instance).unwrap(), captured);
    }

    #[test]
    fn missing_optional_fields_get_hazeljs_defaults_and_unknown_ones_survive() {
        let sparse = r#"{"id":"a:h:1:2","name":"a","host":"h","port":1,"status":"DRAINING","custom":{"x":1}}"#;
        let instance: Instance = serde_json::from_str(sparse).unwrap();
        assert_eq!(instance.protocol, Protocol::Http);
        assert_eq!(instance.status, Status::Unknown);
        assert_eq!(instance.health_check_path, "/health");
        assert_eq!(instance.zone, None);
        let written = serde_json::to_string(&instance).unwrap();
        assert!(written.contains(r#""custom":{"x":1}"#), "{written}");
        assert!(
            !written.contains("zone"),
            "an unset zone is left out: {written}"
        );
    }

    #[test]
    fn a_fractional_health_check_interval_from_hazeljs_does_not_reject_the_entry() {
        let written_by_hazeljs = r#"{"id":"f:127.0.0.1:1:2","name":"f","host":"127.0.0.1","port":1,"protocol":"http","metadata":{},"healthCheckPath":"/health","healthCheckInterval":750.5,"tags":[],"status":"UP","lastHeartbeat":"2026-11-22T04:59:13.975Z","registeredAt":"2026-11-22T04:59:13.191Z"}"#;
        let instance: Instance = serde_json::from_str(written_by_hazeljs).unwrap();
        assert_eq!(instance.health_check_interval, 751);
        assert_eq!(instance.status, Status::Up);
        let negative = written_by_hazeljs.replace("750.5", "-1");
        let instance: Instance = serde_json::from_str(&negative).unwrap();
        assert_eq!(instance.health_check_interval, 30_000);
        let huge = written_by_hazeljs.replace("750.5", "18446744073709551615");
        let instance: Instance = serde_json::from_str(&huge).unwrap();
        assert_eq!(instance.health_check_interval, u64::MAX);
    }

    #[test]
    fn a_new_instance_uses_hazeljs_id_format_and_starts_starting() {
        let instance = Instance::new("orders", "10.0.0.5", 3002);
        assert!(instance.id.starts_with("orders:10.0.0.5:3002:"));
        assert_eq!(instance.status, Status::Starting);
        assert_eq!(instance.base_uri(), "http://10.0.0.5:3002");
        assert_eq!(
            instance.last_heartbeat.len(),
            "2026-11-22T01:26:47.941Z".len()
        );
    }
}
