//! `auditwal demo`: the product in one run, on a throwaway database.
//!
//! Starts a private PostgreSQL (or uses `DATABASE_URL`), appends events in async
//! mode to a WAL in a temp dir from several threads, runs the loader once, and
//! prints how many landed and how fast each side went; then, for contrast, times
//! a few hundred events in sync mode (one caller, INSERT + COMMIT each) beside the
//! async append of one event. Exits non-zero if any acknowledged event is missing.
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::loader::{Loader, LoaderConfig};
use auditwal::pg::{SyncConfig, SyncWriter};
use auditwal::wal::{WalConfig, WalWriter};
use auditwal::{AuditEvent, Outcome};
use auditwal_test_support::{Cluster, ClusterError, ClusterOptions};
use sqlx::Connection;

use super::{CmdResult, Failure};
use auditwal_bench::percentile;

/// Threads appending the demo's events.
const THREADS: u64 = 2;
/// Events timed one by one in sync mode for the contrast.
const SYNC_SAMPLE: usize = 300;

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  cargo run --release -- demo --events 500000\n\n\
Starts a throwaway PostgreSQL (needs initdb/pg_ctl; installs the Debian package postgresql\n\
when run as root without them), or uses DATABASE_URL when set. Exit codes: 0 every\n\
acknowledged event landed, 2 PostgreSQL missing, 3 any other failure."
)]
pub struct DemoArgs {
    /// How many events to append in async mode.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
}

fn demo_event(thread: u64, i: u64) -> AuditEvent {
    AuditEvent::new("demo.document.viewed")
        .actor("user", format!("user-{}", (thread * 7919 + i) % 1000))
        .target("document", format!("doc-{}", i % 97))
        .tenant("demo")
        .outcome(Outcome::Success)
        .ip(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            10,
            0,
            (i >> 8) as u8,
            i as u8,
        )))
        .request_id(format!("req-{thread}-{i}"))
}

pub fn run(args: DemoArgs) -> CmdResult {
    let (cluster, url) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            eprintln!("demo: using DATABASE_URL (rows are added to its audit_events)");
            (None, url)
        }
        _ => {
            eprintln!("demo: starting a throwaway PostgreSQL (initdb + pg_ctl in a temp dir, fsync on)...");
            let cluster = Cluster::start(ClusterOptions::default()).map_err(|e| match e {
                e @ (ClusterError::NotInstalled | ClusterError::NoPostgresUser) => {
                    Failure::usage(anyhow!(e))
                }
                e => Failure::runtime(anyhow!(e).context("starting the throwaway PostgreSQL")),
            })?;
            eprintln!("demo: PostgreSQL is up on 127.0.0.1:{}", cluster.port());
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let wal_dir = tempfile::tempdir().context("cannot create a temp dir for the WAL")?;
    let stream = format!("demo-{}", std::process::id());

    // 1. Async appends: the request path of a service.
    let writer = Arc::new(
        WalWriter::open(WalConfig::new(wal_dir.path(), &stream)).context("opening the WAL")?,
    );
    let per_thread = args.events / THREADS;
    let total = per_thread * THREADS;
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let writer = writer.clone();
            std::thread::spawn(move || -> Result<Vec<u64>, auditwal::wal::WalError> {
                let mut lat = Vec::with_capacity(per_thread as usize);
                for i in 0..per_thread {
                    let e = demo_event(t, i);
                    let t0 = Instant::now();
                    writer.append(&e)?;
                    lat.push(t0.elapsed().as_nanos() as u64);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut append_ns = Vec::new();
    for t in threads {
        let lat = t
            .join()
            .map_err(|_| anyhow!("an appending thread panicked"))?
            .context("append failed")?;
        append_ns.extend(lat);
    }
    let append_secs = started.elapsed().as_secs_f64();
    writer.close().context("closing the WAL")?;
    append_ns.sort_unstable();
    println!(
        "demo: appended {total} events in async mode from {THREADS} threads in {append_secs:.2} s \
         ({:.0} events/s; append p50 {:.2} µs, p99 {:.2} µs)",
        total as f64 / append_secs,
        percentile(&append_ns, 50.0) as f64 / 1000.0,
        percentile(&append_ns, 99.0) as f64 / 1000.0,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        // 2. The loader, once: WAL → binary COPY → audit_events.
        let mut config = LoaderConfig::new(wal_dir.path(), url.clone());
        config.once = true;
        let loader = Loader::new(config);
        let started = Instant::now();
        let summary = loader.run().await.context("the loader failed")?;
        let load_secs = started.elapsed().as_secs_f64();
        println!(
            "demo: the loader copied {} rows into PostgreSQL in {load_secs:.2} s ({:.0} rows/s, binary COPY, exactly once)",
            summary.rows_loaded,
            summary.rows_loaded as f64 / load_secs.max(1e-9)
        );
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .context("connecting to count rows")?;
        let landed: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE stream_id = $1")
            .bind(&stream)
            .fetch_one(&mut conn)
            .await
            .context("counting rows")?;
        println!("demo: {landed} of {total} acknowledged events are in audit_events");
        if landed as u64 != total {
            return Err(anyhow!("{total} events were acknowledged but {landed} rows landed"));
        }

        // 3. For contrast: sync mode, one caller, each event its own INSERT + COMMIT.
        let sync = SyncWriter::connect(&url, SyncConfig::default())
            .await
            .context("connecting the sync writer")?;
        let mut sync_ns = Vec::with_capacity(SYNC_SAMPLE);
        for i in 0..SYNC_SAMPLE as u64 {
            let e = demo_event(9, i);
            let t0 = Instant::now();
            sync.record(&e).await.context("sync record failed")?;
            sync_ns.push(t0.elapsed().as_nanos() as u64);
        }
        sync_ns.sort_unstable();
        let sync_p50 = Duration::from_nanos(percentile(&sync_ns, 50.0));
        let async_p50 = Duration::from_nanos(percentile(&append_ns, 50.0));
        println!(
            "demo: sync mode for contrast: {SYNC_SAMPLE} events, one caller, p50 {:.0} µs per event \
             ({:.0}x the async append)",
            sync_p50.as_secs_f64() * 1e6,
            sync_p50.as_secs_f64() / async_p50.as_secs_f64().max(1e-9)
        );
        Ok::<_, anyhow::Error>(())
    })?;
    drop(runtime);
    if let Some(cluster) = cluster {
        drop(cluster);
        println!("demo: the throwaway PostgreSQL was stopped and removed");
    }
    Ok(ExitCode::SUCCESS)
}
