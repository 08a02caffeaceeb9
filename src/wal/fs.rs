//! The file-system seam of the writer side: every call by which the WAL creates,
//! preallocates, maps, writes, syncs, renames or removes a file, or fsyncs a
//! directory, goes through a [`FileSystem`].
//!
//! It exists so that a test can stand between the WAL and the disk and model what
//! a power loss keeps (`fs::sim`, the power-loss model), the way raft-engine's
//! `env::FileSystem` and redb's `StorageBackend` do. Production uses [`RealFs`],
//! which makes exactly the system calls the code made before the seam existed.
//!
//! What it deliberately does not cover: the append path. An append is a memory
//! copy into a `MAP_SHARED` map of a preallocated file (`segment.rs`); it makes no
//! call, so it gains no indirection here. The seam sits on the slow paths only
//! (segment creation and rotation, the flusher's syncs, recovery, the sidecar),
//! where one dynamic call is nothing beside the system call behind it. Reading
//! (the loader's `reader.rs`, listing, stat) stays direct: a model of power loss
//! needs to see what reaches the disk, not what is read.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::stream_dir::{DIR_MODE, FILE_MODE};

#[cfg(test)]
pub(crate) mod sim;

/// The operations through which the WAL changes files. Paths are passed beside
/// open files so that an implementation can tell which file an operation is on.
pub(crate) trait FileSystem: std::fmt::Debug + Send + Sync {
    /// Creates `path` (and missing parents) as a directory, mode 0700; an
    /// existing directory is fine.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates a new file (0600), read-write; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<File>;
    /// Opens an existing file read-write.
    fn open_rw(&self, path: &Path) -> io::Result<File>;
    /// Opens `path` read-write, creating it (0600) empty if it does not exist.
    fn open_or_create(&self, path: &Path) -> io::Result<File>;
    /// Reserves `[0, len)` of `file` (fallocate, mode 0: the size grows to `len`).
    fn allocate(&self, file: &File, path: &Path, len: u64) -> io::Result<()>;
    /// Maps `[0, len)` of `file` shared and writable.
    fn map(&self, file: &File, path: &Path, len: usize) -> io::Result<MmapRaw>;
    /// Writes all of `bytes` at `offset` (pwrite).
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync: the file's data, and the metadata needed to read it back.
    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()>;
    /// fsync of a directory: makes the creations, renames and removals of names
    /// in it durable.
    fn sync_dir(&self, dir: &File, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, failing if `to` exists (RENAME_NOREPLACE).
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the name `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
}

/// The file system itself: each method is the one system call it names.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RealFs;

/// The shared [`RealFs`] every production stream uses.
pub(crate) fn real() -> Arc<dyn FileSystem> {
    Arc::new(RealFs)
}

impl FileSystem for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)
    }

    fn open_rw(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }

    fn open_or_create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path)
    }

    fn allocate(&self, file: &File, _path: &Path, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len).map_err(Into::into)
    }

    fn map(&self, file: &File, _path: &Path, len: usize) -> io::Result<MmapRaw> {
        MmapOptions::new().len(len).map_raw(file)
    }

    fn write_at(&self, file: &File, _path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(bytes, offset)
    }

    fn sync_data(&self, file: &File, _path: &Path) -> io::Result<()> {
        rustix::fs::fdatasync(file).map_err(Into::into)
    }

    fn sync_dir(&self, dir: &File, _path: &Path) -> io::Result<()> {
        dir.sync_all()
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            from,
            rustix::fs::CWD,
            to,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(Into::into)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}
