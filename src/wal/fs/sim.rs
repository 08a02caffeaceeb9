//! A power-loss model of the file system, for tests: the real file system in a
//! temporary directory (the *live image*, what every process sees), plus a shadow
//! *durable image* of what a power loss would leave.
//!
//! What the model assumes, keeping the least that POSIX promises:
//!
//! - File data reaches the durable image only at an `fdatasync`/`fsync` of that
//!   file, which copies the file's whole current content (size included).
//!   Writes (through `write`, or stores into a shared map) that were not synced
//!   revert to the last synced content; a file never synced is empty. Real file
//!   systems usually keep more (ext4 `data=ordered` writes dirty pages back
//!   within seconds, and journals `fallocate`'s size with the name); the model
//!   keeps the worst case. [`Landing`] adds the opposite extremes: every unsynced
//!   write landed, or only the sidecar's did.
//! - Names (creations, renames, removals) reach the durable image only at an
//!   `fsync` of their directory, which makes the durable set of names in that
//!   directory equal to the live one (a directory fsync persists all of its
//!   entries, not one). Until then a created file does not exist, a renamed one
//!   has its old name and a removed one is still there, with its durable content.
//! - Files are identified by inode, so content synced under one name is found
//!   under a later name; a file created through the model gets a new identity
//!   even when the file system reuses a freed inode number.
//!
//! A *sync point* is every call that changes durable state or names: sync,
//! directory sync, rename, remove. They are numbered in call order (the
//! workloads that use this model are deterministic: one flusher round at a time,
//! no background preparer), so a test can run a workload once to count them and
//! then again cutting the power at point `k`: from that call on the durable image
//! is frozen (the call and everything after it happen on a machine that is off;
//! the live image goes on, so the code under test runs undisturbed).
//! [`SimFs::materialize`] then writes the durable image out as a directory to
//! reopen. A hook can run code just before a given point and cut the power there (a
//! loader acting in the window between a write and its sync).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use memmap2::MmapRaw;

use super::{FileSystem, RealFs};

/// Which unsynced writes a power loss keeps in [`SimFs::materialize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landing {
    /// None: every file has its last synced content.
    Nothing,
    /// Every file's content at the cut (names still as last synced).
    Everything,
    /// Only `durable.lsn`'s content at the cut.
    SidecarOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

/// One numbered sync point, for test messages.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub number: u64,
    pub op: &'static str,
    pub path: PathBuf,
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    /// Durable names of each directory under the root (the root included).
    dirs: HashMap<PathBuf, BTreeMap<OsString, Node>>,
    /// Durable content by file identity.
    data: HashMap<u64, Vec<u8>>,
    /// Live content by file identity at the cut, for the landings that keep it.
    live_at_cut: HashMap<u64, Vec<u8>>,
    /// The identity of the file each live inode number holds now.
    ids: HashMap<u64, u64>,
    next_id: u64,
    points: Vec<Point>,
    cut_at: Option<u64>,
    cut: bool,
    hook: Option<(u64, Hook)>,
}

/// See the module docs.
pub(crate) struct SimFs {
    root: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for SimFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFs").field("root", &self.root).finish()
    }
}

impl SimFs {
    /// Models the tree under `root` (which must exist), taking what is there now
    /// as durable.
    pub(crate) fn new(root: &Path) -> io::Result<SimFs> {
        let sim = SimFs {
            root: root.to_path_buf(),
            state: Mutex::new(State::default()),
        };
        {
            let mut st = sim.lock();
            let mut stack = vec![root.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let names = st.live_names(&dir)?;
                for (name, node) in &names {
                    let path = dir.join(name);
                    match node {
                        Node::Dir => stack.push(path),
                        Node::File(ino) => {
                            st.data.insert(*ino, fs::read(&path)?);
                        }
                    }
                }
                st.dirs.insert(dir, names);
            }
        }
        Ok(sim)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cut the power at sync point `k` (1-based): that call and all after it
    /// leave the durable image alone.
    pub(crate) fn cut_at(&self, k: u64) {
        self.lock().cut_at = Some(k);
    }

    /// Cut the power now.
    pub(crate) fn cut_now(&self) -> io::Result<()> {
        let mut st = self.lock();
        if !st.cut {
            self.cut(&mut st)?;
        }
        Ok(())
    }

    /// Runs `hook` when the call that would be sync point `k` comes, then cuts
    /// the power at that call (the hook's own sync points come before it).
    pub(crate) fn before_point_then_cut(&self, k: u64, hook: impl FnOnce() + Send + 'static) {
        self.lock().hook = Some((k, Box::new(hook)));
    }

    pub(crate) fn power_lost(&self) -> bool {
        self.lock().cut
    }

    /// The sync points passed so far.
    pub(crate) fn points(&self) -> Vec<Point> {
        self.lock().points.clone()
    }

    /// Writes the durable image (with `landing`'s unsynced writes) to `dest`, a
    /// directory that must not exist yet.
    pub(crate) fn materialize(&self, dest: &Path, landing: Landing) -> io::Result<()> {
        let st = self.lock();
        let mut stack = vec![(self.root.clone(), dest.to_path_buf())];
        fs::create_dir(dest)?;
        while let Some((from, to)) = stack.pop() {
            let Some(names) = st.dirs.get(&from) else {
                continue;
            };
            for (name, node) in names {
                match node {
                    Node::Dir => {
                        fs::create_dir(to.join(name))?;
                        stack.push((from.join(name), to.join(name)));
                    }
                    Node::File(id) => {
                        let lands = match landing {
                            Landing::Nothing => false,
                            Landing::Everything => true,
                            Landing::SidecarOnly => {
                                name.to_str() == Some(crate::wal::format::DURABLE_LSN_FILE)
                            }
                        };
                        let bytes = lands
                            .then(|| st.live_at_cut.get(id))
                            .flatten()
                            .or_else(|| st.data.get(id));
                        fs::write(to.join(name), bytes.map(Vec::as_slice).unwrap_or(&[]))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts a sync point; returns whether its durable effect applies (the
    /// power is still on). Runs the hook first when it is due.
    fn point(&self, op: &'static str, path: &Path) -> io::Result<bool> {
        let hook = {
            let mut st = self.lock();
            let number = st.points.len() as u64 + 1;
            match st.hook.take() {
                Some((k, hook)) if k == number => Some(hook),
                other => {
                    st.hook = other;
                    None
                }
            }
        };
        let hooked = hook.is_some();
        if let Some(hook) = hook {
            hook();
        }
        let mut st = self.lock();
        let number = st.points.len() as u64 + 1;
        st.points.push(Point {
            number,
            op,
            path: path.to_path_buf(),
        });
        if !st.cut && (hooked || st.cut_at == Some(number)) {
            self.cut(&mut st)?;
        }
        Ok(!st.cut)
    }

    /// Freezes the durable image and records the live content for the landings.
    fn cut(&self, st: &mut State) -> io::Result<()> {
        st.cut = true;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for (name, node) in st.live_names(&dir)? {
                match node {
                    Node::Dir => stack.push(dir.join(name)),
                    Node::File(id) => {
                        st.live_at_cut.insert(id, fs::read(dir.join(name))?);
                    }
                }
            }
        }
        Ok(())
    }
}

impl State {
    /// The identity of the file with inode number `ino`.
    fn id(&mut self, ino: u64) -> u64 {
        if let Some(id) = self.ids.get(&ino) {
            return *id;
        }
        self.new_id(ino)
    }

    /// A new file now holds inode number `ino`.
    fn new_id(&mut self, ino: u64) -> u64 {
        self.next_id += 1;
        self.ids.insert(ino, self.next_id);
        self.next_id
    }

    /// The names in `dir` now, with their files' identities.
    fn live_names(&mut self, dir: &Path) -> io::Result<BTreeMap<OsString, Node>> {
        let mut names = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            let node = if meta.is_dir() {
                Node::Dir
            } else {
                Node::File(self.id(meta.ino()))
            };
            names.insert(entry.file_name(), node);
        }
        Ok(names)
    }
}

impl SimFs {
    /// Gives a file just created through the model a new identity.
    fn created(&self, file: io::Result<File>) -> io::Result<File> {
        let file = file?;
        let ino = file.metadata()?.ino();
        self.lock().new_id(ino);
        Ok(file)
    }
}

/// All of `file`'s current bytes.
fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

impl FileSystem for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        RealFs.create_dir_all(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<File> {
        self.created(RealFs.create_new(path))
    }

    fn open_rw(&self, path: &Path) -> io::Result<File> {
        RealFs.open_rw(path)
    }

    fn open_or_create(&self, path: &Path) -> io::Result<File> {
        if fs::symlink_metadata(path).is_ok() {
            RealFs.open_or_create(path)
        } else {
            self.created(RealFs.open_or_create(path))
        }
    }

    fn allocate(&self, file: &File, path: &Path, len: u64) -> io::Result<()> {
        RealFs.allocate(file, path, len)
    }

    fn map(&self, file: &File, path: &Path, len: usize) -> io::Result<MmapRaw> {
        RealFs.map(file, path, len)
    }

    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        RealFs.write_at(file, path, bytes, offset)
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        if self.point("sync_data", path)? {
            let ino = file.metadata()?.ino();
            let bytes = read_all(file)?;
            let mut st = self.lock();
            let id = st.id(ino);
            st.data.insert(id, bytes);
        }
        Ok(())
    }

    fn sync_dir(&self, _dir: &File, path: &Path) -> io::Result<()> {
        if self.point("sync_dir", path)? {
            let mut st = self.lock();
            let names = st.live_names(path)?;
            st.dirs.insert(path.to_path_buf(), names);
        }
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.point("rename", to)?;
        RealFs.rename_noreplace(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.point("remove", path)?;
        RealFs.remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_in(dir: &Path) -> File {
        File::open(dir).expect("open dir")
    }

    /// A model over a fresh directory `root` in a new temporary directory (the
    /// images the tests make go beside `root`).
    fn sim_in_a_tempdir() -> (tempfile::TempDir, PathBuf, SimFs) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        fs::create_dir(&root).expect("root");
        let sim = SimFs::new(&root).expect("model");
        (tmp, root, sim)
    }

    #[test]
    fn only_synced_bytes_and_names_survive_a_cut() {
        let (tmp, root, sim) = sim_in_a_tempdir();
        let a = root.join("a");
        let f = sim.create_new(&a).expect("create a");
        sim.write_at(&f, &a, b"one", 0).expect("write");
        sim.sync_data(&f, &a).expect("sync a");
        sim.sync_dir(&file_in(&root), &root).expect("sync dir");
        sim.write_at(&f, &a, b"two", 0).expect("unsynced write");
        // A file synced but never named durably, and a durable name removed
        // without a directory fsync.
        let b = root.join("b");
        let g = sim.create_new(&b).expect("create b");
        sim.sync_data(&g, &b).expect("sync b");
        sim.remove_file(&a).expect("remove a");
        sim.cut_now().expect("cut");

        let image = tmp.path().join("image");
        sim.materialize(&image, Landing::Nothing).expect("image");
        assert_eq!(fs::read(image.join("a")).expect("a survives"), b"one");
        assert!(!image.join("b").exists(), "b was never named durably");

        let landed = tmp.path().join("landed");
        sim.materialize(&landed, Landing::Everything)
            .expect("image");
        // Removed from the live tree before the cut, so no live content to land:
        // it keeps its durable content under its durable name.
        assert_eq!(fs::read(landed.join("a")).expect("a survives"), b"one");
    }

    #[test]
    fn a_cut_at_a_point_freezes_the_durable_image_from_that_call_on() {
        let (tmp, root, sim) = sim_in_a_tempdir();
        sim.cut_at(2);
        let a = root.join("a");
        let f = sim.create_new(&a).expect("create");
        sim.write_at(&f, &a, b"x", 0).expect("write");
        sim.sync_dir(&file_in(&root), &root).expect("point 1");
        sim.sync_data(&f, &a).expect("point 2: the power is off");
        assert!(sim.power_lost());
        let image = tmp.path().join("image");
        sim.materialize(&image, Landing::Nothing).expect("image");
        assert_eq!(
            fs::read(image.join("a")).expect("named"),
            b"",
            "never synced: empty"
        );
        let landed = tmp.path().join("landed");
        sim.materialize(&landed, Landing::Everything)
            .expect("image");
        assert_eq!(fs::read(landed.join("a")).expect("named"), b"x");
    }
}
