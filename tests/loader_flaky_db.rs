//! The loader through a flaky database link, against a real server that is
//! stopped with an immediate shutdown and started again mid-load, and with a
//! writer appending while it loads. Each test asserts the exact set of event_ids.

use auditwal_test_support as common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_exactly, auditwal_bin, emit_lines, ChildGuard, TestDb};
use uuid::Uuid;

fn event_line(i: usize) -> String {
    format!(
        "{{\"action\":\"flaky.event\",\"actor_id\":\"u{i}\",\"target_id\":\"{i}\",\"metadata\":{{\"pad\":\"{}\"}}}}\n",
        "y".repeat(150)
    )
}

fn emit_all(wal_dir: &Path, stream: &str, n: usize) -> Vec<Uuid> {
    emit_lines(wal_dir, stream, "async", (0..n).map(event_line).collect())
}

fn spawn_loader(wal_dir: &Path, url: &str) -> ChildGuard {
    ChildGuard::new(common::spawn_loader(wal_dir, url, 2000))
}

fn stop(guard: ChildGuard) {
    common::stop_with_sigterm(guard.take());
}

async fn count_when_reachable(db: &TestDb) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(db.pool())
        .await
        .ok()
}

/// Waits (up to `within`) for the loader to load every one of `ids`, stops it
/// and asserts that the table holds exactly those.
async fn finish(loader: ChildGuard, db: &TestDb, ids: &[Uuid], within: Duration) {
    let n = wait_for_count(db, ids.len() as i64, within).await;
    assert_eq!(n, ids.len() as i64, "the loader did not catch up");
    stop(loader);
    assert_exactly(db, ids).await;
}

async fn wait_for_count(db: &TestDb, n: i64, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let c = count_when_reachable(db).await.unwrap_or(-1);
        if c >= n || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn database_restarts_mid_load_lose_and_duplicate_nothing() {
    let (cluster, db) = common::private_cluster_and_db().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit_all(wal.path(), "s", 80_000);
    let loader = spawn_loader(wal.path(), db.url());
    for round in 1..=3i64 {
        // Wait until the loader is well into the backlog, then pull the plug.
        let reached = wait_for_count(&db, round * 8_000, Duration::from_secs(60)).await;
        assert!(reached >= round * 8_000, "loader stalled at {reached}");
        cluster.stop_immediate().expect("immediate shutdown");
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.start_again().expect("start the server again");
    }
    // It catches up after the restarts.
    finish(loader, &db, &ids, Duration::from_secs(120)).await;
}

#[tokio::test]
async fn the_loader_waits_out_a_database_that_is_down_at_start() {
    let (cluster, db) = common::private_cluster_and_db().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit_all(wal.path(), "s", 5_000);
    cluster.stop_immediate().expect("stop");
    let loader = spawn_loader(wal.path(), db.url());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again().expect("start");
    finish(loader, &db, &ids, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn writer_and_loader_run_at_the_same_time() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let loader = spawn_loader(wal.path(), db.url());
    // A writer that appends for a while, in bursts, while the loader tails it.
    let mut emit = common::spawn_emit(wal.path(), "live", "async", &[]);
    let mut stdin = emit.stdin.take().expect("stdin");
    let stdout = emit.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| Uuid::parse_str(l.trim()).expect("id"))
            .collect::<Vec<_>>()
    });
    for burst in 0..20 {
        for i in 0..1_000 {
            stdin
                .write_all(event_line(burst * 1000 + i).as_bytes())
                .expect("feed emit");
        }
        stdin.flush().expect("flush");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Mid-stream the loader has already loaded part of it.
    let partial = count_when_reachable(&db).await.unwrap_or(0);
    drop(stdin);
    let status = emit.wait().expect("emit exit");
    assert!(status.success());
    let ids = reader.join().expect("reader thread");
    assert_eq!(ids.len(), 20_000);
    assert!(
        partial > 0,
        "the loader loaded while the writer was appending"
    );
    finish(loader, &db, &ids, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn the_loader_connects_over_tls_when_the_url_asks() {
    let cluster = auditwal_test_support::Cluster::start(auditwal_test_support::ClusterOptions {
        tls: true,
        ..auditwal_test_support::ClusterOptions::for_tests()
    })
    .expect("start a TLS cluster");
    let db = TestDb::on_cluster(&cluster).await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit_all(wal.path(), "tls", 2_000);
    let cert = cluster.tls_cert();
    let tls_url = db.url().replace(
        "sslmode=disable",
        &format!("sslmode=verify-full&sslrootcert={}", cert.display()),
    );
    assert!(tls_url.contains("verify-full"), "{tls_url}");
    let log_path = wal.path().join("loader.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let loader = Command::new(auditwal_bin())
        .args(["load", "--metrics-addr", "off", "--wal-dir"])
        .arg(wal.path())
        .args(["--database-url", &tls_url])
        .stderr(log)
        .spawn()
        .expect("spawn loader");
    let loader = ChildGuard::new(loader);
    let n = wait_for_count(&db, ids.len() as i64, Duration::from_secs(30)).await;
    if n != ids.len() as i64 {
        drop(loader);
        panic!(
            "{n} rows over TLS; loader log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    // The loader's connection (still open, tailing) is encrypted; ours is not.
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.datname = current_database()",
    )
    .fetch_one(db.pool())
    .await
    .expect("pg_stat_ssl");
    assert!(encrypted >= 1, "no TLS connection from the loader");
    stop(loader);
    assert_exactly(&db, &ids).await;

    // verify-full against the wrong root certificate refuses to connect.
    let other = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(other.path(), include_str!("../fuzz/README.md")).expect("write");
    let bad_url = db.url().replace(
        "sslmode=disable",
        &format!("sslmode=verify-full&sslrootcert={}", other.path().display()),
    );
    let out = Command::new(auditwal_bin())
        .args(["replay", "--from-lsn", "1", "--wal-dir"])
        .arg(wal.path())
        .args(["--database-url", &bad_url])
        .output()
        .expect("replay");
    assert!(
        !out.status.success(),
        "connected without a valid certificate"
    );
}
