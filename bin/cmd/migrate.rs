//! `auditwal migrate --database-url URL`.
use super::CmdResult;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

pub fn run(_args: MigrateArgs) -> CmdResult {
    Err(super::Failure::runtime(anyhow::anyhow!(
        "migrate is not built yet"
    )))
}
