//! The durable watermark: the highest LSN whose record an fsync has covered, and
//! everything that waits on it.
//!
//! The flusher is the only thread that raises the watermark, and only after the
//! fdatasync that covers it returned. It then publishes the value three ways: an
//! atomic (a lock-free check for callers whose record is already durable), a
//! mutex + condvar (threads blocked in `wait_durable`), and a tokio `watch`
//! channel (tasks in `wait_durable_async`, which must not block a runtime
//! thread). Waiters announce the LSN they want, so the flusher syncs at once
//! instead of sitting out its interval (group commit: one fsync serves every
//! waiter whose record was written before it started).
//!
//! It also owns the `durable.lsn` sidecar file that tells readers in other
//! processes how far they may load (docs/segment-format.md). The sidecar is
//! written after the fsync, never before, so it can lag the data but never run
//! ahead of it; it is fsynced at open and close, and in the round that makes a
//! last segment sealed with no successor durable (then it is the floor recovery
//! continues from; see `Flusher::sync_round`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::error::WalError;
use super::format::{self, Lsn};
use super::fs::FileSystem;

/// What async waiters observe.
#[derive(Debug, Clone, Default)]
pub(crate) struct Published {
    pub durable: Lsn,
    /// Set once; every later wait returns it.
    pub failure: Option<WalError>,
    /// The writer shut down; waits for LSNs beyond `durable` can never succeed.
    pub closed: bool,
}

/// State shared by waiters and the flusher, under one small mutex.
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    pub durable: Lsn,
    /// Highest LSN some waiter is waiting for; > durable means "sync now".
    pub wanted: Lsn,
    /// Blocked threads (for notify_all only when someone listens).
    pub blocked_waiters: usize,
    pub failure: Option<WalError>,
    pub closed: bool,
    /// The flusher was asked to do its final sync and stop.
    pub shutdown: bool,
    /// The flusher is sleeping on `flusher_cv` and must be woken for a waiter.
    pub flusher_idle: bool,
}

/// The durable watermark and its waiters.
#[derive(Debug)]
pub(crate) struct Durability {
    stream: String,
    durable: AtomicU64,
    state: Mutex<SyncState>,
    waiter_cv: Condvar,
    flusher_cv: Condvar,
    watch: watch::Sender<Published>,
}

impl Durability {
    pub(crate) fn new(stream: &str, durable: Lsn) -> Durability {
        let (watch, _) = watch::channel(Published {
            durable,
            ..Published::default()
        });
        Durability {
            stream: stream.to_string(),
            durable: AtomicU64::new(durable),
            state: Mutex::new(SyncState {
                durable,
                wanted: durable,
                ..SyncState::default()
            }),
            waiter_cv: Condvar::new(),
            flusher_cv: Condvar::new(),
            watch,
        }
    }

    pub(crate) fn durable_lsn(&self) -> Lsn {
        self.durable.load(Ordering::Acquire)
    }

    /// Locks the shared state. A panic elsewhere while holding it leaves plain
    /// numbers and flags behind, all still meaningful, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed_error(&self) -> WalError {
        WalError::Closed {
            stream: self.stream.clone(),
        }
    }

    /// Blocks until `lsn` is durable, the writer fails, or it closes first.
    pub(crate) fn wait(&self, lsn: Lsn) -> Result<(), WalError> {
        if self.durable_lsn() >= lsn {
            return Ok(());
        }
        let mut st = self.lock();
        self.announce(&mut st, lsn);
        st.blocked_waiters += 1;
        let result = loop {
            if st.durable >= lsn {
                break Ok(());
            }
            if let Some(f) = &st.failure {
                break Err(f.clone());
            }
            if st.closed {
                break Err(self.closed_error());
            }
            st = self
                .waiter_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        };
        st.blocked_waiters -= 1;
        result
    }

    /// Waits until `lsn` is durable without blocking the thread. Cancel-safe:
    /// dropping the future leaves nothing behind but a possibly early fsync.
    pub(crate) async fn wait_async(&self, lsn: Lsn) -> Result<(), WalError> {
        if self.durable_lsn() >= lsn {
            return Ok(());
        }
        // Subscribe before announcing, so a publish in between is not missed.
        let mut rx = self.watch.subscribe();
        {
            let mut st = self.lock();
            self.announce(&mut st, lsn);
        }
        let seen = rx
            .wait_for(|p| p.durable >= lsn || p.failure.is_some() || p.closed)
            .await;
        match seen {
            Ok(p) if p.durable >= lsn => Ok(()),
            Ok(p) => Err(p.failure.clone().unwrap_or_else(|| self.closed_error())),
            // The sender lives as long as `self`; treat its loss as a close.
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Records that someone waits for `lsn` and wakes the flusher if it sleeps.
    fn announce(&self, st: &mut SyncState, lsn: Lsn) {
        if lsn > st.wanted {
            st.wanted = lsn;
        }
        if st.flusher_idle {
            st.flusher_idle = false;
            self.flusher_cv.notify_one();
        }
    }

    /// The flusher's sleep: returns when `interval` has passed since
    /// `last_sync`, a waiter wants an LSN beyond the watermark, or shutdown was
    /// requested. Returns true on shutdown.
    pub(crate) fn flusher_wait(&self, last_sync: Instant, interval: Duration) -> bool {
        let deadline = last_sync + interval;
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return true;
            }
            if st.wanted > st.durable {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st.flusher_idle = true;
            st = self
                .flusher_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.flusher_idle = false;
        }
    }

    /// Raises the watermark to `lsn` (after the fsync covering it) and wakes
    /// the waiters it satisfies.
    pub(crate) fn publish(&self, lsn: Lsn) {
        let notify = {
            let mut st = self.lock();
            if lsn <= st.durable {
                return;
            }
            st.durable = lsn;
            self.durable.store(lsn, Ordering::Release);
            st.blocked_waiters > 0
        };
        if notify {
            self.waiter_cv.notify_all();
        }
        self.watch.send_modify(|p| p.durable = lsn);
    }

    /// Puts the writer into its failed state: every waiter gets `failure`.
    pub(crate) fn fail(&self, failure: WalError) {
        {
            let mut st = self.lock();
            if st.failure.is_some() {
                return;
            }
            st.failure = Some(failure.clone());
        }
        self.waiter_cv.notify_all();
        self.watch.send_modify(|p| p.failure = Some(failure));
    }

    pub(crate) fn failure(&self) -> Option<WalError> {
        self.lock().failure.clone()
    }

    /// Asks the flusher to do its final sync and stop.
    pub(crate) fn request_shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        self.flusher_cv.notify_one();
    }

    /// After the final sync: nothing more becomes durable.
    pub(crate) fn mark_closed(&self) {
        {
            let mut st = self.lock();
            st.closed = true;
        }
        self.waiter_cv.notify_all();
        self.watch.send_modify(|p| p.closed = true);
    }
}

/// The `durable.lsn` sidecar file.
#[derive(Debug)]
pub(crate) struct Sidecar {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    file: File,
}

impl Sidecar {
    /// Opens (creating 0600) the sidecar and returns it with the LSN it holds
    /// (`None` when it is new, short or fails its CRC).
    pub(crate) fn open(
        fs: &Arc<dyn FileSystem>,
        path: &Path,
    ) -> Result<(Sidecar, Option<Lsn>), WalError> {
        let file = fs
            .open_or_create(path)
            .map_err(|e| WalError::io("open the durable watermark", path, e))?;
        let mut buf = [0u8; format::DURABLE_LSN_LEN];
        let n = read_at_most(&file, &mut buf)
            .map_err(|e| WalError::io("read the durable watermark", path, e))?;
        let lsn = format::decode_durable_lsn(&buf[..n]).ok();
        Ok((
            Sidecar {
                fs: fs.clone(),
                path: path.to_path_buf(),
                file,
            },
            lsn,
        ))
    }

    /// Rewrites the value in place (one pwrite of 16 bytes at offset 0).
    pub(crate) fn write(&self, lsn: Lsn) -> Result<(), WalError> {
        let bytes = format::encode_durable_lsn(lsn);
        self.fs
            .write_at(&self.file, &self.path, &bytes, 0)
            .map_err(|e| WalError::io("write the durable watermark", &self.path, e))
    }

    /// fdatasync: at open and close, so that a restart after power loss never
    /// sees a watermark older than the last clean shutdown, and when a sealed
    /// last segment has no successor (the watermark is then the floor).
    pub(crate) fn sync(&self) -> Result<(), WalError> {
        self.fs
            .sync_data(&self.file, &self.path)
            .map_err(|e| WalError::io("fsync the durable watermark", &self.path, e))
    }
}

fn read_at_most(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
