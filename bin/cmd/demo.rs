//! `auditwal demo` (owned by the PostgreSQL work until the loader lands).
use super::CmdResult;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How many events to write.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
}

pub fn run(_args: DemoArgs) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "demo is not built yet"
    )))
}
