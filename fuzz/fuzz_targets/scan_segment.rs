//! Fuzzes the segment scanner: the input as a whole segment image, and again
//! behind a valid header so the frame region is explored even when the fuzzer
//! has not found a valid header itself.
#![no_main]

use auditwal::wal::format::{
    check_after_end, decode_frame, scan_segment, AfterEnd, FrameOutcome, ScanItem, SegmentHeader,
    SegmentScan, FRAME_ALIGN,
};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let mut scan = scan_segment(bytes);
    let mut items = Vec::new();
    let mut positions = Vec::new();
    // Every step advances or ends; bound the walk to catch a loop as a failure.
    for _ in 0..bytes.len() / FRAME_ALIGN + 8 {
        match scan.next() {
            Some(item) => {
                items.push(item);
                positions.push(scan.position());
            }
            None => break,
        }
    }
    assert!(scan.next().is_none(), "scan did not end within its bound");

    let mut last_end = 0usize;
    let mut last_lsn = None;
    for (i, item) in items.iter().enumerate() {
        match item {
            ScanItem::Record { offset, record } => {
                assert!(*offset >= last_end && offset % FRAME_ALIGN == 0);
                match decode_frame(&bytes[*offset..]) {
                    FrameOutcome::Record {
                        record: again,
                        frame_len,
                    } => {
                        assert_eq!(&again, record);
                        last_end = offset + frame_len;
                    }
                    other => panic!("record at {offset} does not decode again: {other:?}"),
                }
                assert!(last_lsn.is_none_or(|l| record.lsn > l));
                last_lsn = Some(record.lsn);
            }
            ScanItem::Skipped { start, end, .. } => {
                assert!(*start >= last_end && start < end && *end <= bytes.len());
                assert_eq!((end - start) % FRAME_ALIGN, 0);
                last_end = *end;
            }
            ScanItem::EndOfData { offset } => {
                assert!(*offset >= last_end && *offset <= bytes.len());
                assert_eq!(i, items.len() - 1);
                match check_after_end(bytes, positions[i]) {
                    AfterEnd::Zeros => {}
                    AfterEnd::Resync {
                        resume,
                        first_nonzero,
                    } => {
                        assert!(resume > *offset && resume < bytes.len());
                        assert!(first_nonzero >= *offset && first_nonzero <= resume + 20);
                    }
                    AfterEnd::Garbage { first_nonzero } => {
                        assert!(first_nonzero >= *offset && first_nonzero < bytes.len());
                    }
                }
            }
            ScanItem::TornTail { offset, .. } => {
                assert!(*offset >= last_end && *offset <= bytes.len());
                assert_eq!(i, items.len() - 1);
            }
            ScanItem::Sealed { offset } => {
                assert_eq!(*offset, last_end);
                assert_eq!(i, items.len() - 1);
            }
            ScanItem::LsnGap { offset, .. } => assert!(*offset >= last_end),
            ScanItem::BadHeader { .. } => assert_eq!(i, 0),
        }
    }

    // Resuming at any reported position yields the rest of the scan unchanged
    // (except the seal, which a resumed scan does not repeat).
    for (i, pos) in positions.iter().enumerate() {
        if matches!(items[i], ScanItem::BadHeader { .. }) || pos.offset > bytes.len() {
            continue;
        }
        let rest: Vec<_> = SegmentScan::resume(bytes, *pos)
            .take(bytes.len() / FRAME_ALIGN + 8)
            .collect();
        let mut want: Vec<_> = items[i + 1..].to_vec();
        let after_eos = matches!(&items[i], ScanItem::Record { record, .. }
            if record.kind == auditwal::wal::format::RecordKind::EndOfSegment);
        if after_eos || matches!(items[i], ScanItem::Sealed { .. }) {
            // Resumed after the end-of-segment record, a scan looks past it (a
            // reader never resumes there: the segment is finished).
            continue;
        }
        if matches!(
            items[i],
            ScanItem::EndOfData { .. } | ScanItem::TornTail { .. }
        ) {
            // Terminal items leave the position at themselves: a resume repeats them.
            want = vec![items[i].clone()];
        }
        assert_eq!(rest, want, "resumed at item {i} ({:?})", pos);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let header = SegmentHeader {
        stream_id: "fuzz".into(),
        first_lsn: 1 + u64::from(data.first().copied().unwrap_or(0)),
    }
    .encode()
    .expect("valid header");
    let mut with_header = header.to_vec();
    with_header.extend_from_slice(data.get(1..).unwrap_or(&[]));
    check(&with_header);
});
