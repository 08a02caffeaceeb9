//! The errors of the WAL writer layer: one enum, [`WalError`], whose variants a
//! caller can act on (wait and retry, raise a budget, stop another writer, reopen
//! after a device error).
//!
//! Every variant is `Clone` (I/O errors are shared behind an `Arc`) because one
//! failure is handed to many callers: once an fsync fails, every later append and
//! every durable waiter receives the same [`WalError::SyncFailed`]. Byte-level
//! damage found by the pure parser is `format::FormatError`; it reaches callers
//! of this layer as [`WalError::Corrupt`] with the file and offset attached.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::format::Lsn;

/// Why a WAL operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The stream name cannot be a directory of the WAL.
    #[error(
        "invalid stream name {name:?}: {reason} (use 1 to 32 bytes of A-Z a-z 0-9 . _ -, \
         not starting with '.')"
    )]
    InvalidStreamName { name: String, reason: String },

    /// A `WalConfig` setting is out of range.
    #[error("invalid WAL setting `{setting}`: {reason}")]
    InvalidConfig {
        setting: &'static str,
        reason: String,
    },

    /// Another writer (this process or another) holds the stream's lock file.
    #[error(
        "stream `{stream}` is already open by another writer (lock held on {}); \
         stop that writer or write to another stream",
        path.display()
    )]
    StreamLocked { stream: String, path: PathBuf },

    /// A reader (the loader, or replay) has been settling the stream for
    /// longer than an opening writer waits for it (`SETTLE_WAIT`); settling
    /// only fdatasyncs and scans the stream's segments, so the disk is stuck.
    #[error(
        "stream `{stream}` is being settled by a reader (lock held on {}) for {waited:?} \
         already; its fdatasyncs are not finishing: check the disk, or stop the loader",
        path.display()
    )]
    StreamSettling {
        stream: String,
        path: PathBuf,
        waited: std::time::Duration,
    },

    /// The stream's segment files fill its disk budget and no reader freed a
    /// segment in time (policy Block after its timeout, or policy Fail at once).
    #[error(
        "stream `{stream}` is at its disk budget ({used} of {budget} bytes in segment files) \
         and no reader freed a segment within {waited:?}; check that the loader is running, \
         or raise disk_budget"
    )]
    DiskBudgetExceeded {
        stream: String,
        used: u64,
        budget: u64,
        waited: Duration,
    },

    /// The file system refused space for the next segment (fallocate failed).
    #[error(
        "no space for the next segment of stream `{stream}` ({needed} bytes at {}) after \
         waiting {waited:?}; free disk space or lower segment_size",
        path.display()
    )]
    DiskFull {
        stream: String,
        path: PathBuf,
        needed: u64,
        waited: Duration,
        #[source]
        source: Arc<io::Error>,
    },

    /// Policy DropNewest: the event was not written; the drop was counted.
    #[error(
        "event dropped: stream `{stream}` is out of disk budget and its policy is drop-newest \
         ({dropped_total} events dropped so far)"
    )]
    EventDropped { stream: String, dropped_total: u64 },

    /// An fsync failed. The kernel may have discarded the dirty pages, so the
    /// writer does not retry: it refuses every later append and wait.
    #[error(
        "fsync of {} failed, so records after LSN {durable_lsn} may not be on disk; the writer \
         stopped accepting appends. Fix the device, then reopen the stream (recovery keeps \
         what is on disk)",
        path.display()
    )]
    SyncFailed {
        path: PathBuf,
        durable_lsn: Lsn,
        #[source]
        source: Arc<io::Error>,
    },

    /// A durable wait for an LSN no append has returned yet.
    #[error("LSN {lsn} has not been written (the last written LSN is {written})")]
    LsnNotWritten { lsn: Lsn, written: Lsn },

    /// The writer was closed (or dropped) before this call.
    #[error("the WAL writer of stream `{stream}` is closed")]
    Closed { stream: String },

    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// A segment is damaged in a way recovery does not repair by itself (e.g. its
    /// header); the file is left untouched for an operator to inspect.
    #[error("{} is damaged at byte {offset}: {reason}; inspect it with `auditwal verify`", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The encoded event does not fit in one record of this WAL.
    #[error("event encodes to a {len}-byte record, more than the {max} bytes a record may take")]
    EventTooLarge { len: usize, max: usize },

    /// The event could not be encoded (a bug or an unvalidated event).
    #[error("cannot encode the event: {reason}")]
    Encode { reason: String },
}

/// `err` and its causes, joined by ": ", for log lines (`Display` of a
/// [`WalError`] leaves its cause to `source()`, as error chains expect).
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl WalError {
    /// An [`WalError::Io`] naming the operation and the file.
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        WalError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// True for the errors after which the writer accepts no more appends.
    pub fn is_fatal(&self) -> bool {
        matches!(self, WalError::SyncFailed { .. } | WalError::Closed { .. })
    }
}
