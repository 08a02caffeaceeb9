//! Settling a stream whose writer is gone: making the records it left in the page
//! cache durable, so that a reader may load them.
//!
//! A reader loads only up to the durable watermark (`durable.lsn`): a record that
//! is in the page cache but not on disk can vanish in a power loss, and a writer
//! restarting after it would hand its LSN to a new event that a loader would then
//! skip as "already loaded". A writer killed with SIGKILL leaves its last interval
//! of records exactly there, above a stale watermark, and nobody would ever raise
//! it. Settling does what the writer's next flush would have done: under the
//! stream's writer lock (so no writer is appending meanwhile), fdatasync every
//! segment, find the last complete record (`format::scan_to_end`, the same end
//! of the log recovery finds), and publish its LSN as the watermark.
//! When a writer holds the lock it is alive and keeps the watermark itself;
//! settling then does nothing.
//!
//! The writer's lock is taken inside a second one, `SETTLE`
//! (`StreamDir::lock_to_settle`): a writer opening meanwhile sees it and waits
//! for the settle to finish (up to `SETTLE_WAIT`), instead of failing with
//! `StreamLocked` as it does when another writer holds the stream.

use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

/// Scanned bytes are released in steps of this size (a multiple of the page size).
const RELEASE_STEP: usize = 1 << 20;

use super::durable::Sidecar;
use super::error::WalError;
use super::format::{scan_to_end, Lsn, ScanItem};
use super::stream_dir::StreamDir;

/// What [`settle_idle_stream`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// A writer holds the stream (its own flusher keeps the watermark), or is
    /// taking it, or another reader is settling it.
    WriterActive,
    /// No writer: every complete record up to `durable_lsn` is now on disk and the
    /// watermark says so.
    Idle { durable_lsn: Lsn },
}

/// Settles `wal_dir/stream` if no writer holds it (see the module docs).
pub fn settle_idle_stream(wal_dir: &Path, stream: &str) -> Result<Settled, WalError> {
    let dir = StreamDir::open(wal_dir, stream)?;
    let _lock = match dir.lock_to_settle() {
        Ok(lock) => lock,
        Err(WalError::StreamLocked { .. }) => return Ok(Settled::WriterActive),
        Err(e) => return Err(e),
    };
    let segments = dir.segments()?;
    for seg in &segments {
        File::open(&seg.path)
            .and_then(|f| dir.fs().sync_data(&f, &seg.path))
            .map_err(|e| WalError::io("fdatasync", &seg.path, e))?;
    }
    let (sidecar, old) = Sidecar::open(dir.fs(), &dir.sidecar_path())?;
    let Some(last) = segments.last() else {
        return Ok(Settled::Idle {
            durable_lsn: old.unwrap_or(0),
        });
    };
    // Earlier segments are sealed; only the last one's end must be found.
    let file = File::open(&last.path).map_err(|e| WalError::io("open", &last.path, e))?;
    // SAFETY: we hold the stream's writer lock (see above), so no writer appends to or zeroes
    // this file while it is mapped; readers never write. The file is not shrunk by
    // anyone (writers cut torn tails by zeroing), so the map stays valid.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WalError::io("mmap", &last.path, e))?;
    let mut released = 0usize;
    let Ok(end) = scan_to_end(&map, |item| {
        if let ScanItem::Record { offset, .. } = item {
            // Hand scanned pages back as we go, so settling a full 64 MiB segment
            // does not make the loader's resident set grow by the segment's size.
            let upto = offset / RELEASE_STEP * RELEASE_STEP;
            if upto > released {
                // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops
                // this process's page table entries; a later access would fault the
                // same file contents back in. Nothing borrowed from [released, upto)
                // is used again: only LSNs and offsets are kept.
                let _ = unsafe {
                    map.unchecked_advise_range(UncheckedAdvice::DontNeed, released, upto - released)
                };
                released = upto;
            }
        }
        Ok::<(), std::convert::Infallible>(())
    });
    let last_lsn = end.last_lsn_or(last.first_lsn.saturating_sub(1));
    let durable_lsn = last_lsn.max(old.unwrap_or(0));
    if Some(durable_lsn) != old {
        sidecar.write(durable_lsn)?;
        sidecar.sync()?;
    }
    Ok(Settled::Idle { durable_lsn })
}
