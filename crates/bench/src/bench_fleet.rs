//! `auditwal bench fleet [--json]`: many edge hosts, one PostgreSQL.
//!
//! Each case starts N "hosts" as plain processes, the way they are deployed: per
//! host a WAL directory, an `auditwal emit --mode async` child fed JSON events on
//! its stdin at a fixed rate (open loop: event *k* is due at `t0 + k / rate`,
//! written in 5 ms ticks), and an `auditwal load` child of its own (at nice 10,
//! as docs/operations.md's systemd unit runs it), all loading into one
//! partitioned `audit_events` of a private PostgreSQL (fsync on). Each host is
//! one tenant (`tenant_id = site-NN`) and one stream. With two hosts or more,
//! host 0's loader reaches PostgreSQL through a [`FlakyLink`] that is up for 5 s
//! and down for 3 s, over and over: no byte moves and no reset is sent while it
//! is down. Cases run one after another (N = 1, 4, 16 by default, for each
//! `--host-rate`), each on a fresh database after [`super::bench::quiesce`].
//!
//! What a case measures, over its window (which starts 2 s after the writers
//! do, or 1 s after every host's loader has committed once, whichever is later:
//! sixteen loaders starting together take seconds, each applying the migrations
//! under sqlx's lock; the writers feed from the start, so a late loader starts
//! with a backlog that the warm-up absorbs):
//!
//! - **rows/s**: rows that became visible (their loader's checkpoint covered
//!   them) within the window, all hosts together, against the offered rate.
//! - **lag** per event: from its acknowledgement (the time the bench read the
//!   event id that `emit` prints after the append returned) to the first poll
//!   (every 10 ms, one `SELECT` of `audit_checkpoints`) that saw its stream's
//!   checkpoint cover its LSN, which is when the row is committed and visible.
//!   An event's LSN is known after the run: a stream's rows, sorted by LSN, are
//!   its acknowledged events in order (emit appends in input order). The
//!   steady hosts' lags are pooled (`p50_us`.. and `lag_*_ms`), the worst
//!   steady host's p99 is reported apart, and so is the flapping host.
//! - **CPU**, as cores used over the window, from `/proc/<pid>/stat`: the
//!   server (the postmaster, its live children, and through the postmaster's
//!   child times those that ended), the loaders, the writers, this process
//!   (feeding the writers, reading their acknowledgements, polling), and the
//!   whole machine's busy time from `/proc/stat`: on a shared machine the
//!   difference is what else ran.
//!
//! After the window the link is left up, the writers' stdin is closed, and the
//! bench waits for every row: the table must hold exactly the acknowledged
//! events, each once, or the bench fails. A bench that loses rows measures
//! nothing.
//!
//! Everything shares one machine: the server, every host's writer and loader,
//! and this process. The server's CPU per row is what carries over to a
//! dedicated database server; the rows/s at which the one machine saturates is
//! a lower bound for such a server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal_test_support::{Cluster, ClusterOptions};
use sqlx::{Connection, Executor, PgConnection};

use super::bench::{percentile, report, BenchResult};
use super::bench_e2e::{die_with_parent, remove_scratch_on_signal, LoaderChild};
use super::bench_load::{bench_event, count_rows, fresh_database};
use super::flaky_link::{self, FlakyLink, FlapCycle};
use super::proc_cpu::{self, CoresUsed, CpuSnapshot};
use super::{CmdResult, Failure};

/// Defaults of the flags (kept here so `--help` and the code agree).
const DEFAULT_HOSTS: &str = "1,4,16";
/// Events/s per host: a busy edge host (a shop, a branch office, a gateway)
/// serving some hundreds of requests a second, one or two audit events each.
const DEFAULT_RATE: u64 = 1000;
const DEFAULT_SECS: u64 = 24;
const DEFAULT_FLAP: &str = "5,3";
/// Not measured: the loaders connect (each applies the migrations at start,
/// one at a time under sqlx's lock), the first batches commit. The window
/// starts this long after the writers, or [`SETTLE`] after every host's first
/// commit, whichever is later.
const WARMUP: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(1);
/// How long every host may take to make its first commit.
const FIRST_COMMIT_LIMIT: Duration = Duration::from_secs(60);
/// How often the writers are fed: each tick writes the events due since the last.
const FEED_TICK: Duration = Duration::from_millis(5);
/// How often the checkpoints are polled (the resolution of every lag).
const CHECKPOINT_POLL: Duration = Duration::from_millis(10);
/// How long the loaders may take to load everything after the window before
/// the run is declared broken.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(180);
/// More hosts than this would be more processes than a bench should start.
const MAX_HOSTS: u64 = 256;
/// The lag the loader is held to elsewhere (bench load's lag-20k): a fleet
/// whose steady hosts' p99 is above it, or that loads less than 95 % of what
/// it is offered, does not keep up.
const KEEP_UP_P99: Duration = Duration::from_secs(1);
const KEEP_UP_SHARE: f64 = 0.95;
/// The writers' segment size. Every host's WAL is on this one disk: with the
/// default 64 MiB, sixteen writers would zero-fill 2 GiB (a segment and its
/// spare each) at start, which on a real fleet lands on sixteen disks.
const WRITER_SEGMENT_SIZE: &str = "16MiB";
/// The host whose link flaps (when a case has two or more).
const FLAPPING_HOST: usize = 0;

/// The flags only `bench fleet` takes (refused with the other benches).
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "bench fleet")]
pub struct FleetArgs {
    /// Host counts, one case each, comma-separated [default: 1,4,16].
    #[arg(long, value_delimiter = ',', value_name = "N")]
    pub hosts: Option<Vec<u64>>,
    /// Events/s each host's writer appends; several, comma-separated, sweep the
    /// rate (every host count at every rate) [default: 1000].
    #[arg(long, value_delimiter = ',', value_name = "EVENTS_PER_S")]
    pub host_rate: Option<Vec<u64>>,
    /// Measured seconds per case, after the warm-up (at least 2 s) [default: 24].
    #[arg(long, value_name = "SECS")]
    pub case_secs: Option<u64>,
    /// Host 0's link with two hosts or more: up and down seconds, or `off`
    /// [default: 5,3].
    #[arg(long, value_name = "UP,DOWN")]
    pub flap: Option<String>,
    /// Passed to every host's loader as `--batch-delay-ms` [default: the
    /// loader's own].
    #[arg(long, value_name = "MS")]
    pub loader_batch_delay_ms: Option<u64>,
}

impl FleetArgs {
    /// The flag given, if any (to refuse it with another bench).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--hosts", self.hosts.is_some()),
            ("--host-rate", self.host_rate.is_some()),
            ("--case-secs", self.case_secs.is_some()),
            ("--flap", self.flap.is_some()),
            (
                "--loader-batch-delay-ms",
                self.loader_batch_delay_ms.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }
}

/// What `--help` adds about this bench.
pub const HELP: &str = "bench fleet: N edge hosts (1, 4, 16), each an `auditwal emit` writer at a \
fixed rate and its own `auditwal load`, into one PostgreSQL; host 0's link flaps (5 s up, 3 s \
down, no reset). Reports rows/s, each host's lag (append to visible) p50/p99, the flapping \
host's apart, and the server's CPU in cores.\n  \
auditwal bench fleet --json > fleet.jsonl    # ~2 minutes with the defaults\n  \
auditwal bench fleet --hosts 16 --host-rate 1000,2000,4000   # where one server saturates";

#[derive(Debug, Clone, PartialEq)]
struct Params {
    hosts: Vec<usize>,
    rates: Vec<u64>,
    secs: Duration,
    flap: Option<FlapCycle>,
    batch_delay_ms: Option<u64>,
}

impl Params {
    fn from_args(args: &FleetArgs) -> Result<Params, Failure> {
        let usage = |m: String| Failure::usage(anyhow!(m));
        let hosts: Vec<u64> = match &args.hosts {
            Some(h) => h.clone(),
            None => DEFAULT_HOSTS
                .split(',')
                .filter_map(|n| n.parse().ok())
                .collect(),
        };
        if hosts.is_empty() || hosts.iter().any(|&n| n == 0 || n > MAX_HOSTS) {
            return Err(usage(format!(
                "--hosts {hosts:?}: each count must be in 1..={MAX_HOSTS}"
            )));
        }
        let rates = args.host_rate.clone().unwrap_or_else(|| vec![DEFAULT_RATE]);
        if rates.is_empty() || rates.iter().any(|&r| r == 0 || r > 1_000_000) {
            return Err(usage(format!(
                "--host-rate {rates:?}: each rate must be in 1..=1000000 events/s"
            )));
        }
        let secs = args.case_secs.unwrap_or(DEFAULT_SECS);
        if secs == 0 {
            return Err(usage("--case-secs must be at least 1".into()));
        }
        let flap = FlapCycle::parse(args.flap.as_deref().unwrap_or(DEFAULT_FLAP))
            .map_err(|e| usage(format!("--flap {e}")))?;
        Ok(Params {
            hosts: hosts.into_iter().map(|n| n as usize).collect(),
            rates,
            secs: Duration::from_secs(secs),
            flap,
            batch_delay_ms: args.loader_batch_delay_ms,
        })
    }
}

/// What stays the same across the cases of a run.
struct Bench {
    params: Params,
    cluster: Cluster,
    exe: PathBuf,
    scratch: PathBuf,
    rt: tokio::runtime::Runtime,
    /// The postmaster's PID, when this process can see it in /proc.
    postmaster: Option<u32>,
}

pub fn run(args: FleetArgs, json: bool, dir: Option<PathBuf>) -> CmdResult {
    let params = Params::from_args(&args)?;
    let scratch = match &dir {
        Some(d) => tempfile::Builder::new()
            .prefix("auditwal-fleet-")
            .tempdir_in(d),
        None => tempfile::Builder::new().prefix("auditwal-fleet-").tempdir(),
    }
    .context("cannot create the scratch directory (give another with --dir)")?;
    let exe = std::env::current_exe().context("cannot find the auditwal binary")?;
    let cluster = Cluster::start(ClusterOptions {
        base_dir: dir.clone(),
        ..ClusterOptions::default()
    })
    .map_err(|e| match e {
        e @ auditwal_test_support::ClusterError::NotInstalled => Failure::usage(anyhow!(e)),
        e => Failure::runtime(anyhow!(e).context("starting the private PostgreSQL")),
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fleet-bench")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    remove_scratch_on_signal(&rt, scratch.path());
    let postmaster = rt.block_on(postmaster_pid(&cluster.url()));
    if postmaster.is_none() {
        eprintln!(
            "bench fleet: the server's processes are not visible here; its CPU is not reported"
        );
    }
    let cases = params.hosts.len() * params.rates.len();
    let per_case = WARMUP + params.secs + Duration::from_secs(4);
    eprintln!(
        "bench fleet: private PostgreSQL (fsync on) on 127.0.0.1:{}; {cases} case(s) of {:?} \
         after at least {WARMUP:?} of warm-up, hosts {:?} at {:?} events/s each, flapping link {}; \
         about {} s in all.",
        cluster.port(),
        params.secs,
        params.hosts,
        params.rates,
        params.flap.map_or_else(
            || "off".to_string(),
            |c| format!("{:?} up / {:?} down", c.up, c.down)
        ),
        per_case.as_secs() * cases as u64
    );
    let bench = Bench {
        params,
        cluster,
        exe,
        scratch: scratch.path().to_path_buf(),
        rt,
        postmaster,
    };
    let mut results = Vec::new();
    for &rate in &bench.params.rates {
        for &hosts in &bench.params.hosts {
            let case = run_case(&bench, hosts, rate)?;
            let r = case.result();
            eprintln!("bench fleet: {}", case.summary());
            results.push(r);
        }
    }
    drop(bench);
    report(&results, json);
    Ok(ExitCode::SUCCESS)
}

/// The postmaster is the parent of every backend, ours included.
async fn postmaster_pid(url: &str) -> Option<u32> {
    let mut c = PgConnection::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .ok()?;
    let _ = c.close().await;
    let parent = proc_cpu::parent_of(u32::try_from(backend).ok()?)?;
    let comm = std::fs::read_to_string(format!("/proc/{parent}/comm")).ok()?;
    (comm.trim() == "postgres").then_some(parent)
}

/// The number of events due `elapsed` after the start at `rate` per second:
/// event k is due at k / rate, so event 0 at once.
fn due_by(elapsed: Duration, rate: u64) -> u64 {
    (elapsed.as_nanos() * u128::from(rate) / 1_000_000_000) as u64 + 1
}

/// Feeds events to a writer's stdin, each when it is due, in ticks of
/// [`FEED_TICK`], until `stop`; then closes stdin (the writer then fsyncs and
/// exits). Returns how many it sent.
fn feed(
    mut stdin: ChildStdin,
    host: usize,
    rate: u64,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> std::io::Result<u64> {
    let tenant = format!("site-{host:02}");
    let mut sent = 0u64;
    let mut buf = String::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < start {
            std::thread::sleep(start - now);
            continue;
        }
        let due = due_by(now - start, rate);
        while sent < due {
            let mut e = bench_event(sent);
            e.tenant_id = Some(tenant.clone());
            e.request_id = Some(format!("fleet-{host}-{sent}"));
            buf.push_str(&e.to_json());
            buf.push('\n');
            sent += 1;
        }
        stdin.write_all(buf.as_bytes())?;
        buf.clear();
        std::thread::sleep(FEED_TICK);
    }
    Ok(sent)
}

/// When each acknowledgement line arrived, in order, until the writer exits.
fn read_acks(stdout: ChildStdout) -> std::io::Result<Vec<Instant>> {
    let mut acks = Vec::new();
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(acks);
        }
        acks.push(Instant::now());
    }
}

/// An `auditwal emit` child; killed if dropped unreaped (a case that failed).
struct WriterChild(Option<Child>);

impl WriterChild {
    fn spawn(exe: &Path, wal_dir: &Path, stream: &str) -> Result<WriterChild, Failure> {
        let mut cmd = Command::new(exe);
        cmd.args(["emit", "--mode", "async", "--stream", stream, "--wal-dir"])
            .arg(wal_dir)
            .env("AUDITWAL_SEGMENT_SIZE", WRITER_SEGMENT_SIZE)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the writer ({} emit)", exe.display()))?;
        Ok(WriterChild(Some(child)))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn wait(mut self) -> Result<std::process::ExitStatus, Failure> {
        match self.0.take() {
            Some(mut c) => Ok(c.wait().context("waiting for a writer")?),
            None => Err(Failure::runtime(anyhow!("the writer was already reaped"))),
        }
    }
}

impl Drop for WriterChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every checkpoint advance the poller saw, per stream: (when, LSN).
type Seen = HashMap<String, Vec<(Instant, u64)>>;

/// Polls `audit_checkpoints` until `stop`, keeping each stream's advances in
/// `seen` (which the caller may look at meanwhile).
async fn poll_checkpoints(
    url: String,
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut c = PgConnection::connect(&url)
        .await
        .map_err(|e| format!("the checkpoint poller cannot connect: {e}"))?;
    let mut tick = tokio::time::interval(CHECKPOINT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT stream_id, lsn FROM audit_checkpoints")
                .fetch_all(&mut c)
                .await
                .map_err(|e| format!("polling the checkpoints: {e}"))?;
        let now = Instant::now();
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        for (stream, lsn) in rows {
            let lsn = lsn.max(0) as u64;
            let advances = seen.entry(stream).or_default();
            if advances.last().is_none_or(|&(_, last)| lsn > last) {
                advances.push((now, lsn));
            }
        }
    }
    let _ = c.close().await;
    Ok(())
}

/// One host's figures over the window.
#[derive(Debug, Clone, Default, PartialEq)]
struct HostFigures {
    /// Lag (ack → visible) of each event acknowledged in the window, in ns.
    lags_ns: Vec<u64>,
    /// Events that became visible in the window.
    visible_in_window: u64,
    /// Ack − due time of each event acknowledged in the window, in ns.
    append_delay_ns: Vec<u64>,
}

/// Matches a host's acknowledged events to the checkpoint advances that made
/// them visible. `acks[k]` is when event k was acknowledged, `lsns[k]` its
/// LSN (ascending), `seen` the stream's checkpoint advances (ascending in both),
/// `due(k)` when it was due. Fails if an event was never seen visible.
fn host_figures(
    acks: &[Instant],
    lsns: &[u64],
    seen: &[(Instant, u64)],
    due: impl Fn(u64) -> Instant,
    window: (Instant, Instant),
) -> Result<HostFigures, String> {
    if acks.len() != lsns.len() {
        return Err(format!(
            "{} events acknowledged but {} rows loaded",
            acks.len(),
            lsns.len()
        ));
    }
    let mut out = HostFigures::default();
    let mut j = 0;
    for (k, (&acked, &lsn)) in acks.iter().zip(lsns).enumerate() {
        while j < seen.len() && seen[j].1 < lsn {
            j += 1;
        }
        let Some(&(visible, _)) = seen.get(j) else {
            return Err(format!("the row of LSN {lsn} was never seen committed"));
        };
        if visible >= window.0 && visible < window.1 {
            out.visible_in_window += 1;
        }
        if acked >= window.0 && acked < window.1 {
            out.lags_ns
                .push(visible.saturating_duration_since(acked).as_nanos() as u64);
            out.append_delay_ns
                .push(acked.saturating_duration_since(due(k as u64)).as_nanos() as u64);
        }
    }
    Ok(out)
}

/// One host of a case while it runs.
struct Host {
    stream: String,
    writer: WriterChild,
    loader: LoaderChild,
    feeder: std::thread::JoinHandle<std::io::Result<u64>>,
    acks: std::thread::JoinHandle<std::io::Result<Vec<Instant>>>,
}

/// What one case measured.
struct CaseRun {
    hosts: usize,
    rate: u64,
    window: Duration,
    /// Index = host.
    figures: Vec<HostFigures>,
    flapping: Option<usize>,
    flap_down: Duration,
    cores: CoresUsed,
    /// From the end of the window until every row was visible.
    catch_up: Duration,
    /// Rows loaded in all (warm-up and catch-up included).
    rows: u64,
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e4).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50, p99, p99.9 and max of samples in ns (sorted in place); `None` if empty.
fn spread(samples: &mut [u64]) -> Option<[u64; 4]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some([
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        percentile(samples, 99.9),
        percentile(samples, 100.0),
    ])
}

impl CaseRun {
    fn name(&self) -> String {
        format!("{}-hosts-{}", self.hosts, self.rate)
    }

    fn offered(&self) -> f64 {
        (self.hosts as u64 * self.rate) as f64
    }

    fn steady(&self) -> impl Iterator<Item = &HostFigures> {
        self.figures
            .iter()
            .enumerate()
            .filter(|(h, _)| Some(*h) != self.flapping)
            .map(|(_, f)| f)
    }

    fn result(&self) -> BenchResult {
        let visible: u64 = self.figures.iter().map(|f| f.visible_in_window).sum();
        let mut r = BenchResult::new("fleet", self.name(), visible, self.window.as_secs_f64());
        let mut lags: Vec<u64> = self.steady().flat_map(|f| f.lags_ns.clone()).collect();
        let lag = spread(&mut lags);
        if let Some([p50, p99, p999, _]) = lag {
            r.p50_us = Some(p50 as f64 / 1000.0);
            r.p99_us = Some(p99 as f64 / 1000.0);
            r.p999_us = Some(p999 as f64 / 1000.0);
        }
        let offered = self.offered();
        let keeps_up = lag.is_some_and(|[_, p99, _, _]| u128::from(p99) <= KEEP_UP_P99.as_nanos())
            && r.events_per_sec >= KEEP_UP_SHARE * offered;
        let x = &mut r.extra;
        let mut put = |k: &str, v: serde_json::Value| {
            x.insert(k.into(), v);
        };
        put("hosts", serde_json::json!(self.hosts));
        put("rate_per_host", serde_json::json!(self.rate));
        put("offered_events_per_sec", serde_json::json!(offered));
        put("keeps_up", serde_json::json!(keeps_up));
        if let Some([p50, p99, _, max]) = lag {
            put("lag_p50_ms", serde_json::json!(ms(p50)));
            put("lag_p99_ms", serde_json::json!(ms(p99)));
            put("lag_max_ms", serde_json::json!(ms(max)));
        }
        let worst = self
            .steady()
            .filter_map(|f| spread(&mut f.lags_ns.clone()).map(|s| s[1]))
            .max();
        if let Some(w) = worst {
            put("worst_host_lag_p99_ms", serde_json::json!(ms(w)));
        }
        let mut delays: Vec<u64> = self
            .figures
            .iter()
            .flat_map(|f| f.append_delay_ns.clone())
            .collect();
        if let Some([_, p99, _, _]) = spread(&mut delays) {
            put("append_delay_p99_ms", serde_json::json!(ms(p99)));
        }
        if let Some(server) = self.cores.server {
            put("server_cpu_cores", serde_json::json!(round3(server)));
            if visible > 0 {
                let us_per_row = server * self.window.as_secs_f64() * 1e6 / visible as f64;
                put(
                    "server_cpu_us_per_row",
                    serde_json::json!(round3(us_per_row)),
                );
            }
        }
        put(
            "loaders_cpu_cores",
            serde_json::json!(round3(self.cores.loaders)),
        );
        put(
            "writers_cpu_cores",
            serde_json::json!(round3(self.cores.writers)),
        );
        put(
            "bench_cpu_cores",
            serde_json::json!(round3(self.cores.bench)),
        );
        if let Some(m) = self.cores.machine {
            put("machine_busy_cores", serde_json::json!(round3(m)));
        }
        put(
            "catch_up_ms",
            serde_json::json!(ms(self.catch_up.as_nanos() as u64)),
        );
        put("rows_loaded", serde_json::json!(self.rows));
        if let Some(h) = self.flapping {
            let f = &self.figures[h];
            put("flapping_host", serde_json::json!(h));
            put(
                "flap_down_secs",
                serde_json::json!(round3(self.flap_down.as_secs_f64())),
            );
            put("flap_rows", serde_json::json!(f.visible_in_window));
            if let Some([p50, p99, _, max]) = spread(&mut f.lags_ns.clone()) {
                put("flap_lag_p50_ms", serde_json::json!(ms(p50)));
                put("flap_lag_p99_ms", serde_json::json!(ms(p99)));
                put("flap_lag_max_ms", serde_json::json!(ms(max)));
            }
        }
        r
    }

    fn summary(&self) -> String {
        let r = self.result();
        let get = |k: &str| r.extra.get(k).map_or_else(|| "-".into(), |v| v.to_string());
        format!(
            "{} hosts × {}/s: {:.0} rows/s of {:.0} offered, lag p50 {} ms p99 {} ms (worst host {}), \
             flapping host p99 {} ms, server {} cores, loaders {}, writers {}, machine busy {}, \
             caught up {} ms after",
            self.hosts,
            self.rate,
            r.events_per_sec,
            self.offered(),
            get("lag_p50_ms"),
            get("lag_p99_ms"),
            get("worst_host_lag_p99_ms"),
            get("flap_lag_p99_ms"),
            get("server_cpu_cores"),
            get("loaders_cpu_cores"),
            get("writers_cpu_cores"),
            get("machine_busy_cores"),
            get("catch_up_ms"),
        )
    }
}

/// `url` with its port replaced by `port` (the flapping host's way in).
fn through(url: &str, server_port: u16, port: u16) -> Result<String, Failure> {
    let from = format!(":{server_port}/");
    if !url.contains(&from) {
        return Err(Failure::runtime(anyhow!(
            "cannot route {url} through the flapping link"
        )));
    }
    Ok(url.replacen(&from, &format!(":{port}/"), 1))
}

/// Polls until `path` exists (a writer has opened its stream).
fn wait_for_path(path: &Path, limit: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Failure::runtime(anyhow!(
                "{} did not appear within {limit:?}: a writer did not start",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One case: N hosts at `rate` for the window, then the checks and figures.
fn run_case(bench: &Bench, n: usize, rate: u64) -> Result<CaseRun, Failure> {
    let p = &bench.params;
    let rt = &bench.rt;
    let db = format!("fleet_{n}_{rate}");
    let url = rt.block_on(async {
        let url = fresh_database(&bench.cluster, &db).await?;
        let mut c = PgConnection::connect(&url)
            .await
            .context("connecting to the bench database")?;
        super::bench::quiesce(&mut c).await?;
        let _ = c.close().await;
        Ok::<_, Failure>(url)
    })?;
    let case_dir = bench.scratch.join(&db);
    let flapping = (n >= 2 && p.flap.is_some()).then_some(FLAPPING_HOST);
    let server: SocketAddr = ([127, 0, 0, 1], bench.cluster.port()).into();
    let link = match flapping {
        Some(_) => Some(Arc::new(
            rt.block_on(FlakyLink::start(server))
                .context("cannot start the flapping link's proxy")?,
        )),
        None => None,
    };

    // Writers first: a loader finds the stream directories they create.
    let mut writers = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    for h in 0..n {
        let wal = case_dir.join(format!("host-{h:02}"));
        let stream = format!("fleet-{h:02}");
        writers.push(WriterChild::spawn(&bench.exe, &wal, &stream)?);
        streams.push((wal, stream));
    }
    for (wal, stream) in &streams {
        wait_for_path(&wal.join(stream), Duration::from_secs(10))?;
    }
    let extra: Vec<String> = p
        .batch_delay_ms
        .map(|ms| vec!["--batch-delay-ms".into(), ms.to_string()])
        .unwrap_or_default();
    let mut loaders = Vec::with_capacity(n);
    for (h, (wal, _)) in streams.iter().enumerate() {
        let loader_url = match (&link, Some(h) == flapping) {
            (Some(l), true) => through(&url, server.port(), l.addr().port())?,
            _ => url.clone(),
        };
        loaders.push(LoaderChild::spawn_with(
            &bench.exe,
            wal,
            &loader_url,
            &extra,
        )?);
    }

    let seen = Arc::new(std::sync::Mutex::new(Seen::new()));
    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = rt.spawn(poll_checkpoints(
        url.clone(),
        seen.clone(),
        stop_polling.clone(),
    ));
    // A common start a little ahead, so every feeder begins on time.
    let t0 = Instant::now() + Duration::from_millis(200);
    let stop_feeding = Arc::new(AtomicBool::new(false));
    let mut hosts = Vec::with_capacity(n);
    for (h, ((_, stream), (mut writer, loader))) in streams
        .into_iter()
        .zip(writers.into_iter().zip(loaders))
        .enumerate()
    {
        let (Some(stdin), Some(stdout)) = writer
            .0
            .as_mut()
            .map_or((None, None), |c| (c.stdin.take(), c.stdout.take()))
        else {
            return Err(Failure::runtime(anyhow!("a writer has no stdin or stdout")));
        };
        let feeder = std::thread::Builder::new()
            .name(format!("fleet-feed-{h}"))
            .spawn({
                let stop = stop_feeding.clone();
                move || feed(stdin, h, rate, t0, stop)
            })
            .context("cannot start a feeder thread")?;
        let acks = std::thread::Builder::new()
            .name(format!("fleet-acks-{h}"))
            .spawn(move || read_acks(stdout))
            .context("cannot start an ack reader thread")?;
        hosts.push(Host {
            stream,
            writer,
            loader,
            feeder,
            acks,
        });
    }
    let flapper = match (&link, p.flap) {
        (Some(l), Some(cycle)) => {
            let l = l.clone();
            Some(rt.spawn(async move {
                tokio::time::sleep_until(t0.into()).await;
                flaky_link::flap(l, cycle).await
            }))
        }
        _ => None,
    };

    let loader_pids: Vec<u32> = hosts.iter().filter_map(|h| h.loader.pid()).collect();
    let writer_pids: Vec<u32> = hosts.iter().map(|h| h.writer.pid()).collect();
    let first_commits = wait_for_first_commits(&seen, n, t0 + FIRST_COMMIT_LIMIT)?;
    let start = (t0 + WARMUP).max(first_commits + SETTLE);
    let window = (start, start + p.secs);
    sleep_until(window.0);
    let cpu_before = CpuSnapshot::take(bench.postmaster, &loader_pids, &writer_pids);
    let measured_from = Instant::now();
    sleep_until(window.1);
    let cpu_after = CpuSnapshot::take(bench.postmaster, &loader_pids, &writer_pids);
    let cores = CoresUsed::between(
        &cpu_before,
        &cpu_after,
        measured_from.elapsed().as_secs_f64(),
    );
    stop_feeding.store(true, Ordering::Relaxed);
    if let Some(f) = flapper {
        f.abort();
    }
    if let Some(l) = &link {
        l.set_up(true);
    }

    // The writers reach the end of their input and exit.
    let mut acks = Vec::with_capacity(n);
    let mut expected = 0u64;
    let mut rest = Vec::with_capacity(n);
    for h in hosts {
        let fed = h.feeder.join();
        let acked = h.acks.join();
        let status = h.writer.wait()?;
        match (fed, acked) {
            (Ok(Ok(sent)), Ok(Ok(a))) if status.success() && a.len() as u64 == sent => {
                expected += sent;
                acks.push(a)
            }
            (fed, acked) => {
                return Err(Failure::runtime(anyhow!(
                    "writer {}: exit {status}, fed {:?}, acknowledged {:?} events",
                    h.stream,
                    fed.map(|r| r.map_err(|e| e.to_string())),
                    acked.map(|r| r.map(|a| a.len()).map_err(|e| e.to_string())),
                )))
            }
        }
        rest.push((h.stream, h.loader));
    }
    let catch_up = rt.block_on(wait_for_rows(&url, expected, &mut rest, window.1))?;
    stop_polling.store(true, Ordering::Relaxed);
    rt.block_on(poller)
        .map_err(|e| Failure::runtime(anyhow!("the checkpoint poller: {e}")))?
        .map_err(|e| Failure::runtime(anyhow!(e)))?;
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    let lsns = rt.block_on(loaded_lsns(&url))?;
    for (stream, loader) in rest {
        let status = loader.stop()?;
        if !status.success() {
            return Err(Failure::runtime(anyhow!(
                "the loader of {stream} exited with {status} after SIGTERM (want 0)"
            )));
        }
    }
    drop(link);

    let mut figures = Vec::with_capacity(n);
    for (h, a) in acks.iter().enumerate() {
        let stream = format!("fleet-{h:02}");
        let l = lsns.get(&stream).map_or(&[][..], Vec::as_slice);
        let s = seen.get(&stream).map_or(&[][..], Vec::as_slice);
        let due = |k: u64| t0 + Duration::from_nanos(k * 1_000_000_000 / rate);
        figures.push(
            host_figures(a, l, s, due, window)
                .map_err(|e| Failure::runtime(anyhow!("{stream}: {e}: not a valid run")))?,
        );
    }
    let _ = std::fs::remove_dir_all(&case_dir);
    rt.block_on(drop_database(&bench.cluster, &db));
    Ok(CaseRun {
        hosts: n,
        rate,
        window: p.secs,
        figures,
        flapping,
        flap_down: p.flap.map_or(Duration::ZERO, |c| {
            c.down_within(window.0 - t0, window.1 - t0)
        }),
        cores,
        catch_up,
        rows: expected,
    })
}

/// Waits until every one of `n` streams has committed once; when the last did.
fn wait_for_first_commits(
    seen: &std::sync::Mutex<Seen>,
    n: usize,
    deadline: Instant,
) -> Result<Instant, Failure> {
    loop {
        let last_first = {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let firsts: Vec<Instant> = seen
                .values()
                .filter_map(|a| a.first().map(|f| f.0))
                .collect();
            (firsts.len() >= n)
                .then(|| firsts.into_iter().max())
                .flatten()
        };
        if let Some(t) = last_first {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(Failure::runtime(anyhow!(
                "not every host's loader committed within {FIRST_COMMIT_LIMIT:?} of the start"
            )));
        }
        std::thread::sleep(CHECKPOINT_POLL);
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Waits until the table holds `expected` rows (checking that every loader
/// still runs); the time from `since`.
async fn wait_for_rows(
    url: &str,
    expected: u64,
    loaders: &mut [(String, LoaderChild)],
    since: Instant,
) -> Result<Duration, Failure> {
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        let rows = count_rows(url).await?;
        if rows == expected {
            return Ok(Instant::now().saturating_duration_since(since));
        }
        if rows > expected {
            return Err(Failure::runtime(anyhow!(
                "the table holds {rows} rows, {expected} events were acknowledged: duplicates"
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::runtime(anyhow!(
                "{rows} of {expected} rows loaded {CATCH_UP_LIMIT:?} after the writers stopped: \
                 not a valid run"
            )));
        }
        for (_, l) in loaders.iter_mut() {
            l.check_running()?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every stream's loaded LSNs, ascending; an error if one appears twice.
async fn loaded_lsns(url: &str) -> Result<HashMap<String, Vec<u64>>, Failure> {
    let mut c = PgConnection::connect(url).await.context("connect")?;
    let rows: Vec<(String, Vec<i64>)> = sqlx::query_as(
        "SELECT stream_id, array_agg(lsn ORDER BY lsn) FROM audit_events GROUP BY stream_id",
    )
    .fetch_all(&mut c)
    .await
    .context("reading the loaded LSNs")?;
    let _ = c.close().await;
    let mut out = HashMap::new();
    for (stream, lsns) in rows {
        let lsns: Vec<u64> = lsns.into_iter().map(|l| l.max(0) as u64).collect();
        if lsns.windows(2).any(|w| w[0] == w[1]) {
            return Err(Failure::runtime(anyhow!(
                "stream {stream}: an LSN was loaded twice: not a valid run"
            )));
        }
        out.insert(stream, lsns);
    }
    Ok(out)
}

/// Best effort: a finished case's rows would only fill the disk.
async fn drop_database(cluster: &Cluster, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(&cluster.url()).await {
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        let _ = admin.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_one_four_and_sixteen_hosts_at_a_thousand_events_a_second() {
        let p = Params::from_args(&FleetArgs::default()).unwrap_or_else(|_| panic!("defaults"));
        assert_eq!(p.hosts, [1, 4, 16]);
        assert_eq!(p.rates, [DEFAULT_RATE]);
        assert_eq!(p.secs, Duration::from_secs(DEFAULT_SECS));
        assert_eq!(
            p.flap,
            Some(FlapCycle {
                up: Duration::from_secs(5),
                down: Duration::from_secs(3)
            })
        );
        assert_eq!(p.batch_delay_ms, None);
    }

    #[test]
    fn bad_host_counts_rates_and_flaps_are_usage_errors() {
        let bad = [
            FleetArgs {
                hosts: Some(vec![0]),
                ..FleetArgs::default()
            },
            FleetArgs {
                hosts: Some(vec![MAX_HOSTS + 1]),
                ..FleetArgs::default()
            },
            FleetArgs {
                host_rate: Some(vec![]),
                ..FleetArgs::default()
            },
            FleetArgs {
                host_rate: Some(vec![0]),
                ..FleetArgs::default()
            },
            FleetArgs {
                case_secs: Some(0),
                ..FleetArgs::default()
            },
            FleetArgs {
                flap: Some("3".into()),
                ..FleetArgs::default()
            },
        ];
        for args in bad {
            match Params::from_args(&args) {
                Err(f) => assert!(matches!(f, Failure::Usage(_)), "{args:?}: {f:?}"),
                Ok(p) => panic!("{args:?} accepted as {p:?}"),
            }
        }
        let off = FleetArgs {
            flap: Some("off".into()),
            host_rate: Some(vec![500, 2000]),
            ..FleetArgs::default()
        };
        let p = Params::from_args(&off).unwrap_or_else(|_| panic!("valid"));
        assert_eq!((p.flap, p.rates), (None, vec![500, 2000]));
    }

    #[test]
    fn the_fleet_flags_parse_from_the_command_line_and_are_named_when_given() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            fleet: FleetArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--hosts",
            "2,8",
            "--host-rate",
            "1500",
            "--flap",
            "1,2",
            "--loader-batch-delay-ms",
            "200",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.fleet.hosts, Some(vec![2, 8]));
        assert_eq!(cli.fleet.first_given(), Some("--hosts"));
        let p = Params::from_args(&cli.fleet).unwrap_or_else(|_| panic!("valid"));
        assert_eq!(p.batch_delay_ms, Some(200));
        assert_eq!(FleetArgs::default().first_given(), None);
    }

    #[test]
    fn help_states_the_defaults_the_code_uses() {
        use clap::Args;
        let help = FleetArgs::augment_args(clap::Command::new("fleet"))
            .render_help()
            .to_string();
        for default in [
            DEFAULT_HOSTS.to_string(),
            DEFAULT_RATE.to_string(),
            DEFAULT_SECS.to_string(),
            DEFAULT_FLAP.to_string(),
        ] {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{default} missing from:\n{help}"
            );
        }
    }

    #[test]
    fn events_fall_due_at_the_rate_starting_at_once() {
        assert_eq!(due_by(Duration::ZERO, 1000), 1);
        assert_eq!(due_by(Duration::from_micros(999), 1000), 1);
        assert_eq!(due_by(Duration::from_millis(1), 1000), 2);
        assert_eq!(due_by(Duration::from_secs(2), 1000), 2001);
        assert_eq!(due_by(Duration::from_millis(1500), 3), 5);
    }

    #[test]
    fn each_event_is_visible_at_the_first_checkpoint_that_covers_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Five events acknowledged at 0, 10, ..., 40 ms, LSNs 1..=3, then 5..=6
        // (LSN 4 was a segment's end record).
        let acks = [at(0), at(10), at(20), at(30), at(40)];
        let lsns = [1, 2, 3, 5, 6];
        // Checkpoints seen: 2 at 100 ms, 5 at 150 ms, 6 at 400 ms.
        let seen = [(at(100), 2), (at(150), 5), (at(400), 6)];
        let due = |k: u64| t0 + Duration::from_millis(10 * k);
        let f = host_figures(&acks, &lsns, &seen, due, (at(5), at(200))).expect("figures");
        // Acked in the window: events 1..=4 (10, 20, 30, 40 ms).
        let lag_ms: Vec<u64> = f.lags_ns.iter().map(|ns| ns / 1_000_000).collect();
        assert_eq!(lag_ms, [90, 130, 120, 360]);
        assert_eq!(f.append_delay_ns, [0, 0, 0, 0]);
        // Visible in the window: the four covered at 100 and 150 ms.
        assert_eq!(f.visible_in_window, 4);

        let never = host_figures(&acks, &lsns, &seen[..2], due, (at(0), at(500)));
        assert!(never.is_err_and(|e| e.contains("LSN 6")));
        let short = host_figures(&acks, &lsns[..4], &seen, due, (at(0), at(500)));
        assert!(short.is_err());
    }

    fn case(figures: Vec<HostFigures>, flapping: Option<usize>) -> CaseRun {
        CaseRun {
            hosts: figures.len(),
            rate: 100,
            window: Duration::from_secs(1),
            figures,
            flapping,
            flap_down: Duration::from_millis(500),
            cores: CoresUsed {
                server: Some(0.25),
                loaders: 0.1,
                writers: 0.05,
                bench: 0.02,
                machine: Some(1.5),
            },
            catch_up: Duration::from_millis(120),
            rows: 300,
        }
    }

    fn host(lag_ms: &[u64], visible: u64) -> HostFigures {
        HostFigures {
            lags_ns: lag_ms.iter().map(|m| m * 1_000_000).collect(),
            visible_in_window: visible,
            append_delay_ns: vec![1_000; lag_ms.len()],
        }
    }

    #[test]
    fn the_flapping_host_is_reported_apart_from_the_steady_ones() {
        let run = case(
            vec![
                host(&[3000; 10], 40),
                host(&[100; 10], 100),
                host(&[200; 10], 100),
            ],
            Some(0),
        );
        let r = run.result();
        assert_eq!(r.bench, "fleet");
        assert_eq!(r.case, "3-hosts-100");
        assert_eq!(r.events, 240);
        assert_eq!(r.events_per_sec, 240.0);
        // Pooled over the two steady hosts: 100 and 200 ms.
        assert_eq!(r.p50_us, Some(100_000.0));
        assert_eq!(r.p99_us, Some(200_000.0));
        let x = |k: &str| r.extra.get(k).cloned().unwrap_or_default();
        assert_eq!(x("lag_p99_ms"), serde_json::json!(200.0));
        assert_eq!(x("worst_host_lag_p99_ms"), serde_json::json!(200.0));
        assert_eq!(x("flap_lag_p99_ms"), serde_json::json!(3000.0));
        assert_eq!(x("flap_rows"), serde_json::json!(40));
        assert_eq!(x("flapping_host"), serde_json::json!(0));
        assert_eq!(x("server_cpu_cores"), serde_json::json!(0.25));
        // 0.25 cores for 1 s over 240 rows.
        assert_eq!(x("server_cpu_us_per_row"), serde_json::json!(1041.667));
        assert_eq!(x("offered_events_per_sec"), serde_json::json!(300.0));
        // 240 of 300 offered: under 95 %.
        assert_eq!(x("keeps_up"), serde_json::json!(false));
    }

    #[test]
    fn a_single_steady_host_keeps_up_when_its_lag_and_rate_are_met() {
        let r = case(vec![host(&[150; 100], 100)], None).result();
        assert_eq!(r.extra["keeps_up"], serde_json::json!(true));
        assert!(!r.extra.contains_key("flapping_host"));
        let slow = case(vec![host(&[1500; 100], 100)], None).result();
        assert_eq!(slow.extra["keeps_up"], serde_json::json!(false));
    }

    #[test]
    fn the_flapping_link_leads_to_the_proxy_port() {
        let url = "postgres://postgres@127.0.0.1:5432/fleet_4_1000?sslmode=disable";
        assert_eq!(
            through(url, 5432, 40001).ok().as_deref(),
            Some("postgres://postgres@127.0.0.1:40001/fleet_4_1000?sslmode=disable")
        );
        assert!(through(url, 5433, 40001).is_err());
    }
}
