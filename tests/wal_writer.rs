//! The WAL writer against real files: round trip, rotation, recovery of every
//! truncation point, the one-writer lock, permissions, durable waits, and the
//! disk budget policies. Records are read back with the pure segment scanner
//! (`format::scan_segment` + `payload::decode_event`), independently of the
//! writer's own bookkeeping.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditwal::wal::format::{self, RecordKind, ScanItem};
use auditwal::wal::payload;
use auditwal::wal::{
    read_durable_lsn, Follow, FullDiskPolicy, Lsn, ReadItem, StreamReader, WalConfig, WalError,
    WalEvent, WalWriter,
};
use auditwal::{AuditEvent, Outcome};

const SMALL_SEGMENT: u64 = 64 * 1024;

/// A ~300-byte event with every field set; `i` makes it unique. Its timestamp
/// is whole microseconds, the WAL's resolution, so it compares equal after a
/// round trip.
fn full_event(i: u64) -> AuditEvent {
    let mut event = AuditEvent::new(format!("url.created.{i}"));
    event.occurred_at =
        chrono::DateTime::from_timestamp_micros(event.occurred_at.timestamp_micros())
            .expect("timestamp");
    event
        .actor("user", format!("user-{i}"))
        .target("url", format!("u{i}"))
        .target_name("my link")
        .tenant("tenant-7")
        .outcome(Outcome::Denied)
        .reason("quota")
        .ip("2001:db8::1".parse().expect("ip"))
        .user_agent("curl/8.0")
        .request_id(format!("req-{i}"))
        .before(&serde_json::json!({"n": i}))
        .expect("before")
        .after(&serde_json::json!({"n": i + 1, "tags": ["a", "b"]}))
        .expect("after")
        .metadata(&serde_json::json!({"k": "v"}))
        .expect("metadata")
}

/// A small event, so that a segment holds only a few hundred bytes of records.
fn small_event(i: u64) -> AuditEvent {
    AuditEvent::new(format!("a.{i}"))
}

fn config(dir: &Path) -> WalConfig {
    WalConfig::new(dir, "s1")
}

/// A record read back from disk.
#[derive(Debug, Clone)]
struct ReadRecord {
    lsn: Lsn,
    event: Option<WalEvent>,
}

fn segment_paths(stream_dir: &Path) -> Vec<PathBuf> {
    auditwal::wal::list_segments(stream_dir)
        .expect("list stream dir")
        .into_iter()
        .map(|s| s.path)
        .collect()
}

/// Every record of every segment, asserting the scan finds no damage.
fn read_stream(stream_dir: &Path) -> Vec<ReadRecord> {
    let mut out = Vec::new();
    for path in segment_paths(stream_dir) {
        let bytes = fs::read(&path).expect("read segment");
        for item in format::scan_segment(&bytes) {
            match item {
                ScanItem::Record { record, .. } => out.push(ReadRecord {
                    lsn: record.lsn,
                    event: (record.kind == RecordKind::Event)
                        .then(|| payload::decode_event(record.payload).expect("decode payload")),
                }),
                ScanItem::EndOfData { .. } | ScanItem::Sealed { .. } => {}
                other => panic!("damage in {}: {other:?}", path.display()),
            }
        }
    }
    out
}

fn events_of(records: &[ReadRecord]) -> Vec<(Lsn, WalEvent)> {
    records
        .iter()
        .filter_map(|r| r.event.clone().map(|e| (r.lsn, e)))
        .collect()
}

fn assert_gapless(records: &[ReadRecord]) {
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r.lsn,
            i as u64 + 1,
            "LSNs must run 1, 2, 3, ... without gaps"
        );
    }
}

#[test]
fn appended_events_read_back_with_every_field_in_lsn_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal = WalWriter::open(config(tmp.path())).expect("open");
    let mut sent = Vec::new();
    for i in 0..200u64 {
        let event = full_event(i);
        let rate = if i % 2 == 0 { 1.0 } else { 0.25 };
        let lsn = wal.append_with_rate(&event, rate).expect("append");
        assert_eq!(lsn, i + 1);
        sent.push((event, rate));
    }
    assert_eq!(wal.written_lsn(), 200);
    wal.close().expect("close");
    assert_eq!(wal.durable_lsn(), 200, "close fsyncs everything written");

    let records = read_stream(&tmp.path().join("s1"));
    assert_gapless(&records);
    let events = events_of(&records);
    assert_eq!(events.len(), sent.len());
    for ((_, got), (event, rate)) in events.iter().zip(&sent) {
        assert_eq!(&got.event, event);
        assert_eq!(got.sample_rate, *rate);
    }
}

#[test]
fn a_live_reader_sees_exactly_the_durable_records_across_rotations() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path())
        .with_segment_size(SMALL_SEGMENT)
        .with_fsync_interval(Duration::from_millis(5));
    let wal = WalWriter::open(cfg).expect("open");
    let stream = tmp.path().join("s1");
    let mut reader = StreamReader::open(&stream, 1, Follow::Live);
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for round in 0..10u64 {
        for i in 0..100 {
            let event = full_event(round * 100 + i);
            wal.append(&event).expect("append");
            sent.push(event);
        }
        let lsn = wal.written_lsn();
        wal.wait_durable(lsn).expect("durable");
        // Readers load only up to the durable watermark the writer publishes.
        let durable = read_durable_lsn(&stream).expect("sidecar");
        assert!(durable >= lsn, "sidecar {durable} behind durable LSN {lsn}");
        let mut items = Vec::new();
        reader
            .read_batch(usize::MAX, Some(durable), &mut items)
            .expect("read");
        for item in items {
            match item {
                ReadItem::Event { event, .. } => got.push(event.event),
                ReadItem::SegmentConsumed { .. } => {}
                other => panic!("damage while reading a live stream: {other:?}"),
            }
        }
        assert_eq!(
            got.len(),
            sent.len(),
            "round {round}: everything durable was read"
        );
    }
    assert_eq!(got, sent);
    assert!(wal.stats().rotations > 3, "the reader followed rotations");
}

#[test]
fn rotation_spreads_records_over_sealed_segments_with_gapless_lsns() {
    for prepare_ahead in [true, false] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = config(tmp.path())
            .with_segment_size(SMALL_SEGMENT)
            .with_prepare_next_segment(prepare_ahead);
        let wal = WalWriter::open(cfg).expect("open");
        let n = 1500u64;
        let mut lsns = Vec::new();
        for i in 0..n {
            lsns.push(wal.append(&full_event(i)).expect("append"));
        }
        assert!(lsns.windows(2).all(|w| w[1] > w[0]), "LSNs increase");
        let rotations = wal.stats().rotations;
        wal.close().expect("close");

        let stream = tmp.path().join("s1");
        let segments = segment_paths(&stream);
        assert!(
            segments.len() >= 5,
            "expected several segments, got {}",
            segments.len()
        );
        assert_eq!(
            rotations as usize,
            segments.len(),
            "one rotation per segment"
        );
        for path in &segments {
            assert_eq!(
                fs::metadata(path).expect("stat").len(),
                SMALL_SEGMENT,
                "preallocated"
            );
        }
        let records = read_stream(&stream);
        assert_gapless(&records);
        // Each segment but the last ends with EndOfSegment, and the next one
        // starts right after it.
        for (i, path) in segments.iter().enumerate() {
            let bytes = fs::read(path).expect("read");
            let items: Vec<_> = format::scan_segment(&bytes).collect();
            let sealed = items.iter().any(|it| matches!(it, ScanItem::Sealed { .. }));
            assert_eq!(sealed, i + 1 < segments.len(), "segment {i} sealed?");
            let first = format::SegmentHeader::decode(&bytes)
                .expect("header")
                .first_lsn;
            let named = format::parse_segment_file_name(
                path.file_name().and_then(|n| n.to_str()).expect("name"),
            );
            assert_eq!(Some(first), named, "file name is the first LSN");
        }
        assert_eq!(events_of(&records).len() as u64, n);
        let leftovers: Vec<_> = fs::read_dir(&stream)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().ends_with(".seg.tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "close removes the unused spare: {leftovers:?}"
        );
    }
}

/// Where a record lies in its segment: frame start, end of its payload, and
/// end of the frame including the padding (which its CRC does not cover).
#[derive(Debug, Clone, Copy)]
struct Extent {
    start: usize,
    data_end: usize,
    end: usize,
}

/// Builds a stream of `n` small events in one segment and returns where each
/// record lies.
fn one_segment_stream(dir: &Path, n: u64) -> (PathBuf, Vec<Extent>) {
    let wal = WalWriter::open(config(dir).with_segment_size(SMALL_SEGMENT)).expect("open");
    for i in 0..n {
        wal.append(&small_event(i)).expect("append");
    }
    wal.close().expect("close");
    drop(wal);
    let segs = segment_paths(&dir.join("s1"));
    assert_eq!(segs.len(), 1);
    let bytes = fs::read(&segs[0]).expect("read");
    let extents = format::scan_segment(&bytes)
        .filter_map(|it| match it {
            ScanItem::Record { offset, record } => Some(Extent {
                start: offset,
                data_end: offset + format::FRAME_HEADER_LEN + record.payload.len(),
                end: offset + format::frame_len(record.payload.len()),
            }),
            _ => None,
        })
        .collect();
    (segs[0].clone(), extents)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn every_truncation_point_of_the_last_segment_recovers_exactly_the_complete_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let original = tmp.path().join("orig");
    let n = 8u64;
    let (segment, extents) = one_segment_stream(&original, n);
    let seg_name = segment.file_name().expect("name").to_owned();
    let data_end = extents.last().expect("records").end;
    let pristine = fs::read(&segment).expect("read");

    // Cut at every byte from the first frame to the end of the data, as a crash
    // that wrote up to k would leave it (the rest of the preallocated file zero).
    for k in format::SEGMENT_HEADER_LEN..=data_end {
        let work = tmp.path().join(format!("cut-{k}"));
        copy_dir(&original.join("s1"), &work.join("s1"));
        // The sidecar would let recovery know how far the old writer got; a
        // crash can leave it behind the data, so remove it here.
        fs::remove_file(work.join("s1").join("durable.lsn")).expect("rm sidecar");
        let mut bytes = pristine.clone();
        bytes[k..].fill(0);
        fs::write(work.join("s1").join(&seg_name), &bytes).expect("write cut");

        // A record survives when its header and payload lie before k; zeroing
        // its padding damages nothing. A cut inside header or payload is torn.
        let complete = extents.iter().filter(|e| e.data_end <= k).count() as u64;
        let torn = extents.iter().any(|e| e.start < k && k < e.data_end);
        let cfg = config(&work)
            .with_segment_size(SMALL_SEGMENT)
            .with_prepare_next_segment(false);
        let wal = WalWriter::open(cfg).unwrap_or_else(|e| panic!("open after cut at {k}: {e}"));
        assert_eq!(wal.recovery().last_lsn, complete, "cut at {k}");
        assert_eq!(
            wal.recovery().torn_tail_offset.is_some(),
            torn,
            "cut at {k}: torn tail?"
        );
        let lsn = wal
            .append(&small_event(1000))
            .expect("append after recovery");
        assert_eq!(
            lsn,
            complete + 1,
            "cut at {k}: appends resume with the next LSN"
        );
        wal.close().expect("close");
        drop(wal);

        let records = read_stream(&work.join("s1"));
        assert_gapless(&records);
        let events = events_of(&records);
        assert_eq!(events.len() as u64, complete + 1, "cut at {k}");
        for (i, (_, e)) in events.iter().take(complete as usize).enumerate() {
            assert_eq!(
                e.event.action,
                format!("a.{i}"),
                "cut at {k}: record {i} intact"
            );
        }
        assert_eq!(events.last().expect("last").1.event.action, "a.1000");
        fs::remove_dir_all(&work).expect("cleanup");
    }
}

#[test]
fn data_past_a_zeroed_frame_header_is_noted_with_its_range_and_verify_reports_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (segment, extents) = one_segment_stream(tmp.path(), 5);
    // A page that never reached the disk: record 2's header is zero, records 3
    // and 4 (and the rest of record 2) are still there after it.
    let mut bytes = fs::read(&segment).expect("read");
    bytes[extents[2].start..extents[2].start + format::FRAME_HEADER_LEN].fill(0);
    fs::write(&segment, &bytes).expect("write");
    fs::remove_file(tmp.path().join("s1/durable.lsn")).expect("rm sidecar");
    let first_nonzero = extents[2].start
        + format::FRAME_HEADER_LEN
        + bytes[extents[2].start + format::FRAME_HEADER_LEN..]
            .iter()
            .position(|&b| b != 0)
            .expect("data after the zeroed header");
    let last_nonzero_end = extents[4].data_end
        - bytes[..extents[4].data_end]
            .iter()
            .rev()
            .position(|&b| b != 0)
            .expect("nonzero");

    let wal = WalWriter::open(config(tmp.path()).with_segment_size(SMALL_SEGMENT)).expect("open");
    let report = wal.recovery().clone();
    assert_eq!(report.last_lsn, 2, "records 1 and 2 stand");
    assert_eq!(
        report.torn_tail_offset, None,
        "the data ended at a zeroed header"
    );
    assert_eq!(
        report.zeroed_past_tail,
        Some((first_nonzero as u64, last_nonzero_end as u64))
    );
    let notes = auditwal::wal::recovery::read_repairs(&tmp.path().join("s1")).expect("notes");
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = notes[0].clone().expect("a parseable note");
    assert_eq!(
        (note.start, note.end, note.last_lsn),
        (first_nonzero as u64, last_nonzero_end as u64, 2)
    );
    wal.close().expect("close");
    drop(wal);

    // The segment itself is clean now; verify still says what was lost.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_auditwal"))
        .args(["verify", tmp.path().join("s1").to_str().expect("utf8")])
        .output()
        .expect("run verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("bytes [{first_nonzero}, {last_nonzero_end})"))
            && stdout.contains("zeroed by recovery"),
        "{stdout}"
    );
}

#[test]
fn a_torn_record_alone_is_repaired_without_a_note() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (segment, extents) = one_segment_stream(tmp.path(), 5);
    let mut bytes = fs::read(&segment).expect("read");
    let mid = (extents[4].start + extents[4].data_end) / 2;
    bytes[mid..].fill(0);
    fs::write(&segment, &bytes).expect("write");
    fs::remove_file(tmp.path().join("s1/durable.lsn")).expect("rm sidecar");

    let wal = WalWriter::open(config(tmp.path()).with_segment_size(SMALL_SEGMENT)).expect("open");
    assert_eq!(
        wal.recovery().torn_tail_offset,
        Some(extents[4].start as u64)
    );
    assert_eq!(wal.recovery().zeroed_past_tail, None);
    assert!(!tmp.path().join("s1/repairs.jsonl").exists());
}

#[test]
fn a_half_copied_record_is_zeroed_and_never_truncated() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (segment, extents) = one_segment_stream(tmp.path(), 5);
    let len_before = fs::metadata(&segment).expect("stat").len();
    // A crash mid-copy: the last record's bytes half there, the rest zero, and
    // some stale garbage further on.
    let mut bytes = fs::read(&segment).expect("read");
    let last_start = extents[4].start;
    let mid = (last_start + extents[4].data_end) / 2;
    bytes[mid..].fill(0);
    bytes[mid + 4096..mid + 4100].copy_from_slice(b"junk");
    fs::write(&segment, &bytes).expect("write");
    fs::remove_file(tmp.path().join("s1/durable.lsn")).expect("rm sidecar");

    let wal = WalWriter::open(config(tmp.path()).with_segment_size(SMALL_SEGMENT)).expect("open");
    let report = wal.recovery().clone();
    assert_eq!(report.last_lsn, 4);
    assert_eq!(report.torn_tail_offset, Some(last_start as u64));
    assert!(report.bytes_zeroed > 0);
    assert_eq!(
        fs::metadata(&segment).expect("stat").len(),
        len_before,
        "file not shrunk"
    );
    let after = fs::read(&segment).expect("read");
    assert!(
        after[last_start..].iter().all(|&b| b == 0),
        "everything after the last record is zero"
    );
    assert_eq!(wal.append(&small_event(9)).expect("append"), 5);
}

#[test]
fn mid_segment_corruption_keeps_the_records_after_it_and_appends_continue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (segment, extents) = one_segment_stream(tmp.path(), 10);
    let mut bytes = fs::read(&segment).expect("read");
    // Flip a payload byte of record 3 (LSN 3): its CRC fails, records 4.. stay valid.
    bytes[extents[2].start + format::FRAME_HEADER_LEN + 2] ^= 0x40;
    fs::write(&segment, &bytes).expect("write");

    let wal = WalWriter::open(config(tmp.path()).with_segment_size(SMALL_SEGMENT)).expect("open");
    let report = wal.recovery().clone();
    assert_eq!(
        report.skipped_ranges,
        vec![(extents[2].start as u64, extents[3].start as u64)]
    );
    assert_eq!(report.last_lsn, 10, "records after the damage are kept");
    assert_eq!(report.records_in_last_segment, 9);
    assert_eq!(wal.append(&small_event(10)).expect("append"), 11);
}

/// Writes stream s1 in `dir`, in small segments, exactly until the first
/// segment is sealed and the second opened, and drops the writer. Returns
/// the stream's config, the last LSN written and the two segments' paths.
fn write_until_the_first_rotation(dir: &Path) -> (WalConfig, Lsn, Vec<PathBuf>) {
    let cfg = config(dir).with_segment_size(SMALL_SEGMENT);
    let wal = WalWriter::open(cfg.clone()).expect("open");
    let mut i = 0;
    while wal.stats().rotations < 2 {
        wal.append(&full_event(i)).expect("append");
        i += 1;
    }
    let last = wal.written_lsn();
    drop(wal);
    let segs = segment_paths(&dir.join("s1"));
    assert_eq!(segs.len(), 2);
    (cfg, last, segs)
}

#[test]
fn a_sealed_last_segment_makes_the_writer_start_a_new_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cfg, last, segs) = write_until_the_first_rotation(tmp.path());
    // Remove the second (nearly empty) segment: the first, sealed, is now last.
    let stream = tmp.path().join("s1");
    fs::remove_file(&segs[1]).expect("rm");
    // ... and the sidecar, which would keep the LSNs of the removed segment.
    fs::remove_file(stream.join("durable.lsn")).expect("rm sidecar");
    let wal = WalWriter::open(cfg).expect("reopen");
    assert!(wal.recovery().last_segment_sealed);
    let eos = wal.recovery().last_lsn;
    assert!(eos < last);
    assert_eq!(wal.append(&full_event(0)).expect("append"), eos + 1);
    assert_eq!(segment_paths(&stream).len(), 2);
}

#[test]
fn a_trailing_segment_whose_header_never_reached_the_disk_is_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (cfg, _, segs) = write_until_the_first_rotation(tmp.path());
    // What a power loss right after the rotation can leave: the new name is on
    // disk, its header page is not.
    let stream = tmp.path().join("s1");
    let mut bytes = fs::read(&segs[1]).expect("read");
    bytes[..format::SEGMENT_HEADER_LEN].fill(0);
    fs::write(&segs[1], &bytes).expect("write");
    // The watermark cannot be past the rotation in that situation.
    fs::remove_file(stream.join("durable.lsn")).expect("rm sidecar");

    let wal = WalWriter::open(cfg).expect("reopen");
    assert_eq!(wal.recovery().removed_headerless_segments, 1);
    assert!(wal.recovery().last_segment_sealed);
    let eos = wal.recovery().last_lsn;
    assert_eq!(wal.append(&full_event(0)).expect("append"), eos + 1);
    drop(wal);
    let records = read_stream(&stream);
    assert_gapless(&records);
}

#[test]
fn lsns_are_never_reused_after_every_segment_was_consumed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path()).with_segment_size(SMALL_SEGMENT);
    let wal = WalWriter::open(cfg.clone()).expect("open");
    for i in 0..10 {
        wal.append(&small_event(i)).expect("append");
    }
    wal.close().expect("close");
    drop(wal);
    for seg in segment_paths(&tmp.path().join("s1")) {
        fs::remove_file(seg).expect("loader deletes");
    }
    let wal = WalWriter::open(cfg).expect("reopen");
    assert_eq!(wal.append(&small_event(0)).expect("append"), 11);
}

#[test]
fn leftover_tmp_segments_are_removed_at_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stream = tmp.path().join("s1");
    fs::create_dir_all(&stream).expect("mkdir");
    fs::write(stream.join("00000000000000000007.seg.tmp"), b"half made").expect("write");
    let wal = WalWriter::open(config(tmp.path()).with_segment_size(SMALL_SEGMENT)).expect("open");
    assert_eq!(wal.recovery().removed_tmp_files, 1);
    assert!(!stream.join("00000000000000000007.seg.tmp").exists());
}

#[test]
fn a_second_writer_on_the_same_stream_is_refused_naming_the_lock_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = WalWriter::open(config(tmp.path())).expect("open");
    match WalWriter::open(config(tmp.path())) {
        Err(WalError::StreamLocked { stream, path }) => {
            assert_eq!(stream, "s1");
            assert_eq!(path, tmp.path().join("s1").join("LOCK"));
        }
        other => panic!("expected StreamLocked, got {other:?}"),
    }
    // Another stream in the same directory is independent.
    WalWriter::open(WalConfig::new(tmp.path(), "s2")).expect("other stream");
    first.close().expect("close");
    // Closing releases the lock.
    WalWriter::open(config(tmp.path())).expect("reopen after close");
}

#[test]
fn segment_files_are_0600_and_directories_0700() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal_dir = tmp.path().join("wal");
    let wal = WalWriter::open(WalConfig::new(&wal_dir, "s1")).expect("open");
    wal.append(&small_event(1)).expect("append");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&wal_dir), 0o700);
    assert_eq!(mode(&wal_dir.join("s1")), 0o700);
    let mut files = 0;
    for entry in fs::read_dir(wal_dir.join("s1")).expect("list") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "segment, LOCK and durable.lsn at least");
}

#[test]
fn invalid_stream_names_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for bad in ["", "..", ".hidden", "a/b", "x".repeat(33).as_str()] {
        assert!(
            matches!(
                WalWriter::open(WalConfig::new(tmp.path(), bad)),
                Err(WalError::InvalidStreamName { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn durable_append_returns_only_once_the_durable_lsn_covers_it_without_waiting_the_interval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A long interval: only a durable waiter can make the flusher sync early.
    let cfg = config(tmp.path()).with_fsync_interval(Duration::from_secs(30));
    let wal = Arc::new(WalWriter::open(cfg).expect("open"));
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let lsn = wal
                        .append_durable(&full_event(t * 100 + i))
                        .expect("durable");
                    assert!(
                        wal.durable_lsn() >= lsn,
                        "durable LSN covers the record on return"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not sit out the interval"
    );
    let stats = wal.stats();
    assert_eq!(stats.durable_lsn, 200);
    assert!(
        stats.fsyncs < 200,
        "one fsync served several waiters ({} fsyncs for 200 appends)",
        stats.fsyncs
    );
    // The sidecar says the same.
    let sidecar = fs::read(tmp.path().join("s1/durable.lsn")).expect("sidecar");
    assert_eq!(format::decode_durable_lsn(&sidecar).expect("decode"), 200);
}

#[test]
fn async_appends_only_become_durable_at_the_flusher_interval() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path()).with_fsync_interval(Duration::from_millis(50));
    let wal = WalWriter::open(cfg).expect("open");
    let lsn = wal.append(&small_event(1)).expect("append");
    let deadline = Instant::now() + Duration::from_secs(5);
    while wal.durable_lsn() < lsn {
        assert!(Instant::now() < deadline, "periodic flush never came");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(wal.stats().fsyncs >= 1);
}

#[test]
fn waiting_for_an_lsn_never_written_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal = WalWriter::open(config(tmp.path())).expect("open");
    assert!(matches!(
        wal.wait_durable(5),
        Err(WalError::LsnNotWritten { lsn: 5, written: 0 })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_appends_from_many_tokio_tasks_complete_without_blocking_the_runtime() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path()).with_fsync_interval(Duration::from_secs(30));
    let wal = Arc::new(WalWriter::open(cfg).expect("open"));
    let mut tasks = Vec::new();
    // More tasks than worker threads: if a wait blocked its thread, the
    // runtime would stall and this would time out.
    for t in 0..64u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..5 {
                let lsn = wal
                    .append_durable_async(&full_event(t * 10 + i))
                    .await
                    .expect("durable");
                assert!(wal.durable_lsn() >= lsn);
                got.push(lsn);
            }
            got
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    })
    .await
    .expect("durable appends finished");
    assert_eq!(all.len(), 320);
    assert_eq!(wal.durable_lsn(), 320);
}

#[test]
fn appends_after_close_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let wal = WalWriter::open(config(tmp.path())).expect("open");
    wal.append(&small_event(1)).expect("append");
    wal.close().expect("close");
    wal.close().expect("close twice is fine");
    assert!(matches!(
        wal.append(&small_event(2)),
        Err(WalError::Closed { .. })
    ));
    assert_eq!(wal.durable_lsn(), 1);
    wal.wait_durable(1).expect("already durable");
}

/// A writer whose budget holds two 64 KiB segments (the active one and the
/// spare), filled until an append meets the policy. Returns the writer and
/// the error of the first refused append.
fn fill_budget(dir: &Path, policy: FullDiskPolicy) -> (WalWriter, WalError, u64) {
    let cfg = config(dir)
        .with_segment_size(SMALL_SEGMENT)
        .with_disk_budget(2 * SMALL_SEGMENT)
        .with_full_disk_policy(policy);
    let wal = WalWriter::open(cfg).expect("open");
    for i in 0..10_000 {
        match wal.append(&full_event(i)) {
            Ok(_) => {}
            Err(e) => return (wal, e, i),
        }
    }
    panic!("the budget never filled");
}

/// Deletes the oldest sealed segment, as the loader does after committing it.
fn consume_oldest_segment(dir: &Path) {
    let segs = segment_paths(&dir.join("s1"));
    assert!(segs.len() >= 2);
    fs::remove_file(&segs[0]).expect("delete consumed segment");
}

#[test]
fn budget_policy_fail_refuses_at_once_and_recovers_when_a_segment_is_consumed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, err, accepted) = fill_budget(tmp.path(), FullDiskPolicy::Fail);
    match err {
        WalError::DiskBudgetExceeded {
            used,
            budget,
            waited,
            ..
        } => {
            assert_eq!(budget, 2 * SMALL_SEGMENT);
            assert!(used + SMALL_SEGMENT > budget);
            assert_eq!(waited, Duration::ZERO);
        }
        other => panic!("expected DiskBudgetExceeded, got {other:?}"),
    }
    assert!(
        accepted > 300,
        "two segments' worth was accepted ({accepted})"
    );
    consume_oldest_segment(tmp.path());
    std::thread::sleep(Duration::from_millis(20)); // past the cached answer
    let lsn = wal
        .append(&full_event(1))
        .expect("append after space was freed");
    assert_eq!(lsn, wal.written_lsn());
    wal.close().expect("close");
    // Nothing accepted was lost, nothing refused was written.
    let events = events_of(&read_stream(&tmp.path().join("s1")));
    assert!(!events.is_empty());
}

#[test]
fn budget_policy_drop_newest_counts_every_dropped_event() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, err, _) = fill_budget(tmp.path(), FullDiskPolicy::DropNewest);
    assert!(
        matches!(
            err,
            WalError::EventDropped {
                dropped_total: 1,
                ..
            }
        ),
        "{err:?}"
    );
    for i in 0..9 {
        assert!(matches!(
            wal.append(&full_event(i)),
            Err(WalError::EventDropped { .. })
        ));
    }
    assert_eq!(wal.stats().dropped_events, 10);
    let written = wal.written_lsn();
    wal.close().expect("close");
    let records = read_stream(&tmp.path().join("s1"));
    assert_eq!(
        records.last().expect("records").lsn,
        written,
        "dropped events took no LSN"
    );
}

#[test]
fn budget_policy_block_waits_its_timeout_then_fails() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (wal, err, _) = fill_budget(tmp.path(), FullDiskPolicy::Block { timeout });
    match err {
        WalError::DiskBudgetExceeded { waited, .. } => assert!(waited >= timeout),
        other => panic!("expected DiskBudgetExceeded, got {other:?}"),
    }
    assert!(started.elapsed() >= timeout);
    drop(wal);
}

#[test]
fn budget_policy_block_resumes_as_soon_as_a_reader_frees_a_segment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let timeout = Duration::from_secs(10);
    let (wal, _, _) = fill_budget(tmp.path(), FullDiskPolicy::Fail);
    drop(wal);
    // Reopen the full stream with the blocking policy; free space later.
    let cfg = config(tmp.path())
        .with_segment_size(SMALL_SEGMENT)
        .with_disk_budget(2 * SMALL_SEGMENT)
        .with_full_disk_policy(FullDiskPolicy::Block { timeout });
    let wal = WalWriter::open(cfg).expect("reopen");
    let dir = tmp.path().to_path_buf();
    let freer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        consume_oldest_segment(&dir);
    });
    // The stream is full (its last segment sealed, no room for another): the
    // first append blocks until the reader frees a segment.
    let started = Instant::now();
    let lsn = wal
        .append(&full_event(1))
        .expect("append blocks, then succeeds");
    let waited = started.elapsed();
    freer.join().expect("freer");
    assert!(
        waited >= Duration::from_millis(250),
        "the append waited for the reader ({waited:?})"
    );
    assert!(
        waited < timeout,
        "and not for the whole timeout ({waited:?})"
    );
    assert_eq!(lsn, wal.written_lsn());
}
