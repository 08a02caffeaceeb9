//! Sync mode's hash chain against a real PostgreSQL: a signing `SyncWriter`'s
//! rows are links of one stream per committer, its checkpoints are stored by
//! the statements that store the rows, statements whose answer never came are
//! settled on the next connection (one that committed after its caller gave up,
//! one that failed after), and `auditwal verify-db` walks it all clean, names a
//! tampered sync row, counts rows in no chain, and with `--since` walks only
//! what was signed after a time.

use auditwal_test_support as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use auditwal::pg::{PgError, SyncConfig, SyncWriter};
use auditwal::AuditEvent;
use common::{assert_ok, auditwal_bin, verify_db_json, TestDb};
use serde_json::Value;

fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = Command::new(auditwal_bin())
        .args(["keygen", "--out"])
        .arg(dir)
        .output()
        .expect("run keygen");
    assert_ok(&out);
    (dir.join("auditwal.key"), dir.join("auditwal.pub"))
}

async fn writer(db: &TestDb, key: &Path, timeout: Duration) -> SyncWriter {
    writer_with(db, key, timeout, SyncConfig::default().committers).await
}

async fn writer_with(db: &TestDb, key: &Path, timeout: Duration, committers: usize) -> SyncWriter {
    let mut config = chain_config(key, timeout);
    config.committers = committers;
    SyncWriter::connect(db.url(), config)
        .await
        .expect("connect the sync writer")
}

/// A signing writer's settings: checkpoints every 7 events.
fn chain_config(key: &Path, timeout: Duration) -> SyncConfig {
    let mut config = SyncConfig::default();
    config.chain_key = Some(key.to_path_buf());
    config.checkpoint_every = 7;
    config.timeout = timeout;
    config
}

/// A signing writer logged in as a role that is only `auditwal_writer`.
async fn writer_login(db: &TestDb, key: &Path, timeout: Duration) -> SyncWriter {
    let role = format!("writer_{}", db.name());
    sqlx::query(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw' IN ROLE auditwal_writer"
    ))
    .execute(db.pool())
    .await
    .expect("create the writer login");
    let options: sqlx::postgres::PgConnectOptions = db.url().parse().expect("url");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(options.username(&role).password("pw"));
    let mut config = chain_config(key, timeout);
    config.migrate = false;
    SyncWriter::from_pool(pool, config)
        .await
        .expect("the writer login's sync writer")
}

fn event(n: usize, action: &str) -> AuditEvent {
    AuditEvent::new(action)
        .actor("user", format!("user-{n}"))
        .target("doc", n.to_string())
        .ip(std::net::IpAddr::from([10, 0, 0, (n % 250) as u8]))
        .metadata(&serde_json::json!({"n": n, "ratio": 1.0, "tags": ["a", "b"]}))
        .expect("metadata")
}

/// `count` events recorded by callers at once (so the committers batch them).
async fn record_many(writer: &SyncWriter, from: usize, count: usize) {
    let calls = (from..from + count).map(|n| {
        let w = writer.clone();
        tokio::spawn(async move { w.record(&event(n, "doc.edited")).await })
    });
    for call in futures_util::future::join_all(calls).await {
        call.expect("task").expect("committed");
    }
}

fn verify_db(db: &TestDb, public: &Path, extra: &[&str]) -> (i32, Vec<Value>, Vec<Value>) {
    verify_db_json(db.url(), public, extra)
}

/// A trigger that holds every row of action `doc.slow*` for 1.5 s, then
/// refuses `doc.slow-fail`: a statement that outlives its caller's timeout and
/// then commits, or fails.
const SLOW_TRIGGER: &str = "CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.action LIKE 'doc.slow%' THEN
        PERFORM pg_sleep(1.5);
        IF NEW.action = 'doc.slow-fail' THEN
            RAISE EXCEPTION 'refused after the caller gave up';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_slow BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION test_slow()";

#[tokio::test]
async fn sync_rows_are_chained_settled_after_lost_answers_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&dir.path().join("keys"));
    let db = TestDb::new().await;
    for stmt in SLOW_TRIGGER.split(";\nCREATE TRIGGER") {
        let stmt = match stmt.starts_with(" test_slow") {
            true => format!("CREATE TRIGGER{stmt}"),
            false => stmt.to_string(),
        };
        sqlx::query(&stmt)
            .execute(db.pool())
            .await
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }

    // As a login with only the writer's rights, as a service runs.
    let w = writer_login(&db, &key, Duration::from_secs(1)).await;
    record_many(&w, 0, 40).await;
    // Statements whose callers time out: one commits after, one fails after.
    for (n, action) in [(1000, "doc.slow"), (1001, "doc.slow-fail")] {
        match w.record(&event(n, action)).await {
            Err(PgError::OutcomeUnknown { .. }) => {}
            other => panic!("{action}: expected outcome unknown, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The next statement of each chain follows what really committed.
    record_many(&w, 40, 40).await;
    for n in 80..83 {
        w.record(&event(n, "doc.edited")).await.expect("committed");
    }
    w.close().await;

    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_events WHERE action LIKE 'doc.slow%' ORDER BY action",
    )
    .fetch_all(db.pool())
    .await
    .expect("slow rows");
    assert_eq!(
        stored,
        vec!["doc.slow"],
        "the first committed, the second did not"
    );

    // Clean: every row is a link, one stream per committer, each signed to
    // its end by the close.
    let (code, findings, summaries) = verify_db(&db, &public, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    let rows: u64 = summaries
        .iter()
        .map(|s| s["rows"].as_u64().expect("rows"))
        .sum();
    assert_eq!(rows, 84, "{summaries:#?}");
    for s in &summaries {
        let stream = s["stream_id"].as_str().expect("stream");
        assert!(stream.starts_with("sync-"), "{s}");
        assert_eq!(s["unsigned_rows"], 0, "{s}");
        assert_eq!(s["signed_through"], s["last_lsn"], "{s}");
    }

    // A sync row changed by a superuser is named.
    let (stream, lsn): (String, i64) =
        sqlx::query_as("SELECT stream_id, lsn FROM audit_events WHERE actor_id = 'user-41'")
            .fetch_one(db.pool())
            .await
            .expect("row of user-41");
    db.tamper("UPDATE audit_events SET target_id = 'elsewhere' WHERE actor_id = 'user-41'")
        .await;
    let (code, findings, _) = verify_db(&db, &public, &[]);
    assert_eq!(code, 1);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0]["finding"], "changed_row");
    assert_eq!(findings[0]["stream_id"], stream.as_str());
    assert_eq!(findings[0]["lsn"], lsn);
    assert!(
        findings[0]["detail"]
            .as_str()
            .expect("detail")
            .contains("target_id"),
        "{findings:#?}"
    );

    // A row in no chain at all is a finding too.
    db.tamper(
        "INSERT INTO audit_events (event_id, occurred_at, action) \
         VALUES (gen_random_uuid(), now(), 'doc.forged')",
    )
    .await;
    let (_, findings, _) = verify_db(&db, &public, &[]);
    let unchained: Vec<&Value> = findings
        .iter()
        .filter(|f| f["finding"] == "unchained_rows")
        .collect();
    assert_eq!(unchained.len(), 1, "{findings:#?}");
    assert_eq!(unchained[0]["rows"], 1);
}

#[tokio::test]
async fn verify_db_since_walks_only_what_was_signed_after_the_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&dir.path().join("keys"));
    let db = TestDb::new().await;

    // Two writers (two sets of streams), a second apart: checkpoint times
    // are whole seconds.
    let first = writer(&db, &key, Duration::from_secs(5)).await;
    record_many(&first, 0, 30).await;
    first.close().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let between = chrono::Utc::now() - chrono::Duration::milliseconds(1000);
    let second = writer(&db, &key, Duration::from_secs(5)).await;
    record_many(&second, 30, 30).await;
    second.close().await;
    let since = between.to_rfc3339();

    // A change to the first writer's rows is outside the window.
    db.tamper("UPDATE audit_events SET target_id = 'elsewhere' WHERE actor_id = 'user-3'")
        .await;
    let (code, findings, summaries) = verify_db(&db, &public, &["--since", &since]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    let rows: u64 = summaries
        .iter()
        .map(|s| s["rows"].as_u64().expect("rows"))
        .sum();
    assert_eq!(rows, 30, "only the second writer's rows: {summaries:#?}");
    let (code, findings, _) = verify_db(&db, &public, &[]);
    assert_eq!(code, 1);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0]["finding"], "changed_row");

    // One inside it is named.
    db.tamper("UPDATE audit_events SET target_id = 'elsewhere' WHERE actor_id = 'user-33'")
        .await;
    let (code, findings, _) = verify_db(&db, &public, &["--since", &since]);
    assert_eq!(code, 1);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0]["finding"], "changed_row");

    let out = Command::new(auditwal_bin())
        .args(["verify-db", "--database-url", db.url(), "--public-key"])
        .arg(&public)
        .args(["--since", "last tuesday"])
        .output()
        .expect("run verify-db");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RFC 3339"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Noon on the 10th of the UTC month `back` months before this one.
fn months_ago(back: u32) -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, TimeZone};
    let now = chrono::Utc::now();
    let months = now.year() * 12 + now.month0() as i32 - back as i32;
    chrono::Utc
        .with_ymd_and_hms(months / 12, (months % 12) as u32 + 1, 10, 12, 0, 0)
        .single()
        .expect("a valid date")
}

#[tokio::test]
async fn a_dropped_partition_leaves_an_anchor_and_a_hand_cut_head_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(&dir.path().join("keys"));
    let db = TestDb::new().await;
    sqlx::query("SELECT audit_ensure_partitions(0, 6)")
        .execute(db.pool())
        .await
        .expect("partitions back to six months ago");

    // One committer, one caller at a time: LSN order is time order. Twelve
    // events five months ago, twelve four months ago, twelve now.
    let w = writer_with(&db, &key, Duration::from_secs(5), 1).await;
    for n in 0..36 {
        let mut e = event(n, "doc.edited");
        e.occurred_at = match n / 12 {
            0 => months_ago(5),
            1 => months_ago(4),
            _ => chrono::Utc::now(),
        } + chrono::Duration::seconds(n as i64);
        w.record(&e).await.expect("committed");
    }
    w.close().await;
    let (code, findings, _) = verify_db(&db, &public, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");

    // Retention drops the month five months ago, as the retention role does.
    let cutoff = months_ago(4) - chrono::Duration::days(9);
    let dropped: Vec<String> = sqlx::query_scalar("SELECT audit_drop_partitions_before($1)")
        .bind(cutoff)
        .fetch_all(db.pool())
        .await
        .expect("retention");
    // (with the empty one before it)
    let month = format!("audit_events_p{}", months_ago(5).format("%Y%m"));
    assert!(dropped.contains(&month), "{dropped:?}");
    let lsns: Vec<i64> = sqlx::query_scalar("SELECT lsn FROM audit_events ORDER BY lsn")
        .fetch_all(db.pool())
        .await
        .expect("lsns");
    assert_eq!(lsns.len(), 24);
    let (code, findings, summaries) = verify_db(&db, &public, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    assert_eq!(summaries.len(), 1, "{summaries:#?}");
    assert_eq!(summaries[0]["rows"], 24);
    assert_eq!(summaries[0]["retention_cut"], lsns[0] - 1, "{summaries:#?}");
    assert_eq!(summaries[0]["unanchored_from"], Value::Null);

    // The three oldest remaining rows deleted by hand: named, even though
    // retention cut the stream before them.
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE lsn <= {}",
        lsns[2]
    ))
    .await;
    let (code, findings, _) = verify_db(&db, &public, &[]);
    assert_eq!(code, 1);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0]["finding"], "deleted_rows");
    assert_eq!(findings[0]["after"], lsns[0] - 1);
    assert_eq!(findings[0]["last_missing"], lsns[2]);
    assert_eq!(findings[0]["next"], lsns[3]);
}
