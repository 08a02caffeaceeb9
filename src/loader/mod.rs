//! The loader: tails every WAL stream and loads it into PostgreSQL exactly once.
//!
//! Per stream, one task runs the loop
//!
//! ```text
//! read a batch (up to the durable watermark) → COPY + checkpoint in one
//! transaction → commit → delete/archive the segments it finished → repeat
//! ```
//!
//! and the checkpoint in the database is the only truth about progress: after any
//! failure (connection lost, server restarting, a COPY that timed out) the task
//! drops its connection, backs off with jitter, reconnects, re-reads the
//! checkpoint and re-opens its cursor just past it. A batch whose COMMIT was lost
//! with the connection is then recognised as already loaded (the batch transaction
//! locks and reads the checkpoint first, see `batch`). Rows PostgreSQL refuses go
//! to the stream's dead-letter file and the stream goes on.
//!
//! The stream tasks share the runtime's worker threads with each other and with
//! the metrics endpoint, so none of them does file work on a worker: reading a
//! batch from the segments (and the lag figures' listing), the dead-letter
//! fsync, and retiring segments with their directory fsyncs run on tokio's
//! blocking pool ([`off_worker`], `DeadLetterFile::append`). A stuck disk then
//! holds only its own stream's task.
//!
//! A dead link is noticed by progress, not by a limit on the whole batch: every
//! round trip (checkpoint read, BEGIN, COMMIT...) must be answered, and every piece
//! of a COPY accepted by the socket, within `link_timeout`; and every connection's
//! socket gets keepalive and `TCP_USER_TIMEOUT` for the same time
//! ([`crate::pg::link`]). So a link that died under a batch costs one
//! `link_timeout` plus a reconnect, however large the batch, and a large batch on
//! a slow but live link is never cut off.
//!
//! What this module leaves to its parts: the bytes of a COPY ([`copy`]), one
//! transaction with its checkpoint ([`batch`], [`checkpoint`]), reading segments
//! ([`cursor`], over `wal::reader`), refused rows ([`dead_letter`]), the retry
//! delays ([`backoff`]), the figures ([`metrics`]), and re-sending a range after
//! a database restore ([`replay`]). The schema, the connection tuning and the
//! errors are `crate::pg`'s, shared with sync mode.

pub mod backoff;
pub mod batch;
pub mod checkpoint;
pub mod copy;
mod chainer;
pub mod cursor;
pub mod dead_letter;
pub mod metrics;
pub mod replay;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{watch, Notify};

use crate::pg::link::{self, LinkTuning, DEFAULT_LINK_TIMEOUT};
use backoff::Backoff;
use batch::{Batch, BatchError, BatchOutcome};
use cursor::{Cursor, CursorError};
use dead_letter::DeadLetterFile;
use metrics::{LoaderMetrics, StreamMetrics};

/// The loader's settings. [`LoaderConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoaderConfig {
    pub wal_dir: PathBuf,
    pub database_url: String,
    /// The table rows are copied into.
    pub table: String,
    /// Load what is present, then return.
    pub once: bool,
    /// Most rows in one batch.
    pub batch_max_rows: usize,
    /// Most COPY bytes in one batch.
    pub batch_max_bytes: usize,
    /// Longest spent gathering one batch before sending what there is; and, once
    /// caught up, the least time between two commits of a stream (so a partial
    /// batch waits up to this long for more rows).
    pub batch_max_delay: Duration,
    /// How often a stream looks for new records when no file event woke it, and how
    /// often the WAL dir is scanned for new streams.
    pub poll_interval: Duration,
    /// How long the database may make no progress (a round trip unanswered, a
    /// COPY piece not accepted by the socket, TCP data unacknowledged, keepalive
    /// probes unanswered) before the link is taken for dead and the connection
    /// dropped. A batch may take longer in total as long as it moves.
    pub link_timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Move finished segments here (same stream sub-directory) instead of deleting.
    pub archive_dir: Option<PathBuf>,
    /// Apply the migrations at start.
    pub migrate: bool,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl LoaderConfig {
    pub fn new(wal_dir: impl Into<PathBuf>, database_url: impl Into<String>) -> Self {
        LoaderConfig {
            wal_dir: wal_dir.into(),
            database_url: database_url.into(),
            table: crate::columns::TABLE.to_string(),
            once: false,
            batch_max_rows: 20_000,
            batch_max_bytes: 16 * 1024 * 1024,
            batch_max_delay: Duration::from_millis(50),
            poll_interval: Duration::from_millis(200),
            link_timeout: DEFAULT_LINK_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            archive_dir: None,
            migrate: true,
            metrics_addr: None,
        }
    }
}

/// Why the loader stopped with an error (it retries database trouble forever;
/// these are the conditions retrying cannot fix).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("cannot read the WAL directory {path}: {source}")]
    WalDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stream {stream}: {source}")]
    Stream { stream: String, source: CursorError },
    #[error("stream {stream}: cannot write the dead-letter file {path}: {source}")]
    DeadLetter {
        stream: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stream {stream}: cannot remove or archive finished segment {path}: {source}")]
    Segment {
        stream: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stream {stream}: {reason}")]
    Replay { stream: String, reason: String },
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What a run loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    pub rows_loaded: u64,
    pub dead_lettered: u64,
    pub streams: usize,
}

/// Asks a running loader to stop after the batch in flight.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

pub struct Loader {
    config: LoaderConfig,
    metrics: Arc<LoaderMetrics>,
    shutdown: Arc<watch::Sender<bool>>,
    /// Woken by file events under the WAL dir; tasks also poll.
    wake: Arc<Notify>,
}

impl Loader {
    pub fn new(config: LoaderConfig) -> Self {
        Loader {
            config,
            metrics: Arc::new(LoaderMetrics::default()),
            shutdown: Arc::new(watch::channel(false).0),
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn metrics(&self) -> Arc<LoaderMetrics> {
        self.metrics.clone()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Runs until stopped (or, with `once`, until every stream present at start is
    /// loaded up to its end).
    pub async fn run(&self) -> Result<LoadSummary, LoadError> {
        let options: sqlx::postgres::PgConnectOptions = self
            .config
            .database_url
            .parse()
            .map_err(|e: sqlx::Error| LoadError::Url(e.to_string()))?;
        let options = options.log_statements(tracing::log::LevelFilter::Debug);
        if let Some(addr) = self.config.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| LoadError::Metrics { addr, source })?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "metrics endpoint listening");
            tokio::spawn(metrics::serve(listener, self.metrics.clone()));
        }
        if !self.wait_for_wal_dir().await {
            return Ok(LoadSummary::default());
        }
        let _watcher = self.watch_files();
        let ctx = Arc::new(StreamCtx {
            config: self.config.clone(),
            options,
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            shutdown: self.shutdown.subscribe(),
        });
        if self.config.migrate {
            migrate_with_retry(&ctx).await;
        }

        let mut tasks: tokio::task::JoinSet<(String, Result<(), LoadError>)> =
            tokio::task::JoinSet::new();
        let mut started: std::collections::BTreeSet<String> = Default::default();
        let mut shutdown = self.shutdown.subscribe();
        let mut first_error = None;
        loop {
            for stream in list_streams(&self.config.wal_dir)? {
                if started.insert(stream.clone()) {
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        let r = run_stream(ctx, &stream).await;
                        (stream, r)
                    });
                }
            }
            if self.config.once {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll_interval.max(Duration::from_millis(500))) => {}
                _ = shutdown.changed() => break,
                Some(done) = tasks.join_next() => record_stream_end(done, &mut first_error),
            }
        }
        while let Some(done) = tasks.join_next().await {
            record_stream_end(done, &mut first_error);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(LoadSummary {
            rows_loaded: self.metrics.rows_loaded(),
            dead_lettered: self.metrics.dead_lettered(),
            streams: started.len(),
        })
    }

    /// A loader started before its service (systemd ordering, a fresh host) finds
    /// no WAL directory yet: it waits for the service to create it rather than
    /// failing, and does not create it itself (the service's user must own it,
    /// mode 0700). With `once` there is nothing present to load, so a missing
    /// directory is the caller's error and is left to the listing to report.
    /// Returns false when stopped while waiting.
    async fn wait_for_wal_dir(&self) -> bool {
        let dir = &self.config.wal_dir;
        if self.config.once || dir.exists() {
            return true;
        }
        tracing::warn!(
            wal_dir = %dir.display(),
            "the WAL directory does not exist yet; waiting for the service to create it"
        );
        let mut shutdown = self.shutdown.subscribe();
        while !dir.exists() {
            if *shutdown.borrow_and_update() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll_interval.max(Duration::from_millis(200))) => {}
                _ = shutdown.changed() => return false,
            }
        }
        tracing::info!(wal_dir = %dir.display(), "the WAL directory appeared; loading");
        true
    }

    /// Wakes the stream tasks on any change under the WAL dir. Polling stays on as
    /// the fallback: inotify is not delivered on some filesystems (NFS, some
    /// container overlays), and a watch can overflow.
    fn watch_files(&self) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher;
        let wake = self.wake.clone();
        let mut watcher =
            notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
                wake.notify_waiters();
            })
            .map_err(|e| tracing::warn!("file events unavailable, polling only: {e}"))
            .ok()?;
        watcher
            .watch(&self.config.wal_dir, notify::RecursiveMode::Recursive)
            .map_err(|e| {
                tracing::warn!(
                    "cannot watch {}, polling only: {e}",
                    self.config.wal_dir.display()
                )
            })
            .ok()?;
        Some(watcher)
    }
}

fn record_stream_end(
    done: Result<(String, Result<(), LoadError>), tokio::task::JoinError>,
    first_error: &mut Option<LoadError>,
) {
    match done {
        Ok((_, Ok(()))) => {}
        Ok((stream, Err(e))) => {
            tracing::error!(stream, "stream stopped: {e}");
            first_error.get_or_insert(e);
        }
        Err(e) => tracing::error!("stream task failed: {e}"),
    }
}

/// The stream directories under `wal_dir`, by name.
pub fn list_streams(wal_dir: &Path) -> Result<Vec<String>, LoadError> {
    crate::wal::reader::list_streams(wal_dir).map_err(|e| LoadError::WalDir {
        path: wal_dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

struct StreamCtx {
    config: LoaderConfig,
    options: sqlx::postgres::PgConnectOptions,
    metrics: Arc<LoaderMetrics>,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

impl StreamCtx {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps for `d` unless woken by a file event or a shutdown first.
    async fn pause(&self, d: Duration) {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Sleeps for `d` unless a shutdown comes first (file events don't shorten a backoff).
    async fn back_off(&self, d: Duration) {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => {}
        }
    }

    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let tuning = LinkTuning::for_timeout(self.config.link_timeout);
        match tokio::time::timeout(
            self.config.connect_timeout,
            link::connect(&self.options, &tuning),
        )
        .await
        {
            Ok(r) => r.map(|(conn, _)| conn),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }
}

async fn migrate_with_retry(ctx: &StreamCtx) {
    let mut backoff = Backoff::new(ctx.config.backoff_initial, ctx.config.backoff_max);
    while !ctx.stopping() {
        let result = async {
            let mut conn = ctx.connect().await?;
            crate::pg::schema::migrate_connection(&mut conn)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            conn.close().await
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                let d = backoff.next_delay();
                if backoff.attempts() == 1 {
                    tracing::warn!(
                        "cannot migrate the database yet ({e}); retrying in {:.1}s",
                        d.as_secs_f64()
                    );
                }
                ctx.back_off(d).await;
            }
        }
    }
}

/// Where one stream's task stands (connecting, loading, caught up, or waiting
/// out a lost database link), for logging one line per change rather than one
/// per retry or batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    Starting,
    Loading,
    CaughtUp,
    Lost,
}

/// One stream's phase, its reconnect backoff, and what it loaded since the
/// phase began (for the "caught up" line).
struct Link<'a> {
    stream: &'a str,
    phase: StreamPhase,
    backoff: Backoff,
    since: Instant,
    rows_since: u64,
}

impl<'a> Link<'a> {
    fn set(&mut self, phase: StreamPhase, detail: &str, m: &StreamMetrics) {
        if self.phase == phase {
            return;
        }
        let secs = self.since.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.rows_since as f64 / secs
        } else {
            0.0
        };
        match phase {
            StreamPhase::Loading
                if self.phase == StreamPhase::Lost || self.phase == StreamPhase::Starting =>
            {
                tracing::info!(stream = self.stream, "connected; loading")
            }
            StreamPhase::Loading => tracing::info!(
                stream = self.stream,
                lag_records = m.lag_records.load(Ordering::Relaxed),
                "behind; loading"
            ),
            StreamPhase::CaughtUp => tracing::info!(
                stream = self.stream,
                rows = self.rows_since,
                rows_per_sec = rate as u64,
                checkpoint = m.checkpoint_lsn.load(Ordering::Relaxed),
                "caught up"
            ),
            StreamPhase::Lost => {
                tracing::warn!(stream = self.stream, "database link lost: {detail}")
            }
            StreamPhase::Starting => {}
        }
        self.phase = phase;
        self.since = Instant::now();
        self.rows_since = 0;
    }
}

async fn run_stream(ctx: Arc<StreamCtx>, stream: &str) -> Result<(), LoadError> {
    let dir = ctx.config.wal_dir.join(stream);
    let m = ctx.metrics.stream(stream);
    let mut dead = DeadLetterFile::new(&dir);
    let mut link = Link {
        stream,
        phase: StreamPhase::Starting,
        backoff: Backoff::new(ctx.config.backoff_initial, ctx.config.backoff_max),
        since: Instant::now(),
        rows_since: 0,
    };
    let mut conn: Option<PgConnection> = None;
    let mut cursor: Option<Cursor> = None;
    let mut last_commit: Option<Instant> = None;
    let stream_err = |source| LoadError::Stream {
        stream: stream.to_string(),
        source,
    };

    while !ctx.stopping() {
        // 1. A connection, or a backoff.
        if conn.is_none() {
            match ctx.connect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    lost(&ctx, &mut link, &m, &e.to_string()).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };

        // 2. A cursor just past the committed checkpoint.
        if cursor.is_none() {
            let read = tokio::time::timeout(ctx.config.link_timeout, checkpoint::read(c, stream))
                .await
                .unwrap_or_else(|_| {
                    Err(sqlx::Error::Protocol(format!(
                        "reading the checkpoint: no answer within {:?}",
                        ctx.config.link_timeout
                    )))
                });
            match read {
                Ok(cp) => {
                    let cp = cp.unwrap_or_default();
                    m.checkpoint_lsn.store(cp.lsn, Ordering::Relaxed);
                    cursor = Some(Cursor::open(&dir, stream, cp).map_err(stream_err)?);
                }
                Err(e) => {
                    conn = None;
                    lost(&ctx, &mut link, &m, &e.to_string()).await;
                    continue;
                }
            }
        }
        let Some(cur) = cursor.as_mut() else { continue };

        // 3. A batch, up to what the writer has made durable. Caught up, a stream
        // commits at most once per `batch_max_delay`: a durable-mode writer moves
        // its watermark at every fsync (every millisecond under load), and a COPY
        // transaction per step would cost a PostgreSQL WAL flush each, on the disk
        // the writer's own fsyncs wait for.
        if !ctx.config.once && cur.at_end() {
            if let Some(wait) = last_commit
                .map(|t| ctx.config.batch_max_delay.saturating_sub(t.elapsed()))
                .filter(|d| !d.is_zero())
            {
                ctx.back_off(wait).await;
                if ctx.stopping() {
                    break;
                }
            }
        }
        let limits = cursor::BatchLimits {
            max_rows: ctx.config.batch_max_rows,
            max_bytes: ctx.config.batch_max_bytes,
            max_time: ctx.config.batch_max_delay,
        };
        let Some((back, gathered)) = ({
            let (mut cur, m) = (cursor.take(), m.clone());
            off_worker(move || {
                let gathered = cur.as_mut().map(|c| {
                    let gathered = c.next_batch(&limits);
                    c.update_lag(&m);
                    gathered
                });
                (cur, gathered)
            })
            .await
        }) else {
            return Ok(()); // the runtime is shutting down
        };
        cursor = back;
        let (Some(cur), Some(gathered)) = (cursor.as_mut(), gathered) else {
            continue;
        };
        let gathered = gathered.map_err(stream_err)?;
        for skipped in &gathered.skipped {
            m.corrupt_ranges.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(stream, "corrupt WAL range skipped: {skipped}");
        }
        let batch = gathered.batch;
        if batch.end_lsn <= cur.committed() {
            if ctx.config.once && cur.at_end() {
                link.set(StreamPhase::CaughtUp, "", &m);
                return Ok(());
            }
            link.set(StreamPhase::CaughtUp, "", &m);
            ctx.pause(ctx.config.poll_interval).await;
            continue;
        }
        if link.phase != StreamPhase::Loading {
            link.set(StreamPhase::Loading, "", &m);
        }

        // 4. COPY + checkpoint in one transaction; refused rows to the dead-letter file.
        let result = commit_with_dead_letters(
            c,
            &ctx.config.table,
            stream,
            batch,
            ctx.config.link_timeout,
            &mut dead,
            &m,
        )
        .await;
        match result {
            Ok((outcome, end_lsn)) => {
                last_commit = Some(Instant::now());
                link.backoff.reset();
                if let BatchOutcome::Committed { rows } = outcome {
                    m.rows_loaded.fetch_add(rows, Ordering::Relaxed);
                    m.batches.fetch_add(1, Ordering::Relaxed);
                    link.rows_since += rows;
                }
                m.checkpoint_lsn.store(end_lsn, Ordering::Relaxed);
                cur.committed_through(end_lsn);
                let finished = cur.take_finished();
                let Some((back, retired)) = ({
                    let (mut cur, m) = (cursor.take(), m.clone());
                    let (config, name) = (ctx.config.clone(), stream.to_string());
                    off_worker(move || {
                        let retired = finished.into_iter().try_for_each(|seg| {
                            retire_segment(&config, &name, &seg).map_err(|source| (seg, source))
                        });
                        if let Some(c) = cur.as_mut() {
                            c.update_lag(&m);
                        }
                        (cur, retired)
                    })
                    .await
                }) else {
                    return Ok(()); // the runtime is shutting down
                };
                cursor = back;
                retired.map_err(|(path, source)| LoadError::Segment {
                    stream: stream.to_string(),
                    path,
                    source,
                })?;
            }
            Err(StreamFailure::DeadLetter(path, source)) => {
                return Err(LoadError::DeadLetter {
                    stream: stream.to_string(),
                    path,
                    source,
                })
            }
            Err(StreamFailure::Database(e)) => {
                // Unusable or uncertain (a COMMIT without an answer may have been
                // applied): close it, never reuse it, and start again from the
                // checkpoint, which settles the batch.
                conn = None;
                cursor = None;
                lost(&ctx, &mut link, &m, &e).await;
            }
        }
    }
    Ok(())
}

async fn lost(ctx: &StreamCtx, link: &mut Link<'_>, m: &StreamMetrics, detail: &str) {
    ctx.metrics.errors.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.retries.fetch_add(1, Ordering::Relaxed);
    let d = link.backoff.next_delay();
    if link.phase != StreamPhase::Lost {
        link.set(StreamPhase::Lost, detail, m);
        tracing::info!(
            stream = link.stream,
            "retrying with backoff, first in {:.1}s",
            d.as_secs_f64()
        );
    }
    ctx.back_off(d).await;
}

enum StreamFailure {
    Database(String),
    DeadLetter(PathBuf, std::io::Error),
}

/// Commits `batch`, moving each row PostgreSQL refuses to the dead-letter file
/// (fsynced before the commit that skips it) and trying again without it. Returns
/// the outcome and the checkpoint committed.
async fn commit_with_dead_letters(
    conn: &mut PgConnection,
    table: &str,
    stream: &str,
    mut batch: Batch,
    link_timeout: Duration,
    dead: &mut DeadLetterFile,
    m: &StreamMetrics,
) -> Result<(BatchOutcome, u64), StreamFailure> {
    loop {
        match batch::commit_within(conn, table, stream, &batch, link_timeout).await {
            Ok(outcome) => return Ok((outcome, batch.end_lsn)),
            Err(BatchError::PoisonRow {
                index,
                sqlstate,
                message,
            }) if index < batch.rows.len() => {
                let row = batch.rows.remove(index);
                dead_letter(dead, stream, &row, &sqlstate, &message, m).await?;
            }
            Err(BatchError::PoisonRow { .. } | BatchError::PoisonUnknownRow { .. }) => {
                // The server did not say which row: find it by loading one at a time.
                return commit_row_by_row(conn, table, stream, batch, link_timeout, dead, m).await;
            }
            Err(e) => return Err(StreamFailure::Database(e.to_string())),
        }
    }
}

/// Writes a refused row to the dead-letter file (fsynced) and counts it.
async fn dead_letter(
    dead: &mut DeadLetterFile,
    stream: &str,
    row: &batch::BatchRow,
    sqlstate: &str,
    message: &str,
    m: &StreamMetrics,
) -> Result<(), StreamFailure> {
    tracing::warn!(
        stream,
        lsn = row.lsn,
        sqlstate,
        "row refused, dead-lettered: {message}"
    );
    dead.append(
        stream,
        row.lsn,
        Some(sqlstate),
        message,
        row.sample_rate,
        &row.event,
    )
    .await
    .map_err(|e| StreamFailure::DeadLetter(dead.path().to_path_buf(), e))?;
    m.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn commit_row_by_row(
    conn: &mut PgConnection,
    table: &str,
    stream: &str,
    batch: Batch,
    link_timeout: Duration,
    dead: &mut DeadLetterFile,
    m: &StreamMetrics,
) -> Result<(BatchOutcome, u64), StreamFailure> {
    let mut rows = 0;
    for row in &batch.rows {
        let at_row = row.link.map(|l| (row.lsn, l.hash));
        let one = Batch {
            rows: vec![row.clone()],
            end_lsn: row.lsn,
            chain: at_row,
            // Those before the row (stored once: commit_within skips what the
            // checkpoint has passed).
            signed: batch
                .signed
                .iter()
                .filter(|s| s.lsn < row.lsn)
                .cloned()
                .collect(),
        };
        match batch::commit_within(conn, table, stream, &one, link_timeout).await {
            Ok(BatchOutcome::Committed { rows: n }) => rows += n,
            Ok(BatchOutcome::AlreadyLoaded { .. }) => {}
            Err(
                BatchError::PoisonRow {
                    sqlstate, message, ..
                }
                | BatchError::PoisonUnknownRow { sqlstate, message },
            ) => {
                dead_letter(dead, stream, row, &sqlstate, &message, m).await?;
                // The chain goes through the dead-lettered row's link: the
                // table shows it as missing, the dead-letter file holds it.
                let past = Batch {
                    end_lsn: row.lsn,
                    chain: at_row,
                    ..Batch::default()
                };
                advance_checkpoint(conn, table, stream, past, link_timeout).await?;
            }
            Err(e) => return Err(StreamFailure::Database(e.to_string())),
        }
    }
    let end_lsn = batch.end_lsn;
    let rest = Batch {
        rows: Vec::new(),
        ..batch
    };
    advance_checkpoint(conn, table, stream, rest, link_timeout).await?;
    Ok((BatchOutcome::Committed { rows }, end_lsn))
}

/// Commits a batch without rows: moves `stream`'s checkpoint (and chain) to
/// `empty`'s end (past a dead-lettered row, or to the end of a batch loaded row
/// by row), storing its signed checkpoints.
async fn advance_checkpoint(
    conn: &mut PgConnection,
    table: &str,
    stream: &str,
    empty: Batch,
    link_timeout: Duration,
) -> Result<(), StreamFailure> {
    batch::commit_within(conn, table, stream, &empty, link_timeout)
        .await
        .map(drop)
        .map_err(|e| StreamFailure::Database(e.to_string()))
}

/// Runs `f` (file work: segment reads, fsyncs, directory changes) on tokio's
/// blocking pool and waits for it, so the worker thread stays free for the
/// other streams and the metrics endpoint. A panic in `f` is resumed here, as
/// if `f` had run inline; `None` when the runtime is shutting down and never
/// ran `f`.
async fn off_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => Some(value),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_cancelled) => None,
        },
    }
}

/// Deletes a segment the checkpoint has passed (`Cursor::take_finished`), or moves
/// it to the archive. The directory is fsynced so the removal itself is durable.
fn retire_segment(config: &LoaderConfig, stream: &str, path: &Path) -> std::io::Result<()> {
    match &config.archive_dir {
        Some(archive) => {
            let dest_dir = archive.join(stream);
            std::fs::create_dir_all(&dest_dir)?;
            let Some(name) = path.file_name() else {
                return Ok(());
            };
            let dest = dest_dir.join(name);
            if std::fs::rename(path, &dest).is_err() {
                // Another filesystem: copy, make the copy durable, then remove.
                std::fs::copy(path, &dest)?;
                std::fs::File::open(&dest)?.sync_all()?;
                std::fs::remove_file(path)?;
            }
            sync_dir(&dest_dir)?;
        }
        None => std::fs::remove_file(path)?,
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    tracing::debug!(stream, segment = %path.display(), "segment retired");
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
