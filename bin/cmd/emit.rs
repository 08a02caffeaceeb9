//! `auditwal emit`: JSON lines on stdin, one acknowledged id per line on stdout.
use std::path::PathBuf;

use super::CmdResult;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmitMode {
    Async,
    Durable,
    Sync,
}

#[derive(clap::Args)]
pub struct EmitArgs {
    /// Write to the local WAL under this directory (async or durable mode).
    #[arg(long, env = "AUDITWAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Write to PostgreSQL directly (sync mode).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Delivery mode; default async with --wal-dir.
    #[arg(long, value_enum)]
    pub mode: Option<EmitMode>,
    /// Stream name under the WAL dir (one writer per stream).
    #[arg(long, default_value = "default")]
    pub stream: String,
}

pub fn run(_args: EmitArgs) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "emit is not built yet"
    )))
}
