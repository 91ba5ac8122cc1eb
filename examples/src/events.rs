//! Live events: every user or order created or changed through any gateway, as Server-Sent Events on every
//! gateway's `GET /events`.
//!
//! With Redis, an event is written once to the stream `{REDIS_PREFIX}events` (`XADD ... MAXLEN ~ 1000`, then
//! `PEXPIRE` 24 h, in one transaction), and each gateway runs one reader (`XREAD BLOCK` on a connection of its own)
//! that fans the entries out to its clients through a `tokio::sync::broadcast`. The stream's ids are the SSE `id:`s,
//! so a client that reconnects with `Last-Event-ID` gets `XRANGE (id +` first, then the live feed, deduplicated by
//! id. Without Redis, events go through the broadcast alone, with the last 1000 kept in memory for `Last-Event-ID`.
//!
//! ```no_run
//! # async fn demo() {
//! let (_trigger, stop) = examples::lifecycle::stop_pair();
//! let events = examples::events::Events::new(None, "demo:", stop);
//! events.publish("user.created", &serde_json::json!({"id": "1"})).await;
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{self, KeepAlive, Sse};
use futures_util::Stream;
use redis::Value;
use tokio::sync::broadcast;
use tower_breaker::pubsub::Subscriber;

use crate::connection::{Redis, RedisConnection};
use crate::lifecycle::Stop;

/// How many recent events a reconnecting client can resume from (the stream's approximate `MAXLEN`, the memory
/// ring's size).
pub const WINDOW: usize = 1000;

/// The stream's expiry, renewed by every event: a quiet demo's stream disappears after a day.
pub const STREAM_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long one `XREAD BLOCK` waits before asking again.
const BLOCK: Duration = Duration::from_secs(5);

/// How many events a slow client may fall behind before it resynchronises from the stream or the ring.
const FANOUT_CAPACITY: usize = 256;

/// How often an idle SSE connection gets a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One event: its id (`<ms>-<seq>`, a stream id), type and JSON data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The SSE `id:`.
    pub id: String,
    /// The SSE `event:` (`user.created`, `user.updated`, `order.created`, `order.updated`).
    pub kind: String,
    /// The SSE `data:`: the record, as one line of JSON.
    pub data: String,
}

impl Event {
    fn position(&self) -> Option<(u64, u64)> {
        position(&self.id)
    }
}

/// A stream id as numbers, for ordering.
fn position(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The events of this gateway: publishing, and the feed of its SSE clients. Cloning is an `Arc` bump.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

struct Inner {
    fanout: broadcast::Sender<Event>,
    backend: Backend,
    stop: Stop,
}

enum Backend {
    Redis {
        connection: RedisConnection,
        key: String,
        timeout: Duration,
    },
    Memory(Mutex<Ring>),
}

struct Ring {
    /// When this process started, in ms since the epoch: the ids' first part, so that ids handed out after a restart
    /// sort after the ones a client may still hold (its `Last-Event-ID` would otherwise hide the new events).
    epoch: u64,
    next: u64,
    events: VecDeque<Event>,
}

impl Events {
    /// Events through Redis (and a reader started on this runtime), or in memory without it. The reader and every
    /// SSE stream end at `stop`.
    pub fn new(redis: Option<&Redis>, prefix: &str, stop: Stop) -> Self {
        let (fanout, _) = broadcast::channel(FANOUT_CAPACITY);
        let backend = match redis {
            Some(redis) => Backend::Redis {
                connection: redis.connection.clone(),
                key: format!("{prefix}events"),
                timeout: redis.command_timeout,
            },
            None => Backend::Memory(Mutex::new(Ring {
                epoch: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| {
                        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                    }),
                next: 0,
                events: VecDeque::new(),
            })),
        };
        let events = Self {
            inner: Arc::new(Inner {
                fanout,
                backend,
                stop,
            }),
        };
        if let Some(redis) = redis {
            tokio::spawn(read_stream(
                events.clone(),
                redis.subscriber.clone(),
                redis.connection.is_cluster(),
            ));
        }
        events
    }

    /// Publishes `kind` with `record` as its data: once to Redis (every gateway's reader delivers it), or to this
    /// process's clients. A failure is logged: the change itself has happened, only its event is lost.
    pub async fn publish(&self, kind: &str, record: &serde_json::Value) {
        let data = record.to_string();
        match &self.inner.backend {
            Backend::Redis {
                connection,
                key,
                timeout,
            } => {
                let mut connection = connection.clone();
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("XADD")
                    .arg(key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(WINDOW)
                    .arg("*")
                    .arg("type")
                    .arg(kind)
                    .arg("data")
                    .arg(&data)
                    .cmd("PEXPIRE")
                    .arg(key)
                    .arg(u64::try_from(STREAM_TTL.as_millis()).unwrap_or(u64::MAX))
                    .ignore();
                let written =
                    tokio::time::timeout(*timeout, pipe.query_async::<(String,)>(&mut connection))
                        .await;
                match written {
                    Ok(Ok((id,))) => tracing::debug!(%id, kind, "event published"),
                    Ok(Err(error)) => tracing::warn!(%error, kind, "event not published"),
                    Err(_) => {
                        tracing::warn!(kind, "event not published: Redis did not answer in time");
                    }
                }
            }
            Backend::Memory(ring) => {
                let Ok(mut ring) = ring.lock() else { return };
                ring.next += 1;
                let event = Event {
                    id: format!("{}-{}", ring.epoch, ring.next),
                    kind: kind.to_owned(),
                    data,
                };
                if ring.events.len() == WINDOW {
                    ring.events.pop_front();
                }
                ring.events.push_back(event.clone());
                // Sent under the lock, so that the feed and the ring agree on the order.
                let _ = self.inner.fanout.send(event);
            }
        }
    }

    /// What `/health` shows: where events go, and how many SSE clients this instance has.
    pub fn stats(&self) -> serde_json::Value {
        let backend = match &self.inner.backend {
            Backend::Redis { .. } => "redis-stream",
            Backend::Memory(_) => "memory",
        };
        serde_json::json!({
            "backend": backend,
            "clients": self.inner.fanout.receiver_count(),
        })
    }

    /// The retained events after `after` (exclusive), oldest first.
    async fn after(&self, after: &str) -> Result<Vec<Event>, String> {
        match &self.inner.backend {
            Backend::Redis {
                connection,
                key,
                timeout,
            } => {
                let mut connection = connection.clone();
                let mut command = redis::cmd("XRANGE");
                command
                    .arg(key)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(WINDOW * 2);
                let reply =
                    tokio::time::timeout(*timeout, command.query_async::<Value>(&mut connection))
                        .await
                        .map_err(|_| "Redis did not answer in time".to_owned())?
                        .map_err(|error| error.to_string())?;
                Ok(entries(&reply))
            }
            Backend::Memory(ring) => {
                let bound = position(after);
                let ring = ring
                    .lock()
                    .map_err(|_| "the event ring is poisoned".to_owned())?;
                Ok(ring
                    .events
                    .iter()
                    .filter(|event| event.position() > bound)
                    .cloned()
                    .collect())
            }
        }
    }

    /// The SSE response for a client that last saw `last_event_id`: the missed events, then the live ones.
    pub fn sse(
        &self,
        last_event_id: Option<String>,
    ) -> Sse<impl Stream<Item = Result<sse::Event, Infallible>> + use<>> {
        let feed = Feed {
            events: self.clone(),
            live: self.inner.fanout.subscribe(),
            pending: VecDeque::new(),
            last: last_event_id.filter(|id| position(id).is_some()),
            replay: true,
            done: false,
        };
        Sse::new(futures_util::stream::unfold(feed, Feed::next))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
    }
}

/// One SSE client's position in the feed.
struct Feed {
    events: Events,
    live: broadcast::Receiver<Event>,
    pending: VecDeque<Event>,
    /// The id of the last event this client got.
    last: Option<String>,
    /// Whether the missed events are still to be read.
    replay: bool,
    done: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<sse::Event, Infallible>, Self)> {
        if self.replay {
            self.replay = false;
            if let Some(last) = self.last.clone()
                && let Err(error) = self.catch_up(&last).await
            {
                return Some(self.close("events.unavailable", &error));
            }
        }
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                // Skip what the client already has (the replay and the live feed overlap).
                if self.last.as_deref().and_then(position) >= event.position() {
                    continue;
                }
                self.last = Some(event.id.clone());
                let message = sse::Event::default()
                    .id(event.id)
                    .event(event.kind)
                    .data(event.data);
                return Some((Ok(message), self));
            }
            let stop = self.events.inner.stop.clone();
            tokio::select! {
                () = stop.wait() => return None,
                received = self.live.recv() => match received {
                    Ok(event) => self.pending.push_back(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let Some(last) = self.last.clone() else {
                            let reason = format!("this client fell {missed} events behind; reconnect");
                            return Some(self.close("events.lagged", &reason));
                        };
                        tracing::debug!(missed, "a slow SSE client resynchronises");
                        if let Err(error) = self.catch_up(&last).await {
                            return Some(self.close("events.lagged", &error));
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Queues the retained events after `last`.
    async fn catch_up(&mut self, last: &str) -> Result<(), String> {
        let missed = self.events.after(last).await?;
        self.pending.extend(missed);
        Ok(())
    }

    /// A last event saying why the stream ends.
    fn close(mut self, kind: &str, reason: &str) -> (Result<sse::Event, Infallible>, Self) {
        self.done = true;
        let data = serde_json::json!({ "error": reason }).to_string();
        (Ok(sse::Event::default().event(kind).data(data)), self)
    }
}

/// This gateway's reader: `XREAD BLOCK` from the last id it saw, on a connection of its own (a blocking read would
/// hold up every command on the shared multiplexed connection), reconnecting with backoff. On a Cluster it polls
/// the shared cluster connection with `XREAD` without `BLOCK` instead.
async fn read_stream(events: Events, subscriber: Subscriber, cluster: bool) {
    let Backend::Redis {
        connection: shared,
        key,
        timeout,
    } = &events.inner.backend
    else {
        return;
    };
    let stop = events.inner.stop.clone();
    let read = async {
        // The first position is the newest entry (only what is written from now on is live); after a failure,
        // the reader goes on from the last id it saw, so that nothing written meanwhile is skipped.
        let mut last: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if last.is_none() {
                match newest(shared.clone(), key, *timeout).await {
                    Ok(id) => last = Some(id.unwrap_or_else(|| "0-0".to_owned())),
                    Err(error) => {
                        tracing::warn!(%error, retry_ms = backoff.as_millis(), "events reader: cannot read the stream");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let mut connection = if cluster {
                None
            } else {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(*timeout * 4))
                    .set_response_timeout(Some(BLOCK + *timeout * 4));
                let connected = async {
                    subscriber
                        .client()
                        .await?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                };
                match connected.await {
                    Ok(connection) => Some(connection),
                    Err(error) => {
                        tracing::warn!(%error, retry_ms = backoff.as_millis(), "events reader: cannot connect");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            };
            while let Some(from) = last.clone() {
                let mut command = redis::cmd("XREAD");
                command.arg("COUNT").arg(WINDOW);
                if connection.is_some() {
                    command
                        .arg("BLOCK")
                        .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(5000));
                }
                command.arg("STREAMS").arg(key).arg(&from);
                let reply = match connection.as_mut() {
                    Some(own) => {
                        tokio::time::timeout(BLOCK + *timeout * 4, command.query_async(own)).await
                    }
                    None => {
                        let mut shared = shared.clone();
                        tokio::time::timeout(*timeout, command.query_async(&mut shared)).await
                    }
                };
                let reply: Value = match reply {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, retry_ms = backoff.as_millis(), "events reader: XREAD failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(
                            retry_ms = backoff.as_millis(),
                            "events reader: XREAD did not answer in time"
                        );
                        break;
                    }
                };
                backoff = Duration::from_millis(100);
                for event in stream_entries(&reply) {
                    last = Some(event.id.clone());
                    let _ = events.inner.fanout.send(event);
                }
                if connection.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::select! {
        () = stop.wait() => {}
        () = read => {}
    }
}

/// The id of the stream's newest entry, if any.
async fn newest(
    mut connection: RedisConnection,
    key: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let mut command = redis::cmd("XREVRANGE");
    command.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
    let reply = tokio::time::timeout(timeout, command.query_async::<Value>(&mut connection))
        .await
        .map_err(|_| "Redis did not answer in time".to_owned())?
        .map_err(|error| error.to_string())?;
    Ok(entries(&reply).pop().map(|event| event.id))
}

/// The entries of an `XREAD` reply (RESP2 array or RESP3 map of one stream); nothing for a timeout (`nil`).
fn stream_entries(reply: &Value) -> Vec<Event> {
    match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|stream| match stream {
                Value::Array(pair) => pair.get(1).map(entries),
                _ => None,
            })
            .flatten()
            .collect(),
        Value::Map(streams) => streams
            .iter()
            .flat_map(|(_, stream)| entries(stream))
            .collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XRANGE` reply (an entry written by someone else, without `type` or `data`, still moves the
/// reader on: it becomes an empty `message`).
fn entries(reply: &Value) -> Vec<Event> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries.iter().filter_map(entry).collect()
}

fn entry(entry: &Value) -> Option<Event> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let id = text(parts.first()?)?;
    let fields: Vec<String> = match parts.get(1)? {
        Value::Array(fields) => fields.iter().filter_map(text).collect(),
        Value::Map(fields) => fields
            .iter()
            .flat_map(|(name, value)| [text(name), text(value)])
            .flatten()
            .collect(),
        _ => return None,
    };
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|pair| pair.first().map(String::as_str) == Some(name))
            .and_then(|pair| pair.get(1).cloned())
    };
    Some(Event {
        id,
        kind: field("type").unwrap_or_else(|| "message".to_owned()),
        data: field("data").unwrap_or_default(),
    })
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(position("2-0") > position("1-9"));
        assert!(position("1-10") > position("1-9"));
        assert_eq!(position("nonsense"), None);
    }

    fn feed(events: &Events) -> Feed {
        Feed {
            events: events.clone(),
            live: events.inner.fanout.subscribe(),
            pending: VecDeque::new(),
            last: None,
            replay: true,
            done: false,
        }
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_the_broadcast_catches_up_without_gaps() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        let mut slow = feed(&events);
        events
            .publish("user.created", &serde_json::json!({ "n": 0 }))
            .await;
        let Some((_, next)) = slow.next().await else {
            panic!("the first event did not arrive");
        };
        slow = next;
        let total = FANOUT_CAPACITY + 50;
        for n in 1..=total {
            events
                .publish("user.created", &serde_json::json!({ "n": n }))
                .await;
        }
        let all = events.after("0-0").await.unwrap_or_default();
        let mut delivered = Vec::new();
        while delivered.len() < total {
            let Some((_, next)) = slow.next().await else {
                panic!("the feed ended after {} events", delivered.len());
            };
            slow = next;
            delivered.push(slow.last.clone().unwrap_or_default());
        }
        let expected: Vec<String> = all[1..].iter().map(|event| event.id.clone()).collect();
        assert_eq!(delivered, expected);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_before_its_first_event_is_told_and_closed() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        let slow = feed(&events);
        for n in 0..=FANOUT_CAPACITY {
            events
                .publish("user.created", &serde_json::json!({ "n": n }))
                .await;
        }
        let Some((_, slow)) = slow.next().await else {
            panic!("no closing event");
        };
        assert!(slow.done);
        assert!(slow.next().await.is_none());
    }

    #[tokio::test]
    async fn the_memory_ring_replays_what_came_after_an_id() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        for n in 1..=3 {
            events
                .publish("user.created", &serde_json::json!({ "id": n }))
                .await;
        }
        let first = events.after("0-0").await.unwrap_or_default();
        assert_eq!(first.len(), 3);
        let after = events.after(&first[0].id).await.unwrap_or_default();
        let ids: Vec<&str> = after.iter().map(|event| event.id.as_str()).collect();
        assert_eq!(ids, [first[1].id.as_str(), first[2].id.as_str()]);
        assert_eq!(after[0].data, r#"{"id":2}"#);
    }
}
