//! The flusher: the only place records become durable.
//!
//! Its thread runs one sync round every `fsync_interval`, or at once when a
//! durable waiter wants an LSN beyond the watermark (and the previous round is
//! done). A round ([`Flusher::sync_round`]) fdatasyncs the segments written
//! since the last round, fsyncs the directory after a rotation, rewrites the
//! `durable.lsn` sidecar and publishes the durable LSN. Waiters that arrive
//! during a round are served by the next one, which starts as soon as this one
//! ends: one fdatasync covers every record written before it began (group
//! commit, with no timer window, so a lone durable append waits for one fsync
//! and nothing else).
//!
//! A failed round is not retried: after a failed fsync the kernel may have
//! dropped the dirty pages and marked them clean, so a retry could "succeed"
//! without the data. The writer is poisoned and the thread ends.
//!
//! The flusher knows files, fsyncs and the watermark; what a round covers is
//! taken from the writer through [`RoundSource`] (under the writer's append
//! mutex), so this module does not depend on the writer's internals.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::chain_writer::ChainWriter;
use super::durable::{Durability, Sidecar};
use super::error::WalError;
use super::format::Lsn;
use super::segment::Segment;
use super::stream_dir::StreamDir;

/// What the flusher syncs in one round, taken under the append mutex.
pub(crate) struct SyncRound {
    pub written: Lsn,
    pub active: Option<Arc<Segment>>,
    pub sealed: Vec<Arc<Segment>>,
    pub dir_dirty: bool,
    /// The last segment is sealed and has no successor (the budget was full).
    pub active_sealed: bool,
}

/// What a sync round needs from the writer it serves.
pub(crate) trait RoundSource {
    /// Appends a signed checkpoint record (also while closing); never blocks
    /// on a full disk.
    fn append_checkpoint(&self, note: &[u8]) -> Result<Lsn, WalError>;
    /// What the next round must cover, taken atomically with the written LSN:
    /// every record up to `written` is complete in `sealed` or `active`.
    fn take_sync_round(&self) -> SyncRound;
    /// The watermark a round raises and durable waiters wait on.
    fn durability(&self) -> &Durability;
    /// Puts the writer in its failed state after a failed round.
    fn poison(&self, failure: WalError);
}

/// The flusher of one stream: the sidecar it rewrites and the fsync figures.
#[derive(Debug)]
pub(crate) struct Flusher {
    dir: Arc<StreamDir>,
    sidecar: Sidecar,
    interval: Duration,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    /// The stream's hash chain, when the writer signs it.
    chain: Mutex<Option<ChainWriter>>,
}

impl Flusher {
    pub(crate) fn new(dir: Arc<StreamDir>, sidecar: Sidecar, interval: Duration) -> Flusher {
        Flusher {
            dir,
            sidecar,
            interval,
            fsyncs: AtomicU64::new(0),
            fsync_nanos: AtomicU64::new(0),
            chain: Mutex::new(None),
        }
    }

    /// Signs the stream's hash chain from now on (before the thread starts).
    pub(crate) fn set_chain(&self, chain: ChainWriter) {
        *self.lock_chain() = Some(chain);
    }

    pub(crate) fn lock_chain(&self) -> std::sync::MutexGuard<'_, Option<ChainWriter>> {
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a checkpoint if one is due (`closing`: for any unsigned event).
    /// Returns whether one was appended. A failed append is logged: the events
    /// stay in the chain, and a later checkpoint covers them.
    fn checkpoint_if_due(&self, writer: &impl RoundSource, closing: bool) -> bool {
        let note = match self.lock_chain().as_mut() {
            Some(chain) if chain.due(closing) => chain.sign(),
            _ => return false,
        };
        match writer.append_checkpoint(note.as_bytes()) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(stream = self.dir.name(), error = %e, "cannot append a signed checkpoint; the next one covers its events");
                false
            }
        }
    }

    /// The thread body; returns after the final round once shutdown is
    /// requested, or after a failed round.
    pub(crate) fn run(&self, writer: &impl RoundSource) {
        let mut last_round = Instant::now();
        loop {
            let shutdown = writer.durability().flusher_wait(last_round, self.interval);
            last_round = Instant::now();
            if let Err(failure) = self.sync_round(writer) {
                writer.poison(failure);
                return;
            }
            // At shutdown the final checkpoint needs a round of its own.
            if self.checkpoint_if_due(writer, shutdown) && shutdown {
                if let Err(failure) = self.sync_round(writer) {
                    writer.poison(failure);
                    return;
                }
            }
            if shutdown {
                return;
            }
        }
    }

    /// Rounds completed and the time their fdatasyncs took in total.
    pub(crate) fn fsyncs(&self) -> (u64, Duration) {
        (
            self.fsyncs.load(Ordering::Relaxed),
            Duration::from_nanos(self.fsync_nanos.load(Ordering::Relaxed)),
        )
    }

    /// fdatasyncs the sidecar (at close: a restart after a power loss then
    /// never sees a watermark older than the last clean shutdown).
    pub(crate) fn sync_sidecar(&self) -> Result<(), WalError> {
        self.sidecar.sync()
    }

    /// One round: fdatasync the segments sealed since the last round and the
    /// active one, fsync the directory if a segment was renamed in, then
    /// publish the written LSN taken before the syncs as durable. A failure is
    /// returned as [`WalError::SyncFailed`]; the caller poisons the writer.
    pub(crate) fn sync_round(&self, writer: &impl RoundSource) -> Result<(), WalError> {
        let round = writer.take_sync_round();
        let durability = writer.durability();
        let durable = durability.durable_lsn();
        if round.written <= durable && round.sealed.is_empty() && !round.dir_dirty {
            return Ok(());
        }
        let _span =
            tracing::trace_span!("fsync", stream = self.dir.name(), lsn = round.written).entered();
        let started = Instant::now();
        let failed = |path: &Path, e: std::io::Error| WalError::SyncFailed {
            path: path.to_path_buf(),
            durable_lsn: durable,
            source: Arc::new(e),
        };
        for segment in &round.sealed {
            segment.sync_data().map_err(|e| failed(segment.path(), e))?;
        }
        if let Some(active) = &round.active {
            active.sync_data().map_err(|e| failed(active.path(), e))?;
        }
        if round.dir_dirty {
            self.dir.sync().map_err(|e| match e {
                WalError::Io { source, .. } => WalError::SyncFailed {
                    path: self.dir.path().to_path_buf(),
                    durable_lsn: durable,
                    source,
                },
                other => other,
            })?;
        }
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.fsync_nanos.fetch_add(took, Ordering::Relaxed);
        // Sidecar first, then the waiters: once a caller learns its record is
        // durable, readers in other processes may load it too.
        if round.active_sealed {
            // A sealed last segment with no successor: no segment name carries
            // the LSN after it, and a loader may retire this segment once it has
            // loaded it (older loaders do; the current one keeps the newest), so
            // the watermark is the floor recovery continues from, and it must be
            // on disk. One extra fsync, only when the budget was full.
            let synced = self
                .sidecar
                .write(round.written)
                .and_then(|()| self.sidecar.sync());
            if let Err(e) = synced {
                let source = match e {
                    WalError::Io { source, .. } => source,
                    other => Arc::new(std::io::Error::other(other.to_string())),
                };
                return Err(WalError::SyncFailed {
                    path: self.dir.sidecar_path(),
                    durable_lsn: durable,
                    source,
                });
            }
        } else if let Err(e) = self.sidecar.write(round.written) {
            // Readers then lag behind; the data itself is durable.
            tracing::warn!(error = %super::error::chain(&e), "cannot update the durable watermark file");
        }
        durability.publish(round.written);
        // What this round made durable joins the hash chain.
        if let Some(chain) = self.lock_chain().as_mut() {
            let segments: Vec<&Arc<Segment>> =
                round.sealed.iter().chain(round.active.iter()).collect();
            chain.hash_round(&segments, round.written);
        }
        // Sealed segments are unmapped here, outside the append mutex.
        drop(round);
        Ok(())
    }
}
