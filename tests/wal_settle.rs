//! Settling beside a writer that restarts: a reader that settles an idle stream
//! (the loader does every 2 s while no writer holds it) must never make a
//! writer's open fail, while a second live writer is still refused at once.
//!
//! The first test settles every millisecond from a thread, so that the two
//! meet on many restarts. The same beside the real loader is
//! tests/wal_settle_loader.rs, in a test binary of its own: starting PostgreSQL
//! forks, and a child forked while a writer here holds `LOCK` keeps that lock's
//! file description until it execs, which a writer restarting meanwhile meets
//! as `StreamLocked`. No test in this binary may start processes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditwal::wal::settle::{settle_idle_stream, Settled};
use auditwal::wal::{WalConfig, WalError, WalWriter, MIN_SEGMENT_SIZE};
use auditwal::AuditEvent;

fn config(dir: &Path) -> WalConfig {
    WalConfig::new(dir, "s")
        .with_segment_size(4 * MIN_SEGMENT_SIZE)
        .with_fsync_interval(Duration::from_millis(5))
}

/// Settles `dir/s` every millisecond until `stop` (the loader does every 2 s);
/// returns how many settles found the stream idle (so really held its lock).
fn settle_until(dir: &Path, stop: &AtomicBool) -> u64 {
    let mut idle = 0;
    while !stop.load(Ordering::Relaxed) {
        match settle_idle_stream(dir, "s").expect("settle") {
            Settled::Idle { .. } => idle += 1,
            Settled::WriterActive => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    idle
}

#[test]
fn a_writer_restarting_in_a_loop_beside_a_settling_reader_never_meets_stream_locked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    WalWriter::open(config(&dir))
        .and_then(|w| w.close())
        .expect("create the stream");
    let stop = Arc::new(AtomicBool::new(false));
    let settler = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || settle_until(&dir, &stop))
    };
    let mut appended = 0u64;
    for restart in 0..200u64 {
        let wal = match WalWriter::open(config(&dir)) {
            Ok(wal) => wal,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                let _ = settler.join();
                panic!("restart {restart}: open failed beside a settling reader: {e}");
            }
        };
        for i in 0..5 {
            wal.append(&AuditEvent::new(format!("a.{restart}.{i}")))
                .expect("append");
            appended += 1;
        }
        wal.close().expect("close");
        // A restart takes a moment: the settler gets the idle stream.
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let idle_settles = settler.join().expect("settler thread");
    assert!(
        idle_settles > 0,
        "the reader never settled the idle stream: the test did not exercise the race"
    );
    // Nothing was lost or doubled on the way: every event is there once, LSNs
    // gapless.
    let wal = WalWriter::open(config(&dir)).expect("final open");
    let events = wal.recovery().last_lsn;
    wal.close().expect("close");
    let mut reader =
        auditwal::wal::StreamReader::open(&dir.join("s"), 1, auditwal::wal::Follow::AtRest);
    let mut got = 0u64;
    let mut last = 0;
    while let Some(item) = reader.next_item(None).expect("read") {
        if let auditwal::wal::ReadItem::Event { lsn, .. } = item {
            assert!(lsn > last, "LSNs in order");
            last = lsn;
            got += 1;
        }
    }
    assert_eq!(got, appended, "events read back (last LSN {events})");
}

#[test]
fn a_second_live_writer_is_still_refused_at_once_while_a_reader_settles() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let first = WalWriter::open(config(&dir)).expect("open");
    let stop = Arc::new(AtomicBool::new(false));
    let settler = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || settle_until(&dir, &stop))
    };
    for _ in 0..20 {
        let started = Instant::now();
        match WalWriter::open(config(&dir)) {
            Err(WalError::StreamLocked { path, .. }) => {
                assert_eq!(path, dir.join("s").join("LOCK"))
            }
            other => panic!("expected StreamLocked, got {other:?}"),
        }
        // Not after the wait for a settle (seconds): the lock is a writer's.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused after {:?}",
            started.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        settler.join().expect("settler"),
        0,
        "a live writer's stream is never settled"
    );
    first.close().expect("close");
}
