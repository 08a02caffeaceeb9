//! `auditwal inspect` and `auditwal verify`.
use std::path::PathBuf;

use super::CmdResult;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A segment file or a stream directory.
    pub path: PathBuf,
    /// Start at this LSN.
    #[arg(long)]
    pub from_lsn: Option<u64>,
    /// One JSON object per record, fields by their schema names.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A segment file or a stream directory.
    pub path: PathBuf,
}

pub fn run_inspect(_args: InspectArgs) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "inspect is not built yet"
    )))
}

pub fn run_verify(_args: VerifyArgs) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "verify is not built yet"
    )))
}
