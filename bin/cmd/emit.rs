//! `auditwal emit`: JSON lines on stdin, one acknowledged id per line on stdout.
//!
//! The WAL modes live in `emit_wal.rs`, sync mode in `emit_sync.rs`; this file only
//! chooses between them from the flags.
use std::path::PathBuf;

use super::{CmdResult, Failure};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum EmitMode {
    Async,
    Durable,
    Sync,
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
auditwal emit --wal-dir /var/lib/auditwal --mode durable < events.jsonl\n  \
auditwal emit --database-url postgres://127.0.0.1/audit --mode sync < events.jsonl\n\n\
Each output line is written only after that event's append (or commit) returned:\n\
the event_id for async/durable, `event_id row_id` for sync.\n\
A line that is not a valid event is reported on stderr with its line number and\n\
skipped; the other events are still written, and the exit code is then 1.")]
pub struct EmitArgs {
    /// Write to the local WAL under this directory (async or durable mode).
    #[arg(long, env = "AUDITWAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Write to PostgreSQL directly (sync mode).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Delivery mode: async (default) or durable with --wal-dir, sync with --database-url.
    #[arg(long, value_enum)]
    pub mode: Option<EmitMode>,
    /// Stream name under the WAL dir (one writer per stream).
    #[arg(long, default_value = "default")]
    pub stream: String,
}

pub fn run(args: EmitArgs) -> CmdResult {
    match args.mode {
        Some(EmitMode::Sync) => match args.database_url.clone() {
            Some(url) => super::emit_sync::run(&url),
            None => Err(Failure::usage(anyhow::anyhow!(
                "--mode sync needs --database-url URL (or DATABASE_URL)"
            ))),
        },
        mode => match args.wal_dir.clone() {
            Some(dir) => {
                let durable = mode == Some(EmitMode::Durable);
                super::emit_wal::run(&dir, &args.stream, durable)
            }
            None => Err(Failure::usage(anyhow::anyhow!(
                "emit needs --wal-dir DIR (or AUDITWAL_WAL_DIR) for async/durable mode, \
                 or --database-url URL --mode sync"
            ))),
        },
    }
}
