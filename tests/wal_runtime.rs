//! The WAL from async code: an append that needs a new segment must leave the
//! runtime thread free for other tasks, and opening a stream must not leave its
//! first append (or its log) a rotation stall.
//!
//! The runtime-thread tests are not timed: they count how often a call
//! returned `Pending` to the runtime. A call that never does holds the thread
//! from its first poll to its end; one that does gave the thread back to other
//! tasks while it waited. A rotation handed to the blocking pool can finish
//! before its caller first looks (on a busy machine the pool's thread may run
//! first), so not every rotation shows; over ~40 rotations, none showing means
//! they ran on the runtime thread.

use std::cell::Cell;
use std::future::Future;

use auditwal::wal::{WalConfig, WalWriter, MIN_SEGMENT_SIZE};
use auditwal::{AuditEvent, AuditLog, Config};

/// A ~200-byte event; `i` makes it unique.
fn event(i: u64) -> AuditEvent {
    AuditEvent::new("url.created")
        .actor("user", format!("user-{i}"))
        .target("url", format!("u{i}"))
        .request_id(format!("req-{i}-{}", "x".repeat(100)))
}

/// Awaits `call(i)` for `i` in `0..n`; returns how many times in all the
/// calls returned `Pending` (gave the runtime thread back).
async fn pending_polls<F, Fut>(n: u64, call: F) -> u64
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let pending = Cell::new(0u64);
    for i in 0..n {
        let mut fut = std::pin::pin!(call(i));
        std::future::poll_fn(|cx| {
            let poll = fut.as_mut().poll(cx);
            if poll.is_pending() {
                pending.set(pending.get() + 1);
            }
            poll
        })
        .await;
    }
    pending.get()
}

#[tokio::test(flavor = "current_thread")]
async fn an_audit_log_record_that_needs_a_new_segment_gives_the_runtime_thread_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = Config::builder()
        .wal_dir(tmp.path())
        .stream("s")
        .segment_size(MIN_SEGMENT_SIZE)
        .max_event_bytes(4096)
        .build()
        .expect("config");
    let log = AuditLog::open(config).await.expect("open");
    // ~250-byte records in 64 KiB segments: a rotation every ~250 records.
    let pending = pending_polls(10_000, |i| {
        let log = log.clone();
        async move {
            log.record(&event(i)).await.expect("record");
        }
    })
    .await;
    let rotations = log.stats().wal.expect("wal").rotations;
    log.close().await.expect("close");
    assert!(
        rotations >= 20,
        "the test must rotate: {rotations} rotations"
    );
    assert!(
        pending > 0,
        "{rotations} rotations, and record calls returned Pending {pending} times: \
         rotations held the runtime thread"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_async_append_waiting_for_a_segment_created_inline_gives_the_runtime_thread_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No preparer: every rotation creates its segment during the append.
    let wal = WalWriter::open(
        WalConfig::new(tmp.path(), "s")
            .with_segment_size(MIN_SEGMENT_SIZE)
            .with_prepare_next_segment(false),
    )
    .expect("open");
    let wal = std::sync::Arc::new(wal);
    let pending = pending_polls(10_000, |i| {
        let wal = wal.clone();
        async move {
            wal.append_async(&event(i)).await.expect("append");
        }
    })
    .await;
    let stats = wal.stats();
    wal.close().expect("close");
    assert!(stats.rotations >= 20, "the test must rotate: {stats:?}");
    assert_eq!(stats.written_lsn, 10_000 + stats.rotations - 1, "{stats:?}");
    assert!(
        pending > 0,
        "{} rotations, each creating a segment, and append calls returned Pending {pending} \
         times: rotations held the runtime thread",
        stats.rotations
    );
}

#[test]
fn opening_a_new_stream_prepares_its_first_segment_without_a_rotation_stall() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Large enough that creating the segment (fallocate + zero fill) takes well
    // over the 20 ms a rotation may stall appends before it is reported.
    let wal = WalWriter::open(WalConfig::new(tmp.path(), "s").with_segment_size(128 << 20))
        .expect("open");
    let lsn = wal.append(&event(1)).expect("first append");
    assert_eq!(lsn, 1);
    let stats = wal.stats();
    wal.close().expect("close");
    assert_eq!(stats.rotations, 1, "the first segment: {stats:?}");
    assert_eq!(
        stats.slow_rotations, 0,
        "opening a stream reported a slow rotation (a WARN line in every emit): {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_appending_across_rotations_get_every_lsn_once_in_file_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal = std::sync::Arc::new(
        WalWriter::open(WalConfig::new(tmp.path(), "s").with_segment_size(MIN_SEGMENT_SIZE))
            .expect("open"),
    );
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let wal = wal.clone();
            tokio::spawn(async move {
                let mut lsns = Vec::new();
                for i in 0..300 {
                    lsns.push(
                        wal.append_async(&event(t * 1000 + i))
                            .await
                            .expect("append"),
                    );
                }
                lsns
            })
        })
        .collect();
    let mut lsns = Vec::new();
    for t in tasks {
        let mine = t.await.expect("task");
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "a task's LSNs rise");
        lsns.extend(mine);
    }
    let stats = wal.stats();
    wal.close().expect("close");
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns.len(), 64 * 300, "every append got its own LSN");
    // Read back: each event LSN once, in file order; the gaps are exactly the
    // EndOfSegment records.
    let mut reader =
        auditwal::wal::StreamReader::open(&tmp.path().join("s"), 1, auditwal::wal::Follow::AtRest);
    let mut read = Vec::new();
    while let Some(item) = reader.next_item(None).expect("read") {
        if let auditwal::wal::ReadItem::Event { lsn, .. } = item {
            read.push(lsn);
        }
    }
    assert_eq!(read, lsns);
    assert!(stats.rotations >= 20, "{stats:?}");
    assert_eq!(
        stats.written_lsn,
        64 * 300 + stats.rotations - 1,
        "{stats:?}"
    );
}
