//! `auditwal bench wal [--json] [--dir D]`: the WAL writer against plain
//! write() + fdatasync doing the same work.
//!
//! Every case writes the same records: realistic ~300-byte audit events
//! (encoded payload + frame, built by `wal::payload` and `wal::format`), cycled
//! from a pool built before timing starts. Baselines and ours run in the same
//! process, interleaved over several rounds; each figure is the median over
//! the rounds.
//!
//! - `async-1t` / `raw-write-1t`: one thread, per-event latency (p50, p99,
//!   p99.9, max) and throughput. Ours: `WalWriter::append` with the default
//!   config (64 MiB segments, flusher fdatasync every 100 ms; rotations fall in
//!   the measured run). Baseline: encode the same frame, `write()` it to a file
//!   opened O_APPEND, a background thread fdatasyncs every 100 ms.
//! - `async-1t-signed` / `async-1t`: the cost of the hash chain
//!   (docs/integrity.md): the same appends with a chain key, so the flusher
//!   hashes every record after each round and appends signed checkpoints.
//! - `async-2t` / `raw-write-2t`: the same with two appending threads.
//! - `durable-64` / `raw-fdatasync-64`: 64 threads, each appending and waiting
//!   for its record to be durable. Ours: `append_durable` (flusher group
//!   commit). Baseline: write(), then a leader-follower group commit: the first
//!   waiter runs fdatasync for every write that returned before it started, the
//!   others wait for it.
//! - `rotation-stall` / `rotation-stall-inline`: how long a tokio worker
//!   thread is held while appends rotate segments. One current-thread runtime
//!   (a single worker) runs an appender task (bursts of 64 appends, then a
//!   yield) and a ticker task that yields in a loop and records the time
//!   between two of its turns: the longest (`worker_stall_max_us`), the 99.9th
//!   percentile (`worker_stall_p999_us`) and how many exceeded 1 ms
//!   (`worker_stalls_over_1ms`). Segments are 4 MiB (`STALL_SEGMENT`), so a
//!   run rotates ~75 times per million events; the preparer is on. Ours:
//!   `WalWriter::append_async` (what `AuditLog` uses: a rotation runs on the
//!   blocking pool). Baseline: the blocking `WalWriter::append` called from
//!   the task, which is what `AuditLog` did before (rotation, and waiting for
//!   or creating the spare, on the worker). A burst of 64 appends is the
//!   floor of the figures (~0.1 ms); the scheduler's preemptions on a busy
//!   machine show in the maximum of both.
//! - `rotation-stall-unprepared` / `...-inline`: the same with the preparer
//!   off, so that every rotation creates its segment (the case of a spare not
//!   ready in time, e.g. under heavy writeback).
//!
//! Throughput excludes the final close/fsync on both sides. The default scratch
//! directory is a temp dir, or `./target` when the temp dir is on tmpfs (fsync
//! figures there mean nothing); use `--dir` to pick the file system to measure.
//!
//! Knobs (environment): AUDITWAL_BENCH_EVENTS (events per async case, default
//! 1,000,000), AUDITWAL_BENCH_DURABLE_EVENTS (per durable case, default
//! 128,000), AUDITWAL_BENCH_ROUNDS (default 3).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::wal::{format, payload, RecordKind, WalConfig, WalWriter};
use auditwal::{AuditEvent, Outcome};

use super::bench::{env_u64, percentile, report, BenchResult};
use super::{CmdResult, Failure};

const BENCH: &str = "wal";
/// Distinct events cycled through by every case.
const POOL: usize = 1024;
/// The flusher's and the baselines' fsync cadence.
const FSYNC_INTERVAL: Duration = Duration::from_millis(100);
const DURABLE_THREADS: usize = 64;
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// Segment size of the rotation-stall cases: many rotations per run.
const STALL_SEGMENT: u64 = 4 << 20;
/// Appends between two yields of the rotation-stall appender task.
const STALL_BURST: u64 = 64;

/// What a rotation-stall run measured.
#[derive(Clone, Copy)]
struct Stall {
    max: Duration,
    p999: Duration,
    over_1ms: u64,
    rotations: u64,
    slow_rotations: u64,
}

/// One timed run of one case.
struct Run {
    events: u64,
    secs: f64,
    /// Per-event latencies (ns), sorted.
    latencies_ns: Vec<u64>,
    /// fsyncs done during the run, and the time they took (durable cases).
    fsyncs: Option<(u64, Duration)>,
    /// The rotation-stall cases.
    stall: Option<Stall>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Async(usize),
    /// As `Async`, with the hash chain signed (AUDITWAL_CHAIN_KEY): the
    /// flusher hashes every record and appends checkpoints.
    AsyncSigned(usize),
    RawWrite(usize),
    Durable,
    RawFdatasync,
    /// Appends from a task: `append_async` (`in_task`) or the blocking
    /// append; with the preparer on or off.
    Stall {
        in_task: bool,
        prepared: bool,
    },
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Async(t) => format!("async-{t}t"),
            Case::AsyncSigned(t) => format!("async-{t}t-signed"),
            Case::RawWrite(t) => format!("raw-write-{t}t"),
            Case::Durable => format!("durable-{DURABLE_THREADS}"),
            Case::RawFdatasync => format!("raw-fdatasync-{DURABLE_THREADS}"),
            Case::Stall { in_task, prepared } => format!(
                "rotation-stall{}{}",
                if prepared { "" } else { "-unprepared" },
                if in_task { "" } else { "-inline" }
            ),
        }
    }
}

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let async_events = env_u64("AUDITWAL_BENCH_EVENTS", 1_000_000)?.max(1000);
    let durable_events =
        env_u64("AUDITWAL_BENCH_DURABLE_EVENTS", 128_000)?.max(DURABLE_THREADS as u64);
    let rounds = env_u64("AUDITWAL_BENCH_ROUNDS", 3)?.max(1) as usize;
    let base = scratch_base(dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("auditwal-bench-wal-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
    let events = Arc::new(sample_events());
    let record_bytes = mean_frame_len(&events)?;
    eprintln!(
        "bench wal: scratch dir {}, {record_bytes:.0}-byte records on average, {rounds} round(s)",
        scratch.path().display()
    );

    // Pairs of (ours, baseline); rounds alternate which of a pair goes first.
    let pairs = [
        (Case::Async(1), Case::RawWrite(1), async_events),
        (Case::AsyncSigned(1), Case::Async(1), async_events),
        (Case::Async(2), Case::RawWrite(2), async_events),
        (Case::Durable, Case::RawFdatasync, durable_events),
        (
            Case::Stall {
                in_task: true,
                prepared: true,
            },
            Case::Stall {
                in_task: false,
                prepared: true,
            },
            async_events,
        ),
        (
            Case::Stall {
                in_task: true,
                prepared: false,
            },
            Case::Stall {
                in_task: false,
                prepared: false,
            },
            async_events,
        ),
    ];
    let mut runs: Vec<(Case, Vec<Run>)> = Vec::new();
    for round in 0..rounds {
        for &(ours, baseline, n) in &pairs {
            let order = if round % 2 == 0 {
                [baseline, ours]
            } else {
                [ours, baseline]
            };
            for case in order {
                let dir = scratch.path().join(format!("{}-{round}", case.name()));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let run = run_case(case, &dir, &events, n)
                    .with_context(|| format!("bench case {}", case.name()))?;
                // Free the disk before the next case.
                let _ = std::fs::remove_dir_all(&dir);
                match runs.iter_mut().find(|(c, _)| *c == case) {
                    Some((_, v)) => v.push(run),
                    None => runs.push((case, vec![run])),
                }
            }
        }
    }

    let summary = |case: Case| -> BenchResult {
        let rs = runs
            .iter()
            .find(|(c, _)| *c == case)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[]);
        summarize(case, rs, record_bytes)
    };
    let mut results = Vec::new();
    for &(ours, baseline, _) in &pairs {
        let b = summary(baseline);
        let o = summary(ours).against(&b);
        // async-1t is both a case and the signed case's baseline: once.
        if !results.iter().any(|r: &BenchResult| r.case == b.case) {
            results.push(b);
        }
        results.push(o);
    }
    report(&results, json);
    Ok(ExitCode::SUCCESS)
}

/// Median over rounds of throughput and of each percentile.
fn summarize(case: Case, runs: &[Run], record_bytes: f64) -> BenchResult {
    let med = |mut v: Vec<f64>| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let events = runs.first().map_or(0, |r| r.events);
    let rate = med(runs.iter().map(|r| r.events as f64 / r.secs).collect());
    let secs = if rate > 0.0 {
        events as f64 / rate
    } else {
        0.0
    };
    let mut result = BenchResult::new(BENCH, case.name(), events, secs);
    let pct = |p: f64| {
        med(runs
            .iter()
            .map(|r| percentile(&r.latencies_ns, p) as f64 / 1000.0)
            .collect())
    };
    if runs.iter().all(|r| !r.latencies_ns.is_empty()) && !runs.is_empty() {
        result.p50_us = Some(pct(50.0));
        result.p99_us = Some(pct(99.0));
        result.p999_us = Some(pct(99.9));
        let max = med(runs
            .iter()
            .map(|r| r.latencies_ns.last().copied().unwrap_or(0) as f64 / 1000.0)
            .collect());
        result
            .extra
            .insert("max_us".into(), serde_json::json!(round1(max)));
    }
    let fsyncs: Vec<(u64, u64, Duration)> = runs
        .iter()
        .filter_map(|r| r.fsyncs.map(|(n, t)| (r.events, n.max(1), t)))
        .collect();
    if !fsyncs.is_empty() {
        let per = med(fsyncs
            .iter()
            .map(|&(e, n, _)| e as f64 / n as f64)
            .collect());
        let mean_us = med(fsyncs
            .iter()
            .map(|&(_, n, t)| t.as_secs_f64() * 1e6 / n as f64)
            .collect());
        result
            .extra
            .insert("events_per_fsync".into(), serde_json::json!(round1(per)));
        // The device's sync latency bounds a durable case: at most
        // DURABLE_THREADS events per fsync.
        result
            .extra
            .insert("fsync_mean_us".into(), serde_json::json!(round1(mean_us)));
    }
    let stalls: Vec<Stall> = runs.iter().filter_map(|r| r.stall).collect();
    if !stalls.is_empty() {
        let us = |f: fn(&Stall) -> Duration| {
            round1(med(stalls
                .iter()
                .map(|s| f(s).as_secs_f64() * 1e6)
                .collect()))
        };
        let count = |f: fn(&Stall) -> u64| med(stalls.iter().map(|s| f(s) as f64).collect());
        let figures = [
            ("worker_stall_max_us", us(|s| s.max)),
            ("worker_stall_p999_us", us(|s| s.p999)),
            ("worker_stalls_over_1ms", count(|s| s.over_1ms)),
            ("rotations", count(|s| s.rotations)),
            ("slow_rotations", count(|s| s.slow_rotations)),
        ];
        for (name, value) in figures {
            result.extra.insert(name.into(), serde_json::json!(value));
        }
        result
            .extra
            .insert("segment_bytes".into(), serde_json::json!(STALL_SEGMENT));
    }
    result.extra.insert(
        "record_bytes".into(),
        serde_json::json!(record_bytes.round()),
    );
    result
        .extra
        .insert("rounds".into(), serde_json::json!(runs.len()));
    result
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn run_case(case: Case, dir: &Path, events: &Arc<Vec<AuditEvent>>, n: u64) -> anyhow::Result<Run> {
    match case {
        Case::Async(threads) => wal_async(dir, events, threads, n, None),
        Case::AsyncSigned(threads) => {
            let keys = dir.with_extension("keys");
            let (key, _) = auditwal::chain::keys::write_pair(&keys, "bench")?;
            let run = wal_async(dir, events, threads, n, Some(key));
            let _ = std::fs::remove_dir_all(&keys);
            run
        }
        Case::RawWrite(threads) => raw_write(dir, events, threads, n),
        Case::Durable => wal_durable(dir, events, n),
        Case::RawFdatasync => raw_fdatasync(dir, events, n),
        Case::Stall { in_task, prepared } => wal_stall(dir, events, n, in_task, prepared),
    }
}

/// Where scratch files go: `--dir`, else the temp dir unless it is tmpfs, else
/// `./target` (or the current directory).
fn scratch_base(dir: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(d) = dir {
        std::fs::create_dir_all(&d)
            .with_context(|| format!("creating --dir {}", d.display()))
            .map_err(Failure::usage)?;
        warn_if_tmpfs(&d);
        return Ok(d);
    }
    let tmp = std::env::temp_dir();
    if !is_tmpfs(&tmp) {
        return Ok(tmp);
    }
    let target = PathBuf::from("target");
    let base = if target.is_dir() {
        target
    } else {
        PathBuf::from(".")
    };
    eprintln!(
        "bench wal: {} is tmpfs (fsync is free there); using {} instead",
        tmp.display(),
        base.display()
    );
    Ok(base)
}

fn is_tmpfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
}

fn warn_if_tmpfs(path: &Path) {
    if is_tmpfs(path) {
        eprintln!(
            "bench wal: warning: {} is tmpfs, so fsync costs nothing and the figures say little",
            path.display()
        );
    }
}

/// Realistic audit events whose records are about 300 bytes.
fn sample_events() -> Vec<AuditEvent> {
    const AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36";
    (0..POOL as u64)
        .map(|i| {
            let mut e = AuditEvent::new(if i % 3 == 0 {
                "url.created"
            } else {
                "url.visited"
            })
            .actor("user", format!("user-{:06}", i * 7919 % 1_000_000))
            .target("url", format!("u-{:08x}", i * 2_654_435_761 % (1 << 32)))
            .tenant(format!("tenant-{}", i % 17))
            .outcome(if i % 11 == 0 {
                Outcome::Denied
            } else {
                Outcome::Success
            })
            .ip(std::net::IpAddr::from([
                10,
                0,
                (i % 256) as u8,
                (i / 256) as u8,
            ]))
            .user_agent(AGENT)
            .request_id(uuid::Uuid::now_v7().to_string());
            e.target_name = Some(format!("campaign link {i}"));
            e.metadata = auditwal::JsonText::from_value(
                "metadata",
                &serde_json::json!({"ref": "newsletter", "slot": i % 5}),
            )
            .ok();
            e
        })
        .collect()
}

/// Encodes event `i` of the pool as a frame with `lsn`, into `frame`.
fn encode_record(
    event: &AuditEvent,
    lsn: u64,
    payload_buf: &mut Vec<u8>,
    frame: &mut Vec<u8>,
) -> anyhow::Result<()> {
    payload_buf.clear();
    payload::encode_event(event, 1.0, payload_buf)?;
    frame.resize(format::frame_len(payload_buf.len()), 0);
    format::encode_frame(frame, lsn, RecordKind::Event, payload_buf)?;
    Ok(())
}

fn mean_frame_len(events: &[AuditEvent]) -> anyhow::Result<f64> {
    let (mut p, mut f, mut total) = (Vec::new(), Vec::new(), 0usize);
    for e in events {
        encode_record(e, 1, &mut p, &mut f)?;
        total += f.len();
    }
    Ok(total as f64 / events.len() as f64)
}

fn wal_config(dir: &Path) -> WalConfig {
    WalConfig::new(dir, "bench").with_fsync_interval(FSYNC_INTERVAL)
}

/// `threads` threads appending `n` events in all with `WalWriter::append`.
fn wal_async(
    dir: &Path,
    events: &Arc<Vec<AuditEvent>>,
    threads: usize,
    n: u64,
    chain_key: Option<PathBuf>,
) -> anyhow::Result<Run> {
    let mut config = wal_config(dir);
    config.chain_key = chain_key;
    let wal = Arc::new(WalWriter::open(config)?);
    let per = n / threads as u64;
    let run = timed_calls(events, threads, per, || {
        let wal = wal.clone();
        move |e: &AuditEvent| {
            wal.append(e)?;
            Ok(())
        }
    })?;
    wal.close()?;
    Ok(Run {
        events: per * threads as u64,
        fsyncs: None,
        ..run
    })
}

/// `threads` threads each timing `per` calls of its own `op` (made by
/// `make_op`), one latency a call; thread `t` takes events `t`, `t + threads`,
/// ... of `events`.
fn timed_calls<M, O>(
    events: &Arc<Vec<AuditEvent>>,
    threads: usize,
    per: u64,
    make_op: M,
) -> anyhow::Result<Run>
where
    M: Fn() -> O,
    O: FnMut(&AuditEvent) -> anyhow::Result<()> + Send + 'static,
{
    timed_threads(threads, |t| {
        let events = events.clone();
        let mut op = make_op();
        move || -> anyhow::Result<Vec<u64>> {
            let mut lat = Vec::with_capacity(per as usize);
            for i in 0..per {
                let e = &events[((i as usize) * threads + t) % events.len()];
                let t0 = Instant::now();
                op(e)?;
                lat.push(t0.elapsed().as_nanos() as u64);
            }
            Ok(lat)
        }
    })
}

/// The baseline of `wal_async`: the same frames written with write() to an
/// O_APPEND file, fdatasync every FSYNC_INTERVAL from a background thread.
fn raw_write(
    dir: &Path,
    events: &Arc<Vec<AuditEvent>>,
    threads: usize,
    n: u64,
) -> anyhow::Result<Run> {
    let file = Arc::new(open_raw(dir)?);
    let (stop, syncer) = periodic_fdatasync(file.clone());
    let per = n / threads as u64;
    let lsn = Arc::new(AtomicU64::new(1));
    let run = timed_calls(events, threads, per, || {
        frame_writes(file.clone(), lsn.clone(), |_| Ok(()))
    });
    drop(stop);
    let _ = syncer.join();
    let run = run?;
    Ok(Run {
        events: per * threads as u64,
        fsyncs: None,
        ..run
    })
}

/// 64 threads calling `append_durable` for `n` events in all.
fn wal_durable(dir: &Path, events: &Arc<Vec<AuditEvent>>, n: u64) -> anyhow::Result<Run> {
    let wal = Arc::new(WalWriter::open(wal_config(dir))?);
    let per = n / DURABLE_THREADS as u64;
    let before = wal.stats();
    let run = timed_calls(events, DURABLE_THREADS, per, || {
        let wal = wal.clone();
        move |e: &AuditEvent| {
            wal.append_durable(e)?;
            Ok(())
        }
    })?;
    let after = wal.stats();
    wal.close()?;
    Ok(Run {
        events: per * DURABLE_THREADS as u64,
        fsyncs: Some((
            after.fsyncs - before.fsyncs,
            after.fsync_time.saturating_sub(before.fsync_time),
        )),
        ..run
    })
}

/// Leader-follower group commit over write() + fdatasync.
struct GroupCommit {
    /// Writes that have returned (tickets handed out).
    written: AtomicU64,
    state: Mutex<(u64, bool)>, // (synced up to ticket, a sync is running)
    cv: Condvar,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
}

/// The baseline of `wal_durable`: each thread writes its frame, then waits for
/// an fdatasync that started after its write returned; the first waiter to find
/// no sync running runs one for everyone written so far.
fn raw_fdatasync(dir: &Path, events: &Arc<Vec<AuditEvent>>, n: u64) -> anyhow::Result<Run> {
    let file = Arc::new(open_raw(dir)?);
    let gc = Arc::new(GroupCommit {
        written: AtomicU64::new(0),
        state: Mutex::new((0, false)),
        cv: Condvar::new(),
        fsyncs: AtomicU64::new(0),
        fsync_nanos: AtomicU64::new(0),
    });
    let per = n / DURABLE_THREADS as u64;
    let lsn = Arc::new(AtomicU64::new(1));
    let run = timed_calls(events, DURABLE_THREADS, per, || {
        let gc = gc.clone();
        frame_writes(file.clone(), lsn.clone(), move |file: &File| {
            let ticket = gc.written.fetch_add(1, Ordering::AcqRel) + 1;
            let mut st = gc.state.lock().map_err(|_| anyhow!("poisoned"))?;
            while st.0 < ticket {
                if st.1 {
                    st = gc.cv.wait(st).map_err(|_| anyhow!("poisoned"))?;
                    continue;
                }
                st.1 = true;
                let target = gc.written.load(Ordering::Acquire);
                drop(st);
                let sync_start = Instant::now();
                let synced = rustix::fs::fdatasync(file);
                gc.fsync_nanos
                    .fetch_add(sync_start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                gc.fsyncs.fetch_add(1, Ordering::Relaxed);
                st = gc.state.lock().map_err(|_| anyhow!("poisoned"))?;
                st.1 = false;
                synced?;
                st.0 = st.0.max(target);
                gc.cv.notify_all();
            }
            drop(st);
            Ok(())
        })
    })?;
    Ok(Run {
        events: per * DURABLE_THREADS as u64,
        fsyncs: Some((
            gc.fsyncs.load(Ordering::Relaxed),
            Duration::from_nanos(gc.fsync_nanos.load(Ordering::Relaxed)),
        )),
        ..run
    })
}

/// An op for `timed_calls`: writes the event to `file` as one frame, with the
/// next LSN of `lsn`, then calls `then(file)`.
fn frame_writes<T>(
    file: Arc<File>,
    lsn: Arc<AtomicU64>,
    then: T,
) -> impl FnMut(&AuditEvent) -> anyhow::Result<()> + Send + 'static
where
    T: Fn(&File) -> anyhow::Result<()> + Send + 'static,
{
    let (mut p, mut frame) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
    move |e| {
        encode_record(e, lsn.fetch_add(1, Ordering::Relaxed), &mut p, &mut frame)?;
        (&*file).write_all(&frame)?;
        then(&file)
    }
}

fn open_raw(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("raw.log");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))
}

/// A thread that fdatasyncs `file` every FSYNC_INTERVAL until the returned
/// sender is dropped.
fn periodic_fdatasync(file: Arc<File>) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(FSYNC_INTERVAL) {
            if let Err(e) = rustix::fs::fdatasync(&*file) {
                eprintln!("bench wal: baseline fdatasync failed: {e}");
                return;
            }
        }
    });
    (tx, handle)
}

/// Runs `threads` workers made by `make(t)` from a common start; the wall
/// time is from the start until the last one finished.
fn timed_threads<F, W>(threads: usize, make: F) -> anyhow::Result<Run>
where
    F: Fn(usize) -> W,
    W: FnOnce() -> anyhow::Result<Vec<u64>> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let work = make(t);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                work()
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow!("a bench thread panicked"));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        return Err(e);
    }
    latencies.sort_unstable();
    Ok(Run {
        events: latencies.len() as u64,
        secs,
        latencies_ns: latencies,
        fsyncs: None,
        stall: None,
    })
}

/// The rotation-stall cases (module docs): `n` appends from a task on a
/// current-thread runtime beside a ticker task that measures how long the
/// thread was kept from it.
fn wal_stall(
    dir: &Path,
    events: &Arc<Vec<AuditEvent>>,
    n: u64,
    append_async: bool,
    prepared: bool,
) -> anyhow::Result<Run> {
    let wal = WalWriter::open(
        wal_config(dir)
            .with_segment_size(STALL_SEGMENT)
            .with_prepare_next_segment(prepared),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let before = wal.stats();
    let started = Instant::now();
    let (latencies, mut gaps) = rt.block_on(async {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut gaps_ns = Vec::new();
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                    let now = Instant::now();
                    gaps_ns.push((now - last).as_nanos() as u64);
                    last = now;
                }
                gaps_ns
            })
        };
        let mut lat = Vec::with_capacity(n as usize);
        let mut outcome = Ok(());
        for i in 0..n {
            let e = &events[i as usize % events.len()];
            let t0 = Instant::now();
            let appended = if append_async {
                wal.append_async(e).await
            } else {
                wal.append(e)
            };
            lat.push(t0.elapsed().as_nanos() as u64);
            if let Err(e) = appended {
                outcome = Err(e);
                break;
            }
            if i % STALL_BURST == STALL_BURST - 1 {
                tokio::task::yield_now().await;
            }
        }
        done.store(true, Ordering::Relaxed);
        let gaps = ticker.await.unwrap_or_default();
        outcome.map(|()| (lat, gaps))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let after = wal.stats();
    wal.close()?;
    let mut latencies = latencies;
    latencies.sort_unstable();
    gaps.sort_unstable();
    let stall = Stall {
        max: Duration::from_nanos(gaps.last().copied().unwrap_or(0)),
        p999: Duration::from_nanos(percentile(&gaps, 99.9)),
        over_1ms: gaps.iter().filter(|&&g| g > 1_000_000).count() as u64,
        rotations: after.rotations - before.rotations,
        slow_rotations: after.slow_rotations - before.slow_rotations,
    };
    Ok(Run {
        events: latencies.len() as u64,
        secs,
        latencies_ns: latencies,
        fsyncs: None,
        stall: Some(stall),
    })
}
