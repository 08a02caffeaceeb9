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
//! This module decides "room or no room", and, under [`FullDiskPolicy::Block`],
//! how long an append keeps waiting for room ([`BlockWait`]): the one rule for
//! both places that wait, the writer (a thread asleep) and the audit log (a
//! task asleep). Refusing or dropping an event under the other policies is the
//! writer's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::FullDiskPolicy;
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

/// How often an append waiting for disk budget (policy `Block`) tries again:
/// space is freed by the loader deleting a segment, which no event announces.
const BLOCK_POLL: Duration = Duration::from_millis(10);

/// The `Block` policy for one append that finds no room: try again after a
/// short sleep until `timeout` has passed since the first time it found none,
/// then give up. The caller does the sleeping, in whatever way suits it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockWait {
    timeout: Duration,
    since: Option<Instant>,
}

/// What [`BlockWait::next`] says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockStep {
    /// Sleep this long, then try the append again.
    Sleep(Duration),
    /// The timeout has passed: fail the append, saying how long it waited.
    GiveUp { waited: Duration },
}

impl BlockWait {
    /// The wait `policy` asks of an append that finds no room: `None` unless
    /// it is `Block`.
    pub(crate) fn for_policy(policy: FullDiskPolicy) -> Option<BlockWait> {
        match policy {
            FullDiskPolicy::Block { timeout } => Some(BlockWait {
                timeout,
                since: None,
            }),
            FullDiskPolicy::DropNewest | FullDiskPolicy::Fail => None,
        }
    }

    /// True until the first [`next`](Self::next): the append has not waited yet.
    pub(crate) fn is_first(&self) -> bool {
        self.since.is_none()
    }

    /// The append just found no room again: sleep or give up. The wait starts
    /// at the first call.
    pub(crate) fn next(&mut self) -> BlockStep {
        let since = *self.since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if waited >= self.timeout {
            return BlockStep::GiveUp { waited };
        }
        BlockStep::Sleep(BLOCK_POLL.min(self.timeout - waited))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_wait_sleeps_in_short_steps_until_its_timeout_then_gives_up() {
        let policy = FullDiskPolicy::Block {
            timeout: Duration::from_millis(30),
        };
        let mut wait = BlockWait::for_policy(policy).expect("Block waits");
        assert!(wait.is_first());
        match wait.next() {
            BlockStep::Sleep(pause) => assert!(pause <= BLOCK_POLL, "{pause:?}"),
            other => panic!("expected a sleep, got {other:?}"),
        }
        assert!(!wait.is_first());
        std::thread::sleep(Duration::from_millis(40));
        match wait.next() {
            BlockStep::GiveUp { waited } => assert!(waited >= Duration::from_millis(30)),
            other => panic!("expected to give up, got {other:?}"),
        }
    }

    #[test]
    fn only_the_block_policy_waits() {
        assert!(BlockWait::for_policy(FullDiskPolicy::Fail).is_none());
        assert!(BlockWait::for_policy(FullDiskPolicy::DropNewest).is_none());
        let zero = FullDiskPolicy::Block {
            timeout: Duration::ZERO,
        };
        let mut wait = BlockWait::for_policy(zero).expect("Block waits");
        assert!(matches!(wait.next(), BlockStep::GiveUp { .. }));
    }
}
