//! The writer's settings, their defaults in one place, and their validation.
//!
//! [`WalConfig`] is plain data: where the stream lives, how big a segment is, how
//! often the flusher fsyncs, how much disk the stream may use and what an append
//! does when that budget is reached ([`FullDiskPolicy`]). It is validated once,
//! when the writer opens, with errors that name the setting. Reading these values
//! from a file or the environment is the application config's job, not this one's.

use std::path::PathBuf;
use std::time::Duration;

use super::error::WalError;

/// Default segment size: 64 MiB. Big enough that rotation (one fdatasync and one
/// rename, about once per 200,000 events of 300 bytes) is rare; small enough that a
/// loader frees disk in useful steps.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
/// Smallest accepted segment size (tests use small segments to rotate often).
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// Largest accepted segment size; the whole segment is mapped into memory.
pub const MAX_SEGMENT_SIZE: u64 = 1024 * 1024 * 1024;
/// Default flusher cadence: what async mode can lose on power loss.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Default disk budget for one stream: 4 GiB, about 12 million 300-byte events,
/// hours of backlog for a busy edge host whose database link is down.
pub const DEFAULT_DISK_BUDGET: u64 = 4 * 1024 * 1024 * 1024;
/// Default time an append waits for a reader to free a segment under
/// [`FullDiskPolicy::Block`].
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// Default events between two signed checkpoints, at most.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 10_000;
/// Default longest time a new event waits for a signed checkpoint to cover it:
/// what a cut of the table's newest rows can hide from an auditor who holds
/// only the table's checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// What an append does when a new segment is needed and the stream's disk budget
/// (or the disk) has no room for it.
///
/// The default is `Block` with `DEFAULT_BLOCK_TIMEOUT`: an audit log must not
/// drop events silently, and a loader that is catching up usually frees a segment
/// within moments, so a short wait turns most full-disk moments into latency
/// rather than errors; after the timeout the caller gets
/// [`WalError::DiskBudgetExceeded`] (or [`WalError::DiskFull`]) and decides
/// (fall back to sync mode, refuse the request). `Fail` gives that error at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullDiskPolicy {
    /// Wait up to `timeout` for space, then fail the append with an error.
    /// The calling thread sleeps while it waits: from async code, call the
    /// append through `spawn_blocking` if the policy can block for long.
    Block { timeout: Duration },
    /// Do not write the event: the append returns [`WalError::EventDropped`] and
    /// the writer's `dropped_events` counter goes up. For streams where losing
    /// the newest events is preferable to waiting (e.g. sampled debug audit).
    DropNewest,
    /// Fail the append at once with [`WalError::DiskBudgetExceeded`] or
    /// [`WalError::DiskFull`].
    Fail,
}

impl Default for FullDiskPolicy {
    fn default() -> Self {
        FullDiskPolicy::Block {
            timeout: DEFAULT_BLOCK_TIMEOUT,
        }
    }
}

/// Settings of one stream's writer. Build with [`WalConfig::new`] and the
/// `with_*` methods; every field has a default but the directory and stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WalConfig {
    /// The WAL directory; the stream lives in `dir/<stream>/`.
    pub dir: PathBuf,
    /// The stream name: 1..=32 bytes of `[A-Za-z0-9._-]`, not starting with '.'.
    pub stream: String,
    /// Size of each segment file, preallocated in full (a multiple of 8).
    pub segment_size: u64,
    /// How often the flusher fdatasyncs when no durable append is waiting.
    pub fsync_interval: Duration,
    /// Upper bound on the bytes of this stream's segment files (`*.seg` and the
    /// spare `*.seg.tmp`). At least two segments.
    pub disk_budget: u64,
    /// What an append does when the budget or the disk is full.
    pub full_disk_policy: FullDiskPolicy,
    /// Create the next segment in the background so that rotation does not wait
    /// for the fallocate. On by default; off makes rotation create it inline.
    pub prepare_next_segment: bool,
    /// Write zeros over each new segment (in page-sized writes) after the
    /// fallocate. On by default: fallocate leaves "unwritten" extents, and on
    /// ext4 every fdatasync then also writes their conversion, so durable
    /// appends are faster over written extents (docs/benchmarks.md,
    /// `bench wal`). It costs one
    /// extra write of each segment, done off the append path (by the spare
    /// preparer). Turn it off on copy-on-write file systems (btrfs, ZFS), where
    /// the zeros buy nothing.
    pub zero_fill_segments: bool,
    /// The Ed25519 private key file that signs the stream's hash chain
    /// (`chain`); `None` writes no checkpoints.
    pub chain_key: Option<PathBuf>,
    /// A checkpoint after at most this many events...
    pub checkpoint_every: u64,
    /// ...or once new events are this old, whichever comes first.
    pub checkpoint_interval: Duration,
}

impl WalConfig {
    /// Defaults for everything but where the stream lives.
    pub fn new(dir: impl Into<PathBuf>, stream: impl Into<String>) -> Self {
        WalConfig {
            dir: dir.into(),
            stream: stream.into(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            fsync_interval: DEFAULT_FSYNC_INTERVAL,
            disk_budget: DEFAULT_DISK_BUDGET,
            full_disk_policy: FullDiskPolicy::default(),
            prepare_next_segment: true,
            zero_fill_segments: true,
            chain_key: None,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        }
    }

    /// Signs the stream's hash chain with the key at `key` (none: no
    /// checkpoints), every `every` events or `interval`.
    pub fn with_chain(mut self, key: Option<PathBuf>, every: u64, interval: Duration) -> Self {
        self.chain_key = key;
        self.checkpoint_every = every;
        self.checkpoint_interval = interval;
        self
    }

    pub fn with_segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    pub fn with_fsync_interval(mut self, interval: Duration) -> Self {
        self.fsync_interval = interval;
        self
    }

    pub fn with_disk_budget(mut self, bytes: u64) -> Self {
        self.disk_budget = bytes;
        self
    }

    pub fn with_full_disk_policy(mut self, policy: FullDiskPolicy) -> Self {
        self.full_disk_policy = policy;
        self
    }

    pub fn with_prepare_next_segment(mut self, on: bool) -> Self {
        self.prepare_next_segment = on;
        self
    }

    pub fn with_zero_fill_segments(mut self, on: bool) -> Self {
        self.zero_fill_segments = on;
        self
    }

    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<(), WalError> {
        let bad = |setting, reason: String| Err(WalError::InvalidConfig { setting, reason });
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return bad(
                "segment_size",
                format!(
                    "{} bytes is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}",
                    self.segment_size
                ),
            );
        }
        if self.segment_size % 8 != 0 {
            return bad(
                "segment_size",
                format!("{} bytes is not a multiple of 8", self.segment_size),
            );
        }
        if self.fsync_interval < Duration::from_millis(1)
            || self.fsync_interval > Duration::from_secs(3600)
        {
            return bad(
                "fsync_interval",
                format!("{:?} is outside 1 ms ..= 1 h", self.fsync_interval),
            );
        }
        // One active segment plus the spare being prepared must fit.
        if self.disk_budget < 2 * self.segment_size {
            return bad(
                "disk_budget",
                format!(
                    "{} bytes is less than two segments ({} bytes)",
                    self.disk_budget,
                    2 * self.segment_size
                ),
            );
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "must be at least 1".into());
        }
        if let FullDiskPolicy::Block { timeout } = self.full_disk_policy {
            if timeout > Duration::from_secs(24 * 3600) {
                return bad(
                    "full_disk_policy",
                    format!("block timeout {timeout:?} is over a day"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_block_rather_than_drop() {
        let c = WalConfig::new("/tmp/x", "s");
        c.validate().expect("defaults validate");
        assert!(matches!(c.full_disk_policy, FullDiskPolicy::Block { .. }));
        assert_eq!(c.segment_size, 64 * 1024 * 1024);
        assert_eq!(c.fsync_interval, Duration::from_millis(100));
    }

    #[test]
    fn a_budget_below_two_segments_is_refused_by_name() {
        let c = WalConfig::new("/tmp/x", "s")
            .with_segment_size(1 << 20)
            .with_disk_budget(1 << 20);
        match c.validate() {
            Err(WalError::InvalidConfig { setting, .. }) => assert_eq!(setting, "disk_budget"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn an_unaligned_segment_size_is_refused() {
        let c = WalConfig::new("/tmp/x", "s").with_segment_size(MIN_SEGMENT_SIZE + 1);
        assert!(matches!(
            c.validate(),
            Err(WalError::InvalidConfig {
                setting: "segment_size",
                ..
            })
        ));
    }
}
