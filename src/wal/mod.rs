//! The segment write-ahead log: audit events as checksummed records in local
//! segment files, written by one process per stream and read by others.
//!
//! # What an append promises
//!
//! | call | returns when | survives kill -9 | survives power loss |
//! |---|---|---|---|
//! | [`WalWriter::append`] | the record is written to the segment file (page cache) | yes | once the next fsync ran (≤ `fsync_interval`, default 100 ms) |
//! | [`WalWriter::append_async`] | the same, without holding the runtime thread when the append needs a new segment | yes | as `append` |
//! | [`WalWriter::append_durable`] / [`WalWriter::wait_durable`] | an fdatasync covering the record completed | yes | yes |
//!
//! "Copied into the file" means into the page cache through a `MAP_SHARED`
//! memory map of the preallocated segment, never into a user-space buffer or
//! queue: a killed process loses nothing it acknowledged. A background flusher
//! fdatasyncs every `fsync_interval`, and at once when durable appends wait (one
//! fsync serves all of them). After each fsync the writer publishes the durable
//! LSN, in memory and in the `durable.lsn` sidecar; readers load only up to it,
//! because records above it can vanish in a power loss and their LSNs be reused.
//! An fsync that fails stops the writer: every later call returns
//! [`WalError::SyncFailed`].
//!
//! # Layout and ownership
//!
//! `WAL_DIR/<stream>/<first LSN, 20 digits>.seg`, one writer per stream (flock
//! on `<stream>/LOCK`), files 0600 and directories 0700. docs/segment-format.md
//! documents every byte.
//!
//! - [`format`]: pure encode/decode of headers, frames, the sidecar; the segment
//!   scan that tells end of data, torn tail and mid-segment corruption apart.
//! - [`payload`]: the bincode layout of an event record.
//! - `writer` (+ `segment`, `stream_dir`, `durable`, `flusher`, `preparer`,
//!   `budget`): the writer side: mapped segments, rotation with the next segment
//!   preallocated ahead, the disk budget and its [`FullDiskPolicy`], group commit.
//! - [`recovery`]: what opening a crashed stream repairs (torn tail zeroed,
//!   never truncated; LSNs continue).
//! - [`reader`]: reading records back from any LSN.
//!
//! # Contract with readers (the loader)
//!
//! Readers map segments read-only, load up to the durable LSN, and may delete a
//! segment once their checkpoint is past its last LSN (a record of a later
//! segment is committed): never the unsealed last segment, which the writer still
//! appends to, and never the segment holding the checkpoint, whose durable
//! record is what keeps a writer restarting after a power loss from reusing
//! LSNs at or below that checkpoint. Deleting segments is what frees the
//! writer's disk budget.
//!
//! Every file change of the writer side goes through `fs::FileSystem` (the real
//! calls in production; the power-loss model in tests, `powerloss`).

pub mod format;
pub mod payload;
pub mod reader;
pub mod recovery;
pub mod settle;
pub mod writer;

mod budget;
mod chain_writer;
mod config;
mod durable;
pub(crate) mod error;
mod flusher;
pub(crate) mod fs;
#[cfg(test)]
mod powerloss;
mod preparer;
mod segment;
mod stream_dir;

pub(crate) use budget::{BlockStep, BlockWait};
pub use config::{
    FullDiskPolicy, WalConfig, DEFAULT_BLOCK_TIMEOUT, DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_DISK_BUDGET, DEFAULT_FSYNC_INTERVAL,
    DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE,
};
pub use error::WalError;
pub use format::{FormatError, Lsn, RecordKind};
pub use payload::{PayloadError, WalEvent};
pub use reader::{
    is_stream_dir, list_segments, list_streams, newest_checkpoint, read_durable_lsn, Follow, ReadError, ReadItem,
    SegmentFile, StreamReader,
};
pub use recovery::RecoveryReport;
pub use writer::{WalStats, WalWriter};
