//! Crash safety with a real process: `auditwal emit` appends events fed on its
//! stdin and prints each event_id after its append returned; the test SIGKILLs
//! it at a random moment, then checks that every acknowledged event is in the
//! WAL, intact and in order, and that a new writer recovers the stream and
//! continues the LSN sequence. Small segments make kills land during rotations
//! too. Repeated many times with random timing; the seed is printed on failure.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auditwal::wal::format::{self, RecordKind, ScanItem};
use auditwal::wal::{payload, Lsn, WalConfig, WalWriter};
use auditwal::{AuditEvent, DEFAULT_MAX_EVENT_BYTES};
use rand::{Rng, SeedableRng};

const SEGMENT_SIZE: u64 = 64 * 1024;
const EVENTS_PER_RUN: usize = 4000;

/// The JSON lines fed to the child, and the events they parse to.
fn make_input(run: u64) -> (Vec<String>, Vec<AuditEvent>) {
    let base = chrono::DateTime::from_timestamp(1_790_000_000, 0).expect("time");
    let mut lines = Vec::new();
    let mut events = Vec::new();
    for i in 0..EVENTS_PER_RUN as u64 {
        let id = uuid::Uuid::now_v7();
        let at = base + chrono::Duration::microseconds((run * 1_000_000 + i) as i64);
        let line = serde_json::json!({
            "event_id": id.to_string(),
            "occurred_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "action": "url.created",
            "actor_type": "user",
            "actor_id": format!("user-{i}"),
            "target_type": "url",
            "target_id": format!("t-{run}-{i}"),
            "tenant_id": "tenant-1",
            "outcome": "success",
            "ip": "192.0.2.7",
            "user_agent": "crash-test/1.0 (x86_64)",
            "request_id": format!("req-{run}-{i}"),
            "metadata": {"seq": i, "note": "the quick brown fox jumps over the lazy dog"},
        })
        .to_string();
        events.push(AuditEvent::from_json(&line, DEFAULT_MAX_EVENT_BYTES).expect("valid event"));
        lines.push(line);
    }
    (lines, events)
}

/// Events and the last LSN on disk, read with the pure scanner. A torn tail is
/// allowed only at the very end of the last segment.
fn read_back(stream_dir: &Path) -> (Vec<(Lsn, AuditEvent)>, Lsn) {
    let paths: Vec<PathBuf> = auditwal::wal::list_segments(stream_dir)
        .expect("list")
        .into_iter()
        .map(|s| s.path)
        .collect();
    let mut events = Vec::new();
    let mut last_lsn = 0;
    for (i, path) in paths.iter().enumerate() {
        let bytes = fs::read(path).expect("read segment");
        for item in format::scan_segment(&bytes) {
            match item {
                ScanItem::Record { record, .. } => {
                    assert_eq!(
                        record.lsn,
                        last_lsn + 1,
                        "gapless LSNs in {}",
                        path.display()
                    );
                    last_lsn = record.lsn;
                    if record.kind == RecordKind::Event {
                        let e = payload::decode_event(record.payload).expect("payload decodes");
                        events.push((record.lsn, e.event));
                    }
                }
                ScanItem::EndOfData { .. } | ScanItem::Sealed { .. } => {}
                ScanItem::TornTail { .. } if i + 1 == paths.len() => {}
                other => panic!("unexpected damage in {}: {other:?}", path.display()),
            }
        }
    }
    (events, last_lsn)
}

/// When to kill the child.
#[derive(Debug, Clone, Copy)]
struct KillPoint {
    /// Once this many events were acknowledged (or after a 10 s guard) ...
    after_acks: usize,
    /// ... and then this much later.
    delay: Duration,
}

/// One run: start the child, feed it, kill it at `kill`, verify.
/// Returns how many events were acknowledged before the kill.
fn crash_once(seed: u64, run: u64, durable: bool, kill: KillPoint) -> usize {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal_dir = tmp.path().join("wal");
    let (lines, sent) = make_input(run);
    let stderr_path = tmp.path().join("stderr.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_auditwal"))
        .args(["emit", "--wal-dir"])
        .arg(&wal_dir)
        .args(["--mode", if durable { "durable" } else { "async" }])
        .args(["--stream", "s1"])
        .env("AUDITWAL_WAL_SEGMENT_SIZE", SEGMENT_SIZE.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", env!("CARGO_BIN_EXE_auditwal")));
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let feeder = std::thread::spawn(move || {
        for line in lines {
            // The child dies mid-stream: a broken pipe ends the feeding.
            if writeln!(stdin, "{line}").is_err() {
                return;
            }
        }
    });
    let acks = Arc::new(Mutex::new(Vec::<String>::new()));
    let acks_reader = {
        let acks = acks.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => acks.lock().expect("acks").push(l),
                    Err(_) => return,
                }
            }
        })
    };
    let guard = Instant::now() + Duration::from_secs(10);
    while acks.lock().expect("acks").len() < kill.after_acks && Instant::now() < guard {
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(kill.delay);
    // Child::kill sends SIGKILL.
    let _ = child.kill();
    let status = child.wait().expect("wait child");
    feeder.join().expect("feeder");
    acks_reader.join().expect("acks reader");
    let acks = acks.lock().expect("acks").clone();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let ctx = format!(
        "seed {seed} run {run} durable {durable} kill at {kill:?}: {} acks, child {status}, stderr:\n{stderr}",
        acks.len()
    );

    // Acknowledgements come in input order: a prefix of what was sent.
    for (i, id) in acks.iter().enumerate() {
        assert_eq!(
            id,
            &sent[i].event_id.to_string(),
            "ack {i} out of order; {ctx}"
        );
    }
    let stream_dir = wal_dir.join("s1");
    if !stream_dir.exists() {
        assert!(acks.is_empty(), "acks without a stream; {ctx}");
        return 0;
    }
    let (on_disk, last_lsn) = read_back(&stream_dir);
    // Every acknowledged event is there, intact, in order; what follows them on
    // disk (appended, not yet acknowledged) continues the sent sequence.
    assert!(
        on_disk.len() >= acks.len(),
        "acknowledged events lost; {ctx}"
    );
    for (i, (_, event)) in on_disk.iter().enumerate() {
        assert_eq!(
            event, &sent[i],
            "event {i} differs from what was sent; {ctx}"
        );
    }
    if durable {
        // Durable acks come after the fsync, and the sidecar is written before
        // waiters are released: it covers every acknowledged event.
        if let Some(last_acked) = acks.len().checked_sub(1) {
            let sidecar = fs::read(stream_dir.join("durable.lsn")).expect("sidecar");
            let durable_lsn = format::decode_durable_lsn(&sidecar).expect("sidecar decodes");
            assert!(
                durable_lsn >= on_disk[last_acked].0,
                "durable.lsn {durable_lsn} behind acknowledged LSN {}; {ctx}",
                on_disk[last_acked].0
            );
        }
    }

    // A new writer recovers and continues right after the last record on disk.
    // When recovery resumed a segment too full for this record, the append first
    // seals it: the end-of-segment record takes last + 1 and the event last + 2
    // (read_back below checks the LSNs stay gapless either way).
    let cfg = WalConfig::new(&wal_dir, "s1").with_segment_size(SEGMENT_SIZE);
    let wal = WalWriter::open(cfg).unwrap_or_else(|e| panic!("reopen: {e}; {ctx}"));
    let resumed = wal.recovery().resumed_segment.is_some();
    let lsn = wal.append(&sent[0]).expect("append after recovery");
    let sealed_first = resumed && wal.stats().rotations > 0;
    let expected = last_lsn + if sealed_first { 2 } else { 1 };
    assert_eq!(lsn, expected, "LSNs continue after recovery; {ctx}");
    wal.close().expect("close");
    drop(wal);
    let (again, _) = read_back(&stream_dir);
    assert_eq!(again.len(), on_disk.len() + 1, "{ctx}");
    assert_eq!(again.last().expect("event").0, lsn, "{ctx}");
    acks.len()
}

fn crash_many(durable: bool, runs: u64) {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut mid_stream = 0;
    let mut acked = Vec::new();
    for run in 0..runs {
        // Anywhere from "before the first append" to "near the end", plus up to
        // 2 ms of jitter so the kill lands at an arbitrary instruction: mid-copy,
        // mid-rotation, mid-fsync.
        let kill = KillPoint {
            after_acks: if run % 8 == 0 {
                0
            } else {
                rng.gen_range(0..EVENTS_PER_RUN * 3 / 4)
            },
            delay: Duration::from_micros(rng.gen_range(0..2_000)),
        };
        let acks = crash_once(seed, run, durable, kill);
        if acks > 0 && acks < EVENTS_PER_RUN {
            mid_stream += 1;
        }
        acked.push(acks);
    }
    eprintln!(
        "{runs} crash runs (durable: {durable}, seed {seed}) in {:?}; acks per run: {acked:?}",
        started.elapsed()
    );
    // The test means something only if kills land while events flow.
    assert!(
        mid_stream * 2 >= runs,
        "only {mid_stream} of {runs} kills landed mid-stream: {acked:?}"
    );
}

#[test]
fn acknowledged_async_appends_survive_sigkill_and_appends_resume_after_recovery() {
    crash_many(false, 40);
}

#[test]
fn acknowledged_durable_appends_survive_sigkill_and_are_covered_by_the_watermark() {
    crash_many(true, 20);
}
