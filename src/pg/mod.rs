//! PostgreSQL side of auditwal, shared by sync mode and the loader.
//!
//! - [`schema`]: the embedded migrations (migrations/*.sql: the partitioned,
//!   append-only `audit_events` table, the loader's `audit_checkpoints`, the roles)
//!   and the monthly partition upkeep. [`migrate`] is what every entry point runs.
//! - [`sync`]: sync mode, [`SyncWriter`]: each event committed in its own
//!   transaction before the call returns, calls that arrive during a commit
//!   coalesced into one multi-row INSERT (group commit without a timer window).
//! - `sync_chain`: sync mode's hash chain, one stream per committer, its
//!   links and checkpoints written by the statement that stores the rows.
//! - `reconnect`: when a new connection is worth trying after one got no
//!   answer (sync mode's committers and the audit log's start of sync mode).
//! - [`link`]: the TCP tuning (keepalive, `TCP_USER_TIMEOUT`) of every connection
//!   auditwal opens, sync mode's and the loader's alike, so it lives here with
//!   the other connection concerns and the loader depends on it, not the reverse.
//! - [`error`]: [`PgError`], which tells a caller whether an event may have been
//!   stored.
//!
//! The loader (the async path from the WAL, with its binary COPY encoder) is
//! [`crate::loader`]; it uses the schema, the link tuning and the errors from
//! here.

pub mod error;
pub mod link;
pub(crate) mod reconnect;
pub mod schema;
pub mod sync;
mod sync_chain;

pub use error::PgError;
pub use schema::{ensure_partitions, migrate, MIGRATOR, PARTITIONS_AHEAD};
pub use sync::{RowId, SyncConfig, SyncWriter};
