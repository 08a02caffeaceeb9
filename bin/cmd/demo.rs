//! `auditwal demo`: a throwaway local PostgreSQL, events written, a summary.
//!
//! For now the events go in sync mode (each committed by [`SyncWriter`], many
//! callers at once so group commit shows). The async path (WAL append, then the
//! loader) replaces [`write_events`] when the loader exists; starting the database,
//! counting what landed and the summary stay as they are.
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::pg::{Cluster, ClusterError, ClusterOptions, SyncConfig, SyncWriter};
use auditwal::{AuditEvent, Outcome};
use sqlx::postgres::PgPoolOptions;

use super::{CmdResult, Failure};

/// Concurrent callers writing the demo's events.
const CALLERS: u64 = 64;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How many events to write.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
}

/// What the write phase did.
struct Written {
    mode: &'static str,
    events: u64,
    elapsed: Duration,
}

pub fn run(args: DemoArgs) -> CmdResult {
    eprintln!("demo: starting a throwaway PostgreSQL (initdb + pg_ctl in a temp dir, fsync on)...");
    let cluster = Cluster::start(ClusterOptions::default()).map_err(|e| match e {
        e @ (ClusterError::NotInstalled | ClusterError::NoPostgresUser) => {
            Failure::usage(anyhow!(e))
        }
        e => Failure::runtime(anyhow!(e).context("starting the throwaway PostgreSQL")),
    })?;
    eprintln!("demo: PostgreSQL is up on 127.0.0.1:{}", cluster.port());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    let url = cluster.url();
    let outcome = runtime.block_on(async {
        let written = write_events(&url, args.events).await?;
        let landed = count_rows(&url).await?;
        Ok::<_, anyhow::Error>((written, landed))
    });
    // Stop the database whatever happened above.
    drop(runtime);
    drop(cluster);
    let (written, landed) = outcome.map_err(Failure::runtime)?;
    let secs = written.elapsed.as_secs_f64();
    println!(
        "demo: wrote {} events in {} mode with {CALLERS} concurrent callers in {secs:.2} s ({:.0} events/s)",
        written.events,
        written.mode,
        if secs > 0.0 {
            written.events as f64 / secs
        } else {
            0.0
        },
    );
    println!("demo: {landed} rows landed in audit_events");
    println!("demo: the throwaway PostgreSQL was stopped and removed");
    if landed != written.events {
        return Err(Failure::runtime(anyhow!(
            "{} events were acknowledged but {landed} rows are in the table",
            written.events
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `n` events in sync mode from [`CALLERS`] tasks; every acknowledged event
/// is committed.
async fn write_events(url: &str, n: u64) -> anyhow::Result<Written> {
    let writer = SyncWriter::connect(url, SyncConfig::default())
        .await
        .context("connecting the sync writer (and applying migrations)")?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let writer = writer.clone();
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let event = AuditEvent::new("demo.document.viewed")
                        .actor("user", format!("user-{caller}"))
                        .target("document", format!("doc-{}", caller % 7))
                        .tenant("demo")
                        .outcome(Outcome::Success);
                    writer.record(&event).await?;
                }
                Ok::<_, auditwal::pg::PgError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .map_err(|e| anyhow!("a writer task failed: {e}"))?
            .context("writing an event")?;
    }
    Ok(Written {
        mode: "sync",
        events: n,
        elapsed: started.elapsed(),
    })
}

async fn count_rows(url: &str) -> anyhow::Result<u64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .context("connecting to count rows")?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&pool)
        .await
        .context("counting rows")?;
    pool.close().await;
    Ok(u64::try_from(n).unwrap_or(0))
}
