//! Whether a connection leads to one Redis server or to a Redis Cluster, found out rather than configured.
//!
//! A pipeline or a script may only touch keys of one slot on a Cluster, while on one server it can carry the keys
//! of a whole operation in one round trip. The connection types give no sign of which they are (an application's own
//! enum over a `ConnectionManager` and a cluster connection is as common as either alone), so [`Topology`] asks the
//! server once (`INFO cluster`) and also learns from a `CROSSSLOT` reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use redis::aio::ConnectionLike;

/// Not asked yet (or the server could not be asked): ask again on the next call.
const UNKNOWN: u8 = 0;
const SINGLE_NODE: u8 = 1;
const CLUSTER: u8 = 2;

/// What one connection leads to: asked once, then remembered. Clones share what was learnt.
#[derive(Debug, Clone, Default)]
pub struct Topology(Arc<AtomicU8>);

impl Topology {
    /// Nothing learnt yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// What is known without asking: `Some(true)` for a Cluster, `Some(false)` for one server, `None` when not asked
    /// yet (or asking failed).
    pub fn known(&self) -> Option<bool> {
        match self.0.load(Ordering::Acquire) {
            CLUSTER => Some(true),
            SINGLE_NODE => Some(false),
            _ => None,
        }
    }

    /// Whether `connection` leads to a Cluster: what is known, or asked now (`INFO cluster`; through a cluster
    /// client every node answers). A server that refuses `INFO` (an ACL without it) is taken for one server until a
    /// `CROSSSLOT` says otherwise ([`learn_cluster`](Self::learn_cluster)).
    ///
    /// The call has no deadline of its own: wrap it in the caller's.
    ///
    /// # Errors
    ///
    /// The connection's error when the server could not be asked (down, a broken connection): nothing is learnt,
    /// and the next call asks again.
    pub async fn is_cluster<C: ConnectionLike + Send>(
        &self,
        connection: &mut C,
    ) -> redis::RedisResult<bool> {
        if let Some(known) = self.known() {
            return Ok(known);
        }
        let info = redis::cmd("INFO")
            .arg("cluster")
            .query_async::<redis::Value>(connection)
            .await;
        let learnt = match info {
            Ok(info) if says_cluster_enabled(&info) => CLUSTER,
            Ok(_) => SINGLE_NODE,
            Err(error) if error.code().is_some() => SINGLE_NODE,
            Err(error) => return Err(error),
        };
        // Never downgrade a CROSSSLOT's verdict.
        let _ = self
            .0
            .compare_exchange(UNKNOWN, learnt, Ordering::AcqRel, Ordering::Acquire);
        Ok(self.0.load(Ordering::Acquire) == CLUSTER)
    }

    /// Learnt from a `CROSSSLOT` reply: the server is a Cluster. Returns whether this is news.
    pub fn learn_cluster(&self) -> bool {
        self.0.swap(CLUSTER, Ordering::AcqRel) != CLUSTER
    }
}

/// Whether `error` is a `CROSSSLOT` reply: the keys of one command, script or transaction are in different Cluster
/// slots.
pub fn is_cross_slot(error: &redis::RedisError) -> bool {
    error.code() == Some("CROSSSLOT")
}

/// Whether an `INFO cluster` reply says `cluster_enabled:1`: one node's text, or, through a cluster client (which
/// sends `INFO` to every node), a map of node to text.
fn says_cluster_enabled(info: &redis::Value) -> bool {
    let text_says = |text: &str| text.lines().any(|line| line.trim() == "cluster_enabled:1");
    match info {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).is_ok_and(text_says),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            text_says(text)
        }
        redis::Value::Map(entries) => entries.iter().any(|(_, text)| says_cluster_enabled(text)),
        redis::Value::Array(values) => values.iter().any(says_cluster_enabled),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::{Topology, says_cluster_enabled};

    #[test]
    fn info_cluster_is_read_from_one_node_or_from_every_node_of_a_cluster() {
        let text = |enabled: u8| {
            Value::BulkString(format!("# Cluster\r\ncluster_enabled:{enabled}\r\n").into_bytes())
        };
        assert!(says_cluster_enabled(&text(1)));
        assert!(!says_cluster_enabled(&text(0)));
        let nodes = Value::Map(vec![
            (Value::BulkString(b"127.0.0.1:7000".to_vec()), text(1)),
            (Value::BulkString(b"127.0.0.1:7001".to_vec()), text(1)),
        ]);
        assert!(says_cluster_enabled(&nodes));
        assert!(!says_cluster_enabled(&Value::Nil));
    }

    #[test]
    fn a_crossslot_verdict_is_shared_by_clones_and_is_news_once() {
        let topology = Topology::new();
        let clone = topology.clone();
        assert_eq!(topology.known(), None);
        assert!(clone.learn_cluster());
        assert!(!topology.learn_cluster());
        assert_eq!(topology.known(), Some(true));
    }
}
