//! `auditwal scratch-db` (hidden): a throwaway PostgreSQL for tests and
//! examples in other languages (the Python client's pytest run, the FastAPI
//! example), from the same harness the Rust tests use (`auditwal_test_support::Cluster`).
//!
//! Prints the server's URL on one stdout line once it accepts connections, then
//! runs until its stdin reaches end of file (the parent closed it, or died: a
//! SIGKILLed parent closes the pipe too); the cluster is stopped and its
//! directory removed then. Killed itself, by any signal, it leaves the same job
//! to the cluster's guardian process, so no server is left behind either way.
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use auditwal_test_support::{Cluster, ClusterError, ClusterOptions};

use super::{CmdResult, Failure};

#[derive(clap::Args)]
pub struct ScratchDbArgs {
    /// fsync on (default off: a throwaway server needs no crash safety of its own).
    #[arg(long)]
    pub fsync: bool,
}

pub fn run(args: ScratchDbArgs) -> CmdResult {
    let options = ClusterOptions {
        fsync: args.fsync,
        ..ClusterOptions::for_tests()
    };
    let cluster = Cluster::start(options).map_err(|e| match e {
        e @ (ClusterError::NotInstalled | ClusterError::NoPostgresUser) => {
            Failure::usage(anyhow!(e))
        }
        e => Failure::runtime(anyhow!(e).context("starting the throwaway PostgreSQL")),
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", cluster.url())
        .and_then(|()| out.flush())
        .context("writing the URL to stdout")?;
    drop(out);
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin().lock();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}
