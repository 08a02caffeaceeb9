//! The segment format and reader against real segment images: truncation at every
//! byte, every single-bit flip of a record, random mutations, the fuzz corpus, and
//! the `inspect` / `verify` commands on damaged files.
//!
//! Segment images are built with the library's own encoders (`encode_event`,
//! `encode_frame`, `SegmentHeader::encode`), laid out as the writer lays them out:
//! header, frames back to back, zero fill up to the preallocated size.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use auditwal::wal::format::{
    decode_frame, encode_durable_lsn, encode_frame, frame_len, scan_segment, segment_file_name,
    FormatError, FrameOutcome, Lsn, RecordKind, ScanItem, SegmentHeader, DURABLE_LSN_FILE,
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use auditwal::wal::payload::{decode_event, encode_event, WalEvent};
use auditwal::wal::reader::{Follow, ReadItem, StreamReader};
use auditwal::{AuditEvent, JsonText, Outcome};
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

/// Event `i`: sizes vary from ~60 to ~700 bytes, optional fields come and go.
fn sample_event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(format!("test.action.{}", i % 7));
    e.event_id = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + u128::from(i));
    e.occurred_at = Utc
        .timestamp_micros(1_790_000_000_000_000 + i as i64 * 1_001)
        .single()
        .expect("valid time");
    if i % 2 == 0 {
        e = e.actor("user", format!("u-{i}"));
    }
    if i % 3 == 0 {
        e = e
            .target("doc", format!("d-{}", i * 31))
            .target_name("Résumé ✓");
    }
    if i % 4 == 1 {
        e = e
            .tenant("t1")
            .outcome(Outcome::Denied)
            .reason("x".repeat((i * 13 % 500) as usize));
    }
    if i % 5 == 2 {
        e = e.ip(format!("10.0.{}.{}", i % 256, (i / 256) % 256)
            .parse()
            .expect("ip"));
        e.metadata = Some(
            JsonText::parse(
                "metadata",
                &format!(r#"{{"i":{i},"tags":["a","b"],"ok":true}}"#),
            )
            .expect("json"),
        );
    }
    if i % 11 == 0 {
        e = e
            .ip("2001:db8::7".parse().expect("ip"))
            .user_agent("agent/".repeat(20));
    }
    e
}

/// One record as written.
#[derive(Debug, Clone, PartialEq)]
struct Written {
    offset: usize,
    lsn: Lsn,
    kind: RecordKind,
    payload: Vec<u8>,
    /// The event for event records.
    event: Option<AuditEvent>,
}

impl Written {
    fn end(&self) -> usize {
        self.offset + frame_len(self.payload.len())
    }
}

struct Image {
    bytes: Vec<u8>,
    records: Vec<Written>,
}

/// A segment of `n` events starting at `first_lsn` (events `first_lsn..`), sealed
/// or not, followed by `zero_fill` bytes of zeros.
fn build_segment(stream: &str, first_lsn: Lsn, n: u64, seal: bool, zero_fill: usize) -> Image {
    let header = SegmentHeader {
        stream_id: stream.into(),
        first_lsn,
    };
    let mut bytes = header.encode().expect("header").to_vec();
    let mut records = Vec::new();
    let mut push = |bytes: &mut Vec<u8>, lsn, kind, payload: Vec<u8>, event| {
        let offset = bytes.len();
        bytes.resize(offset + frame_len(payload.len()), 0);
        encode_frame(&mut bytes[offset..], lsn, kind, &payload).expect("frame");
        records.push(Written {
            offset,
            lsn,
            kind,
            payload,
            event,
        });
    };
    for lsn in first_lsn..first_lsn + n {
        let event = sample_event(lsn);
        let mut payload = Vec::new();
        encode_event(&event, 1.0, &mut payload).expect("payload");
        push(&mut bytes, lsn, RecordKind::Event, payload, Some(event));
    }
    if seal {
        push(
            &mut bytes,
            first_lsn + n,
            RecordKind::EndOfSegment,
            Vec::new(),
            None,
        );
    }
    bytes.resize(bytes.len() + zero_fill, 0);
    Image { bytes, records }
}

/// The records a scan returned, with their offsets.
fn scanned_records(items: &[ScanItem<'_>]) -> Vec<(usize, Lsn, RecordKind, Vec<u8>)> {
    items
        .iter()
        .filter_map(|i| match i {
            ScanItem::Record { offset, record } => {
                Some((*offset, record.lsn, record.kind, record.payload.to_vec()))
            }
            _ => None,
        })
        .collect()
}

fn as_tuple(w: &Written) -> (usize, Lsn, RecordKind, Vec<u8>) {
    (w.offset, w.lsn, w.kind, w.payload.clone())
}

#[test]
fn every_truncation_point_yields_exactly_the_complete_records_before_the_cut() {
    let img = build_segment("s1", 1, 300, true, 40);
    assert!(img.records.len() == 301 && img.bytes.len() > 40_000);
    for cut in 0..=img.bytes.len() {
        let bytes = &img.bytes[..cut];
        let items: Vec<_> = scan_segment(bytes).collect();
        if cut < SEGMENT_HEADER_LEN {
            assert_eq!(
                items,
                vec![ScanItem::BadHeader {
                    error: FormatError::SegmentTooShort { len: cut }
                }]
            );
            continue;
        }
        let want: Vec<_> = img
            .records
            .iter()
            .filter(|w| w.end() <= cut)
            .map(as_tuple)
            .collect();
        assert_eq!(scanned_records(&items), want, "cut at {cut}");
        let last = items.last().expect("a terminal item");
        assert!(
            matches!(
                last,
                ScanItem::EndOfData { .. } | ScanItem::TornTail { .. } | ScanItem::Sealed { .. }
            ),
            "cut at {cut}: {last:?}"
        );
        let others = items.len() - want.len() - 1;
        assert_eq!(others, 0, "cut at {cut}: unexpected items {items:?}");
    }
}

#[test]
fn every_truncation_of_a_segment_file_reads_back_the_complete_events_and_at_most_a_torn_tail() {
    let img = build_segment("s1", 1, 25, false, 0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join(segment_file_name(1));
    for cut in SEGMENT_HEADER_LEN..=img.bytes.len() {
        std::fs::write(&path, &img.bytes[..cut]).expect("write");
        let mut r = StreamReader::open_segment_file(&path, 1).expect("open");
        let mut items = Vec::new();
        r.read_batch(usize::MAX, None, &mut items).expect("read");
        let events: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                ReadItem::Event { lsn, event, .. } => Some((*lsn, event.event.clone())),
                _ => None,
            })
            .collect();
        let want: Vec<_> = img
            .records
            .iter()
            .filter(|w| w.end() <= cut)
            .map(|w| (w.lsn, w.event.clone().expect("event")))
            .collect();
        assert_eq!(events, want, "cut at {cut}");
        for item in &items {
            assert!(
                matches!(
                    item,
                    ReadItem::Event { .. }
                        | ReadItem::TornTail { .. }
                        | ReadItem::SegmentConsumed { sealed: false, .. }
                ),
                "cut at {cut}: {item:?}"
            );
        }
    }
}

/// Flips every bit of the header and payload of record `k` in turn and checks
/// that the record is never returned and every other record still is.
fn check_every_bit_flip_of_record(img: &Image, k: usize) {
    let target = &img.records[k];
    let others: Vec<_> = img
        .records
        .iter()
        .filter(|w| w.lsn != target.lsn)
        .map(as_tuple)
        .collect();
    let mut bytes = img.bytes.clone();
    for byte in target.offset..target.offset + FRAME_HEADER_LEN + target.payload.len() {
        for bit in 0..8 {
            bytes[byte] ^= 1 << bit;
            let items: Vec<_> = scan_segment(&bytes).collect();
            let got = scanned_records(&items);
            assert_eq!(got, others, "record {k}, byte {byte}, bit {bit}");
            let damage: Vec<_> = items
                .iter()
                .filter(|i| {
                    matches!(
                        i,
                        ScanItem::Skipped { .. }
                            | ScanItem::TornTail { .. }
                            | ScanItem::LsnGap { .. }
                    )
                })
                .collect();
            assert_eq!(
                damage.len(),
                1,
                "record {k}, byte {byte}, bit {bit}: {items:?}"
            );
            match (damage[0], img.records.get(k + 1)) {
                (ScanItem::Skipped { start, end, .. }, Some(next)) => {
                    assert_eq!((*start, *end), (target.offset, next.offset));
                }
                (ScanItem::TornTail { offset, .. }, _) => assert_eq!(*offset, target.offset),
                (other, _) => panic!("record {k}, byte {byte}, bit {bit}: {other:?}"),
            }
            bytes[byte] ^= 1 << bit;
        }
    }
}

#[test]
fn every_single_bit_flip_in_a_record_is_detected_and_later_records_are_still_returned() {
    // Every bit of the header and payload of every record, the end-of-segment
    // record included, one flip at a time.
    let img = build_segment("s1", 1000, 40, true, 64);
    for k in 0..img.records.len() {
        check_every_bit_flip_of_record(&img, k);
    }
}

#[test]
fn a_bit_flip_in_padding_alters_no_record() {
    let img = build_segment("s1", 1, 40, true, 0);
    let padded = img
        .records
        .iter()
        .find(|w| (FRAME_HEADER_LEN + w.payload.len()) % 8 != 0)
        .expect("a record with padding");
    let mut bytes = img.bytes.clone();
    bytes[padded.end() - 1] ^= 0x40;
    let items: Vec<_> = scan_segment(&bytes).collect();
    let want: Vec<_> = img.records.iter().map(as_tuple).collect();
    assert_eq!(scanned_records(&items), want);
}

fn write_stream(root: &Path, stream: &str, images: &[&Image]) -> (PathBuf, Vec<PathBuf>) {
    let dir = root.join(stream);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let paths = images
        .iter()
        .map(|img| {
            let first = img.records.first().expect("records").lsn;
            let path = dir.join(segment_file_name(first));
            std::fs::write(&path, &img.bytes).expect("write");
            path
        })
        .collect();
    (dir, paths)
}

fn read_everything(dir: &Path) -> Vec<ReadItem> {
    let mut r = StreamReader::open(dir, 1, Follow::AtRest);
    let mut items = Vec::new();
    r.read_batch(usize::MAX, None, &mut items).expect("read");
    items
}

#[test]
fn a_flipped_bit_mid_segment_is_reported_as_a_skipped_range_and_reading_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = build_segment("s1", 1, 50, true, 128);
    let b = build_segment("s1", 52, 10, false, 4096);
    let hit = a.records[20].clone();
    a.bytes[hit.offset + FRAME_HEADER_LEN + 3] ^= 0x08;
    let (dir, paths) = write_stream(tmp.path(), "s1", &[&a, &b]);
    let items = read_everything(&dir);
    let damage: Vec<_> = items.iter().filter(|i| i.is_damage()).collect();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(matches!(
        damage[0],
        ReadItem::Skipped { segment, start, end, error: FormatError::ChecksumMismatch { .. } }
            if *segment == paths[0] && *start == hit.offset as u64 && *end == a.records[21].offset as u64
    ));
    let lsns: Vec<Lsn> = items
        .iter()
        .filter_map(|i| match i {
            ReadItem::Event { lsn, event, .. } => {
                assert_eq!(event.event, sample_event(*lsn));
                Some(*lsn)
            }
            _ => None,
        })
        .collect();
    let want: Vec<Lsn> = (1..=50).filter(|&l| l != 21).chain(52..62).collect();
    assert_eq!(lsns, want);
}

// ---------------------------------------------------------------------------
// Fuzz corpus: generated from real segments, replayed here on stable.

fn corpus_dir(target: &str) -> PathBuf {
    // The tests belong to bin/; the corpus is the top-level fuzz/.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Checks the invariants the `scan_segment` fuzz target checks: offsets in bounds
/// and increasing, every record decodes again where it was found, skipped ranges
/// are non-empty and 8-aligned, the scan ends.
fn check_scan_invariants(bytes: &[u8]) {
    let mut last_end = 0usize;
    let mut last_lsn = None;
    for item in scan_segment(bytes).take(bytes.len() + 8) {
        match item {
            ScanItem::Record { offset, record } => {
                assert!(offset >= last_end && offset % 8 == 0 && offset < bytes.len());
                match decode_frame(&bytes[offset..]) {
                    FrameOutcome::Record {
                        record: again,
                        frame_len,
                    } => {
                        assert_eq!(again, record);
                        last_end = offset + frame_len;
                    }
                    other => panic!("record at {offset} does not decode again: {other:?}"),
                }
                assert!(
                    last_lsn.is_none_or(|l| record.lsn > l),
                    "LSNs must increase"
                );
                last_lsn = Some(record.lsn);
                if record.kind == RecordKind::Event {
                    let _ = decode_event(record.payload);
                }
            }
            ScanItem::Skipped { start, end, .. } => {
                assert!(start >= last_end && start < end && end <= bytes.len());
                assert_eq!((end - start) % 8, 0);
                last_end = end;
            }
            ScanItem::TornTail { offset, .. } | ScanItem::EndOfData { offset } => {
                assert!(offset >= last_end && offset <= bytes.len());
            }
            ScanItem::Sealed { offset } => assert_eq!(offset, last_end),
            ScanItem::LsnGap { offset, .. } => assert!(offset >= last_end),
            ScanItem::BadHeader { .. } => {}
        }
    }
}

fn check_decode_record(bytes: &[u8]) {
    match decode_frame(bytes) {
        FrameOutcome::Record { record, frame_len } => {
            assert!(frame_len <= bytes.len() && frame_len % 8 == 0);
            assert_eq!(
                record.payload,
                &bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + record.payload.len()]
            );
            if record.kind == RecordKind::Event {
                if let Ok(WalEvent { event, sample_rate }) = decode_event(record.payload) {
                    // What decodes re-encodes to the same bytes.
                    let mut again = Vec::new();
                    encode_event(&event, sample_rate, &mut again).expect("re-encode");
                    assert_eq!(again, record.payload);
                }
            }
        }
        FrameOutcome::EndOfData | FrameOutcome::Invalid(_) => {}
    }
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

#[test]
fn the_fuzz_corpus_replays_through_decode_frame_and_scan_segment() {
    for path in corpus_files("decode_record") {
        let bytes = std::fs::read(&path).expect("read");
        check_decode_record(&bytes);
        check_scan_invariants(&bytes);
    }
    for path in corpus_files("scan_segment") {
        let bytes = std::fs::read(&path).expect("read");
        check_scan_invariants(&bytes);
        for at in (0..bytes.len()).step_by(8) {
            check_decode_record(&bytes[at..]);
        }
    }
}

/// Writes the fuzz seed corpus from real segments. Run after a format change:
/// `cargo test --test wal_format write_fuzz_seed_corpus -- --ignored`
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_fuzz_seed_corpus() {
    let records_dir = corpus_dir("decode_record");
    let scan_dir = corpus_dir("scan_segment");
    for dir in [&records_dir, &scan_dir] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let img = build_segment("seed", 1, 24, true, 48);
    // decode_record: single frames (each with the next frame's first bytes after
    // it, as in a segment), an end-of-segment frame, a zero header, damaged frames.
    for (i, w) in img.records.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let end = (w.end() + 16).min(img.bytes.len());
        std::fs::write(
            records_dir.join(format!("seed-frame-{i:02}")),
            &img.bytes[w.offset..end],
        )
        .expect("write");
    }
    let w = &img.records[3];
    let mut flipped = img.bytes[w.offset..w.end()].to_vec();
    flipped[FRAME_HEADER_LEN + 2] ^= 1;
    std::fs::write(records_dir.join("seed-frame-crc-mismatch"), &flipped).expect("write");
    let mut long = img.bytes[w.offset..w.end()].to_vec();
    long[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(records_dir.join("seed-frame-huge-length"), &long).expect("write");
    std::fs::write(records_dir.join("seed-zero-header"), [0u8; 24]).expect("write");

    // scan_segment: whole small segments, clean and damaged.
    let small = build_segment("seed", 1, 8, true, 64);
    std::fs::write(scan_dir.join("seed-sealed"), &small.bytes).expect("write");
    let open = build_segment("seed", 100, 8, false, 256);
    std::fs::write(scan_dir.join("seed-open-zero-tail"), &open.bytes).expect("write");
    let mut mid = small.bytes.clone();
    mid[small.records[3].offset + 25] ^= 0x20;
    std::fs::write(scan_dir.join("seed-mid-corruption"), &mid).expect("write");
    let torn = &open.bytes[..open.records[6].offset + 30];
    std::fs::write(scan_dir.join("seed-torn-tail"), torn).expect("write");
    let mut hdr = small.bytes.clone();
    hdr[30] ^= 1;
    std::fs::write(scan_dir.join("seed-bad-header-crc"), &hdr).expect("write");
    let mut zeroed = open.bytes.clone();
    let r = &open.records[2];
    zeroed[r.offset..r.end()].fill(0);
    std::fs::write(scan_dir.join("seed-zeroed-frame"), &zeroed).expect("write");
}

// ---------------------------------------------------------------------------
// Random mutations of real segments.

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Truncate {
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Copies `len` bytes from `from` in the other image over `at`.
    Splice {
        from: usize,
        at: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..200).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (any::<usize>(), any::<usize>(), 1usize..600)
            .prop_map(|(from, at, len)| Mutation::Splice { from, at, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, other: &[u8], m: &Mutation) {
    let n = bytes.len().max(1);
    match m {
        Mutation::FlipBit { at, bit } => {
            if let Some(b) = bytes.get_mut(at % n) {
                *b ^= 1 << bit;
            }
        }
        Mutation::SetByte { at, value } => {
            if let Some(b) = bytes.get_mut(at % n) {
                *b = *value;
            }
        }
        Mutation::Truncate { len } => bytes.truncate(len % n),
        Mutation::Insert { at, bytes: ins } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let at = at % n;
            let end = (at + len).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
        Mutation::Splice { from, at, len } => {
            let from = from % other.len();
            let len = (*len).min(other.len() - from);
            let at = at % n;
            let end = (at + len).min(bytes.len());
            if at < end {
                bytes[at..end].copy_from_slice(&other[from..from + (end - at)]);
            }
        }
    }
}

struct Fixture {
    base: Image,
    other: Image,
    /// Every record written to either image: (lsn, kind) → payload.
    written: HashMap<(Lsn, u8), Vec<u8>>,
    events: HashSet<Vec<u8>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let base = build_segment("s1", 1, 40, true, 96);
        let other = build_segment("s1", 42, 30, false, 200);
        let mut written = HashMap::new();
        let mut events = HashSet::new();
        for w in base.records.iter().chain(other.records.iter()) {
            written.insert((w.lsn, w.kind as u8), w.payload.clone());
            if w.kind == RecordKind::Event {
                events.insert(w.payload.clone());
            }
        }
        Fixture {
            base,
            other,
            written,
            events,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_mutations_never_panic_or_return_a_record_that_was_not_written(
        muts in proptest::collection::vec(mutation(), 1..6),
        swap in any::<bool>(),
    ) {
        let fx = fixture();
        let (base, other) = if swap { (&fx.other, &fx.base) } else { (&fx.base, &fx.other) };
        let mut bytes = base.bytes.clone();
        for m in &muts {
            apply(&mut bytes, &other.bytes, m);
        }
        check_scan_invariants(&bytes);
        for item in scan_segment(&bytes) {
            if let ScanItem::Record { record, .. } = item {
                let written = fx.written.get(&(record.lsn, record.kind as u8));
                prop_assert_eq!(written.map(Vec::as_slice), Some(record.payload), "record LSN {} was never written with these bytes", record.lsn);
                if record.kind == RecordKind::Event {
                    let decoded = decode_event(record.payload);
                    prop_assert!(decoded.is_ok(), "{:?}", decoded);
                }
            }
        }
        // Frame decoding at every aligned offset obeys the same rule.
        for at in (0..bytes.len()).step_by(8) {
            if let FrameOutcome::Record { record, .. } = decode_frame(&bytes[at..]) {
                let written = fx.written.get(&(record.lsn, record.kind as u8));
                prop_assert_eq!(written.map(Vec::as_slice), Some(record.payload));
                if record.kind == RecordKind::Event {
                    prop_assert!(fx.events.contains(record.payload));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_mutations_of_segment_files_read_back_only_written_events(
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let fx = fixture();
        let mut bytes = fx.base.bytes.clone();
        for m in &muts {
            apply(&mut bytes, &fx.other.bytes, m);
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("s1");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join(segment_file_name(1)), &bytes).expect("write");
        let mut r = StreamReader::open(&dir, 1, Follow::AtRest);
        let mut items = Vec::new();
        r.read_batch(usize::MAX, None, &mut items).expect("read");
        for item in &items {
            if let ReadItem::Event { lsn, event, .. } = item {
                prop_assert_eq!(&event.event, &sample_event(*lsn));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The `inspect` and `verify` commands.

fn auditwal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_auditwal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run auditwal");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn verify_exits_0_on_a_clean_stream() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = build_segment("s1", 1, 30, true, 64);
    let b = build_segment("s1", 32, 5, false, 1024);
    let (dir, _) = write_stream(tmp.path(), "s1", &[&a, &b]);
    let (code, out, err) = auditwal(&["verify", path_str(&dir)]);
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    assert!(out.contains("36 record(s) in 2 segment(s): clean"), "{out}");
    // The WAL directory (every stream in it) works too.
    let (code, out, _) = auditwal(&["verify", path_str(tmp.path())]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn verify_exits_1_and_names_segment_range_and_kind_of_damage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = build_segment("s1", 1, 30, true, 64);
    let hit = a.records[10].clone();
    a.bytes[hit.offset + 5] ^= 0x01; // the CRC field
    let mut b = build_segment("s1", 32, 5, false, 1024);
    let torn = b.records[4].clone();
    b.bytes[torn.offset + FRAME_HEADER_LEN] ^= 0x80;
    let (dir, paths) = write_stream(tmp.path(), "s1", &[&a, &b]);
    let (code, out, err) = auditwal(&["verify", path_str(&dir)]);
    assert_eq!(code, 1, "stdout {out} stderr {err}");
    let skipped = format!(
        "{}: bytes [{}, {}): corrupt, skipped (frame checksum mismatch",
        paths[0].display(),
        hit.offset,
        a.records[11].offset
    );
    assert!(out.contains(&skipped), "want {skipped:?} in {out}");
    let torn_line = format!(
        "{}: bytes [{}, end): torn tail",
        paths[1].display(),
        torn.offset
    );
    assert!(out.contains(&torn_line), "want {torn_line:?} in {out}");
    assert!(out.contains("2 problem(s) found"), "{out}");

    // A single segment file.
    let (code, out, _) = auditwal(&["verify", path_str(&paths[0])]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("corrupt, skipped"), "{out}");
}

#[test]
fn verify_reports_a_damaged_header() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = build_segment("s1", 1, 3, false, 64);
    a.bytes[0] = b'X';
    let (dir, _) = write_stream(tmp.path(), "s1", &[&a]);
    let (code, out, _) = auditwal(&["verify", path_str(&dir)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad segment header (bad segment magic"),
        "{out}"
    );
}

#[test]
fn verify_exits_2_for_a_missing_path_or_a_file_that_is_not_a_segment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let (code, _, err) = auditwal(&["verify", path_str(&missing)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope"), "{err}");
    let notes = tmp.path().join("notes.txt");
    std::fs::write(
        &notes,
        "not a segment at all, just some text here ........................",
    )
    .expect("write");
    let (code, _, err) = auditwal(&["verify", path_str(&notes)]);
    assert_eq!(code, 2, "{err}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let (code, _, err) = auditwal(&["inspect", path_str(&empty)]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_stream_killed_before_its_first_segment_is_an_empty_log_not_a_usage_error() {
    // What a writer SIGKILLed between taking its lock and renaming its first
    // segment into place leaves: LOCK, durable.lsn and a half-made spare.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("s1");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("LOCK"), b"").expect("LOCK");
    std::fs::write(dir.join(DURABLE_LSN_FILE), encode_durable_lsn(0)).expect("durable.lsn");
    std::fs::write(dir.join("spare-0.seg.tmp"), vec![0u8; 4096]).expect("spare");
    for path in [&dir, &tmp.path().to_path_buf()] {
        let (code, out, err) = auditwal(&["verify", path_str(path)]);
        assert_eq!(
            code,
            0,
            "verify {}: stdout {out} stderr {err}",
            path.display()
        );
        assert!(out.contains("0 record(s) in 0 segment(s): clean"), "{out}");
        let (code, out, err) = auditwal(&["inspect", "--json", path_str(path)]);
        assert_eq!(code, 0, "inspect {}: stderr {err}", path.display());
        assert_eq!(out, "", "no records");
    }
}

#[test]
fn inspect_json_prints_every_event_field_by_schema_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = build_segment("s1", 1, 12, true, 64);
    let (dir, _) = write_stream(tmp.path(), "s1", &[&a]);
    let (code, out, err) = auditwal(&["inspect", path_str(&dir), "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 13);
    for (lsn, v) in (1u64..).zip(&lines[..12]) {
        let e = sample_event(lsn);
        assert_eq!(v["lsn"], lsn);
        assert_eq!(v["kind"], "event");
        assert_eq!(v["sample_rate"], 1.0);
        assert_eq!(v["event_id"], e.event_id.to_string());
        assert_eq!(v["action"], e.action);
        // Every event field, by its schema name, as AuditEvent serialises it.
        let want = serde_json::to_value(&e).expect("event json");
        for (name, value) in want.as_object().expect("object") {
            assert_eq!(&v[name], value, "LSN {lsn} field {name}");
        }
    }
    assert_eq!(lines[12]["kind"], "end_of_segment");
    assert_eq!(lines[12]["lsn"], 13);
    let metadata = lines
        .iter()
        .find(|v| v.get("metadata").is_some())
        .expect("an event with metadata");
    assert!(
        metadata["metadata"].is_object(),
        "JSON fields are values, not strings"
    );
}

#[test]
fn inspect_text_prints_a_line_per_record_from_the_requested_lsn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = build_segment("s1", 1, 12, false, 64);
    let (_, paths) = write_stream(tmp.path(), "s1", &[&a]);
    let (code, out, err) = auditwal(&["inspect", path_str(&paths[0]), "--from-lsn", "5"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert!(lines[0].starts_with("lsn=5 event @"), "{}", lines[0]);
    assert!(lines[0].contains("test.action.5"), "{}", lines[0]);
}

#[test]
fn inspect_reports_damage_on_stderr_and_still_prints_the_intact_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = build_segment("s1", 1, 10, true, 64);
    let hit = a.records[4].clone();
    a.bytes[hit.offset + FRAME_HEADER_LEN + 1] ^= 0x10;
    let (_, paths) = write_stream(tmp.path(), "s1", &[&a]);
    let (code, out, err) = auditwal(&["inspect", path_str(&paths[0]), "--json"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "damage: {}: bytes [{}, ",
            paths[0].display(),
            hit.offset
        )),
        "{err}"
    );
    let lsns: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["lsn"]
                .as_u64()
                .expect("lsn")
        })
        .collect();
    assert_eq!(lsns, vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
}
