//! `auditwal load` and `auditwal replay`: the loader process.
//!
//! Flags map onto [`auditwal::loader::LoaderConfig`]; SIGTERM and SIGINT stop the
//! loader after the batch in flight commits or aborts (nothing partial), exit 0.
//! `load --once` and `replay` draw a progress bar on stderr when it is a terminal
//! (`progress`); the loader proper (no `--once`) runs for ever and draws none.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use auditwal::loader::{Loader, LoaderConfig};
use auditwal::pg::link::DEFAULT_LINK_TIMEOUT;
use auditwal::wal::Lsn;
use sqlx::Connection;

use super::progress::{self, Estimate, Progress};
use super::{CmdResult, Failure};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
auditwal load --wal-dir /var/lib/auditwal --database-url postgres://loader@127.0.0.1/audit\n  \
auditwal load --wal-dir /var/lib/auditwal --once      # load what is there, then exit 0\n\n\
Every stream directory under --wal-dir is loaded; each batch commits together with its\n\
stream's checkpoint, so a restart loads nothing twice. Rows PostgreSQL refuses go to\n\
<stream>/dead-letter.jsonl. Metrics: GET http://ADDR/metrics (Prometheus text).")]
pub struct LoadArgs {
    /// The WAL directory holding one sub-directory per stream.
    #[arg(long, env = "AUDITWAL_WAL_DIR")]
    pub wal_dir: PathBuf,
    /// PostgreSQL connection URL (sslmode=require / verify-full for TLS).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Load everything present, then exit 0.
    #[arg(long)]
    pub once: bool,
    /// Serve Prometheus metrics here; loopback unless you say otherwise. `off` disables.
    #[arg(long, default_value = "127.0.0.1:9187")]
    pub metrics_addr: String,
    /// Move fully loaded segments here instead of deleting them.
    #[arg(long)]
    pub archive_dir: Option<PathBuf>,
    /// Most rows in one batch (one COPY + checkpoint transaction).
    #[arg(long, default_value_t = 20_000)]
    pub batch_rows: usize,
    /// Most COPY bytes in one batch.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub batch_bytes: usize,
    /// Longest a partial batch waits for more rows, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub batch_delay_ms: u64,
    /// How long the database may make no progress before the link is taken for
    /// dead and the loader reconnects, in milliseconds: a round trip unanswered, a
    /// piece of a COPY not accepted, TCP keepalive probes unanswered. A batch may
    /// take longer in total as long as it moves. At least 1000.
    #[arg(long, env = "AUDITWAL_LINK_TIMEOUT_MS", default_value_t = DEFAULT_LINK_TIMEOUT.as_millis() as u64)]
    pub link_timeout_ms: u64,
    /// Draw no progress bar. With --once, one is drawn on stderr when stderr is a
    /// terminal (never when it is piped or redirected).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example, after restoring the database from an older backup:\n  \
auditwal replay --wal-dir /var/lib/auditwal/archive --database-url $DATABASE_URL --from-lsn 1\n\n\
Rows already in the table (same event_id and occurred_at) are skipped, not duplicated;\n\
the stream's checkpoint only ever moves forward."
)]
pub struct ReplayArgs {
    /// The WAL directory (or an archive directory with the same layout).
    #[arg(long, env = "AUDITWAL_WAL_DIR")]
    pub wal_dir: PathBuf,
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// First LSN to re-send.
    #[arg(long)]
    pub from_lsn: u64,
    /// Only this stream (default: every stream).
    #[arg(long)]
    pub stream: Option<String>,
    /// Draw no progress bar (one is drawn on stderr when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::runtime)
}

pub fn run_load(args: LoadArgs) -> CmdResult {
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(a.parse::<SocketAddr>().map_err(|e| {
            Failure::usage(anyhow::anyhow!(
                "--metrics-addr {a:?} is not an address like 127.0.0.1:9187 ({e})"
            ))
        })?),
    };
    // A WAL dir that does not exist yet is waited for (the loader may start
    // before its service); with --once there is nothing to load from it.
    let exists = args.wal_dir.exists();
    if (exists && !args.wal_dir.is_dir()) || (!exists && args.once) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--wal-dir {} is not a directory",
            args.wal_dir.display()
        )));
    }
    if args.link_timeout_ms < 1000 {
        return Err(Failure::usage(anyhow::anyhow!(
            "--link-timeout-ms {} is too short: at least 1000 (TCP keepalive counts whole seconds)",
            args.link_timeout_ms
        )));
    }
    let config = {
        let mut c = LoaderConfig::new(args.wal_dir, args.database_url);
        c.once = args.once;
        c.link_timeout = Duration::from_millis(args.link_timeout_ms);
        c.archive_dir = args.archive_dir;
        c.batch_max_rows = args.batch_rows.max(1);
        c.batch_max_bytes = args.batch_bytes.max(64 * 1024);
        c.batch_max_delay = Duration::from_millis(args.batch_delay_ms);
        c.metrics_addr = metrics_addr;
        c
    };
    let show_progress = args.once && progress::wanted(args.no_progress);
    let rt = runtime()?;
    rt.block_on(async move {
        // Read before the loader starts, so no batch of this run is counted as done.
        let estimate = if show_progress {
            load_estimate(&config.wal_dir, &config.database_url).await
        } else {
            None
        };
        let loader = Loader::new(config);
        let bar = show_progress.then(|| {
            let metrics = loader.metrics();
            Progress::start("load", estimate, move || {
                metrics.rows_loaded() + metrics.dead_lettered()
            })
        });
        let shutdown = loader.shutdown_handle();
        let interrupted = Arc::new(AtomicBool::new(false));
        {
            let interrupted = interrupted.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                interrupted.store(true, Ordering::Relaxed);
                shutdown.stop();
            });
        }
        let result = loader.run().await;
        if let Some(bar) = bar {
            let metrics = loader.metrics();
            let complete = result.is_ok() && !interrupted.load(Ordering::Relaxed);
            bar.finish(metrics.rows_loaded() + metrics.dead_lettered(), complete);
        }
        let summary = result.map_err(|e| Failure::runtime(anyhow::Error::new(e)))?;
        tracing::info!(
            rows = summary.rows_loaded,
            dead_lettered = summary.dead_lettered,
            "loader stopped"
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// What `load --once` has ahead of it: per stream, from the committed checkpoint
/// to the durable watermark. `None` (the bar then shows the count alone) when the
/// checkpoints cannot be read within a few seconds; the loader itself goes on
/// retrying as usual.
async fn load_estimate(wal_dir: &Path, database_url: &str) -> Option<Estimate> {
    let streams = auditwal::wal::list_streams(wal_dir).ok()?;
    let read = async {
        let mut conn = sqlx::PgConnection::connect(database_url).await?;
        let mut done = Vec::with_capacity(streams.len());
        for s in &streams {
            let checkpoint = match auditwal::loader::checkpoint::read(&mut conn, s).await {
                Ok(cp) => cp.map_or(0, |c| c.lsn),
                // A database never loaded into (the loader migrates it first): no
                // checkpoints yet.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => 0,
                Err(e) => return Err(e),
            };
            done.push((wal_dir.join(s), checkpoint as Lsn));
        }
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(done)
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(done)) => Some(Estimate::new(done)),
        Ok(Err(e)) => {
            tracing::debug!("progress bar without a total: cannot read the checkpoints: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("progress bar without a total: the database did not answer in 5 s");
            None
        }
    }
}

pub fn run_replay(args: ReplayArgs) -> CmdResult {
    let show_progress = progress::wanted(args.no_progress);
    let rt = runtime()?;
    rt.block_on(async move {
        let config = LoaderConfig::new(args.wal_dir, args.database_url);
        let rows_sent = Arc::new(AtomicU64::new(0));
        let bar = show_progress.then(|| {
            let streams = match &args.stream {
                Some(s) => Ok(vec![s.clone()]),
                None => auditwal::wal::list_streams(&config.wal_dir),
            };
            // Records from --from-lsn on are to be sent: everything before is done.
            let estimate = streams.ok().map(|streams| {
                Estimate::new(
                    streams
                        .into_iter()
                        .map(|s| (config.wal_dir.join(s), args.from_lsn.saturating_sub(1)))
                        .collect(),
                )
            });
            let rows_sent = rows_sent.clone();
            Progress::start("replay", estimate, move || {
                rows_sent.load(Ordering::Relaxed)
            })
        });
        let result = auditwal::loader::replay::replay_with_progress(
            &config,
            args.from_lsn,
            args.stream.as_deref(),
            &rows_sent,
        )
        .await;
        if let Some(bar) = bar {
            bar.finish(rows_sent.load(Ordering::Relaxed), result.is_ok());
        }
        let summary = result.map_err(|e| Failure::runtime(anyhow::Error::new(e)))?;
        eprintln!(
            "replay: {} rows sent, {} already present, {} new",
            summary.rows_sent, summary.rows_present, summary.rows_inserted
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; SIGTERM will kill the loader abruptly");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping after the batch in flight"),
        _ = int.recv() => tracing::info!("SIGINT: stopping after the batch in flight"),
    }
}
