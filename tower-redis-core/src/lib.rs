//! Redis plumbing shared by the workspace's Redis crates.

pub mod key;
