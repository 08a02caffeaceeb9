//! wal::reader (being written)
