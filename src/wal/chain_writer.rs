//! The writer's side of the hash chain (`chain`, docs/integrity.md): the
//! flusher hashes the records it has just synced, in LSN order, and now and then
//! signs where the chain stands and appends that as a checkpoint record.
//!
//! Hashing is off the append path: an append copies its frame and returns, as
//! without a key. The flusher reads each frame back from the mapped segment after
//! the round's fdatasync, so a checkpoint only ever vouches for records already
//! durable, and the checkpoint record itself is made durable by the next round
//! (within `fsync_interval`). A checkpoint is due after `checkpoint_every`
//! events, when the oldest unsigned event is `checkpoint_interval` old, when a
//! segment was sealed, and at close.
//!
//! At open the chain resumes from the newest checkpoint record still on disk:
//! the events after it are hashed again from the files. With none (a new
//! stream, or signing just turned on) or when the records after it are gone, a
//! new epoch starts: an epoch checkpoint is appended before any new event, and
//! the loader restarts its chain there too.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::WalError;
use super::format::{self, FrameOutcome, Lsn, RecordKind};
use super::reader::{self, Follow, ReadItem, StreamReader};
use super::segment::Segment;
use crate::chain::{ChainState, Checkpoint, Signer};

/// Where the next record to hash is: segment (by first LSN), offset, LSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HashCursor {
    pub seg_first: Lsn,
    pub offset: usize,
    pub next_lsn: Lsn,
}

/// The chain of one writer's stream.
pub(crate) struct ChainWriter {
    signer: Signer,
    stream: String,
    state: ChainState,
    cursor: HashCursor,
    every: u64,
    interval: Duration,
    /// Events hashed since the last checkpoint, and when the first was.
    unsigned: u64,
    unsigned_since: Option<Instant>,
    /// A segment was sealed since the last checkpoint.
    sealed: bool,
    /// The service's count of sampled-out events, and its value at the last
    /// checkpoint.
    sampled_out: Option<Arc<AtomicU64>>,
    sampled_out_signed: u64,
}

impl std::fmt::Debug for ChainWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainWriter")
            .field("signer", &self.signer)
            .field("lsn", &self.state.lsn)
            .field("cursor", &self.cursor)
            .field("unsigned", &self.unsigned)
            .finish()
    }
}

/// What opening the chain found.
pub(crate) struct Opened {
    pub chain: ChainWriter,
    /// The epoch checkpoint to append before any event, when the chain starts
    /// anew.
    pub epoch: Option<String>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl ChainWriter {
    /// Reads the key at `key_path` and resumes the chain of the stream in
    /// `stream_dir`, whose records end just before `end`.
    pub(crate) fn open(
        key_path: &Path,
        stream_dir: &Path,
        stream: &str,
        end: HashCursor,
        every: u64,
        interval: Duration,
    ) -> Result<Opened, WalError> {
        let signer = Signer::read(key_path).map_err(|e| WalError::InvalidConfig {
            setting: "chain_key",
            reason: e.to_string(),
        })?;
        let last_lsn = end.next_lsn - 1;
        let resumed = last_checkpoint(stream_dir, stream, &signer)?
            .and_then(|c| catch_up(stream_dir, stream, &c, last_lsn));
        let (state, epoch) = match resumed {
            Some(state) => (state, None),
            None => {
                let note = Checkpoint::epoch(stream, last_lsn, unix_now()).sign(&signer);
                tracing::info!(
                    stream,
                    after_lsn = last_lsn,
                    "hash chain: starting a new epoch (no checkpoint to resume from)"
                );
                (ChainState::epoch_at(last_lsn), Some(note))
            }
        };
        Ok(Opened {
            chain: ChainWriter {
                signer,
                stream: stream.to_string(),
                state,
                cursor: end,
                every,
                interval,
                unsigned: 0,
                unsigned_since: None,
                sealed: false,
                sampled_out: None,
                sampled_out_signed: 0,
            },
            epoch,
        })
    }

    /// Counts `counter`'s increments as sampled-out events in each checkpoint.
    pub(crate) fn count_sampled_out(&mut self, counter: Arc<AtomicU64>) {
        self.sampled_out_signed = counter.load(Ordering::Relaxed);
        self.sampled_out = Some(counter);
    }

    /// Hashes the records of `segments` (a sync round's, in order) up to
    /// `written`, every one of which is complete.
    pub(crate) fn hash_round(&mut self, segments: &[&Arc<Segment>], written: Lsn) {
        while self.cursor.next_lsn <= written {
            let Some(seg) = segments
                .iter()
                .find(|s| s.first_lsn() == self.cursor.seg_first)
            else {
                // The next segment is not installed yet.
                return;
            };
            let at = self.cursor.offset;
            // SAFETY: the frame at the cursor is the record `next_lsn`, at or
            // below `written`: complete, and never written again.
            let len = unsafe { seg.slice(at, format::FRAME_HEADER_LEN) }
                .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize);
            let frame = len
                .filter(|&l| l <= format::MAX_PAYLOAD_LEN)
                .and_then(|l| unsafe { seg.slice(at, format::frame_len(l)) });
            let record = match frame.map(format::decode_frame) {
                Some(FrameOutcome::Record { record, frame_len })
                    if record.lsn == self.cursor.next_lsn =>
                {
                    (record, frame_len)
                }
                other => {
                    // Cannot happen while appends are sound; the chain then
                    // stops here and the next open starts a new epoch.
                    tracing::error!(
                        stream = %self.stream,
                        lsn = self.cursor.next_lsn,
                        offset = at,
                        found = ?other.map(|o| format!("{o:?}")),
                        "hash chain: the record to hash is not where it should be"
                    );
                    self.cursor.next_lsn = Lsn::MAX;
                    return;
                }
            };
            let (record, frame_len) = record;
            match record.kind {
                RecordKind::Event => {
                    self.state.push(&self.stream, record.lsn, record.payload);
                    self.unsigned += 1;
                    self.unsigned_since.get_or_insert_with(Instant::now);
                }
                RecordKind::Checkpoint => {}
                RecordKind::EndOfSegment => {
                    self.sealed = true;
                    self.cursor = HashCursor {
                        seg_first: record.lsn + 1,
                        offset: format::SEGMENT_HEADER_LEN,
                        next_lsn: record.lsn + 1,
                    };
                    continue;
                }
            }
            self.cursor.offset += frame_len;
            self.cursor.next_lsn = record.lsn + 1;
        }
    }

    /// Whether a checkpoint is due (`closing`: at close, for any unsigned event).
    pub(crate) fn due(&self, closing: bool) -> bool {
        if self.unsigned == 0 {
            return false;
        }
        closing
            || self.sealed
            || self.unsigned >= self.every
            || self
                .unsigned_since
                .is_some_and(|t| t.elapsed() >= self.interval)
    }

    /// The signed note of where the chain stands; counts it as signed.
    pub(crate) fn sign(&mut self) -> String {
        let sampled_now = self
            .sampled_out
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        let note = Checkpoint {
            stream: self.stream.clone(),
            size: self.state.lsn,
            head: self.state.head,
            epoch: self.state.epoch,
            events: self.state.events,
            sampled_out: sampled_now.saturating_sub(self.sampled_out_signed),
            time: unix_now(),
        }
        .sign(&self.signer);
        self.sampled_out_signed = sampled_now;
        self.unsigned = 0;
        self.unsigned_since = None;
        self.sealed = false;
        note
    }
}

fn read_failed(path: &Path, e: impl std::fmt::Display) -> WalError {
    WalError::Io {
        op: "read, for the hash chain,",
        path: path.to_path_buf(),
        source: Arc::new(std::io::Error::other(e.to_string())),
    }
}

/// The newest checkpoint record of the stream signed by `signer`.
fn last_checkpoint(
    stream_dir: &Path,
    stream: &str,
    signer: &Signer,
) -> Result<Option<Checkpoint>, WalError> {
    let verifier = signer.verifier();
    let found = reader::newest_checkpoint(stream_dir, |lsn, note| {
        match Checkpoint::open(note, &verifier) {
            Ok(c) if c.stream == stream => Some(c),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(
                    stream,
                    lsn,
                    error = %e,
                    "hash chain: a checkpoint record not signed by this key is ignored"
                );
                None
            }
        }
    })
    .map_err(|e| read_failed(stream_dir, e))?;
    Ok(found.map(|(c, _, _)| c))
}

/// The chain from checkpoint `from`, through the events on disk up to
/// `last_lsn`; `None` when they cannot all be read (retired, damaged).
fn catch_up(
    stream_dir: &Path,
    stream: &str,
    from: &Checkpoint,
    last_lsn: Lsn,
) -> Option<ChainState> {
    let mut state = ChainState::from_checkpoint(from);
    if from.size >= last_lsn {
        return Some(state);
    }
    let mut reader = StreamReader::open(stream_dir, from.size + 1, Follow::AtRest);
    loop {
        match reader.next_item(Some(last_lsn)) {
            Ok(Some(ReadItem::Event { lsn, payload, .. })) => {
                state.push(stream, lsn, &payload);
            }
            Ok(Some(ReadItem::Checkpoint { .. } | ReadItem::SegmentConsumed { .. })) => {}
            Ok(None) if reader.next_lsn() > last_lsn => return Some(state),
            Ok(None) => return None,
            Ok(Some(damage)) => {
                tracing::warn!(
                    stream,
                    ?damage,
                    "hash chain: cannot resume the chain past damage; starting a new epoch"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(stream, error = %e, "hash chain: cannot read the WAL to resume the chain");
                return None;
            }
        }
    }
}
