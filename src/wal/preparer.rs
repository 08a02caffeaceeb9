//! The spare segment: the next segment file, created ahead by a background
//! thread so that rotation does not wait for a 64 MiB fallocate.
//!
//! The spare cannot carry its header yet (its first LSN is known only when the
//! current segment fills), so the thread prepares everything else: create
//! `spare-<n>.seg.tmp` 0600, fallocate, write zeros over it (unless configured
//! off), map. Rotation takes it from the
//! [`SpareSlot`], writes the header and renames it (`Spare::install`). When no
//! spare is ready (budget exhausted, disk full, or segments filling faster than
//! they are prepared) rotation creates one inline through the same slot, so the
//! budget check and the creation never race with the thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::budget::{DiskBudget, NoRoom};
use super::error::WalError;
use super::segment::{Spare, SpareError};
use super::stream_dir::StreamDir;

#[derive(Debug, Default)]
struct SlotState {
    /// Number of the next spare file (`spare-<n>.seg.tmp`).
    next_spare: u64,
    spare: Option<Spare>,
    /// The thread is creating a spare right now.
    busy: bool,
    /// Rotation asked for the next spare.
    wanted: bool,
    shutdown: bool,
}

/// Where the prepared spare waits for rotation.
#[derive(Debug)]
pub(crate) struct SpareSlot {
    state: Mutex<SlotState>,
    cv: Condvar,
    dir: Arc<StreamDir>,
    budget: DiskBudget,
    /// Write zeros over each new spare (see `WalConfig::zero_fill_segments`).
    zero_fill: bool,
}

impl SlotState {
    fn take_spare_number(&mut self) -> u64 {
        let n = self.next_spare;
        self.next_spare += 1;
        n
    }
}

impl SpareSlot {
    pub(crate) fn new(dir: Arc<StreamDir>, budget: DiskBudget, zero_fill: bool) -> SpareSlot {
        SpareSlot {
            state: Mutex::new(SlotState::default()),
            cv: Condvar::new(),
            dir,
            budget,
            zero_fill,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the background thread for the next spare.
    pub(crate) fn request(&self) {
        let mut st = self.lock();
        if st.spare.is_none() && !st.shutdown {
            st.wanted = true;
            self.cv.notify_all();
        }
    }

    /// For rotation: the prepared spare, or one created here and now (after the
    /// budget check). Waits for a preparation already under way rather than
    /// racing it for the same disk space.
    pub(crate) fn take_or_create(&self) -> Result<Result<Spare, NoRoom>, WalError> {
        let mut st = self.lock();
        while st.busy {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if let Some(spare) = st.spare.take() {
            return Ok(Ok(spare));
        }
        // Held across the creation: the thread cannot start a second one.
        let n = st.take_spare_number();
        let created = self.create_checked(n);
        drop(st);
        created
    }

    /// Budget check, then create spare file number `n`.
    fn create_checked(&self, n: u64) -> Result<Result<Spare, NoRoom>, WalError> {
        if let Err(no_room) = self.budget.check_new_segment(&self.dir)? {
            return Ok(Err(no_room));
        }
        let path = self.dir.spare_path(n);
        let _span = tracing::debug_span!("create_spare_segment", path = %path.display()).entered();
        match Spare::create(
            self.dir.fs(),
            &path,
            self.budget.segment_size,
            self.zero_fill,
        ) {
            Ok(spare) => Ok(Ok(spare)),
            Err(SpareError::NoSpace(e)) => Ok(Err(NoRoom::Disk {
                path,
                needed: self.budget.segment_size,
                source: Arc::new(e),
            })),
            Err(SpareError::Other(e)) => Err(e),
        }
    }

    /// Stops the thread and removes an unused spare (its Drop deletes the file).
    pub(crate) fn shutdown(&self) {
        let spare = {
            let mut st = self.lock();
            st.shutdown = true;
            self.cv.notify_all();
            while st.busy {
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            st.spare.take()
        };
        drop(spare);
    }

    /// The background thread's loop.
    pub(crate) fn run(self: Arc<Self>) {
        loop {
            let n = {
                let mut st = self.lock();
                while !(st.shutdown || st.wanted && st.spare.is_none()) {
                    st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                if st.shutdown {
                    return;
                }
                st.wanted = false;
                st.busy = true;
                st.take_spare_number()
            };
            let created = self.create_checked(n);
            let mut st = self.lock();
            st.busy = false;
            match created {
                Ok(Ok(spare)) if !st.shutdown => {
                    st.spare = Some(spare);
                    // A request made while this one was being prepared is served.
                    st.wanted = false;
                }
                Ok(Ok(_unused)) => {}
                // Rotation will meet the same condition and apply the policy.
                Ok(Err(no_room)) => {
                    tracing::debug!(?no_room, "no room to prepare the next segment ahead")
                }
                Err(e) => {
                    tracing::warn!(error = %super::error::chain(&e), "cannot prepare the next segment ahead")
                }
            }
            self.cv.notify_all();
        }
    }
}
