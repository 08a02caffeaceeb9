//! wal::recovery (being written)
