//! The errors of the PostgreSQL layer, one enum a caller can act on.
//!
//! The distinction that matters most to an audit caller is *whether the event may be
//! stored*: [`PgError::DatabaseUnavailable`] means nothing was sent for this event (it
//! is not stored; retrying later is safe), [`PgError::OutcomeUnknown`] means the
//! statement was sent and no answer came back (it may have committed: retry with the
//! same `event_id` and `occurred_at`, and a [`PgError::Duplicate`] then says it did).
//! This module also owns the classification of `sqlx` errors into those variants; it
//! knows nothing about batching or retries.

use std::time::Duration;

use uuid::Uuid;

use crate::event::EventError;

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The event cannot be stored as it is; nothing was sent. The inner error names
    /// the field.
    #[error("event refused before sending: {0}")]
    InvalidEvent(#[from] EventError),

    /// `sample_rate` must be in (0, 1].
    #[error("field `sample_rate`: {value} is not in (0, 1]")]
    InvalidSampleRate { value: f64 },

    /// No usable connection within the timeout (server down, unreachable, refusing
    /// connections, or too slow to answer the handshake). The event was not sent.
    #[error("database unavailable: {reason}")]
    DatabaseUnavailable { reason: String },

    /// The INSERT was sent but no answer arrived (connection lost, or no reply within
    /// the timeout): the event may or may not be committed.
    #[error("outcome unknown, the event may have been committed: {reason}")]
    OutcomeUnknown { reason: String },

    /// A row with this `event_id` and `occurred_at` is already stored.
    #[error("event {event_id} is already stored (same event_id and occurred_at)")]
    Duplicate { event_id: Uuid },

    /// PostgreSQL refused the row (a constraint or a data error), with its SQLSTATE.
    #[error("database rejected the event ({code}): {message}")]
    Rejected { code: String, message: String },

    /// Any other error reported by the server (e.g. the table is missing because the
    /// migrations were not applied), with its SQLSTATE.
    #[error("database error ({code}): {message}")]
    Database { code: String, message: String },

    /// Applying the schema migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),

    /// The connection URL or a setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The sync writer has shut down.
    #[error("the sync writer is closed")]
    Closed,

    /// An error of the client library that fits none of the above.
    #[error("database client error: {0}")]
    Client(String),
}

impl PgError {
    /// True when retrying later, unchanged, may succeed (the database was not
    /// reachable, or the outcome is unknown and a retry will be detected as a
    /// duplicate if the first attempt committed).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PgError::DatabaseUnavailable { .. } | PgError::OutcomeUnknown { .. }
        )
    }

    pub(crate) fn timed_out(what: &str, after: Duration) -> String {
        format!("{what}: no answer within {after:?}")
    }
}

/// Where an error happened, which decides what it means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Before any of the event's bytes were sent (connecting, acquiring).
    BeforeSend,
    /// While the event's statement was in flight.
    InFlight,
}

/// True for SQLSTATEs that say the server or the connection is going away or cannot
/// take us: class 08 (connection exception), 57P01..57P03 (shutdown, crash, cannot
/// connect now), 53300 (too many connections).
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Maps a client error to a [`PgError`]; `event_id` names the event for a duplicate.
pub(crate) fn classify(err: &sqlx::Error, stage: Stage, event_id: Option<Uuid>) -> PgError {
    let lost = |reason: String| match stage {
        Stage::BeforeSend => PgError::DatabaseUnavailable { reason },
        Stage::InFlight => PgError::OutcomeUnknown { reason },
    };
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = db.message().to_string();
            if is_unavailable_code(&code) {
                return lost(format!("{code}: {message}"));
            }
            if code == "23505" {
                if let Some(event_id) = event_id {
                    // The only unique constraint on audit_events is (event_id,
                    // occurred_at) (migration 0005 dropped the (id, occurred_at)
                    // key): a violation is a duplicate event.
                    if db.constraint().is_none_or(|c| c.contains("event_id")) {
                        return PgError::Duplicate { event_id };
                    }
                }
            }
            // Classes 22 (data exception) and 23 (integrity constraint) are about the
            // row itself; anything else is about the database.
            if code.starts_with("22") || code.starts_with("23") {
                PgError::Rejected { code, message }
            } else {
                PgError::Database { code, message }
            }
        }
        sqlx::Error::PoolTimedOut => PgError::DatabaseUnavailable {
            reason: "no connection available within the timeout".to_string(),
        },
        sqlx::Error::PoolClosed => PgError::Closed,
        sqlx::Error::Io(e) => lost(format!("i/o error: {e}")),
        sqlx::Error::Tls(e) => lost(format!("tls error: {e}")),
        sqlx::Error::Protocol(e) => lost(format!("protocol error: {e}")),
        sqlx::Error::WorkerCrashed => lost("connection worker crashed".to_string()),
        sqlx::Error::Configuration(e) => PgError::Config(e.to_string()),
        other => PgError::Client(other.to_string()),
    }
}

impl From<sqlx::migrate::MigrateError> for PgError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        // A migration that could not run because the database went away is an
        // availability problem, which a caller handles differently from a bad
        // migration.
        if let sqlx::migrate::MigrateError::Execute(inner) = &e {
            if let p @ PgError::DatabaseUnavailable { .. } =
                classify(inner, Stage::BeforeSend, None)
            {
                return p;
            }
        }
        PgError::Migrate(e)
    }
}
