//! `auditwal load` and `auditwal replay`: the loader process.
//!
//! Flags map onto [`auditwal::pg::loader::LoaderConfig`]; SIGTERM and SIGINT stop the
//! loader after the batch in flight commits or aborts (nothing partial), exit 0.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use auditwal::pg::loader::{Loader, LoaderConfig};

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
    if !args.wal_dir.is_dir() {
        return Err(Failure::usage(anyhow::anyhow!(
            "--wal-dir {} is not a directory",
            args.wal_dir.display()
        )));
    }
    let config = LoaderConfig {
        once: args.once,
        archive_dir: args.archive_dir,
        batch_max_rows: args.batch_rows.max(1),
        batch_max_bytes: args.batch_bytes.max(64 * 1024),
        batch_max_delay: Duration::from_millis(args.batch_delay_ms),
        metrics_addr,
        ..LoaderConfig::new(args.wal_dir, args.database_url)
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let loader = Loader::new(config);
        let shutdown = loader.shutdown_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            shutdown.stop();
        });
        let summary = loader
            .run()
            .await
            .map_err(|e| Failure::runtime(anyhow::Error::new(e)))?;
        tracing::info!(
            rows = summary.rows_loaded,
            dead_lettered = summary.dead_lettered,
            "loader stopped"
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_replay(args: ReplayArgs) -> CmdResult {
    let rt = runtime()?;
    rt.block_on(async move {
        let config = LoaderConfig::new(args.wal_dir, args.database_url);
        let summary = auditwal::pg::replay::replay(&config, args.from_lsn, args.stream.as_deref())
            .await
            .map_err(|e| Failure::runtime(anyhow::Error::new(e)))?;
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
