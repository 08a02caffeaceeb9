//! Reading a stream's segments back: records from any LSN, through memory maps.
//!
//! This module owns finding and mapping the segment files of a stream directory
//! (`WAL_DIR/<stream>/<first-lsn>.seg`), walking them in LSN order with
//! `wal::format`'s scanner, decoding event payloads, and telling its caller what
//! it found: events, damage (skipped ranges, torn tails, bad headers, LSN gaps,
//! undecodable payloads) and fully consumed segments. It keeps one invariant for
//! its caller, the loader: every item is returned once, in LSN order, and a record
//! is only returned as valid when its checksum vouches for every byte of it.
//!
//! A [`StreamReader`] can be called again after it reports "nothing more for now"
//! (`Ok(None)`): it resumes where it stopped and sees records appended since and
//! segments created since. That is the loader's loop (read batch → COPY → commit
//! → next). Because the writer may be appending to the last segment while it is
//! read, an invalid frame at the tail of that *live* segment may be an append in
//! progress; in [`Follow::Live`] mode it is reported only once it is clearly
//! damage: a newer segment exists, or the durable watermark (`up_to`) says records
//! were made durable beyond it. Memory stays bounded whatever the segment size:
//! frames are decoded from the map, never copied whole, and consumed ranges are
//! released from the process with `madvise(MADV_DONTNEED)`.
//!
//! Deleting or archiving consumed segments, checkpoints and retries are the
//! loader's; writing and recovering segments are `wal::writer`'s and
//! `wal::recovery`'s.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};

use crate::wal::format::{
    check_after_end, decode_durable_lsn, decode_frame, parse_segment_file_name, validate_stream_id,
    AfterEnd, FormatError, FrameOutcome, Lsn, RecordKind, ScanItem, ScanPosition, SegmentHeader,
    SegmentScan, DURABLE_LSN_FILE, DURABLE_LSN_LEN, SEGMENT_HEADER_LEN,
};
use crate::wal::payload::{decode_event, PayloadError, WalEvent};

/// Consumed bytes are handed back to the kernel in steps of this size (a multiple
/// of every page size Linux uses), so the reader's resident set stays within a
/// few MiB of the frames it is decoding, however large the segment.
const RELEASE_STEP: usize = 1 << 20;

/// Why reading failed. Damage found *in* the data is not an error: it is reported
/// as a [`ReadItem`] and reading goes on. These are failures to get at the data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("cannot list directory {path}: {source}")]
    ListDir { path: PathBuf, source: io::Error },
    #[error("cannot open segment {path}: {source}")]
    OpenSegment { path: PathBuf, source: io::Error },
    #[error("cannot memory-map segment {path}: {source}")]
    MapSegment { path: PathBuf, source: io::Error },
    #[error("cannot read durable watermark {path}: {source}")]
    ReadDurable { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a segment file (no <20-digit LSN>.seg name and no valid segment header)"
    )]
    NotASegment { path: PathBuf },
}

/// What is wrong with a segment as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    /// The header did not decode.
    #[error("{0}")]
    Format(FormatError),
    /// The header's first LSN is not the one in the file name.
    #[error("file name says first LSN {name_lsn}, header says {header_lsn}")]
    NameMismatch { name_lsn: Lsn, header_lsn: Lsn },
    /// The header names another stream than the directory it is in.
    #[error("segment belongs to stream {header_stream:?}, found in directory {dir_stream:?}")]
    StreamMismatch {
        dir_stream: String,
        header_stream: String,
    },
}

/// One thing a [`StreamReader`] found, in LSN order.
// `Event` is by far the most common item; boxing it to shrink the rare damage
// variants would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ReadItem {
    /// A valid event record. `offset` is the frame's byte offset in its segment
    /// ([`StreamReader::current_segment`]).
    Event {
        lsn: Lsn,
        offset: u64,
        event: WalEvent,
        /// The record's payload bytes: what the hash chain covers and the
        /// table keeps in `wal_payload`.
        payload: Vec<u8>,
    },
    /// A signed checkpoint of the stream's hash chain: the note's bytes, not
    /// yet parsed or checked (`chain::Checkpoint`).
    Checkpoint { lsn: Lsn, offset: u64, note: Vec<u8> },
    /// A record whose checksum is valid but whose payload does not decode (a bug
    /// or a newer payload version): the loader dead-letters it and goes on.
    Undecodable {
        segment: PathBuf,
        offset: u64,
        lsn: Lsn,
        error: PayloadError,
    },
    /// Mid-segment corruption: bytes `[start, end)` held no valid frame; reading
    /// resumed at the valid frame at `end`.
    Skipped {
        segment: PathBuf,
        start: u64,
        end: u64,
        error: FormatError,
    },
    /// An invalid frame at `offset` with nothing valid after it in a segment that
    /// is no longer being written: the tail of a crashed append.
    TornTail {
        segment: PathBuf,
        offset: u64,
        error: FormatError,
    },
    /// The segment's header is unusable. When `skipped` the whole segment was
    /// passed over (not a segment, another stream's); otherwise its frames were
    /// still read.
    BadHeader {
        segment: PathBuf,
        problem: HeaderProblem,
        skipped: bool,
    },
    /// LSNs `expected..found` are missing (within a segment, or between the
    /// previous segment, or the requested start, and `segment`'s first record).
    Gap {
        segment: PathBuf,
        expected: Lsn,
        found: Lsn,
    },
    /// Every record of `segment` has been returned: it ended with an
    /// end-of-segment record (`sealed`) or, unsealed, a newer segment exists.
    /// `last_lsn` is its last valid LSN (the end-of-segment record's when sealed).
    /// The loader may delete or archive it once everything up to `last_lsn` is
    /// committed.
    SegmentConsumed {
        segment: PathBuf,
        first_lsn: Lsn,
        last_lsn: Option<Lsn>,
        sealed: bool,
    },
}

impl ReadItem {
    /// True for the items that report damage.
    pub fn is_damage(&self) -> bool {
        !matches!(
            self,
            ReadItem::Event { .. } | ReadItem::Checkpoint { .. } | ReadItem::SegmentConsumed { .. }
        )
    }

    /// One line for a damage report (`verify`, the loader's log): what, where,
    /// and what it means; `None` for an event or a consumed segment.
    pub fn damage_report(&self) -> Option<String> {
        Some(match self {
            ReadItem::Skipped {
                segment,
                start,
                end,
                error,
            } => format!(
                "{}: bytes [{start}, {end}): corrupt, skipped ({error}); records after it were read",
                segment.display()
            ),
            ReadItem::TornTail {
                segment,
                offset,
                error,
            } => format!(
                "{}: bytes [{offset}, end): torn tail ({error}); if a writer is still appending to this segment, this may be a record being written",
                segment.display()
            ),
            ReadItem::BadHeader {
                segment,
                problem,
                skipped,
            } => format!(
                "{}: bytes [0, 64): bad segment header ({problem}){}",
                segment.display(),
                if *skipped {
                    "; segment not read"
                } else {
                    "; its records were still read"
                }
            ),
            ReadItem::Gap {
                segment,
                expected,
                found,
            } => format!(
                "{}: LSNs {expected}..{} missing (next record found is LSN {found})",
                segment.display(),
                found - 1
            ),
            ReadItem::Undecodable {
                segment,
                offset,
                lsn,
                error,
            } => format!(
                "{}: byte {offset}: record LSN {lsn} has a valid checksum but its payload does not decode ({error})",
                segment.display()
            ),
            ReadItem::Event { .. } | ReadItem::Checkpoint { .. } | ReadItem::SegmentConsumed { .. } => {
                return None
            }
        })
    }
}

/// Whether the stream may still be written while it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// A writer may be appending to the last segment: an invalid frame at its tail
    /// is waited on, not reported, until it is clearly damage.
    Live,
    /// Nothing writes the stream (a copy, a stopped writer, `verify`): every
    /// segment is final and damage is reported as soon as it is seen.
    AtRest,
}

/// A segment file in a stream directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    pub first_lsn: Lsn,
    pub path: PathBuf,
}

/// The entries of `dir`; a failure to list it, or to read one of them, names
/// `dir`.
fn dir_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, ReadError> {
    let list_dir = |source| ReadError::ListDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(list_dir)?
        .map(|entry| entry.map_err(list_dir))
        .collect()
}

/// The streams in a WAL directory: subdirectories with valid stream names, sorted.
pub fn list_streams(wal_dir: &Path) -> Result<Vec<String>, ReadError> {
    let mut streams = Vec::new();
    for entry in dir_entries(wal_dir)? {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && validate_stream_id(&name).is_ok() {
            streams.push(name);
        }
    }
    streams.sort();
    Ok(streams)
}

/// True when `dir` is a stream directory: it holds the writer's `LOCK` or the
/// `durable.lsn` watermark, which a writer creates before its first segment. A
/// stream directory without segments is an empty stream (its writer stopped
/// before the first segment was in place), not a mistaken path.
pub fn is_stream_dir(dir: &Path) -> bool {
    dir.join(super::stream_dir::LOCK_FILE).is_file()
        || dir.join(super::format::DURABLE_LSN_FILE).is_file()
}

/// The segment files of a stream directory in LSN order. `*.seg.tmp` files (being
/// created), `LOCK`, `durable.lsn` and anything else are ignored.
pub fn list_segments(stream_dir: &Path) -> Result<Vec<SegmentFile>, ReadError> {
    let mut segments = Vec::new();
    for entry in dir_entries(stream_dir)? {
        let Some(first_lsn) = entry.file_name().to_str().and_then(parse_segment_file_name) else {
            continue;
        };
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            segments.push(SegmentFile {
                first_lsn,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// The newest checkpoint record of the stream in `stream_dir` that `accept`
/// takes (it gets the record's LSN and note bytes): what `accept` made of it,
/// its LSN and its segment. Segments are read newest first, and the search
/// stops in the first one holding such a record. The writer resumes its hash
/// chain from it; `verify-db --wal-dir` compares the table with it.
pub fn newest_checkpoint<T>(
    stream_dir: &Path,
    mut accept: impl FnMut(Lsn, &[u8]) -> Option<T>,
) -> Result<Option<(T, Lsn, PathBuf)>, ReadError> {
    for seg in list_segments(stream_dir)?.iter().rev() {
        let bytes = std::fs::read(&seg.path).map_err(|source| ReadError::OpenSegment {
            path: seg.path.clone(),
            source,
        })?;
        let mut newest = None;
        for item in crate::wal::format::scan_segment(&bytes) {
            if let ScanItem::Record { record, .. } = item {
                if record.kind == RecordKind::Checkpoint {
                    if let Some(t) = accept(record.lsn, record.payload) {
                        newest = Some((t, record.lsn));
                    }
                }
            }
        }
        if let Some((t, lsn)) = newest {
            return Ok(Some((t, lsn, seg.path.clone())));
        }
    }
    Ok(None)
}

/// The durable watermark of a stream: every record up to this LSN has been
/// fsynced. 0 when the sidecar does not exist yet or does not check out (it is
/// rewritten in place after each fsync; a torn read is retried a few times, then
/// read as 0, which only makes the caller wait).
pub fn read_durable_lsn(stream_dir: &Path) -> Result<Lsn, ReadError> {
    let path = stream_dir.join(DURABLE_LSN_FILE);
    for _ in 0..3 {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(ReadError::ReadDurable { path, source }),
        };
        match decode_durable_lsn(&bytes) {
            Ok(lsn) => return Ok(lsn),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, len = DURABLE_LSN_LEN, "durable watermark did not check out; retrying");
            }
        }
    }
    Ok(0)
}

/// Where the segments come from.
#[derive(Debug)]
enum Source {
    /// A stream directory; `stream` is its name when it is a valid stream id.
    Dir {
        path: PathBuf,
        stream: Option<String>,
    },
    /// One segment file, read at rest.
    File(SegmentFile),
}

/// The segment being read.
struct OpenSegment {
    file: SegmentFile,
    /// Kept to re-check the length of a live segment.
    handle: File,
    /// `None` when the file is shorter than a header (nothing worth mapping).
    map: Option<Mmap>,
    pos: ScanPosition,
    /// Bytes before this offset have been released with MADV_DONTNEED.
    released: usize,
    /// No more records will be read from this segment (sealed, torn, or at the end
    /// of a segment that a newer one follows); `SegmentConsumed` goes out next.
    finished: bool,
    /// The whole segment was passed over (unreadable header, another stream's):
    /// it is not reported consumed, so the loader does not delete it.
    skipped: bool,
    sealed: bool,
    /// A live segment's torn tail already reported at this offset: it is not
    /// reported again while nothing valid appears after it.
    torn_at: Option<usize>,
}

impl OpenSegment {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    fn open(file: SegmentFile) -> Result<OpenSegment, ReadError> {
        let handle = File::open(&file.path).map_err(|source| ReadError::OpenSegment {
            path: file.path.clone(),
            source,
        })?;
        let mut seg = OpenSegment {
            file,
            handle,
            map: None,
            pos: ScanPosition::at_first_frame(None),
            released: 0,
            finished: false,
            skipped: false,
            sealed: false,
            torn_at: None,
        };
        seg.remap_if_grown()?;
        Ok(seg)
    }

    /// Maps the file again when it is longer than the current map (a live segment
    /// is preallocated so this is rare, but a writer may extend it).
    fn remap_if_grown(&mut self) -> Result<(), ReadError> {
        let len = self
            .handle
            .metadata()
            .map_err(|source| ReadError::OpenSegment {
                path: self.file.path.clone(),
                source,
            })?
            .len();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < SEGMENT_HEADER_LEN || len <= self.bytes().len() {
            return Ok(());
        }
        // SAFETY: the map is read-only and private to this reader. Other processes
        // may write the file while it is mapped: the writer only fills bytes that
        // were zero (appends) or zeroes a torn tail during recovery, so a concurrent
        // read sees either old or new bytes of a frame and the CRC, checked before a
        // frame's content is believed, rejects any mix. No writer shrinks a segment
        // file (docs/segment-format.md, "Files"); a file truncated by someone else
        // would raise SIGBUS here, the limit of reading through maps that
        // docs/segment-format.md documents. Deleting the file does not affect the map.
        let map = unsafe { Mmap::map(&self.handle) }.map_err(|source| ReadError::MapSegment {
            path: self.file.path.clone(),
            source,
        })?;
        self.map = Some(map);
        self.released = 0;
        Ok(())
    }

    /// Hands consumed pages back to the kernel so resident memory does not grow
    /// with the segment.
    fn release_consumed(&mut self) {
        let upto = self.pos.offset / RELEASE_STEP * RELEASE_STEP;
        if upto <= self.released {
            return;
        }
        if let Some(map) = &self.map {
            let upto = upto.min(map.len() / RELEASE_STEP * RELEASE_STEP);
            if upto > self.released {
                // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops
                // this process's page table entries: a later access faults the same
                // file contents back in from the page cache, so no borrowed slice can
                // observe different data than a re-read would. No slice of the map is
                // alive here (items are decoded into owned values before this runs),
                // and the range lies inside the map and starts page-aligned.
                let advised = unsafe {
                    map.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        self.released,
                        upto - self.released,
                    )
                };
                if let Err(e) = advised {
                    tracing::debug!(error = %e, "madvise(DONTNEED) failed; memory is only released at unmap");
                }
                self.released = upto;
            }
        }
    }
}

/// Reads one stream's records in LSN order, from any LSN, resumably.
pub struct StreamReader {
    source: Source,
    follow: Follow,
    /// The next LSN the caller has not seen: records below it are skipped.
    next_lsn: Lsn,
    current: Option<OpenSegment>,
    /// First LSN (file name) of the last segment finished, so the next one is the
    /// first with a higher name.
    last_finished: Option<Lsn>,
    /// Items found together with the one returned (e.g. a gap before a record).
    pending: VecDeque<ReadItem>,
}

impl StreamReader {
    /// Reads the stream directory `stream_dir` from `from_lsn` on (records below it
    /// are skipped; use 1 for everything).
    pub fn open(stream_dir: &Path, from_lsn: Lsn, follow: Follow) -> StreamReader {
        let stream = stream_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| validate_stream_id(n).is_ok())
            .map(str::to_string);
        StreamReader {
            source: Source::Dir {
                path: stream_dir.to_path_buf(),
                stream,
            },
            follow,
            next_lsn: from_lsn.max(1),
            current: None,
            last_finished: None,
            pending: VecDeque::new(),
        }
    }

    /// Reads one segment file, at rest, from `from_lsn` on. A file whose name is
    /// not a segment's (`<20-digit first LSN>.seg`, e.g. a copy kept for analysis)
    /// is accepted when its header decodes; otherwise it is
    /// [`ReadError::NotASegment`]. A segment-named file with a damaged header is
    /// read, and the damage reported, like any other.
    pub fn open_segment_file(path: &Path, from_lsn: Lsn) -> Result<StreamReader, ReadError> {
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_segment_file_name);
        let first_lsn = match named {
            Some(lsn) => lsn,
            None => {
                let not_a_segment = || ReadError::NotASegment {
                    path: path.to_path_buf(),
                };
                let mut header = [0u8; SEGMENT_HEADER_LEN];
                let mut file = File::open(path).map_err(|source| ReadError::OpenSegment {
                    path: path.to_path_buf(),
                    source,
                })?;
                if !file.metadata().is_ok_and(|m| m.is_file()) {
                    return Err(not_a_segment());
                }
                io::Read::read_exact(&mut file, &mut header).map_err(|_| not_a_segment())?;
                SegmentHeader::decode(&header)
                    .map_err(|_| not_a_segment())?
                    .first_lsn
            }
        };
        Ok(StreamReader {
            source: Source::File(SegmentFile {
                first_lsn,
                path: path.to_path_buf(),
            }),
            follow: Follow::AtRest,
            next_lsn: from_lsn.max(1),
            current: None,
            last_finished: None,
            pending: VecDeque::new(),
        })
    }

    /// The next LSN this reader will return (one past the last record returned or
    /// skipped).
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The segment being read, if any (the one an [`ReadItem::Event`]'s offset is in).
    pub fn current_segment(&self) -> Option<&Path> {
        self.current.as_ref().map(|s| s.file.path.as_path())
    }

    /// Appends up to `max_items` items to `out`, stopping early when nothing more
    /// is available now; returns how many were appended. See [`Self::next_item`].
    pub fn read_batch(
        &mut self,
        max_items: usize,
        up_to: Option<Lsn>,
        out: &mut Vec<ReadItem>,
    ) -> Result<usize, ReadError> {
        let mut n = 0;
        while n < max_items {
            match self.next_item(up_to)? {
                Some(item) => {
                    out.push(item);
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n)
    }

    /// The next item, or `Ok(None)` when nothing more is available now: the end of
    /// the written data, a record above `up_to` (pass the durable watermark,
    /// [`read_durable_lsn`], to read only what a power loss cannot take back), or
    /// a live segment's tail that may be an append in progress. Call again later
    /// to continue.
    pub fn next_item(&mut self, up_to: Option<Lsn>) -> Result<Option<ReadItem>, ReadError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            let Some(mut seg) = self.current.take() else {
                if !self.open_next_segment()? {
                    return Ok(None);
                }
                continue;
            };
            let step = self.step(&mut seg, up_to);
            match step {
                Ok(Step::Wait) => {
                    seg.release_consumed();
                    self.current = Some(seg);
                    return Ok(None);
                }
                Ok(Step::Continue) => {
                    seg.release_consumed();
                    self.current = Some(seg);
                }
                Ok(Step::Done) => {
                    self.last_finished = Some(seg.file.first_lsn);
                    if seg.skipped {
                        continue;
                    }
                    let consumed = ReadItem::SegmentConsumed {
                        segment: seg.file.path.clone(),
                        first_lsn: seg.pos.first_lsn.unwrap_or(seg.file.first_lsn),
                        last_lsn: seg.pos.last_lsn,
                        sealed: seg.sealed,
                    };
                    self.pending.push_back(consumed);
                }
                Err(e) => {
                    self.current = Some(seg);
                    return Err(e);
                }
            }
        }
    }

    /// Opens the segment to read next, queueing any header findings. Returns false
    /// when there is none (yet).
    fn open_next_segment(&mut self) -> Result<bool, ReadError> {
        let candidates = match &self.source {
            Source::File(file) => {
                if self.last_finished.is_some() {
                    return Ok(false);
                }
                vec![file.clone()]
            }
            Source::Dir { path, .. } => list_segments(path)?,
        };
        let next = match self.last_finished {
            Some(done) => candidates.into_iter().find(|s| s.first_lsn > done),
            None => {
                // The last segment starting at or before the wanted LSN, or the
                // first one when all start after it.
                let idx = candidates
                    .iter()
                    .rposition(|s| s.first_lsn <= self.next_lsn)
                    .unwrap_or(0);
                candidates.into_iter().nth(idx)
            }
        };
        let Some(file) = next else { return Ok(false) };
        let mut seg = OpenSegment::open(file)?;
        self.check_header(&mut seg);
        self.current = Some(seg);
        Ok(true)
    }

    /// Decodes the header, compares it with the file name and directory, and
    /// reports a gap when the segment starts after the next wanted LSN.
    fn check_header(&mut self, seg: &mut OpenSegment) {
        let path = seg.file.path.clone();
        let header = match SegmentHeader::decode(seg.bytes()) {
            Ok(h) => h,
            Err(error) => {
                let fatal = error.makes_segment_unreadable();
                seg.finished = fatal;
                seg.skipped = fatal;
                self.pending.push_back(ReadItem::BadHeader {
                    segment: path,
                    problem: HeaderProblem::Format(error),
                    skipped: fatal,
                });
                return;
            }
        };
        if let Source::Dir {
            stream: Some(stream),
            ..
        } = &self.source
        {
            if *stream != header.stream_id {
                // Another stream's records must not be loaded as this stream's.
                seg.finished = true;
                seg.skipped = true;
                self.pending.push_back(ReadItem::BadHeader {
                    segment: path,
                    problem: HeaderProblem::StreamMismatch {
                        dir_stream: stream.clone(),
                        header_stream: header.stream_id,
                    },
                    skipped: true,
                });
                return;
            }
        }
        if header.first_lsn != seg.file.first_lsn {
            self.pending.push_back(ReadItem::BadHeader {
                segment: path.clone(),
                problem: HeaderProblem::NameMismatch {
                    name_lsn: seg.file.first_lsn,
                    header_lsn: header.first_lsn,
                },
                skipped: false,
            });
        }
        seg.pos.first_lsn = Some(header.first_lsn);
        if header.first_lsn > self.next_lsn {
            self.pending.push_back(ReadItem::Gap {
                segment: path,
                expected: self.next_lsn,
                found: header.first_lsn,
            });
            self.next_lsn = header.first_lsn;
        }
    }

    /// Whether a segment newer than `seg` exists, which makes `seg` final: the
    /// writer creates a new segment only after it is done with the previous one.
    fn newer_segment_exists(&self, seg: &OpenSegment) -> Result<bool, ReadError> {
        match &self.source {
            Source::File(_) => Ok(false),
            Source::Dir { path, .. } => Ok(list_segments(path)?
                .iter()
                .any(|s| s.first_lsn > seg.file.first_lsn)),
        }
    }

    /// Whether `seg` can no longer change, so its tail can be judged.
    fn is_final(&self, seg: &OpenSegment) -> Result<bool, ReadError> {
        Ok(self.follow == Follow::AtRest || self.newer_segment_exists(seg)?)
    }

    /// One scanner step on the current segment.
    fn step(&mut self, seg: &mut OpenSegment, up_to: Option<Lsn>) -> Result<Step, ReadError> {
        if seg.finished {
            return Ok(Step::Done);
        }
        let expected = seg
            .pos
            .last_lsn
            .map(|l| l.saturating_add(1))
            .or(seg.pos.first_lsn);
        if let (Some(limit), Some(expected)) = (up_to, expected) {
            if expected > limit {
                return Ok(Step::Wait);
            }
        }
        // First look without the scanner: is there a frame, the end of the data, or
        // something invalid that might be an append in progress?
        let offset = seg.pos.offset;
        let outcome = decode_frame(seg.bytes().get(offset..).unwrap_or(&[]));
        match outcome {
            FrameOutcome::Record { .. } => {}
            FrameOutcome::EndOfData => {
                if self.follow == Follow::Live {
                    seg.remap_if_grown()?;
                }
                if !self.is_final(seg)? {
                    return Ok(Step::Wait);
                }
                // Final now; look once more, as records may have been appended
                // between the look above and the listing.
            }
            FrameOutcome::Invalid(_) => {
                let durable_beyond = matches!((up_to, expected), (Some(l), Some(e)) if e <= l);
                if !durable_beyond && !self.is_final(seg)? {
                    return Ok(Step::Wait);
                }
            }
        }
        let bytes = seg.map.as_deref().unwrap_or(&[]);
        let mut scan = SegmentScan::resume(bytes, seg.pos);
        let Some(item) = scan.next() else {
            return Ok(Step::Done);
        };
        let path = &seg.file.path;
        // Where `item` would leave the scan; committed unless the item must wait.
        let after = scan.position();
        let step = match item {
            ScanItem::Record { offset, record } => {
                if up_to.is_some_and(|l| record.lsn > l) {
                    return Ok(Step::Wait);
                }
                if record.lsn >= self.next_lsn {
                    self.next_lsn = record.lsn.saturating_add(1);
                    if record.kind == RecordKind::Checkpoint {
                        self.pending.push_back(ReadItem::Checkpoint {
                            lsn: record.lsn,
                            offset: offset as u64,
                            note: record.payload.to_vec(),
                        });
                    }
                    if record.kind == RecordKind::Event {
                        self.pending.push_back(match decode_event(record.payload) {
                            Ok(event) => ReadItem::Event {
                                lsn: record.lsn,
                                offset: offset as u64,
                                event,
                                payload: record.payload.to_vec(),
                            },
                            Err(error) => ReadItem::Undecodable {
                                segment: path.clone(),
                                offset: offset as u64,
                                lsn: record.lsn,
                                error,
                            },
                        });
                    }
                }
                if record.kind == RecordKind::EndOfSegment {
                    seg.finished = true;
                    seg.sealed = true;
                }
                Step::Continue
            }
            ScanItem::LsnGap {
                expected, found, ..
            } => {
                if up_to.is_some_and(|l| found > l) {
                    return Ok(Step::Wait);
                }
                if found > self.next_lsn {
                    self.pending.push_back(ReadItem::Gap {
                        segment: path.clone(),
                        expected: expected.max(self.next_lsn),
                        found,
                    });
                }
                Step::Continue
            }
            ScanItem::Skipped { start, end, error } => {
                // The records lost in the range have LSNs below the one resumed at;
                // they matter only if some were not yet returned or skipped.
                let resumed_lsn = match decode_frame(bytes.get(end..).unwrap_or(&[])) {
                    FrameOutcome::Record { record, .. } => Some(record.lsn),
                    _ => None,
                };
                if resumed_lsn.is_none_or(|r| r > self.next_lsn) {
                    self.pending.push_back(ReadItem::Skipped {
                        segment: path.clone(),
                        start: start as u64,
                        end: end as u64,
                        error,
                    });
                }
                seg.torn_at = None;
                Step::Continue
            }
            ScanItem::TornTail { offset, error } => {
                if self.is_final(seg)? {
                    seg.finished = true;
                } else if seg.torn_at == Some(offset) {
                    // Reported already; wait for the writer (or its recovery).
                    return Ok(Step::Wait);
                } else {
                    // A live segment: the writer may still append after the damage
                    // (or zero it when it recovers), so keep reading it later.
                    seg.torn_at = Some(offset);
                }
                self.pending.push_back(ReadItem::TornTail {
                    segment: path.clone(),
                    offset: offset as u64,
                    error,
                });
                Step::Continue
            }
            ScanItem::EndOfData { offset } => {
                // The segment is final here (checked above). A zeroed header with
                // data after it is damage (e.g. a page lost on power failure), not
                // the end.
                match check_after_end(bytes, after) {
                    AfterEnd::Zeros => seg.finished = true,
                    AfterEnd::Resync {
                        resume,
                        first_nonzero,
                    } => {
                        self.pending.push_back(ReadItem::Skipped {
                            segment: path.clone(),
                            start: offset as u64,
                            end: resume as u64,
                            error: FormatError::DataAfterEnd { first_nonzero },
                        });
                        seg.pos = ScanPosition {
                            offset: resume,
                            vetted: true,
                            ..after
                        };
                        return Ok(Step::Continue);
                    }
                    AfterEnd::Garbage { first_nonzero } => {
                        seg.finished = true;
                        self.pending.push_back(ReadItem::TornTail {
                            segment: path.clone(),
                            offset: offset as u64,
                            error: FormatError::DataAfterEnd { first_nonzero },
                        });
                    }
                }
                Step::Continue
            }
            ScanItem::Sealed { .. } => {
                seg.finished = true;
                seg.sealed = true;
                Step::Continue
            }
            ScanItem::BadHeader { .. } => Step::Continue,
        };
        seg.pos = after;
        Ok(step)
    }
}

enum Step {
    /// Nothing more now; try again later.
    Wait,
    /// Made progress (maybe queued items); step again.
    Continue,
    /// The segment is finished; report it consumed and move on.
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AuditEvent;
    use crate::wal::format::{encode_durable_lsn, encode_frame, frame_len, segment_file_name};
    use crate::wal::payload::encode_event;
    use std::io::{Seek, SeekFrom, Write};

    /// Builds segment images the way the writer lays them out.
    struct SegmentImage {
        bytes: Vec<u8>,
        next_lsn: Lsn,
        offsets: Vec<usize>,
        write_at: usize,
    }

    impl SegmentImage {
        fn new(stream: &str, first_lsn: Lsn, size: usize) -> Self {
            let mut bytes = vec![0u8; size];
            let header = SegmentHeader {
                stream_id: stream.into(),
                first_lsn,
            };
            bytes[..SEGMENT_HEADER_LEN].copy_from_slice(&header.encode().expect("header"));
            SegmentImage {
                bytes,
                next_lsn: first_lsn,
                offsets: Vec::new(),
                write_at: SEGMENT_HEADER_LEN,
            }
        }

        fn push_event(&mut self, action: &str) -> Lsn {
            let mut payload = Vec::new();
            encode_event(&AuditEvent::new(action), 1.0, &mut payload).expect("payload");
            self.push(RecordKind::Event, &payload)
        }

        fn push(&mut self, kind: RecordKind, payload: &[u8]) -> Lsn {
            let lsn = self.next_lsn;
            let n = encode_frame(&mut self.bytes[self.write_at..], lsn, kind, payload)
                .expect("frame fits");
            self.offsets.push(self.write_at);
            self.write_at += n;
            self.next_lsn += 1;
            lsn
        }

        fn seal(&mut self) -> Lsn {
            self.push(RecordKind::EndOfSegment, &[])
        }
    }

    fn write_file(dir: &Path, first_lsn: Lsn, bytes: &[u8]) -> PathBuf {
        let path = dir.join(segment_file_name(first_lsn));
        std::fs::write(&path, bytes).expect("write segment");
        path
    }

    /// Overwrites part of a file in place (as a writer appending does).
    fn patch(path: &Path, at: usize, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        f.seek(SeekFrom::Start(at as u64)).expect("seek");
        f.write_all(bytes).expect("write");
    }

    fn stream_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("s1");
        std::fs::create_dir(&dir).expect("mkdir");
        (tmp, dir)
    }

    fn drain(r: &mut StreamReader, up_to: Option<Lsn>) -> Vec<ReadItem> {
        let mut out = Vec::new();
        r.read_batch(usize::MAX, up_to, &mut out).expect("read");
        out
    }

    fn event_lsns(items: &[ReadItem]) -> Vec<Lsn> {
        items
            .iter()
            .filter_map(|i| match i {
                ReadItem::Event { lsn, .. } => Some(*lsn),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reads_all_segments_in_order_and_reports_each_consumed() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        for i in 0..5 {
            a.push_event(&format!("a{i}"));
        }
        let eos = a.seal();
        let pa = write_file(&dir, 1, &a.bytes);
        let mut b = SegmentImage::new("s1", eos + 1, 4096);
        b.push_event("b0");
        write_file(&dir, eos + 1, &b.bytes);
        std::fs::write(dir.join("LOCK"), b"").expect("lock");
        std::fs::write(dir.join("00000000000000000099.seg.tmp"), b"junk").expect("tmp");

        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        let items = drain(&mut r, None);
        assert_eq!(event_lsns(&items), vec![1, 2, 3, 4, 5, 7]);
        assert!(items.contains(&ReadItem::SegmentConsumed {
            segment: pa,
            first_lsn: 1,
            last_lsn: Some(6),
            sealed: true
        }));
        assert!(!items.iter().any(ReadItem::is_damage), "{items:?}");
        match &items[0] {
            ReadItem::Event { event, offset, .. } => {
                assert_eq!(event.event.action, "a0");
                assert_eq!(*offset, 64);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next_lsn(), 8);
    }

    #[test]
    fn starts_at_any_lsn_by_segment_name() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        for _ in 0..4 {
            a.push_event("a");
        }
        let eos = a.seal();
        write_file(&dir, 1, &a.bytes);
        let mut b = SegmentImage::new("s1", eos + 1, 4096);
        for _ in 0..4 {
            b.push_event("b");
        }
        write_file(&dir, eos + 1, &b.bytes);
        for from in 1..=10 {
            let mut r = StreamReader::open(&dir, from, Follow::AtRest);
            let got = event_lsns(&drain(&mut r, None));
            let want: Vec<Lsn> = (from..=9).filter(|&l| l != 5).collect();
            assert_eq!(got, want, "from {from}");
        }
    }

    #[test]
    fn stops_at_the_durable_watermark_and_resumes_past_it() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        for _ in 0..6 {
            a.push_event("a");
        }
        write_file(&dir, 1, &a.bytes);
        assert_eq!(
            read_durable_lsn(&dir).expect("read"),
            0,
            "missing sidecar reads as 0"
        );
        std::fs::write(dir.join(DURABLE_LSN_FILE), encode_durable_lsn(4)).expect("sidecar");
        let durable = read_durable_lsn(&dir).expect("read");
        assert_eq!(durable, 4);
        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        assert_eq!(event_lsns(&drain(&mut r, Some(durable))), vec![1, 2, 3, 4]);
        assert_eq!(event_lsns(&drain(&mut r, Some(durable))), Vec::<Lsn>::new());
        assert_eq!(event_lsns(&drain(&mut r, Some(6))), vec![5, 6]);
        let mut bad = encode_durable_lsn(9);
        bad[0] ^= 1;
        std::fs::write(dir.join(DURABLE_LSN_FILE), bad).expect("sidecar");
        assert_eq!(
            read_durable_lsn(&dir).expect("read"),
            0,
            "bad CRC reads as 0"
        );
    }

    #[test]
    fn tailing_sees_appends_to_a_preallocated_segment_and_new_segments() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 8192);
        a.push_event("first");
        let path = write_file(&dir, 1, &a.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        assert_eq!(event_lsns(&drain(&mut r, None)), vec![1]);
        assert!(drain(&mut r, None).is_empty());

        // The writer appends two records in place (the file length does not change).
        let from = a.write_at;
        a.push_event("second");
        a.push_event("third");
        patch(&path, from, &a.bytes[from..a.write_at]);
        assert_eq!(event_lsns(&drain(&mut r, None)), vec![2, 3]);

        // Half a frame written: not reported, just not returned yet.
        let from = a.write_at;
        a.push_event("fourth");
        patch(&path, from, &a.bytes[from..from + 30]);
        assert!(drain(&mut r, None).is_empty());
        patch(&path, from, &a.bytes[from..a.write_at]);
        assert_eq!(event_lsns(&drain(&mut r, None)), vec![4]);

        // Seal and rotate.
        let from = a.write_at;
        let eos = a.seal();
        patch(&path, from, &a.bytes[from..a.write_at]);
        let mut b = SegmentImage::new("s1", eos + 1, 8192);
        b.push_event("next");
        write_file(&dir, eos + 1, &b.bytes);
        let items = drain(&mut r, None);
        assert_eq!(event_lsns(&items), vec![6]);
        assert!(items.contains(&ReadItem::SegmentConsumed {
            segment: path,
            first_lsn: 1,
            last_lsn: Some(5),
            sealed: true
        }));
    }

    #[test]
    fn a_live_tail_is_waited_on_until_a_newer_segment_makes_it_final() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        a.push_event("one");
        a.push_event("two");
        let torn_at = a.offsets[1];
        a.bytes[torn_at + 25] ^= 0xff;
        let pa = write_file(&dir, 1, &a.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        let items = drain(&mut r, None);
        assert_eq!(
            items.len(),
            1,
            "the damaged tail may be an append in progress: {items:?}"
        );

        let mut b = SegmentImage::new("s1", 2, 4096);
        b.push_event("after crash");
        write_file(&dir, 2, &b.bytes);
        let items = drain(&mut r, None);
        assert!(
            matches!(&items[0], ReadItem::TornTail { offset, .. } if *offset == torn_at as u64),
            "{items:?}"
        );
        assert_eq!(
            items[1],
            ReadItem::SegmentConsumed {
                segment: pa,
                first_lsn: 1,
                last_lsn: Some(1),
                sealed: false
            }
        );
        assert_eq!(event_lsns(&items), vec![2]);
    }

    #[test]
    fn damage_below_the_durable_watermark_is_reported_in_a_live_segment() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        for _ in 0..4 {
            a.push_event("x");
        }
        let (start, end) = (a.offsets[1], a.offsets[2]);
        a.bytes[start + 30] ^= 1;
        let path = write_file(&dir, 1, &a.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        let items = drain(&mut r, Some(4));
        assert_eq!(event_lsns(&items), vec![1, 3, 4]);
        assert!(items.iter().any(|i| matches!(i,
            ReadItem::Skipped { segment, start: s, end: e, error: FormatError::ChecksumMismatch { .. } }
                if *segment == path && *s == start as u64 && *e == end as u64)));
    }

    #[test]
    fn a_zeroed_frame_in_a_final_segment_is_damage_not_the_end() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 4096);
        for _ in 0..3 {
            a.push_event("x");
        }
        let (start, end) = (a.offsets[1], a.offsets[2]);
        a.bytes[start..end].fill(0);
        let path = write_file(&dir, 1, &a.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::Live);
        // Live and last: the zeroed header looks like the end of the data.
        assert_eq!(event_lsns(&drain(&mut r, None)), vec![1]);
        let mut r = StreamReader::open(&dir, 1, Follow::AtRest);
        let items = drain(&mut r, None);
        assert_eq!(event_lsns(&items), vec![1, 3]);
        assert!(
            items.iter().any(|i| matches!(i,
            ReadItem::Skipped { segment, start: s, end: e, error: FormatError::DataAfterEnd { .. } }
                if *segment == path && *s == start as u64 && *e == end as u64)),
            "{items:?}"
        );
    }

    #[test]
    fn a_segment_of_another_stream_is_reported_and_not_consumed() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("other", 1, 1024);
        a.push_event("x");
        write_file(&dir, 1, &a.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::AtRest);
        let items = drain(&mut r, None);
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(matches!(
            &items[0],
            ReadItem::BadHeader {
                problem: HeaderProblem::StreamMismatch { .. },
                skipped: true,
                ..
            }
        ));
    }

    #[test]
    fn missing_lsns_between_segments_are_reported_as_a_gap() {
        let (_tmp, dir) = stream_dir();
        let mut a = SegmentImage::new("s1", 1, 1024);
        a.push_event("x");
        a.seal();
        write_file(&dir, 1, &a.bytes);
        let mut b = SegmentImage::new("s1", 10, 1024);
        b.push_event("y");
        let pb = write_file(&dir, 10, &b.bytes);
        let mut r = StreamReader::open(&dir, 1, Follow::AtRest);
        let items = drain(&mut r, None);
        assert!(items.contains(&ReadItem::Gap {
            segment: pb,
            expected: 3,
            found: 10
        }));
        assert_eq!(event_lsns(&items), vec![1, 10]);
    }

    #[test]
    fn list_streams_and_segments_ignore_other_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in ["b", "a", ".hidden", "bad name"] {
            std::fs::create_dir(tmp.path().join(d)).expect("mkdir");
        }
        std::fs::write(tmp.path().join("file"), b"").expect("file");
        assert_eq!(list_streams(tmp.path()).expect("list"), vec!["a", "b"]);
        let a = tmp.path().join("a");
        for name in [
            segment_file_name(7),
            segment_file_name(3),
            "x.seg".into(),
            format!("{}.tmp", segment_file_name(9)),
        ] {
            std::fs::write(a.join(name), b"").expect("file");
        }
        let lsns: Vec<Lsn> = list_segments(&a)
            .expect("list")
            .iter()
            .map(|s| s.first_lsn)
            .collect();
        assert_eq!(lsns, vec![3, 7]);
    }

    fn rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Reads a 64 MiB segment of ~300-byte events and checks that resident memory
    /// grows by far less than the segment. Run alone (RSS is per process):
    /// `cargo test --lib reader_memory -- --ignored --nocapture --test-threads=1`
    #[test]
    #[ignore = "measures process RSS; run alone"]
    fn reader_memory_stays_bounded_on_a_64_mib_segment() {
        let (_tmp, dir) = stream_dir();
        let size = 64 << 20;
        let mut seg = SegmentImage::new("s1", 1, size);
        let mut payload = Vec::new();
        let event = AuditEvent::new("url.created")
            .actor("user", "42")
            .target("url", "abc")
            .reason("x".repeat(200));
        encode_event(&event, 1.0, &mut payload).expect("payload");
        let mut n = 0u64;
        while seg.write_at + frame_len(payload.len()) + 24 <= size {
            seg.push(RecordKind::Event, &payload);
            n += 1;
        }
        seg.seal();
        write_file(&dir, 1, &seg.bytes);
        drop(seg);
        // Drop the file from the page cache's view of this process: only the reader's
        // own mapping counts from here on.
        let before = rss_kib().expect("rss");
        let mut r = StreamReader::open(&dir, 1, Follow::AtRest);
        let mut peak = before;
        let mut events = 0u64;
        let mut batch = Vec::with_capacity(1000);
        loop {
            batch.clear();
            if r.read_batch(1000, None, &mut batch).expect("read") == 0 {
                break;
            }
            events += event_lsns(&batch).len() as u64;
            peak = peak.max(rss_kib().expect("rss"));
        }
        assert_eq!(events, n);
        let growth = peak.saturating_sub(before);
        println!("segment 64 MiB, {n} events; RSS before {before} KiB, peak {peak} KiB, growth {growth} KiB");
        assert!(
            growth < 16 * 1024,
            "RSS grew by {growth} KiB while reading a 64 MiB segment"
        );
    }
}
