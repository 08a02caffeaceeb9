//! The audit API through its public surface against the real database and a
//! real WAL: every mode's rows are asserted in `audit_events` (WAL modes after
//! loading with the real loader), with their row ids, LSNs and sample rates.

use auditwal_test_support as common;

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditwal::loader::{LoadSummary, Loader, LoaderConfig};
use auditwal::pg::PgError;
use auditwal::wal::{FullDiskPolicy, WalError};
use auditwal::{
    AuditError, AuditEvent, AuditLog, Config, ConfigBuilder, ConfigError, EventError, Mode,
    Outcome, Receipt,
};
use common::TestDb;
use uuid::Uuid;

/// A builder for a log on `wal` (small segments, so tests rotate), and on `db`
/// for sync mode when given.
fn config(wal: &Path, db: Option<&TestDb>) -> ConfigBuilder {
    let b = Config::builder()
        .wal_dir(wal)
        .stream("t")
        .segment_size(1 << 20)
        .fsync_interval(Duration::from_millis(5))
        .sync_timeout(Duration::from_secs(10));
    match db {
        Some(db) => b.database_url(db.url()),
        None => b,
    }
}

async fn open(b: ConfigBuilder) -> AuditLog {
    AuditLog::open(b.build().expect("valid config"))
        .await
        .expect("opening the audit log")
}

fn event(i: usize) -> AuditEvent {
    AuditEvent::new("url.created")
        .actor("user", format!("u{i}"))
        .target("url", format!("{i}"))
        .request_id(format!("{i}"))
        .outcome(Outcome::Success)
}

async fn load(wal: &Path, db: &TestDb) -> LoadSummary {
    let mut c = LoaderConfig::new(wal, db.url());
    c.once = true;
    c.migrate = false;
    Loader::new(c).run().await.expect("loading the WAL")
}

/// One row of `audit_events`, the columns these tests look at.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Row {
    id: i64,
    event_id: Uuid,
    stream_id: Option<String>,
    lsn: Option<i64>,
    sample_rate: f64,
    action: String,
    request_id: Option<String>,
}

async fn rows(db: &TestDb) -> HashMap<Uuid, Row> {
    let all: Vec<Row> = sqlx::query_as(
        "SELECT id, event_id, stream_id, lsn, sample_rate, action, request_id \
         FROM audit_events",
    )
    .fetch_all(db.pool())
    .await
    .expect("reading audit_events");
    let n = all.len();
    let map: HashMap<Uuid, Row> = all.into_iter().map(|r| (r.event_id, r)).collect();
    assert_eq!(map.len(), n, "an event_id is stored twice");
    map
}

/// Asserts that the table holds exactly the receipts' kept events, each at
/// its receipt's LSN (or row id) with its receipt's sample rate.
async fn assert_rows_match(db: &TestDb, receipts: &[Receipt]) {
    let stored = rows(db).await;
    let kept: Vec<&Receipt> = receipts.iter().filter(|r| r.is_kept()).collect();
    assert_eq!(
        stored.len(),
        kept.len(),
        "{} rows stored, {} receipts kept",
        stored.len(),
        kept.len()
    );
    for r in kept {
        let row = stored
            .get(&r.event_id())
            .unwrap_or_else(|| panic!("no row for {r:?}"));
        match *r {
            Receipt::Committed { row_id, .. } => {
                assert_eq!(row.id, row_id.0, "{r:?}");
                assert_eq!((row.stream_id.as_deref(), row.lsn), (None, None), "{r:?}");
                assert_eq!(row.sample_rate, 1.0);
            }
            Receipt::Durable { lsn, .. } => {
                assert_eq!(row.lsn, Some(lsn as i64), "{r:?}");
                assert_eq!(row.stream_id.as_deref(), Some("t"));
                assert_eq!(row.sample_rate, 1.0);
            }
            Receipt::Appended {
                lsn, sample_rate, ..
            } => {
                assert_eq!(row.lsn, Some(lsn as i64), "{r:?}");
                assert_eq!(row.stream_id.as_deref(), Some("t"));
                assert_eq!(row.sample_rate, sample_rate, "{r:?}");
            }
            Receipt::SampledOut { .. } => unreachable!("filtered out above"),
        }
    }
}

fn written_lsn(log: &AuditLog) -> u64 {
    log.stats().wal.expect("a WAL").written_lsn
}

#[tokio::test]
async fn opened_while_the_link_is_silent_sync_calls_fail_at_once_until_it_answers_again() {
    let (cluster, db) = common::private_cluster_and_db().await;
    let proxy = common::BlackHoleProxy::silent(&cluster, &db).await;
    let b = Config::builder()
        .mode(Mode::Sync)
        .database_url(proxy.url())
        .sync_timeout(Duration::from_secs(1));
    // Opening waits once for the sync writer, then opens without it.
    let log = open(b).await;

    // The attempt at open got no answer: calls fail at once instead of each
    // waiting out the timeout on the same silence, and say why.
    for i in 0..3 {
        let err = common::fails_within(Duration::from_millis(300), log.record(&event(i))).await;
        assert!(
            matches!(&err, AuditError::Sync(PgError::DatabaseUnavailable { reason }) if reason.contains("no answer")),
            "{err:?}"
        );
    }

    // The link answers again: after the pause, the next call starts the writer.
    proxy.answer();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = log.record(&event(3)).await.expect("through the link again");
    assert_rows_match(&db, &[r]).await;
}

#[tokio::test]
async fn sync_mode_commits_before_returning_and_the_receipt_names_the_row() {
    let db = TestDb::new().await;
    let b = Config::builder()
        .mode(Mode::Sync)
        .database_url(db.url())
        .sync_timeout(Duration::from_secs(10));
    let log = open(b).await;
    assert!(log.stream_dir().is_none(), "sync alone opens no WAL");
    let mut receipts = Vec::new();
    for i in 0..20 {
        let r = log.record(&event(i)).await.expect("sync record");
        // Committed before the call returned: visible to another connection now.
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM audit_events WHERE event_id = $1")
            .bind(r.event_id())
            .fetch_optional(db.pool())
            .await
            .expect("lookup");
        assert_eq!(id, r.row_id().map(|r| r.0), "{r:?}");
        receipts.push(r);
    }
    assert_rows_match(&db, &receipts).await;
    let s = log.stats();
    assert_eq!(s.recorded.get(Mode::Sync), 20);
    assert_eq!(s.failed.total(), 0);
    log.close().await.expect("close");
}

#[tokio::test]
async fn async_mode_rows_arrive_through_the_loader_at_their_lsns() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(config(wal.path(), None).segment_size(256 * 1024)).await;
    let mut receipts = Vec::new();
    for i in 0..3000 {
        let r = log.record(&event(i)).await.expect("async record");
        assert!(
            matches!(r, Receipt::Appended { sample_rate, .. } if sample_rate == 1.0),
            "{r:?}"
        );
        receipts.push(r);
    }
    let lsns: Vec<u64> = receipts.iter().filter_map(Receipt::lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "LSNs increase");
    assert!(
        log.stats().wal.expect("wal").rotations > 1,
        "crossed segments"
    );
    log.close().await.expect("close");
    let loaded = load(wal.path(), &db).await;
    assert_eq!(loaded.rows_loaded, 3000);
    assert_rows_match(&db, &receipts).await;
    assert_eq!(log.stats().recorded.get(Mode::Async), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_mode_returns_only_after_the_covering_fsync() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    // The flusher's own period is far longer than the test: only the durable
    // calls' waits make it sync.
    let log = open(
        config(wal.path(), None)
            .mode(Mode::Durable)
            .fsync_interval(Duration::from_secs(600)),
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let log = log.clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for i in 0..20 {
                let r = log
                    .record(&event(t * 100 + i))
                    .await
                    .expect("durable record");
                let lsn = r.lsn().expect("an LSN");
                let durable = log.stats().wal.expect("wal").durable_lsn;
                assert!(durable >= lsn, "returned at durable {durable} < {lsn}");
                assert!(matches!(r, Receipt::Durable { .. }), "{r:?}");
                mine.push(r);
            }
            mine
        });
    }
    let mut receipts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        receipts.extend(done.expect("task"));
    }
    // With the writer still open, the loader loads up to the durable watermark:
    // every durable record is there already.
    load(wal.path(), &db).await;
    assert_rows_match(&db, &receipts).await;
    let s = log.stats();
    assert_eq!(s.recorded.get(Mode::Durable), 320);
    let w = s.wal.expect("wal");
    assert!(
        w.fsyncs < 320,
        "concurrent durable calls share fsyncs: {} fsyncs for 320 calls",
        w.fsyncs
    );
    log.close().await.expect("close");
}

#[tokio::test]
async fn a_per_call_mode_overrides_the_default() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(config(wal.path(), Some(&db)).sample_rate(0.0)).await;
    assert_eq!(log.config().mode, Mode::Async);
    let mut receipts = Vec::new();
    let admin = AuditEvent::new("admin.user.disabled").actor("admin", "root");
    let r = log.record_with(&admin, Mode::Sync).await.expect("sync");
    assert!(matches!(r, Receipt::Committed { .. }), "{r:?}");
    assert_eq!(db.count().await, 1, "the sync row is there before any load");
    receipts.push(r);
    for i in 0..10 {
        receipts.push(log.record(&event(i)).await.expect("default async"));
    }
    let r = log
        .record_with(&event(10), Mode::Durable)
        .await
        .expect("durable");
    assert!(matches!(r, Receipt::Durable { .. }), "{r:?}");
    receipts.push(r);
    // Sampled at rate 0.0: only forced events are kept.
    let r = log
        .record_with(&event(11), Mode::Sampled)
        .await
        .expect("sampled");
    assert_eq!(
        r,
        Receipt::SampledOut {
            event_id: r.event_id()
        }
    );
    receipts.push(r);
    let forced = AuditEvent::new("url.created").outcome(Outcome::Denied);
    let r = log
        .record_with(&forced, Mode::Sampled)
        .await
        .expect("forced");
    assert!(
        matches!(r, Receipt::Appended { sample_rate, .. } if sample_rate == 1.0),
        "{r:?}"
    );
    receipts.push(r);
    log.close().await.expect("close");
    load(wal.path(), &db).await;
    assert_rows_match(&db, &receipts).await;
    let s = log.stats();
    assert_eq!(
        [Mode::Sync, Mode::Durable, Mode::Async, Mode::Sampled].map(|m| s.recorded.get(m)),
        [1, 1, 10, 1]
    );
    assert_eq!((s.sampled_out, s.forced_keeps), (1, 1));
}

#[tokio::test]
async fn sync_without_a_database_url_is_refused_at_open_or_at_the_call() {
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(config(wal.path(), None)).await;
    let before = written_lsn(&log);
    let r = log.record_with(&event(1), Mode::Sync).await;
    assert!(
        matches!(
            r,
            Err(AuditError::ModeUnavailable {
                mode: Mode::Sync,
                setting: "database_url"
            })
        ),
        "{r:?}"
    );
    assert_eq!(written_lsn(&log), before, "nothing written");
    assert_eq!(log.stats().failed.get(Mode::Sync), 1);
    log.close().await.expect("close");

    // A default of sync without a URL does not open, even when set after build.
    let mut c = config(wal.path(), None).build().expect("valid");
    c.mode = Mode::Sync;
    let r = AuditLog::open(c).await;
    assert!(
        matches!(
            r,
            Err(AuditError::Config(ConfigError::Missing {
                setting: "database_url",
                ..
            }))
        ),
        "{r:?}"
    );
    // And the WAL modes need a WAL dir.
    let c = Config::builder()
        .mode(Mode::Sync)
        .database_url("postgres://127.0.0.1:1/x")
        .sync_timeout(Duration::from_millis(200))
        .build()
        .expect("sync only");
    let log = AuditLog::open(c)
        .await
        .expect("opens with the database down");
    let r = log.record_with(&event(1), Mode::Async).await;
    assert!(
        matches!(
            r,
            Err(AuditError::ModeUnavailable {
                mode: Mode::Async,
                setting: "wal_dir"
            })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn invalid_settings_fail_at_open_naming_the_setting() {
    let wal = tempfile::tempdir().expect("tempdir");
    let mut c = config(wal.path(), None).build().expect("valid");
    c.sample_rate = 1.5;
    let msg = AuditLog::open(c).await.expect_err("rate 1.5").to_string();
    assert!(
        msg.contains("`sample_rate`") && msg.contains("1.5"),
        "{msg}"
    );

    let mut c = config(wal.path(), None).build().expect("valid");
    c.fsync_interval = Duration::ZERO;
    let msg = AuditLog::open(c)
        .await
        .expect_err("zero interval")
        .to_string();
    assert!(msg.contains("`fsync_interval_ms`"), "{msg}");

    let msg = config(wal.path(), None)
        .env_from([("AUDIT_MODE", "eventually")])
        .build()
        .expect_err("unknown mode")
        .to_string();
    assert!(
        msg.contains("`audit_mode`") && msg.contains("eventually"),
        "{msg}"
    );

    let file = wal.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let mut c = config(wal.path(), None).build().expect("valid");
    c.wal_dir = Some(file.join("wal"));
    let msg = AuditLog::open(c).await.expect_err("unwritable").to_string();
    assert!(msg.contains("`wal_dir`"), "{msg}");
}

#[tokio::test]
async fn an_invalid_event_is_refused_at_the_call_in_every_mode_and_nothing_is_written() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(config(wal.path(), Some(&db)).max_event_bytes(1000)).await;
    let before = written_lsn(&log);
    let nul = AuditEvent::new("url.created").reason("a\0b");
    let big = AuditEvent::new("url.created").reason("x".repeat(2000));
    // Forced in sampled mode, so a refusal cannot hide behind "sampled out".
    let forced_big = AuditEvent::new("admin.x").reason("x".repeat(2000));
    for mode in Mode::ALL {
        let r = log.record_with(&nul, mode).await;
        assert!(
            matches!(
                r,
                Err(AuditError::InvalidEvent(EventError::NulByte {
                    field: "reason"
                }))
            ),
            "{mode}: {r:?}"
        );
        let e = if mode == Mode::Sampled {
            &forced_big
        } else {
            &big
        };
        let r = log.record_with(e, mode).await;
        assert!(
            matches!(
                r,
                Err(AuditError::InvalidEvent(EventError::TooLarge {
                    limit: 1000,
                    ..
                }))
            ),
            "{mode}: {r:?}"
        );
    }
    assert_eq!(written_lsn(&log), before, "nothing reached the WAL");
    let s = log.stats();
    assert_eq!(s.rejected, 8);
    assert_eq!((s.recorded.total(), s.failed.total()), (0, 0));
    log.close().await.expect("close");
    load(wal.path(), &db).await;
    assert_eq!(db.count().await, 0, "nothing reached the database");
}

#[tokio::test]
async fn sampled_mode_keeps_the_rate_over_100000_events_and_every_forced_one() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let rate = 0.25;
    let log = open(
        config(wal.path(), None)
            .mode(Mode::Sampled)
            .sample_rate(rate)
            .segment_size(8 << 20),
    )
    .await;
    let n = 100_000usize;
    let mut receipts = Vec::with_capacity(n + 1000);
    for i in 0..n {
        receipts.push(log.record(&event(i)).await.expect("sampled record"));
    }
    let kept = receipts.iter().filter(|r| r.is_kept()).count();
    let fraction = kept as f64 / n as f64;
    let sd = (rate * (1.0 - rate) / n as f64).sqrt();
    eprintln!(
        "kept {kept} of {n}: {fraction:.5} at rate {rate} ({:+.2} sd)",
        (fraction - rate) / sd
    );
    assert!((fraction - rate).abs() < 0.01, "kept fraction {fraction}");
    assert!(
        (fraction - rate).abs() < 4.0 * sd,
        "kept fraction {fraction}"
    );

    // Forced actions and outcomes, on request ids the rate dropped too.
    let mut forced = Vec::new();
    for i in 0..1000 {
        let e = match i % 3 {
            0 => AuditEvent::new("admin.user.disabled").request_id(format!("{i}")),
            1 => event(i).outcome(Outcome::Failure),
            _ => event(i).outcome(Outcome::Denied),
        };
        let r = log.record(&e).await.expect("forced record");
        assert!(
            matches!(r, Receipt::Appended { sample_rate, .. } if sample_rate == 1.0),
            "forced event {i} not kept at rate 1.0: {r:?}"
        );
        forced.push(r);
    }
    receipts.extend(forced);
    let s = log.stats();
    assert_eq!(s.recorded.get(Mode::Sampled), (kept + 1000) as u64);
    assert_eq!(s.sampled_out, (n - kept) as u64);
    assert_eq!(s.forced_keeps, 1000);
    log.close().await.expect("close");
    load(wal.path(), &db).await;
    // Each kept row carries its weight: 1/0.25 per sampled row, 1 per forced.
    assert_rows_match(&db, &receipts).await;
    let estimate: f64 = sqlx::query_scalar(
        "SELECT sum(1 / sample_rate) FROM audit_events WHERE action = 'url.created' \
         AND outcome = 'success'",
    )
    .fetch_one(db.pool())
    .await
    .expect("re-weighted count");
    assert!(
        (estimate - n as f64).abs() < 0.04 * n as f64,
        "re-weighted estimate {estimate} of {n}"
    );
}

#[tokio::test]
async fn rate_zero_keeps_only_forced_events_and_rate_one_keeps_all() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let zero = open(
        config(wal.path(), None)
            .stream("zero")
            .mode(Mode::Sampled)
            .sample_rate(0.0),
    )
    .await;
    let one = open(
        config(wal.path(), None)
            .stream("one")
            .mode(Mode::Sampled)
            .sample_rate(1.0),
    )
    .await;
    let mut forced_ids = HashSet::new();
    for i in 0..2000 {
        let r = zero.record(&event(i)).await.expect("rate 0");
        assert!(!r.is_kept(), "rate 0.0 kept an unforced event");
        let r = one.record(&event(i)).await.expect("rate 1");
        assert!(
            matches!(r, Receipt::Appended { sample_rate, .. } if sample_rate == 1.0),
            "{r:?}"
        );
    }
    for i in 0..20 {
        let e = if i % 2 == 0 {
            AuditEvent::new(format!("admin.op{i}"))
        } else {
            event(i).outcome(Outcome::Failure)
        };
        let r = zero.record(&e).await.expect("forced");
        assert!(r.is_kept());
        forced_ids.insert(r.event_id());
    }
    zero.close().await.expect("close");
    one.close().await.expect("close");
    load(wal.path(), &db).await;
    let stored = rows(&db).await;
    let from_zero: HashSet<Uuid> = stored
        .iter()
        .filter(|(_, r)| r.stream_id.as_deref() == Some("zero"))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(from_zero, forced_ids);
    let from_one: Vec<&Row> = stored
        .values()
        .filter(|r| r.stream_id.as_deref() == Some("one"))
        .collect();
    assert_eq!(from_one.len(), 2000);
    assert!(from_one.iter().all(|r| r.sample_rate == 1.0));
    assert!(stored.values().all(|r| r.sample_rate == 1.0));
}

#[tokio::test]
async fn one_requests_events_are_kept_or_dropped_together() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(
        config(wal.path(), None)
            .mode(Mode::Sampled)
            .sample_rate(0.5),
    )
    .await;
    let actions = [
        "url.created",
        "url.viewed",
        "url.renamed",
        "url.moved",
        "tag.added",
    ];
    let mut decided: HashMap<String, bool> = HashMap::new();
    for req in 0..400 {
        let rid = format!("req-{req}");
        for (k, action) in actions.iter().enumerate() {
            let e = AuditEvent::new(*action)
                .actor("user", format!("u{k}"))
                .request_id(&rid);
            let kept = log.record(&e).await.expect("sampled").is_kept();
            let first = *decided.entry(rid.clone()).or_insert(kept);
            assert_eq!(
                kept, first,
                "{rid}: {action} decided apart from its request"
            );
        }
    }
    let kept_requests = decided.values().filter(|k| **k).count();
    assert!(
        (150..=250).contains(&kept_requests),
        "{kept_requests} of 400 requests kept at 0.5"
    );
    log.close().await.expect("close");
    load(wal.path(), &db).await;
    let mut per_request: HashMap<String, usize> = HashMap::new();
    for r in rows(&db).await.into_values() {
        assert_eq!(r.sample_rate, 0.5);
        *per_request
            .entry(r.request_id.expect("request id"))
            .or_default() += 1;
    }
    assert_eq!(per_request.len(), kept_requests);
    for (rid, n) in per_request {
        assert_eq!(n, actions.len(), "{rid}");
        assert_eq!(decided.get(&rid), Some(&true), "{rid}");
    }
}

#[tokio::test]
async fn close_then_reopen_and_load_loses_nothing() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    // The flusher never runs on its own during the test: close (and drop) must
    // do the fsync that makes the records loadable.
    let b = || config(wal.path(), None).fsync_interval(Duration::from_secs(600));
    let log = open(b()).await;
    let mut receipts = Vec::new();
    for i in 0..500 {
        receipts.push(log.record(&event(i)).await.expect("async"));
    }
    let last = receipts.last().and_then(Receipt::lsn).expect("lsn");
    log.close().await.expect("close");
    let w = log.stats().wal.expect("wal");
    assert!(w.durable_lsn >= last, "close fsynced: {w:?}");
    let r = log.record(&event(999)).await;
    assert!(matches!(r, Err(AuditError::Closed)), "{r:?}");
    log.close().await.expect("close twice is fine");

    // Reopen the same stream: LSNs continue. This one is only dropped.
    let again = open(b()).await;
    for i in 500..800 {
        let r = again.record(&event(i)).await.expect("async after reopen");
        assert!(r.lsn().expect("lsn") > last);
        receipts.push(r);
    }
    drop(again);

    let loaded = load(wal.path(), &db).await;
    assert_eq!(loaded.rows_loaded, 800);
    assert_rows_match(&db, &receipts).await;
}

#[tokio::test]
async fn a_full_budget_under_block_waits_without_holding_the_runtime_then_fails_typed() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let block = Duration::from_millis(300);
    // Two 64 KiB segments: about 400 events fill the budget.
    let log = open(
        config(wal.path(), None)
            .segment_size(64 * 1024)
            .max_event_bytes(16 * 1024)
            .disk_budget(128 * 1024)
            .full_disk_policy(FullDiskPolicy::Block { timeout: block }),
    )
    .await;
    // This test runs on a current-thread runtime: if an append slept on the
    // thread, this ticker would stop while it waits.
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut receipts = Vec::new();
    let failure = loop {
        let i = receipts.len();
        assert!(i < 10_000, "the budget never filled");
        let started = Instant::now();
        let ticks_before = ticks.load(Ordering::Relaxed);
        match log.record(&event(i)).await {
            Ok(r) => receipts.push(r),
            Err(e) => {
                break (
                    e,
                    started.elapsed(),
                    ticks.load(Ordering::Relaxed) - ticks_before,
                )
            }
        }
    };
    let (err, waited, ticked) = failure;
    assert!(
        matches!(&err, AuditError::Wal(WalError::DiskBudgetExceeded { waited, .. }) if *waited >= block),
        "{err:?}"
    );
    assert!(waited >= block, "failed after {waited:?}");
    assert!(
        ticked >= 10,
        "the runtime stood still while the append waited ({ticked} ticks)"
    );
    let s = log.stats();
    assert!(s.blocked_appends >= 1);
    assert_eq!(s.failed.get(Mode::Async), 1);

    // The loader frees sealed segments; appends then go through again.
    load(wal.path(), &db).await;
    let r = log
        .record(&event(20_000))
        .await
        .expect("room again after loading");
    receipts.push(r);
    ticker.abort();
    log.close().await.expect("close");
    load(wal.path(), &db).await;
    assert_rows_match(&db, &receipts).await;
}

#[tokio::test]
async fn drop_newest_refuses_at_the_call_and_counts_the_drop() {
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(
        config(wal.path(), None)
            .segment_size(64 * 1024)
            .max_event_bytes(16 * 1024)
            .disk_budget(128 * 1024)
            .full_disk_policy(FullDiskPolicy::DropNewest),
    )
    .await;
    let mut ok = 0;
    let err = loop {
        assert!(ok < 10_000, "the budget never filled");
        match log.record(&event(ok)).await {
            Ok(_) => ok += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, AuditError::Wal(WalError::EventDropped { .. })),
        "{err:?}"
    );
    for i in 0..5 {
        assert!(log.record(&event(ok + 1 + i)).await.is_err());
    }
    let s = log.stats();
    assert_eq!(s.dropped, 6);
    assert_eq!(s.failed.total(), 0, "drops are counted apart");
    assert_eq!(s.recorded.get(Mode::Async), ok as u64);
    log.close().await.expect("close");
}

#[tokio::test]
async fn a_database_that_is_down_leaves_the_wal_modes_working_and_sync_fails_within_its_timeout() {
    let wal = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let log = open(
        config(wal.path(), None)
            .database_url(format!("postgres://auditwal@127.0.0.1:{port}/audit"))
            .sync_timeout(timeout),
    )
    .await;
    assert!(
        started.elapsed() < timeout * 4,
        "open took {:?}",
        started.elapsed()
    );
    let r = log
        .record(&event(1))
        .await
        .expect("async works without the database");
    assert!(r.lsn().is_some());
    let r = log
        .record_with(&event(2), Mode::Durable)
        .await
        .expect("durable too");
    assert!(r.lsn().is_some());
    let started = Instant::now();
    let r = log.record_with(&event(3), Mode::Sync).await;
    let took = started.elapsed();
    assert!(
        matches!(
            r,
            Err(AuditError::Sync(PgError::DatabaseUnavailable { .. }))
        ),
        "{r:?}"
    );
    assert!(
        took < timeout + Duration::from_millis(500),
        "sync failed after {took:?}"
    );
    let s = log.stats();
    assert_eq!(s.failed.get(Mode::Sync), 1);
    assert_eq!(
        s.recorded.get(Mode::Async) + s.recorded.get(Mode::Durable),
        2
    );
    log.close().await.expect("close");
}
