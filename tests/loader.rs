//! The loader against the real server, through the real CLI: every test asserts
//! the exact set of event_ids in `audit_events`, never counts log lines.

use auditwal_test_support as common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use auditwal::wal::format::{scan_segment, ScanItem};
use common::{assert_exactly, assert_ok, auditwal_bin, emit_lines, ChildGuard, TestDb};
use uuid::Uuid;

/// Emits `n` events into `wal_dir/stream` through `auditwal emit` and returns the
/// event_ids it acknowledged.
fn emit(wal_dir: &Path, stream: &str, n: usize, mode: &str) -> Vec<Uuid> {
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{{\"action\":\"test.event\",\"actor_id\":\"u{i}\",\"target_type\":\"doc\",\"target_id\":\"{i}\",\"ip\":\"10.1.{}.{}\",\"metadata\":{{\"i\":{i},\"pad\":\"{}\"}}}}\n",
                i / 250 % 250,
                i % 250,
                "x".repeat(120)
            )
        })
        .collect();
    emit_lines(wal_dir, stream, mode, lines)
}

fn load_once(wal_dir: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new(auditwal_bin())
        .args(["load", "--once", "--metrics-addr", "off", "--wal-dir"])
        .arg(wal_dir)
        .args(["--database-url", url])
        .args(extra)
        .output()
        .expect("run auditwal load --once")
}

/// `load --once --archive-dir ARCHIVE`: sealed segments move to `archive`
/// once loaded. Asserts the load succeeded.
fn load_once_archiving(wal_dir: &Path, url: &str, archive: &Path) {
    let archive = archive.to_str().expect("utf-8 temp path");
    assert_ok(&load_once(wal_dir, url, &["--archive-dir", archive]));
}

/// `auditwal replay --from-lsn 1` of all of `wal_dir` into `url`. Asserts it
/// succeeded.
fn replay_all(wal_dir: &Path, url: &str) {
    let out = Command::new(auditwal_bin())
        .args(["replay", "--from-lsn", "1", "--wal-dir"])
        .arg(wal_dir)
        .args(["--database-url", url])
        .output()
        .expect("run auditwal replay");
    assert_ok(&out);
}

#[tokio::test]
async fn load_once_loads_every_acknowledged_event_once() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 3000, "async");
    assert_eq!(ids.len(), 3000);
    let out = load_once(wal.path(), db.url(), &[]);
    assert_ok(&out);
    assert_exactly(&db, &ids).await;
    // Again: nothing new, nothing twice.
    let out = load_once(wal.path(), db.url(), &[]);
    assert_ok(&out);
    assert_exactly(&db, &ids).await;
    let cp: i64 = sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = 's1'")
        .fetch_one(db.pool())
        .await
        .expect("checkpoint");
    assert!(cp >= 3000, "checkpoint {cp}");
}

#[tokio::test]
async fn several_streams_load_side_by_side() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let mut all = Vec::new();
    for s in ["alpha", "beta", "gamma"] {
        all.extend(emit(wal.path(), s, 700, "durable"));
    }
    let out = load_once(wal.path(), db.url(), &["--batch-rows", "100"]);
    assert_ok(&out);
    assert_exactly(&db, &all).await;
    let streams: Vec<String> =
        sqlx::query_scalar("SELECT stream_id FROM audit_checkpoints ORDER BY 1")
            .fetch_all(db.pool())
            .await
            .expect("checkpoints");
    assert_eq!(streams, ["alpha", "beta", "gamma"]);
}

/// Offsets and LSNs of the records of a segment file.
fn records_of(path: &Path) -> Vec<(usize, u64, usize)> {
    let bytes = std::fs::read(path).expect("read segment");
    scan_segment(&bytes)
        .filter_map(|item| match item {
            ScanItem::Record { offset, record } => Some((offset, record.lsn, record.payload.len())),
            _ => None,
        })
        .collect()
}

fn only_segment(stream_dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(stream_dir)
        .expect("stream dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.remove(0)
}

#[tokio::test]
async fn a_corrupt_record_mid_segment_is_skipped_and_the_rest_loads() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s", 200, "durable");
    let seg = only_segment(&wal.path().join("s"));
    let records = records_of(&seg);
    assert_eq!(records.len(), 200);
    // Flip a byte in the payload of the 100th record (LSN 100).
    let (offset, lsn, _) = records[99];
    assert_eq!(lsn, 100);
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes[offset + 20 + 5] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write corrupted segment");

    let out = load_once(wal.path(), db.url(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped"),
        "the skipped range is reported: {stderr}"
    );
    let mut expected = ids.clone();
    expected.remove(99);
    assert_exactly(&db, &expected).await;
}

/// One event as an `emit` line, with a fixed event_id and occurred_at: emitted
/// into two streams, the second copy violates the table's unique key, a poison
/// row for its stream.
fn poison_line() -> String {
    format!(
        "{{\"event_id\":\"{}\",\"occurred_at\":\"2026-11-01T00:00:00Z\",\"action\":\"dup\"}}\n",
        Uuid::now_v7()
    )
}

/// Emits a `poison_line` into stream a and loads it, so that the same line
/// emitted into another stream is a poison row there. Returns a's ids and
/// the line.
fn load_an_event_whose_copy_is_poison(wal_dir: &Path, url: &str) -> (Vec<Uuid>, String) {
    let line = poison_line();
    let first = emit_lines(wal_dir, "a", "durable", line.clone());
    assert_ok(&load_once(wal_dir, url, &[]));
    (first, line)
}

#[tokio::test]
async fn a_row_postgres_refuses_is_dead_lettered_and_the_stream_goes_on() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let (first, line) = load_an_event_whose_copy_is_poison(wal.path(), db.url());
    let before = emit(wal.path(), "b", 50, "durable");
    let dup = emit_lines(wal.path(), "b", "durable", line.clone());
    let after = emit(wal.path(), "b", 50, "durable");
    let out = load_once(wal.path(), db.url(), &[]);
    assert_ok(&out);
    let mut expected = first.clone();
    expected.extend(&before);
    expected.extend(&after);
    assert_exactly(&db, &expected).await;
    let dead = std::fs::read_to_string(wal.path().join("b").join("dead-letter.jsonl"))
        .expect("dead-letter file");
    let lines: Vec<&str> = dead.lines().collect();
    assert_eq!(lines.len(), 1, "{dead}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(v["sqlstate"], "23505");
    assert_eq!(v["lsn"], 51);
    assert_eq!(v["event"]["event_id"], dup[0].to_string());
}

#[tokio::test]
async fn sealed_segments_are_deleted_only_after_commit_or_archived() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let archive = tempfile::tempdir().expect("tempdir");
    // Small segments: the emit below spans several.
    let ids = emit_small_segments(wal.path(), "s", 2000);
    let before: Vec<_> = segment_names(&wal.path().join("s"));
    assert!(
        before.len() > 2,
        "expected several segments, got {before:?}"
    );
    load_once_archiving(wal.path(), db.url(), archive.path());
    assert_exactly(&db, &ids).await;
    let left = segment_names(&wal.path().join("s"));
    let archived = segment_names(&archive.path().join("s"));
    // Every sealed segment moved; the last (unsealed, the writer's) stays.
    assert_eq!(left, vec![before.last().cloned().expect("last")]);
    assert_eq!(archived.len(), before.len() - 1);
    // Replaying the archive into the same database inserts nothing new.
    replay_all(archive.path(), db.url());
    assert_exactly(&db, &ids).await;
}

fn emit_small_segments(wal_dir: &Path, stream: &str, n: usize) -> Vec<Uuid> {
    use auditwal::wal::{WalConfig, WalWriter};
    let writer = WalWriter::open(WalConfig::new(wal_dir, stream).with_segment_size(64 * 1024))
        .expect("open writer");
    let ids: Vec<Uuid> = (0..n)
        .map(|i| {
            let e = auditwal::AuditEvent::new("small.seg").actor("user", format!("{i}"));
            writer.append(&e).expect("append");
            e.event_id
        })
        .collect();
    writer.close().expect("close");
    ids
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".seg"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn replay_after_a_restore_puts_back_only_the_missing_rows() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let archive = tempfile::tempdir().expect("tempdir");
    let ids = emit_small_segments(wal.path(), "s", 1500);
    load_once_archiving(wal.path(), db.url(), archive.path());
    // "Restore an older backup": a database holding only the first 700 rows (the
    // table is append-only, so the older state is built rather than cut back).
    let db2 = TestDb::new().await;
    let half = copy_first_rows(&db, &db2, 700).await;
    assert_eq!(half, 700);
    replay_all(archive.path(), db2.url());
    // The archive holds the sealed segments; the live dir the rest.
    replay_all(wal.path(), db2.url());
    assert_exactly(&db2, &ids).await;
}

/// Copies the first `n` rows (by LSN) of one test database into another.
async fn copy_first_rows(from: &TestDb, to: &TestDb, n: i64) -> i64 {
    {
        let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>, String, i64)> = sqlx::query_as(
            "SELECT event_id, occurred_at, action, lsn FROM audit_events ORDER BY lsn LIMIT $1",
        )
        .bind(n)
        .fetch_all(from.pool())
        .await
        .expect("rows");
        for (id, at, action, lsn) in &rows {
            sqlx::query(
                "INSERT INTO audit_events (event_id, occurred_at, action, stream_id, lsn) \
                 VALUES ($1, $2, $3, 's', $4)",
            )
            .bind(id)
            .bind(at)
            .bind(action)
            .bind(lsn)
            .execute(to.pool())
            .await
            .expect("insert");
        }
        rows.len() as i64
    }
}

#[tokio::test]
async fn loader_restarted_after_sigkill_mid_load_loads_nothing_twice() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s", 60_000, "async");
    for round in 0..3 {
        let mut child = common::spawn_loader(wal.path(), db.url(), 2000);
        // Let it get into the middle of the backlog, then SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = db.count().await;
            if n > 5_000 * (round + 1) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().expect("SIGKILL the loader");
        let _ = child.wait();
    }
    let out = load_once(wal.path(), db.url(), &[]);
    assert_ok(&out);
    assert_exactly(&db, &ids).await;
}

#[tokio::test]
async fn sigterm_stops_the_loader_cleanly_with_exit_0() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s", 20_000, "async");
    let child = common::spawn_loader(wal.path(), db.url(), 1000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::stop_with_sigterm(child);
    // Whatever it committed is whole batches plus a matching checkpoint.
    let n = db.count().await;
    let cp: Option<i64> =
        sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = 's'")
            .fetch_optional(db.pool())
            .await
            .expect("checkpoint");
    assert_eq!(n, cp.unwrap_or(0), "rows and checkpoint agree");
    let out = load_once(wal.path(), db.url(), &[]);
    assert!(out.status.success());
    assert_exactly(&db, &ids).await;
}

#[tokio::test]
async fn a_loader_started_before_its_service_waits_for_the_wal_dir_and_then_loads() {
    let db = TestDb::new().await;
    let root = tempfile::tempdir().expect("tempdir");
    let wal_dir = root.path().join("not-yet");
    let child = ChildGuard::new(common::spawn_loader(&wal_dir, db.url(), 1000));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut child = child.take();
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the loader exited instead of waiting for the WAL dir"
    );
    assert!(
        !wal_dir.exists(),
        "the loader must not create the service's dir"
    );
    let child = ChildGuard::new(child);
    // The service starts: its first emit creates the directory.
    let ids = emit(&wal_dir, "s1", 500, "async");
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.count().await < ids.len() as i64 {
        assert!(Instant::now() < deadline, "the waiting loader never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_exactly(&db, &ids).await;
    // SIGTERM ends it cleanly, also while it waits (here: while it loads).
    common::stop_with_sigterm(child.take());
    // With --once a missing dir is still a usage error.
    let out = load_once(&root.path().join("typo"), db.url(), &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn sigterm_ends_a_loader_waiting_for_its_wal_dir_with_exit_0() {
    let db = TestDb::new().await;
    let root = tempfile::tempdir().expect("tempdir");
    let child = common::spawn_loader(&root.path().join("not-yet"), db.url(), 1000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::stop_with_sigterm(child);
}

#[tokio::test]
async fn metrics_endpoint_reports_rows_and_lag_per_stream() {
    use std::io::Read;
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "m", 1500, "durable");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(auditwal_bin())
        .args([
            "load",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--wal-dir",
        ])
        .arg(wal.path())
        .args(["--database-url", db.url()])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn loader");
    let child = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.count().await < ids.len() as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_exactly(&db, &ids).await;
    let body = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match got {
            // The row counter moves at the commit, the lag gauges just after
            // it: wait for both.
            Ok(text)
                if text.contains("rows_loaded_total{stream=\"m\"} 1500")
                    && text.contains("auditwal_loader_lag_records{stream=\"m\"} 0") =>
            {
                break text
            }
            _ if Instant::now() > deadline => panic!("metrics never showed the rows: {got:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("auditwal_loader_lag_records{stream=\"m\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("auditwal_loader_checkpoint_lsn{stream=\"m\"} 1500"),
        "{body}"
    );
    let child = child.take();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
}

/// GET /metrics on `port` within `limit`: the body, or why not.
fn get_metrics(port: u16, limit: Duration) -> Result<String, String> {
    use std::io::Read;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

#[tokio::test]
async fn a_hung_dead_letter_write_holds_neither_the_metrics_endpoint_nor_other_streams() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    // A poison row in stream b, as in the dead-letter test above.
    let (first, line) = load_an_event_whose_copy_is_poison(wal.path(), db.url());
    emit(wal.path(), "b", 20, "durable");
    emit_lines(wal.path(), "b", "durable", line);
    // b's dead-letter file is a FIFO nobody reads: opening it for writing
    // blocks until a reader comes, like a write to a hung disk.
    let fifo = wal.path().join("b").join("dead-letter.jsonl");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // One worker thread: whatever blocks it stops every task of the loader.
    let _loader = ChildGuard::new(
        Command::new(auditwal_bin())
            .args(["load", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .arg("--wal-dir")
            .arg(wal.path())
            .args(["--database-url", db.url()])
            .env("TOKIO_WORKER_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn loader"),
    );
    // Let b reach its dead-letter write, then give the loader a new stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = emit(wal.path(), "c", 30, "durable");
    let mut expected = first.clone();
    expected.extend(&third);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = get_metrics(port, Duration::from_secs(5));
        if db.count().await == expected.len() as i64 {
            let body = metrics.unwrap_or_else(|e| {
                panic!("c is loaded but the metrics endpoint did not answer: {e}")
            });
            assert!(body.starts_with("HTTP/1.1 200"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream c was not loaded beside b's hung dead-letter write (metrics: {metrics:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // b is still held at its poison row: none of its rows committed.
    assert_exactly(&db, &expected).await;
}
