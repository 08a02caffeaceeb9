//! The loader's position in one stream: a WAL reader opened just past the
//! committed checkpoint, gathering batches up to the durable watermark, and
//! remembering which segments become safe to retire once a batch commits.
//!
//! The cursor never decides what is committed: the loader tells it
//! (`committed_through`) after the batch transaction returns, and throws the whole
//! cursor away after any failure, re-opening it from the checkpoint in the
//! database. Segments are handed back for deletion only when the committed
//! checkpoint is *past* every LSN in them: a record of a later segment is
//! committed. The segment holding the checkpoint's own record is therefore never
//! deleted, and with it the writer keeps, after any power loss, a durable record
//! of how far its LSNs went (a writer restarting with no segment left and a stale
//! `durable.lsn` would hand out LSNs at or below the checkpoint again, and this
//! loader would skip those events as already loaded). That record is durable
//! because the loader only loads what the writer has fsynced.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::chain::{ChainState, Checkpoint};
use crate::loader::chainer::Chainer;
use crate::loader::batch::{Batch, BatchRow, SignedCheckpoint};
use crate::loader::checkpoint::Committed;
use crate::loader::metrics::StreamMetrics;
use crate::wal::format::Lsn;
use crate::wal::reader::{self, Follow, ReadError, ReadItem, StreamReader};
use crate::wal::settle::{settle_idle_stream, Settled};
use crate::wal::WalError;

/// Bounds on one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_time: Duration,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CursorError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Settle(#[from] WalError),
}

/// A gathered batch and the damage met on the way (already skipped; to report).
pub struct Gathered {
    pub batch: Batch,
    pub skipped: Vec<String>,
}

pub struct Cursor {
    dir: PathBuf,
    stream: String,
    reader: StreamReader,
    committed: Lsn,
    /// The hash chain through the last record gathered ([`Chainer`]).
    chain: Chainer,
    /// Consumed segments and their last LSN, waiting for the checkpoint to pass it.
    consumed: Vec<(PathBuf, Lsn)>,
    /// True when the last gather stopped because nothing more is written at all.
    at_end: bool,
    /// Highest LSN seen in the files (durable or not), for the lag figures.
    written_seen: Lsn,
    /// occurred_at of the oldest record gathered but not yet committed, for the
    /// lag in seconds.
    oldest_pending: Option<chrono::DateTime<chrono::Utc>>,
    last_settle: Option<Instant>,
}

/// How often a caught-up cursor checks whether the stream's writer is gone and its
/// page-cache tail needs settling.
const SETTLE_EVERY: Duration = Duration::from_secs(2);

impl Cursor {
    /// A cursor over `dir` (the stream `stream`) positioned after `committed`.
    /// Segments left behind by an earlier run (committed through but not yet
    /// retired: kept for the rule above, or a crash before the deletion) are
    /// taken up as consumed, since the reader starts past them.
    pub fn open(dir: &Path, stream: &str, from: Committed) -> Result<Cursor, CursorError> {
        let committed = from.lsn;
        let segments = reader::list_segments(dir)?;
        let consumed = segments
            .windows(2)
            .map(|pair| (pair[0].path.clone(), pair[1].first_lsn.saturating_sub(1)))
            .filter(|(_, last)| *last <= committed)
            .collect();
        Ok(Cursor {
            dir: dir.to_path_buf(),
            stream: stream.to_string(),
            reader: StreamReader::open(dir, committed.saturating_add(1), Follow::Live),
            committed,
            chain: Chainer::resume(
                stream,
                ChainState {
                    head: from.chain_head,
                    ..ChainState::epoch_at(from.chain_lsn)
                },
            ),
            consumed,
            at_end: false,
            written_seen: committed,
            oldest_pending: None,
            last_settle: None,
        })
    }

    /// The checkpoint as far as this cursor knows.
    pub fn committed(&self) -> Lsn {
        self.committed
    }

    /// True when the last gather found nothing more to load: nothing past the
    /// durable watermark, or (no writer alive) nothing past the settled end.
    pub fn at_end(&self) -> bool {
        self.at_end
    }

    /// Reads the next batch: records after the last one returned, up to the durable
    /// watermark, within `limits`. When the watermark holds it back and no writer
    /// is alive to raise it, the stream is settled first (wal::settle).
    pub fn next_batch(&mut self, limits: &BatchLimits) -> Result<Gathered, CursorError> {
        let mut durable = reader::read_durable_lsn(&self.dir)?;
        self.chain.begin_batch();
        let mut out = Gathered {
            batch: Batch {
                rows: Vec::new(),
                end_lsn: self.reader.next_lsn().saturating_sub(1),
                ..Batch::default()
            },
            skipped: Vec::new(),
        };
        let started = Instant::now();
        let mut bytes = 0usize;
        let mut settled = false;
        loop {
            if out.batch.rows.len() >= limits.max_rows
                || bytes >= limits.max_bytes
                || started.elapsed() >= limits.max_time
            {
                self.at_end = false;
                break;
            }
            match self.reader.next_item(Some(durable))? {
                Some(item) => self.take(item, &mut out, &mut bytes),
                None => {
                    // Held back by the watermark? If the writer is gone, settle the
                    // stream and look again (at most every SETTLE_EVERY: it fsyncs
                    // and scans the last segment).
                    if !settled && self.settle_due() {
                        settled = true;
                        self.last_settle = Some(Instant::now());
                        let wal_dir = self.dir.parent().unwrap_or(&self.dir);
                        if let Settled::Idle { durable_lsn } =
                            settle_idle_stream(wal_dir, &self.stream)?
                        {
                            if durable_lsn > durable {
                                durable = durable_lsn;
                                continue;
                            }
                        }
                    }
                    self.at_end = true;
                    break;
                }
            }
        }
        out.batch.end_lsn = self.reader.next_lsn().saturating_sub(1);
        out.batch.chain = self.chain.position();
        self.written_seen = self.written_seen.max(out.batch.end_lsn);
        if self.oldest_pending.is_none() {
            self.oldest_pending = out.batch.rows.first().map(|r| r.event.occurred_at);
        }
        Ok(out)
    }

    fn take(&mut self, item: ReadItem, out: &mut Gathered, bytes: &mut usize) {
        match item {
            ReadItem::Event {
                lsn,
                event,
                payload,
                ..
            } => {
                // The COPY row is about the event's content (twice: the columns
                // and the payload) plus ~250 bytes of lengths, fixed-size fields
                // and the link.
                *bytes += event.event.content_len() + payload.len() + 250;
                let link = self.chain.event(lsn, &payload);
                out.batch.rows.push(BatchRow {
                    lsn,
                    event: event.event,
                    sample_rate: event.sample_rate,
                    payload,
                    link,
                });
            }
            ReadItem::Checkpoint { lsn, note, .. } => {
                let parsed = Checkpoint::parse(&note).and_then(|c| {
                    String::from_utf8(note)
                        .map(|text| (c, text))
                        .map_err(|_| crate::chain::NoteError::NotUtf8)
                });
                match parsed {
                    Ok((checkpoint, note)) => {
                        self.chain.checkpoint(&checkpoint, &mut out.batch.rows);
                        out.batch.signed.push(SignedCheckpoint {
                            lsn,
                            checkpoint,
                            note,
                        });
                    }
                    Err(e) => out.skipped.push(format!(
                        "{}: checkpoint record LSN {lsn} does not parse ({e}); not stored",
                        self.dir.display()
                    )),
                }
            }
            ReadItem::SegmentConsumed {
                segment,
                first_lsn,
                last_lsn,
                ..
            } => {
                self.consumed
                    .push((segment, last_lsn.unwrap_or(first_lsn.saturating_sub(1))));
            }
            damage => out.skipped.push(
                damage
                    .damage_report()
                    .unwrap_or_else(|| format!("{damage:?}")),
            ),
        }
    }

    fn settle_due(&self) -> bool {
        self.last_settle.is_none_or(|t| t.elapsed() >= SETTLE_EVERY)
    }

    /// Records that everything up to `lsn` is committed.
    pub fn committed_through(&mut self, lsn: Lsn) {
        self.committed = self.committed.max(lsn);
        if self.reader.next_lsn().saturating_sub(1) <= self.committed {
            self.oldest_pending = None;
        }
    }

    /// Segments the checkpoint has passed (see the module docs): safe to delete
    /// or archive.
    pub fn take_finished(&mut self) -> Vec<PathBuf> {
        let committed = self.committed;
        self.take_consumed_where(|last| last < committed)
    }

    /// The retirement rule of older releases, which the power-loss model shows
    /// unsafe: every segment whose records are all committed, the newest
    /// included. Kept for that model, which plays such a loader against the
    /// writer.
    #[cfg(test)]
    pub(crate) fn take_finished_old_rule(&mut self) -> Vec<PathBuf> {
        let committed = self.committed;
        self.take_consumed_where(|last| last <= committed)
    }

    fn take_consumed_where(&mut self, retire: impl Fn(Lsn) -> bool) -> Vec<PathBuf> {
        let (done, keep): (Vec<_>, Vec<_>) =
            self.consumed.drain(..).partition(|(_, last)| retire(*last));
        self.consumed = keep;
        done.into_iter().map(|(p, _)| p).collect()
    }

    /// Updates the stream's lag gauges.
    pub fn update_lag(&self, m: &StreamMetrics) {
        let segments = reader::list_segments(&self.dir).unwrap_or_default();
        m.segments_pending
            .store(segments.len() as u64, Ordering::Relaxed);
        let written = self.written_seen.max(self.committed);
        m.lag_records
            .store(written - self.committed, Ordering::Relaxed);
        let bytes: u64 = segments
            .iter()
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .map(|md| md.len())
            .sum();
        m.lag_bytes.store(bytes, Ordering::Relaxed);
        let secs = self
            .oldest_pending
            .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        m.set_lag_seconds(secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AuditEvent;
    use crate::wal::{WalConfig, WalWriter, MIN_SEGMENT_SIZE};

    #[test]
    fn a_restarted_loader_retires_the_segments_an_earlier_run_committed_through() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = WalConfig::new(tmp.path(), "s").with_segment_size(MIN_SEGMENT_SIZE);
        let wal = WalWriter::open(cfg).expect("open");
        let e = AuditEvent::new("a.b").reason("r".repeat(400));
        while wal.stats().rotations < 2 {
            wal.append(&e).expect("append");
        }
        wal.close().expect("close");
        let dir = tmp.path().join("s");
        let segments = reader::list_segments(&dir).expect("list");
        let first_end = segments[1].first_lsn - 1;

        // An earlier run committed exactly through the first segment's
        // end-of-segment record and kept the segment (its checkpoint is in it).
        let from = Committed {
            lsn: first_end,
            ..Committed::default()
        };
        let mut cursor = Cursor::open(&dir, "s", from).expect("cursor");
        assert!(
            cursor.take_finished().is_empty(),
            "kept while it holds the checkpoint"
        );
        cursor.committed_through(first_end + 1);
        assert_eq!(cursor.take_finished(), vec![segments[0].path.clone()]);
    }
}
