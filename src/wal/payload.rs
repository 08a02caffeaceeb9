//! wal::payload (being written)
