//! The flusher thread: the only place records become durable.
//!
//! Every `fsync_interval`, or at once when a durable waiter wants an LSN beyond
//! the watermark (and the previous round is done), it runs one sync round
//! (`Inner::sync_round`: fdatasync the segments written since the last round,
//! fsync the directory after a rotation, publish the durable LSN, rewrite the
//! `durable.lsn` sidecar). Waiters that arrive during a round are served by the
//! next one, which starts as soon as this one ends: one fdatasync covers every
//! record written before it began (group commit, with no timer window, so a
//! lone durable append waits for one fsync and nothing else).
//!
//! A failed round is not retried: after a failed fsync the kernel may have
//! dropped the dirty pages and marked them clean, so a retry could "succeed"
//! without the data. The writer is poisoned and the thread ends.

use std::time::Instant;

use super::writer::Inner;

/// The thread body; returns after the final round once shutdown is requested,
/// or after a failed round.
pub(crate) fn run(inner: &Inner) {
    let interval = inner.config.fsync_interval;
    let mut last_round = Instant::now();
    loop {
        let shutdown = inner.durability.flusher_wait(last_round, interval);
        last_round = Instant::now();
        if let Err(failure) = inner.sync_round() {
            inner.poison(failure);
            return;
        }
        if shutdown {
            return;
        }
    }
}
