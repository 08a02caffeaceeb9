//! `auditwal bench verify-db [--json]`: verify-db's rows per second beside the
//! same rows read with no checks.
//!
//! AUDITWAL_BENCH_EVENTS (default 300,000) ~300-byte events written to a signed
//! WAL (a checkpoint every 10,000 events) and loaded by `auditwal load --once`
//! into a private PostgreSQL with fsync on. Then, alternating over
//! AUDITWAL_BENCH_ROUNDS rounds (default 3), medians reported:
//! - `plain-read`: verify-db's own statement (`columns::verify_walk_sql`: the
//!   server's scan, sort and send of every row), each row fetched by a client
//!   that checks nothing. The floor of any walk of the table.
//! - `verify-db`: `auditwal verify-db --json --no-progress` in a child process
//!   (its start included), which must find the table clean with every row
//!   signed. Names `plain-read` as its baseline; ratio = its rows/s over the
//!   baseline's.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::columns;
use auditwal::wal::{WalConfig, WalWriter};
use auditwal_test_support::{Cluster, ClusterOptions};
use futures_util::TryStreamExt;
use sqlx::{Connection, PgConnection};

use super::bench::{env_u64, median, report, BenchResult};
use super::bench_load::{bench_event, fresh_database, run_loader_once};
use super::{CmdResult, Failure};

const STREAM: &str = "bench";

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let events = env_u64("AUDITWAL_BENCH_EVENTS", 300_000)?;
    let rounds = env_u64("AUDITWAL_BENCH_ROUNDS", 3)?.max(1);
    let scratch = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("cannot create the scratch directory")?;
    let exe = std::env::current_exe().context("cannot find the auditwal binary")?;
    let (key, public) = auditwal::chain::keys::write_pair(&scratch.path().join("keys"), "bench")
        .context("cannot write the bench key pair")?;
    let wal = scratch.path().join("wal");
    write_signed_backlog(&wal, &key, events)?;
    let cluster = Cluster::start(ClusterOptions::default()).context("cannot start PostgreSQL")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let url = rt.block_on(fresh_database(&cluster, "verify"))?;
    run_loader_once(&exe, &wal, &url)?;

    let (mut plain, mut verify) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(rt.block_on(plain_read(&url, events))?);
        verify.push(run_verify_db(&exe, &url, &public, events)?);
    }
    let plain = BenchResult::new(
        "verify-db",
        "plain-read",
        events,
        median(plain).unwrap_or(0.0),
    );
    let verify = BenchResult::new(
        "verify-db",
        "verify-db",
        events,
        median(verify).unwrap_or(0.0),
    )
    .against(&plain);
    report(&[verify, plain], json);
    Ok(ExitCode::SUCCESS)
}

/// `n` bench events in a WAL signed with `key`, closed (the tail signed).
fn write_signed_backlog(wal: &Path, key: &Path, n: u64) -> Result<(), Failure> {
    let config = WalConfig::new(wal, STREAM).with_chain(
        Some(key.to_path_buf()),
        10_000,
        Duration::from_secs(1),
    );
    let writer = WalWriter::open(config).context("cannot open the bench WAL")?;
    for i in 0..n {
        writer.append(&bench_event(i)).context("append failed")?;
    }
    writer.close().context("closing the bench WAL failed")?;
    Ok(())
}

/// verify-db's statement, every row fetched and nothing checked; its wall time.
async fn plain_read(url: &str, events: u64) -> Result<f64, Failure> {
    let mut conn = PgConnection::connect(url).await.context("connect")?;
    sqlx::query(columns::VERIFY_SESSION_SQL)
        .execute(&mut conn)
        .await
        .context("session settings")?;
    let sql = columns::verify_walk_sql();
    let start = Instant::now();
    let mut rows = sqlx::query(&sql)
        .bind(None::<String>)
        .bind(Vec::<String>::new())
        .bind(Vec::<i64>::new())
        .fetch(&mut conn);
    let mut n = 0u64;
    while rows.try_next().await.context("reading the rows")?.is_some() {
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    if n != events {
        return Err(Failure::runtime(anyhow!("read {n} rows of {events}")));
    }
    Ok(secs)
}

/// `auditwal verify-db`, which must find every row and nothing wrong; its
/// wall time.
fn run_verify_db(exe: &Path, url: &str, public: &Path, events: u64) -> Result<f64, Failure> {
    let start = Instant::now();
    let out = Command::new(exe)
        .args([
            "verify-db",
            "--json",
            "--no-progress",
            "--database-url",
            url,
        ])
        .arg("--public-key")
        .arg(public)
        .env("RUST_LOG", "warn")
        .output()
        .context("cannot run verify-db")?;
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Failure::runtime(anyhow!(
            "verify-db did not find the table clean ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| Failure::runtime(anyhow!("verify-db printed no summary: {stdout}")))?;
    if summary["rows"] != events || summary["unsigned_rows"] != 0 {
        return Err(Failure::runtime(anyhow!(
            "verify-db walked {} rows of {events} ({} unsigned): not a valid run",
            summary["rows"],
            summary["unsigned_rows"]
        )));
    }
    Ok(secs)
}
