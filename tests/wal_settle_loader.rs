//! A writer that restarts in a loop beside the real `auditwal load` (which
//! settles the stream whenever it finds it idle) against a real PostgreSQL:
//! every open succeeds and every event arrives once. Apart from
//! tests/wal_settle.rs because this one starts processes (see there).

use auditwal_test_support as common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditwal::wal::{WalConfig, WalWriter, MIN_SEGMENT_SIZE};
use auditwal::AuditEvent;
use common::{ChildGuard, TestDb};

fn config(dir: &Path) -> WalConfig {
    WalConfig::new(dir, "s")
        .with_segment_size(4 * MIN_SEGMENT_SIZE)
        .with_fsync_interval(Duration::from_millis(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_restarting_beside_the_real_loader_loads_every_event_once() {
    let db = TestDb::new().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    WalWriter::open(config(&dir))
        .and_then(|w| w.close())
        .expect("create the stream");
    let _loader = ChildGuard::new(common::spawn_loader(&dir, db.url(), 1000));
    let restarts = Arc::new(AtomicU64::new(0));
    let writer = {
        let (dir, restarts) = (dir.clone(), restarts.clone());
        tokio::task::spawn_blocking(move || -> Result<Vec<uuid::Uuid>, String> {
            let mut ids = Vec::new();
            let until = Instant::now() + Duration::from_secs(12);
            while Instant::now() < until {
                let n = restarts.fetch_add(1, Ordering::Relaxed);
                let wal = WalWriter::open(config(&dir))
                    .map_err(|e| format!("restart {n}: open failed beside the loader: {e}"))?;
                for i in 0..5 {
                    let e = AuditEvent::new(format!("a.{n}.{i}"));
                    wal.append(&e).map_err(|e| e.to_string())?;
                    ids.push(e.event_id);
                }
                wal.close().map_err(|e| e.to_string())?;
                // The service is down for a moment between two runs, long
                // enough for the loader to find the stream idle and settle it.
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(ids)
        })
    };
    let ids = writer
        .await
        .expect("writer task")
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.count().await < ids.len() as i64 {
        assert!(Instant::now() < deadline, "the loader did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::assert_exactly(&db, &ids).await;
    assert!(restarts.load(Ordering::Relaxed) > 50);
}
