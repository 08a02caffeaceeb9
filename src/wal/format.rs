//! The WAL's on-disk format, as pure functions from values to bytes and back.
//!
//! This module owns the byte layout of docs/segment-format.md: the 64-byte segment
//! header, the record frame (length, CRC32, LSN, kind, payload, padding to 8 bytes),
//! the `durable.lsn` sidecar, segment file names, and the rules a parser uses to
//! tell apart the end of written data, a torn tail and mid-segment corruption
//! ([`scan_segment`]). Its invariant: nothing here trusts a byte it has not
//! checked. The CRC covers the length field, so a corrupted length is caught
//! before it is used, no slice is taken past the input, nothing is allocated in
//! proportion to an untrusted length, and every loop advances by at least
//! [`FRAME_ALIGN`] bytes through a bounded input, so a parse never panics and
//! always ends. It does no I/O: files, memory maps, fsync and tailing belong to
//! `wal::writer` and `wal::reader`; the event payload's layout belongs to
//! `wal::payload`.

use std::fmt;

/// Log sequence number: 1 for a stream's first record, +1 for each record after it
/// (every kind, end-of-segment records included).
pub type Lsn = u64;

/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"AUDWSEG\0";
/// The segment format version this code reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the segment header; the first frame starts right after it.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Length of a frame header (length, CRC, LSN, kind, reserved).
pub const FRAME_HEADER_LEN: usize = 20;
/// Every frame starts at a multiple of this offset in its segment.
pub const FRAME_ALIGN: usize = 8;
/// Largest payload a frame may carry (1 MiB). A parser refuses a larger length
/// before looking at the payload, so a hostile length never drives an allocation.
pub const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// Longest stream id, in bytes (the header's stream id field).
pub const MAX_STREAM_ID_LEN: usize = 32;
/// Length of an end-of-segment frame (a header and no payload): the room a writer
/// keeps free in every segment so it can always seal it.
pub const EOS_FRAME_LEN: usize = frame_len(0);
/// File name of the durable watermark sidecar in a stream directory.
pub const DURABLE_LSN_FILE: &str = "durable.lsn";
/// Length of the durable watermark sidecar.
pub const DURABLE_LSN_LEN: usize = 16;
/// File name suffix of a segment.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Number of decimal digits of the first LSN in a segment's file name.
pub const SEGMENT_NAME_DIGITS: usize = 20;

// Byte offsets inside the segment header.
const HDR_MAGIC: usize = 0;
const HDR_VERSION: usize = 8;
const HDR_LEN: usize = 10;
const HDR_RESERVED_A: usize = 12;
const HDR_FIRST_LSN: usize = 16;
const HDR_STREAM_ID: usize = 24;
const HDR_RESERVED_B: usize = 56;
const HDR_CRC: usize = 60;

// Byte offsets inside a frame header.
const FRM_LEN: usize = 0;
const FRM_CRC: usize = 4;
const FRM_LSN: usize = 8;
const FRM_KIND: usize = 16;
const FRM_RESERVED: usize = 17;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// An audit event; the payload is `wal::payload`'s encoding.
    Event = 1,
    /// Seals the segment: no record follows it in this segment. Empty payload.
    EndOfSegment = 2,
    /// A signed checkpoint of the stream's hash chain; the payload is the note's
    /// text (`chain::note`). Written only when the writer has a signing key.
    Checkpoint = 3,
}

impl RecordKind {
    /// The kind for a byte read from disk, if it names one.
    pub fn from_u8(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Event),
            2 => Some(RecordKind::EndOfSegment),
            3 => Some(RecordKind::Checkpoint),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Event => "event",
            RecordKind::EndOfSegment => "end_of_segment",
            RecordKind::Checkpoint => "checkpoint",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with some bytes, and where. Offsets in frame errors are relative
/// to the start of the frame; [`ScanItem`]s carry the offset in the segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("segment is {len} bytes, shorter than its {SEGMENT_HEADER_LEN}-byte header")]
    SegmentTooShort { len: usize },
    #[error("bad segment magic {found:02x?} at offset 0 (not an auditwal segment)")]
    BadMagic { found: [u8; 8] },
    #[error("unsupported segment format version {version} at offset 8 (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("segment header length {len} at offset 10, expected {SEGMENT_HEADER_LEN}")]
    BadHeaderLength { len: u16 },
    #[error("segment header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksumMismatch { stored: u32, computed: u32 },
    #[error("reserved segment header bytes at offset {offset} are not zero")]
    HeaderReservedNotZero { offset: usize },
    #[error("invalid stream id: {reason}")]
    InvalidStreamId { reason: &'static str },
    #[error("invalid LSN 0 (LSNs start at 1)")]
    ZeroLsn,
    #[error("frame header truncated: {available} of {FRAME_HEADER_LEN} bytes present")]
    TruncatedFrameHeader { available: usize },
    #[error("frame payload length {len} is over the limit of {MAX_PAYLOAD_LEN}")]
    PayloadTooLong { len: usize },
    #[error("frame of {frame_len} bytes runs past the end of the data ({available} bytes left)")]
    FrameRunsPastEnd { frame_len: usize, available: usize },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("unknown record kind {kind} at frame offset 16")]
    UnknownKind { kind: u8 },
    #[error("reserved frame bytes 17..20 are not zero")]
    FrameReservedNotZero,
    #[error("end-of-segment record carries a {len}-byte payload (must be empty)")]
    EndOfSegmentPayload { len: usize },
    #[error("LSN {found} is not after the previous record's LSN {previous}")]
    LsnNotIncreasing { previous: Lsn, found: Lsn },
    #[error("LSN {found} is before the segment's first LSN {first_lsn}")]
    LsnBeforeSegment { first_lsn: Lsn, found: Lsn },
    #[error("destination buffer of {available} bytes is too small for a {needed}-byte frame")]
    BufferTooSmall { needed: usize, available: usize },
    #[error("zeroed frame header (end-of-data marker) before more data, first nonzero byte at segment offset {first_nonzero}")]
    DataAfterEnd { first_nonzero: usize },
    #[error("durable watermark is {len} bytes, expected {DURABLE_LSN_LEN}")]
    DurableLsnLength { len: usize },
    #[error(
        "durable watermark checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    DurableLsnChecksumMismatch { stored: u32, computed: u32 },
    #[error("durable watermark bytes 12..16 are not zero")]
    DurableLsnReservedNotZero,
}

impl FormatError {
    /// True for header errors that make the whole file unreadable as a segment
    /// (too short, not ours, a version or layout we cannot parse): its frames are
    /// not scanned. A header whose checksum or reserved bytes are wrong still has
    /// a usable layout, so its frames are.
    pub fn makes_segment_unreadable(&self) -> bool {
        matches!(
            self,
            FormatError::SegmentTooShort { .. }
                | FormatError::BadMagic { .. }
                | FormatError::UnsupportedVersion { .. }
                | FormatError::BadHeaderLength { .. }
        )
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(b)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks a stream name: 1..=32 bytes of `[A-Za-z0-9._-]`, not starting with '.'
/// (so it is a safe directory name and never `.` or `..`).
pub fn validate_stream_id(stream_id: &str) -> Result<(), FormatError> {
    if stream_id.is_empty() {
        return Err(FormatError::InvalidStreamId { reason: "empty" });
    }
    if stream_id.len() > MAX_STREAM_ID_LEN {
        return Err(FormatError::InvalidStreamId {
            reason: "longer than 32 bytes",
        });
    }
    if stream_id.starts_with('.') {
        return Err(FormatError::InvalidStreamId {
            reason: "starts with '.'",
        });
    }
    if !stream_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(FormatError::InvalidStreamId {
            reason: "has a byte outside [A-Za-z0-9._-]",
        });
    }
    Ok(())
}

/// The file name of the segment whose first record has `first_lsn`:
/// 20 zero-padded decimal digits and `.seg`, so a name sort is an LSN sort.
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!(
        "{first_lsn:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

/// The first LSN a segment file name stands for, or `None` when the name is not a
/// segment's (e.g. `LOCK`, `durable.lsn`, `*.seg.tmp`).
pub fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The `durable.lsn` sidecar's bytes for `lsn`: 0..8 the LSN, 8..12 the CRC32 of
/// bytes 0..8, 12..16 zero.
pub fn encode_durable_lsn(lsn: Lsn) -> [u8; DURABLE_LSN_LEN] {
    let mut out = [0u8; DURABLE_LSN_LEN];
    out[..8].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&out[..8]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The LSN stored in a `durable.lsn` sidecar. A reader that gets an error treats
/// the watermark as unknown (0) and tries again later: the sidecar is rewritten in
/// place and never fsynced on its own, so a torn or stale copy only delays readers.
pub fn decode_durable_lsn(bytes: &[u8]) -> Result<Lsn, FormatError> {
    if bytes.len() != DURABLE_LSN_LEN {
        return Err(FormatError::DurableLsnLength { len: bytes.len() });
    }
    let stored = u32_at(bytes, 8);
    let computed = crc32fast::hash(&bytes[..8]);
    if stored != computed {
        return Err(FormatError::DurableLsnChecksumMismatch { stored, computed });
    }
    if bytes[12..16].iter().any(|&b| b != 0) {
        return Err(FormatError::DurableLsnReservedNotZero);
    }
    Ok(u64_at(bytes, 0))
}

/// The segment header: which stream a segment belongs to and the LSN of its first
/// record. Encoded in [`SEGMENT_HEADER_LEN`] bytes at offset 0 of the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub stream_id: String,
    pub first_lsn: Lsn,
}

impl SegmentHeader {
    pub fn encode(&self) -> Result<[u8; SEGMENT_HEADER_LEN], FormatError> {
        validate_stream_id(&self.stream_id)?;
        if self.first_lsn == 0 {
            return Err(FormatError::ZeroLsn);
        }
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[HDR_MAGIC..HDR_MAGIC + 8].copy_from_slice(&SEGMENT_MAGIC);
        out[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[HDR_LEN..HDR_LEN + 2].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        out[HDR_FIRST_LSN..HDR_FIRST_LSN + 8].copy_from_slice(&self.first_lsn.to_le_bytes());
        let id = self.stream_id.as_bytes();
        out[HDR_STREAM_ID..HDR_STREAM_ID + id.len()].copy_from_slice(id);
        let crc = crc32fast::hash(&out[..HDR_CRC]);
        out[HDR_CRC..HDR_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes the header at the start of `bytes` (which may run on into the frames).
    /// Checks, in order: length, magic, version, header length, CRC, reserved bytes,
    /// first LSN, stream id; the first failure is returned.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
        if bytes.len() < SEGMENT_HEADER_LEN {
            return Err(FormatError::SegmentTooShort { len: bytes.len() });
        }
        let h = &bytes[..SEGMENT_HEADER_LEN];
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[HDR_MAGIC..HDR_MAGIC + 8]);
        if magic != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        // The version decides the rest of the layout, so it is checked before the
        // CRC, whose position is itself a version 1 property.
        let version = u16_at(h, HDR_VERSION);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let len = u16_at(h, HDR_LEN);
        if usize::from(len) != SEGMENT_HEADER_LEN {
            return Err(FormatError::BadHeaderLength { len });
        }
        let stored = u32_at(h, HDR_CRC);
        let computed = crc32fast::hash(&h[..HDR_CRC]);
        if stored != computed {
            return Err(FormatError::HeaderChecksumMismatch { stored, computed });
        }
        for (offset, width) in [(HDR_RESERVED_A, 4), (HDR_RESERVED_B, 4)] {
            if h[offset..offset + width].iter().any(|&b| b != 0) {
                return Err(FormatError::HeaderReservedNotZero { offset });
            }
        }
        let first_lsn = u64_at(h, HDR_FIRST_LSN);
        if first_lsn == 0 {
            return Err(FormatError::ZeroLsn);
        }
        let field = &h[HDR_STREAM_ID..HDR_STREAM_ID + MAX_STREAM_ID_LEN];
        let id_len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        if field[id_len..].iter().any(|&b| b != 0) {
            return Err(FormatError::InvalidStreamId {
                reason: "bytes after the zero padding are not zero",
            });
        }
        let stream_id =
            std::str::from_utf8(&field[..id_len]).map_err(|_| FormatError::InvalidStreamId {
                reason: "not UTF-8",
            })?;
        validate_stream_id(stream_id)?;
        Ok(SegmentHeader {
            stream_id: stream_id.to_string(),
            first_lsn,
        })
    }
}

/// Bytes a frame with a `payload_len`-byte payload occupies, padding included:
/// `FRAME_HEADER_LEN + payload_len` rounded up to a multiple of `FRAME_ALIGN`.
/// Saturates instead of overflowing for absurd lengths (which no frame may have).
pub const fn frame_len(payload_len: usize) -> usize {
    let unpadded = FRAME_HEADER_LEN.saturating_add(payload_len);
    match unpadded.checked_add(FRAME_ALIGN - 1) {
        Some(n) => n & !(FRAME_ALIGN - 1),
        None => usize::MAX & !(FRAME_ALIGN - 1),
    }
}

/// The bytes an invalid frame at the start of `bytes` spans as far as its own
/// header says: `frame_len(len)` when its length field is within
/// [`MAX_PAYLOAD_LEN`], else just the header; never more than `bytes`. A torn
/// append leaves this much (the writer stores the length first, the CRC last),
/// so recovery treats nonzero bytes beyond it as damage, not as the torn record.
pub fn torn_frame_len(bytes: &[u8]) -> usize {
    let claimed = match bytes.get(FRM_LEN..FRM_LEN + 4) {
        Some(_) => {
            let len = u32_at(bytes, FRM_LEN) as usize;
            if len <= MAX_PAYLOAD_LEN {
                frame_len(len)
            } else {
                FRAME_HEADER_LEN
            }
        }
        None => FRAME_HEADER_LEN,
    };
    claimed.min(bytes.len())
}

/// The CRC of a frame: bytes 0..4 (length), 8..20 (LSN, kind, reserved), payload.
/// Covering the length means a flipped length bit is a checksum failure, never a
/// trusted wrong boundary.
fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[FRM_LEN..FRM_LEN + 4]);
    h.update(&header[FRM_LSN..FRAME_HEADER_LEN]);
    h.update(payload);
    h.finalize()
}

/// Writes header + payload + zero padding into `dst[..frame_len(payload.len())]`
/// and returns that length. Bytes of `dst` after the frame are left alone.
pub fn encode_frame(
    dst: &mut [u8],
    lsn: Lsn,
    kind: RecordKind,
    payload: &[u8],
) -> Result<usize, FormatError> {
    if lsn == 0 {
        return Err(FormatError::ZeroLsn);
    }
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(FormatError::PayloadTooLong { len: payload.len() });
    }
    if kind == RecordKind::EndOfSegment && !payload.is_empty() {
        return Err(FormatError::EndOfSegmentPayload { len: payload.len() });
    }
    let total = frame_len(payload.len());
    if dst.len() < total {
        return Err(FormatError::BufferTooSmall {
            needed: total,
            available: dst.len(),
        });
    }
    let frame = &mut dst[..total];
    // The length fits in u32: it is at most MAX_PAYLOAD_LEN.
    let len = payload.len() as u32;
    frame[FRM_LEN..FRM_LEN + 4].copy_from_slice(&len.to_le_bytes());
    frame[FRM_LSN..FRM_LSN + 8].copy_from_slice(&lsn.to_le_bytes());
    frame[FRM_KIND] = kind as u8;
    frame[FRM_RESERVED..FRAME_HEADER_LEN].fill(0);
    frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload.len()].copy_from_slice(payload);
    frame[FRAME_HEADER_LEN + payload.len()..].fill(0);
    let crc = {
        let (header, rest) = frame.split_at(FRAME_HEADER_LEN);
        frame_crc(header, &rest[..payload.len()])
    };
    frame[FRM_CRC..FRM_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(total)
}

/// A record decoded from a frame; the payload borrows the input bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: Lsn,
    pub kind: RecordKind,
    pub payload: &'a [u8],
}

/// What is at the start of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameOutcome<'a> {
    /// A valid frame; the next frame starts `frame_len` bytes later
    /// (`frame_len <= bytes.len()` always).
    Record {
        record: Record<'a>,
        frame_len: usize,
    },
    /// A zeroed frame header (or no bytes, or only zero bytes shorter than a
    /// header): nothing was written here yet.
    EndOfData,
    /// Not a valid frame. Whether that is a torn tail or corruption depends on
    /// what follows; [`scan_segment`] decides.
    Invalid(FormatError),
}

/// Decodes the frame at the start of `bytes` (which runs to the end of the mapped
/// data). A frame is valid only when all of it, padding included, lies in `bytes`,
/// its CRC matches, its kind is known, its reserved bytes are zero, its LSN is not
/// zero, and an end-of-segment frame has no payload. Padding bytes are not covered
/// by the CRC and are not checked: damage there alters no record.
pub fn decode_frame(bytes: &[u8]) -> FrameOutcome<'_> {
    if bytes.len() < FRAME_HEADER_LEN {
        return if bytes.iter().all(|&b| b == 0) {
            FrameOutcome::EndOfData
        } else {
            FrameOutcome::Invalid(FormatError::TruncatedFrameHeader {
                available: bytes.len(),
            })
        };
    }
    let header = &bytes[..FRAME_HEADER_LEN];
    if header.iter().all(|&b| b == 0) {
        return FrameOutcome::EndOfData;
    }
    match check_frame(bytes) {
        Ok((record, frame_len)) => FrameOutcome::Record { record, frame_len },
        Err(e) => FrameOutcome::Invalid(e),
    }
}

/// The checks of [`decode_frame`] on a header that is not all zero. The length is
/// bounded first (so nothing past the input is sliced), then the CRC is checked
/// before any field it covers is believed.
fn check_frame(bytes: &[u8]) -> Result<(Record<'_>, usize), FormatError> {
    let header = &bytes[..FRAME_HEADER_LEN];
    let len = u32_at(header, FRM_LEN) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(FormatError::PayloadTooLong { len });
    }
    let total = frame_len(len);
    if total > bytes.len() {
        return Err(FormatError::FrameRunsPastEnd {
            frame_len: total,
            available: bytes.len(),
        });
    }
    let payload = &bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    let stored = u32_at(header, FRM_CRC);
    let computed = frame_crc(header, payload);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    let kind_byte = header[FRM_KIND];
    let kind =
        RecordKind::from_u8(kind_byte).ok_or(FormatError::UnknownKind { kind: kind_byte })?;
    if header[FRM_RESERVED..FRAME_HEADER_LEN]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(FormatError::FrameReservedNotZero);
    }
    let lsn = u64_at(header, FRM_LSN);
    if lsn == 0 {
        return Err(FormatError::ZeroLsn);
    }
    if kind == RecordKind::EndOfSegment && len != 0 {
        return Err(FormatError::EndOfSegmentPayload { len });
    }
    Ok((Record { lsn, kind, payload }, total))
}

/// One finding of [`scan_segment`], in segment order. Offsets are byte offsets in
/// the segment image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanItem<'a> {
    /// The segment header could not be decoded. When the magic or version is
    /// wrong the scan ends here (these bytes are not a segment this code can read);
    /// otherwise frames are still scanned, with the first LSN unknown.
    BadHeader { error: FormatError },
    /// A valid record at `offset` (end-of-segment records included).
    Record { offset: usize, record: Record<'a> },
    /// A valid record whose LSN is higher than the next expected one although no
    /// bytes were skipped: records are missing. Followed by that record.
    LsnGap {
        offset: usize,
        expected: Lsn,
        found: Lsn,
    },
    /// Bytes `[start, end)` held no valid frame, and a valid frame with a higher
    /// LSN starts at `end`: mid-segment corruption, resynchronised. `error` is what
    /// was wrong with the frame at `start`.
    Skipped {
        start: usize,
        end: usize,
        error: FormatError,
    },
    /// An invalid frame at `offset` and nothing valid after it: a crash during an
    /// append (or, in a segment still being written, possibly an append in
    /// progress). Ends the scan.
    TornTail { offset: usize, error: FormatError },
    /// A zeroed frame header at `offset`: the end of the written data. Ends the scan.
    EndOfData { offset: usize },
    /// The end-of-segment record ended at `offset`; nothing after it is read.
    /// Ends the scan.
    Sealed { offset: usize },
}

/// Where a scan stands, enough to resume it over a longer view of the same
/// segment (a reader re-checking a segment that is still being written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanPosition {
    /// Where the next frame is looked for.
    pub offset: usize,
    /// The header's first LSN, when the header was valid.
    pub first_lsn: Option<Lsn>,
    /// The LSN of the last valid record so far.
    pub last_lsn: Option<Lsn>,
    /// The frame at `offset` was already vetted (a gap was reported before it, or
    /// a resync chose it): a resumed scan returns it without reporting again.
    pub vetted: bool,
}

impl ScanPosition {
    /// The position of a fresh scan of frames, before the first one.
    pub fn at_first_frame(first_lsn: Option<Lsn>) -> ScanPosition {
        ScanPosition {
            offset: SEGMENT_HEADER_LEN,
            first_lsn,
            last_lsn: None,
            vetted: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Frames,
    /// The record at the current offset is returned as it is, without a gap
    /// check: a gap was just reported, or a resync just vetted it.
    AcceptNext,
    /// The end-of-segment record was returned; `Sealed` comes next.
    SealNext,
    Done,
}

/// An iterator over a segment image's records and damage; see [`scan_segment`].
#[derive(Debug, Clone)]
pub struct SegmentScan<'a> {
    bytes: &'a [u8],
    pos: ScanPosition,
    phase: Phase,
}

/// Walks a whole segment image (header + frames), classifying damage:
///
/// - a zeroed frame header is the end of data ([`ScanItem::EndOfData`]);
/// - an invalid frame followed by a valid one with a higher LSN at a later
///   8-aligned offset is mid-segment corruption: the scan reports
///   [`ScanItem::Skipped`] and resumes at that frame;
/// - an invalid frame with nothing valid after it is a torn tail.
///
/// A resync candidate counts only if its CRC is valid, its LSN is greater than
/// the last good LSN (and at least the header's first LSN, when known), and its LSN
/// is no greater than the number of minimal frames that fit between the last good
/// record and the candidate allows (LSNs rise by 1 per frame of at least
/// [`EOS_FRAME_LEN`] bytes). The work is bounded by the input: each step advances
/// by [`FRAME_ALIGN`] and the scan never looks past `bytes`.
pub fn scan_segment(bytes: &[u8]) -> SegmentScan<'_> {
    SegmentScan {
        bytes,
        pos: ScanPosition {
            offset: 0,
            first_lsn: None,
            last_lsn: None,
            vetted: false,
        },
        phase: Phase::Header,
    }
}

/// What lies past the end-of-data marker of a segment that will not be written
/// any more; see [`check_after_end`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterEnd {
    /// Only zero bytes: the marker really is the end of the data.
    Zeros,
    /// A believable frame starts at `resume`: the zeroed header hid records (a
    /// lost page write, say). Treat `[offset, resume)` as skipped and resume there
    /// with `vetted` set.
    Resync { resume: usize, first_nonzero: usize },
    /// Nonzero bytes but no believable frame: garbage after the end of the data.
    Garbage { first_nonzero: usize },
}

/// Looks past an end-of-data marker at `position.offset` (the position a scan
/// stopped at with [`ScanItem::EndOfData`]). Only meaningful for a segment that is
/// final (sealed ones never need it; a live one is still being filled with data
/// right there). Reads the rest of the segment once; the resync rules are
/// [`scan_segment`]'s.
pub fn check_after_end(bytes: &[u8], position: ScanPosition) -> AfterEnd {
    let start = position.offset.min(bytes.len());
    let Some(rel) = bytes[start..].iter().position(|&b| b != 0) else {
        return AfterEnd::Zeros;
    };
    let first_nonzero = start + rel;
    let scan = SegmentScan::resume(bytes, position);
    match scan.resync(start) {
        Some(resume) => AfterEnd::Resync {
            resume,
            first_nonzero,
        },
        None => AfterEnd::Garbage { first_nonzero },
    }
}

/// Where the written data of a segment image ends, as [`scan_to_end`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataEnd {
    /// The last valid record's LSN (the end-of-segment record's when sealed);
    /// `None` when the segment holds no valid record.
    pub last_lsn: Option<Lsn>,
    /// Just past the last valid record, or past the header when there is none:
    /// where an append to this segment would go.
    pub offset: usize,
    /// The segment ends with its end-of-segment record, of this LSN.
    pub sealed_at: Option<Lsn>,
    /// A torn record (a crash mid-append) starts here, after the last valid one.
    pub torn_tail: Option<usize>,
}

impl DataEnd {
    /// The last LSN the segment accounts for: its last valid record's, and at
    /// least `before_first` (the LSN before the one its file name starts at,
    /// which the previous segment ended with).
    pub fn last_lsn_or(&self, before_first: Lsn) -> Lsn {
        self.last_lsn.map_or(before_first, |l| l.max(before_first))
    }
}

/// Finds where the log in a segment image ends: scans it with [`scan_segment`]
/// to its end (end of data, torn tail or end-of-segment record), handing every
/// item to `each` on the way, for the caller's counts, warnings or page release;
/// an error from `each` stops the scan and is returned. This is the one
/// definition of "the end of the log" that opening a writer (recovery) and
/// settling an idle stream share: nothing after the first end-of-data marker
/// or torn tail counts (recovery zeroes it; a reader reports it as damage).
pub fn scan_to_end<'a, E>(
    bytes: &'a [u8],
    mut each: impl FnMut(&ScanItem<'a>) -> Result<(), E>,
) -> Result<DataEnd, E> {
    let mut end = DataEnd {
        last_lsn: None,
        offset: SEGMENT_HEADER_LEN,
        sealed_at: None,
        torn_tail: None,
    };
    for item in scan_segment(bytes) {
        each(&item)?;
        match item {
            ScanItem::Record { offset, record } => {
                end.last_lsn = Some(record.lsn);
                end.offset = offset + frame_len(record.payload.len());
                if record.kind == RecordKind::EndOfSegment {
                    end.sealed_at = Some(record.lsn);
                }
            }
            ScanItem::TornTail { offset, .. } => end.torn_tail = Some(offset),
            ScanItem::BadHeader { .. }
            | ScanItem::LsnGap { .. }
            | ScanItem::Skipped { .. }
            | ScanItem::EndOfData { .. }
            | ScanItem::Sealed { .. } => {}
        }
    }
    Ok(end)
}

impl<'a> SegmentScan<'a> {
    /// Continues a scan at `position` (from [`SegmentScan::position`] of an earlier
    /// scan of the same segment, or [`ScanPosition::at_first_frame`]) over `bytes`,
    /// a view of the same segment that may now hold more data. The header is not
    /// decoded again. A position taken right after an end-of-segment record
    /// resumes past it (the `Sealed` item is not repeated).
    pub fn resume(bytes: &'a [u8], position: ScanPosition) -> Self {
        let offset = position.offset.max(SEGMENT_HEADER_LEN);
        SegmentScan {
            bytes,
            pos: ScanPosition { offset, ..position },
            phase: if position.vetted {
                Phase::AcceptNext
            } else {
                Phase::Frames
            },
        }
    }

    /// Where the scan stands. After a terminal item ([`ScanItem::EndOfData`],
    /// [`ScanItem::TornTail`]) the offset is that item's offset, so a resumed scan
    /// looks there again; after [`ScanItem::Sealed`] it is the end of the
    /// end-of-segment frame.
    pub fn position(&self) -> ScanPosition {
        ScanPosition {
            vetted: self.phase == Phase::AcceptNext,
            ..self.pos
        }
    }

    /// The LSN the next record should carry, if known.
    fn expected_lsn(&self) -> Option<Lsn> {
        match self.pos.last_lsn {
            Some(last) => last.checked_add(1),
            None => self.pos.first_lsn,
        }
    }

    /// Whether a CRC-valid record found at `offset` while resynchronising may be
    /// believed (see [`scan_segment`]).
    fn plausible_resync_lsn(&self, offset: usize, lsn: Lsn) -> bool {
        if let Some(first) = self.pos.first_lsn {
            if lsn < first {
                return false;
            }
        }
        // Lowest LSN allowed, and the start of the room in which the missing
        // records (each at least EOS_FRAME_LEN bytes) must have lain.
        let (low, room_start) = match (self.pos.last_lsn, self.pos.first_lsn) {
            (Some(last), _) => (last.saturating_add(1), self.pos.offset),
            (None, Some(first)) => (first, SEGMENT_HEADER_LEN),
            (None, None) => return true,
        };
        if lsn < low {
            return false;
        }
        let max_missing = (offset.saturating_sub(room_start) / EOS_FRAME_LEN) as u64;
        lsn - low <= max_missing
    }

    /// Looks for the first frame after `start` that may be believed.
    fn resync(&self, start: usize) -> Option<usize> {
        let mut candidate = start.checked_add(FRAME_ALIGN)?;
        while candidate.checked_add(FRAME_HEADER_LEN)? <= self.bytes.len() {
            let rest = &self.bytes[candidate..];
            // Cheap filters before the CRC: zero headers, impossible kinds or LSNs.
            let header = &rest[..FRAME_HEADER_LEN];
            let lsn = u64_at(header, FRM_LSN);
            if RecordKind::from_u8(header[FRM_KIND]).is_some()
                && self.plausible_resync_lsn(candidate, lsn)
            {
                if let FrameOutcome::Record { .. } = decode_frame(rest) {
                    return Some(candidate);
                }
            }
            candidate += FRAME_ALIGN;
        }
        None
    }

    fn next_frame_item(&mut self) -> ScanItem<'a> {
        let offset = self.pos.offset;
        let rest = self.bytes.get(offset..).unwrap_or(&[]);
        let error = match decode_frame(rest) {
            FrameOutcome::EndOfData => {
                self.phase = Phase::Done;
                return ScanItem::EndOfData { offset };
            }
            FrameOutcome::Record { record, frame_len } => match self.check_sequence(record.lsn) {
                Ok(()) => return self.accept(offset, record, frame_len),
                Err(Some(expected)) if self.phase != Phase::AcceptNext => {
                    self.phase = Phase::AcceptNext;
                    return ScanItem::LsnGap {
                        offset,
                        expected,
                        found: record.lsn,
                    };
                }
                Err(Some(_)) => return self.accept(offset, record, frame_len),
                Err(None) => self.sequence_error(record.lsn),
            },
            FrameOutcome::Invalid(error) => error,
        };
        match self.resync(offset) {
            Some(end) => {
                self.pos.offset = end;
                self.phase = Phase::AcceptNext;
                ScanItem::Skipped {
                    start: offset,
                    end,
                    error,
                }
            }
            None => {
                self.phase = Phase::Done;
                ScanItem::TornTail { offset, error }
            }
        }
    }

    /// Ok when `lsn` is the expected next LSN (or nothing is expected);
    /// Err(Some(expected)) for a forward gap; Err(None) when it goes backwards.
    fn check_sequence(&self, lsn: Lsn) -> Result<(), Option<Lsn>> {
        if let Some(last) = self.pos.last_lsn {
            if lsn <= last {
                return Err(None);
            }
        }
        if let Some(first) = self.pos.first_lsn {
            if lsn < first {
                return Err(None);
            }
        }
        match self.expected_lsn() {
            Some(expected) if lsn != expected => Err(Some(expected)),
            _ => Ok(()),
        }
    }

    fn sequence_error(&self, lsn: Lsn) -> FormatError {
        match (self.pos.last_lsn, self.pos.first_lsn) {
            (Some(previous), _) => FormatError::LsnNotIncreasing {
                previous,
                found: lsn,
            },
            (None, Some(first_lsn)) => FormatError::LsnBeforeSegment {
                first_lsn,
                found: lsn,
            },
            (None, None) => FormatError::ZeroLsn,
        }
    }

    fn accept(&mut self, offset: usize, record: Record<'a>, frame_len: usize) -> ScanItem<'a> {
        self.pos.last_lsn = Some(record.lsn);
        self.pos.offset = offset + frame_len;
        self.phase = if record.kind == RecordKind::EndOfSegment {
            Phase::SealNext
        } else {
            Phase::Frames
        };
        ScanItem::Record { offset, record }
    }
}

impl<'a> Iterator for SegmentScan<'a> {
    type Item = ScanItem<'a>;

    fn next(&mut self) -> Option<ScanItem<'a>> {
        match self.phase {
            Phase::Done => None,
            Phase::SealNext => {
                self.phase = Phase::Done;
                Some(ScanItem::Sealed {
                    offset: self.pos.offset,
                })
            }
            Phase::Header => {
                self.pos.offset = SEGMENT_HEADER_LEN;
                self.phase = Phase::Frames;
                match SegmentHeader::decode(self.bytes) {
                    Ok(header) => {
                        self.pos.first_lsn = Some(header.first_lsn);
                        self.next()
                    }
                    Err(error) => {
                        if error.makes_segment_unreadable() {
                            self.phase = Phase::Done;
                        }
                        Some(ScanItem::BadHeader { error })
                    }
                }
            }
            Phase::Frames | Phase::AcceptNext => Some(self.next_frame_item()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A segment image: header for `first_lsn`, then one frame per payload with
    /// consecutive LSNs, then `zeros` bytes of zero fill. Returns the image and
    /// each frame's offset.
    fn segment(
        first_lsn: Lsn,
        payloads: &[&[u8]],
        seal: bool,
        zeros: usize,
    ) -> (Vec<u8>, Vec<usize>) {
        let header = SegmentHeader {
            stream_id: "s1".into(),
            first_lsn,
        };
        let mut out = header.encode().expect("header").to_vec();
        let mut offsets = Vec::new();
        let mut lsn = first_lsn;
        let push = |out: &mut Vec<u8>, kind, payload: &[u8], lsn| {
            let at = out.len();
            out.resize(at + frame_len(payload.len()), 0xAA);
            encode_frame(&mut out[at..], lsn, kind, payload).expect("frame");
            at
        };
        for p in payloads {
            offsets.push(push(&mut out, RecordKind::Event, p, lsn));
            lsn += 1;
        }
        if seal {
            offsets.push(push(&mut out, RecordKind::EndOfSegment, &[], lsn));
        }
        out.resize(out.len() + zeros, 0);
        (out, offsets)
    }

    #[test]
    fn scan_to_end_finds_the_last_record_and_where_appends_resume() {
        let (bytes, offsets) = segment(7, &[b"a", b"bb", b"ccc"], false, 256);
        let mut seen = 0;
        let end = scan_to_end(&bytes, |_| {
            seen += 1;
            Ok::<(), ()>(())
        })
        .expect("infallible");
        assert_eq!(end.last_lsn, Some(9));
        assert_eq!(end.offset, offsets[2] + frame_len(3));
        assert_eq!((end.sealed_at, end.torn_tail), (None, None));
        assert_eq!(seen, 4, "three records and the end of data");
        assert_eq!(end.last_lsn_or(6), 9);

        let (sealed, _) = segment(7, &[b"a"], true, 64);
        let end = scan_to_end(&sealed, |_| Ok::<(), ()>(())).expect("infallible");
        assert_eq!((end.last_lsn, end.sealed_at), (Some(8), Some(8)));

        let (mut torn, offsets) = segment(7, &[b"a", b"bb"], false, 64);
        torn[offsets[1] + FRAME_HEADER_LEN] ^= 0xFF;
        let end = scan_to_end(&torn, |_| Ok::<(), ()>(())).expect("infallible");
        assert_eq!(end.last_lsn, Some(7));
        assert_eq!(end.torn_tail, Some(offsets[1]));
        assert_eq!(end.offset, offsets[1]);

        let (empty, _) = segment(7, &[], false, 64);
        let end = scan_to_end(&empty, |_| Ok::<(), ()>(())).expect("infallible");
        assert_eq!((end.last_lsn, end.offset), (None, SEGMENT_HEADER_LEN));
        assert_eq!(end.last_lsn_or(6), 6);
    }

    #[test]
    fn scan_to_end_stops_at_the_first_error_of_its_callback() {
        let (bytes, _) = segment(1, &[b"a", b"b"], false, 64);
        let mut seen = 0;
        let stopped = scan_to_end(&bytes, |item| {
            seen += 1;
            match item {
                ScanItem::Record { record, .. } if record.lsn == 1 => Err("stop"),
                _ => Ok(()),
            }
        });
        assert_eq!(stopped, Err("stop"));
        assert_eq!(seen, 1);
    }

    #[test]
    fn header_round_trips_every_field() {
        let h = SegmentHeader {
            stream_id: "orders-eu_1.a".into(),
            first_lsn: 0x0102_0304_0506_0708,
        };
        let bytes = h.encode().expect("encode");
        assert_eq!(&bytes[0..8], b"AUDWSEG\0");
        assert_eq!(&bytes[8..10], &[1, 0]);
        assert_eq!(&bytes[10..12], &[64, 0]);
        assert_eq!(&bytes[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[24..37], b"orders-eu_1.a");
        assert!(bytes[37..60].iter().all(|&b| b == 0));
        assert_eq!(SegmentHeader::decode(&bytes), Ok(h));
    }

    #[test]
    fn header_encode_refuses_bad_stream_ids_and_lsn_zero() {
        for bad in ["", ".hidden", "a/b", "é", &"x".repeat(33)] {
            let h = SegmentHeader {
                stream_id: bad.into(),
                first_lsn: 1,
            };
            assert!(
                matches!(h.encode(), Err(FormatError::InvalidStreamId { .. })),
                "{bad:?}"
            );
        }
        let h = SegmentHeader {
            stream_id: "x".repeat(32),
            first_lsn: 0,
        };
        assert_eq!(h.encode(), Err(FormatError::ZeroLsn));
    }

    #[test]
    fn header_decode_names_each_defect() {
        let good = SegmentHeader {
            stream_id: "s".into(),
            first_lsn: 5,
        }
        .encode()
        .expect("encode");
        let reseal = |mut b: [u8; 64]| {
            let crc = crc32fast::hash(&b[..60]);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
            b
        };
        assert_eq!(
            SegmentHeader::decode(&good[..63]),
            Err(FormatError::SegmentTooShort { len: 63 })
        );
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FormatError::BadMagic { .. })
        ));
        let mut b = good;
        b[8] = 2;
        assert_eq!(
            SegmentHeader::decode(&reseal(b)),
            Err(FormatError::UnsupportedVersion { version: 2 })
        );
        let mut b = good;
        b[10] = 65;
        assert_eq!(
            SegmentHeader::decode(&reseal(b)),
            Err(FormatError::BadHeaderLength { len: 65 })
        );
        let mut b = good;
        b[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(FormatError::HeaderChecksumMismatch { .. })
        ));
        for offset in [12, 15, 56, 59] {
            let mut b = good;
            b[offset] = 1;
            let want = if offset < 16 { 12 } else { 56 };
            assert_eq!(
                SegmentHeader::decode(&reseal(b)),
                Err(FormatError::HeaderReservedNotZero { offset: want })
            );
        }
        let mut b = good;
        b[16..24].fill(0);
        assert_eq!(SegmentHeader::decode(&reseal(b)), Err(FormatError::ZeroLsn));
        let mut b = good;
        b[30] = b'x';
        assert!(matches!(
            SegmentHeader::decode(&reseal(b)),
            Err(FormatError::InvalidStreamId { .. })
        ));
        let mut b = good;
        b[24] = 0xff;
        assert!(matches!(
            SegmentHeader::decode(&reseal(b)),
            Err(FormatError::InvalidStreamId { .. })
        ));
    }

    #[test]
    fn frame_len_pads_to_eight_bytes() {
        assert_eq!(frame_len(0), 24);
        assert_eq!(EOS_FRAME_LEN, 24);
        assert_eq!(frame_len(4), 24);
        assert_eq!(frame_len(5), 32);
        assert_eq!(frame_len(12), 32);
        assert_eq!(frame_len(MAX_PAYLOAD_LEN), MAX_PAYLOAD_LEN + 24);
        assert_eq!(frame_len(usize::MAX) % FRAME_ALIGN, 0);
    }

    #[test]
    fn frame_round_trips_every_field() {
        let payload = b"hello, audit";
        let mut buf = vec![0xEEu8; 64];
        let n = encode_frame(&mut buf, 0x1122_3344_5566_7788, RecordKind::Event, payload)
            .expect("encode");
        assert_eq!(n, 32);
        assert_eq!(&buf[0..4], &12u32.to_le_bytes());
        assert_eq!(&buf[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(buf[16], 1);
        assert_eq!(&buf[17..20], &[0, 0, 0]);
        assert_eq!(&buf[20..32], payload);
        assert!(
            buf[32..].iter().all(|&b| b == 0xEE),
            "bytes after the frame untouched"
        );
        match decode_frame(&buf[..n]) {
            FrameOutcome::Record { record, frame_len } => {
                assert_eq!(frame_len, 32);
                assert_eq!(record.lsn, 0x1122_3344_5566_7788);
                assert_eq!(record.kind, RecordKind::Event);
                assert_eq!(record.payload, payload);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encode_frame_refuses_what_no_reader_would_accept() {
        let mut buf = vec![0u8; 64];
        assert_eq!(
            encode_frame(&mut buf, 0, RecordKind::Event, b"x"),
            Err(FormatError::ZeroLsn)
        );
        assert_eq!(
            encode_frame(&mut buf, 1, RecordKind::EndOfSegment, b"x"),
            Err(FormatError::EndOfSegmentPayload { len: 1 })
        );
        assert_eq!(
            encode_frame(&mut buf[..31], 1, RecordKind::Event, b"12345"),
            Err(FormatError::BufferTooSmall {
                needed: 32,
                available: 31
            })
        );
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let mut dst = vec![0u8; frame_len(big.len())];
        assert_eq!(
            encode_frame(&mut dst, 1, RecordKind::Event, &big),
            Err(FormatError::PayloadTooLong {
                len: MAX_PAYLOAD_LEN + 1
            })
        );
    }

    #[test]
    fn decode_frame_tells_end_of_data_from_damage() {
        assert_eq!(decode_frame(&[]), FrameOutcome::EndOfData);
        assert_eq!(decode_frame(&[0; 7]), FrameOutcome::EndOfData);
        assert_eq!(decode_frame(&[0; 40]), FrameOutcome::EndOfData);
        assert_eq!(
            decode_frame(&[0, 0, 1]),
            FrameOutcome::Invalid(FormatError::TruncatedFrameHeader { available: 3 })
        );
        let mut buf = vec![0u8; 32];
        encode_frame(&mut buf, 7, RecordKind::Event, b"abcdefgh").expect("encode");
        assert!(matches!(
            decode_frame(&buf[..31]),
            FrameOutcome::Invalid(FormatError::FrameRunsPastEnd {
                frame_len: 32,
                available: 31
            })
        ));
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_frame(&huge),
            FrameOutcome::Invalid(FormatError::PayloadTooLong { .. })
        ));
        let mut flipped = buf.clone();
        flipped[22] ^= 0x10;
        assert!(matches!(
            decode_frame(&flipped),
            FrameOutcome::Invalid(FormatError::ChecksumMismatch { .. })
        ));
        // A shorter length with everything else intact still fails: the CRC covers it.
        let mut shorter = buf.clone();
        shorter[0] = 4;
        assert!(matches!(
            decode_frame(&shorter),
            FrameOutcome::Invalid(FormatError::ChecksumMismatch { .. })
        ));
    }

    /// Builds a frame with raw header fields and a correct CRC, to test the checks
    /// that come after the CRC.
    fn raw_frame(len: u32, lsn: u64, kind: u8, reserved: [u8; 3], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; frame_len(payload.len())];
        f[0..4].copy_from_slice(&len.to_le_bytes());
        f[8..16].copy_from_slice(&lsn.to_le_bytes());
        f[16] = kind;
        f[17..20].copy_from_slice(&reserved);
        f[20..20 + payload.len()].copy_from_slice(payload);
        let crc = frame_crc(&f[..20], payload);
        f[4..8].copy_from_slice(&crc.to_le_bytes());
        f
    }

    #[test]
    fn checksummed_frames_with_bad_fields_are_still_invalid() {
        let cases = [
            (
                raw_frame(1, 3, 0, [0; 3], b"x"),
                FormatError::UnknownKind { kind: 0 },
            ),
            (
                raw_frame(1, 3, 4, [0; 3], b"x"),
                FormatError::UnknownKind { kind: 4 },
            ),
            (
                raw_frame(1, 3, 1, [0, 1, 0], b"x"),
                FormatError::FrameReservedNotZero,
            ),
            (raw_frame(1, 0, 1, [0; 3], b"x"), FormatError::ZeroLsn),
            (
                raw_frame(1, 3, 2, [0; 3], b"x"),
                FormatError::EndOfSegmentPayload { len: 1 },
            ),
        ];
        for (frame, want) in cases {
            assert_eq!(decode_frame(&frame), FrameOutcome::Invalid(want));
        }
    }

    #[test]
    fn durable_lsn_round_trips_and_rejects_damage() {
        let b = encode_durable_lsn(0xdead_beef_0042);
        assert_eq!(&b[12..], &[0; 4]);
        assert_eq!(decode_durable_lsn(&b), Ok(0xdead_beef_0042));
        assert_eq!(
            decode_durable_lsn(&b[..15]),
            Err(FormatError::DurableLsnLength { len: 15 })
        );
        let mut bad = b;
        bad[3] ^= 4;
        assert!(matches!(
            decode_durable_lsn(&bad),
            Err(FormatError::DurableLsnChecksumMismatch { .. })
        ));
        let mut bad = b;
        bad[15] = 1;
        assert_eq!(
            decode_durable_lsn(&bad),
            Err(FormatError::DurableLsnReservedNotZero)
        );
    }

    #[test]
    fn segment_file_names_sort_by_lsn_and_parse_back() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for other in [
            "LOCK",
            "durable.lsn",
            "00000000000000000042.seg.tmp",
            "42.seg",
            "9999999999999999999x.seg",
            "99999999999999999999.seg",
        ] {
            assert_eq!(parse_segment_file_name(other), None, "{other}");
        }
    }

    fn items(bytes: &[u8]) -> Vec<ScanItem<'_>> {
        scan_segment(bytes).collect()
    }

    /// The LSN of a `Record` item; None for any other item.
    fn record_lsn(item: &ScanItem<'_>) -> Option<Lsn> {
        match item {
            ScanItem::Record { record, .. } => Some(record.lsn),
            _ => None,
        }
    }

    #[test]
    fn scan_returns_records_then_end_of_data() {
        let (img, offs) = segment(10, &[b"a", b"bbbbbbbbbbbbb", b""], false, 100);
        let got = items(&img);
        assert_eq!(got.len(), 4);
        for (i, item) in got[..3].iter().enumerate() {
            match item {
                ScanItem::Record { offset, record } => {
                    assert_eq!(*offset, offs[i]);
                    assert_eq!(record.lsn, 10 + i as u64);
                }
                other => panic!("{other:?}"),
            }
        }
        let end = offs[2] + 24;
        assert_eq!(got[3], ScanItem::EndOfData { offset: end });
    }

    #[test]
    fn scan_of_a_sealed_segment_ends_with_the_seal() {
        let (img, offs) = segment(1, &[b"a", b"b"], true, 48);
        let got = items(&img);
        assert!(matches!(
            got[2],
            ScanItem::Record {
                record: Record {
                    lsn: 3,
                    kind: RecordKind::EndOfSegment,
                    ..
                },
                ..
            }
        ));
        assert_eq!(
            got[3],
            ScanItem::Sealed {
                offset: offs[2] + 24
            }
        );
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn scan_resynchronises_after_a_damaged_frame_and_reports_the_range() {
        let (mut img, offs) = segment(1, &[b"one", &[7u8; 100], b"three", b"four"], false, 64);
        img[offs[1] + 30] ^= 0x01;
        let got = items(&img);
        assert_eq!(record_lsn(&got[0]), Some(1));
        assert!(matches!(
            got[1],
            ScanItem::Skipped { start, end, error: FormatError::ChecksumMismatch { .. } }
                if start == offs[1] && end == offs[2]
        ));
        assert_eq!(record_lsn(&got[2]), Some(3));
        assert_eq!(record_lsn(&got[3]), Some(4));
        assert!(matches!(got[4], ScanItem::EndOfData { .. }));
    }

    #[test]
    fn scan_calls_a_damaged_last_frame_a_torn_tail() {
        let (mut img, offs) = segment(1, &[b"one", b"two"], false, 64);
        img[offs[1] + 21] ^= 0x80;
        let got = items(&img);
        assert_eq!(got.len(), 2);
        assert!(matches!(got[1], ScanItem::TornTail { offset, .. } if offset == offs[1]));
    }

    #[test]
    fn resync_ignores_valid_frames_with_stale_lsns() {
        // Frame 2 is damaged; a stale copy of frame 1 (valid CRC, LSN 1) sits where
        // frame 3 was: it must not be believed, so the damage runs to frame 4.
        let (mut img, offs) = segment(1, &[b"aaaa", b"bbbb", b"cccc", b"dddd"], false, 0);
        img[offs[1] + 21] ^= 1;
        let first = img[offs[0]..offs[0] + 24].to_vec();
        img[offs[2]..offs[2] + 24].copy_from_slice(&first);
        let got = items(&img);
        assert!(
            matches!(got[1], ScanItem::Skipped { start, end, .. } if start == offs[1] && end == offs[3])
        );
        assert_eq!(record_lsn(&got[2]), Some(4));
    }

    #[test]
    fn resync_ignores_lsns_too_far_ahead_for_the_bytes_skipped() {
        // After a damaged frame, a valid frame claiming LSN 1000 one frame later
        // cannot be the next record: at most one 24-byte record fits in between.
        let (mut img, offs) = segment(1, &[b"aaaa", b"bbbb"], false, 0);
        img[offs[1] + 21] ^= 1;
        img.extend_from_slice(&raw_frame(4, 1000, 1, [0; 3], b"zzzz"));
        let got = items(&img);
        assert!(
            matches!(got[1], ScanItem::TornTail { offset, .. } if offset == offs[1]),
            "{got:?}"
        );
    }

    #[test]
    fn a_backwards_lsn_is_corruption_and_a_forward_jump_is_a_gap() {
        let (mut img, offs) = segment(5, &[b"aaaa", b"bbbb", b"cccc"], false, 24);
        let back = raw_frame(4, 5, 1, [0; 3], b"bbbb");
        img[offs[1]..offs[1] + 24].copy_from_slice(&back);
        let got = items(&img);
        assert!(matches!(
            got[1],
            ScanItem::Skipped {
                error: FormatError::LsnNotIncreasing {
                    previous: 5,
                    found: 5
                },
                ..
            }
        ));

        let (mut img, offs) = segment(5, &[b"aaaa", b"bbbb"], false, 24);
        let jump = raw_frame(4, 9, 1, [0; 3], b"bbbb");
        img[offs[1]..offs[1] + 24].copy_from_slice(&jump);
        let got = items(&img);
        assert_eq!(
            got[1],
            ScanItem::LsnGap {
                offset: offs[1],
                expected: 6,
                found: 9
            }
        );
        assert_eq!(record_lsn(&got[2]), Some(9));
        assert!(matches!(got[3], ScanItem::EndOfData { .. }));
    }

    #[test]
    fn a_first_record_below_the_header_lsn_is_not_believed() {
        let (mut img, offs) = segment(5, &[b"aaaa"], false, 24);
        let low = raw_frame(4, 4, 1, [0; 3], b"aaaa");
        img[offs[0]..offs[0] + 24].copy_from_slice(&low);
        let got = items(&img);
        assert!(matches!(
            got[0],
            ScanItem::TornTail {
                error: FormatError::LsnBeforeSegment {
                    first_lsn: 5,
                    found: 4
                },
                ..
            }
        ));
    }

    #[test]
    fn a_bad_magic_ends_the_scan_but_a_bad_header_crc_does_not() {
        let (mut img, _) = segment(1, &[b"a"], false, 0);
        img[0] = b'x';
        let got = items(&img);
        assert_eq!(got.len(), 1);
        assert!(matches!(
            got[0],
            ScanItem::BadHeader {
                error: FormatError::BadMagic { .. }
            }
        ));

        let (mut img, _) = segment(1, &[b"a"], false, 0);
        img[40] ^= 1;
        let got = items(&img);
        assert!(matches!(
            got[0],
            ScanItem::BadHeader {
                error: FormatError::HeaderChecksumMismatch { .. }
            }
        ));
        assert_eq!(record_lsn(&got[1]), Some(1));
        assert_eq!(
            items(&img[..10]),
            vec![ScanItem::BadHeader {
                error: FormatError::SegmentTooShort { len: 10 }
            }]
        );
    }

    #[test]
    fn a_resumed_scan_sees_records_appended_since() {
        let (full, offs) = segment(1, &[b"one", b"two", b"three"], false, 64);
        // First look: only the first record was written.
        let mut early = full.clone();
        early[offs[1]..].fill(0);
        let mut scan = scan_segment(&early);
        assert!(matches!(scan.next(), Some(ScanItem::Record { .. })));
        assert!(matches!(scan.next(), Some(ScanItem::EndOfData { offset }) if offset == offs[1]));
        let pos = scan.position();
        assert_eq!(pos.offset, offs[1]);
        let later: Vec<_> = SegmentScan::resume(&full, pos).collect();
        assert_eq!(record_lsn(&later[0]), Some(2));
        assert_eq!(record_lsn(&later[1]), Some(3));
        assert!(matches!(later[2], ScanItem::EndOfData { .. }));
    }

    #[test]
    fn looking_past_the_end_finds_records_hidden_by_a_zeroed_header() {
        let (mut img, offs) = segment(1, &[b"aaaa", b"bbbb", b"cccc"], false, 64);
        img[offs[1]..offs[1] + 24].fill(0);
        let mut scan = scan_segment(&img);
        assert!(matches!(scan.next(), Some(ScanItem::Record { .. })));
        assert_eq!(scan.next(), Some(ScanItem::EndOfData { offset: offs[1] }));
        assert_eq!(
            check_after_end(&img, scan.position()),
            AfterEnd::Resync {
                resume: offs[2],
                first_nonzero: offs[2]
            }
        );
        let (clean, offs) = segment(1, &[b"aaaa"], false, 64);
        let pos = ScanPosition {
            offset: offs[0] + 24,
            last_lsn: Some(1),
            ..ScanPosition::at_first_frame(Some(1))
        };
        assert_eq!(check_after_end(&clean, pos), AfterEnd::Zeros);
        let mut junk = clean.clone();
        junk[offs[0] + 40] = 7;
        assert_eq!(
            check_after_end(&junk, pos),
            AfterEnd::Garbage {
                first_nonzero: offs[0] + 40
            }
        );
    }

    #[test]
    fn a_resumed_scan_does_not_report_a_gap_twice() {
        let (mut img, offs) = segment(5, &[b"aaaa", b"bbbb"], false, 24);
        let jump = raw_frame(4, 9, 1, [0; 3], b"bbbb");
        img[offs[1]..offs[1] + 24].copy_from_slice(&jump);
        let mut scan = scan_segment(&img);
        scan.next();
        assert!(matches!(scan.next(), Some(ScanItem::LsnGap { .. })));
        let pos = scan.position();
        assert!(pos.vetted);
        let mut resumed = SegmentScan::resume(&img, pos);
        assert!(matches!(
            resumed.next(),
            Some(ScanItem::Record {
                record: Record { lsn: 9, .. },
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn header_encode_decode_round_trips(id in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,31}", first_lsn in 1u64..) {
            let h = SegmentHeader { stream_id: id, first_lsn };
            let bytes = h.encode().expect("valid header");
            prop_assert_eq!(SegmentHeader::decode(&bytes), Ok(h));
        }

        #[test]
        fn frame_encode_decode_round_trips(
            lsn in 1u64..,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            eos in any::<bool>(),
            slack in 0usize..16,
        ) {
            let (kind, payload) = if eos { (RecordKind::EndOfSegment, Vec::new()) } else { (RecordKind::Event, payload) };
            let mut buf = vec![0x55u8; frame_len(payload.len()) + slack];
            let n = encode_frame(&mut buf, lsn, kind, &payload).expect("encode");
            prop_assert_eq!(n, frame_len(payload.len()));
            prop_assert_eq!(n % FRAME_ALIGN, 0);
            match decode_frame(&buf) {
                FrameOutcome::Record { record, frame_len } => {
                    prop_assert_eq!(frame_len, n);
                    prop_assert_eq!(record, Record { lsn, kind, payload: &payload });
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn durable_lsn_encode_decode_round_trips(lsn in any::<u64>()) {
            prop_assert_eq!(decode_durable_lsn(&encode_durable_lsn(lsn)), Ok(lsn));
        }

        #[test]
        fn segment_file_name_round_trips(lsn in any::<u64>()) {
            prop_assert_eq!(parse_segment_file_name(&segment_file_name(lsn)), Some(lsn));
        }

        #[test]
        fn scanning_arbitrary_bytes_never_panics_and_always_ends(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            with_header in any::<bool>(),
        ) {
            let mut img = bytes;
            if with_header {
                let h = SegmentHeader { stream_id: "s".into(), first_lsn: 1 }.encode().expect("h");
                img.splice(0..0, h);
            }
            let n = scan_segment(&img).take(img.len() + 8).count();
            prop_assert!(n <= img.len() / FRAME_ALIGN + 4);
        }
    }
}
