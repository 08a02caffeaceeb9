//! The power-loss model test: a scripted workload of one stream's writer and a
//! loader, run once per sync point with the power cut there (`fs::sim`), then
//! the durable image reopened and checked.
//!
//! The workload: async and durable appends, rotations, the disk budget filling
//! so that rotation seals the last segment with no successor, a loader that
//! reads up to the durable watermark with the real [`Cursor`] and retires the
//! segments it hands back (remove + directory fsync, as the loader's
//! `retire_segment` does), a clean close and reopen. The loader's database is a
//! map in memory: its commits survive the power loss, as a remote PostgreSQL's
//! would. After each cut:
//!
//! - the writer reopens, and recovery reports no damage;
//! - every append acknowledged as durable before the cut is in the database or
//!   in the recovered WAL, at its LSN;
//! - no LSN at or below the loader's checkpoint holds anything but what was
//!   loaded under it, and the next append gets an LSN above the checkpoint;
//! - a loader resuming from the checkpoint loads every event after it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use uuid::Uuid;

use super::fs::sim::{Landing, SimFs};
use super::fs::FileSystem;
use super::reader::{Follow, ReadItem, StreamReader};
use super::{FullDiskPolicy, Lsn, WalConfig, WalError, WalWriter, MIN_SEGMENT_SIZE};
use crate::event::AuditEvent;
use crate::loader::cursor::{BatchLimits, Cursor};

const STREAM: &str = "pl";

fn config(wal_dir: &Path) -> WalConfig {
    WalConfig::new(wal_dir, STREAM)
        .with_segment_size(MIN_SEGMENT_SIZE)
        .with_disk_budget(3 * MIN_SEGMENT_SIZE)
        .with_full_disk_policy(FullDiskPolicy::Fail)
        // Rounds only when the workload waits: one deterministic order of calls.
        .with_fsync_interval(Duration::from_secs(3600))
        .with_prepare_next_segment(false)
}

/// About 520 bytes a frame: some 120 records a segment.
fn event(n: u64) -> AuditEvent {
    AuditEvent::new("powerloss.step")
        .actor("user", n.to_string())
        .reason("r".repeat(400))
}

/// Which segments the loader retires after a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The loader's rule (`Cursor::take_finished`).
    Current,
    /// Every segment whose records are all committed, the newest included: a
    /// loader of an older release.
    Old,
}

/// The loader and its database (the checkpoint and the rows under it).
struct Loader {
    sim: Arc<SimFs>,
    stream_dir: PathBuf,
    rule: Rule,
    cursor: Option<Cursor>,
    rows: BTreeMap<Lsn, Uuid>,
    checkpoint: Lsn,
}

impl Loader {
    /// Loads everything durable, committing and retiring as the loader does;
    /// stops (without committing) once the power is off.
    fn load(&mut self) {
        let limits = BatchLimits {
            max_rows: 100,
            max_bytes: 1 << 20,
            max_time: Duration::from_secs(10),
        };
        if self.cursor.is_none() {
            let from = crate::loader::checkpoint::Committed {
                lsn: self.checkpoint,
                ..Default::default()
            };
            self.cursor =
                Some(Cursor::open(&self.stream_dir, STREAM, from).expect("cursor"));
        }
        loop {
            if self.sim.power_lost() {
                return;
            }
            let Some(cursor) = self.cursor.as_mut() else {
                return;
            };
            let gathered = cursor.next_batch(&limits).expect("gather a batch");
            assert!(
                gathered.skipped.is_empty(),
                "the loader met damage: {:?}",
                gathered.skipped
            );
            let batch = gathered.batch;
            if batch.end_lsn <= self.checkpoint {
                return;
            }
            if self.sim.power_lost() {
                return;
            }
            for row in batch.rows {
                assert!(
                    row.lsn > self.checkpoint,
                    "a row at or below the checkpoint"
                );
                self.rows.insert(row.lsn, row.event.event_id);
            }
            self.checkpoint = batch.end_lsn;
            cursor.committed_through(batch.end_lsn);
            let finished = match self.rule {
                Rule::Current => cursor.take_finished(),
                Rule::Old => cursor.take_finished_old_rule(),
            };
            for path in finished {
                self.sim.remove_file(&path).expect("retire a segment");
                let dir = File::open(&self.stream_dir).expect("open the stream dir");
                self.sim
                    .sync_dir(&dir, &self.stream_dir)
                    .expect("fsync the stream dir");
            }
        }
    }
}

fn lock(loader: &Mutex<Loader>) -> MutexGuard<'_, Loader> {
    loader.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One run of the workload on a fresh stream.
struct Run {
    _tmp: tempfile::TempDir,
    wal_dir: PathBuf,
    sim: Arc<SimFs>,
    writer: Option<WalWriter>,
    loader: Arc<Mutex<Loader>>,
    /// Appends acknowledged as durable (or covered by a completed flush) while
    /// the power was on.
    durable: BTreeMap<Lsn, Uuid>,
    /// Every acknowledged append, async ones included, not yet known durable.
    written: BTreeMap<Lsn, Uuid>,
    next_event: u64,
    /// The sync points of the flush after the budget filled.
    seal_flush_points: std::ops::Range<u64>,
}

impl Run {
    fn new(rule: Rule) -> Run {
        let tmp = tempfile::tempdir().expect("tempdir");
        let wal_dir = tmp.path().join("wal");
        std::fs::create_dir(&wal_dir).expect("wal dir");
        let sim = Arc::new(SimFs::new(&wal_dir).expect("model"));
        let loader = Loader {
            sim: sim.clone(),
            stream_dir: wal_dir.join(STREAM),
            rule,
            cursor: None,
            rows: BTreeMap::new(),
            checkpoint: 0,
        };
        Run {
            _tmp: tmp,
            wal_dir,
            sim,
            writer: None,
            loader: Arc::new(Mutex::new(loader)),
            durable: BTreeMap::new(),
            written: BTreeMap::new(),
            next_event: 0,
            seal_flush_points: 0..0,
        }
    }

    fn on(&self) -> bool {
        !self.sim.power_lost()
    }

    fn open(&mut self) {
        if self.on() {
            let fs: Arc<dyn FileSystem> = self.sim.clone();
            self.writer = Some(WalWriter::open_on(fs, config(&self.wal_dir)).expect("open"));
        }
    }

    fn close(&mut self) {
        if let Some(w) = self.writer.take() {
            lock(&self.loader).cursor = None;
            let closed = w.close();
            if self.on() {
                closed.expect("close");
                self.promote(Lsn::MAX);
            }
        }
    }

    fn promote(&mut self, through: Lsn) {
        let later = self.written.split_off(&through.saturating_add(1));
        self.durable.append(&mut self.written);
        self.written = later;
    }

    /// One append; `Err` only for a full budget.
    fn append(&mut self, durable: bool) -> Result<(), WalError> {
        let Some(w) = self.writer.as_ref().filter(|_| self.on()) else {
            return Ok(());
        };
        self.next_event += 1;
        let e = event(self.next_event);
        let id = e.event_id;
        let lsn = if durable {
            w.append_durable(&e)
        } else {
            w.append(&e)
        };
        let lsn = match lsn {
            Ok(lsn) => lsn,
            Err(e @ WalError::DiskBudgetExceeded { .. }) => return Err(e),
            Err(e) if !self.on() => panic!("append failed after the power loss: {e}"),
            Err(e) => panic!("append: {e}"),
        };
        if durable && self.on() {
            self.durable.insert(lsn, id);
        } else {
            self.written.insert(lsn, id);
        }
        Ok(())
    }

    fn appends(&mut self, n: usize) {
        for _ in 0..n {
            self.append(false).expect("room for the append");
        }
    }

    /// A step of the script: `n` appends, one durable append (a full budget's
    /// error ignored) and a load.
    fn appends_then_load(&mut self, n: usize) {
        self.appends(n);
        let _ = self.append(true);
        self.load();
    }

    /// Waits until everything written is durable.
    fn flush(&mut self) {
        let Some(w) = self.writer.as_ref().filter(|_| self.on()) else {
            return;
        };
        let lsn = w.stats().written_lsn;
        w.wait_durable(lsn).expect("flush");
        if self.on() {
            self.promote(lsn);
        }
    }

    fn load(&mut self) {
        if self.writer.is_some() && self.on() {
            lock(&self.loader).load();
        }
    }

    fn points(&self) -> u64 {
        self.sim.points().len() as u64
    }

    /// The scripted workload; every step does nothing once the power is off.
    fn script(&mut self) {
        self.open();
        self.appends_then_load(60);
        // Into the second segment.
        self.appends_then_load(100);
        // Until the budget is full: the last rotation seals with no successor.
        let mut full = false;
        for i in 0..1000 {
            if !self.on() {
                return;
            }
            if self.append(i % 50 == 49).is_err() {
                full = true;
                break;
            }
        }
        assert!(full || !self.on(), "the budget never filled");
        let before = self.points();
        self.flush();
        self.seal_flush_points = before + 1..self.points() + 1;
        self.load();
        // The loader freed space: rotation finds room for a successor again
        // (once the writer's cached "no room" answer has expired).
        std::thread::sleep(Duration::from_millis(20));
        self.appends_then_load(30);
        // A clean restart.
        self.close();
        self.open();
        self.appends_then_load(30);
        // A durable record in a new segment, then a rotation past it that nothing
        // syncs before the loader commits that record and retires the segment
        // before it: the loader's directory fsync names a segment never synced.
        self.appends(130);
        let _ = self.append(true);
        self.appends(130);
        self.load();
        self.appends(10);
    }

    /// Cuts the power (if the script has not), reopens the durable image and
    /// checks it. `what` names the run in failure messages.
    fn check_after_power_loss(self, landing: Landing, what: &str) {
        let (image, facts) = self.power_off(landing);
        check_image(&image, facts, what);
    }

    /// Cuts the power (if the script has not), stops everything and writes the
    /// durable image out; returns it with what the checks need.
    fn power_off(mut self, landing: Landing) -> (PathBuf, Facts) {
        self.sim.cut_now().expect("cut");
        lock(&self.loader).cursor = None;
        drop(self.writer.take());
        let image = self.wal_dir.with_file_name(format!("image-{landing:?}"));
        self.sim.materialize(&image, landing).expect("materialize");
        let l = lock(&self.loader);
        let facts = Facts {
            rows: l.rows.clone(),
            checkpoint: l.checkpoint,
            durable: self.durable.clone(),
            _tmp: None,
        };
        drop(l);
        let facts = Facts {
            _tmp: Some(self._tmp),
            ..facts
        };
        (image, facts)
    }
}

/// What survives a power loss outside the machine, and what was promised.
struct Facts {
    rows: BTreeMap<Lsn, Uuid>,
    checkpoint: Lsn,
    durable: BTreeMap<Lsn, Uuid>,
    /// Keeps the run's directory alive.
    _tmp: Option<tempfile::TempDir>,
}

/// Reopens the stream in `image` and checks it (see the module docs).
fn check_image(image: &Path, facts: Facts, what: &str) {
    let Facts {
        rows,
        checkpoint,
        durable,
        _tmp,
    } = facts;
    let sim = Arc::new(SimFs::new(image).expect("model of the image"));
    let fs: Arc<dyn FileSystem> = sim.clone();
    let w = WalWriter::open_on(fs, config(image))
        .unwrap_or_else(|e| panic!("{what}: reopen after the power loss: {e}"));
    let report = w.recovery().clone();
    assert!(
        report.skipped_ranges.is_empty() && report.zeroed_past_tail.is_none(),
        "{what}: recovery found corruption: {report:?}"
    );

    let mut on_disk = BTreeMap::new();
    let mut reader = StreamReader::open(&image.join(STREAM), 1, Follow::AtRest);
    while let Some(item) = reader.next_item(None).expect("read the recovered stream") {
        match item {
            ReadItem::Event { lsn, event, .. } => {
                on_disk.insert(lsn, event.event.event_id);
            }
            ReadItem::SegmentConsumed { .. } => {}
            ReadItem::Gap { found, .. } if found <= checkpoint + 1 => {}
            damage => panic!("{what}: damage in the recovered stream: {damage:?}"),
        }
    }
    for (lsn, id) in &durable {
        assert!(
            rows.get(lsn) == Some(id) || on_disk.get(lsn) == Some(id),
            "{what}: durable record LSN {lsn} lost (checkpoint {checkpoint})"
        );
    }
    for (lsn, id) in on_disk.range(..=checkpoint) {
        assert_eq!(
                rows.get(lsn),
                Some(id),
                "{what}: LSN {lsn} at or below the checkpoint {checkpoint} holds an event that was not loaded there"
            );
    }
    let mut loader = Loader {
        sim,
        stream_dir: image.join(STREAM),
        rule: Rule::Current,
        cursor: None,
        rows,
        checkpoint,
    };
    // Load first: the budget may be full, and loading is what frees it.
    loader.load();
    for (lsn, id) in on_disk.range(checkpoint + 1..) {
        assert_eq!(
            loader.rows.get(lsn),
            Some(id),
            "{what}: LSN {lsn} not loaded"
        );
    }
    std::thread::sleep(Duration::from_millis(20));
    let fresh = event(u64::MAX);
    let lsn = w
        .append_durable(&fresh)
        .unwrap_or_else(|e| panic!("{what}: append after reopen: {e}"));
    assert!(
            lsn > checkpoint,
            "{what}: LSN {lsn} handed out again at or below the loader's checkpoint {checkpoint}: the loader skips it"
        );
    loader.load();
    assert_eq!(
        loader.rows.get(&lsn),
        Some(&fresh.event_id),
        "{what}: the event appended after reopen was not loaded"
    );
    drop(loader);
    w.close().expect("close after the check");
}

/// Runs the script once without a cut and returns its number of sync points.
fn count_points(rule: Rule) -> u64 {
    let mut run = Run::new(rule);
    run.script();
    assert!(!run.sim.power_lost());
    let n = run.points();
    run.check_after_power_loss(Landing::Nothing, "no cut");
    n
}

fn every_cut(rule: Rule, landings: &[Landing]) {
    let n = count_points(rule);
    assert!(n > 20, "only {n} sync points");
    for k in 1..=n + 1 {
        for &landing in landings {
            let mut run = Run::new(rule);
            run.sim.cut_at(k);
            run.script();
            let point = run
                .sim
                .points()
                .get(k as usize - 1)
                .map(|p| format!("{} {} {}", p.number, p.op, p.path.display()))
                .unwrap_or_else(|| "the end".into());
            run.check_after_power_loss(
                landing,
                &format!("{rule:?} loader, power lost at sync point {point}, {landing:?} landed"),
            );
        }
    }
}

#[test]
fn power_loss_at_any_sync_point_loses_no_durable_record_and_reuses_no_loaded_lsn() {
    every_cut(
        Rule::Current,
        &[Landing::Nothing, Landing::Everything, Landing::SidecarOnly],
    );
}

#[test]
fn a_loader_that_retires_the_newest_sealed_segment_still_leaves_the_floor_durable() {
    every_cut(Rule::Old, &[Landing::Nothing]);
}

#[test]
fn a_loader_acting_between_the_watermark_write_and_its_fsync_cannot_lose_the_floor() {
    // Where the flush after the budget filled fsyncs the watermark.
    let mut dry = Run::new(Rule::Current);
    dry.script();
    let points = dry.sim.points();
    let sidecar_sync = points
        .iter()
        .filter(|p| dry.seal_flush_points.contains(&p.number))
        .find(|p| p.op == "sync_data" && p.path.ends_with(super::format::DURABLE_LSN_FILE))
        .map(|p| p.number)
        .expect("the seal's flush fsyncs the watermark");
    drop(dry);

    // The loader runs when the new watermark is visible but not yet durable, and
    // the power goes right after it.
    let mut run = Run::new(Rule::Current);
    let loader = run.loader.clone();
    let loaded_the_seal = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = loaded_the_seal.clone();
    run.sim.before_point_then_cut(sidecar_sync, move || {
        let mut l = lock(&loader);
        let before = l.checkpoint;
        l.load();
        flag.store(l.checkpoint > before, std::sync::atomic::Ordering::SeqCst);
    });
    run.script();
    assert!(run.sim.power_lost());
    assert!(
        loaded_the_seal.load(std::sync::atomic::Ordering::SeqCst),
        "the loader committed in the window"
    );
    run.check_after_power_loss(Landing::Nothing, "loader inside the watermark's fsync");
}

#[test]
fn power_loss_during_the_recovery_from_a_power_loss_is_recovered_from_too() {
    let n = count_points(Rule::Current);
    for k in 1..=n + 1 {
        // Recovery's own sync points, each cut in turn, until one open and
        // close passes them all.
        for j in 1.. {
            let mut run = Run::new(Rule::Current);
            run.sim.cut_at(k);
            run.script();
            let (image, facts) = run.power_off(Landing::Nothing);
            let sim = Arc::new(SimFs::new(&image).expect("model of the image"));
            sim.cut_at(j);
            let fs: Arc<dyn FileSystem> = sim.clone();
            let w = WalWriter::open_on(fs, config(&image))
                .unwrap_or_else(|e| panic!("cut {k}: reopen: {e}"));
            drop(w);
            if !sim.power_lost() {
                break;
            }
            let point = sim
                .points()
                .get(j as usize - 1)
                .map(|p| format!("{} {}", p.op, p.path.display()))
                .unwrap_or_default();
            let again = image.with_file_name("image-again");
            sim.materialize(&again, Landing::Nothing)
                .expect("materialize");
            check_image(
                &again,
                facts,
                &format!(
                    "power lost at sync point {k}, then at recovery's sync point {j} ({point})"
                ),
            );
        }
    }
}
