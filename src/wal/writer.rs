//! The writer of one stream: appends from many threads and tasks, rotation,
//! the disk budget policy, durable waits, and shutdown.
//!
//! The append path is: encode the event into a per-thread reused buffer (no
//! lock held), then take the append mutex only to assign the LSN and write the
//! frame to the segment with one `pwrite` (`segment::ActiveSegment::append`,
//! whose module comment says why not a copy into the map); when `append`
//! returns, the record is in the page cache and survives a SIGKILL of the
//! process. Making it survive power loss is the
//! flusher's job (`flusher.rs`): fdatasync every `fsync_interval`, or at once
//! when a durable waiter is present, then publish the durable LSN
//! (`durable.rs`).
//!
//! Invariants kept under the append mutex: LSNs are assigned in file order with
//! no gap (the EndOfSegment record takes one too); `written_lsn` is stored only
//! after the record's bytes are complete, so the flusher, which reads it under
//! the same mutex, never declares a half-copied record durable; a segment is
//! renamed to its final name before its first record is appended; and no
//! appender holds the mutex across a system call or a wait. Rotation (sealing the
//! full segment, then taking the prepared spare or creating one, and renaming
//! it in) holds the mutex only to seal and to install: the slow middle runs
//! under a separate rotation mutex that other appenders needing the new
//! segment wait on, while the fast path of every other call never touches it.
//! That is what lets [`WalWriter::append_async`] promise a runtime thread is
//! never held: it tries the fast path, and hands an append that needs a new
//! segment to tokio's blocking pool. This module
//! leaves the byte layout to `format`/`payload`, the file handling to `segment`
//! and `stream_dir`, and repairing a crashed stream to `recovery`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::AuditEvent;

use super::budget::{BlockStep, BlockWait, DiskBudget, NoRoom};
use super::config::{FullDiskPolicy, WalConfig};
use super::durable::{Durability, Sidecar};
use super::error::WalError;
use super::flusher::{Flusher, RoundSource, SyncRound};
use super::chain_writer::{ChainWriter, HashCursor};
use super::format::{self, Lsn, RecordKind};
use super::fs::FileSystem;
use super::payload;
use super::preparer::SpareSlot;
use super::recovery::{self, RecoveryReport};
use super::segment::{ActiveSegment, Segment};
use super::stream_dir::{StreamDir, StreamLock};

/// How long an answer "no room for a segment" is reused before the directory is
/// listed again; keeps a flood of appends against a full budget cheap.
const NO_ROOM_RECHECK: Duration = Duration::from_millis(10);
/// A rotation slower than this is logged and counted: appends waited for it.
const SLOW_ROTATION: Duration = Duration::from_millis(20);
/// A per-thread encode buffer larger than this is released after use, so one
/// huge event does not pin memory in every thread that ever appended.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;

thread_local! {
    /// The reused payload buffer: encoding allocates nothing once it has grown.
    static PAYLOAD_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Encodes `event` into this thread's reused buffer and hands it to `f`.
fn with_encoded<T>(
    event: &AuditEvent,
    sample_rate: f64,
    f: impl FnOnce(&[u8]) -> Result<T, WalError>,
) -> Result<T, WalError> {
    PAYLOAD_BUF.with_borrow_mut(|buf| {
        buf.clear();
        let result = payload::encode_event(event, sample_rate, buf)
            .map_err(|e| WalError::Encode {
                reason: e.to_string(),
            })
            .and_then(|()| f(buf));
        if buf.capacity() > KEEP_BUFFER_BYTES {
            *buf = Vec::with_capacity(1024);
        }
        result
    })
}

/// What an async append does after the fast path.
enum AsyncStep {
    Done(Lsn),
    /// Rotate on the blocking pool (this call claimed it), then try again.
    Rotate(RotationClaim, usize),
    /// Another async call is rotating.
    AwaitRotation,
    /// No room under `Block`: the whole append waits on the blocking pool.
    Block(Vec<u8>),
}

/// An async call's claim to run the next rotation, so that the calls that
/// need it meanwhile await it instead of each starting a blocking-pool task.
/// Dropping it (after the rotation, or if it never ran) wakes them.
struct RotationClaim(Arc<Inner>);

impl RotationClaim {
    fn take(inner: &Arc<Inner>) -> Option<RotationClaim> {
        inner
            .rotation_claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| RotationClaim(inner.clone()))
    }
}

impl Drop for RotationClaim {
    fn drop(&mut self) {
        self.0.rotation_claimed.store(false, Ordering::SeqCst);
        self.0.rotated.notify_waiters();
    }
}

/// Runs `f` on tokio's blocking pool and waits for it. A panic in `f` is
/// resumed here, as if `f` had run inline.
async fn on_blocking_pool<T: Send + 'static>(
    inner: &Inner,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WalError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => Ok(value),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down and never ran it: nothing was written.
            Err(e) => Err(WalError::io(
                "append on the blocking pool to",
                inner.dir.path(),
                std::io::Error::other(e.to_string()),
            )),
        },
    }
}

/// What the append fast path found.
enum FastAppend {
    Appended(Lsn),
    /// No room for a new segment, known without I/O (a recent answer).
    NoRoom(NoRoom),
    /// The record needs a new segment: rotation must run.
    NeedsSegment,
}

/// Why a rotation runs, for telling a stall of appends from the start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotation {
    /// The stream's first segment, created by open: no append waits.
    AtOpen,
    /// The active segment is full (or absent): appends wait for the next one.
    Full,
}

/// Counters a user would page on; read with [`WalWriter::stats`].
#[derive(Debug, Default)]
struct Counters {
    dropped_events: AtomicU64,
    rotations: AtomicU64,
    slow_rotations: AtomicU64,
}

/// A snapshot of the writer's watermarks and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStats {
    /// Last LSN whose record is in the page cache.
    pub written_lsn: Lsn,
    /// Last LSN covered by a completed fsync.
    pub durable_lsn: Lsn,
    /// Events refused under [`FullDiskPolicy::DropNewest`].
    pub dropped_events: u64,
    /// Segments started since open.
    pub rotations: u64,
    /// Rotations after open that kept appends waiting longer than 20 ms (each
    /// is also logged as a warning). Starting the first segment at open is not
    /// one: no append waits for it.
    pub slow_rotations: u64,
    /// fdatasync rounds completed by the flusher.
    pub fsyncs: u64,
    /// Time spent in those rounds' fdatasyncs, in total (divide by `fsyncs`
    /// for the device's sync latency, the floor of a durable append).
    pub fsync_time: Duration,
}

/// Mutable state behind the append mutex.
#[derive(Debug)]
pub(crate) struct AppendState {
    /// The segment appends go to; `None` until the first segment exists (new
    /// stream, last segment sealed, or no room for a new one yet).
    active: Option<ActiveSegment>,
    /// LSN of the next record.
    next_lsn: Lsn,
    /// Segments sealed since the flusher's last round: it fdatasyncs them before
    /// publishing any LSN, then drops them (unmapping outside this mutex).
    sealed: Vec<Arc<Segment>>,
    /// A segment was renamed into place since the last directory fsync.
    dir_dirty: bool,
    failure: Option<WalError>,
    closed: bool,
    /// The last "no room" answer and when it was given.
    no_room: Option<(Instant, NoRoom)>,
}

/// Everything the writer's threads share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: WalConfig,
    pub(crate) dir: Arc<StreamDir>,
    state: Mutex<AppendState>,
    /// Serialises rotations: held while the next segment is obtained (taken
    /// from the preparer, waited for, or created) and installed, so that only
    /// one caller does it and the append mutex is not held meanwhile. Lock
    /// order: `rotation` before `state`.
    rotation: Mutex<()>,
    /// An async append has claimed the next rotation ([`RotationClaim`]).
    rotation_claimed: AtomicBool,
    /// Woken when a claimed rotation ends.
    rotated: tokio::sync::Notify,
    written: AtomicU64,
    pub(crate) durability: Durability,
    /// Makes records durable: the sync rounds, run by its own thread.
    flusher: Flusher,
    spares: Arc<SpareSlot>,
    counters: Counters,
    /// Largest frame a new segment can take (with its EndOfSegment after it).
    max_frame_len: usize,
}

#[derive(Debug, Default)]
struct Lifecycle {
    flusher: Option<JoinHandle<()>>,
    preparer: Option<JoinHandle<()>>,
    lock: Option<StreamLock>,
    /// Set by the first `close`; later calls return the same outcome.
    closed: Option<Result<(), WalError>>,
}

/// The writer of one WAL stream. Share it between threads and tasks behind an
/// `Arc`; every method takes `&self`.
///
/// Guarantees, in user terms:
/// - when [`append`](Self::append) returns `Ok(lsn)`, the record is in the
///   segment file (page cache): it survives the process being killed, and a
///   power loss loses at most the last `fsync_interval` of records;
/// - when [`append_durable`](Self::append_durable) (or
///   [`wait_durable`](Self::wait_durable) for that LSN) returns `Ok`, an
///   fdatasync covering the record has completed: it survives power loss;
/// - LSNs returned are strictly increasing in append order;
/// - after a failed fsync every call returns [`WalError::SyncFailed`].
#[derive(Debug)]
pub struct WalWriter {
    inner: Arc<Inner>,
    lifecycle: Mutex<Lifecycle>,
    recovery: RecoveryReport,
}

impl WalWriter {
    /// Opens (creating if needed) the stream `config.dir/config.stream`, takes its
    /// lock, recovers it, and starts the flusher (and the thread that prepares the
    /// next segment ahead).
    pub fn open(config: WalConfig) -> Result<WalWriter, WalError> {
        WalWriter::open_on(super::fs::real(), config)
    }

    /// [`WalWriter::open`] with every file change going through `fs` (the
    /// power-loss model's way in; production passes the real file system).
    pub(crate) fn open_on(
        fs: Arc<dyn FileSystem>,
        config: WalConfig,
    ) -> Result<WalWriter, WalError> {
        config.validate()?;
        let dir = Arc::new(StreamDir::open_on(fs, &config.dir, &config.stream)?);
        let lock = dir.lock()?;
        let (sidecar, durable_hint) = Sidecar::open(dir.fs(), &dir.sidecar_path())?;
        let recovered = recovery::recover(&dir, durable_hint)?;
        let budget = DiskBudget {
            limit: config.disk_budget,
            segment_size: config.segment_size,
        };
        budget.report_at_open(&dir)?;

        // Recovery fdatasynced everything it kept, so all of it is durable.
        let last_lsn = recovered.next_lsn - 1;
        sidecar.write(last_lsn)?;
        sidecar.sync()?;
        let segment_size =
            usize::try_from(config.segment_size).map_err(|_| WalError::InvalidConfig {
                setting: "segment_size",
                reason: "does not fit in memory".into(),
            })?;
        let max_frame_len = segment_size - format::SEGMENT_HEADER_LEN - format::EOS_FRAME_LEN;
        let inner = Arc::new(Inner {
            durability: Durability::new(dir.name(), last_lsn),
            flusher: Flusher::new(dir.clone(), sidecar, config.fsync_interval),
            spares: Arc::new(SpareSlot::new(
                dir.clone(),
                budget,
                config.zero_fill_segments,
            )),
            dir,
            state: Mutex::new(AppendState {
                active: recovered.active,
                next_lsn: recovered.next_lsn,
                sealed: Vec::new(),
                dir_dirty: false,
                failure: None,
                closed: false,
                no_room: None,
            }),
            rotation: Mutex::new(()),
            rotation_claimed: AtomicBool::new(false),
            rotated: tokio::sync::Notify::new(),
            written: AtomicU64::new(last_lsn),
            counters: Counters::default(),
            max_frame_len,
            config,
        });
        tracing::info!(
            stream = inner.dir.name(),
            next_lsn = recovered.next_lsn,
            segments = recovered.report.segments_found,
            "WAL writer open"
        );

        // Start the first segment now when there is none to append to, so the
        // first append does not wait for it and a full disk shows at open; no
        // room is not fatal here (the policy applies to the first append, which
        // tries again).
        if inner.lock_state().active.is_none() {
            match inner.rotate(0, Rotation::AtOpen)? {
                Ok(()) => {}
                Err(no_room) => tracing::warn!(
                    ?no_room,
                    "no room for the stream's first segment; appends wait for space per policy"
                ),
            }
        }

        if let Some(key) = &inner.config.chain_key {
            inner.start_chain(key)?;
        }

        let mut lifecycle = Lifecycle {
            lock: Some(lock),
            ..Lifecycle::default()
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("{name}-{}", inner.dir.name()))
                .spawn(f)
                .map_err(|e| WalError::io("start thread for", inner.dir.path(), e))
        };
        let flusher_inner = inner.clone();
        lifecycle.flusher = Some(spawn(
            "wal-flush",
            Box::new(move || flusher_inner.flusher.run(&*flusher_inner)),
        )?);
        if inner.config.prepare_next_segment {
            let slot = inner.spares.clone();
            lifecycle.preparer = Some(spawn("wal-prepare", Box::new(move || slot.run()))?);
            inner.spares.request();
        }
        Ok(WalWriter {
            inner,
            lifecycle: Mutex::new(lifecycle),
            recovery: recovered.report,
        })
    }

    /// Appends `event` (not sampled: sample rate 1.0). See [`append_with_rate`](Self::append_with_rate).
    pub fn append(&self, event: &AuditEvent) -> Result<Lsn, WalError> {
        self.append_with_rate(event, 1.0)
    }

    /// Appends `event`, recording that it was kept at `sample_rate` (in (0, 1]).
    /// Returns its LSN once the record is in the page cache. Does not validate
    /// the event (callers run [`AuditEvent::validate`] first).
    ///
    /// Blocks the thread when the record needs a new segment: for the spare
    /// segment's rename (microseconds), for the preparer to finish it or for
    /// creating it here (tens of milliseconds for 64 MiB) when it is not ready,
    /// and, under [`FullDiskPolicy::Block`], for freed disk budget (up to its
    /// timeout). From async code use [`append_with_rate_async`](Self::append_with_rate_async).
    pub fn append_with_rate(&self, event: &AuditEvent, sample_rate: f64) -> Result<Lsn, WalError> {
        with_encoded(event, sample_rate, |payload| {
            self.inner.append_payload(payload)
        })
    }

    /// Appends a payload already encoded by [`payload::encode_event`]: the
    /// append alone, for benches that compare a whole audit call with it. The
    /// bytes are not checked; a payload that does not decode is skipped as
    /// damage by readers.
    #[doc(hidden)]
    pub fn append_encoded(&self, payload: &[u8]) -> Result<Lsn, WalError> {
        self.inner.append_payload(payload)
    }

    /// [`append`](Self::append) for async code. See [`append_with_rate_async`](Self::append_with_rate_async).
    pub async fn append_async(&self, event: &AuditEvent) -> Result<Lsn, WalError> {
        self.append_with_rate_async(event, 1.0).await
    }

    /// [`append_with_rate`](Self::append_with_rate) without holding the runtime
    /// thread: the common case (the record fits in the current segment) is the
    /// same `pwrite` under the append mutex, done inline. When a new segment
    /// is needed, one call runs the rotation on tokio's blocking pool and the
    /// others that need it meanwhile await it (one blocking-pool task per
    /// rotation, however many calls wait); an append that must wait for disk
    /// budget under [`FullDiskPolicy::Block`] waits on the blocking pool.
    /// Refusals (`Fail`, `DropNewest`) are returned inline once a rotation
    /// found no room.
    ///
    /// Cancelling the future while it waits on the blocking pool does not stop
    /// that append: the record may still be written, without a receipt.
    pub async fn append_with_rate_async(
        &self,
        event: &AuditEvent,
        sample_rate: f64,
    ) -> Result<Lsn, WalError> {
        let blocks = matches!(
            self.inner.config.full_disk_policy,
            FullDiskPolicy::Block { .. }
        );
        loop {
            let step = with_encoded(event, sample_rate, |payload| {
                let frame_len = self.inner.frame_len_for(payload)?;
                Ok(match self.inner.try_append(RecordKind::Event, payload, frame_len)? {
                    FastAppend::Appended(lsn) => AsyncStep::Done(lsn),
                    FastAppend::NoRoom(no_room) if !blocks => {
                        return Err(self.inner.refuse(no_room))
                    }
                    // Owned, for the blocking pool, which sleeps out the policy.
                    FastAppend::NoRoom(_) => AsyncStep::Block(payload.to_vec()),
                    FastAppend::NeedsSegment => match RotationClaim::take(&self.inner) {
                        Some(claim) => AsyncStep::Rotate(claim, frame_len),
                        None => AsyncStep::AwaitRotation,
                    },
                })
            })?;
            match step {
                AsyncStep::Done(lsn) => return Ok(lsn),
                // Another call is rotating: wait for it, then try again. One
                // blocking-pool task per rotation, however many calls need it.
                AsyncStep::AwaitRotation => {
                    let rotated = self.inner.rotated.notified();
                    let mut rotated = std::pin::pin!(rotated);
                    // Registered before looking again, so that the rotation
                    // ending in between still wakes this call.
                    rotated.as_mut().enable();
                    if self.inner.rotation_claimed.load(Ordering::SeqCst) {
                        rotated.await;
                    }
                }
                AsyncStep::Rotate(claim, frame_len) => {
                    let inner = self.inner.clone();
                    let rotation = on_blocking_pool(&self.inner, move || {
                        let _claim = claim;
                        inner.rotate(frame_len, Rotation::Full)
                    });
                    if let Err(no_room) = rotation.await?? {
                        if !blocks {
                            return Err(self.inner.refuse(no_room));
                        }
                    }
                }
                AsyncStep::Block(payload) => {
                    let inner = self.inner.clone();
                    return on_blocking_pool(&self.inner, move || inner.append_payload(&payload))
                        .await?;
                }
            }
        }
    }

    /// Appends `event` and returns once an fdatasync covering it completed.
    /// Concurrent durable appends share fsyncs (group commit). Blocks the thread:
    /// from async code use [`append_durable_async`](Self::append_durable_async).
    pub fn append_durable(&self, event: &AuditEvent) -> Result<Lsn, WalError> {
        let lsn = self.append(event)?;
        self.wait_durable(lsn)?;
        Ok(lsn)
    }

    /// [`append_durable`](Self::append_durable) for async code: the copy happens
    /// at once, the wait for the fsync does not block the runtime thread.
    pub async fn append_durable_async(&self, event: &AuditEvent) -> Result<Lsn, WalError> {
        let lsn = self.append_async(event).await?;
        self.wait_durable_async(lsn).await?;
        Ok(lsn)
    }

    /// Blocks until `lsn` (returned by an append) is durable.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        self.check_waitable(lsn)?;
        self.inner.durability.wait(lsn)
    }

    /// Waits, without blocking the thread, until `lsn` is durable. Cancel-safe.
    pub async fn wait_durable_async(&self, lsn: Lsn) -> Result<(), WalError> {
        self.check_waitable(lsn)?;
        self.inner.durability.wait_async(lsn).await
    }

    /// A wait for an LSN never written would never end (and would keep the
    /// flusher syncing): refuse it.
    fn check_waitable(&self, lsn: Lsn) -> Result<(), WalError> {
        let written = self.written_lsn();
        if lsn > written {
            return Err(WalError::LsnNotWritten { lsn, written });
        }
        Ok(())
    }

    /// Counts `counter`'s increments (the service's sampled-out events) in each
    /// signed checkpoint, so that sampling is on the record. No-op without a
    /// chain key.
    pub fn count_sampled_out(&self, counter: Arc<AtomicU64>) {
        if let Some(chain) = self.inner.flusher.lock_chain().as_mut() {
            chain.count_sampled_out(counter);
        }
    }

    /// Last LSN whose record is in the page cache (including EndOfSegment records).
    pub fn written_lsn(&self) -> Lsn {
        self.inner.written.load(Ordering::Acquire)
    }

    /// Last LSN covered by a completed fsync (also in the `durable.lsn` sidecar).
    pub fn durable_lsn(&self) -> Lsn {
        self.inner.durability.durable_lsn()
    }

    /// Watermarks and counters.
    pub fn stats(&self) -> WalStats {
        let c = &self.inner.counters;
        let (fsyncs, fsync_time) = self.inner.flusher.fsyncs();
        WalStats {
            written_lsn: self.written_lsn(),
            durable_lsn: self.durable_lsn(),
            dropped_events: c.dropped_events.load(Ordering::Relaxed),
            rotations: c.rotations.load(Ordering::Relaxed),
            slow_rotations: c.slow_rotations.load(Ordering::Relaxed),
            fsyncs,
            fsync_time,
        }
    }

    /// The failure that stopped this writer (a failed fsync), if any: set by
    /// the flusher the moment it happens, so a monitor sees it without waiting
    /// for the next append to be refused.
    pub fn failure(&self) -> Option<WalError> {
        self.inner.durability.failure()
    }

    /// What recovery found when this writer opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The stream's directory.
    pub fn stream_dir(&self) -> &std::path::Path {
        self.inner.dir.path()
    }

    /// Stops accepting appends, fsyncs everything written, writes and fsyncs the
    /// durable watermark, stops the background threads and releases the stream
    /// lock. Idempotent: later calls return the first call's outcome. Also run by
    /// `Drop` (which can only log a failure).
    pub fn close(&self) -> Result<(), WalError> {
        let mut lc = self
            .lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(outcome) = &lc.closed {
            return outcome.clone();
        }
        self.inner.lock_state().closed = true;
        // A rotation under way finishes first (installing its segment, which the
        // flusher's last round then syncs), so nothing is renamed into the
        // directory after the stream lock is released.
        drop(
            self.inner
                .rotation
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.inner.spares.shutdown();
        if let Some(h) = lc.preparer.take() {
            if h.join().is_err() {
                tracing::error!("the segment preparer thread panicked");
            }
        }
        self.inner.durability.request_shutdown();
        if let Some(h) = lc.flusher.take() {
            if h.join().is_err() {
                tracing::error!("the WAL flusher thread panicked");
            }
        }
        // The flusher's last round synced everything; this is a no-op unless
        // that thread died, in which case it is the final sync.
        let outcome = match self.inner.durability.failure() {
            Some(failure) => Err(failure),
            None => self
                .inner
                .flusher
                .sync_round(&*self.inner)
                .and_then(|()| self.inner.flusher.sync_sidecar()),
        };
        if let Err(e) = &outcome {
            self.inner.poison(e.clone());
        }
        self.inner.durability.mark_closed();
        {
            // Unmap now rather than when the last Arc goes.
            let mut st = self.inner.lock_state();
            st.active = None;
            st.sealed.clear();
        }
        lc.lock = None;
        lc.closed = Some(outcome.clone());
        tracing::info!(
            stream = self.inner.dir.name(),
            durable_lsn = self.durable_lsn(),
            "WAL writer closed"
        );
        outcome
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %super::error::chain(&e), "closing the WAL writer failed");
        }
    }
}

impl Inner {
    /// Locks the append state. A panic while holding it could only have
    /// happened before `write_off`/`next_lsn` moved (they change after the copy
    /// succeeds), so the state is consistent and poisoning is ignored; a
    /// half-copied frame there is overwritten by the next append.
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, AppendState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stream(&self) -> &str {
        self.dir.name()
    }

    /// The frame length of `payload`, or `EventTooLarge` if no segment can take it.
    fn frame_len_for(&self, payload: &[u8]) -> Result<usize, WalError> {
        let frame_len = format::frame_len(payload.len());
        if frame_len > self.max_frame_len {
            return Err(WalError::EventTooLarge {
                len: frame_len,
                max: self.max_frame_len,
            });
        }
        Ok(frame_len)
    }

    /// The fast path: LSN assignment and copy under the append mutex, when the
    /// active segment has room. Makes no system call and never waits (but for
    /// the mutex, which no one holds across either).
    fn try_append(
        &self,
        kind: RecordKind,
        payload: &[u8],
        frame_len: usize,
    ) -> Result<FastAppend, WalError> {
        let mut st = self.lock_state();
        // A checkpoint is still taken while closing: the flusher signs the
        // last events before its final round (no rotation then, see
        // `append_checkpoint`).
        let refusal = match kind {
            RecordKind::Checkpoint => st.failure.clone(),
            _ => st.refusal(self.stream()),
        };
        if let Some(e) = refusal {
            return Err(e);
        }
        let st = &mut *st;
        if let Some(active) = st.active.as_mut().filter(|a| a.has_room_for(frame_len)) {
            let lsn = st.next_lsn;
            active.append(lsn, kind, payload)?;
            st.next_lsn = lsn + 1;
            self.written.store(lsn, Ordering::Release);
            return Ok(FastAppend::Appended(lsn));
        }
        Ok(match st.fresh_no_room() {
            Some(no_room) => FastAppend::NoRoom(no_room),
            None => FastAppend::NeedsSegment,
        })
    }

    /// The whole append path: the fast path, rotation when a new segment is
    /// needed, and the full-disk policy when it has no room. May block (see
    /// [`WalWriter::append_with_rate`]).
    fn append_payload(&self, payload: &[u8]) -> Result<Lsn, WalError> {
        let frame_len = self.frame_len_for(payload)?;
        let mut block = BlockWait::for_policy(self.config.full_disk_policy);
        loop {
            let no_room = match self.try_append(RecordKind::Event, payload, frame_len)? {
                FastAppend::Appended(lsn) => return Ok(lsn),
                FastAppend::NoRoom(no_room) => no_room,
                FastAppend::NeedsSegment => match self.rotate(frame_len, Rotation::Full)? {
                    Ok(()) => continue,
                    Err(no_room) => no_room,
                },
            };
            self.on_no_room(no_room, block.as_mut())?;
        }
    }

    /// Applies the full-disk policy to an append that found no room for a new
    /// segment: an error, or (`Block`, `block` within its timeout) a short sleep
    /// after which the caller tries again. No lock is held: a blocked append
    /// must not stop close(), and other appenders apply the policy on their own.
    fn on_no_room(&self, no_room: NoRoom, block: Option<&mut BlockWait>) -> Result<(), WalError> {
        let Some(block) = block else {
            return Err(self.refuse(no_room));
        };
        match block.next() {
            BlockStep::GiveUp { waited } => Err(no_room.into_error(self.stream(), waited)),
            BlockStep::Sleep(pause) => {
                std::thread::sleep(pause);
                Ok(())
            }
        }
    }

    /// The error for an append that found no room under `Fail` or
    /// `DropNewest` (which counts the drop). No I/O.
    fn refuse(&self, no_room: NoRoom) -> WalError {
        if self.config.full_disk_policy != FullDiskPolicy::DropNewest {
            return no_room.into_error(self.stream(), Duration::ZERO);
        }
        let total = self.counters.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
        if total.is_power_of_two() {
            tracing::warn!(
                stream = self.stream(),
                dropped_total = total,
                ?no_room,
                "dropping new events: the stream is out of disk budget"
            );
        }
        WalError::EventDropped {
            stream: self.stream().to_string(),
            dropped_total: total,
        }
    }

    /// Seals the current segment (if not sealed yet) and starts the next one,
    /// unless another caller already did while this one waited for the
    /// rotation mutex (then the active segment has room for `frame_len`).
    /// `Ok(Err(no_room))` when the budget or the disk has no room for it: the
    /// caller applies the policy; the sealed segment stays as it is, which is a
    /// valid end of the log if the process stops now.
    ///
    /// The append mutex is held only to seal and to install; taking, waiting
    /// for or creating the spare and renaming it happen under `rotation` alone.
    /// Meanwhile no append can take an LSN (the active segment is sealed or
    /// absent, and appenders that need the next one wait for `rotation`), so
    /// the next LSN read after sealing is still the new segment's first.
    fn rotate(&self, frame_len: usize, why: Rotation) -> Result<Result<(), NoRoom>, WalError> {
        let _rotating = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let first_lsn = {
            let mut st = self.lock_state();
            if let Some(e) = st.refusal(self.stream()) {
                return Err(e);
            }
            let st = &mut *st;
            if let Some(active) = st.active.as_mut() {
                if active.has_room_for(frame_len) {
                    return Ok(Ok(()));
                }
                if !active.is_sealed() {
                    let eos = st.next_lsn;
                    active.seal(eos)?;
                    st.next_lsn = eos + 1;
                    self.written.store(eos, Ordering::Release);
                }
            }
            if let Some(no_room) = st.fresh_no_room() {
                return Ok(Err(no_room));
            }
            st.next_lsn
        };
        let _span = tracing::debug_span!("rotate", stream = self.stream(), first_lsn).entered();
        let spare = match self.spares.take_or_create()? {
            Ok(spare) => spare,
            Err(no_room) => {
                self.lock_state().no_room = Some((Instant::now(), no_room.clone()));
                return Ok(Err(no_room));
            }
        };
        let got_spare = started.elapsed();
        let segment = spare.install(&self.dir.segment_path(first_lsn), self.stream(), first_lsn)?;
        {
            let mut st = self.lock_state();
            st.no_room = None;
            let fresh = ActiveSegment::new(Arc::new(segment), format::SEGMENT_HEADER_LEN);
            if let Some(old) = st.active.replace(fresh) {
                st.sealed.push(old.segment().clone());
            }
            st.dir_dirty = true;
        }
        let stall = started.elapsed();
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        // At open no append is waiting: creating the first segment there, with
        // no spare prepared yet, is expected to take a while.
        if why == Rotation::Full && stall > SLOW_ROTATION {
            self.counters.slow_rotations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stream = self.stream(),
                stall_ms = stall.as_secs_f64() * 1e3,
                waiting_for_spare_ms = got_spare.as_secs_f64() * 1e3,
                "slow segment rotation (a slow fdatasync, or the next segment was not prepared in time)"
            );
        }
        if self.config.prepare_next_segment {
            self.spares.request();
        }
        Ok(Ok(()))
    }

    /// Resumes (or starts) the stream's hash chain and hands it to the
    /// flusher, before its thread starts (`wal::chain_writer`).
    fn start_chain(&self, key: &std::path::Path) -> Result<(), WalError> {
        let end = {
            let st = self.lock_state();
            match st.active.as_ref().filter(|a| !a.is_sealed()) {
                Some(a) => HashCursor {
                    seg_first: a.segment().first_lsn(),
                    offset: a.write_off(),
                    next_lsn: st.next_lsn,
                },
                None => HashCursor {
                    seg_first: st.next_lsn,
                    offset: format::SEGMENT_HEADER_LEN,
                    next_lsn: st.next_lsn,
                },
            }
        };
        let opened = ChainWriter::open(
            key,
            self.dir.path(),
            self.dir.name(),
            end,
            self.config.checkpoint_every,
            self.config.checkpoint_interval,
        )?;
        if let Some(epoch) = opened.epoch {
            // Before any event: the loader restarts its chain here too.
            if let Err(e) = self.append_checkpoint(epoch.as_bytes()) {
                tracing::warn!(stream = self.stream(), error = %e, "cannot start the hash chain; this run's events go unsigned");
                return Ok(());
            }
        }
        self.flusher.set_chain(opened.chain);
        Ok(())
    }

    /// Puts the writer in its failed state: every later append and wait returns
    /// `failure`. Not undone: the kernel may have dropped the unsynced pages.
    pub(crate) fn poison(&self, failure: WalError) {
        tracing::error!(stream = self.stream(), error = %super::error::chain(&failure), "WAL writer failed; appends are refused from now on");
        {
            let mut st = self.lock_state();
            if st.failure.is_none() {
                st.failure = Some(failure.clone());
            }
        }
        self.durability.fail(failure);
    }
}

impl RoundSource for Inner {
    fn append_checkpoint(&self, note: &[u8]) -> Result<Lsn, WalError> {
        let frame_len = self.frame_len_for(note)?;
        loop {
            let no_room = match self.try_append(RecordKind::Checkpoint, note, frame_len)? {
                FastAppend::Appended(lsn) => return Ok(lsn),
                FastAppend::NoRoom(no_room) => no_room,
                // No new segment once closing: the preparer is gone, and the
                // events stay unsigned until the next open resumes the chain.
                FastAppend::NeedsSegment if self.lock_state().closed => {
                    return Err(WalError::Closed {
                        stream: self.stream().to_string(),
                    })
                }
                FastAppend::NeedsSegment => match self.rotate(frame_len, Rotation::Full)? {
                    Ok(()) => continue,
                    Err(no_room) => no_room,
                },
            };
            // Never blocks the flusher: the next checkpoint tries again.
            return Err(no_room.into_error(self.stream(), Duration::ZERO));
        }
    }

    fn take_sync_round(&self) -> SyncRound {
        let mut st = self.lock_state();
        SyncRound {
            written: self.written.load(Ordering::Acquire),
            active: st.active.as_ref().map(|a| a.segment().clone()),
            sealed: std::mem::take(&mut st.sealed),
            dir_dirty: std::mem::take(&mut st.dir_dirty),
            active_sealed: st.active.as_ref().is_some_and(ActiveSegment::is_sealed),
        }
    }

    fn durability(&self) -> &Durability {
        &self.durability
    }

    fn poison(&self, failure: WalError) {
        Inner::poison(self, failure);
    }
}

impl AppendState {
    /// The last "no room" answer, while it is recent enough to reuse.
    fn fresh_no_room(&self) -> Option<NoRoom> {
        self.no_room
            .as_ref()
            .filter(|(at, _)| at.elapsed() < NO_ROOM_RECHECK)
            .map(|(_, no_room)| no_room.clone())
    }

    /// The error an append gets when the writer cannot take it at all.
    fn refusal(&self, stream: &str) -> Option<WalError> {
        if let Some(f) = &self.failure {
            return Some(f.clone());
        }
        if self.closed {
            return Some(WalError::Closed {
                stream: stream.to_string(),
            });
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::mem::ManuallyDrop;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// Points the active segment's descriptor at /dev/null, whose fdatasync
    /// fails with EINVAL: a real failed fsync on the flusher's real path. The
    /// map stays valid (it does not depend on the descriptor).
    pub(crate) fn break_fdatasync(wal: &WalWriter) {
        let st = wal.inner.lock_state();
        let segment = st.active.as_ref().expect("active segment").segment();
        let raw = segment.file_for_test().as_raw_fd();
        // Writable: appends (pwrite) still succeed, into /dev/null; only the
        // fdatasync fails (EINVAL).
        let dev_null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null");
        // SAFETY: `raw` stays owned by the segment's File; ManuallyDrop keeps
        // this second owner from closing it. dup2 only replaces what it refers to.
        let mut target = ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(raw) });
        rustix::io::dup2(&dev_null, &mut target).expect("dup2");
    }

    #[test]
    fn a_failed_fdatasync_poisons_the_writer_for_every_later_call() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = WalConfig::new(tmp.path(), "s1").with_fsync_interval(Duration::from_secs(3600));
        let wal = WalWriter::open(cfg).expect("open");
        let first = wal
            .append_durable(&AuditEvent::new("a.1"))
            .expect("durable append");

        break_fdatasync(&wal);
        let second = wal
            .append(&AuditEvent::new("a.2"))
            .expect("append is in the page cache");
        match wal.wait_durable(second) {
            Err(WalError::SyncFailed { durable_lsn, .. }) => assert_eq!(durable_lsn, first),
            other => panic!("expected SyncFailed, got {other:?}"),
        }
        assert_eq!(
            wal.durable_lsn(),
            first,
            "the failed round published nothing"
        );
        // Every later call says why, and the fsync is not retried into success.
        assert!(matches!(
            wal.append(&AuditEvent::new("a.3")),
            Err(WalError::SyncFailed { .. })
        ));
        assert!(matches!(
            wal.append_durable(&AuditEvent::new("a.4")),
            Err(WalError::SyncFailed { .. })
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(matches!(
            rt.block_on(wal.wait_durable_async(second)),
            Err(WalError::SyncFailed { .. })
        ));
        // What was durable before stays durable.
        wal.wait_durable(first).expect("already durable");
        assert!(matches!(wal.close(), Err(WalError::SyncFailed { .. })));
    }
}
