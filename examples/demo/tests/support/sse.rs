//! A Server-Sent Events client for the gateway's `GET /events`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::poll;

/// One event as a client received it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SseEvent {
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) data: Value,
}

#[derive(Default)]
struct Received {
    /// Whether the response head arrived (the gateway has subscribed this client by then).
    connected: bool,
    events: Vec<SseEvent>,
}

/// An SSE client: reads the body on a thread, splits it on blank lines; disconnects when dropped.
pub(crate) struct SseClient {
    stream: TcpStream,
    received: Arc<Mutex<Received>>,
}

impl SseClient {
    /// Connects to `GET /events` (HTTP/1.0, so the body is not chunked) and waits for the response head.
    pub(crate) fn connect(address: SocketAddr, last_event_id: Option<&str>) -> Self {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
        let mut head =
            format!("GET /events HTTP/1.0\r\nhost: {address}\r\naccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            head.push_str(&format!("last-event-id: {id}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let mut reader = stream.try_clone().unwrap();
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut body_at = None;
            let mut buffer = [0u8; 4096];
            while let Ok(read) = reader.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buffer[..read]));
                if body_at.is_none()
                    && let Some(at) = text.find("\r\n\r\n")
                {
                    assert!(
                        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
                        "{text}"
                    );
                    body_at = Some(at + 4);
                    sink.lock().unwrap().connected = true;
                }
                let Some(start) = body_at else { continue };
                // Complete blocks only; the rest waits for more bytes.
                while let Some(end) = text[start..].find("\n\n") {
                    let block = text[start..start + end].to_owned();
                    text.replace_range(start..start + end + 2, "");
                    if let Some(event) = parse(&block) {
                        sink.lock().unwrap().events.push(event);
                    }
                }
            }
        });
        let client = Self { stream, received };
        poll(Duration::from_secs(10), || {
            client.received.lock().unwrap().connected.then_some(())
        })
        .expect("GET /events never answered");
        client
    }

    pub(crate) fn events(&self) -> Vec<SseEvent> {
        self.received.lock().unwrap().events.clone()
    }

    /// The events once there are at least `count` (polled with a deadline).
    pub(crate) fn wait_for(&self, count: usize) -> Vec<SseEvent> {
        poll(Duration::from_secs(20), || {
            let events = self.events();
            (events.len() >= count).then_some(events)
        })
        .unwrap_or_else(|| panic!("fewer than {count} events arrived: {:?}", self.events()))
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// An SSE block as an event (`id` empty when it has none: a closing `events.lagged` or `events.unavailable`); `None`
/// for a comment (keep-alive).
fn parse(block: &str) -> Option<SseEvent> {
    let mut fields = HashMap::new();
    for line in block.lines() {
        if let Some((name, value)) = line.split_once(':')
            && !name.is_empty()
        {
            fields.insert(
                name.to_owned(),
                value.strip_prefix(' ').unwrap_or(value).to_owned(),
            );
        }
    }
    Some(SseEvent {
        id: fields.get("id").cloned().unwrap_or_default(),
        kind: fields.get("event")?.clone(),
        data: serde_json::from_str(fields.get("data")?).unwrap(),
    })
}

/// `(type, record id)` of each event.
pub(crate) fn summary(events: &[SseEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|event| {
            (
                event.kind.clone(),
                event.data["id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}
