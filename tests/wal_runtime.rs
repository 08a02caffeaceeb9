//! The WAL from async code: an append that needs a new segment must leave the
//! runtime thread free for other tasks, and opening a stream must not leave its
//! first append (or its log) a rotation stall.
//!
//! The runtime-thread tests are deterministic, not timed: on a current-thread
//! runtime a second task can only run while the first one's call is
//! suspended, so "the other task saw the call in progress" means the call gave
//! the thread back instead of holding it through the rotation.

use std::cell::Cell;
use std::rc::Rc;

use auditwal::wal::{WalConfig, WalWriter, MIN_SEGMENT_SIZE};
use auditwal::{AuditEvent, AuditLog, Config};

/// A ~200-byte event; `i` makes it unique.
fn event(i: u64) -> AuditEvent {
    AuditEvent::new("url.created")
        .actor("user", format!("user-{i}"))
        .target("url", format!("u{i}"))
        .request_id(format!("req-{i}-{}", "x".repeat(100)))
}

/// How often a ticker task on the same current-thread runtime ran while a call
/// of `appender` was in progress, and how many calls were made.
///
/// `call(i)` is awaited for `i` in `0..n`; between calls the appender yields,
/// so the ticker runs between calls in any case. Only a call that suspends
/// itself lets the ticker see `in_call` set.
async fn ticks_during_calls<F, Fut>(n: u64, call: F) -> u64
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let in_call = Rc::new(Cell::new(false));
    let done = Rc::new(Cell::new(false));
    let seen = Rc::new(Cell::new(0u64));
    let local = tokio::task::LocalSet::new();
    let ticker = {
        let (in_call, done, seen) = (in_call.clone(), done.clone(), seen.clone());
        local.spawn_local(async move {
            while !done.get() {
                if in_call.get() {
                    seen.set(seen.get() + 1);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    local
        .run_until(async {
            for i in 0..n {
                in_call.set(true);
                call(i).await;
                in_call.set(false);
                tokio::task::yield_now().await;
            }
            done.set(true);
            ticker.await.expect("ticker");
        })
        .await;
    seen.get()
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
    // ~200-byte records in 64 KiB segments: a rotation every ~300 records.
    let seen = ticks_during_calls(3_000, |i| {
        let log = log.clone();
        async move {
            log.record(&event(i)).await.expect("record");
        }
    })
    .await;
    let rotations = log.stats().wal.expect("wal").rotations;
    log.close().await.expect("close");
    assert!(
        rotations >= 5,
        "the test must rotate: {rotations} rotations"
    );
    assert!(
        seen > 0,
        "{rotations} rotations, and no record call ever let another task run: each \
         rotation held the runtime thread"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_async_append_waiting_for_a_segment_created_inline_gives_the_runtime_thread_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No preparer: every rotation creates its segment during the append.
    let wal = WalWriter::open(
        WalConfig::new(tmp.path(), "s")
            .with_segment_size(4 * MIN_SEGMENT_SIZE)
            .with_prepare_next_segment(false),
    )
    .expect("open");
    let wal = std::sync::Arc::new(wal);
    let seen = ticks_during_calls(5_000, |i| {
        let wal = wal.clone();
        async move {
            wal.append_async(&event(i)).await.expect("append");
        }
    })
    .await;
    let stats = wal.stats();
    wal.close().expect("close");
    assert!(stats.rotations >= 3, "the test must rotate: {stats:?}");
    assert_eq!(stats.written_lsn, 5_000 + stats.rotations - 1, "{stats:?}");
    assert!(
        seen > 0,
        "{} rotations, each creating a segment, and the runtime thread was never free meanwhile",
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
