//! `auditwal keygen --out DIR`: a new Ed25519 key pair for signed checkpoints
//! (docs/integrity.md): `DIR/auditwal.key` (mode 0600, for the writer's
//! `AUDITWAL_CHAIN_KEY`) and `DIR/auditwal.pub` (for `verify-db`). Never
//! overwrites a key. Exit 0, 2 for a bad name or an existing key, 3 when the
//! files cannot be written.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use auditwal::chain::keys::{write_pair, KeyError};

use super::{CmdResult, Failure};

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  auditwal keygen --out /etc/auditwal --name edge-7\n  \
AUDITWAL_CHAIN_KEY=/etc/auditwal/auditwal.key my-service   # the writer signs\n  \
auditwal verify-db --public-key /etc/auditwal/auditwal.pub  # the auditor checks\n\n\
Keep the private key on the writer's host only; give the public key to auditors."
)]
pub struct KeygenArgs {
    /// Directory to write auditwal.key and auditwal.pub into (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// The key's name, written in every signature line.
    #[arg(long, default_value = "auditwal")]
    pub name: String,
}

pub fn run(args: KeygenArgs) -> CmdResult {
    match write_pair(&args.out, &args.name) {
        Ok((private, public)) => {
            println!("{}", private.display());
            println!("{}", public.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ KeyError::BadName { .. }) => Err(Failure::usage(e)),
        Err(KeyError::Io { source, path, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            Err(Failure::usage(anyhow::anyhow!(
                "{} already exists: keygen never overwrites a key (pick another --out)",
                path.display()
            )))
        }
        Err(e) => Err(Failure::runtime(e)),
    }
}
