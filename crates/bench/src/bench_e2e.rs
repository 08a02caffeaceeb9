//! `auditwal bench e2e [--json]`: what each audit setting costs a web service's
//! requests, end to end over loopback HTTP.
//!
//! The example URL shortener (examples/shortener/app.rs, included below) runs in
//! this process on its own tokio runtime (`axum::serve` on 127.0.0.1:0), its
//! `POST /api/links` audited with each user-audit setting in turn: `off` (no
//! audit), `sync`, `durable`, `async` and `sampled` (rate 0.1, keyed by the
//! request id the client sends as `x-request-id`). PostgreSQL is a private
//! cluster with fsync on (or `DATABASE_URL`); for the WAL settings the real
//! loader runs as a child process (`auditwal load`, at nice 10), as it is
//! deployed by docs/operations.md's systemd unit. The load generator
//! ([`super::loadgen`]) runs on another runtime, over 64 keep-alive
//! connections, in two phases per setting:
//!
//! - **fixed rate** (open loop): request *i* is due at `t0 + i / rate` and its
//!   latency is counted from then (no coordinated omission);
//! - **saturation** (closed loop): every connection sends its next request when
//!   the previous one is answered.
//!
//! After each phase the bench waits for the loader's checkpoint to cover the last
//! LSN the log appended (`loader_lag_ms`: from the last response until then), and
//! checks the accounting: every 2xx response is an event the log recorded or
//! sampled out, nothing failed, and the table holds exactly the kept events. Any
//! difference fails the bench: a bench that silently loses rows measures nothing.
//!
//! The machine is shared and noisy, so settings are interleaved in rounds (off,
//! async, durable, sampled, sync, off, ...), each phase after a 1 s warm-up, and
//! every figure reported is the median over the rounds of that figure. Before
//! each setting the bench runs VACUUM ANALYZE and CHECKPOINT
//! ([`super::bench::quiesce`]), so the database work one setting leaves owing is
//! not paid inside the next one.
//!
//! Everything shares one machine, as on a small edge host: the service, the
//! client (in this process, so a stall of the whole process delays its sends too;
//! `send_delay_p99_us` shows how late requests left), the loader and PostgreSQL.
//! The saturation figures are therefore the host's, the loader's and the
//! server's CPU included, not the audit call's alone.
//!
//! Two deployments are measured (`--deployment`, both by default), one after
//! the other, each on a private cluster of its own:
//!
//! - **colocated**: as above, the database's data directory on the real disk
//!   and the loader running throughout: the cost on a host that also carries
//!   the database.
//! - **separated**: the deployment the product is for, with the loader and
//!   the database on other machines. One machine cannot be two, so the bench
//!   takes their work out of the service's fixed-rate window instead: the
//!   loader is stopped (SIGSTOP) during each fixed-rate phase and catches up
//!   after it, and the database's data directory is on tmpfs
//!   (`--separated-data-dir`, checked with statfs), so its flushes, which
//!   stall this VM's cores, do not happen at all. What stays is what the edge
//!   host pays: the service, the audit call and the WAL's own fdatasyncs (the
//!   WAL is on the real disk in both). The async target (p99 ≤ 1.05 × off at
//!   the fixed rate) is judged on this deployment. Its saturation phase runs
//!   with the loader, so it still shares the cores with the loader's and the
//!   database's CPU, without the disk's flushes.
//!
//! With `DATABASE_URL` the database is the user's: both deployments use it,
//! and separated only pauses the loader (`database_dir` says `external`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::{AuditLog, AuditStats, Config, Mode, SampleKey};
use auditwal_test_support::{Cluster, ClusterOptions};
use sqlx::{Connection, PgConnection};

use super::bench::{median, median_of_rounds, report, BenchResult};
use super::loadgen::{self, RequestSource, RunResult};
use super::{CmdResult, Failure};
use shortener_app::{AppState, UserAudit};

const WARMUP: Duration = Duration::from_secs(1);
/// The sampled setting's rate, as the issue asks.
const SAMPLE_RATE: f64 = 0.1;
/// How long the loader may take to catch up after a phase before the run is
/// declared broken.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// How often the checkpoint is polled while waiting for the loader.
const CHECKPOINT_POLL: Duration = Duration::from_millis(2);
/// Defaults of the flags (kept here so `--help` and the code agree).
const DEFAULT_RATE: u64 = 1500;
const DEFAULT_SECS: u64 = 4;
const DEFAULT_SATURATION_SECS: u64 = 2;
const DEFAULT_ROUNDS: u64 = 5;
const DEFAULT_CONNECTIONS: u64 = 64;
/// The loader child's niceness, as in the recommended systemd unit.
const LOADER_NICE: i32 = 10;
/// The target the issue sets: async adds at most 5 % to p99 over off.
const ASYNC_P99_TARGET: f64 = 1.05;
/// Where the separated deployment's private cluster keeps its data directory.
const DEFAULT_SEPARATED_DATA_DIR: &str = "/dev/shm";
/// statfs's f_type of tmpfs (linux/magic.h).
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// `--deployment`: which deployments to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentArg {
    Colocated,
    Separated,
    Both,
}

/// Where the loader's and the database's work runs relative to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deployment {
    /// Everything on this host, the database on its disk, the loader running.
    Colocated,
    /// The loader paused in the fixed-rate phases, the database on tmpfs: the
    /// service's own cost, as with the loader and database elsewhere.
    Separated,
}

impl Deployment {
    fn name(self) -> &'static str {
        match self {
            Deployment::Colocated => "colocated",
            Deployment::Separated => "separated",
        }
    }

    /// The case name of a setting's phase in this deployment: colocated keeps
    /// the plain names (`async`, `async-saturated`), separated adds a suffix.
    fn case(self, base: &str) -> String {
        match self {
            Deployment::Colocated => base.to_string(),
            Deployment::Separated => format!("{base}-separated"),
        }
    }
}

/// The flags only `bench e2e` takes (refused with the other benches).
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "bench e2e")]
pub struct E2eArgs {
    /// Fixed request rate of the open-loop phase, requests/s [default: 1500].
    #[arg(long, value_name = "REQ_PER_S")]
    pub rate: Option<u64>,
    /// Measured seconds of the fixed-rate phase per setting and round [default: 4].
    #[arg(long)]
    pub secs: Option<u64>,
    /// Measured seconds of the saturation phase per setting and round [default: 2].
    #[arg(long)]
    pub saturation_secs: Option<u64>,
    /// Rounds over all settings; each figure is the median over rounds [default: 5].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Keep-alive connections of the load generator (both phases) [default: 64].
    #[arg(long)]
    pub connections: Option<u64>,
    /// Only these settings, comma-separated (off, the baseline, always runs)
    /// [default: off,sync,durable,async,sampled].
    #[arg(long, value_delimiter = ',')]
    pub settings: Option<Vec<String>>,
    /// Stop the loader (SIGSTOP) during each fixed-rate phase and let it catch
    /// up after (SIGCONT): what the service pays for a WAL mode without the
    /// loader's work, and its database's, on the same cores. The separated
    /// deployment always does; this flag makes the colocated one do it too
    /// (a diagnostic).
    #[arg(long)]
    pub pause_loader: bool,
    /// Which deployments to measure, one after the other: colocated (the
    /// database on this host's disk, the loader running) and separated (the
    /// loader paused in each fixed-rate phase, the database's data directory
    /// on tmpfs: the service's own cost, as with the loader and the database
    /// on other machines; the async target is judged on it) [default: both].
    #[arg(long, value_enum)]
    pub deployment: Option<DeploymentArg>,
    /// A tmpfs directory in which the separated deployment's private cluster
    /// makes its data directory [default: /dev/shm].
    #[arg(long, value_name = "DIR")]
    pub separated_data_dir: Option<PathBuf>,
}

impl E2eArgs {
    /// The flag given, if any (to refuse it with another bench).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--rate", self.rate.is_some()),
            ("--secs", self.secs.is_some()),
            ("--saturation-secs", self.saturation_secs.is_some()),
            ("--rounds", self.rounds.is_some()),
            ("--connections", self.connections.is_some()),
            ("--settings", self.settings.is_some()),
            ("--pause-loader", self.pause_loader),
            ("--deployment", self.deployment.is_some()),
            ("--separated-data-dir", self.separated_data_dir.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }
}

/// What `--help` adds about this bench.
pub const HELP: &str = "bench e2e: the example URL shortener (in-process, loopback HTTP) with its \
POST /api/links audited off, sync, durable, async and sampled (0.1); a fixed-rate open-loop \
phase (p50/p99/p99.9 from each request's scheduled time) and a closed-loop saturation phase \
per setting, interleaved in rounds, medians reported; the loader runs as a child process and \
its lag and row count are checked after each phase. Two deployments: colocated (the database on \
this host's disk, the loader running) and separated (the loader paused during each fixed-rate \
phase, the database's data directory on tmpfs, so the figures are the service's own cost; the \
async target, p99 <= 1.05 x off, is judged on separated). Saturation throughput is a ratio to \
off of the same deployment.\n  \
auditwal bench e2e --json > e2e.jsonl        # ~8 minutes with the defaults (4 per deployment)\n  \
auditwal bench e2e --deployment separated --settings async --rounds 6\n  \
auditwal bench e2e --rate 1000 --secs 10 --rounds 3 --settings async,durable";

/// One audit setting of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Off,
    Sync,
    Durable,
    Async,
    Sampled,
}

impl Setting {
    /// The order of the report (and of the issue).
    const REPORT: [Setting; 5] = [
        Setting::Off,
        Setting::Sync,
        Setting::Durable,
        Setting::Async,
        Setting::Sampled,
    ];
    /// The order within a round: off next to async, the two the 5 % target
    /// compares, and sync (the one that leaves most rows behind) last.
    const ROUND: [Setting; 5] = [
        Setting::Off,
        Setting::Async,
        Setting::Durable,
        Setting::Sampled,
        Setting::Sync,
    ];

    fn name(self) -> &'static str {
        match self {
            Setting::Off => "off",
            Setting::Sync => "sync",
            Setting::Durable => "durable",
            Setting::Async => "async",
            Setting::Sampled => "sampled",
        }
    }

    fn mode(self) -> Option<Mode> {
        match self {
            Setting::Off => None,
            Setting::Sync => Some(Mode::Sync),
            Setting::Durable => Some(Mode::Durable),
            Setting::Async => Some(Mode::Async),
            Setting::Sampled => Some(Mode::Sampled),
        }
    }

    fn uses_wal(self) -> bool {
        self.mode().is_some_and(Mode::uses_wal)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn parse(name: &str) -> Option<Setting> {
        Setting::REPORT
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name.trim()))
    }
}

struct Params {
    rate: u64,
    secs: Duration,
    saturation_secs: Duration,
    rounds: usize,
    connections: usize,
    /// In round order, off first.
    settings: Vec<Setting>,
    /// `--pause-loader` (the colocated deployment; separated always pauses).
    pause_loader: bool,
    /// In the order they run.
    deployments: Vec<Deployment>,
    /// `--separated-data-dir`.
    separated_data_dir: PathBuf,
}

impl Params {
    fn from_args(args: &E2eArgs) -> Result<Params, Failure> {
        let positive = |name: &str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => Err(Failure::usage(anyhow!("{name} must be at least 1"))),
            n => Ok(n),
        };
        Ok(Params {
            rate: positive("--rate", args.rate, DEFAULT_RATE)?,
            secs: Duration::from_secs(positive("--secs", args.secs, DEFAULT_SECS)?),
            saturation_secs: Duration::from_secs(positive(
                "--saturation-secs",
                args.saturation_secs,
                DEFAULT_SATURATION_SECS,
            )?),
            rounds: usize::try_from(positive("--rounds", args.rounds, DEFAULT_ROUNDS)?)
                .unwrap_or(usize::MAX),
            connections: match positive("--connections", args.connections, DEFAULT_CONNECTIONS)? {
                n if n > 4096 => {
                    return Err(Failure::usage(anyhow!(
                        "--connections {n}: at most 4096 (each is a socket and a task)"
                    )))
                }
                n => n as usize,
            },
            settings: match &args.settings {
                None => Setting::ROUND.to_vec(),
                Some(names) => {
                    let mut wanted = vec![Setting::Off];
                    for name in names {
                        let s = Setting::parse(name).ok_or_else(|| {
                            Failure::usage(anyhow!(
                                "--settings: unknown setting {name:?} (use off, sync, durable, \
                                 async, sampled)"
                            ))
                        })?;
                        wanted.push(s);
                    }
                    Setting::ROUND
                        .into_iter()
                        .filter(|s| wanted.contains(s))
                        .collect()
                }
            },
            pause_loader: args.pause_loader,
            deployments: match args.deployment.unwrap_or(DeploymentArg::Both) {
                DeploymentArg::Colocated => vec![Deployment::Colocated],
                DeploymentArg::Separated => vec![Deployment::Separated],
                DeploymentArg::Both => vec![Deployment::Colocated, Deployment::Separated],
            },
            separated_data_dir: args
                .separated_data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SEPARATED_DATA_DIR)),
        })
    }

    /// Whether the loader is stopped during the fixed-rate phases.
    fn pauses_loader(&self, deployment: Deployment) -> bool {
        deployment == Deployment::Separated || self.pause_loader
    }
}

/// Where a deployment's database keeps its data, as the JSON lines say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DatabaseDir {
    /// A private cluster on the disk (of the scratch or `--dir`).
    Disk,
    /// A private cluster on tmpfs.
    Tmpfs,
    /// `DATABASE_URL`: not ours to place.
    External,
}

impl DatabaseDir {
    fn name(self) -> &'static str {
        match self {
            DatabaseDir::Disk => "disk",
            DatabaseDir::Tmpfs => "tmpfs",
            DatabaseDir::External => "external",
        }
    }
}

/// An error naming `path` unless it is on tmpfs: the separated deployment
/// relies on the database's flushes costing nothing.
fn check_tmpfs(path: &Path) -> anyhow::Result<()> {
    let st = rustix::fs::statfs(path).with_context(|| {
        format!(
            "--separated-data-dir {}: cannot statfs it (it must be an existing tmpfs directory)",
            path.display()
        )
    })?;
    if st.f_type as u64 != TMPFS_MAGIC {
        return Err(anyhow!(
            "--separated-data-dir {} is not on tmpfs (filesystem type {:#x}): the separated \
             deployment needs the database's flushes to cost nothing; give a tmpfs directory \
             such as /dev/shm, or --deployment colocated",
            path.display(),
            st.f_type as u64
        ));
    }
    Ok(())
}

/// What stays the same across every case of one deployment.
struct Bench {
    params: Params,
    deployment: Deployment,
    database_url: String,
    exe: PathBuf,
    scratch: PathBuf,
    /// Makes streams and request ids unique when `DATABASE_URL` is reused.
    nonce: String,
    /// The service's runtime (and the audit log's tasks).
    service: tokio::runtime::Runtime,
    /// The load generator's runtime, driven from the main thread, which also
    /// polls PostgreSQL between phases.
    client: tokio::runtime::Runtime,
}

pub fn run(args: E2eArgs, json: bool, dir: Option<PathBuf>) -> CmdResult {
    let params = Params::from_args(&args)?;
    let external_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty());
    // Refused before anything starts, not after the colocated half of the run.
    if external_url.is_none() && params.deployments.contains(&Deployment::Separated) {
        check_tmpfs(&params.separated_data_dir).map_err(Failure::usage)?;
    }
    let scratch = match &dir {
        Some(d) => tempfile::Builder::new()
            .prefix("auditwal-e2e-")
            .tempdir_in(d),
        None => tempfile::Builder::new().prefix("auditwal-e2e-").tempdir(),
    }
    .context("cannot create the scratch directory (give another with --dir)")?;
    warn_if_tmpfs(scratch.path());
    let exe = std::env::current_exe().context("cannot find the auditwal binary for the loader")?;
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    let service = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("e2e-service")
        .enable_all()
        .build()
        .context("cannot start the service's runtime")?;
    remove_scratch_on_signal(&service, scratch.path());

    let per_case = WARMUP * 2 + params.secs + params.saturation_secs;
    eprintln!(
        "bench e2e: {} deployment(s) ({}), {} rounds × {} settings each; per setting {} req/s \
         for {:?} then saturation for {:?}, each after {WARMUP:?} of warm-up, {} connections; \
         about {} s in all. Figures are medians over the rounds.",
        params.deployments.len(),
        params
            .deployments
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", "),
        params.rounds,
        params.settings.len(),
        params.rate,
        params.secs,
        params.saturation_secs,
        params.connections,
        (per_case.as_secs() + 1)
            * (params.settings.len() * params.rounds * params.deployments.len()) as u64
    );
    let mut bench = Bench {
        params,
        deployment: Deployment::Colocated,
        database_url: String::new(),
        exe,
        scratch: scratch.path().to_path_buf(),
        nonce: format!("{:08x}", rand::random::<u32>()),
        service,
        client,
    };
    let mut results = Vec::new();
    for deployment in bench.params.deployments.clone() {
        let (cluster, database_url, database_dir) = match &external_url {
            Some(url) => (None, url.clone(), DatabaseDir::External),
            None => {
                let (base_dir, database_dir) = match deployment {
                    Deployment::Colocated => (dir.clone(), DatabaseDir::Disk),
                    Deployment::Separated => (
                        Some(bench.params.separated_data_dir.clone()),
                        DatabaseDir::Tmpfs,
                    ),
                };
                let cluster = Cluster::start(ClusterOptions {
                    base_dir,
                    ..ClusterOptions::default()
                })
                .map_err(|e| match e {
                    e @ auditwal_test_support::ClusterError::NotInstalled => {
                        Failure::usage(anyhow!(e))
                    }
                    e => Failure::runtime(anyhow!(e).context("starting the private PostgreSQL")),
                })?;
                let url = cluster.url();
                (Some(cluster), url, database_dir)
            }
        };
        eprintln!(
            "bench e2e: deployment {}: {}; the loader {}",
            deployment.name(),
            match (&cluster, database_dir) {
                (Some(c), DatabaseDir::Tmpfs) => format!(
                    "private PostgreSQL (fsync on) on 127.0.0.1:{}, its data directory on tmpfs \
                     under {}",
                    c.port(),
                    bench.params.separated_data_dir.display()
                ),
                (Some(c), _) => format!(
                    "private PostgreSQL (fsync on) on 127.0.0.1:{}, its data directory on disk",
                    c.port()
                ),
                (None, _) => "PostgreSQL at DATABASE_URL (its data directory is not ours: on \
                              whatever disk it has)"
                    .to_string(),
            },
            if bench.params.pauses_loader(deployment) {
                "paused (SIGSTOP) during each fixed-rate phase"
            } else {
                "running throughout"
            }
        );
        bench.client.block_on(migrate(&database_url))?;
        bench.deployment = deployment;
        bench.database_url = database_url;
        let mut runs: Vec<Vec<SettingRun>> = Setting::REPORT.iter().map(|_| Vec::new()).collect();
        for round in 0..bench.params.rounds {
            for &setting in &bench.params.settings {
                let run = run_setting(&bench, setting, round)?;
                eprintln!(
                    "bench e2e: {} round {} {:<8} {}",
                    deployment.name(),
                    round + 1,
                    setting.name(),
                    run.summary()
                );
                runs[setting.index()].push(run);
            }
        }
        results.extend(summarize(&runs, &bench.params, deployment, database_dir));
        drop(cluster);
    }
    let verdict = verdict(&results, &bench.params);
    drop(bench);
    report(&results, json);
    if json {
        eprintln!("{verdict}");
    } else {
        println!("\nEach figure is the median over the rounds of that figure.\n{verdict}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(url: &str) -> Result<(), Failure> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .context("cannot connect to PostgreSQL (check DATABASE_URL)")?;
    auditwal::pg::migrate(&pool)
        .await
        .context("applying the migrations")?;
    pool.close().await;
    Ok(())
}

/// fsync on tmpfs returns at once: durable and the loader's commits would look
/// free. Say so rather than report figures that mean nothing.
fn warn_if_tmpfs(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        if let Ok(st) = rustix::fs::statfs(path) {
            if st.f_type as u64 == TMPFS_MAGIC {
                eprintln!(
                    "bench e2e: WARNING: {} is on tmpfs: WAL fsyncs cost nothing there; \
                     use --dir on a real disk for honest durable figures",
                    path.display()
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

/// Ended by SIGINT or SIGTERM, the bench would run no destructors and leave
/// its scratch directory (the WAL segments of the setting under way) behind:
/// this removes it and exits with 128 + the signal's number. The loader ends
/// with the bench (its parent-death signal) and the private cluster's guardian
/// stops and removes the cluster.
pub(super) fn remove_scratch_on_signal(rt: &tokio::runtime::Runtime, scratch: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    });
    let (mut int, mut term) = match streams {
        Ok(s) => s,
        Err(e) => {
            eprintln!("auditwal bench: cannot watch for SIGINT/SIGTERM ({e}); a signal leaves the scratch directory behind");
            return;
        }
    };
    let scratch = scratch.to_path_buf();
    rt.spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 128 + 2,
            _ = term.recv() => 128 + 15,
        };
        let _ = std::fs::remove_dir_all(&scratch);
        std::process::exit(code);
    });
}

/// What one phase of one setting in one round measured.
struct Phase {
    run: RunResult,
    /// Last response → checkpoint covering the last appended LSN (WAL settings).
    loader_lag: Option<Duration>,
    /// Rows that reached the table during this phase (warm-up included).
    rows: Option<u64>,
    /// Events recorded per WAL fsync during the phase (WAL settings).
    events_per_fsync: Option<f64>,
    /// Events kept / requests answered (sampled).
    kept_fraction: Option<f64>,
    /// CPU time per answered request, by whom (set after `settle`).
    cpu: Option<CpuPerRequest>,
}

/// CPU time per answered request of one phase (warm-up included), in µs: the
/// service's runtime threads (request handling, and the audit call made in it),
/// the audit log's own threads (WAL flusher, segment preparation) and the loader
/// process, counted until the loader has caught up. PostgreSQL's is not counted.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerRequest {
    service_us: f64,
    wal_threads_us: f64,
    loader_us: f64,
}

/// Each task's CPU time so far, in ns, from the schedstat files of /proc:
/// (pid, tid) → (thread name, ns). Keyed by task so that a thread which ends
/// during a phase (an idle blocking-pool thread, say) only loses its own
/// share of the phase instead of taking its whole lifetime off the total.
#[derive(Debug, Clone, Default)]
struct CpuSnapshot(HashMap<(u32, u32), (String, u64)>);

impl CpuSnapshot {
    fn take(loader_pid: Option<u32>) -> CpuSnapshot {
        let mut tasks = HashMap::new();
        for pid in std::iter::once(std::process::id()).chain(loader_pid) {
            let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for path in entries.filter_map(|e| Some(e.ok()?.path())) {
                // A task that ends between the listing and the reads is skipped.
                let read = || -> Option<(u32, String, u64)> {
                    let tid = path.file_name()?.to_str()?.parse().ok()?;
                    let name = std::fs::read_to_string(path.join("comm")).ok()?;
                    // The first field of schedstat is the time run, in ns.
                    let stat = std::fs::read_to_string(path.join("schedstat")).ok()?;
                    let ns = stat.split_whitespace().next()?.parse().ok()?;
                    Some((tid, name.trim_end().to_string(), ns))
                };
                if let Some((tid, name, ns)) = read() {
                    tasks.insert((pid, tid), (name, ns));
                }
            }
        }
        CpuSnapshot(tasks)
    }

    /// CPU run since `before` by the tasks alive now, per request: the
    /// service's runtime threads and the log's threads of this process, and
    /// every thread of the loader.
    fn per_request(&self, before: &CpuSnapshot, requests: u64) -> CpuPerRequest {
        let mut ns = [0u64; 3];
        for (task, (name, now)) in &self.0 {
            let ran = now.saturating_sub(before.0.get(task).map_or(0, |(_, b)| *b));
            let slot = if task.0 != std::process::id() {
                2
            } else if name == "e2e-service" {
                0
            } else if name.starts_with("wal-") {
                1
            } else {
                continue;
            };
            ns[slot] += ran;
        }
        let per = |ns: u64| ns as f64 / 1000.0 / requests.max(1) as f64;
        CpuPerRequest {
            service_us: per(ns[0]),
            wal_threads_us: per(ns[1]),
            loader_us: per(ns[2]),
        }
    }
}

struct SettingRun {
    fixed: Phase,
    saturated: Phase,
}

impl SettingRun {
    fn summary(&self) -> String {
        let p99 = |r: &RunResult| {
            let mut v = r.latencies_ns.clone();
            v.sort_unstable();
            super::bench::percentile(&v, 99.0) as f64 / 1000.0
        };
        let lag = |p: &Phase| {
            p.loader_lag.map_or_else(String::new, |l| {
                format!(", loader lag {} ms", l.as_millis())
            })
        };
        format!(
            "fixed {:.0} req/s p99 {:.0} µs{}; saturated {:.0} req/s p99 {:.0} µs{}",
            self.fixed.run.per_sec(),
            p99(&self.fixed.run),
            lag(&self.fixed),
            self.saturated.run.per_sec(),
            p99(&self.saturated.run),
            lag(&self.saturated),
        )
    }
}

/// The service on the service runtime, until [`Service::stop`].
struct Service {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Service {
    fn start(rt: &tokio::runtime::Runtime, state: Arc<AppState>) -> Result<Service, Failure> {
        // Bound inside the service runtime so its socket lives on that reactor.
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("cannot bind the service to a loopback port")?;
        let addr = listener
            .local_addr()
            .context("cannot read the service's address")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = shortener_app::router(state).into_make_service_with_connect_info::<SocketAddr>();
        let task = rt.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Service { addr, stop, task })
    }

    fn stop(self, rt: &tokio::runtime::Runtime) -> Result<(), Failure> {
        let _ = self.stop.send(());
        // The load generator has dropped its connections; graceful shutdown
        // only has to notice.
        let task = self.task;
        // The timer must be created inside the runtime, hence the async block.
        match rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await }) {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(Failure::runtime(anyhow!("the service failed: {e}"))),
            Ok(Err(e)) => Err(Failure::runtime(anyhow!("the service task failed: {e}"))),
            Err(_) => Err(Failure::runtime(anyhow!(
                "the service did not shut down within 10 s"
            ))),
        }
    }
}

/// Makes the child that `cmd` starts get SIGTERM when the thread that spawns
/// it ends: a bench ended by a signal runs no destructors, and without this its
/// children would go on running. Kept across exec (as long as the program is
/// not setuid); spawn from the main thread, which outlives every case.
pub(super) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one prctl call (async-signal-safe, no allocation).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)
        });
    }
}

/// The loader child process; SIGTERM (then SIGKILL) if dropped unstopped.
pub(super) struct LoaderChild {
    child: Option<Child>,
}

impl LoaderChild {
    fn spawn(exe: &Path, wal_dir: &Path, database_url: &str) -> Result<LoaderChild, Failure> {
        LoaderChild::spawn_with(exe, wal_dir, database_url, &[])
    }

    /// [`LoaderChild::spawn`] with more `auditwal load` flags.
    pub(super) fn spawn_with(
        exe: &Path,
        wal_dir: &Path,
        database_url: &str,
        extra_args: &[String],
    ) -> Result<LoaderChild, Failure> {
        // At the CPU priority docs/operations.md's systemd unit gives it
        // (Nice=10): the loader is throughput work sharing the host with the
        // service, and should yield the cores to requests.
        let mut cmd = Command::new("nice");
        cmd.arg(format!("-n{LOADER_NICE}"))
            .arg(exe)
            .args(["load", "--metrics-addr", "off", "--wal-dir"])
            .arg(wal_dir)
            .args(["--database-url", database_url])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the loader ({} load)", exe.display()))?;
        Ok(LoaderChild { child: Some(child) })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the loader (SIGSTOP) until the returned guard is dropped.
    fn pause(&self) -> Result<PausedLoader, Failure> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| Failure::runtime(anyhow!("the loader was already stopped")))?;
        let pid = rustix::process::Pid::from_child(child);
        rustix::process::kill_process(pid, rustix::process::Signal::STOP)
            .context("cannot pause the loader (SIGSTOP)")?;
        Ok(PausedLoader(pid))
    }

    /// An error if the loader has exited (it runs until told to stop).
    pub(super) fn check_running(&mut self) -> Result<(), Failure> {
        let Some(child) = self.child.as_mut() else {
            return Err(Failure::runtime(anyhow!("the loader was already stopped")));
        };
        match child.try_wait().context("waiting for the loader")? {
            None => Ok(()),
            Some(status) => Err(Failure::runtime(anyhow!(
                "the loader exited early ({status}); see its messages above"
            ))),
        }
    }

    /// SIGTERM, then waits up to 15 s for it to exit (SIGKILL after that).
    pub(super) fn stop(mut self) -> Result<ExitStatus, Failure> {
        let Some(child) = self.child.take() else {
            return Err(Failure::runtime(anyhow!("the loader was already stopped")));
        };
        terminate(child, Duration::from_secs(15))
    }
}

/// A loader stopped by [`LoaderChild::pause`]; dropping it sends SIGCONT.
struct PausedLoader(rustix::process::Pid);

impl Drop for PausedLoader {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

fn terminate(mut child: Child, grace: Duration) -> Result<ExitStatus, Failure> {
    let pid = rustix::process::Pid::from_child(&child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    // A paused loader would hold the SIGTERM until it runs again.
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait().context("waiting for the loader")? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::runtime(anyhow!(
                "the loader did not stop within {grace:?} of SIGTERM; killed"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for LoaderChild {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = terminate(child, Duration::from_secs(5));
        }
    }
}

/// The request stream of one setting: `POST /api/links` with a unique
/// `x-request-id` (`<tag>-<n>`) and a unique URL, 1,000 distinct users.
fn requests(addr: SocketAddr, tag: String) -> RequestSource {
    Arc::new(move |n| {
        let body = format!(
            r#"{{"user":"u{}","url":"https://example.com/{tag}/{n}"}}"#,
            n % 1000
        );
        format!(
            "POST /api/links HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nx-request-id: {tag}-{n}\r\nuser-agent: auditwal-bench-e2e\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Where one setting's events go, and how to count them in the table.
struct Sink {
    setting: Setting,
    log: Option<Arc<AuditLog>>,
    stream: String,
    /// Request ids of this setting start with it.
    request_prefix: String,
    /// Answered requests so far (all phases, warm-ups included).
    answered: u64,
    /// Rows in the table after the previous phase.
    rows_before: u64,
}

impl Sink {
    fn stats(&self) -> Option<AuditStats> {
        self.log.as_ref().map(|l| l.stats())
    }

    /// After a phase: the accounting checks, then (WAL settings) waits for the
    /// loader and measures its lag, then counts the rows.
    async fn settle(
        &mut self,
        pg: &mut PgConnection,
        loader: Option<&mut LoaderChild>,
        run: RunResult,
        before: Option<AuditStats>,
    ) -> Result<Phase, Failure> {
        if run.errors > 0 {
            return Err(Failure::runtime(anyhow!(
                "{}: {} of {} requests failed; first: {}",
                self.setting.name(),
                run.errors,
                run.errors + run.ok,
                run.first_error.as_deref().unwrap_or("?")
            )));
        }
        self.answered += run.ok;
        let (Some(mode), Some(stats)) = (self.setting.mode(), self.stats()) else {
            return Ok(Phase {
                run,
                loader_lag: None,
                rows: None,
                events_per_fsync: None,
                kept_fraction: None,
                cpu: None,
            });
        };
        let kept = stats.recorded.get(mode);
        if stats.failed.total() > 0 || stats.rejected > 0 || stats.dropped > 0 {
            return Err(Failure::runtime(anyhow!(
                "{}: the audit log failed {} calls, rejected {}, dropped {} (the service still \
                 answered 201 for fire-and-forget modes): not a valid run",
                self.setting.name(),
                stats.failed.total(),
                stats.rejected,
                stats.dropped
            )));
        }
        if kept + stats.sampled_out != self.answered {
            return Err(Failure::runtime(anyhow!(
                "{}: the service answered {} requests but the audit log recorded {kept} and \
                 sampled out {}",
                self.setting.name(),
                self.answered,
                stats.sampled_out
            )));
        }
        let mut loader_lag = None;
        let mut events_per_fsync = None;
        if let (Some(wal), Some(loader)) = (stats.wal, loader) {
            let last = run.last_response.unwrap_or_else(Instant::now);
            loader_lag = Some(
                self.wait_for_loader(pg, loader, wal.written_lsn, last)
                    .await?,
            );
            if let Some(before_wal) = before.as_ref().and_then(|b| b.wal) {
                let fsyncs = wal.fsyncs.saturating_sub(before_wal.fsyncs);
                let events =
                    kept.saturating_sub(before.as_ref().map_or(0, |b| b.recorded.get(mode)));
                if fsyncs > 0 {
                    events_per_fsync = Some(events as f64 / fsyncs as f64);
                }
            }
        }
        let rows = self.count_rows(pg).await?;
        if rows != kept {
            return Err(Failure::runtime(anyhow!(
                "{}: the table holds {rows} rows of this setting but the log kept {kept} events: \
                 not a valid run",
                self.setting.name()
            )));
        }
        let phase_rows = rows - self.rows_before;
        self.rows_before = rows;
        let kept_fraction = (mode == Mode::Sampled && self.answered > 0)
            .then(|| kept as f64 / self.answered as f64);
        Ok(Phase {
            run,
            loader_lag,
            rows: Some(phase_rows),
            events_per_fsync,
            kept_fraction,
            cpu: None,
        })
    }

    /// Polls the stream's checkpoint until it covers `lsn`; the time from `last`.
    async fn wait_for_loader(
        &self,
        pg: &mut PgConnection,
        loader: &mut LoaderChild,
        lsn: u64,
        last: Instant,
    ) -> Result<Duration, Failure> {
        if lsn == 0 {
            return Ok(Duration::ZERO);
        }
        let deadline = Instant::now() + CATCH_UP_LIMIT;
        let mut polls = 0u64;
        loop {
            let checkpoint = auditwal::loader::checkpoint::read(pg, &self.stream)
                .await
                .context("reading the loader's checkpoint")?
                .map_or(0, |c| c.lsn);
            if checkpoint >= lsn {
                return Ok(Instant::now().saturating_duration_since(last));
            }
            if Instant::now() > deadline {
                return Err(Failure::runtime(anyhow!(
                    "{}: the loader's checkpoint is at LSN {checkpoint}, the log appended up to \
                     {lsn}, {CATCH_UP_LIMIT:?} after the last request: not a valid run",
                    self.setting.name()
                )));
            }
            polls += 1;
            if polls % 50 == 0 {
                loader.check_running()?;
            }
            tokio::time::sleep(CHECKPOINT_POLL).await;
        }
    }

    async fn count_rows(&self, pg: &mut PgConnection) -> Result<u64, Failure> {
        // The request id tells this setting's rows from any other's; the stream
        // (NULL for sync rows) that they came the way the setting says.
        let n: i64 = if self.setting.uses_wal() {
            sqlx::query_scalar(
                "SELECT count(*) FROM audit_events WHERE stream_id = $1 \
                 AND starts_with(request_id, $2)",
            )
            .bind(&self.stream)
            .bind(&self.request_prefix)
            .fetch_one(pg)
            .await
        } else {
            sqlx::query_scalar(
                "SELECT count(*) FROM audit_events WHERE stream_id IS NULL \
                 AND starts_with(request_id, $1)",
            )
            .bind(&self.request_prefix)
            .fetch_one(pg)
            .await
        }
        .context("counting the loaded rows")?;
        Ok(n.max(0) as u64)
    }
}

/// One setting in one round: audit log, loader, service, both phases, checks.
fn run_setting(bench: &Bench, setting: Setting, round: usize) -> Result<SettingRun, Failure> {
    let p = &bench.params;
    let tag = format!(
        "{}-{}-{}-{}",
        bench.nonce,
        bench.deployment.name(),
        setting.name(),
        round + 1
    );
    let stream = format!("e2e-{tag}");
    let wal_dir = bench.scratch.join(&tag);

    let log = match setting.mode() {
        None => None,
        Some(mode) => {
            let builder = Config::builder().mode(mode).stream(stream.clone());
            let builder = match setting {
                Setting::Sync => builder
                    .database_url(bench.database_url.clone())
                    .sync_migrate(false),
                Setting::Sampled => builder
                    .wal_dir(wal_dir.clone())
                    .sample_rate(SAMPLE_RATE)
                    .sample_key(SampleKey::RequestId),
                _ => builder.wal_dir(wal_dir.clone()),
            };
            let config = builder
                .build()
                .with_context(|| format!("configuring the {} audit log", setting.name()))?;
            let log = bench
                .service
                .block_on(AuditLog::open(config))
                .with_context(|| format!("opening the {} audit log", setting.name()))?;
            Some(Arc::new(log))
        }
    };
    // The stream directory exists now (open created it), so the loader finds it.
    let mut loader = match setting.uses_wal() {
        true => Some(LoaderChild::spawn(
            &bench.exe,
            &wal_dir,
            &bench.database_url,
        )?),
        false => None,
    };
    let user_audit = setting.mode().map_or(UserAudit::Off, UserAudit::Mode);
    let service = Service::start(&bench.service, AppState::new(log.clone(), user_audit))?;
    let mut sink = Sink {
        setting,
        log: log.clone(),
        stream,
        request_prefix: format!("{tag}-"),
        answered: 0,
        rows_before: 0,
    };
    let source = requests(service.addr, tag);
    let ids = Arc::new(AtomicU64::new(0));

    let phases = bench.client.block_on(async {
        let mut pg = PgConnection::connect(&bench.database_url)
            .await
            .context("connecting to PostgreSQL to watch the loader")?;
        super::bench::quiesce(&mut pg).await?;
        let loader_pid = loader.as_ref().and_then(|l| l.pid());
        let cpu_before = CpuSnapshot::take(loader_pid);
        let before = sink.stats();
        // Separated (or --pause-loader): stopped for the phase; the guard
        // resumes it (also on an error) before settle waits for it to catch up.
        let paused = match (p.pauses_loader(bench.deployment), loader.as_ref()) {
            (true, Some(l)) => Some(l.pause()?),
            _ => None,
        };
        let run = loadgen::open_loop(
            service.addr,
            source.clone(),
            ids.clone(),
            p.rate as f64,
            p.connections,
            WARMUP,
            p.secs,
        )
        .await
        .map_err(|e| Failure::runtime(anyhow!("{} at the fixed rate: {e}", setting.name())))?;
        drop(paused);
        let mut fixed = sink.settle(&mut pg, loader.as_mut(), run, before).await?;
        fixed.cpu = Some(CpuSnapshot::take(loader_pid).per_request(&cpu_before, fixed.run.ok));

        let before = sink.stats();
        let run = loadgen::closed_loop(
            service.addr,
            source.clone(),
            ids.clone(),
            p.connections,
            WARMUP,
            p.saturation_secs,
        )
        .await
        .map_err(|e| Failure::runtime(anyhow!("{} at saturation: {e}", setting.name())))?;
        let saturated = sink.settle(&mut pg, loader.as_mut(), run, before).await?;
        let _ = pg.close().await;
        Ok::<_, Failure>(SettingRun { fixed, saturated })
    })?;

    service.stop(&bench.service)?;
    if let Some(log) = &log {
        bench
            .service
            .block_on(log.close())
            .with_context(|| format!("closing the {} audit log", setting.name()))?;
    }
    if let Some(loader) = loader.take() {
        let status = loader.stop()?;
        if !status.success() {
            return Err(Failure::runtime(anyhow!(
                "{}: the loader exited with {status} after SIGTERM (want 0)",
                setting.name()
            )));
        }
    }
    // Segments of finished settings would only fill the disk.
    let _ = std::fs::remove_dir_all(&wal_dir);
    Ok(phases)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One case (a setting's fixed-rate or saturated phases over the rounds) as a
/// bench line: each figure the median over rounds.
fn summarize_case(
    case: String,
    phases: &[&Phase],
    target_rate: Option<u64>,
    connections: usize,
) -> BenchResult {
    let per_round: Vec<BenchResult> = phases
        .iter()
        .map(|ph| {
            let mut lat = ph.run.latencies_ns.clone();
            BenchResult::new(
                "e2e",
                case.clone(),
                lat.len() as u64,
                ph.run.window.as_secs_f64(),
            )
            .with_latencies_ns(&mut lat)
        })
        .collect();
    let mut out = median_of_rounds("e2e", case, &per_round);
    let x = &mut out.extra;
    x.insert("rounds".into(), serde_json::json!(per_round.len()));
    x.insert("connections".into(), serde_json::json!(connections));
    if let Some(rate) = target_rate {
        x.insert("target_rate".into(), serde_json::json!(rate));
        let delays: Vec<f64> = phases
            .iter()
            .map(|ph| {
                let mut d = ph.run.send_delay_ns.clone();
                d.sort_unstable();
                super::bench::percentile(&d, 99.0) as f64 / 1000.0
            })
            .collect();
        if let Some(d) = median(delays) {
            x.insert("send_delay_p99_us".into(), serde_json::json!(round3(d)));
        }
    }
    x.insert(
        "p99_us_runs".into(),
        serde_json::json!(per_round
            .iter()
            .filter_map(|r| r.p99_us.map(round3))
            .collect::<Vec<_>>()),
    );
    let lags: Vec<f64> = phases
        .iter()
        .filter_map(|ph| ph.loader_lag.map(|l| l.as_secs_f64() * 1000.0))
        .collect();
    if let Some(lag) = median(lags) {
        x.insert("loader_lag_ms".into(), serde_json::json!(round3(lag)));
    }
    let rows: Vec<u64> = phases.iter().filter_map(|ph| ph.rows).collect();
    if !rows.is_empty() {
        x.insert(
            "rows_loaded".into(),
            serde_json::json!(rows.iter().sum::<u64>()),
        );
    }
    if let Some(e) = median(phases.iter().filter_map(|ph| ph.events_per_fsync).collect()) {
        x.insert("events_per_fsync".into(), serde_json::json!(round3(e)));
    }
    if let Some(k) = median(phases.iter().filter_map(|ph| ph.kept_fraction).collect()) {
        x.insert("kept_fraction".into(), serde_json::json!(round3(k)));
    }
    let cpu: Vec<CpuPerRequest> = phases.iter().filter_map(|ph| ph.cpu).collect();
    let mut cpu_median = |key: &str, field: fn(&CpuPerRequest) -> f64| {
        if let Some(v) = median(cpu.iter().map(field).collect()) {
            x.insert(key.into(), serde_json::json!(round3(v)));
        }
    };
    cpu_median("service_cpu_us_per_request", |c| c.service_us);
    cpu_median("wal_threads_cpu_us_per_request", |c| c.wal_threads_us);
    cpu_median("loader_cpu_us_per_request", |c| c.loader_us);
    out
}

/// Adds `baseline`, `ratio` and `p99_vs_off` to `r` against `base`.
fn against(r: BenchResult, base: &BenchResult) -> BenchResult {
    let mut r = r.against(base);
    if let (Some(a), Some(b)) = (r.p99_us, base.p99_us) {
        if b > 0.0 {
            r.extra
                .insert("p99_vs_off".into(), serde_json::json!(round3(a / b)));
        }
    }
    if let Some(ratio) = r.ratio {
        r.ratio = Some(round3(ratio));
    }
    r
}

/// One deployment's lines: fixed-rate cases, then saturated ones, each against
/// the same deployment's `off`.
fn summarize(
    runs: &[Vec<SettingRun>],
    params: &Params,
    deployment: Deployment,
    database_dir: DatabaseDir,
) -> Vec<BenchResult> {
    let mut fixed = Vec::new();
    let mut saturated = Vec::new();
    for setting in Setting::REPORT {
        let rs = &runs[setting.index()];
        if rs.is_empty() {
            continue;
        }
        let f: Vec<&Phase> = rs.iter().map(|r| &r.fixed).collect();
        let s: Vec<&Phase> = rs.iter().map(|r| &r.saturated).collect();
        let mut case = summarize_case(
            deployment.case(setting.name()),
            &f,
            Some(params.rate),
            params.connections,
        );
        if params.pauses_loader(deployment) && setting.uses_wal() {
            case.extra
                .insert("loader_paused".into(), serde_json::Value::Bool(true));
        }
        fixed.push(case);
        saturated.push(summarize_case(
            deployment.case(&format!("{}-saturated", setting.name())),
            &s,
            None,
            params.connections,
        ));
    }
    for r in fixed.iter_mut().chain(saturated.iter_mut()) {
        r.extra
            .insert("deployment".into(), serde_json::json!(deployment.name()));
        r.extra.insert(
            "database_dir".into(),
            serde_json::json!(database_dir.name()),
        );
    }
    let mut out = Vec::new();
    for group in [fixed, saturated] {
        let mut it = group.into_iter();
        let Some(off) = it.next() else { continue };
        let rest: Vec<BenchResult> = it.map(|r| against(r, &off)).collect();
        out.push(off);
        out.extend(rest);
    }
    out
}

/// The issue's targets, checked against this run's figures. The async target
/// is judged on the separated deployment (the service's own cost), and only
/// when its loader was paused and its database not on this host's disk flushes.
fn verdict(results: &[BenchResult], params: &Params) -> String {
    let find = |deployment: Deployment, case: &str| {
        let name = deployment.case(case);
        results.iter().find(|r| r.case == name)
    };
    let figure = |r: &BenchResult, key: &str| r.extra.get(key).and_then(serde_json::Value::as_f64);
    let p99_vs_off = |r: &BenchResult| figure(r, "p99_vs_off");
    let mut lines = Vec::new();
    for &deployment in &params.deployments {
        let d = deployment.name();
        if let Some(v) = find(deployment, "async").and_then(p99_vs_off) {
            let cpu = match (find(deployment, "async"), find(deployment, "off")) {
                (Some(a), Some(o)) => match (
                    figure(a, "service_cpu_us_per_request"),
                    figure(o, "service_cpu_us_per_request"),
                ) {
                    (Some(a), Some(o)) if o > 0.0 => {
                        format!("; service CPU per request {:.3} × off", a / o)
                    }
                    _ => String::new(),
                },
                _ => String::new(),
            };
            lines.push(match deployment {
                Deployment::Separated => format!(
                    "{d} (loader paused in the fixed-rate phase, database on tmpfs or not \
                     ours): target async p99 ≤ {ASYNC_P99_TARGET} × off at the fixed rate: \
                     {v:.3} — {}{cpu}",
                    if v <= ASYNC_P99_TARGET {
                        "met"
                    } else {
                        "MISSED"
                    }
                ),
                Deployment::Colocated => format!(
                    "{d} (loader{} and database on this host): async p99 {v:.3} × off at the \
                     fixed rate{cpu} (the target is judged on the separated deployment)",
                    if params.pause_loader {
                        " paused (--pause-loader)"
                    } else {
                        ""
                    }
                ),
            });
        }
        if let (Some(s), Some(du), Some(a)) = (
            find(deployment, "sync").and_then(p99_vs_off),
            find(deployment, "durable").and_then(p99_vs_off),
            find(deployment, "async").and_then(p99_vs_off),
        ) {
            lines.push(format!(
                "{d}: p99 over off at the fixed rate: sync {s:.2}×, durable {du:.2}×, async \
                 {a:.2}× (durable between async and sync: {})",
                if a <= du && du <= s { "yes" } else { "no" }
            ));
        }
        let saturated: Vec<String> = Setting::REPORT[1..]
            .iter()
            .filter_map(|s| {
                let r = find(deployment, &format!("{}-saturated", s.name()))?;
                Some(format!("{} {:.2}", s.name(), r.ratio?))
            })
            .collect();
        if !saturated.is_empty() {
            lines.push(format!(
                "{d}: requests/s at saturation as a ratio to off: {}",
                saturated.join(", ")
            ));
        }
        if let Some(du) = find(deployment, "durable-saturated") {
            if let Some(e) = figure(du, "events_per_fsync") {
                lines.push(format!(
                    "{d}: durable at saturation: {:.0} req/s, {e:.1} events per WAL fsync \
                     (group commit)",
                    du.events_per_sec
                ));
            }
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(latencies_us: &[u64], lag_ms: Option<u64>, rows: Option<u64>) -> Phase {
        Phase {
            run: RunResult {
                latencies_ns: latencies_us.iter().map(|l| l * 1000).collect(),
                send_delay_ns: vec![1000; latencies_us.len()],
                window: Duration::from_secs(1),
                ok: latencies_us.len() as u64,
                ..RunResult::default()
            },
            loader_lag: lag_ms.map(Duration::from_millis),
            rows,
            events_per_fsync: None,
            kept_fraction: None,
            cpu: None,
        }
    }

    /// A thread named like the service runtime's that spins for `ms`, then
    /// stays alive (an ended thread is no longer listed under /proc) until
    /// the returned closure is called, which ends and joins it.
    fn busy_service_thread(ms: u64) -> impl FnOnce() {
        let (spun_tx, spun_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("e2e-service".into())
            .spawn(move || {
                // Spin until this thread has had `ms` of CPU (not of wall
                // time: on a loaded machine that can be a fraction of it).
                let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
                let start = cpu();
                let want = Duration::from_millis(ms);
                while Duration::try_from(cpu() - start).unwrap_or_default() < want {
                    std::hint::black_box(0u64);
                }
                spun_tx.send(()).expect("report");
                let _ = end_rx.recv();
            })
            .expect("spawn");
        spun_rx.recv().expect("the thread spun");
        move || {
            end_tx.send(()).expect("end");
            thread.join().expect("join");
        }
    }

    /// The scheduler state letter of `pid` (`T` when stopped), from /proc.
    fn proc_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // "pid (comm) S ...": the state follows the last ')'.
        let after = &stat[stat.rfind(')').expect("comm") + 1..];
        after.trim_start().chars().next().expect("state")
    }

    /// Waits up to 5 s for `pid`'s state to satisfy `want` (signals are
    /// delivered asynchronously).
    fn wait_for_state(pid: u32, what: &str, want: impl Fn(char) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !want(proc_state(pid)) {
            assert!(
                Instant::now() < deadline,
                "{what}: state {}",
                proc_state(pid)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_paused_loader_stays_stopped_until_the_guard_goes_and_still_ends_on_sigterm() {
        let child = Command::new("sleep").arg("60").spawn().expect("sleep");
        let loader = LoaderChild { child: Some(child) };
        let pid = loader.pid().expect("pid");

        let Ok(paused) = loader.pause() else {
            panic!("SIGSTOP failed")
        };
        wait_for_state(pid, "not stopped after SIGSTOP", |s| s == 'T');
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(proc_state(pid), 'T', "stopped while the guard lives");
        drop(paused);
        wait_for_state(pid, "still stopped after SIGCONT", |s| s != 'T');

        // Paused again and never resumed: stop() must still end it promptly
        // (a stopped process holds SIGTERM until it runs).
        let Ok(paused) = loader.pause() else {
            panic!("SIGSTOP failed")
        };
        std::mem::forget(paused);
        wait_for_state(pid, "not stopped after SIGSTOP", |s| s == 'T');
        let started = Instant::now();
        let Ok(status) = loader.stop() else {
            panic!("the paused child did not stop")
        };
        assert!(!status.success(), "sleep 60 ended by SIGTERM: {status}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn cpu_accounting_charges_a_busy_service_thread_to_the_service_not_the_wal_threads() {
        let before = CpuSnapshot::take(None);
        let end = busy_service_thread(30);
        let cpu = CpuSnapshot::take(None).per_request(&before, 1);
        end();
        assert!(cpu.service_us >= 20_000.0, "30 ms of spinning: {cpu:?}");
        // Other tests of this binary may run WAL threads meanwhile, but none
        // of them spins for 20 ms.
        assert!(cpu.wal_threads_us < 20_000.0, "{cpu:?}");
    }

    #[test]
    fn a_thread_that_ends_during_a_phase_takes_nothing_off_the_others() {
        // Alive at the first snapshot with 30 ms behind it, gone at the
        // second: a plain sum over threads would come out negative.
        let end_old = busy_service_thread(30);
        let before = CpuSnapshot::take(None);
        end_old();
        let end = busy_service_thread(15);
        let cpu = CpuSnapshot::take(None).per_request(&before, 1);
        end();
        assert!(cpu.service_us >= 10_000.0, "15 ms of spinning: {cpu:?}");
    }

    #[test]
    fn each_figure_of_a_case_is_the_median_over_rounds() {
        let a = phase(&[100; 10], Some(30), Some(10));
        let b = phase(&[300; 30], Some(10), Some(30));
        let c = phase(&[200; 20], Some(20), Some(20));
        let r = summarize_case("async".into(), &[&a, &b, &c], Some(1000), 8);
        assert_eq!(r.events, 20, "the median round by throughput");
        assert_eq!(r.p99_us, Some(200.0));
        assert_eq!(r.extra["loader_lag_ms"], serde_json::json!(20.0));
        assert_eq!(
            r.extra["rows_loaded"],
            serde_json::json!(60),
            "rows are summed"
        );
        assert_eq!(
            r.extra["p99_us_runs"],
            serde_json::json!([100.0, 300.0, 200.0])
        );
        assert_eq!(r.extra["target_rate"], serde_json::json!(1000));
    }

    /// One round of off (100 µs), async (104 µs, or `async_us`) and sync
    /// (500 µs), fixed and saturated alike.
    fn runs_of(async_us: u64) -> Vec<Vec<SettingRun>> {
        let run = |us: u64, lag: Option<u64>| {
            let mut fixed = phase(&[us; 10], lag, Some(10));
            fixed.cpu = Some(CpuPerRequest {
                service_us: us as f64 / 10.0,
                ..CpuPerRequest::default()
            });
            SettingRun {
                fixed,
                saturated: phase(&vec![us; (1000 / us) as usize], lag, Some(10)),
            }
        };
        let mut runs: Vec<Vec<SettingRun>> = Setting::REPORT.iter().map(|_| Vec::new()).collect();
        runs[Setting::Off.index()].push(run(100, None));
        runs[Setting::Async.index()].push(run(async_us, Some(5)));
        runs[Setting::Sync.index()].push(run(500, None));
        runs
    }

    /// The result lines of `runs_of(async_us)` on a colocated deployment (its
    /// database on disk) and then on a separated one (its database on `dir`).
    fn on_both_deployments(async_us: u64, p: &Params, dir: DatabaseDir) -> Vec<BenchResult> {
        let mut results = summarize(
            &runs_of(async_us),
            p,
            Deployment::Colocated,
            DatabaseDir::Disk,
        );
        results.extend(summarize(&runs_of(async_us), p, Deployment::Separated, dir));
        results
    }

    fn params_of(args: E2eArgs) -> Params {
        let Ok(params) = Params::from_args(&args) else {
            panic!("valid arguments refused: {args:?}")
        };
        params
    }

    /// Parses `bench e2e` flags as the command line does.
    fn parse(argv: &[&str]) -> Result<E2eArgs, clap::Error> {
        use clap::{Args, FromArgMatches};
        let cmd = E2eArgs::augment_args(clap::Command::new("e2e").no_binary_name(true));
        E2eArgs::from_arg_matches(&cmd.try_get_matches_from(argv)?)
    }

    #[test]
    fn both_deployments_run_by_default_and_only_separated_pauses_the_loader() {
        let p = params_of(E2eArgs::default());
        assert_eq!(
            p.deployments,
            [Deployment::Colocated, Deployment::Separated]
        );
        assert_eq!(p.separated_data_dir, Path::new("/dev/shm"));
        assert!(!p.pauses_loader(Deployment::Colocated));
        assert!(p.pauses_loader(Deployment::Separated));

        let Ok(args) = parse(&[
            "--deployment",
            "separated",
            "--separated-data-dir",
            "/mnt/ram",
        ]) else {
            panic!("valid flags refused")
        };
        assert_eq!(args.first_given(), Some("--deployment"));
        let p = params_of(args);
        assert_eq!(p.deployments, [Deployment::Separated]);
        assert_eq!(p.separated_data_dir, Path::new("/mnt/ram"));

        let Ok(args) = parse(&["--deployment", "colocated", "--pause-loader"]) else {
            panic!("valid flags refused")
        };
        let p = params_of(args);
        assert_eq!(p.deployments, [Deployment::Colocated]);
        assert!(p.pauses_loader(Deployment::Colocated), "--pause-loader");

        assert!(parse(&["--deployment", "remote"]).is_err());
        let Ok(args) = parse(&["--separated-data-dir", "/dev/shm"]) else {
            panic!("valid flags refused")
        };
        assert_eq!(args.first_given(), Some("--separated-data-dir"));
    }

    #[test]
    fn the_separated_data_dir_must_be_tmpfs_and_the_refusal_names_it() {
        // /dev/shm is tmpfs on every Linux this runs on; the worktree is not.
        assert!(check_tmpfs(Path::new("/dev/shm")).is_ok());
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Err(e) = check_tmpfs(here) else {
            panic!("{} taken for tmpfs", here.display())
        };
        let msg = format!("{e:#}");
        assert!(msg.contains(&here.display().to_string()), "{msg}");
        assert!(msg.contains("not on tmpfs"), "{msg}");
        let missing = here.join("no-such-dir");
        let Err(e) = check_tmpfs(&missing) else {
            panic!("a missing directory accepted")
        };
        assert!(
            format!("{e:#}").contains(&missing.display().to_string()),
            "{e:#}"
        );
    }

    #[test]
    fn each_deployments_lines_say_which_it_is_and_compare_with_its_own_off() {
        let p = params_of(E2eArgs {
            settings: Some(vec!["async".into(), "sync".into()]),
            ..E2eArgs::default()
        });
        let results = on_both_deployments(104, &p, DatabaseDir::Tmpfs);
        let line = |case: &str| -> serde_json::Value {
            let r = results.iter().find(|r| r.case == case).expect(case);
            serde_json::to_value(r).expect("a JSON line")
        };
        for (suffix, deployment, dir) in [
            ("", "colocated", "disk"),
            ("-separated", "separated", "tmpfs"),
        ] {
            for base in ["off", "async", "sync", "off-saturated", "async-saturated"] {
                let v = line(&format!("{base}{suffix}"));
                for key in [
                    "bench",
                    "case",
                    "events",
                    "secs",
                    "events_per_sec",
                    "p50_us",
                    "p99_us",
                    "p999_us",
                ] {
                    assert!(v.get(key).is_some(), "{base}{suffix}: no {key}");
                }
                assert_eq!(v["deployment"], deployment, "{base}{suffix}");
                assert_eq!(v["database_dir"], dir, "{base}{suffix}");
            }
            let off = format!("off{suffix}");
            let off_saturated = format!("off-saturated{suffix}");
            let a = line(&format!("async{suffix}"));
            assert_eq!(a["baseline"], serde_json::json!(off));
            assert_eq!(a["p99_vs_off"], serde_json::json!(1.04));
            // Saturation: 10 requests a second for off, 9 for async.
            let s = line(&format!("async-saturated{suffix}"));
            assert_eq!(s["baseline"], serde_json::json!(off_saturated));
            assert_eq!(s["ratio"], serde_json::json!(0.9));
        }
        let paused = |case: &str| line(case).get("loader_paused").cloned();
        assert_eq!(paused("async-separated"), Some(serde_json::json!(true)));
        for unpaused in [
            "async",
            "off-separated",
            "sync-separated",
            "async-saturated-separated",
        ] {
            assert_eq!(paused(unpaused), None, "{unpaused}");
        }

        let v = verdict(&results, &p);
        let judged: Vec<&str> = v.lines().filter(|l| l.contains("— ")).collect();
        assert_eq!(judged.len(), 1, "{v}");
        assert!(judged[0].starts_with("separated"), "{v}");
        assert!(judged[0].contains("1.040 — met"), "{v}");
        assert!(
            judged[0].contains("service CPU per request 1.040 × off"),
            "{v}"
        );
        assert!(
            v.contains(
                "separated: requests/s at saturation as a ratio to off: sync 0.20, async 0.90"
            ),
            "{v}"
        );
        assert!(
            v.contains(
                "colocated: requests/s at saturation as a ratio to off: sync 0.20, async 0.90"
            ),
            "{v}"
        );
    }

    #[test]
    fn the_async_target_is_missed_on_separated_and_only_reported_on_colocated() {
        let p = params_of(E2eArgs {
            settings: Some(vec!["async".into()]),
            pause_loader: true,
            ..E2eArgs::default()
        });
        let results = on_both_deployments(125, &p, DatabaseDir::External);
        let paused = results
            .iter()
            .find(|r| r.case == "async")
            .and_then(|r| r.extra.get("loader_paused").cloned());
        assert_eq!(paused, Some(serde_json::json!(true)), "--pause-loader");
        let v = verdict(&results, &p);
        let colocated = v.lines().next().expect("a colocated line");
        assert!(colocated.contains("--pause-loader"), "{v}");
        assert!(!colocated.contains("— "), "{v}");
        assert!(v.contains("1.250 — MISSED"), "{v}");
        let external = results
            .iter()
            .find(|r| r.case == "async-separated")
            .map(|r| r.extra["database_dir"].clone());
        assert_eq!(external, Some(serde_json::json!("external")));
    }

    #[test]
    fn comparison_lines_name_off_and_carry_the_p99_ratio() {
        let off = summarize_case("off".into(), &[&phase(&[100; 10], None, None)], Some(10), 8);
        let sync = summarize_case(
            "sync".into(),
            &[&phase(&[250; 5], None, Some(5))],
            Some(10),
            8,
        );
        let sync = against(sync, &off);
        assert_eq!(sync.baseline.as_deref(), Some("off"));
        assert_eq!(sync.ratio, Some(0.5));
        assert_eq!(sync.extra["p99_vs_off"], serde_json::json!(2.5));
    }

    #[test]
    fn help_states_the_defaults_the_code_uses() {
        use clap::Args;
        let help = E2eArgs::augment_args(clap::Command::new("e2e"))
            .render_help()
            .to_string();
        for default in [
            DEFAULT_RATE,
            DEFAULT_SECS,
            DEFAULT_SATURATION_SECS,
            DEFAULT_ROUNDS,
            DEFAULT_CONNECTIONS,
        ] {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{default} missing from:\n{help}"
            );
        }
        for default in ["both", DEFAULT_SEPARATED_DATA_DIR] {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "{default} missing from:\n{help}"
            );
        }
    }

    #[test]
    fn settings_run_in_round_order_with_off_always_first() {
        let args = E2eArgs {
            settings: Some(vec!["sync".into(), "ASYNC".into()]),
            ..E2eArgs::default()
        };
        let p = Params::from_args(&args).unwrap_or_else(|_| panic!("valid settings"));
        assert_eq!(p.settings, [Setting::Off, Setting::Async, Setting::Sync]);
        let bad = E2eArgs {
            settings: Some(vec!["fast".into()]),
            ..E2eArgs::default()
        };
        assert!(Params::from_args(&bad).is_err());
        assert_eq!(
            Params::from_args(&E2eArgs::default())
                .map(|p| p.settings.len())
                .ok(),
            Some(5)
        );
    }

    #[test]
    fn the_request_stream_has_unique_ids_and_a_correct_length() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let source = requests(addr, "t-async-1".into());
        let req = String::from_utf8(source(42)).expect("utf-8");
        assert!(req.starts_with("POST /api/links HTTP/1.1\r\n"));
        assert!(req.contains("\r\nx-request-id: t-async-1-42\r\n"));
        let (head, body) = req.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(v["user"], "u42");
        assert_eq!(v["url"], "https://example.com/t-async-1/42");
    }
}
