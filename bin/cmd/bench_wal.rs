//! `auditwal bench wal`.
use std::path::PathBuf;

use super::CmdResult;

pub fn run(_json: bool, _dir: Option<PathBuf>) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "bench wal is not built yet"
    )))
}
