//! `auditwal emit --wal-dir DIR [--mode async|durable]` (being written).
use std::path::Path;

use super::CmdResult;

pub fn run(_wal_dir: &Path, _stream: &str, _durable: bool) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "emit to the WAL is not built yet"
    )))
}
