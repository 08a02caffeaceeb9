//! The segment write-ahead log (owned by the WAL work; see docs/segment-format.md).
