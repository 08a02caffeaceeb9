//! The stream's disk budget: may one more segment be created?
//!
//! The budget bounds the bytes of the stream's segment files (`*.seg` and the
//! spare `*.seg.tmp`, all preallocated to their full size). It is checked when a
//! segment is about to be created (rotation, the background spare, open), never
//! on the append path. Usage is read from the directory each time because space
//! is freed by someone else: the loader deletes segments it has committed.
//! A full file system (fallocate failing with ENOSPC) is the same situation from
//! the writer's point of view and goes through the same policy.
//!
//! This module decides "room or no room"; what an append does about "no room"
//! ([`FullDiskPolicy`](super::FullDiskPolicy)) is the writer's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::error::WalError;
use super::stream_dir::StreamDir;

/// Why there is no room for another segment.
#[derive(Debug, Clone)]
pub(crate) enum NoRoom {
    /// The segment files would exceed the budget.
    Budget { used: u64, budget: u64 },
    /// The file system refused the preallocation.
    Disk {
        path: PathBuf,
        needed: u64,
        source: Arc<std::io::Error>,
    },
}

impl NoRoom {
    /// The error an append gets after waiting `waited` in vain.
    pub(crate) fn into_error(self, stream: &str, waited: Duration) -> WalError {
        match self {
            NoRoom::Budget { used, budget } => WalError::DiskBudgetExceeded {
                stream: stream.to_string(),
                used,
                budget,
                waited,
            },
            NoRoom::Disk {
                path,
                needed,
                source,
            } => WalError::DiskFull {
                stream: stream.to_string(),
                path,
                needed,
                waited,
                source,
            },
        }
    }
}

/// The budget of one stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DiskBudget {
    pub limit: u64,
    pub segment_size: u64,
}

impl DiskBudget {
    /// Checks that one more segment of `segment_size` bytes fits.
    pub(crate) fn check_new_segment(
        &self,
        dir: &StreamDir,
    ) -> Result<Result<(), NoRoom>, WalError> {
        let used = dir.usage_bytes()?;
        if used.saturating_add(self.segment_size) > self.limit {
            return Ok(Err(NoRoom::Budget {
                used,
                budget: self.limit,
            }));
        }
        Ok(Ok(()))
    }

    /// At open: warns when the budget is already exceeded or when the file
    /// system cannot hold the rest of the budget (then the disk, not the budget,
    /// is what will stop the stream, with ENOSPC at a rotation).
    pub(crate) fn report_at_open(&self, dir: &StreamDir) -> Result<(), WalError> {
        let used = dir.usage_bytes()?;
        let free = dir.free_bytes()?;
        if used > self.limit {
            tracing::warn!(
                stream = dir.name(),
                used,
                budget = self.limit,
                "stream is over its disk budget; new segments wait for the loader to free space"
            );
        } else if free < self.limit - used {
            tracing::warn!(
                stream = dir.name(),
                free,
                budget_left = self.limit - used,
                "the file system has less free space than the stream's remaining disk budget"
            );
        }
        if free < self.segment_size {
            tracing::warn!(
                stream = dir.name(),
                free,
                segment_size = self.segment_size,
                "not enough free space for another segment"
            );
        }
        Ok(())
    }
}
