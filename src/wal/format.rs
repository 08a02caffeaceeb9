//! wal::format (being written)
