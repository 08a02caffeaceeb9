//! The `auditwal` command line: the command-line contract operators' scripts use
//! (README.md, docs/operations.md).
//!
//! Each subcommand's work lives in `bin/cmd/<name>.rs`; this file only parses flags
//! and maps outcomes to the contract's exit codes: 0 success, 1 the work found a
//! problem (verify found damage), 2 bad usage or configuration, 3 runtime failure.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Write an Ed25519 key pair for signed checkpoints (auditwal.key, 0600, and auditwal.pub).
    Keygen(cmd::keygen::KeygenArgs),
    /// Prove the table's rows are what the writers signed (exit 1 on findings).
    VerifyDb(cmd::verify_db::VerifyDbArgs),
    /// Run a benchmark against a baseline measured in the same run.
    Bench(auditwal_bench::BenchArgs),
    /// Record events for other processes over a Unix socket (and loopback HTTP).
    Agent(cmd::agent::AgentArgs),
    /// A throwaway PostgreSQL for tests in other languages: prints its URL, runs until stdin closes.
    #[command(hide = true)]
    ScratchDb(cmd::scratch_db::ScratchDbArgs),
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
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::VerifyDb(a) => cmd::verify_db::run(a),
        Command::ScratchDb(a) => cmd::scratch_db::run(a),
        Command::Bench(a) => auditwal_bench::run(a).map_err(cmd::Failure::from),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("auditwal: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
