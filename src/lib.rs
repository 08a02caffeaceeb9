//! auditwal: audit logging for services on unreliable networks.
//!
//! A service opens one [`AuditLog`] from a [`Config`] and records each
//! [`AuditEvent`] in one of four [`Mode`]s, chosen per application and per call
//! (docs/modes.md says what each can lose and when):
//!
//! - **sync**: INSERT + COMMIT in PostgreSQL before the call returns; the
//!   [`Receipt`] carries the row id;
//! - **durable**: appended to the local segment WAL and fsynced before return;
//! - **async**: appended to the WAL (page cache), fsynced by a background flusher;
//! - **sampled**: a fraction of events ([`Sampler`], [`ForceKeep`] rules), as async.
//!
//! A [`Loader`] (usually the separate `auditwal load` process) tails the WAL and
//! bulk-COPYs it into PostgreSQL exactly once; [`migrate`] applies the schema.
//!
//! That is the whole public API, re-exported here. Where the rest lives:
//!
//! | module | owns |
//! |---|---|
//! | `event`, `columns` | the event's fields and validation; the one list of its columns |
//! | `config`, `mode` | the settings (file, environment, builder) and [`Mode`] |
//! | `log` | [`AuditLog`]: the modes, sampling, the full-disk policy, counters |
//! | `sampling` | which events a sampled call keeps |
//! | `wal` | the segment WAL: format, writer, flusher, reader, recovery |
//! | `chain` | the hash chain: links, signed checkpoints, keys, verify-db's walk (docs/integrity.md) |
//! | `loader` | WAL to PostgreSQL: cursor, batches, binary COPY, checkpoints, replay |
//! | `pg` | sync mode, the schema, connection tuning, [`PgError`] |
//!
//! Those modules are private. The `internals` feature makes them public for the
//! tools built on them (the `auditwal` CLI's inspect, verify and benches, the
//! fuzz targets, the integration tests); their items carry no stability promise.

/// Declares modules that are public with the `internals` feature and private
/// without it (their items are then reached only through the re-exports below,
/// so some are unused in that build, which is allowed there).
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        mod $name;
    )*};
}

internal_modules!(chain, columns, config, event, loader, log, pg, sampling, wal);
mod mode;

pub use config::{Config, ConfigBuilder, ConfigError};
pub use event::{AuditEvent, EventError, JsonText, Outcome, DEFAULT_MAX_EVENT_BYTES};
pub use loader::{LoadError, LoadSummary, Loader, LoaderConfig};
pub use log::{AuditError, AuditLog, AuditStats, PerMode, Receipt};
pub use mode::{Mode, ParseModeError};
pub use pg::{migrate, PgError, RowId};
pub use sampling::{ForceKeep, SampleKey, Sampler, SamplingError};
pub use wal::{FullDiskPolicy, Lsn, WalError};
