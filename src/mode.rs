//! The delivery mode of one audit call, and its spelling in configuration and
//! logs.
//!
//! Its own module because every layer speaks of it: the configuration reads it
//! (`audit_mode`), the audit log dispatches and counts by it, the agent's
//! protocols carry it. What each mode can lose is docs/modes.md's business.

use std::fmt;
use std::str::FromStr;

/// The delivery mode of one call (see docs/modes.md for what each can lose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Committed in PostgreSQL, in its own transaction, before the call returns.
    Sync,
    /// Fsynced to the local WAL before the call returns.
    Durable,
    /// Appended to the local WAL (page cache); fsynced within `fsync_interval`.
    Async,
    /// Kept or dropped by the sampler; kept events are delivered as async.
    Sampled,
}

impl Mode {
    /// Every mode, in the order [`crate::log::PerMode`] counts them.
    pub const ALL: [Mode; 4] = [Mode::Sync, Mode::Durable, Mode::Async, Mode::Sampled];

    /// The spelling used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Durable => "durable",
            Mode::Async => "async",
            Mode::Sampled => "sampled",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Mode::Sync => 0,
            Mode::Durable => 1,
            Mode::Async => 2,
            Mode::Sampled => 3,
        }
    }

    /// True for the modes that write to the local WAL.
    pub fn uses_wal(self) -> bool {
        self != Mode::Sync
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode name that is none of sync, durable, async, sampled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: use sync, durable, async or sampled")]
pub struct ParseModeError(pub String);

impl FromStr for Mode {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Mode, ParseModeError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sync" => Ok(Mode::Sync),
            "durable" => Ok(Mode::Durable),
            "async" => Ok(Mode::Async),
            "sampled" => Ok(Mode::Sampled),
            _ => Err(ParseModeError(s.to_string())),
        }
    }
}
