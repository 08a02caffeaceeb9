//! `auditwal emit --database-url URL --mode sync` (being written).
use super::CmdResult;

pub fn run(_database_url: &str) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "emit in sync mode is not built yet"
    )))
}
