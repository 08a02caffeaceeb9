//! PostgreSQL side of auditwal.
//!
//! - [`schema`]: the embedded migrations (migrations/*.sql: the partitioned,
//!   append-only `audit_events` table, the loader's `audit_checkpoints`, the roles)
//!   and the monthly partition upkeep. [`migrate`] is what every entry point runs.
//! - [`sync`]: sync mode, [`SyncWriter`]: each event committed in its own
//!   transaction before the call returns, calls that arrive during a commit
//!   coalesced into one multi-row INSERT (group commit without a timer window).
//! - [`cluster`]: a throwaway private PostgreSQL (initdb + pg_ctl in a temp dir on a
//!   loopback port) for tests, `auditwal demo` and the benches, never outliving the
//!   process that started it.
//! - [`error`]: [`PgError`], which tells a caller whether an event may have been
//!   stored.
//!
//! The binary COPY encoder and the loader (the async path from the WAL) live beside
//! these and reuse the schema and the errors.

pub mod backoff;
pub mod batch;
pub mod checkpoint;
pub mod cluster;
pub mod copy;
pub mod cursor;
pub mod dead_letter;
pub mod error;
pub mod link;
pub mod loader;
pub mod metrics;
pub mod replay;
pub mod schema;
pub mod sync;

pub use cluster::{Cluster, ClusterError, ClusterNetwork, ClusterOptions};
pub use error::PgError;
pub use schema::{ensure_partitions, migrate, MIGRATOR, PARTITIONS_AHEAD};
pub use sync::{RowId, SyncConfig, SyncWriter};
