//! The `auditwal` command line: the contract of DESIGN.md ("Command line contract").
//!
//! Each subcommand's work lives in `bin/cmd/<name>.rs`; this file only parses flags
//! and maps outcomes to the contract's exit codes: 0 success, 1 the work found a
//! problem (verify found damage), 2 bad usage or configuration, 3 runtime failure.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "auditwal",
    version,
    about = "Audit logging over a local segment WAL and PostgreSQL",
    after_help = "Environment: DATABASE_URL stands in for --database-url, AUDITWAL_WAL_DIR for --wal-dir.\n\
Exit codes: 0 success, 1 the work found a problem (verify found damage), 2 bad usage or configuration, 3 runtime failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a throwaway local PostgreSQL, write events, load them, print a summary.
    Demo(cmd::demo::DemoArgs),
    /// Apply the schema migrations to a database.
    Migrate(cmd::migrate::MigrateArgs),
    /// Read JSON lines on stdin and record each event; print each id once acknowledged.
    Emit(cmd::emit::EmitArgs),
    /// Tail the WAL and load it into PostgreSQL (binary COPY, exactly once).
    Load(cmd::load::LoadArgs),
    /// Re-send a range of the WAL idempotently (after a database restore).
    Replay(cmd::load::ReplayArgs),
    /// Print the records of a segment file or stream directory.
    Inspect(cmd::inspect::InspectArgs),
    /// Check a segment file or stream directory for damage (exit 1 if any).
    Verify(cmd::inspect::VerifyArgs),
    /// Run a benchmark against a baseline measured in the same run.
    Bench(BenchArgs),
    /// Record events for other processes over a Unix socket (and loopback HTTP).
    Agent(cmd::agent::AgentArgs),
    /// A throwaway PostgreSQL for tests in other languages: prints its URL, runs until stdin closes.
    #[command(hide = true)]
    ScratchDb(cmd::scratch_db::ScratchDbArgs),
}

#[derive(clap::Args)]
#[command(after_help = format!(
    "Examples:\n  auditwal bench wal --json\n  auditwal bench load --dir /var/tmp\n\n\
Each bench measures its baseline in the same run and prints ours / baseline as `ratio`\n\
(bench fleet: each case against its offered rate).\n\
--dir must not be a tmpfs for honest fsync figures. See docs/benchmarks.md.\n\n{}\n\n{}",
    cmd::bench_e2e::HELP,
    cmd::bench_fleet::HELP
))]
struct BenchArgs {
    /// Which benchmark.
    which: BenchKind,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Where to put scratch files (WAL segments, database cluster); default: a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    e2e: cmd::bench_e2e::E2eArgs,
    #[command(flatten)]
    fleet: cmd::bench_fleet::FleetArgs,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_tracing();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Migrate(a) => cmd::migrate::run(a),
        Command::Emit(a) => cmd::emit::run(a),
        Command::Load(a) => cmd::load::run_load(a),
        Command::Replay(a) => cmd::load::run_replay(a),
        Command::Inspect(a) => cmd::inspect::run_inspect(a),
        Command::Verify(a) => cmd::inspect::run_verify(a),
        Command::Agent(a) => cmd::agent::run(a),
        Command::ScratchDb(a) => cmd::scratch_db::run(a),
        Command::Bench(a) => match (a.which, a.e2e.first_given(), a.fleet.first_given()) {
            (BenchKind::E2e, _, None) => cmd::bench_e2e::run(a.e2e, a.json, a.dir),
            (BenchKind::Fleet, None, _) => cmd::bench_fleet::run(a.fleet, a.json, a.dir),
            (_, Some(flag), _) => Err(cmd::Failure::usage(anyhow::anyhow!(
                "{flag} applies only to `bench e2e`"
            ))),
            (_, _, Some(flag)) => Err(cmd::Failure::usage(anyhow::anyhow!(
                "{flag} applies only to `bench fleet`"
            ))),
            (BenchKind::Wal, None, None) => cmd::bench_wal::run(a.json, a.dir),
            (BenchKind::Sync, None, None) => cmd::bench_sync::run(a.json, a.dir),
            (BenchKind::Load, None, None) => cmd::bench_load::run(a.json, a.dir),
            (BenchKind::Record, None, None) => cmd::bench_record::run(a.json, a.dir),
            (BenchKind::Agent, None, None) => cmd::bench_agent::run(a.json, a.dir),
        },
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("auditwal: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
