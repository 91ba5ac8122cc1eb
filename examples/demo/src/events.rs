//! Live events: every user or order created or changed through any gateway, as Server-Sent Events on every
//! gateway's `GET /events`.
//!
//! With Redis, an event is written once to the stream `{REDIS_PREFIX}events` (`XADD ... MAXLEN ~ 1000`, then
//! `PEXPIRE` 24 h, in one script that also records in the entry the id of the entry before it, `prev`), and each
//! gateway runs one reader (`XREAD BLOCK` on a connection of its own) that fans the entries out to its clients
//! through a `tokio::sync::broadcast`. The stream's ids are the SSE `id:`s, so a client that reconnects with
//! `Last-Event-ID` gets the entries after that id first, then the live feed, deduplicated by id. Without Redis,
//! events go through the broadcast alone, with the last 1000 kept in memory for `Last-Event-ID`.
//!
//! # Resuming, and the `events.reset` event
//!
//! A `Last-Event-ID` resumes without a notice exactly when nothing published after it is gone: it is not newer
//! than the newest event, and it is at least the id of the last event dropped from the window (the oldest retained
//! entry's `prev`; in memory, the last event the ring evicted), or `0-0` ("from the beginning") when nothing was
//! ever dropped. Otherwise the client first gets
//!
//! ```text
//! event: events.reset
//! id: <the last dropped id, or 0-0>
//! data: {"reason":"beyond-window","last_event_id":"<what it sent>","oldest":"<oldest retained id, or null>"}
//! ```
//!
//! then every retained event and the live feed, and should fetch the state afresh. `reason` is `beyond-window`
//! (events after that id were trimmed, or evicted from the ring), `unknown-id` (a well-formed id this stream never
//! issued: older than its first entry, as after it expired or Redis was emptied, newer than its newest, or from
//! another process's ring), `invalid-id` (not a stream id `<ms>-<seq>` or `<ms>`; an empty header counts as none),
//! or `lagged` (a connected client fell so far behind that events went out of the window before it caught up).
//! The reset's `id:` is where its replay starts, so a client that reconnects with it resumes without a second reset
//! unless the window moved past it meanwhile.
//!
//! ```no_run
//! # async fn demo() {
//! let (_trigger, stop) = demo::lifecycle::stop_pair();
//! let events = demo::events::Events::new(None, "demo:", stop);
//! events.publish("user.created", &serde_json::json!({"id": "1"})).await;
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::LazyLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{self, KeepAlive, Sse};
use futures_util::Stream;
use redis::Value;
use tokio::sync::broadcast;
use tower_redis_core::Subscriber;

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
    /// The id of the last event evicted, if any was.
    evicted: Option<String>,
}

/// Publishes one event, atomically: records the id of the newest entry (`0-0` in a new stream) as the new entry's
/// `prev`, adds it with approximate trimming, and renews the expiry. Returns the new id. `KEYS[1]` the stream;
/// `ARGV` the `MAXLEN`, type, data and expiry in ms.
/// Sent with `EVALSHA` (the text goes out once per connection, on a `NOSCRIPT`).
static PUBLISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if top[1] then prev = top[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3], 'prev', prev)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return id
",
    )
});

/// What the stream or the ring held at one instant, for deciding whether a client resumes without a gap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Window {
    /// The oldest retained event's id, and the id of the event before it: `0-0` when none came before it, `None`
    /// when unknown (an entry written without `prev`).
    oldest: Option<(String, Option<String>)>,
    /// The newest event's id.
    newest: Option<String>,
}

impl Window {
    /// The id of the last event dropped before the oldest retained one (`0-0`: none was, or it is unknown): the
    /// position a reset replays from.
    fn dropped(&self) -> String {
        self.oldest
            .as_ref()
            .and_then(|(_, before)| before.as_deref())
            .and_then(position)
            .map_or_else(|| "0-0".to_owned(), |(ms, seq)| format!("{ms}-{seq}"))
    }
}

/// Why a client whose last event was `cursor` (`None`: its `Last-Event-ID` is not a stream id) cannot resume from
/// it without a gap; `None` when it can: every event published after `cursor` is still retained.
fn gap(cursor: Option<(u64, u64)>, window: &Window) -> Option<&'static str> {
    let Some(cursor) = cursor else {
        return Some("invalid-id");
    };
    let from_the_start = cursor == (0, 0);
    let (Some((oldest, before)), Some(newest)) = (&window.oldest, &window.newest) else {
        // Nothing retained (the stream expired or Redis was emptied; a fresh ring): only "from the beginning"
        // misses nothing.
        return (!from_the_start).then_some("unknown-id");
    };
    if Some(cursor) > position(newest) {
        return Some("unknown-id");
    }
    if Some(cursor) >= position(oldest) {
        return None;
    }
    match before.as_deref().and_then(position) {
        // The oldest entry is the first this stream (or ring) ever had: an older id is from before it began.
        Some((0, 0)) => (!from_the_start).then_some("unknown-id"),
        // Trimming drops the oldest entries only: nothing after `cursor` was dropped.
        Some(dropped) if cursor >= dropped => None,
        // Something after `cursor` was dropped (or, without `prev`, it cannot be told that nothing was).
        _ => Some("beyond-window"),
    }
}

/// What a client gets before the live feed.
#[derive(Debug)]
struct Replay {
    /// Why it must start afresh, if it must.
    reset: Option<Reset>,
    /// The id the replay starts after (the deduplication cursor).
    cursor: String,
    /// The events after `cursor`, oldest first.
    events: Vec<Event>,
}

#[derive(Debug, PartialEq, Eq)]
struct Reset {
    reason: &'static str,
    /// The oldest retained id.
    oldest: Option<String>,
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
                evicted: None,
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
                let mut invocation = PUBLISH.key(key);
                invocation
                    .arg(WINDOW)
                    .arg(kind)
                    .arg(&data)
                    .arg(u64::try_from(STREAM_TTL.as_millis()).unwrap_or(u64::MAX));
                let written = tokio::time::timeout(
                    *timeout,
                    invocation.invoke_async::<String>(&mut connection),
                )
                .await;
                match written {
                    Ok(Ok(id)) => tracing::debug!(%id, kind, "event published"),
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
                if ring.events.len() == WINDOW
                    && let Some(evicted) = ring.events.pop_front()
                {
                    ring.evicted = Some(evicted.id);
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

    /// What a client that last saw `last` gets before the live feed: the retained events after it, or, when some
    /// event published after it is gone or `last` cannot be placed, a reset and every retained event.
    async fn replay(&self, last: &str) -> Result<Replay, String> {
        let cursor = position(last);
        let (mut window, mut events) = self.read(cursor).await?;
        let Some(reason) = gap(cursor, &window) else {
            let cursor = cursor.map_or_else(String::new, |(ms, seq)| format!("{ms}-{seq}"));
            return Ok(Replay {
                reset: None,
                cursor,
                events,
            });
        };
        let oldest = |window: &Window| window.oldest.as_ref().map(|(id, _)| id.clone());
        if events.first().map(|event| event.id.clone()) != oldest(&window) {
            // `last` is newer than the newest event: read everything.
            (window, events) = self.read(None).await?;
        }
        Ok(Replay {
            reset: Some(Reset {
                reason,
                oldest: oldest(&window),
            }),
            cursor: window.dropped(),
            events,
        })
    }

    /// The window, and the retained events after `after` (exclusive; all of them for `None`), oldest first, at one
    /// instant.
    async fn read(&self, after: Option<(u64, u64)>) -> Result<(Window, Vec<Event>), String> {
        match &self.inner.backend {
            Backend::Redis {
                connection,
                key,
                timeout,
            } => read_stream_window(connection.clone(), key, *timeout, after).await,
            Backend::Memory(ring) => {
                let ring = ring
                    .lock()
                    .map_err(|_| "the event ring is poisoned".to_owned())?;
                let window = Window {
                    oldest: ring.events.front().map(|event| {
                        let before = ring.evicted.clone().unwrap_or_else(|| "0-0".to_owned());
                        (event.id.clone(), Some(before))
                    }),
                    newest: ring.events.back().map(|event| event.id.clone()),
                };
                let events = ring
                    .events
                    .iter()
                    .filter(|event| after.is_none() || event.position() > after)
                    .cloned()
                    .collect();
                Ok((window, events))
            }
        }
    }

    /// The SSE response for a client that last saw `last_event_id`: the missed events, then the live ones; an
    /// `events.reset` first when some of them are gone (see the module's documentation).
    pub fn sse(
        &self,
        last_event_id: Option<String>,
    ) -> Sse<impl Stream<Item = Result<sse::Event, Infallible>> + use<>> {
        let feed = Feed {
            events: self.clone(),
            live: self.inner.fanout.subscribe(),
            notice: None,
            pending: VecDeque::new(),
            last: None,
            // An empty `Last-Event-ID` is none (`EventSource` sends none then).
            resume: last_event_id
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty()),
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
    /// An `events.reset` to send before the pending events.
    notice: Option<sse::Event>,
    pending: VecDeque<Event>,
    /// The id of the last event this client got (or that its replay starts after).
    last: Option<String>,
    /// The `Last-Event-ID` the client sent, until its missed events are read.
    resume: Option<String>,
    done: bool,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<sse::Event, Infallible>, Self)> {
        if let Some(requested) = self.resume.take()
            && let Err(error) = self.catch_up(&requested, None).await
        {
            return Some(self.close("events.unavailable", &error));
        }
        loop {
            if self.done {
                return None;
            }
            if let Some(notice) = self.notice.take() {
                return Some((Ok(notice), self));
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
                        if let Err(error) = self.catch_up(&last, Some("lagged")).await {
                            return Some(self.close("events.lagged", &error));
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Queues the retained events after `last`, or, when some are gone, an `events.reset` (with `reason`, or the
    /// reason found) and every retained event.
    async fn catch_up(&mut self, last: &str, reason: Option<&'static str>) -> Result<(), String> {
        let replay = self.events.replay(last).await?;
        if let Some(reset) = replay.reset {
            let reason = reason.unwrap_or(reset.reason);
            tracing::debug!(reason, last, "an SSE client starts afresh");
            let data = serde_json::json!({
                "reason": reason,
                "last_event_id": last,
                "oldest": reset.oldest,
            });
            self.notice = Some(
                sse::Event::default()
                    .event("events.reset")
                    .id(&replay.cursor)
                    .data(data.to_string()),
            );
        }
        self.last = Some(replay.cursor).filter(|cursor| !cursor.is_empty());
        self.pending.extend(replay.events);
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

/// How many entries one `XRANGE` of a replay reads, so that each answer comes within the command timeout.
const PAGE: usize = 100;

/// How many times a replay is read again when the stream was trimmed past it while it was read page by page.
const REREADS: usize = 3;

/// The stream's window, and its entries after `after` (exclusive; all of them for `None`), oldest first: the window
/// and the first page at one instant (`MULTI`), then page by page. Each entry names the one before it (`prev`), so a
/// page that does not follow on from the last one read (the stream was trimmed past it meanwhile) is noticed, and
/// the whole read starts again.
async fn read_stream_window(
    mut connection: RedisConnection,
    key: &str,
    timeout: Duration,
    after: Option<(u64, u64)>,
) -> Result<(Window, Vec<Event>), String> {
    'read: for _ in 0..REREADS {
        let from = after.map_or_else(|| "-".to_owned(), |(ms, seq)| format!("{ms}-{seq}"));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            // Inclusive (an exclusive start after the largest id is an error); `after` is left out below.
            .cmd("XRANGE")
            .arg(key)
            .arg(from)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE);
        let (first, last, page) = tokio::time::timeout(
            timeout,
            pipe.query_async::<(Value, Value, Value)>(&mut connection),
        )
        .await
        .map_err(|_| "Redis did not answer in time".to_owned())?
        .map_err(|error| error.to_string())?;
        let window = Window {
            oldest: oldest_entry(&first),
            newest: entries(&last).pop().map(|event| event.id),
        };
        let mut page = entries(&page);
        let mut events = Vec::new();
        loop {
            let full = page.len() == PAGE;
            let read = page.last().map(|event| event.id.clone());
            events.extend(
                page.into_iter()
                    .filter(|event| after.is_none() || event.position() > after),
            );
            let (true, Some(read)) = (full, read) else {
                return Ok((window, events));
            };
            let mut command = redis::cmd("XRANGE");
            command
                .arg(key)
                .arg(format!("({read}"))
                .arg("+")
                .arg("COUNT")
                .arg(PAGE);
            let next = tokio::time::timeout(timeout, command.query_async::<Value>(&mut connection))
                .await
                .map_err(|_| "Redis did not answer in time".to_owned())?
                .map_err(|error| error.to_string())?;
            if let Some((_, Some(prev))) = oldest_entry(&next)
                && prev != read
            {
                continue 'read;
            }
            page = entries(&next);
        }
    }
    Err("the stream was trimmed faster than it could be read".to_owned())
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

/// The first entry of an `XRANGE ... COUNT 1` reply: its id and its `prev` field.
fn oldest_entry(reply: &Value) -> Option<(String, Option<String>)> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let (id, fields) = fields(entries.first()?)?;
    Some((id, field(&fields, "prev")))
}

/// An entry's id and its fields, as `[name, value, ...]`.
fn fields(entry: &Value) -> Option<(String, Vec<String>)> {
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
    Some((id, fields))
}

fn field(fields: &[String], name: &str) -> Option<String> {
    fields
        .chunks(2)
        .find(|pair| pair.first().map(String::as_str) == Some(name))
        .and_then(|pair| pair.get(1).cloned())
}

/// The longest `data` relayed: a record is well under 1 KiB, so anything longer was not written by the demo.
const MAX_DATA: usize = 64 * 1024;

/// An entry as an event, or `None` when it is not one. Nothing read from the stream is trusted: an id that is not a
/// stream id is skipped, a `type` that is not a short token (SSE's `event:` cannot hold a line break, and axum
/// panics on one) becomes `message`, and `data` over [`MAX_DATA`] is dropped (the event still moves the reader on).
fn entry(entry: &Value) -> Option<Event> {
    let (id, fields) = fields(entry)?;
    position(&id)?;
    let kind = field(&fields, "type")
        .filter(|kind| {
            !kind.is_empty()
                && kind.len() <= 64
                && kind
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
        })
        .unwrap_or_else(|| "message".to_owned());
    let data = field(&fields, "data")
        .filter(|data| data.len() <= MAX_DATA)
        .unwrap_or_default();
    Some(Event { id, kind, data })
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
    use proptest::prelude::*;

    use super::*;

    fn stream_entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let mut flat = Vec::new();
        for (name, value) in fields {
            flat.push(Value::BulkString(name.as_bytes().to_vec()));
            flat.push(Value::BulkString(value.as_bytes().to_vec()));
        }
        Value::Array(vec![
            Value::BulkString(id.as_bytes().to_vec()),
            Value::Array(flat),
        ])
    }

    #[test]
    fn a_crafted_entry_becomes_a_safe_event_or_none() {
        let fine = entry(&stream_entry(
            "5-1",
            &[("type", "user.created"), ("data", "{}")],
        ))
        .unwrap();
        assert_eq!(
            (fine.kind.as_str(), fine.data.as_str()),
            ("user.created", "{}")
        );
        // `event:` with a line break would panic in axum: it is a plain message instead.
        let forged = entry(&stream_entry(
            "5-2",
            &[("type", "user.created\nevent: admin"), ("data", "{}")],
        ))
        .unwrap();
        assert_eq!(forged.kind, "message");
        assert!(entry(&stream_entry("5-3\nid: 9", &[("type", "x")])).is_none());
        let huge = "x".repeat(MAX_DATA + 1);
        let big = entry(&stream_entry(
            "5-4",
            &[("type", "user.updated"), ("data", &huge)],
        ))
        .unwrap();
        assert_eq!(big.data, "");
        assert!(entry(&Value::Int(7)).is_none());
        assert!(entry(&Value::Array(vec![])).is_none());
    }

    proptest! {
        #[test]
        fn any_entry_makes_an_sse_event_without_panicking(
            id in ".{0,24}", kind in ".{0,80}", data in ".{0,200}", ms in any::<u64>(), seq in any::<u64>()
        ) {
            for id in [id, format!("{ms}-{seq}")] {
                if let Some(event) = entry(&stream_entry(&id, &[("type", &kind), ("data", &data)])) {
                    let _ = sse::Event::default().id(event.id).event(event.kind).data(event.data);
                }
            }
        }
    }

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(position("2-0") > position("1-9"));
        assert!(position("1-10") > position("1-9"));
        assert_eq!(position("7"), Some((7, 0)));
        assert_eq!(position("nonsense"), None);
        assert_eq!(position("1-2-3"), None);
        assert_eq!(position("-"), None);
    }

    fn window(oldest: &str, before: Option<&str>, newest: &str) -> Window {
        Window {
            oldest: Some((oldest.to_owned(), before.map(str::to_owned))),
            newest: Some(newest.to_owned()),
        }
    }

    #[test]
    fn a_cursor_resumes_without_a_reset_exactly_when_nothing_after_it_is_gone() {
        // Entries 5-0 .. 9-0 retained; 4-0 was the last one trimmed.
        let trimmed = window("5-0", Some("4-0"), "9-0");
        for fine in ["4-0", "4-1", "5-0", "7-3", "9-0"] {
            assert_eq!(gap(position(fine), &trimmed), None, "{fine}");
        }
        assert_eq!(gap(position("3-9"), &trimmed), Some("beyond-window"));
        assert_eq!(gap(position("0-0"), &trimmed), Some("beyond-window"));
        assert_eq!(gap(position("9-1"), &trimmed), Some("unknown-id"));
        assert_eq!(gap(None, &trimmed), Some("invalid-id"));
        // Nothing ever trimmed: only ids from the stream's first entry on, or 0-0, are known.
        let whole = window("5-0", Some("0-0"), "9-0");
        assert_eq!(gap(position("0-0"), &whole), None);
        assert_eq!(gap(position("5-0"), &whole), None);
        assert_eq!(gap(position("4-0"), &whole), Some("unknown-id"));
        // An entry without `prev` (written by an older gateway): only ids it still holds are safe.
        let unknown = window("5-0", None, "9-0");
        assert_eq!(gap(position("5-0"), &unknown), None);
        assert_eq!(gap(position("4-0"), &unknown), Some("beyond-window"));
        // Nothing retained.
        let empty = Window::default();
        assert_eq!(gap(position("0-0"), &empty), None);
        assert_eq!(gap(position("4-0"), &empty), Some("unknown-id"));
    }

    fn feed(events: &Events) -> Feed {
        Feed {
            events: events.clone(),
            live: events.inner.fanout.subscribe(),
            notice: None,
            pending: VecDeque::new(),
            last: None,
            resume: None,
            done: false,
        }
    }

    async fn publish(events: &Events, count: usize) {
        for n in 0..count {
            events
                .publish("user.created", &serde_json::json!({ "n": n }))
                .await;
        }
    }

    async fn all(events: &Events) -> Vec<String> {
        let (_, all) = events.read(None).await.unwrap_or_default();
        all.into_iter().map(|event| event.id).collect()
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_the_broadcast_catches_up_without_gaps() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        let mut slow = feed(&events);
        publish(&events, 1).await;
        let Some((_, next)) = slow.next().await else {
            panic!("the first event did not arrive");
        };
        slow = next;
        let total = FANOUT_CAPACITY + 50;
        publish(&events, total).await;
        let all = all(&events).await;
        let mut delivered = Vec::new();
        while delivered.len() < total {
            let Some((message, next)) = slow.next().await else {
                panic!("the feed ended after {} events", delivered.len());
            };
            assert!(!format!("{message:?}").contains("events.reset"));
            slow = next;
            delivered.push(slow.last.clone().unwrap_or_default());
        }
        assert_eq!(delivered, all[1..]);
    }

    #[tokio::test]
    async fn a_client_that_falls_out_of_the_window_is_told_then_gets_what_is_retained() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        let mut slow = feed(&events);
        publish(&events, 1).await;
        let Some((_, next)) = slow.next().await else {
            panic!("the first event did not arrive");
        };
        slow = next;
        publish(&events, WINDOW + 10).await;
        let retained = all(&events).await;
        assert_eq!(retained.len(), WINDOW);
        let Some((reset, next)) = slow.next().await else {
            panic!("the feed ended");
        };
        let reset = format!("{reset:?}");
        assert!(reset.contains("event: events.reset"), "{reset}");
        assert!(reset.contains(r#"\"reason\":\"lagged\""#), "{reset}");
        slow = next;
        let mut delivered = Vec::new();
        while delivered.len() < WINDOW {
            let Some((_, next)) = slow.next().await else {
                panic!("the feed ended after {} events", delivered.len());
            };
            slow = next;
            delivered.push(slow.last.clone().unwrap_or_default());
        }
        assert_eq!(delivered, retained);
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_before_its_first_event_is_told_and_closed() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        let slow = feed(&events);
        publish(&events, FANOUT_CAPACITY + 1).await;
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
        let first = all(&events).await;
        assert_eq!(first.len(), 3);
        let Ok(after) = events.replay(&first[0]).await else {
            panic!("no replay");
        };
        assert_eq!(after.reset, None);
        let ids: Vec<&str> = after.events.iter().map(|event| event.id.as_str()).collect();
        assert_eq!(ids, [first[1].as_str(), first[2].as_str()]);
        assert_eq!(after.events[0].data, r#"{"id":2}"#);
        // From the beginning: everything, no reset (nothing was ever evicted).
        let Ok(everything) = events.replay("0-0").await else {
            panic!("no replay");
        };
        assert_eq!((everything.reset, everything.events.len()), (None, 3));
    }

    #[tokio::test]
    async fn the_memory_ring_resets_exactly_the_ids_it_cannot_resume_from() {
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let events = Events::new(None, "t:", stop);
        publish(&events, WINDOW + 5).await;
        let retained = all(&events).await;
        let epoch = retained[0].split_once('-').map(|(ms, _)| ms).unwrap_or("");
        // Events 1..=5 were evicted: 5 is the last one, 6 the oldest retained.
        assert_eq!(retained[0], format!("{epoch}-6"));
        let replay = |id: String| {
            let events = events.clone();
            async move {
                let Ok(replay) = events.replay(&id).await else {
                    panic!("no replay");
                };
                replay
            }
        };
        let fine = replay(format!("{epoch}-5")).await;
        assert_eq!((fine.reset, fine.events.len()), (None, WINDOW));
        let fine = replay(format!("{epoch}-6")).await;
        assert_eq!((fine.reset, fine.events.len()), (None, WINDOW - 1));
        for (id, reason) in [
            (format!("{epoch}-4"), "beyond-window"),
            ("0-0".to_owned(), "beyond-window"),
            (format!("{epoch}-{}", WINDOW + 6), "unknown-id"),
            ("1-1".to_owned(), "beyond-window"),
            ("not-an-id".to_owned(), "invalid-id"),
        ] {
            let reset = replay(id.clone()).await;
            assert_eq!(
                reset.reset,
                Some(Reset {
                    reason,
                    oldest: Some(retained[0].clone()),
                }),
                "{id}"
            );
            assert_eq!(reset.cursor, format!("{epoch}-5"), "{id}");
            assert_eq!(reset.events.len(), WINDOW, "{id}");
        }
        // Another process's ring (an earlier epoch), before anything was evicted here.
        let (_trigger, stop) = crate::lifecycle::stop_pair();
        let fresh = Events::new(None, "t:", stop);
        publish(&fresh, 2).await;
        let Ok(other) = fresh
            .replay(&format!("{}-3", epoch.parse::<u64>().unwrap_or(1) - 1))
            .await
        else {
            panic!("no replay");
        };
        assert_eq!(other.reset.map(|reset| reset.reason), Some("unknown-id"));
        assert_eq!((other.cursor.as_str(), other.events.len()), ("0-0", 2));
    }
}
