//! Key escaping for Redis Cluster hash tags.
