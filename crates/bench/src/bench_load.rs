//! `auditwal bench load [--json]`: the loader against the server's own ingestion
//! ceiling, its end-to-end lag at a steady rate, and its memory against backlog.
//!
//! On a private PostgreSQL with fsync ON:
//! - `loader`: 1,000,000 events pre-written to the WAL (~300-byte events), loaded by
//!   `auditwal load --once` (a child process: reading segments, decoding, encoding
//!   binary COPY rows, COPY + checkpoint per batch) into an empty table. Its peak
//!   RSS (VmHWM) is reported for this backlog and for 3,000,000 events
//!   (`peak_rss_mb`, `peak_rss_mb_3m`): it must not grow with the backlog.
//! - `psql-copy-binary`: the same rows, already encoded in a binary COPY file,
//!   loaded by `psql \copy ... FROM file (FORMAT binary)` into an empty table of
//!   the same schema: what the server ingests when the client does nothing else.
//!   `loader` names it as baseline; ratio = loader rows/s / psql rows/s.
//! - `lag-20k`: a live loader while one writer appends at a steady 20,000 events/s
//!   for 30 s; for each event, the time from its append returning to the
//!   checkpoint (polled every 2 ms) covering it. p50/p99.
//!
//! Cases alternate over AUDITWAL_BENCH_ROUNDS rounds (default 2), each on a fresh
//! database, and the medians are reported. AUDITWAL_BENCH_EVENTS overrides the
//! 1,000,000; AUDITWAL_BENCH_LAG_SECS the 30 s.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::loader::copy::{CopyBuffer, RowOrigin, COPY_COLUMNS};
use auditwal::wal::reader::{Follow, ReadItem, StreamReader};
use auditwal::wal::{WalConfig, WalWriter};
use auditwal::{AuditEvent, Outcome};
use auditwal_test_support::{Cluster, ClusterOptions};
use sqlx::{Connection, Executor, PgConnection};

use super::bench::{env_u64, median, percentile, report, BenchResult};
use super::{CmdResult, Failure};

const STREAM: &str = "bench";

/// A ~300-byte event (its WAL payload), like a URL shortener's audit row.
pub(super) fn bench_event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new("url.created")
        .actor("user", format!("user-{:08}", i % 50_000))
        .target("url", format!("{:012x}", i.wrapping_mul(0x9e37_79b9)))
        .target_name("https://example.com/some/long/path/to/a/page?utm=bench")
        .tenant(format!("tenant-{}", i % 100))
        .outcome(Outcome::Success)
        .ip(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            10,
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        )))
        .user_agent("Mozilla/5.0 (X11; Linux x86_64) bench/1.0")
        .request_id(format!("req-{i:016x}"));
    e.metadata = auditwal::JsonText::parse("metadata", r#"{"plan":"pro","source":"api"}"#).ok();
    e
}

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let events = env_u64("AUDITWAL_BENCH_EVENTS", 1_000_000)?;
    let rounds = env_u64("AUDITWAL_BENCH_ROUNDS", 2)?.max(1);
    let lag_secs = env_u64("AUDITWAL_BENCH_LAG_SECS", 30)?;
    let scratch = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("cannot create the scratch directory")?;
    let exe = std::env::current_exe().context("cannot find the auditwal binary")?;
    let cluster = Cluster::start(ClusterOptions::default()).context("cannot start PostgreSQL")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let mut loader_runs = Vec::new();
    let mut psql_runs = Vec::new();
    let mut rss_1m = Vec::new();
    let copy_file = scratch.path().join("rows.copy");
    for round in 0..rounds {
        let wal = scratch.path().join(format!("wal-{round}"));
        write_backlog(&wal, events)?;
        if round == 0 {
            write_copy_file(&wal.join(STREAM), &copy_file)?;
        }
        let db = format!("loader_{round}");
        let url = rt.block_on(fresh_database(&cluster, &db))?;
        let (secs, rss) = run_loader_once(&exe, &wal, &url)?;
        let loaded = rt.block_on(count_rows(&url))?;
        if loaded != events {
            return Err(Failure::runtime(anyhow!(
                "the loader loaded {loaded} rows of {events}: not a valid run"
            )));
        }
        loader_runs.push(secs);
        rss_1m.push(rss);
        let db = format!("psql_{round}");
        let url = rt.block_on(fresh_database(&cluster, &db))?;
        psql_runs.push(run_psql_copy(&cluster, &url, &copy_file)?);
        let copied = rt.block_on(count_rows(&url))?;
        if copied != events {
            return Err(Failure::runtime(anyhow!(
                "psql copied {copied} rows of {events}"
            )));
        }
        let _ = std::fs::remove_dir_all(&wal);
    }

    // Memory against backlog: three times the events.
    let big = events * 3;
    let wal = scratch.path().join("wal-3x");
    write_backlog(&wal, big)?;
    let url = rt.block_on(fresh_database(&cluster, "loader_3x"))?;
    let (_, rss_3m) = run_loader_once(&exe, &wal, &url)?;
    let _ = std::fs::remove_dir_all(&wal);

    let lag = rt.block_on(measure_lag(
        &cluster,
        &exe,
        &scratch.path().join("wal-lag"),
        lag_secs,
    ))?;

    let psql = BenchResult::new(
        "load",
        "psql-copy-binary",
        events,
        median(psql_runs).unwrap_or(0.0),
    );
    let mut loader = BenchResult::new("load", "loader", events, median(loader_runs).unwrap_or(0.0))
        .against(&psql);
    loader.extra.insert(
        "peak_rss_mb".into(),
        serde_json::json!(round2(median(rss_1m).unwrap_or(0.0))),
    );
    loader
        .extra
        .insert("peak_rss_mb_3m".into(), serde_json::json!(round2(rss_3m)));
    loader
        .extra
        .insert("backlog_3m_events".into(), serde_json::json!(big));
    report(&[loader, psql, lag], json);
    Ok(ExitCode::SUCCESS)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Appends `n` events to a fresh WAL under `wal` and closes it (fsynced).
fn write_backlog(wal: &Path, n: u64) -> Result<(), Failure> {
    let writer =
        WalWriter::open(WalConfig::new(wal, STREAM)).context("cannot open the bench WAL")?;
    for i in 0..n {
        writer.append(&bench_event(i)).context("append failed")?;
    }
    writer.close().context("closing the bench WAL failed")?;
    Ok(())
}

/// Encodes every event of the stream into one binary COPY file: the same rows
/// the loader will send.
fn write_copy_file(stream_dir: &Path, out: &Path) -> Result<(), Failure> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let mut reader = StreamReader::open(stream_dir, 1, Follow::AtRest);
    let mut body = CopyBuffer::new();
    // The same links the loader computes: the baseline sends the same bytes.
    let mut chain = auditwal::chain::ChainState::epoch_at(0);
    loop {
        match reader.next_item(None).context("reading the bench WAL")? {
            Some(ReadItem::Event {
                lsn,
                event,
                payload,
                ..
            }) => body.push(
                &event.event,
                RowOrigin {
                    stream_id: STREAM,
                    lsn,
                    sample_rate: event.sample_rate,
                    link: Some(chain.push(STREAM, lsn, &payload)),
                    payload: Some(&payload),
                },
            ),
            Some(_) => {}
            None => break,
        }
        // Written in chunks: the header comes with the first, the trailer last.
        if body.len() > 8 << 20 {
            file.write_all(&body.drain())
                .context("writing the COPY file")?;
        }
    }
    let chunk = body.finish();
    file.write_all(&chunk).context("writing the COPY file")?;
    file.flush().context("writing the COPY file")?;
    Ok(())
}

/// A new database `name` on `cluster` with the migrations applied; its URL.
pub(super) async fn fresh_database(cluster: &Cluster, name: &str) -> Result<String, Failure> {
    let mut admin = PgConnection::connect(&cluster.url())
        .await
        .context("cannot connect to the bench server")?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    let url = cluster.url_for(name);
    let pool = sqlx::PgPool::connect(&url).await.context("connect")?;
    auditwal::pg::migrate(&pool).await.context("migrate")?;
    pool.close().await;
    Ok(url)
}

pub(super) async fn count_rows(url: &str) -> Result<u64, Failure> {
    let mut c = PgConnection::connect(url).await.context("connect")?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&mut c)
        .await
        .context("count rows")?;
    Ok(n as u64)
}

/// Runs `auditwal load --once`; returns its wall time and peak RSS in MiB.
pub(super) fn run_loader_once(exe: &Path, wal: &Path, url: &str) -> Result<(f64, f64), Failure> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["load", "--once", "--metrics-addr", "off", "--wal-dir"])
        .arg(wal)
        .args(["--database-url", url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the loader")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(status) = child.try_wait().context("waiting for the loader")? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(Failure::runtime(anyhow!("the loader failed: {status}")));
    }
    Ok((secs, peak_kb as f64 / 1024.0))
}

/// `psql \copy` of the prepared file; returns its wall time.
fn run_psql_copy(cluster: &Cluster, url: &str, file: &Path) -> Result<f64, Failure> {
    let psql = cluster.program("psql");
    let cmd = format!(
        "\\copy audit_events ({}) FROM '{}' (FORMAT binary)",
        COPY_COLUMNS.join(", "),
        file.display()
    );
    let start = Instant::now();
    let out = Command::new(&psql)
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", &cmd])
        .output()
        .with_context(|| format!("cannot run {}", psql.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Failure::runtime(anyhow!(
            "psql \\copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(secs)
}

/// A live loader while one writer appends at 20,000 events/s: append-returned →
/// checkpoint-covers latency per event.
async fn measure_lag(
    cluster: &Cluster,
    exe: &Path,
    wal: &Path,
    secs: u64,
) -> Result<BenchResult, Failure> {
    const RATE: u64 = 20_000;
    let url = fresh_database(cluster, "lag").await?;
    let writer = WalWriter::open(WalConfig::new(wal, STREAM)).context("cannot open the lag WAL")?;
    let mut loader = Command::new(exe)
        .args(["load", "--metrics-addr", "off", "--wal-dir"])
        .arg(wal)
        .args(["--database-url", &url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the loader")?;

    // The checkpoint poller: (when seen, LSN) at every advance.
    let done = Arc::new(AtomicBool::new(false));
    let poll_url = url.clone();
    let poll_done = done.clone();
    let poller = tokio::spawn(async move {
        let mut seen: Vec<(Instant, u64)> = Vec::new();
        let Ok(mut c) = PgConnection::connect(&poll_url).await else {
            return seen;
        };
        let mut last = 0u64;
        while !poll_done.load(Ordering::Relaxed) {
            let lsn: Option<i64> =
                sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = $1")
                    .bind(STREAM)
                    .fetch_optional(&mut c)
                    .await
                    .ok()
                    .flatten();
            let lsn = lsn.unwrap_or(0).max(0) as u64;
            if lsn > last {
                seen.push((Instant::now(), lsn));
                last = lsn;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen
    });

    // The writer, paced: event k is due at start + k / RATE.
    let total = RATE * secs;
    let appended = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, Instant)>, Failure> {
        let mut at = Vec::with_capacity(total as usize);
        let start = Instant::now();
        for k in 0..total {
            let due = start + Duration::from_nanos(k * 1_000_000_000 / RATE);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let lsn = writer.append(&bench_event(k)).context("append failed")?;
            at.push((lsn, Instant::now()));
        }
        writer.close().context("closing the lag WAL")?;
        Ok(at)
    })
    .await
    .map_err(|e| Failure::runtime(anyhow!("writer thread: {e}")))??;

    // Wait for the loader to catch up (bounded), then stop everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if count_rows(&url).await? >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    let seen = poller
        .await
        .map_err(|e| Failure::runtime(anyhow!("poller: {e}")))?;
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&loader),
        rustix::process::Signal::TERM,
    );
    let _ = loader.wait();

    // Each event was committed when the first checkpoint ≥ its LSN was seen.
    let mut lags_ns = Vec::with_capacity(appended.len());
    let mut j = 0;
    for &(lsn, ref t) in &appended {
        while j < seen.len() && seen[j].1 < lsn {
            j += 1;
        }
        let Some((when, _)) = seen.get(j) else {
            return Err(Failure::runtime(anyhow!(
                "event LSN {lsn} was never loaded: not a valid run"
            )));
        };
        lags_ns.push(when.saturating_duration_since(*t).as_nanos() as u64);
    }
    lags_ns.sort_unstable();
    let mut r =
        BenchResult::new("load", "lag-20k", total, secs as f64).with_latencies_ns(&mut lags_ns);
    r.extra.insert(
        "max_lag_us".into(),
        serde_json::json!(percentile(&lags_ns, 100.0) as f64 / 1000.0),
    );
    Ok(r)
}
