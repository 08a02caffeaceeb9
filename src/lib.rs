//! auditwal: audit logging for services on unreliable networks.
//!
//! Four delivery modes share one event type ([`AuditEvent`]):
//! - **sync**: INSERT + COMMIT in PostgreSQL before the call returns ([`pg::sync`]);
//! - **durable**: appended to the local segment WAL and fsynced before return ([`wal`]);
//! - **async**: appended to the WAL (page cache) and fsynced by a background flusher;
//! - **sampled**: a fraction of events, delivered async.
//!
//! A separate loader process ([`loader`]) tails the WAL and bulk-COPYs it into PostgreSQL.
//! See docs/modes.md for what each mode can lose and when.

pub mod columns;
pub mod config;
pub mod event;
pub mod loader;
pub mod log;
mod mode;
pub mod pg;
pub mod sampling;
pub mod wal;

pub use config::{Config, ConfigBuilder, ConfigError, Mode};
pub use event::{AuditEvent, EventError, JsonText, Outcome, DEFAULT_MAX_EVENT_BYTES};
pub use log::{AuditError, AuditLog, AuditStats, PerMode, Receipt};
pub use sampling::{ForceKeep, SampleKey, Sampler};
