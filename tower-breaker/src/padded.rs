//! Cache-line padding, so that atomics written by every call do not share a line with each other.

/// A value alone on its own 128-byte region (two 64-byte lines, as adjacent-line prefetching pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);
