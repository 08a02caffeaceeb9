//! Recovery when a writer opens an existing stream: find where the log really
//! ends and make the files safe to append to.
//!
//! What it does, in order: removes leftover `*.seg.tmp` files (segments whose
//! creation never finished; they hold no acknowledged record because a segment is
//! renamed before its first append); removes trailing segments whose header is
//! all zero (after a power loss right after a rotation: see `Spare::install`);
//! fdatasyncs every segment that may hold
//! records beyond the durable watermark (a SIGKILLed writer leaves them in the
//! page cache only, and the new writer declares them durable); scans the last
//! segment with [`format::scan_to_end`] (the end of the log settling finds
//! too) and keeps every valid record, including
//! those after mid-segment corruption (reported with `tracing::warn!`); zeroes
//! the torn tail and any other garbage after the last valid record. It zeroes and
//! never truncates: a reader may have the file mapped, and shrinking a mapped
//! file kills the reader with SIGBUS on its next access.
//!
//! Zeroing the torn record itself is the expected repair after a crash. Nonzero
//! bytes *beyond* it (after a zeroed frame header, or past the extent the torn
//! frame's header claims) are another matter: records after a lost page, or
//! garbage, that no valid record accounts for. Recovery still zeroes them (the
//! log must end where appends resume), but first appends a [`Repair`] line to
//! `repairs.jsonl` in the stream directory and fsyncs it, and logs a warning
//! with the byte range; `auditwal verify` reports every such line as damage.
//!
//! The result says where the LSN sequence continues: in the last segment at the
//! end of its last valid record, or in a new segment when the last one is sealed
//! (or there is none). A damaged segment header is not repaired: the file is left
//! as it is and open fails with [`WalError::Corrupt`] for an operator to look at.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::WalError;
use super::format::{self, Lsn, RecordKind, ScanItem, SegmentHeader};
use super::segment::{ActiveSegment, Segment};
use super::stream_dir::StreamDir;

/// What recovery found and did; kept by the writer (`WalWriter::recovery`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the stream when the writer opened.
    pub segments_found: usize,
    /// `*.seg.tmp` files removed.
    pub removed_tmp_files: usize,
    /// Trailing segments removed because their header was all zero.
    pub removed_headerless_segments: usize,
    /// The last segment, when appends continue in it.
    pub resumed_segment: Option<PathBuf>,
    /// Valid event records in the last segment.
    pub records_in_last_segment: u64,
    /// The last LSN found in the stream (0 when it has no record).
    pub last_lsn: Lsn,
    /// The last segment ended with its EndOfSegment record.
    pub last_segment_sealed: bool,
    /// Where a torn record began in the last segment (a crash mid-append).
    pub torn_tail_offset: Option<u64>,
    /// Bytes set to zero after the last valid record (torn tail and garbage).
    pub bytes_zeroed: u64,
    /// `[start, end)` of the nonzero bytes past the torn record (or past the
    /// end-of-data marker) that were zeroed: damage, recorded in
    /// [`REPAIRS_FILE`].
    pub zeroed_past_tail: Option<(u64, u64)>,
    /// Byte ranges `[start, end)` of mid-segment corruption skipped over.
    pub skipped_ranges: Vec<(u64, u64)>,
}

/// Where appends continue.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The last segment, to append to; `None` when a new segment must be started.
    pub active: Option<ActiveSegment>,
    /// The LSN of the next record (event or EndOfSegment).
    pub next_lsn: Lsn,
    pub report: RecoveryReport,
}

/// Recovers the stream in `dir`. `durable_hint` is the `durable.lsn` sidecar's
/// value, if readable: LSNs up to it may have been loaded by a reader, so they
/// are never reused even if their segments are gone.
pub(crate) fn recover(dir: &StreamDir, durable_hint: Option<Lsn>) -> Result<Recovered, WalError> {
    let _span = tracing::info_span!("wal_recovery", stream = dir.name()).entered();
    let mut report = RecoveryReport {
        removed_tmp_files: dir.remove_tmp_files()?,
        ..RecoveryReport::default()
    };
    if report.removed_tmp_files > 0 {
        tracing::info!(
            count = report.removed_tmp_files,
            "removed unfinished segment files"
        );
    }
    let mut segments = dir.segments()?;
    report.segments_found = segments.len();

    // A power loss can keep a new segment's name but not its header (the writer
    // renames it in without an fsync and the flusher syncs it before the first
    // durable LSN inside it; a loader's directory fsync after retiring an older
    // segment can make the name durable first): such trailing segments hold
    // nothing durable.
    while let Some(last) = segments.last() {
        if !header_is_zero(&last.path)? {
            break;
        }
        tracing::warn!(
            segment = %last.path.display(),
            "removing a trailing segment whose header never reached the disk (power loss \
             right after a rotation); it held no durable record"
        );
        dir.fs()
            .remove_file(&last.path)
            .map_err(|e| WalError::io("remove headerless segment", &last.path, e))?;
        report.removed_headerless_segments += 1;
        segments.pop();
    }

    // Segments before the last: make records beyond the watermark durable.
    for pair in segments.windows(2) {
        let last_lsn_in_segment = pair[1].first_lsn.saturating_sub(1);
        if durable_hint.is_none_or(|d| last_lsn_in_segment > d) {
            let path = &pair[0].path;
            let file = File::open(path).map_err(|e| WalError::io("open segment", path, e))?;
            dir.fs()
                .sync_data(&file, path)
                .map_err(|e| WalError::io("fdatasync segment", path, e))?;
        }
    }

    let floor = durable_hint.map_or(1, |d| d.saturating_add(1));
    let Some(last) = segments.last() else {
        report.last_lsn = durable_hint.unwrap_or(0);
        return Ok(Recovered {
            active: None,
            next_lsn: floor,
            report,
        });
    };

    let segment = Segment::open(dir.fs(), &last.path, last.first_lsn)?;
    let scan = scan_last_segment(&segment, dir.name())?;
    report.records_in_last_segment = scan.events;
    report.skipped_ranges = scan.skipped;
    report.torn_tail_offset = scan.torn_tail.map(|o| o as u64);

    let (mut active, mut next_lsn) = if let Some(eos) = scan.sealed_at {
        report.last_segment_sealed = true;
        report.last_lsn = eos;
        (None, eos + 1)
    } else {
        // SAFETY: no appender exists for this segment yet (it is created below,
        // after this call), and the stream lock keeps other writers out; the
        // slice is not used after this statement, before the zeroing writes.
        let past = past_tail(
            unsafe { segment.bytes() },
            scan.resume_offset,
            scan.torn_tail,
        );
        if let Some((start, end)) = past {
            tracing::warn!(
                segment = %last.path.display(),
                start,
                end,
                "zeroing nonzero bytes past the end of the last record that no valid \
                 record accounts for (records after a lost page, or garbage): records \
                 there, if any, are lost; noted in {REPAIRS_FILE} for `auditwal verify`"
            );
            record_repair(
                dir,
                &Repair {
                    recovered_at: Utc::now(),
                    segment: file_name(&last.path),
                    start: start as u64,
                    end: end as u64,
                    torn_tail_offset: scan.torn_tail.map(|o| o as u64),
                    last_lsn: scan.last_lsn.unwrap_or(last.first_lsn.saturating_sub(1)),
                },
            )?;
            report.zeroed_past_tail = Some((start as u64, end as u64));
        }
        // SAFETY: as above.
        report.bytes_zeroed = unsafe { segment.zero_from(scan.resume_offset) };
        if scan.resume_offset + format::EOS_FRAME_LEN > segment.len() {
            return Err(WalError::Corrupt {
                path: last.path.clone(),
                offset: scan.resume_offset as u64,
                reason: "no room left for the end-of-segment record".into(),
            });
        }
        segment
            .sync_data()
            .map_err(|e| WalError::io("fdatasync segment", &last.path, e))?;
        let next = scan.last_lsn.map_or(last.first_lsn, |l| l + 1);
        report.last_lsn = next - 1;
        report.resumed_segment = Some(last.path.clone());
        (
            Some(ActiveSegment::new(Arc::new(segment), scan.resume_offset)),
            next,
        )
    };
    if let Some(offset) = report.torn_tail_offset {
        tracing::warn!(
            segment = %last.path.display(),
            offset,
            bytes_zeroed = report.bytes_zeroed,
            "cut a torn record at the end of the last segment (a crash during an append); \
             every complete record before it is kept"
        );
    }

    // The watermark says records up to `durable_hint` were fsynced, but they are
    // not all here (segments deleted or damaged). Never reuse those LSNs: a
    // reader may have loaded them, and would skip new events that reuse them.
    if next_lsn < floor {
        tracing::warn!(
            next_lsn,
            durable_lsn = floor - 1,
            "the durable watermark is ahead of the records on disk; continuing after it"
        );
        if let Some(a) = active.as_mut() {
            a.seal(next_lsn)?;
            a.segment()
                .sync_data()
                .map_err(|e| WalError::io("fdatasync segment", &last.path, e))?;
            next_lsn += 1;
        }
        active = None;
        report.resumed_segment = None;
        next_lsn = next_lsn.max(floor);
    }
    dir.sync()?;
    Ok(Recovered {
        active,
        next_lsn,
        report,
    })
}

/// Whether the file's header never reached the disk: its first
/// SEGMENT_HEADER_LEN bytes are all zero, or it is shorter than that and holds
/// only zeros (a power loss can keep the name of a file that was never synced,
/// and a file system that promises only what POSIX does keeps none of its size).
/// A segment whose header reached the disk has its full preallocated size: the
/// fdatasync that made the header durable covered the size too.
fn header_is_zero(path: &std::path::Path) -> Result<bool, WalError> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| WalError::io("open segment", path, e))?;
    let mut header = Vec::with_capacity(format::SEGMENT_HEADER_LEN);
    file.take(format::SEGMENT_HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(|e| WalError::io("read segment header", path, e))?;
    Ok(header.iter().all(|&b| b == 0))
}

/// Where, past `resume` (the end of the last valid record), nonzero bytes lie
/// that the torn record at `resume` (if `torn_at` says there is one) does not
/// account for: `[first nonzero, last nonzero + 1)`.
fn past_tail(bytes: &[u8], resume: usize, torn_at: Option<usize>) -> Option<(usize, usize)> {
    let tail_end = match torn_at {
        Some(at) => at + format::torn_frame_len(bytes.get(at..).unwrap_or(&[])),
        None => resume,
    }
    .max(resume)
    .min(bytes.len());
    let rest = &bytes[tail_end..];
    let first = rest.iter().position(|&b| b != 0)?;
    let last = rest.iter().rposition(|&b| b != 0)?;
    Some((tail_end + first, tail_end + last + 1))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file in a stream directory where recovery notes the data it destroyed.
pub const REPAIRS_FILE: &str = "repairs.jsonl";

/// One line of [`REPAIRS_FILE`]: nonzero bytes `[start, end)` of `segment` that
/// lay past its torn tail (or end-of-data marker) and that recovery zeroed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    pub recovered_at: DateTime<Utc>,
    /// The segment's file name.
    pub segment: String,
    pub start: u64,
    pub end: u64,
    /// Where the torn record began, if there was one (else the data ended at a
    /// zeroed frame header).
    pub torn_tail_offset: Option<u64>,
    /// The last valid LSN before the zeroed bytes.
    pub last_lsn: Lsn,
}

impl Repair {
    /// One line for a damage report.
    pub fn report(&self) -> String {
        format!(
            "{}: bytes [{}, {}): nonzero data past the end of the last record (LSN {}) was zeroed by recovery at {}; records there, if any, are lost",
            self.segment,
            self.start,
            self.end,
            self.last_lsn,
            self.recovered_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }
}

/// Appends `repair` to the stream's [`REPAIRS_FILE`] and makes it durable, before
/// the zeroing it describes can be.
fn record_repair(dir: &StreamDir, repair: &Repair) -> Result<(), WalError> {
    let path = dir.path().join(REPAIRS_FILE);
    let io_err = |op, e| WalError::io(op, &path, e);
    let existed = path.exists();
    let file = dir
        .fs()
        .open_or_create(&path)
        .map_err(|e| io_err("open the repair notes", e))?;
    let end = file
        .metadata()
        .map_err(|e| io_err("stat the repair notes", e))?
        .len();
    let mut line = serde_json::to_vec(repair)
        .map_err(|e| io_err("encode a repair note", io::Error::other(e)))?;
    line.push(b'\n');
    dir.fs()
        .write_at(&file, &path, &line, end)
        .map_err(|e| io_err("write the repair notes", e))?;
    dir.fs()
        .sync_data(&file, &path)
        .map_err(|e| io_err("fsync the repair notes", e))?;
    if !existed {
        dir.sync()?;
    }
    Ok(())
}

/// The repair notes of the stream in `stream_dir`, in order; a line that does
/// not parse is returned as its text. No file: none.
pub fn read_repairs(stream_dir: &Path) -> io::Result<Vec<Result<Repair, String>>> {
    let text = match std::fs::read_to_string(stream_dir.join(REPAIRS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|_| l.to_string()))
        .collect())
}

/// The facts recovery needs from the last segment.
struct LastSegmentScan {
    /// Valid event records.
    events: u64,
    last_lsn: Option<Lsn>,
    /// End of the last valid record (or the header): where appends resume.
    resume_offset: usize,
    sealed_at: Option<Lsn>,
    torn_tail: Option<usize>,
    skipped: Vec<(u64, u64)>,
}

fn scan_last_segment(segment: &Segment, stream: &str) -> Result<LastSegmentScan, WalError> {
    let path = segment.path();
    // SAFETY: recovery runs before the segment has an appender (see `recover`).
    let bytes = unsafe { segment.bytes() };
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let header = SegmentHeader::decode(bytes).map_err(|e| corrupt(0, e.to_string()))?;
    if header.stream_id != stream {
        return Err(corrupt(
            24,
            format!("header names stream `{}`, not `{stream}`", header.stream_id),
        ));
    }
    if header.first_lsn != segment.first_lsn() {
        return Err(corrupt(
            16,
            format!(
                "header's first LSN {} does not match the file name's {}",
                header.first_lsn,
                segment.first_lsn()
            ),
        ));
    }
    let mut events = 0;
    let mut skipped = Vec::new();
    let end = format::scan_to_end(bytes, |item| {
        match item {
            ScanItem::BadHeader { error } => return Err(corrupt(0, error.to_string())),
            ScanItem::Record { record, .. } => {
                if record.kind == RecordKind::Event {
                    events += 1;
                }
            }
            ScanItem::LsnGap {
                offset,
                expected,
                found,
            } => tracing::warn!(
                segment = %path.display(),
                offset,
                expected,
                found,
                "records are missing from the last segment (LSN gap)"
            ),
            ScanItem::Skipped { start, end, error } => {
                tracing::warn!(
                    segment = %path.display(),
                    start,
                    end,
                    %error,
                    "skipped a damaged range in the last segment; the records after it are kept"
                );
                skipped.push((*start as u64, *end as u64));
            }
            ScanItem::TornTail { .. } | ScanItem::EndOfData { .. } | ScanItem::Sealed { .. } => {}
        }
        Ok(())
    })?;
    Ok(LastSegmentScan {
        events,
        last_lsn: end.last_lsn,
        resume_offset: end.offset,
        sealed_at: end.sealed_at,
        torn_tail: end.torn_tail,
        skipped,
    })
}
