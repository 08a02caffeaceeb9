//! `auditwal migrate --database-url URL`: applies the embedded migrations.
//!
//! Safe to run from several processes at once and as often as one likes (see
//! `auditwal::pg::schema`). Exit 0 when the schema is up to date, 2 for a bad URL,
//! 3 when the database cannot be reached or a migration fails.
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use auditwal::pg::{self, PgError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{CmdResult, Failure};

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  auditwal migrate --database-url postgres://owner@127.0.0.1/audit\n\n\
Run it as the role that is to own the tables; running it again does nothing, and several\n\
processes may run it at once. Exit codes: 0 up to date, 2 bad URL, 3 database unreachable\n\
or a migration failed (see docs/operations.md)."
)]
pub struct MigrateArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Give up when the database does not answer within this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

pub fn run(args: MigrateArgs) -> CmdResult {
    let options: PgConnectOptions = args.database_url.parse().map_err(|e| {
        Failure::usage(anyhow!("--database-url is not a valid PostgreSQL URL: {e}"))
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    runtime.block_on(async move {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        let result = tokio::time::timeout(timeout, pg::migrate(&pool)).await;
        pool.close().await;
        match result {
            Ok(Ok(())) => {
                println!(
                    "auditwal: schema up to date ({} migrations)",
                    pg::MIGRATOR.iter().count()
                );
                Ok(ExitCode::SUCCESS)
            }
            Ok(Err(e @ PgError::Config(_))) => Err(Failure::usage(anyhow!(e))),
            Ok(Err(e @ PgError::DatabaseUnavailable { .. })) => Err(Failure::runtime(anyhow!(
                "{e}; is PostgreSQL running and reachable at the given URL?"
            ))),
            Ok(Err(e)) => Err(Failure::runtime(anyhow!(e).context("applying migrations"))),
            Err(_) => Err(Failure::runtime(anyhow!(
                "no answer from the database within {timeout:?} (raise --timeout-secs if it is busy)"
            ))),
        }
    })
}
