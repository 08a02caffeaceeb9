//! Sync mode: each event INSERTed and COMMITted in PostgreSQL before the call
//! returns, with group commit.
//!
//! [`SyncWriter::record`] validates the event, queues it and waits for its own
//! answer. *Committer* tasks share the queue; each holds one pooled connection. A
//! committer that starts a commit takes **everything** queued at that moment (up
//! to `max_batch`) and writes it with one multi-row INSERT, which in autocommit is
//! one transaction and one commit (one WAL flush) for the whole batch. There is no
//! timer window: a lone caller finds an idle committer waiting and is written at
//! once with a plain single-row INSERT, the same statement a naive writer would
//! send. Coalescing happens only because calls arrive while commits are in flight.
//!
//! How many commits run at once is the one tuning question, and it has two
//! opposite answers. When the database is CPU-bound, every extra statement costs
//! (parse, executor start, commit record), so few large batches win. When commits
//! wait on the disk (or on the network), PostgreSQL's own group flush covers every
//! commit record written while the previous flush ran, so more statements in
//! flight put more events behind each flush. Admission control serves both:
//! [`EAGER_COMMITS`] commits may always be in flight (so a caller never waits for
//! company, and 64 callers keep at least two commits going); a committer that just
//! finished takes whatever is queued; and each further concurrent commit starts
//! only when the queue holds enough events to be worth a statement of its own
//! (`extra_commit_step` more for each commit already beyond the eager ones), up to
//! `committers`. The default `committers` is the eager count, so that last rule
//! is off unless configured (why: [`SyncConfig::default`]).
//!
//! Invariants:
//! - the INSERT never runs in the caller's transaction (the writer has its own
//!   connections), so the audit row survives the caller's rollback and an audit
//!   failure never rolls the caller back;
//! - every caller gets its own answer: its row id, or its own error. When a batch
//!   fails because of one row (a duplicate, a constraint), each event is retried
//!   alone, so one bad event does not fail its neighbours;
//! - no call waits longer than the configured timeout (plus a small grace): a
//!   database that is down gives [`PgError::DatabaseUnavailable`] (the event was not
//!   sent), a statement that got no answer gives [`PgError::OutcomeUnknown`]. Each
//!   request carries a claim flag that either the committer (about to send it) or
//!   the caller (giving up) sets first, so that distinction is exact. A refused
//!   connect fails the batch at once, and after a connect that got no answer
//!   the next batches fail at once for a moment instead of waiting on the same
//!   silence ([`Reconnect`]).
//!
//! Sync rows have `sample_rate` 1.0 unless the caller passes one
//! ([`SyncWriter::record_sampled`]). Without a chain key their `stream_id` and
//! `lsn` are NULL; with one (`SyncConfig::chain_key`) every committer is a
//! signed chain stream of its own and its rows carry their links
//! ([`super::sync_chain`]). The WAL, the loader and the COPY encoding are
//! elsewhere.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::{Arguments, Connection, PgConnection, PgPool, Postgres, Row};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};
use uuid::Uuid;

use super::error::{classify, PgError, Stage};
use super::reconnect::Reconnect;
use super::schema::{self, PARTITIONS_AHEAD};
use crate::columns::{self, Column, ColumnVisitor, Value, SYNC_COLUMNS, TABLE};
use super::sync_chain::{self, ChainSettings, Plan, SyncChain};
use crate::event::{AuditEvent, EventError, JsonText, Outcome, DEFAULT_MAX_EVENT_BYTES};
use crate::pg::link::{self, LinkTuning};
use crate::wal::format::MAX_PAYLOAD_LEN;
use crate::wal::payload::{encode_event, PayloadError};

/// The id of a stored row (`audit_events.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowId(pub i64);

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Settings of a [`SyncWriter`]. Defaults in [`SyncConfig::default`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SyncConfig {
    /// Committer tasks, each with its own connection (opened by the committer,
    /// not taken from the pool): the most commits in flight at once.
    pub committers: usize,
    /// Beyond [`EAGER_COMMITS`] commits in flight, another one starts only when the
    /// queue holds at least `extra_commit_step` × (commits in flight − 1) events.
    pub extra_commit_step: usize,
    /// The longest a call waits for its answer, connecting included.
    pub timeout: Duration,
    /// Apply the migrations at start (needs the table owner's rights; a login with
    /// only `auditwal_writer` sets this to false).
    pub migrate: bool,
    /// Most events in one multi-row INSERT.
    pub max_batch: usize,
    /// Event size limit passed to [`AuditEvent::validate`].
    pub max_event_bytes: usize,
    /// How often to make sure the monthly partitions ahead exist.
    pub partition_check_interval: Duration,
    /// Keepalive and `TCP_USER_TIMEOUT` of the committers' connections
    /// ([`crate::pg::link`]): a connection whose link died is ended by the kernel
    /// within this, so the next call opens a new one instead of sending into it.
    pub link_timeout: Duration,
    /// The Ed25519 private key (`auditwal keygen`) that signs each committer's
    /// hash chain ([`super::sync_chain`], docs/integrity.md); none: rows are
    /// stored without chain links.
    pub chain_key: Option<PathBuf>,
    /// Events between signed checkpoints, at most.
    pub checkpoint_every: u64,
    /// The longest an event waits for a signed checkpoint.
    pub checkpoint_interval: Duration,
}

/// `committers` was chosen with `auditwal bench sync` at 64 callers on a 2-core
/// host (docs/benchmarks.md, `bench sync`, has the runs): every commit is a WAL
/// flush, which on such a host stalls both cores, so two eager committers
/// making fewer, larger batches beat more of them. With the database across a
/// network a commit also waits on the round trip, where more commits in flight
/// may pay (not measured).
impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            committers: 2,
            extra_commit_step: 12,
            timeout: Duration::from_secs(5),
            migrate: true,
            max_batch: 512,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            partition_check_interval: Duration::from_secs(3600),
            link_timeout: link::DEFAULT_LINK_TIMEOUT,
            chain_key: None,
            checkpoint_every: crate::wal::DEFAULT_CHECKPOINT_EVERY,
            checkpoint_interval: crate::wal::DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}

impl SyncConfig {
    fn check(&self) -> Result<(), PgError> {
        if self.committers == 0 {
            return Err(PgError::Config("sync.committers must be at least 1".into()));
        }
        if self.max_batch == 0 {
            return Err(PgError::Config("sync.max_batch must be at least 1".into()));
        }
        if self.timeout.is_zero() {
            return Err(PgError::Config("sync.timeout must be positive".into()));
        }
        Ok(())
    }
}

/// How long a caller waits past its deadline for the committer's own answer
/// before giving up: the committer bounds its waits by the same deadline, so its
/// answer normally arrives first and is the more precise one.
const GRACE: Duration = Duration::from_millis(100);

/// A connection idle for longer than this is pinged before use: after a server
/// restart it is dead, and finding that out by sending an INSERT would turn "not
/// sent" into "outcome unknown".
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

struct Request {
    event: AuditEvent,
    sample_rate: f64,
    /// The event in the WAL's encoding, when the writer signs a chain: what
    /// its link hashes and `wal_payload` keeps.
    payload: Option<Vec<u8>>,
    deadline: Instant,
    /// QUEUED until the committer (SENT, about to send) or the caller (ABANDONED,
    /// gave up) claims it.
    claim: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<RowId, PgError>>,
}

impl Request {
    fn answer(self, result: Result<RowId, PgError>) {
        // The caller may have given up; nobody is left to tell.
        let _ = self.reply.send(result);
    }
}

/// Writes events in sync mode. Cheap to clone; clones share the queue and the
/// committers, which stop when the last clone is dropped (after answering what is
/// queued). Must be created inside a tokio runtime.
#[derive(Clone)]
pub struct SyncWriter {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<Queue>,
    /// Whether rows get chain links (then each request carries its payload).
    chained: bool,
    pool: PgPool,
    config: SyncConfig,
    upkeep: JoinHandle<()>,
    /// Taken by [`SyncWriter::close`], which waits for them.
    committers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.upkeep.abort();
        // The committers answer what is queued, then stop.
        self.queue.close();
    }
}

/// Commits that may always be in flight, whatever the queue holds: a lone caller
/// never waits for company, and a second commit can run while the first one waits
/// for its flush.
pub const EAGER_COMMITS: usize = 2;

/// The queue the committers share, with the admission rule of the module comment.
struct Queue {
    state: std::sync::Mutex<QueueState>,
    /// Wakes an idle committer to re-check the admission rule.
    wake: Notify,
    max_batch: usize,
    step: usize,
}

struct QueueState {
    items: VecDeque<Request>,
    in_flight: usize,
    closed: bool,
}

enum Take {
    Batch(Vec<Request>),
    Wait,
    Closed,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Nothing panics while holding this lock; if something did, the queue is
        // still a valid queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, r: Request) -> Result<(), PgError> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err(PgError::Closed);
            }
            st.items.push_back(r);
        }
        self.wake.notify_one();
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// Takes a batch if this committer may start a commit now. `freed`: it has
    /// just finished one, so starting another does not add to what is in flight.
    fn take(&self, freed: bool) -> Take {
        let mut st = self.lock();
        let queued = st.items.len();
        if queued == 0 {
            return if st.closed { Take::Closed } else { Take::Wait };
        }
        let admitted = freed
            || st.closed
            || st.in_flight < EAGER_COMMITS
            || queued >= self.step.saturating_mul(st.in_flight + 1 - EAGER_COMMITS);
        if !admitted {
            return Take::Wait;
        }
        let n = queued.min(self.max_batch);
        let batch: Vec<Request> = st.items.drain(..n).collect();
        st.in_flight += 1;
        let more = !st.items.is_empty();
        drop(st);
        if more {
            // Left over beyond max_batch: another committer may be admitted.
            self.wake.notify_one();
        }
        Take::Batch(batch)
    }

    fn done(&self) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

impl SyncWriter {
    /// Connects to `url` (lazily: the pool opens connections on demand, each bounded
    /// by `config.timeout`), applies the migrations if `config.migrate`, and starts
    /// the committers.
    pub async fn connect(url: &str, config: SyncConfig) -> Result<SyncWriter, PgError> {
        config.check()?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| PgError::Config(format!("database URL: {e}")))?;
        // For partition upkeep and `pool()` readers: migrations and the
        // committers open connections of their own.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(config.timeout)
            .connect_lazy_with(options);
        SyncWriter::from_pool(pool, config).await
    }

    /// Uses an existing pool for partition upkeep. Migrations and the committers
    /// open connections of their own, with the pool's connect options.
    pub async fn from_pool(pool: PgPool, config: SyncConfig) -> Result<SyncWriter, PgError> {
        config.check()?;
        if config.migrate {
            match tokio::time::timeout(config.timeout, migrate_once(&pool.connect_options())).await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(PgError::DatabaseUnavailable {
                        reason: PgError::timed_out("applying migrations", config.timeout),
                    })
                }
            }
        }
        let queue = Arc::new(Queue {
            state: std::sync::Mutex::new(QueueState {
                items: VecDeque::new(),
                in_flight: 0,
                closed: false,
            }),
            wake: Notify::new(),
            max_batch: config.max_batch,
            step: config.extra_commit_step.max(1),
        });
        let chain = match &config.chain_key {
            Some(key) => Some(
                ChainSettings::read(key, config.checkpoint_every, config.checkpoint_interval)
                    .map_err(|e| PgError::Config(format!("chain_key: {e}")))?,
            ),
            None => None,
        };
        let reconnect = Arc::new(Reconnect::default());
        let mut committers = Vec::with_capacity(config.committers);
        for index in 0..config.committers {
            let committer = Committer {
                chain: chain.as_ref().map(|c| c.stream(index)),
                checkpoint_retry: None,
                options: pool.connect_options(),
                reconnect: reconnect.clone(),
                conn: None,
                last_used: Instant::now(),
                timeout: config.timeout,
                tuning: LinkTuning::for_timeout(config.link_timeout),
            };
            committers.push(tokio::spawn(committer.run(queue.clone())));
        }
        let upkeep = tokio::spawn(partition_upkeep(
            pool.clone(),
            config.partition_check_interval,
            // Right after migrate the partitions are fresh; otherwise check now.
            !config.migrate,
        ));
        Ok(SyncWriter {
            inner: Arc::new(Inner {
                queue,
                chained: chain.is_some(),
                pool,
                config,
                upkeep,
                committers: std::sync::Mutex::new(committers),
            }),
        })
    }

    /// Stores `event` (sample_rate 1.0) in its own transaction and returns its row
    /// id once committed.
    pub async fn record(&self, event: &AuditEvent) -> Result<RowId, PgError> {
        self.record_sampled(event, 1.0).await
    }

    /// As [`SyncWriter::record`], storing `sample_rate` (in (0, 1]) with the row:
    /// the fraction of such events that were kept, for the sampled mode.
    pub async fn record_sampled(
        &self,
        event: &AuditEvent,
        sample_rate: f64,
    ) -> Result<RowId, PgError> {
        event.validate(self.inner.config.max_event_bytes)?;
        if !(sample_rate > 0.0 && sample_rate <= 1.0) {
            return Err(PgError::InvalidSampleRate { value: sample_rate });
        }
        let timeout = self.inner.config.timeout;
        let deadline = Instant::now() + timeout;
        let mut event = event.clone();
        // PostgreSQL keeps microseconds. Truncate here so the value we send is the
        // value stored, which is how batch results are matched back to callers.
        event.occurred_at = event.occurred_at.trunc_subsecs(6);
        let payload = match self.inner.chained {
            true => {
                let mut buf = Vec::new();
                encode_event(&event, sample_rate, &mut buf).map_err(unencodable)?;
                Some(buf)
            }
            false => None,
        };
        let claim = Arc::new(AtomicU8::new(QUEUED));
        let (reply, answer) = oneshot::channel();
        self.inner.queue.push(Request {
            event,
            sample_rate,
            payload,
            deadline,
            claim: claim.clone(),
            reply,
        })?;
        match timeout_at(deadline + GRACE, answer).await {
            Ok(Ok(result)) => result,
            // The committer went away without answering (its runtime shut down).
            // Whether the event may be stored depends on whether it was claimed
            // for sending: a statement already on the wire can still commit.
            Ok(Err(_)) => match claim.load(Ordering::Acquire) {
                SENT => Err(PgError::OutcomeUnknown {
                    reason: "the sync writer stopped after sending the INSERT, before its answer"
                        .into(),
                }),
                _ => Err(PgError::Closed),
            },
            Err(_) => {
                if claim
                    .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    Err(PgError::DatabaseUnavailable {
                        reason: format!(
                            "not sent: no committer could reach the database within {timeout:?}"
                        ),
                    })
                } else {
                    Err(PgError::OutcomeUnknown {
                        reason: PgError::timed_out("INSERT sent", timeout),
                    })
                }
            }
        }
    }

    /// Refuses further calls ([`PgError::Closed`]), lets the committers answer
    /// what is queued and sign their chains' last events, and waits for them
    /// (each within the timeout). Dropping the last clone closes too, but
    /// cannot wait: a runtime shut down right after may cut the last
    /// checkpoint short, leaving those rows unsigned.
    pub async fn close(&self) {
        self.inner.queue.close();
        let handles: Vec<JoinHandle<()>> = match self.inner.committers.lock() {
            Ok(mut h) => h.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        let limit = self.inner.config.timeout + GRACE;
        for h in handles {
            if tokio::time::timeout(limit, h).await.is_err() {
                tracing::warn!("sync writer close: a committer did not finish within {limit:?}");
            }
        }
    }

    /// The writer's pool (for callers that want to read what they wrote).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &SyncConfig {
        &self.inner.config
    }
}

/// An event that passed validation but has no WAL encoding (the chain hashes
/// that encoding): only a size over the record limit or a timestamp out of
/// range can get here.
fn unencodable(e: PayloadError) -> PgError {
    match e {
        PayloadError::TooLarge { len } => PgError::InvalidEvent(EventError::TooLarge {
            size: len,
            limit: MAX_PAYLOAD_LEN,
        }),
        PayloadError::TimestampOutOfRange { micros } => {
            PgError::InvalidEvent(EventError::TimestampOutOfRange {
                value: format!("{micros} µs since the epoch"),
            })
        }
        PayloadError::InvalidSampleRate { value } => PgError::InvalidSampleRate { value },
        other => PgError::Client(format!("cannot encode the event for its chain link: {other}")),
    }
}

/// Applies the migrations on a connection of its own, opened in one attempt:
/// with the server down, opening fails at once instead of waiting out the
/// timeout (a pool's acquire would retry the refused connect until then).
async fn migrate_once(options: &PgConnectOptions) -> Result<(), PgError> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .map_err(|e| classify(&e, Stage::BeforeSend, None))?;
    let result = schema::migrate_connection(&mut conn).await;
    // Ending the session also releases the advisory lock sqlx may leave held
    // when a migration fails.
    let _ = conn.close().await;
    result
}

/// Keeps the monthly partitions ahead in existence while the writer lives, so rows
/// of a new month never pile up in the default partition.
async fn partition_upkeep(pool: PgPool, every: Duration, check_now: bool) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    if !check_now {
        tick.tick().await;
    }
    loop {
        tick.tick().await;
        let result = async {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| classify(&e, Stage::BeforeSend, None))?;
            schema::ensure_partitions(&mut conn, PARTITIONS_AHEAD).await
        }
        .await;
        match result {
            Ok(n) if n > 0 => tracing::info!(created = n, "created monthly partitions ahead"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not check the monthly partitions; will retry")
            }
        }
    }
}

struct Committer {
    options: Arc<PgConnectOptions>,
    reconnect: Arc<Reconnect>,
    conn: Option<PgConnection>,
    last_used: Instant,
    timeout: Duration,
    tuning: LinkTuning,
    /// The hash chain this committer's rows are links of, when signing.
    chain: Option<SyncChain>,
    /// After a checkpoint-only statement failed: not before this again.
    checkpoint_retry: Option<Instant>,
}

/// How long an idle committer waits before retrying a checkpoint that failed.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

impl Committer {
    async fn run(mut self, queue: Arc<Queue>) {
        let mut freed = false;
        loop {
            // Register for a wake-up before looking, so a push in between is not
            // missed.
            let notified = queue.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match queue.take(freed) {
                Take::Batch(batch) => {
                    self.commit(batch).await;
                    queue.done();
                    freed = true;
                }
                Take::Wait => {
                    freed = false;
                    match self.checkpoint_due_at() {
                        Some(due) => {
                            if timeout_at(due, notified).await.is_err() {
                                self.checkpoint_only().await;
                            }
                        }
                        None => notified.await,
                    }
                }
                Take::Closed => {
                    if self.chain.as_ref().is_some_and(SyncChain::has_unsigned) {
                        self.checkpoint_only().await;
                    }
                    return;
                }
            }
        }
    }

    /// Writes one batch and answers each of its callers.
    async fn commit(&mut self, batch: Vec<Request>) {
        let Some(earliest) = batch.iter().map(|r| r.deadline).min() else {
            return;
        };
        if let Err(reason) = self.ready_connection(earliest).await {
            for r in batch {
                r.answer(Err(PgError::DatabaseUnavailable {
                    reason: reason.clone(),
                }));
            }
            return;
        }
        // Claim what we are about to send; skip callers that gave up or ran out of
        // time while queued (for those, "not sent" is the truth).
        let now = Instant::now();
        let mut sending = Vec::with_capacity(batch.len());
        for r in batch {
            if r.reply.is_closed() {
                continue;
            }
            if now >= r.deadline {
                if r.claim
                    .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    r.answer(Err(PgError::DatabaseUnavailable {
                        reason: format!("not sent within {:?}", self.timeout),
                    }));
                }
                continue;
            }
            if r.claim
                .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                sending.push(r);
            }
        }
        let Some(latest) = sending.iter().map(|r| r.deadline).max() else {
            return;
        };
        let Some(conn) = self.conn.as_mut() else {
            // Unreachable (ready_connection just succeeded), but answered rather
            // than dropped: a dropped claimed request reads as "outcome unknown".
            for r in sending {
                r.answer(Err(PgError::DatabaseUnavailable {
                    reason: "no connection to send on".into(),
                }));
            }
            return;
        };
        let result = send(conn, self.chain.as_mut(), &sending, latest).await;
        self.last_used = Instant::now();
        match result {
            Ok(Ok(ids)) => {
                for (r, id) in sending.into_iter().zip(ids) {
                    r.answer(id.ok_or_else(|| PgError::OutcomeUnknown {
                        reason: "the INSERT returned no row for this event".into(),
                    }));
                }
            }
            Err(_elapsed) => {
                // The statement may still run; the connection is in an unknown state.
                self.discard_connection();
                for r in sending {
                    r.answer(Err(PgError::OutcomeUnknown {
                        reason: PgError::timed_out("INSERT sent", self.timeout),
                    }));
                }
            }
            Ok(Err(e)) if is_connection_error(&e) => {
                self.discard_connection();
                for r in sending {
                    let err = classify(&e, Stage::InFlight, Some(r.event.event_id));
                    r.answer(Err(err));
                }
            }
            Ok(Err(e)) if sending.len() == 1 => {
                for r in sending {
                    let err = classify(&e, Stage::InFlight, Some(r.event.event_id));
                    r.answer(Err(err));
                }
            }
            Ok(Err(e)) => {
                // Some row of the batch was refused, and the whole statement with it
                // (nothing was stored). Retry each event alone so each caller gets
                // its own answer.
                tracing::debug!(error = %e, events = sending.len(), "batch refused; retrying each event alone");
                self.one_by_one(sending).await;
            }
        }
    }

    /// Retries each event of a refused batch alone. The refused statement stored
    /// nothing, so an event whose deadline has passed by its turn is answered "not
    /// stored" without being sent: sending it anyway, with no time left, could
    /// commit a row its caller was told nothing definite about and would drop a
    /// healthy connection on the timeout.
    async fn one_by_one(&mut self, sending: Vec<Request>) {
        for r in sending {
            if Instant::now() >= r.deadline {
                r.answer(Err(PgError::DatabaseUnavailable {
                    reason: format!(
                        "not stored: its batch was refused because of another event, and its \
                         {:?} ran out before it could be sent alone",
                        self.timeout
                    ),
                }));
                continue;
            }
            let result = match self.conn.as_mut() {
                None => Err(PgError::DatabaseUnavailable {
                    reason: "connection lost while retrying a refused batch".into(),
                }),
                Some(conn) => {
                    let one = std::slice::from_ref(&r);
                    match send(conn, self.chain.as_mut(), one, r.deadline).await {
                        Ok(Ok(ids)) => ids.into_iter().next().flatten().ok_or_else(|| {
                            PgError::OutcomeUnknown {
                                reason: "the INSERT returned no row for this event".into(),
                            }
                        }),
                        Ok(Err(e)) => {
                            if is_connection_error(&e) {
                                self.discard_connection();
                            }
                            Err(classify(&e, Stage::InFlight, Some(r.event.event_id)))
                        }
                        Err(_) => {
                            self.discard_connection();
                            Err(PgError::OutcomeUnknown {
                                reason: PgError::timed_out("INSERT sent", self.timeout),
                            })
                        }
                    }
                }
            };
            self.last_used = Instant::now();
            r.answer(result);
        }
    }

    /// Makes sure `self.conn` holds a live connection, by `deadline`. A held
    /// connection idle for [`PING_AFTER_IDLE`] is pinged first (a ping per batch
    /// would double a lone caller's latency): it may have died with a server
    /// restart, and sending the INSERT into it would turn "not sent" into
    /// "outcome unknown". A dead one is dropped and a new one opened, in one
    /// attempt: a refused connect is the answer at once. (A pool's acquire would
    /// retry a refused connect until its timeout, holding every caller for the
    /// whole of it while the server is down.) After a connect that got no answer,
    /// [`Reconnect`] decides when the next is tried.
    async fn ready_connection(&mut self, deadline: Instant) -> Result<(), String> {
        if self.last_used.elapsed() >= PING_AFTER_IDLE {
            if let Some(c) = self.conn.as_mut() {
                if !matches!(timeout_at(deadline, c.ping()).await, Ok(Ok(()))) {
                    self.discard_connection();
                }
            }
        }
        if self.conn.is_none() {
            let attempt = self.reconnect.attempt(Instant::now())?;
            match timeout_at(deadline, link::connect(&self.options, &self.tuning)).await {
                Ok(Ok((mut c, _))) => {
                    attempt.answered();
                    if let Some(chain) = self.chain.as_mut() {
                        match timeout_at(deadline, chain.on_connect(&mut c)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                return Err(format!(
                                    "taking chain stream {}'s lock: {e}",
                                    chain.stream_id()
                                ))
                            }
                            Err(_) => {
                                return Err(format!(
                                    "the session of an unanswered statement on chain stream {} \
                                     has not ended yet",
                                    chain.stream_id()
                                ))
                            }
                        }
                    }
                    self.conn = Some(c);
                }
                Ok(Err(e)) => {
                    attempt.answered();
                    return Err(match classify(&e, Stage::BeforeSend, None) {
                        PgError::DatabaseUnavailable { reason } => reason,
                        other => other.to_string(),
                    });
                }
                Err(_) => {
                    let reason = PgError::timed_out("connecting", self.timeout);
                    attempt.no_answer(Instant::now(), reason.clone());
                    return Err(reason);
                }
            }
        }
        self.last_used = Instant::now();
        Ok(())
    }

    /// When an idle committer must wake to sign its chain's unsigned events.
    fn checkpoint_due_at(&self) -> Option<Instant> {
        let due = self.chain.as_ref()?.checkpoint_due_at()?;
        Some(self.checkpoint_retry.map_or(due, |retry| due.max(retry)))
    }

    /// Signs and stores a checkpoint of the chain's unsigned events in a
    /// statement of its own (an idle committer's, and at close).
    async fn checkpoint_only(&mut self) {
        let deadline = Instant::now() + self.timeout;
        let stored = match self.ready_connection(deadline).await {
            Err(reason) => Err(reason),
            Ok(()) => match (self.chain.as_mut(), self.conn.as_mut()) {
                (Some(chain), Some(conn)) => {
                    let plan = chain.plan(std::iter::empty(), true);
                    let stream = chain.stream_id().to_string();
                    let result =
                        timeout_at(deadline, sync_chain::insert_checkpoints(conn, &stream, &plan))
                            .await;
                    self.last_used = Instant::now();
                    match result {
                        Ok(Ok(())) => {
                            chain.committed(plan);
                            Ok(())
                        }
                        Ok(Err(e)) if !is_connection_error(&e) => Err(e.to_string()),
                        other => {
                            chain.in_doubt(plan);
                            self.conn = None;
                            Err(match other {
                                Ok(Err(e)) => e.to_string(),
                                _ => PgError::timed_out("storing a checkpoint", self.timeout),
                            })
                        }
                    }
                }
                _ => Ok(()),
            },
        };
        self.checkpoint_retry = match stored {
            Ok(()) => None,
            Err(reason) => {
                tracing::warn!(%reason, "sync chain: could not store a checkpoint; will retry");
                Some(Instant::now() + CHECKPOINT_RETRY)
            }
        };
    }

    /// Drops the connection, whose state is unknown; a new one is opened for
    /// the next batch.
    fn discard_connection(&mut self) {
        self.conn = None;
    }
}

/// Sends one statement for `batch` by `deadline`; with a chain, one that also
/// stores the rows' links and any due checkpoint, and moves the chain's
/// position by its outcome (a refused statement stored nothing; one without
/// an answer leaves the position in doubt).
async fn send(
    conn: &mut PgConnection,
    chain: Option<&mut SyncChain>,
    batch: &[Request],
    deadline: Instant,
) -> Result<Result<Vec<Option<RowId>>, sqlx::Error>, tokio::time::error::Elapsed> {
    let Some(chain) = chain else {
        return match batch {
            [one] => timeout_at(deadline, insert_one(conn, &one.event, one.sample_rate))
                .await
                .map(|r| r.map(|id| vec![Some(id)])),
            many => timeout_at(deadline, insert_many(conn, many, None)).await,
        };
    };
    let plan = chain.plan(
        batch.iter().map(|r| {
            (
                r.payload.as_deref().unwrap_or_default(),
                r.event.event_id,
                r.event.occurred_at,
            )
        }),
        false,
    );
    let stream = chain.stream_id().to_string();
    let result = timeout_at(deadline, insert_many(conn, batch, Some((&stream, &plan)))).await;
    match &result {
        Ok(Ok(_)) => chain.committed(plan),
        Ok(Err(e)) if !is_connection_error(e) => {}
        _ => chain.in_doubt(plan),
    }
    result
}

/// True when the error says the connection (not the row) is the problem.
fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        classify(e, Stage::InFlight, None),
        PgError::OutcomeUnknown { .. } | PgError::DatabaseUnavailable { .. } | PgError::Closed
    )
}

/// Sync mode's columns whose value is bound as text (what the event holds) and
/// cast by the server: `inet` and `jsonb`.
fn bound_as_text(column: &Column) -> bool {
    matches!(column.pg_type, "inet" | "jsonb")
}

/// `INSERT INTO audit_events (<SYNC_COLUMNS>) VALUES ($1, .., $n) RETURNING id`.
fn insert_one_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let values: Vec<String> = SYNC_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, c)| match bound_as_text(c) {
                true => format!("${}::{}", i + 1, c.pg_type),
                false => format!("${}", i + 1),
            })
            .collect();
        format!(
            "INSERT INTO {TABLE} ({}) VALUES ({}) RETURNING id",
            columns::name_list(&SYNC_COLUMNS),
            values.join(", ")
        )
    })
}

/// The multi-row INSERT: one array per column, unnested in step.
fn insert_many_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| unnest_insert_sql(false, false))
}

/// [`insert_many_sql`] with the chain columns ([`sync_chain`]), and with the
/// statement's checkpoints when `checkpoints` (a data-modifying CTE costs
/// every statement that carries it, so only those with one do).
fn insert_chained_sql(checkpoints: bool) -> &'static str {
    static LINKS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static WITH_CHECKPOINTS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match checkpoints {
        false => LINKS.get_or_init(|| unnest_insert_sql(true, false)),
        true => WITH_CHECKPOINTS.get_or_init(|| unnest_insert_sql(true, true)),
    }
}

/// The chain columns a chained INSERT adds, one array each, after the stream
/// (a single value).
const CHAIN_ARRAYS: [(&str, &str); 4] = [
    ("lsn", "int8"),
    ("chain_prev_lsn", "int8"),
    ("chain_hash", "bytea"),
    ("wal_payload", "bytea"),
];

fn unnest_insert_sql(chained: bool, checkpoints: bool) -> String {
    // One statement, one transaction, one commit for the whole batch. Text is
    // cast to inet/jsonb server-side.
    let mut alias: Vec<String> = SYNC_COLUMNS.iter().map(|c| c.name.to_string()).collect();
    let mut select: Vec<String> = SYNC_COLUMNS
        .iter()
        .map(|c| match bound_as_text(c) {
            true => format!("{}::{}", c.name, c.pg_type),
            false => c.name.to_string(),
        })
        .collect();
    let mut arrays: Vec<String> = SYNC_COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| match bound_as_text(c) {
            true => format!("${}::text[]", i + 1),
            false => format!("${}::{}[]", i + 1, c.pg_type),
        })
        .collect();
    let mut columns = alias.clone();
    let mut with = String::new();
    if chained {
        let stream = SYNC_COLUMNS.len() + 1;
        for (i, (name, ty)) in CHAIN_ARRAYS.iter().enumerate() {
            alias.push(name.to_string());
            select.push(name.to_string());
            arrays.push(format!("${}::{ty}[]", stream + 1 + i));
        }
        columns = alias.clone();
        columns.push("stream_id".into());
        select.push(format!("${stream}::text"));
        let c = stream + 1 + CHAIN_ARRAYS.len();
        if checkpoints {
            with = format!(
                "WITH checkpoints AS (INSERT INTO audit_chain_checkpoints \
                 (stream_id, lsn, size, head, note) SELECT ${stream}::text, * FROM \
                 unnest(${c}::int8[], ${}::int8[], ${}::bytea[], ${}::text[])) ",
                c + 1,
                c + 2,
                c + 3
            );
        }
    }
    format!(
        "{with}INSERT INTO {TABLE} ({}) SELECT {} FROM unnest({}) AS t({}) \
         RETURNING id, event_id, occurred_at",
        columns.join(", "),
        select.join(", "),
        arrays.join(", "),
        alias.join(", ")
    )
}

/// One event's values as the binds of [`insert_one_sql`], in column order.
struct RowBinds {
    args: PgArguments,
    /// The first value that could not be encoded, reported at send time.
    failed: Option<sqlx::error::BoxDynError>,
}

impl RowBinds {
    fn add<'q, T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(&mut self, value: T) {
        if self.failed.is_none() {
            if let Err(e) = self.args.add(value) {
                self.failed = Some(e);
            }
        }
    }
}

impl<'e> ColumnVisitor<'e> for RowBinds {
    fn value(&mut self, value: Value<'e>) {
        match value {
            Value::Uuid(id) => self.add(*id),
            Value::Timestamptz(t) => self.add(*t),
            Value::Text(s) => self.add(s),
            Value::OptText(s) => self.add(s),
            Value::Outcome(o) => self.add(o.map(Outcome::as_str)),
            Value::Inet(ip) => self.add(ip.map(|ip| ip.to_string())),
            Value::Jsonb(j) => self.add(j.map(JsonText::as_str)),
        }
    }
}

/// A batch's values as the arrays of [`insert_many_sql`]: one per column, in
/// column order, each with one element per event.
#[derive(Default)]
struct ArrayBinds<'e> {
    arrays: Vec<Array<'e>>,
    /// The column the next value belongs to.
    column: usize,
}

/// One column's values across a batch, typed as [`insert_many_sql`] binds them.
enum Array<'e> {
    Uuid(Vec<Uuid>),
    Timestamptz(Vec<DateTime<Utc>>),
    /// text, and inet or jsonb bound as text.
    Text(Vec<Option<&'e str>>),
    /// inet, formatted.
    Owned(Vec<Option<String>>),
}

impl<'e> ArrayBinds<'e> {
    fn new(batch: &'e [Request]) -> Self {
        let mut binds = ArrayBinds::default();
        for r in batch {
            binds.column = 0;
            columns::visit_event(&r.event, &mut binds);
        }
        binds
    }
}

impl<'e> ColumnVisitor<'e> for ArrayBinds<'e> {
    fn value(&mut self, value: Value<'e>) {
        if self.column == self.arrays.len() {
            // The first event: one empty array per column, of the column's type.
            self.arrays.push(match value {
                Value::Uuid(_) => Array::Uuid(Vec::new()),
                Value::Timestamptz(_) => Array::Timestamptz(Vec::new()),
                Value::Inet(_) => Array::Owned(Vec::new()),
                _ => Array::Text(Vec::new()),
            });
        }
        match (&mut self.arrays[self.column], value) {
            (Array::Uuid(a), Value::Uuid(id)) => a.push(*id),
            (Array::Timestamptz(a), Value::Timestamptz(t)) => a.push(*t),
            (Array::Owned(a), Value::Inet(ip)) => a.push(ip.map(|ip| ip.to_string())),
            (Array::Text(a), Value::Text(s)) => a.push(Some(s)),
            (Array::Text(a), Value::OptText(s)) => a.push(s),
            (Array::Text(a), Value::Outcome(o)) => a.push(o.map(Outcome::as_str)),
            (Array::Text(a), Value::Jsonb(j)) => a.push(j.map(JsonText::as_str)),
            // visit_event gives each column a value of one variant, always.
            _ => unreachable!("column {} changed type between events", self.column),
        }
        self.column += 1;
    }
}

/// One event, one statement, autocommit: its own transaction, no coalescing. This
/// is the naive baseline the sync bench compares group commit against (same SQL as
/// a lone caller's). The event is validated first, as [`SyncWriter::record`] does.
pub async fn insert_unbatched(
    conn: &mut PgConnection,
    event: &AuditEvent,
    sample_rate: f64,
) -> Result<RowId, PgError> {
    event.validate(DEFAULT_MAX_EVENT_BYTES)?;
    insert_one(conn, event, sample_rate)
        .await
        .map_err(|e| classify(&e, Stage::InFlight, Some(event.event_id)))
}

async fn insert_one(
    conn: &mut PgConnection,
    event: &AuditEvent,
    sample_rate: f64,
) -> Result<RowId, sqlx::Error> {
    let mut binds = RowBinds {
        args: PgArguments::default(),
        failed: None,
    };
    columns::visit_event(event, &mut binds);
    binds.add(sample_rate);
    if let Some(e) = binds.failed {
        return Err(sqlx::Error::Encode(e));
    }
    let id: i64 = sqlx::query_scalar_with(insert_one_sql(), binds.args)
        .fetch_one(conn)
        .await?;
    Ok(RowId(id))
}

/// Several events in one multi-row INSERT; the ids come back in request order
/// (`None` if the database returned no row for one, which would be a bug).
/// `chain`: the stream and the plan of its links and checkpoints.
async fn insert_many(
    conn: &mut PgConnection,
    batch: &[Request],
    chain: Option<(&str, &Plan)>,
) -> Result<Vec<Option<RowId>>, sqlx::Error> {
    let n = batch.len();
    let mut args = PgArguments::default();
    for array in ArrayBinds::new(batch).arrays {
        match array {
            Array::Uuid(a) => args.add(a),
            Array::Timestamptz(a) => args.add(a),
            Array::Text(a) => args.add(a),
            Array::Owned(a) => args.add(a),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    let rates: Vec<f64> = batch.iter().map(|r| r.sample_rate).collect();
    args.add(rates).map_err(sqlx::Error::Encode)?;
    let sql = match chain {
        None => insert_many_sql(),
        Some((stream, plan)) => {
            let payloads: Vec<&[u8]> = batch
                .iter()
                .map(|r| r.payload.as_deref().unwrap_or_default())
                .collect();
            let mut added = vec![
                args.add(stream),
                args.add(&plan.lsns),
                args.add(&plan.prev_lsns),
                args.add(&plan.hashes),
                args.add(payloads),
            ];
            let checkpoints = !plan.checkpoint_lsns.is_empty();
            if checkpoints {
                added.extend([
                    args.add(&plan.checkpoint_lsns),
                    args.add(&plan.checkpoint_sizes),
                    args.add(&plan.checkpoint_heads),
                    args.add(&plan.checkpoint_notes),
                ]);
            }
            if let Some(Err(e)) = added.into_iter().find(Result::is_err) {
                return Err(sqlx::Error::Encode(e));
            }
            insert_chained_sql(checkpoints)
        }
    };
    let rows = sqlx::query_with(sql, args)
        .fetch_all(conn)
        .await?;
    // (event_id, occurred_at) is unique in the table, so it identifies each
    // returned row; occurred_at was truncated to microseconds before sending, so the
    // stored value compares equal.
    let mut by_key: HashMap<(Uuid, i64), i64> = HashMap::with_capacity(n);
    for row in rows {
        let id: i64 = row.try_get(0)?;
        let event_id: Uuid = row.try_get(1)?;
        let at: DateTime<Utc> = row.try_get(2)?;
        by_key.insert((event_id, at.timestamp_micros()), id);
    }
    Ok(batch
        .iter()
        .map(|r| {
            by_key
                .get(&(r.event.event_id, r.event.occurred_at.timestamp_micros()))
                .map(|&id| RowId(id))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_name_the_sync_columns_and_cast_text_binds_to_inet_and_jsonb() {
        let cols = "event_id, occurred_at, action, actor_id, actor_type, target_type, \
                    target_id, target_name, tenant_id, outcome, reason, ip, user_agent, \
                    request_id, before, after, metadata, sample_rate";
        assert_eq!(
            insert_one_sql(),
            format!(
                "INSERT INTO audit_events ({cols}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                 $9, $10, $11, $12::inet, $13, $14, $15::jsonb, $16::jsonb, $17::jsonb, $18) \
                 RETURNING id"
            )
        );
        assert_eq!(
            insert_many_sql(),
            format!(
                "INSERT INTO audit_events ({cols}) SELECT event_id, occurred_at, action, \
                 actor_id, actor_type, target_type, target_id, target_name, tenant_id, \
                 outcome, reason, ip::inet, user_agent, request_id, before::jsonb, \
                 after::jsonb, metadata::jsonb, sample_rate \
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                 $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], \
                 $16::text[], $17::text[], $18::float8[]) AS t({cols}) \
                 RETURNING id, event_id, occurred_at"
            )
        );
    }

    fn queue(step: usize) -> Queue {
        Queue {
            state: std::sync::Mutex::new(QueueState {
                items: VecDeque::new(),
                in_flight: 0,
                closed: false,
            }),
            wake: Notify::new(),
            max_batch: 100,
            step,
        }
    }

    fn push(q: &Queue, n: usize) {
        for _ in 0..n {
            let (reply, _answer) = oneshot::channel();
            let r = Request {
                event: AuditEvent::new("t"),
                sample_rate: 1.0,
                payload: None,
                deadline: Instant::now(),
                claim: Arc::new(AtomicU8::new(QUEUED)),
                reply,
            };
            assert!(q.push(r).is_ok());
        }
    }

    fn taken(t: Take) -> Option<usize> {
        match t {
            Take::Batch(b) => Some(b.len()),
            Take::Wait | Take::Closed => None,
        }
    }

    #[test]
    fn a_lone_request_is_taken_at_once_and_so_is_one_beside_a_single_commit() {
        let q = queue(4);
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(1));
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(1));
        assert_eq!(q.lock().in_flight, EAGER_COMMITS);
    }

    #[test]
    fn beyond_the_eager_commits_another_commit_needs_enough_queued_events() {
        let q = queue(4);
        push(&q, 2);
        assert_eq!(taken(q.take(false)), Some(2));
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(1));
        // Two in flight: a third needs 4 queued, a fourth 8.
        push(&q, 3);
        assert!(taken(q.take(false)).is_none());
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(4));
        push(&q, 7);
        assert!(taken(q.take(false)).is_none());
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(8));
    }

    #[test]
    fn a_committer_that_just_finished_takes_whatever_is_queued() {
        let q = queue(4);
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(1));
        push(&q, 1);
        assert_eq!(taken(q.take(false)), Some(1));
        push(&q, 1);
        assert!(taken(q.take(false)).is_none());
        q.done();
        assert_eq!(taken(q.take(true)), Some(1));
    }

    #[test]
    fn a_closed_queue_hands_out_what_is_left_then_says_closed() {
        let q = queue(4);
        q.lock().in_flight = 5;
        push(&q, 1);
        q.close();
        assert_eq!(taken(q.take(false)), Some(1));
        assert!(matches!(q.take(false), Take::Closed));
        let (reply, _answer) = oneshot::channel();
        let refused = q.push(Request {
            event: AuditEvent::new("t"),
            sample_rate: 1.0,
            payload: None,
            deadline: Instant::now(),
            claim: Arc::new(AtomicU8::new(QUEUED)),
            reply,
        });
        assert!(refused.is_err());
    }
}
