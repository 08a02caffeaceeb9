//! Subcommand implementations and what they share: exit codes and logging. The
//! benches are crates/bench.

pub mod agent;
pub mod demo;
pub mod emit;
pub mod emit_sync;
pub mod emit_wal;
pub mod inspect;
pub mod keygen;
pub mod load;
pub mod migrate;
pub mod progress;
pub mod scratch_db;
pub mod verify_db;

use std::process::ExitCode;

/// Exit code: the work found a problem (e.g. verify found damage).
pub const EXIT_FOUND_PROBLEM: u8 = 1;
/// Exit code: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a runtime failure (I/O, database).
pub const EXIT_RUNTIME: u8 = 3;

/// An error on its way out of `main`, with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
    pub fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_RUNTIME,
            error: error.into(),
        }
    }
}

impl From<auditwal_bench::Failure> for Failure {
    fn from(f: auditwal_bench::Failure) -> Self {
        match f {
            auditwal_bench::Failure::Usage(e) => Failure::usage(e),
            auditwal_bench::Failure::Runtime(e) => Failure::runtime(e),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::runtime(error)
    }
}

pub type CmdResult = Result<ExitCode, Failure>;

/// Logs go to stderr (stdout carries the contract's output), around the progress
/// bar when one is drawn; RUST_LOG filters them.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::log_writer)
        // Colour codes only for a person: not in piped output or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
