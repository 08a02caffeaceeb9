//! `auditwal bench ...`: the benchmarks of docs/benchmarks.md, each measuring its
//! baseline in the same run and printing ours / baseline as `ratio`.
//!
//! The CLI flattens [`BenchArgs`] into its `bench` subcommand and calls [`run`];
//! the output format is the command-line contract's (`bench.rs`). One module per
//! bench (`bench_<name>.rs`), plus what several share: the HTTP load generator of
//! the e2e bench (`loadgen`), the link that can be cut of the fleet bench
//! (`flaky_link`) and per-process CPU accounting (`proc_cpu`).

mod bench;
mod bench_agent;
mod bench_e2e;
mod bench_fleet;
mod bench_load;
mod bench_record;
mod bench_sync;
mod bench_verify;
mod bench_wal;
mod flaky_link;
mod loadgen;
mod proc_cpu;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;

/// The percentile of sorted samples the benches report (also the demo's summary).
pub use bench::percentile;

/// Why a bench did not run to the end, split the way the contract's exit codes
/// are: bad usage or configuration (2), or a runtime failure (3).
#[derive(Debug)]
pub enum Failure {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure::Usage(error.into())
    }
    pub fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Failure::Runtime(error.into())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Runtime(error)
    }
}

/// What a bench returns: its exit code (0) once its report is printed.
pub type CmdResult = Result<ExitCode, Failure>;

/// The flags of `auditwal bench`.
#[derive(clap::Args)]
#[command(after_help = format!(
    "Examples:\n  auditwal bench wal --json\n  auditwal bench load --dir /var/tmp\n\n\
Each bench measures its baseline in the same run and prints ours / baseline as `ratio`\n\
(bench fleet: each case against its offered rate).\n\
--dir must not be a tmpfs for honest fsync figures. See docs/benchmarks.md.\n\n{}\n\n{}",
    bench_e2e::HELP,
    bench_fleet::HELP
))]
pub struct BenchArgs {
    /// Which benchmark.
    which: BenchKind,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Where to put scratch files (WAL segments, database cluster); default: a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    e2e: bench_e2e::E2eArgs,
    #[command(flatten)]
    fleet: bench_fleet::FleetArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchKind {
    Wal,
    Sync,
    Load,
    E2e,
    Record,
    Fleet,
    Agent,
    VerifyDb,
}

/// Runs the bench `args` names; a flag of one bench given to another is a usage
/// error.
pub fn run(a: BenchArgs) -> CmdResult {
    match (a.which, a.e2e.first_given(), a.fleet.first_given()) {
        (BenchKind::E2e, _, None) => bench_e2e::run(a.e2e, a.json, a.dir),
        (BenchKind::Fleet, None, _) => bench_fleet::run(a.fleet, a.json, a.dir),
        (_, Some(flag), _) => Err(Failure::usage(anyhow::anyhow!(
            "{flag} applies only to `bench e2e`"
        ))),
        (_, _, Some(flag)) => Err(Failure::usage(anyhow::anyhow!(
            "{flag} applies only to `bench fleet`"
        ))),
        (BenchKind::Wal, None, None) => bench_wal::run(a.json, a.dir),
        (BenchKind::Sync, None, None) => bench_sync::run(a.json, a.dir),
        (BenchKind::Load, None, None) => bench_load::run(a.json, a.dir),
        (BenchKind::Record, None, None) => bench_record::run(a.json, a.dir),
        (BenchKind::Agent, None, None) => bench_agent::run(a.json, a.dir),
        (BenchKind::VerifyDb, None, None) => bench_verify::run(a.json, a.dir),
    }
}
