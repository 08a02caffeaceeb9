//! The entry point an application records audit events through: [`AuditLog`].
//!
//! This module owns the dispatch of one call to its mode (sync → the
//! PostgreSQL [`SyncWriter`]; durable, async and sampled → this process's WAL
//! stream through [`WalWriter`]), the receipt each call returns, and the
//! counters of everything that happened ([`AuditLog::stats`]). Its invariants:
//!
//! - an event is validated (with `max_event_bytes`) before anything is
//!   written, so a refused event leaves no trace anywhere;
//! - a receipt is returned only for what the mode promises (committed,
//!   fsynced, or in the page cache); everything else is an error to the caller;
//! - no call blocks a runtime thread on a wait or on file work: the WAL copy
//!   is done inline (one `pwrite` of the frame into the page cache, under a
//!   mutex that no appender holds across any other system call or a wait); an append that needs a new segment (rotation:
//!   taking the prepared spare and renaming it in, waiting for the preparer,
//!   or creating the segment when none is ready) runs on tokio's blocking
//!   pool and is awaited ([`WalWriter::append_with_rate_async`]); durable
//!   waits are async; the full-disk policy `Block` is carried out here as an
//!   async wait (the writer itself is opened with `Fail`, and a refused append
//!   is retried after a short sleep until the block timeout, by the same rule
//!   the writer's own blocking wait follows, `wal::BlockWait`); opening and
//!   closing the stream run on the blocking pool. What is left on the runtime
//!   thread: that `pwrite` can wait in the kernel (with `zero_fill_segments =
//!   false` the first write into each block of a segment starts a file-system
//!   journal transaction, which can take milliseconds under heavy writeback,
//!   and the kernel throttles any writer when dirty pages pass its limit), and dropping the last clone
//!   without [`AuditLog::close`] fsyncs in `Drop`. docs/modes.md says the same;
//! - failures are counted and logged at most once per second per kind, with the
//!   number of lines suppressed since the last one.
//!
//! What can be lost in each mode, and when, is in docs/modes.md. Sampling
//! decisions are `sampling`'s, the settings `config`'s, the bytes and fsyncs the
//! WAL's, and getting appended records into PostgreSQL the loader's (another
//! process, with its own metrics).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::config::{Config, ConfigError, Mode};
use crate::event::{AuditEvent, EventError};
use crate::pg::reconnect::Reconnect;
use crate::pg::{PgError, RowId, SyncWriter};
use crate::sampling::{Decision, Sampler};
use crate::wal::error::chain;
use crate::wal::{BlockStep, BlockWait, FullDiskPolicy, Lsn, WalError, WalStats, WalWriter};
/// At most one log line per failure kind in this period.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// What a successful call got: the event's id and where it now is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Receipt {
    /// Sync: committed in PostgreSQL as row `row_id` (`audit_events.id`).
    Committed { event_id: Uuid, row_id: RowId },
    /// Durable: an fsync covering WAL record `lsn` completed.
    Durable { event_id: Uuid, lsn: Lsn },
    /// Async, or sampled and kept: WAL record `lsn` is in the page cache (safe
    /// from a process crash; from power loss after the next fsync). The row
    /// will carry `sample_rate` (1.0 for async and for forced keeps).
    Appended {
        event_id: Uuid,
        lsn: Lsn,
        sample_rate: f64,
    },
    /// Sampled mode did not keep the event; nothing was written.
    SampledOut { event_id: Uuid },
}

impl Receipt {
    pub fn event_id(&self) -> Uuid {
        match *self {
            Receipt::Committed { event_id, .. }
            | Receipt::Durable { event_id, .. }
            | Receipt::Appended { event_id, .. }
            | Receipt::SampledOut { event_id } => event_id,
        }
    }

    /// The WAL record's LSN (durable, async, sampled and kept).
    pub fn lsn(&self) -> Option<Lsn> {
        match *self {
            Receipt::Durable { lsn, .. } | Receipt::Appended { lsn, .. } => Some(lsn),
            _ => None,
        }
    }

    /// The committed row's id (sync).
    pub fn row_id(&self) -> Option<RowId> {
        match *self {
            Receipt::Committed { row_id, .. } => Some(row_id),
            _ => None,
        }
    }

    /// False only for [`Receipt::SampledOut`].
    pub fn is_kept(&self) -> bool {
        !matches!(self, Receipt::SampledOut { .. })
    }
}

/// Why a call (or [`AuditLog::open`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A setting is invalid (at open).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The event cannot be stored as it is; nothing was written. Names the field.
    #[error("event refused: {0}")]
    InvalidEvent(#[from] EventError),
    /// This log was configured without what `mode` needs (`database_url` for
    /// sync, `wal_dir` for the others).
    #[error("{mode} mode is not available: setting `{setting}` is not configured")]
    ModeUnavailable { mode: Mode, setting: &'static str },
    /// The local WAL refused or failed the append or the durable wait: the disk
    /// budget is full ([`WalError::DiskBudgetExceeded`], after the block
    /// timeout), the event was dropped by policy ([`WalError::EventDropped`]),
    /// an fsync failed ([`WalError::SyncFailed`]: the writer accepts nothing
    /// more until reopened), ...
    #[error(transparent)]
    Wal(WalError),
    /// Sync mode failed: [`PgError::DatabaseUnavailable`] (not stored),
    /// [`PgError::OutcomeUnknown`] (may be stored; retry the same event and a
    /// [`PgError::Duplicate`] says it was), ...
    #[error(transparent)]
    Sync(PgError),
    /// [`AuditLog::close`] was called.
    #[error("the audit log is closed")]
    Closed,
}

impl From<WalError> for AuditError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::Closed { .. } => AuditError::Closed,
            other => AuditError::Wal(other),
        }
    }
}

impl From<PgError> for AuditError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::InvalidEvent(inner) => AuditError::InvalidEvent(inner),
            other => AuditError::Sync(other),
        }
    }
}

/// A count per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerMode([u64; 4]);

impl PerMode {
    pub fn get(&self, mode: Mode) -> u64 {
        self.0[mode.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(mode, count)` for every mode, for exporting.
    pub fn iter(&self) -> impl Iterator<Item = (Mode, u64)> + '_ {
        Mode::ALL.into_iter().map(|m| (m, self.get(m)))
    }
}

/// A snapshot of an [`AuditLog`]'s counters, cheap to take, for export.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditStats {
    /// Calls that returned a receipt other than `SampledOut`, by mode.
    pub recorded: PerMode,
    /// Calls that returned an error, by mode (other than `rejected` and
    /// `dropped`, counted on their own).
    pub failed: PerMode,
    /// Events refused by validation (nothing written).
    pub rejected: u64,
    /// Sampled-mode events not kept.
    pub sampled_out: u64,
    /// Sampled-mode events kept by a force-keep rule (also in `recorded`).
    pub forced_keeps: u64,
    /// Events not written because the disk budget was full under `drop-newest`.
    pub dropped: u64,
    /// Appends that had to wait for disk budget under `block`.
    pub blocked_appends: u64,
    /// Failed WAL fsyncs seen (the writer stops after the first).
    pub fsync_failures: u64,
    /// Records acknowledged (appended) but never covered by a successful fsync
    /// when the fsync failed: async receipts whose records may be lost.
    pub unsynced_at_failure: u64,
    /// The WAL writer's watermarks (`written_lsn`, `durable_lsn`) and counters.
    pub wal: Option<WalStats>,
}

#[derive(Debug, Default)]
struct Counters {
    recorded: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    rejected: AtomicU64,
    /// Shared with the WAL writer, whose signed checkpoints count it.
    sampled_out: Arc<AtomicU64>,
    forced_keeps: AtomicU64,
    dropped: AtomicU64,
    blocked_appends: AtomicU64,
    fsync_failures: AtomicU64,
    unsynced_at_failure: AtomicU64,
}

/// The kinds of failure logged, each at most once per [`LOG_EVERY`].
#[derive(Debug, Clone, Copy)]
enum Kind {
    Rejected = 0,
    Dropped,
    Blocked,
    Wal,
    Fsync,
    Sync,
    Other,
}
const KINDS: usize = 7;

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Rejected => "rejected",
            Kind::Dropped => "dropped",
            Kind::Blocked => "blocked",
            Kind::Wal => "wal",
            Kind::Fsync => "fsync",
            Kind::Sync => "sync",
            Kind::Other => "other",
        }
    }
}

/// One log line per period; the lines skipped meanwhile are counted and
/// reported with the next one.
#[derive(Debug, Default)]
struct RateLimit {
    /// Milliseconds since the log opened before which nothing is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// `Some(lines suppressed since the last one)` when this line may be logged.
    fn allow(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let period = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(1000);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + period, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

struct Inner {
    config: Config,
    sampler: Sampler,
    wal: Option<Arc<WalWriter>>,
    /// Connected on open when possible, else on the first sync call.
    sync: tokio::sync::OnceCell<SyncWriter>,
    /// When to try connecting `sync` again after an attempt got no answer.
    sync_reconnect: Reconnect,
    /// `Some` under policy `Block`: the wait this module carries out, a fresh
    /// copy for each append.
    block: Option<BlockWait>,
    closed: AtomicBool,
    counters: Counters,
    limits: [RateLimit; KINDS],
    opened: Instant,
}

/// Records audit events in the configured default mode ([`record`](Self::record))
/// or a mode chosen per call ([`record_with`](Self::record_with)). Cheap to
/// clone; clones share everything. Open it inside a tokio runtime; sync mode's
/// committer tasks run on the runtime of the first sync call (or of `open`).
///
/// Call [`close`](Self::close) at shutdown: it fsyncs what was appended. If the
/// last clone is dropped without it, `Drop` closes the WAL writer the same way,
/// but blocks the dropping thread for that fsync and can only log a failure.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Validates `config`, opens (and recovers) the WAL stream if `wal_dir` is
    /// set, and connects sync mode if `database_url` is set.
    ///
    /// A database that does not answer within `sync_timeout` does not fail the
    /// open (the WAL modes work without it): it is logged, and each sync call
    /// tries to connect again. Anything else about the database (a migration
    /// refused, say) fails the open.
    pub async fn open(config: Config) -> Result<AuditLog, AuditError> {
        config.validate()?;
        let sampler = config.sampler()?;
        let block = BlockWait::for_policy(config.full_disk_policy);
        let wal = match config.wal_config() {
            Some(wal_config) => {
                // `Block` is carried out here, asynchronously (module docs).
                let wal_config = match wal_config.full_disk_policy {
                    FullDiskPolicy::Block { .. } => {
                        wal_config.with_full_disk_policy(FullDiskPolicy::Fail)
                    }
                    _ => wal_config,
                };
                let dir = wal_config.dir.clone();
                // Opening recovers the stream and preallocates a segment: file
                // work that must not run on a runtime thread.
                let writer = tokio::task::spawn_blocking(move || WalWriter::open(wal_config))
                    .await
                    .map_err(|e| WalError::Io {
                        op: "open the WAL stream in",
                        path: dir,
                        source: Arc::new(std::io::Error::other(e.to_string())),
                    })??;
                Some(Arc::new(writer))
            }
            None => None,
        };
        let counters = Counters::default();
        if let Some(wal) = &wal {
            wal.count_sampled_out(counters.sampled_out.clone());
        }
        let log = AuditLog {
            inner: Arc::new(Inner {
                config,
                sampler,
                wal,
                sync: tokio::sync::OnceCell::new(),
                sync_reconnect: Reconnect::default(),
                block,
                closed: AtomicBool::new(false),
                counters,
                limits: Default::default(),
                opened: Instant::now(),
            }),
        };
        if log.inner.config.database_url.is_some() {
            match log.sync_writer().await {
                Ok(_) => {}
                Err(AuditError::Sync(e)) if e.is_transient() => tracing::warn!(
                    error = %e,
                    "sync mode cannot reach the database yet; sync calls will retry \
                     (WAL modes are unaffected)"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(log)
    }

    /// Records `event` in the configured default mode (`audit_mode`).
    pub async fn record(&self, event: &AuditEvent) -> Result<Receipt, AuditError> {
        self.record_with(event, self.inner.config.mode).await
    }

    /// Records `event` in `mode`. See [`Receipt`] for what each success means
    /// and docs/modes.md for what each mode can still lose.
    ///
    /// Cancelling the future (dropping it) before it completes may leave the
    /// event recorded without a receipt: a durable call cancelled while waiting
    /// for its fsync has already appended its record, and a sync call whose
    /// INSERT was sent may commit.
    pub async fn record_with(&self, event: &AuditEvent, mode: Mode) -> Result<Receipt, AuditError> {
        let result = self.dispatch(event, mode).await;
        let c = &self.inner.counters;
        match &result {
            Ok(Receipt::SampledOut { .. }) => {
                c.sampled_out.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                c.recorded[mode.index()].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.count_failure(mode, e),
        }
        result
    }

    /// Waits until WAL record `lsn` (from an async receipt) is fsynced, without
    /// blocking the thread: turns an async record into a durable one later, e.g.
    /// once per batch.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), AuditError> {
        let wal = self.wal(Mode::Durable)?;
        wal.wait_durable_async(lsn).await.map_err(|e| {
            self.note_wal_error(&e);
            AuditError::from(e)
        })
    }

    /// The counters so far, and the WAL's watermarks.
    pub fn stats(&self) -> AuditStats {
        // A failed fsync is counted here too, not only when a later call is
        // refused: an idle async service must still show it.
        if let Some(failure) = self.inner.wal.as_ref().and_then(|w| w.failure()) {
            self.note_wal_error(&failure);
        }
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_mode =
            |a: &[AtomicU64; 4]| PerMode([load(&a[0]), load(&a[1]), load(&a[2]), load(&a[3])]);
        AuditStats {
            recorded: per_mode(&c.recorded),
            failed: per_mode(&c.failed),
            rejected: load(&c.rejected),
            sampled_out: load(&c.sampled_out),
            forced_keeps: load(&c.forced_keeps),
            dropped: load(&c.dropped),
            blocked_appends: load(&c.blocked_appends),
            fsync_failures: load(&c.fsync_failures),
            unsynced_at_failure: load(&c.unsynced_at_failure),
            wal: self.inner.wal.as_ref().map(|w| w.stats()),
        }
    }

    /// The settings this log runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The WAL stream's directory, when this log has one.
    pub fn stream_dir(&self) -> Option<&std::path::Path> {
        self.inner.wal.as_ref().map(|w| w.stream_dir())
    }

    /// Refuses further calls ([`AuditError::Closed`]), then fsyncs every record
    /// appended so far, writes the durable watermark, and releases the stream's
    /// lock, so the stream can be reopened and a loader loads everything.
    /// Sync mode's writer answers the calls it has queued and signs its
    /// chains' last events ([`SyncWriter::close`]). Idempotent.
    pub async fn close(&self) -> Result<(), AuditError> {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(sync) = self.inner.sync.get() {
            sync.close().await;
        }
        let Some(wal) = self.inner.wal.clone() else {
            return Ok(());
        };
        let dir = wal.stream_dir().to_path_buf();
        let joined = tokio::task::spawn_blocking(move || wal.close()).await;
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.note_wal_error(&e);
                Err(AuditError::Wal(e))
            }
            Err(e) => Err(AuditError::Wal(WalError::Io {
                op: "close the WAL stream in",
                path: dir,
                source: Arc::new(std::io::Error::other(e.to_string())),
            })),
        }
    }

    async fn dispatch(&self, event: &AuditEvent, mode: Mode) -> Result<Receipt, AuditError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        // What the mode needs, then the event itself, before anything is written.
        match mode {
            Mode::Sync if self.inner.config.database_url.is_none() => {
                return Err(AuditError::ModeUnavailable {
                    mode,
                    setting: "database_url",
                })
            }
            Mode::Sync => {}
            _ => {
                self.wal(mode)?;
            }
        }
        event.validate(self.inner.config.max_event_bytes)?;
        let event_id = event.event_id;
        match mode {
            Mode::Sync => {
                let row_id = self.sync_writer().await?.record(event).await?;
                Ok(Receipt::Committed { event_id, row_id })
            }
            Mode::Durable => {
                let wal = self.wal(mode)?;
                let lsn = self.append(wal, event, 1.0).await?;
                if let Err(e) = wal.wait_durable_async(lsn).await {
                    self.note_wal_error(&e);
                    return Err(e.into());
                }
                Ok(Receipt::Durable { event_id, lsn })
            }
            Mode::Async => {
                let lsn = self.append(self.wal(mode)?, event, 1.0).await?;
                Ok(Receipt::Appended {
                    event_id,
                    lsn,
                    sample_rate: 1.0,
                })
            }
            Mode::Sampled => match self.inner.sampler.decide(event) {
                Decision::Drop => Ok(Receipt::SampledOut { event_id }),
                Decision::Keep {
                    sample_rate,
                    forced,
                } => {
                    let lsn = self.append(self.wal(mode)?, event, sample_rate).await?;
                    if forced {
                        self.inner
                            .counters
                            .forced_keeps
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Receipt::Appended {
                        event_id,
                        lsn,
                        sample_rate,
                    })
                }
            },
        }
    }

    fn wal(&self, mode: Mode) -> Result<&WalWriter, AuditError> {
        self.inner
            .wal
            .as_deref()
            .ok_or(AuditError::ModeUnavailable {
                mode,
                setting: "wal_dir",
            })
    }

    /// The sync writer, connecting it first if need be, within `sync_timeout`.
    async fn sync_writer(&self) -> Result<&SyncWriter, AuditError> {
        let url = self
            .inner
            .config
            .database_url
            .as_deref()
            .ok_or(AuditError::ModeUnavailable {
                mode: Mode::Sync,
                setting: "database_url",
            })?;
        if let Some(w) = self.inner.sync.get() {
            return Ok(w);
        }
        let config = self.inner.config.sync_config();
        let timeout = config.timeout;
        let reconnect = &self.inner.sync_reconnect;
        // A failed or timed-out init leaves the cell empty: a later call tries
        // again, unless the last attempt got no answer a moment ago (`Reconnect`,
        // as for the writer's own connections). The check is inside the init, so
        // a call that waited behind a failed attempt does not start another at
        // once.
        let connect = self.inner.sync.get_or_try_init(|| async {
            let attempt = reconnect
                .attempt(tokio::time::Instant::now())
                .map_err(|reason| PgError::DatabaseUnavailable { reason })?;
            let started = tokio::time::Instant::now();
            let result = SyncWriter::connect(url, config).await;
            match &result {
                // Connecting bounds its own waits by the same timeout.
                Err(e) if e.is_transient() && started.elapsed() >= timeout => {
                    let reason = match e {
                        PgError::DatabaseUnavailable { reason } => reason.clone(),
                        other => other.to_string(),
                    };
                    attempt.no_answer(tokio::time::Instant::now(), reason)
                }
                _ => attempt.answered(),
            }
            result
        });
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let reason = format!("connecting sync mode: no answer within {timeout:?}");
                reconnect.no_answer(tokio::time::Instant::now(), reason.clone());
                Err(AuditError::Sync(PgError::DatabaseUnavailable { reason }))
            }
        }
    }

    /// Appends (inline when the record fits the current segment, on the
    /// blocking pool when it needs a new one); under policy `Block`, waits
    /// asynchronously for disk budget up to the block timeout.
    async fn append(
        &self,
        wal: &WalWriter,
        event: &AuditEvent,
        rate: f64,
    ) -> Result<Lsn, AuditError> {
        let mut block = self.inner.block;
        loop {
            let e = match wal.append_with_rate_async(event, rate).await {
                Ok(lsn) => return Ok(lsn),
                Err(e) => e,
            };
            let no_room = matches!(
                e,
                WalError::DiskBudgetExceeded { .. } | WalError::DiskFull { .. }
            );
            let Some(wait) = block.as_mut().filter(|_| no_room) else {
                self.note_wal_error(&e);
                return Err(e.into());
            };
            if wait.is_first() {
                self.inner
                    .counters
                    .blocked_appends
                    .fetch_add(1, Ordering::Relaxed);
                self.log(Kind::Blocked, Mode::Async, &e);
            }
            match wait.next() {
                BlockStep::GiveUp { waited } => {
                    return Err(AuditError::Wal(with_waited(e, waited)))
                }
                BlockStep::Sleep(pause) => tokio::time::sleep(pause).await,
            }
        }
    }

    /// Counts a failed fsync once (the writer refuses everything after it) and
    /// how many acknowledged records it left unsynced.
    fn note_wal_error(&self, e: &WalError) {
        let WalError::SyncFailed { durable_lsn, .. } = e else {
            return;
        };
        let c = &self.inner.counters;
        if c.fsync_failures
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let written = self.inner.wal.as_ref().map_or(0, |w| w.written_lsn());
            let unsynced = written.saturating_sub(*durable_lsn);
            c.unsynced_at_failure.store(unsynced, Ordering::Relaxed);
            tracing::error!(
                unsynced_records = unsynced,
                durable_lsn,
                error = %chain(e),
                "WAL fsync failed: records appended after the durable LSN may be lost, and \
                 every later WAL call fails until the stream is reopened"
            );
        }
    }

    fn count_failure(&self, mode: Mode, e: &AuditError) {
        let c = &self.inner.counters;
        let kind = match e {
            AuditError::InvalidEvent(_) => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
                Kind::Rejected
            }
            AuditError::Wal(WalError::EventDropped { .. }) => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                Kind::Dropped
            }
            other => {
                c.failed[mode.index()].fetch_add(1, Ordering::Relaxed);
                match other {
                    AuditError::Wal(WalError::SyncFailed { .. }) => Kind::Fsync,
                    AuditError::Wal(_) => Kind::Wal,
                    AuditError::Sync(_) => Kind::Sync,
                    _ => Kind::Other,
                }
            }
        };
        self.log(kind, mode, e);
    }

    /// Logs `e` unless a line of this kind was logged within [`LOG_EVERY`].
    fn log(&self, kind: Kind, mode: Mode, e: &dyn std::error::Error) {
        let now_ms = u64::try_from(self.inner.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        let Some(suppressed) = self.inner.limits[kind as usize].allow(now_ms) else {
            return;
        };
        let kind = kind.as_str();
        let error = chain(e);
        match kind {
            "blocked" => tracing::warn!(
                kind,
                suppressed,
                error,
                "audit appends are waiting for disk budget (is the loader running?)"
            ),
            _ => tracing::warn!(
                kind,
                mode = mode.as_str(),
                suppressed,
                error,
                "audit event not recorded"
            ),
        }
    }
}

/// `e` with the time actually waited (the writer, opened with `Fail`, says 0).
fn with_waited(e: WalError, waited: Duration) -> WalError {
    match e {
        WalError::DiskBudgetExceeded {
            stream,
            used,
            budget,
            ..
        } => WalError::DiskBudgetExceeded {
            stream,
            used,
            budget,
            waited,
        },
        WalError::DiskFull {
            stream,
            path,
            needed,
            source,
            ..
        } => WalError::DiskFull {
            stream,
            path,
            needed,
            waited,
            source,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed fsync cannot be provoked on a healthy disk; this pins the
    /// accounting the writer's `SyncFailed` goes through.
    #[tokio::test]
    async fn a_failed_fsync_is_counted_once_with_the_records_it_left_unsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::builder()
            .wal_dir(dir.path())
            .segment_size(1 << 20)
            .build()
            .expect("config");
        let log = AuditLog::open(config).await.expect("open");
        for _ in 0..5 {
            log.record(&AuditEvent::new("a")).await.expect("append");
        }
        let written = log.stats().wal.expect("wal").written_lsn;
        let failure = WalError::SyncFailed {
            path: dir.path().to_path_buf(),
            durable_lsn: 2,
            source: Arc::new(std::io::Error::other("EIO")),
        };
        log.note_wal_error(&failure);
        log.note_wal_error(&failure);
        log.count_failure(Mode::Async, &AuditError::Wal(failure));
        let s = log.stats();
        assert_eq!(s.fsync_failures, 1);
        assert_eq!(s.unsynced_at_failure, written - 2);
        assert_eq!(s.failed.get(Mode::Async), 1);
        log.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_failed_fsync_shows_in_the_stats_before_any_later_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::builder()
            .wal_dir(dir.path())
            .fsync_interval(Duration::from_millis(10))
            .build()
            .expect("config");
        let log = AuditLog::open(config).await.expect("open");
        log.record(&AuditEvent::new("a")).await.expect("append");
        let wal = log.inner.wal.clone().expect("wal mode");
        wal.wait_durable_async(wal.written_lsn())
            .await
            .expect("first fsync");
        crate::wal::writer::tests::break_fdatasync(&wal);
        log.record(&AuditEvent::new("b")).await.expect("append");
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.stats().fsync_failures == 0 {
            assert!(Instant::now() < deadline, "the failed fsync never showed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = log.stats();
        assert_eq!(s.fsync_failures, 1);
        assert_eq!(s.unsynced_at_failure, 1, "record b was never synced");
        assert!(log.close().await.is_err(), "close reports the failure");
    }

    #[test]
    fn the_rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let r = RateLimit::default();
        assert_eq!(r.allow(0), Some(0));
        assert_eq!(r.allow(10), None);
        assert_eq!(r.allow(999), None);
        assert_eq!(r.allow(1000), Some(2));
        assert_eq!(r.allow(1500), None);
        assert_eq!(r.allow(5000), Some(1));
    }
}
