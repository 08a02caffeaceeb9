//! `auditwal bench sync [--json]`: group commit against the naive sync writer.
//!
//! Starts a private PostgreSQL with fsync ON (every commit is a real flush to disk),
//! then, at 1, 8 and 64 concurrent callers, measures for a fixed time after a
//! warm-up:
//! - `coalesced-N`: N tasks calling [`SyncWriter::record`] (default config);
//! - `naive-N`: N tasks, each call one INSERT + COMMIT (autocommit) on its own
//!   pooled connection, pool as big as the callers, no coalescing; the same
//!   single-row statement a lone caller of ours sends.
//!
//! Every call's latency is recorded. Rounds interleave the cases (naive and ours
//! alternate which goes first) so drift in the machine hits both sides; each case's
//! figures are the medians over the rounds. Before each case the bench runs VACUUM
//! ANALYZE and CHECKPOINT, so the maintenance the previous case's rows made due
//! does not run inside it. Each coalesced case names its naive
//! baseline, the throughput ratio (higher is better) and `p50_vs_baseline` (ours /
//! naive p50 latency, lower is better). Each `signed-N` case is `coalesced-N`
//! with a chain key (every committer's rows linked, checkpoints signed in the
//! same statements, src/pg/sync_chain.rs) and names `coalesced-N` as its
//! baseline: what the chain costs sync mode.
//!
//! Knobs (environment): AUDITWAL_BENCH_SECS (per case, default 5),
//! AUDITWAL_BENCH_ROUNDS (default 3), AUDITWAL_BENCH_COMMITTERS and
//! AUDITWAL_BENCH_STEP (the sync writer's `committers` and `extra_commit_step`;
//! default: the library's defaults), AUDITWAL_BENCH_LEVELS (e.g. `64`).
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::pg::{self, SyncConfig, SyncWriter};
use auditwal::{AuditEvent, Outcome};
use auditwal_test_support::{Cluster, ClusterOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use super::bench::{env_u64, median_of_rounds, quiesce, report, BenchResult};
use super::{CmdResult, Failure};

const LEVELS: [usize; 3] = [1, 8, 64];
const WARMUP: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Coalesced,
    Naive,
    /// Coalesced, with a chain key: every committer signs its chain.
    Signed,
}

impl Kind {
    fn name(self, level: usize) -> String {
        match self {
            Kind::Coalesced => format!("coalesced-{level}"),
            Kind::Naive => format!("naive-{level}"),
            Kind::Signed => format!("signed-{level}"),
        }
    }
}

/// One timed run of one case.
struct Run {
    events: u64,
    secs: f64,
    latencies_ns: Vec<u64>,
}

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let secs = env_u64("AUDITWAL_BENCH_SECS", 5)?.max(1);
    let rounds = env_u64("AUDITWAL_BENCH_ROUNDS", 3)?.max(1) as usize;
    let committers = env_u64(
        "AUDITWAL_BENCH_COMMITTERS",
        SyncConfig::default().committers as u64,
    )?
    .max(1) as usize;
    let step = env_u64(
        "AUDITWAL_BENCH_STEP",
        SyncConfig::default().extra_commit_step as u64,
    )?
    .max(1) as usize;
    let levels: Vec<usize> = match std::env::var("AUDITWAL_BENCH_LEVELS") {
        Ok(v) => v
            .split(',')
            .map(|l| l.trim().parse::<usize>().ok().filter(|&n| n > 0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Failure::usage(anyhow!("AUDITWAL_BENCH_LEVELS={v:?}: want e.g. 1,8,64"))
            })?,
        Err(_) => LEVELS.to_vec(),
    };
    let keys = tempfile::tempdir().context("cannot create a directory for the chain key")?;
    let (chain_key, _) = auditwal::chain::keys::write_pair(keys.path(), "bench")
        .context("cannot write the bench's chain key")?;
    let settings = Settings {
        secs: Duration::from_secs(secs),
        rounds,
        committers,
        step,
        levels,
        chain_key,
    };
    let cluster = Cluster::start(ClusterOptions {
        base_dir: dir,
        ..ClusterOptions::default()
    })
    .map_err(|e| match e {
        e @ auditwal_test_support::ClusterError::NotInstalled => Failure::usage(anyhow!(e)),
        e => Failure::runtime(anyhow!(e).context("starting the private PostgreSQL")),
    })?;
    eprintln!(
        "bench sync: private PostgreSQL (fsync on) on 127.0.0.1:{}, {secs} s per case after {:?} warm-up, \
         {rounds} rounds, medians reported; sync writer with up to {committers} committers, step {step}",
        cluster.port(),
        WARMUP
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    let results = runtime.block_on(bench(&cluster, &settings))?;
    drop(cluster);
    report(&results, json);
    Ok(ExitCode::SUCCESS)
}

struct Settings {
    secs: Duration,
    rounds: usize,
    committers: usize,
    step: usize,
    levels: Vec<usize>,
    /// For the signed cases.
    chain_key: PathBuf,
}

async fn bench(cluster: &Cluster, settings: &Settings) -> Result<Vec<BenchResult>, Failure> {
    let url = cluster.url();
    let options: PgConnectOptions = url.parse().context("cluster URL")?;
    {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .context("connecting to the private PostgreSQL")?;
        pg::migrate(&pool).await.context("applying migrations")?;
        pool.close().await;
    }
    // runs[level index][kind] = the runs of that case
    let mut runs: Vec<[Vec<Run>; 3]> = settings
        .levels
        .iter()
        .map(|_| [Vec::new(), Vec::new(), Vec::new()])
        .collect();
    for round in 0..settings.rounds {
        for (li, &level) in settings.levels.iter().enumerate() {
            let order = if round % 2 == 0 {
                [Kind::Naive, Kind::Coalesced, Kind::Signed]
            } else {
                [Kind::Signed, Kind::Coalesced, Kind::Naive]
            };
            for kind in order {
                quiesce_before_case(&options).await?;
                let run = run_case(&url, &options, kind, level, settings).await?;
                eprintln!(
                    "bench sync: round {} {:<13} {:>9.0} events/s",
                    round + 1,
                    kind.name(level),
                    run.events as f64 / run.secs
                );
                runs[li][kind as usize].push(run);
            }
        }
    }
    let mut results = Vec::new();
    for (li, &level) in settings.levels.iter().enumerate() {
        let [coalesced, naive, signed] = std::mem::take(&mut runs[li]);
        let naive = summarize(Kind::Naive.name(level), naive);
        let ours = summarize(Kind::Coalesced.name(level), coalesced).against(&naive);
        let signed = summarize(Kind::Signed.name(level), signed).against(&ours);
        let ours = match (ours.p50_us, naive.p50_us) {
            (Some(a), Some(b)) if b > 0.0 => {
                let mut r = ours;
                r.extra
                    .insert("p50_vs_baseline".into(), serde_json::json!(round3(a / b)));
                r
            }
            _ => ours,
        };
        results.push(naive);
        results.push(ours);
        results.push(signed);
    }
    Ok(results)
}

/// VACUUM ANALYZE and CHECKPOINT before each case ([`quiesce`]): a case
/// writes 30k-250k rows, and without this the autovacuum they make due ran
/// inside whichever case came next, alternately charging naive and ours.
async fn quiesce_before_case(options: &PgConnectOptions) -> Result<(), Failure> {
    let mut pg = PgConnection::connect_with(options)
        .await
        .context("connecting to PostgreSQL before a case")?;
    quiesce(&mut pg).await?;
    let _ = pg.close().await;
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The median run by throughput gives events/secs; each percentile is the median
/// of the runs' percentiles.
fn summarize(case: String, mut runs: Vec<Run>) -> BenchResult {
    let per_run: Vec<BenchResult> = runs
        .iter_mut()
        .map(|r| {
            BenchResult::new("sync", case.clone(), r.events, r.secs)
                .with_latencies_ns(&mut r.latencies_ns)
        })
        .collect();
    let mut out = median_of_rounds("sync", case, &per_run);
    out.extra
        .insert("runs".into(), serde_json::json!(per_run.len()));
    out.extra.insert(
        "events_per_sec_runs".into(),
        serde_json::json!(per_run
            .iter()
            .map(|r| r.events_per_sec.round())
            .collect::<Vec<_>>()),
    );
    out
}

fn bench_event(caller: usize) -> AuditEvent {
    AuditEvent::new("bench.sync")
        .actor("user", format!("u{caller}"))
        .target("doc", "d1")
        .outcome(Outcome::Success)
}

/// One case: `level` callers hammering for `secs` after the warm-up.
async fn run_case(
    url: &str,
    options: &PgConnectOptions,
    kind: Kind,
    level: usize,
    settings: &Settings,
) -> Result<Run, Failure> {
    let secs = settings.secs;
    enum Target {
        Ours(SyncWriter),
        Naive(sqlx::PgPool),
    }
    let target = match kind {
        Kind::Coalesced | Kind::Signed => Target::Ours(
            SyncWriter::connect(url, {
                let mut c = SyncConfig::default();
                c.migrate = false;
                c.committers = settings.committers;
                c.extra_commit_step = settings.step;
                c.timeout = Duration::from_secs(30);
                if kind == Kind::Signed {
                    c.chain_key = Some(settings.chain_key.clone());
                }
                c
            })
            .await
            .context("sync writer")?,
        ),
        Kind::Naive => Target::Naive(
            PgPoolOptions::new()
                .max_connections(level as u32)
                .min_connections(level as u32)
                .acquire_timeout(Duration::from_secs(30))
                // As in the sync writer's pool: no ping on every acquire.
                .test_before_acquire(false)
                .connect_with(options.clone())
                .await
                .context("naive pool")?,
        ),
    };
    let target = Arc::new(target);
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + secs;
    let tasks: Vec<_> = (0..level)
        .map(|caller| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let e = bench_event(caller);
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let result = match &*target {
                        Target::Ours(w) => w.record(&e).await.map(|_| ()),
                        Target::Naive(pool) => match pool.acquire().await {
                            Ok(mut conn) => pg::sync::insert_unbatched(&mut conn, &e, 1.0)
                                .await
                                .map(|_| ()),
                            Err(err) => Err(pg::PgError::DatabaseUnavailable {
                                reason: err.to_string(),
                            }),
                        },
                    };
                    result.map_err(|err| anyhow!("a benchmark call failed: {err}"))?;
                    let t1 = Instant::now();
                    // Count calls that started and ended inside the window.
                    if t0 >= measure_from && t1 <= end {
                        latencies.push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
                    }
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut latencies_ns = Vec::new();
    for t in tasks {
        latencies_ns.extend(t.await.map_err(|e| anyhow!("bench task failed: {e}"))??);
    }
    if let Target::Naive(pool) = &*target {
        pool.close().await;
    }
    Ok(Run {
        events: latencies_ns.len() as u64,
        secs: secs.as_secs_f64(),
        latencies_ns,
    })
}
