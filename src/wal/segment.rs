//! A segment file as the writer holds it: preallocated, mapped `MAP_SHARED`
//! (for reading, and for the header), and appended to with one `pwrite` per
//! frame.
//!
//! Why `pwrite` and not stores into the map: either way a record is in the page
//! cache when the call returns, so it survives a SIGKILL of the process. But a
//! page dirtied through a writable shared map must be write-protected again
//! when the flusher's fdatasync writes it back: one TLB-shootdown IPI to every
//! CPU that runs the process's threads per page, and a write fault on the next
//! store into it. On this project's two-vCPU machine those cost as much as the
//! system call in the mean and made the tail (the async call's p99 was 19–21 µs
//! against 3–4 µs with `pwrite`; docs/benchmarks.md, `bench record`), and they
//! grow with the number of CPUs a service runs on. A `pwrite` leaves no
//! writable mapping to clean. The map stays for reads: the flusher hashes
//! appended frames through it and recovery scans it (on Linux a shared map and
//! `pwrite` see the same page cache).
//!
//! Why preallocated: every byte of the file is reserved by `fallocate` (and
//! written as zeros) before the first append, so an append never needs a block
//! the disk does not have; a full disk shows up as an error when the
//! spare segment is created. And because the size never changes after creation,
//! fdatasync (data, no metadata) is enough to make appended records durable.
//!
//! Lifecycle: [`Spare`] (`spare-<n>.seg.tmp`, fallocated, mapped, head faulted
//! in, no header) → [`Spare::install`] writes the header and renames it to
//! `<first lsn>.seg` → [`ActiveSegment`] appends frames at its write offset →
//! [`ActiveSegment::seal`] writes the EndOfSegment record. This module never
//! shrinks a file: a reader may have it mapped, and a shrink would SIGBUS it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapRaw;

use super::error::WalError;
use super::format::{self, Lsn, RecordKind, SegmentHeader};
use super::fs::FileSystem;

/// A mapped segment file. Shared (behind an `Arc`) by the appender, which
/// writes to the file, and the flusher, which reads frames through the map and
/// fdatasyncs the file.
#[derive(Debug)]
pub(crate) struct Segment {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    file: File,
    map: MmapRaw,
    len: usize,
    first_lsn: Lsn,
}

impl Segment {
    /// Opens an existing segment (recovery) and maps all of it read-write.
    pub(crate) fn open(
        fs: &Arc<dyn FileSystem>,
        path: &Path,
        first_lsn: Lsn,
    ) -> Result<Segment, WalError> {
        let file = fs
            .open_rw(path)
            .map_err(|e| WalError::io("open segment", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| WalError::io("stat segment", path, e))?
            .len();
        let len = usize::try_from(len).map_err(|_| WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("file is {len} bytes, too large to map"),
        })?;
        let map = map_file(fs.as_ref(), &file, len, path)?;
        Ok(Segment {
            fs: fs.clone(),
            path: path.to_path_buf(),
            file,
            map,
            len,
            first_lsn,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn first_lsn(&self) -> Lsn {
        self.first_lsn
    }

    /// fdatasync: enough because the file size was fixed by fallocate before the
    /// first record, so no metadata a reader needs changes after that.
    pub(crate) fn sync_data(&self) -> std::io::Result<()> {
        self.fs.sync_data(&self.file, &self.path)
    }

    /// The open file, for tests that swap its descriptor to provoke I/O errors.
    #[cfg(test)]
    pub(crate) fn file_for_test(&self) -> &File {
        &self.file
    }

    /// The whole mapped file, for recovery's scan.
    ///
    /// # Safety
    /// No one may write through this segment's map while the slice lives: the
    /// caller is recovery, which runs before the segment has an appender.
    pub(crate) unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the map is `len` bytes long and valid while `self` lives; the
        // caller guarantees no writer in this process; other processes only read
        // (readers) and the stream lock keeps other writers out.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }

    /// The `len` bytes at `offset`, or `None` past the end: how the flusher
    /// reads the frames it hashes while appends go on after them.
    ///
    /// # Safety
    /// No one may write `[offset, offset + len)` while the slice lives. That
    /// holds for a frame whose LSN is at or below the writer's published
    /// written LSN: an appended frame is complete and never written again.
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) of a map valid while `self` lives;
        // the caller guarantees no one writes these bytes meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) })
    }

    /// Sets `[from, len)` to zero, touching only pages that are not zero already
    /// (the preallocated tail is zero and stays unwritten). Used by recovery to
    /// cut a torn tail without shrinking the file. Returns the bytes zeroed
    /// (counting whole nonzero chunks).
    ///
    /// # Safety
    /// As for [`Segment::bytes`]: no appender exists yet.
    pub(crate) unsafe fn zero_from(&self, from: usize) -> u64 {
        const CHUNK: usize = 4096;
        let mut zeroed = 0u64;
        let mut start = from.min(self.len);
        while start < self.len {
            let end = ((start / CHUNK) + 1) * CHUNK;
            let end = end.min(self.len);
            // SAFETY: [start, end) lies inside the map; recovery is the only
            // writer (see the function's contract).
            let chunk = unsafe {
                std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), end - start)
            };
            if chunk.iter().any(|&b| b != 0) {
                chunk.fill(0);
                zeroed += chunk.len() as u64;
            }
            start = end;
        }
        zeroed
    }
}

/// Bytes at the start of a spare faulted in ahead of rotation (see
/// `Spare::create`).
const WRITTEN_HEAD: usize = 64 * 1024;

/// Writes zeros over `[0, len)` of `file`, 16 KiB per call: small enough that
/// the page cache keeps small folios (see `Spare::create`), large enough to
/// halve the system calls of page-sized writes.
fn write_zeros(fs: &dyn FileSystem, file: &File, path: &Path, len: u64) -> std::io::Result<()> {
    const CHUNK: [u8; 16 * 1024] = [0; 16 * 1024];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK.len() as u64) as usize;
        fs.write_at(file, path, &CHUNK[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Maps `len` bytes of `file` shared and writable.
fn map_file(
    fs: &dyn FileSystem,
    file: &File,
    len: usize,
    path: &Path,
) -> Result<MmapRaw, WalError> {
    fs.map(file, path, len)
        .map_err(|e| WalError::io("map segment", path, e))
}

/// A preallocated, zero-filled, mapped segment file that has no header yet
/// (`spare-<n>.seg.tmp`). Dropping it uninstalled removes the file.
#[derive(Debug)]
pub(crate) struct Spare {
    fs: Arc<dyn FileSystem>,
    tmp_path: PathBuf,
    /// The file and its map; `None` while being created and once installed.
    inner: Option<(File, MmapRaw)>,
    len: usize,
    /// Renamed to its final name: nothing to clean up on drop.
    installed: bool,
}

/// Why a spare could not be created.
#[derive(Debug)]
pub(crate) enum SpareError {
    /// The file system has no room for the preallocation (ENOSPC/EDQUOT).
    NoSpace(std::io::Error),
    Other(WalError),
}

impl Spare {
    /// Creates `tmp_path` (0600), reserves `len` bytes with fallocate, writes
    /// zeros over them if `zero_fill`, maps it and faults in its first pages (see
    /// the comments inside).
    pub(crate) fn create(
        fs: &Arc<dyn FileSystem>,
        tmp_path: &Path,
        len: u64,
        zero_fill: bool,
    ) -> Result<Spare, SpareError> {
        let other = |op, e| SpareError::Other(WalError::io(op, tmp_path, e));
        let ulen = usize::try_from(len).map_err(|_| {
            SpareError::Other(WalError::InvalidConfig {
                setting: "segment_size",
                reason: format!("{len} bytes does not fit in memory"),
            })
        })?;
        let file = fs
            .create_new(tmp_path)
            .map_err(|e| other("create spare segment", e))?;
        // From here on a failure must not leave the tmp file behind.
        let mut spare = Spare {
            fs: fs.clone(),
            tmp_path: tmp_path.to_path_buf(),
            inner: None,
            len: ulen,
            installed: false,
        };
        if let Err(e) = fs.allocate(&file, tmp_path, len) {
            drop(spare);
            let errno = e.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
            return Err(match errno {
                Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT) => SpareError::NoSpace(e),
                _ => other("preallocate spare segment", e),
            });
        }
        if zero_fill {
            // fallocate leaves unwritten extents, whose conversion to written
            // every later fdatasync has to write as well; written zeros make a
            // durable fsync shorter on ext4. The writes are small (16 KiB):
            // large ones leave large page-cache folios, which a later record
            // stored through the map makes the kernel write back whole
            // (docs/benchmarks.md, `bench wal`). Not fsynced here (see below);
            // the kernel writes the zeros back in the background.
            if let Err(e) = write_zeros(fs.as_ref(), &file, tmp_path, len) {
                drop(spare);
                return Err(SpareError::Other(WalError::io(
                    "zero-fill spare segment",
                    tmp_path,
                    e,
                )));
            }
        }
        let map = match map_file(fs.as_ref(), &file, ulen, tmp_path) {
            Ok(m) => m,
            Err(e) => {
                drop(spare);
                return Err(SpareError::Other(e));
            }
        };
        // Fault the head of the file in, writable, now. fallocate leaves
        // "unwritten" extents, and the first store into such a page through a
        // map makes ext4 start a journal transaction (page_mkwrite), which
        // blocked for 2–12 ms under heavy writeback in measurements. That
        // first store is the header, written at rotation under the append
        // mutex; here it costs nobody. MADV_POPULATE_WRITE does not touch the
        // data (all zero anyway); the pages are written back with the
        // segment's first fsync. No fdatasync here: under heavy writeback it
        // took 150–400 ms and made rotation wait for the spare; the flusher's
        // fdatasync of the segment (before any durable LSN in it) covers the
        // preallocation's metadata too.
        let head = WRITTEN_HEAD.min(ulen);
        if let Err(e) = map.advise_range(memmap2::Advice::PopulateWrite, 0, head) {
            // Kernels before 5.14 lack it: the header store then faults as usual.
            tracing::debug!(error = %e, "MADV_POPULATE_WRITE failed on the spare segment");
        }
        spare.inner = Some((file, map));
        Ok(spare)
    }

    /// Turns the spare into segment `first_lsn` of `stream`: writes the header
    /// through the map, then renames the file to `final_path` (never replacing
    /// an existing file). After this returns, a record appended to the segment
    /// survives SIGKILL under its final name.
    ///
    /// Nothing is fsynced here, because this runs under the append mutex and an
    /// fdatasync during heavy writeback took 40–80 ms in measurements, stalling
    /// every appender. Power-loss durability of the header and the name comes
    /// from the flusher, which fdatasyncs this file and fsyncs the directory
    /// before it publishes any durable LSN inside the segment; recovery removes a
    /// trailing segment whose header never reached the disk (it can hold no
    /// durable record). That fdatasync also makes the preallocation durable.
    pub(crate) fn install(
        mut self,
        final_path: &Path,
        stream: &str,
        first_lsn: Lsn,
    ) -> Result<Segment, WalError> {
        let header = SegmentHeader {
            stream_id: stream.to_string(),
            first_lsn,
        }
        .encode()
        .map_err(|e| WalError::InvalidStreamName {
            name: stream.to_string(),
            reason: e.to_string(),
        })?;
        let Some((file, map)) = self.inner.take() else {
            return Err(WalError::io(
                "install spare segment",
                &self.tmp_path,
                std::io::Error::other("spare already installed"),
            ));
        };
        if self.len < format::SEGMENT_HEADER_LEN {
            return Err(WalError::InvalidConfig {
                setting: "segment_size",
                reason: format!("{} bytes cannot hold the segment header", self.len),
            });
        }
        // SAFETY: the map is `len` >= SEGMENT_HEADER_LEN bytes; the spare is
        // owned by this call (no appender, not yet visible under a .seg name).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), map.as_mut_ptr(), header.len());
        }
        // NOREPLACE: an existing segment of that name is never overwritten.
        self.fs
            .rename_noreplace(&self.tmp_path, final_path)
            .map_err(|e| WalError::io("rename new segment into place", final_path, e))?;
        self.installed = true;
        Ok(Segment {
            fs: self.fs.clone(),
            path: final_path.to_path_buf(),
            file,
            map,
            len: self.len,
            first_lsn,
        })
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        if !self.installed {
            // Never installed (or failed mid-creation): the tmp file is garbage.
            match self.fs.remove_file(&self.tmp_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %self.tmp_path.display(), error = %e, "cannot remove spare segment")
                }
            }
        }
    }
}

/// The segment being appended to, with its write offset. Owned by the writer's
/// append state, behind its mutex: holding `&mut ActiveSegment` is what makes a
/// thread the only one appending to the file.
#[derive(Debug)]
pub(crate) struct ActiveSegment {
    segment: std::sync::Arc<Segment>,
    write_off: usize,
    sealed: bool,
    /// The frame being appended, encoded here and then written with one
    /// `pwrite`; kept between appends for its capacity.
    frame: Vec<u8>,
}

impl ActiveSegment {
    /// `write_off` is where the next frame goes (8-aligned, after the header).
    pub(crate) fn new(segment: std::sync::Arc<Segment>, write_off: usize) -> ActiveSegment {
        ActiveSegment {
            segment,
            write_off,
            sealed: false,
            frame: Vec::new(),
        }
    }

    /// Where the next frame goes.
    pub(crate) fn write_off(&self) -> usize {
        self.write_off
    }

    pub(crate) fn segment(&self) -> &std::sync::Arc<Segment> {
        &self.segment
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Whether a frame of `frame_len` bytes fits while keeping room for the
    /// EndOfSegment record that must follow the last event.
    pub(crate) fn has_room_for(&self, frame_len: usize) -> bool {
        !self.sealed
            && self
                .write_off
                .checked_add(frame_len)
                .and_then(|end| end.checked_add(format::EOS_FRAME_LEN))
                .is_some_and(|end| end <= self.segment.len)
    }

    /// Writes one frame at the write offset. The caller checked
    /// [`has_room_for`](Self::has_room_for).
    pub(crate) fn append(
        &mut self,
        lsn: Lsn,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<(), WalError> {
        let frame_len = format::frame_len(payload.len());
        let end = self.write_off + frame_len;
        if end > self.segment.len {
            // has_room_for was not consulted; refuse rather than write past the map.
            return Err(WalError::EventTooLarge {
                len: frame_len,
                max: self.segment.len.saturating_sub(self.write_off),
            });
        }
        // One pwrite of the whole frame, not a copy into the map: see the
        // module comment. A frame another process reads half-written fails its
        // CRC there. On an error nothing is published (the LSN is not taken and
        // the write offset stays), so the next append overwrites whatever part
        // of this frame reached the page cache.
        self.frame.clear();
        self.frame.resize(frame_len, 0);
        format::encode_frame(&mut self.frame, lsn, kind, payload).map_err(|e| {
            WalError::Encode {
                reason: e.to_string(),
            }
        })?;
        let seg = &self.segment;
        seg.fs
            .write_at(&seg.file, &seg.path, &self.frame, self.write_off as u64)
            .map_err(|e| WalError::io("append to segment", &seg.path, e))?;
        self.write_off = end;
        Ok(())
    }

    /// Writes the EndOfSegment record with `lsn`; no append follows.
    pub(crate) fn seal(&mut self, lsn: Lsn) -> Result<(), WalError> {
        self.append(lsn, RecordKind::EndOfSegment, &[])?;
        self.sealed = true;
        Ok(())
    }
}
