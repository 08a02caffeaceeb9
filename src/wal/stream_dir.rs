//! One stream's directory, `WAL_DIR/<stream>/`: its creation with owner-only
//! permissions, the one-writer lock (and the settle lock beside it), the listing of segment files in LSN order,
//! the disk usage that the budget counts, and the directory fsync that makes
//! creations, renames and deletions durable.
//!
//! Invariant kept: directories are created 0700 and files 0600 (audit events are
//! personal data), and every name this module produces or accepts follows the
//! layout of docs/segment-format.md. It knows nothing about what is inside a
//! segment; that is `format` (bytes) and `segment` (the mapped file).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::WalError;
use super::format::{self, Lsn};
use super::fs::FileSystem;

/// Mode of the WAL and stream directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file in a stream directory.
pub(crate) const FILE_MODE: u32 = 0o600;

/// The writer's lock file: flock'd by the one writer of the stream.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// The settle lock file: flock'd by a reader for as long as it holds the
/// writer's lock to settle the stream (`wal::settle`), and by an opening writer
/// only while it takes the writer's lock.
pub(crate) const SETTLE_LOCK_FILE: &str = "SETTLE";
/// How long a writer's open waits for a settle under way to finish. Settling
/// fdatasyncs the stream's segments and scans the last one: milliseconds when a
/// writer closed cleanly, up to about a second after one was killed with a
/// segment's worth of unsynced pages; ten seconds means the disk is stuck.
pub(crate) const SETTLE_WAIT: Duration = Duration::from_secs(10);
/// How often an opening writer looks again for the settle to be over.
const SETTLE_POLL: Duration = Duration::from_millis(2);
/// Suffix of a segment being created; readers ignore it, recovery removes it.
pub(crate) const SEGMENT_TMP_SUFFIX: &str = ".seg.tmp";

/// A segment file found in the stream directory.
#[derive(Debug, Clone)]
pub(crate) struct SegmentEntry {
    pub first_lsn: Lsn,
    pub path: PathBuf,
}

/// The stream directory, open for fsync.
#[derive(Debug)]
pub(crate) struct StreamDir {
    name: String,
    path: PathBuf,
    /// The directory itself, kept open to fsync it.
    handle: File,
    /// Every change to the stream's files goes through it (`wal::fs`).
    fs: Arc<dyn FileSystem>,
}

/// The held `LOCK` file: one writer per stream. The flock is released when this
/// is dropped (the descriptor closes), including when the process dies.
#[derive(Debug)]
pub(crate) struct StreamLock {
    _file: File,
}

/// Both locks, held by a reader settling the stream: no writer can open it
/// meanwhile, and an opening writer knows to wait rather than fail.
#[derive(Debug)]
pub(crate) struct SettleLock {
    // Field order is drop order: the writer's lock goes first.
    _writer: StreamLock,
    _settle: StreamLock,
}

impl StreamDir {
    /// Validates `stream`, creates `wal_dir/stream/` (0700) if needed and opens it,
    /// on the real file system.
    pub(crate) fn open(wal_dir: &Path, stream: &str) -> Result<StreamDir, WalError> {
        StreamDir::open_on(super::fs::real(), wal_dir, stream)
    }

    /// [`StreamDir::open`] on the file system `fs`.
    pub(crate) fn open_on(
        fs: Arc<dyn FileSystem>,
        wal_dir: &Path,
        stream: &str,
    ) -> Result<StreamDir, WalError> {
        format::validate_stream_id(stream).map_err(|e| WalError::InvalidStreamName {
            name: stream.to_string(),
            reason: e.to_string(),
        })?;
        let path = wal_dir.join(stream);
        // Directories this call creates, outermost first: each one's name is made
        // durable by an fsync of its parent, or a power loss could take the whole
        // stream (its durable records included) with it.
        let created: Vec<PathBuf> = path
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err())
            .map(Path::to_path_buf)
            .collect();
        fs.create_dir_all(&path)
            .map_err(|e| WalError::io("create the stream directory", &path, e))?;
        for dir in created.iter().rev() {
            let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            File::open(parent)
                .and_then(|handle| fs.sync_dir(&handle, parent))
                .map_err(|e| WalError::io("fsync the directory", parent, e))?;
        }
        // An existing directory keeps its mode; say so when others can read it.
        if let Ok(meta) = fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "stream directory is accessible to other users; audit events are personal data, consider chmod 700"
                );
            }
        }
        let handle =
            File::open(&path).map_err(|e| WalError::io("open the stream directory", &path, e))?;
        Ok(StreamDir {
            name: stream.to_string(),
            path,
            handle,
            fs,
        })
    }

    /// The file system the stream's files are changed through.
    pub(crate) fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn lock_path(&self) -> PathBuf {
        self.path.join(LOCK_FILE)
    }

    pub(crate) fn sidecar_path(&self) -> PathBuf {
        self.path.join(format::DURABLE_LSN_FILE)
    }

    /// Path of the `n`th spare segment of this writer. Each spare has its own
    /// name, so preparing one can never touch another about to be renamed.
    pub(crate) fn spare_path(&self, n: u64) -> PathBuf {
        self.path.join(format!("spare-{n}{SEGMENT_TMP_SUFFIX}"))
    }

    pub(crate) fn segment_path(&self, first_lsn: Lsn) -> PathBuf {
        self.path.join(format::segment_file_name(first_lsn))
    }

    /// Takes the stream's writer lock for a writer (flock `LOCK`, exclusive).
    ///
    /// A reader settling the stream holds `LOCK` too, briefly, and always
    /// inside the `SETTLE` lock. So the writer first takes `SETTLE`, waiting up
    /// to [`SETTLE_WAIT`] for a settle under way ([`WalError::StreamSettling`]
    /// after that), and then `LOCK` without waiting: held by anyone then, it
    /// can only be another writer ([`WalError::StreamLocked`], at once).
    /// `SETTLE` is let go at once: settles that come later find `LOCK` taken
    /// and leave the stream to this writer.
    ///
    /// flock locks belong to the open file description, so a second open in the
    /// same process is refused exactly like another process.
    pub(crate) fn lock(&self) -> Result<StreamLock, WalError> {
        let settle_path = self.path.join(SETTLE_LOCK_FILE);
        let started = Instant::now();
        let _settle = loop {
            match self.try_flock(&settle_path)? {
                Some(lock) => break lock,
                None if started.elapsed() >= SETTLE_WAIT => {
                    return Err(WalError::StreamSettling {
                        stream: self.name.clone(),
                        path: settle_path,
                        waited: started.elapsed(),
                    })
                }
                None => std::thread::sleep(SETTLE_POLL),
            }
        };
        self.try_lock_writer()
    }

    /// For a reader about to settle the stream: `SETTLE`, then `LOCK`, neither
    /// waiting. [`WalError::StreamLocked`] when either is held: a writer has
    /// the stream (or is taking it), or another reader is settling it.
    pub(crate) fn lock_to_settle(&self) -> Result<SettleLock, WalError> {
        let settle_path = self.path.join(SETTLE_LOCK_FILE);
        let Some(settle) = self.try_flock(&settle_path)? else {
            return Err(WalError::StreamLocked {
                stream: self.name.clone(),
                path: settle_path,
            });
        };
        Ok(SettleLock {
            _writer: self.try_lock_writer()?,
            _settle: settle,
        })
    }

    /// `LOCK`, exclusive, without waiting.
    fn try_lock_writer(&self) -> Result<StreamLock, WalError> {
        let path = self.lock_path();
        match self.try_flock(&path)? {
            Some(lock) => Ok(lock),
            None => Err(WalError::StreamLocked {
                stream: self.name.clone(),
                path,
            }),
        }
    }

    /// flock(LOCK_EX|LOCK_NB) on `path` (created 0600 if missing); `None` if
    /// someone holds it.
    fn try_flock(&self, path: &Path) -> Result<Option<StreamLock>, WalError> {
        let file = self
            .fs
            .open_or_create(path)
            .map_err(|e| WalError::io("open the lock file", path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(StreamLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(WalError::io("lock", path, e.into())),
        }
    }

    /// The segment files (`<first lsn>.seg`), sorted by first LSN.
    pub(crate) fn segments(&self) -> Result<Vec<SegmentEntry>, WalError> {
        let mut out = Vec::new();
        for entry in self.read_dir()? {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(first_lsn) = format::parse_segment_file_name(&name) else {
                continue;
            };
            out.push(SegmentEntry {
                first_lsn,
                path: entry.path(),
            });
        }
        out.sort_by_key(|s| s.first_lsn);
        Ok(out)
    }

    /// Bytes counted against the disk budget: every `*.seg` and `*.seg.tmp` file.
    /// A segment a reader deletes between the listing and the stat is skipped.
    pub(crate) fn usage_bytes(&self) -> Result<u64, WalError> {
        let mut total = 0u64;
        for entry in self.read_dir()? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(format::SEGMENT_SUFFIX) || name.ends_with(SEGMENT_TMP_SUFFIX) {
                match entry.metadata() {
                    Ok(m) => total += m.len(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(WalError::io("stat", &entry.path(), e)),
                }
            }
        }
        Ok(total)
    }

    /// Removes leftover `*.seg.tmp` files (a segment whose creation did not
    /// finish, or a spare); returns how many. They never hold acknowledged
    /// records: a segment is renamed before its first append.
    pub(crate) fn remove_tmp_files(&self) -> Result<usize, WalError> {
        let mut removed = 0;
        for entry in self.read_dir()? {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.ends_with(SEGMENT_TMP_SUFFIX))
            {
                let path = entry.path();
                match self.fs.remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(WalError::io("remove", &path, e)),
                }
            }
        }
        if removed > 0 {
            self.sync()?;
        }
        Ok(removed)
    }

    /// fsyncs the directory: makes file creations, renames and deletions durable.
    pub(crate) fn sync(&self) -> Result<(), WalError> {
        self.fs
            .sync_dir(&self.handle, &self.path)
            .map_err(|e| WalError::io("fsync the directory", &self.path, e))
    }

    /// Free bytes for an unprivileged user on the stream's file system.
    pub(crate) fn free_bytes(&self) -> Result<u64, WalError> {
        let st = rustix::fs::fstatvfs(&self.handle)
            .map_err(|e| WalError::io("statvfs", &self.path, e.into()))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// The directory's entries. A failing entry fails the listing: skipping one
    /// could make recovery pick the wrong last segment.
    fn read_dir(&self) -> Result<Vec<fs::DirEntry>, WalError> {
        let rd = fs::read_dir(&self.path).map_err(|e| WalError::io("list", &self.path, e))?;
        rd.map(|e| e.map_err(|e| WalError::io("list", &self.path, e)))
            .collect()
    }
}
