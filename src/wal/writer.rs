//! wal::writer (being written)
