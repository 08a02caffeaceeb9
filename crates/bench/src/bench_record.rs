//! `auditwal bench record [--json] [--dir D]`: what one audit call costs the
//! service, in process: building the event, `AuditLog::record_with`, and every
//! step in between (validation, sampling, encoding, the append, counters).
//!
//! Each call builds its event afresh, as a handler does: the `url.created` event
//! of the shortener's create endpoint (actor, target, request id, ip, user agent
//! and a metadata map of three fields) or, for the `-admin` cases, an admin change
//! with a `before`/`after` pair and a reason. The timer covers the build and the
//! call, one `Instant::now()` pair per call (about 20 ns of it is the clock).
//!
//! Cases, each for one and for two threads (`-1t`, `-2t`), tasks on a tokio
//! runtime with as many workers:
//! - `timer-only`: nothing between the clock reads: what the timing itself
//!   adds to every figure (its `call_ns_*` is one clock read's cost).
//! - `build-only`: the event is built and dropped (mode off): the floor of any
//!   audited handler, and the baseline of every other case.
//! - `append-only`: `WalWriter::append_encoded` of a payload encoded before
//!   timing, of the same size as the `url.created` events: the WAL's own cost.
//! - `record-async`, `record-async-admin`, `record-sampled` (rate 0.1: nine in
//!   ten are sampled out, one appended), `record-sampled-out` (a rate so small
//!   that every event is dropped: the sampler's own cost), and `record-durable`
//!   (one thread only: it waits for an fsync per call, or for the group commit).
//!
//! Each call is timed twice: whole (build + call: `p50_us`, `p99_us`,
//! `p999_us`, and `ns_p50`, `ns_p99` in nanoseconds) and the audit call alone
//! (`call_ns_p50`, `call_ns_p99`, `call_ns_p999`). Events/s is calls/s, with the
//! ratio to `build-only`; `x_append_only_p50` compares a record case's whole
//! p50 with `append-only`'s, `call_x_append_only_p50` the calls alone. Cases
//! interleave over the rounds; each figure is the median of the rounds'.
//!
//! Knobs (environment): AUDITWAL_BENCH_EVENTS (calls per case and round,
//! default 400,000), AUDITWAL_BENCH_DURABLE_EVENTS (default 4,000),
//! AUDITWAL_BENCH_ROUNDS (default 3).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use auditwal::wal::{payload, WalConfig, WalWriter};
use auditwal::{AuditEvent, AuditLog, Config, JsonText, Mode, Outcome};
use serde::Serialize;

use super::bench::{env_u64, median, median_of_rounds, percentile, report, BenchResult};
use super::{CmdResult, Failure};

const BENCH: &str = "record";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    TimerOnly,
    BuildOnly,
    AppendOnly,
    Async,
    AsyncAdmin,
    Sampled,
    SampledOut,
    Durable,
}

impl Case {
    const ALL: [Case; 8] = [
        Case::TimerOnly,
        Case::BuildOnly,
        Case::AppendOnly,
        Case::Async,
        Case::AsyncAdmin,
        Case::Sampled,
        Case::SampledOut,
        Case::Durable,
    ];

    fn name(self, threads: usize) -> String {
        let base = match self {
            Case::TimerOnly => "timer-only",
            Case::BuildOnly => "build-only",
            Case::AppendOnly => "append-only",
            Case::Async => "record-async",
            Case::AsyncAdmin => "record-async-admin",
            Case::Sampled => "record-sampled",
            Case::SampledOut => "record-sampled-out",
            Case::Durable => "record-durable",
        };
        format!("{base}-{threads}t")
    }

    /// The log's sampling rate for this case (the others ignore it).
    fn sample_rate(self) -> f64 {
        match self {
            Case::Sampled => 0.1,
            // Small enough that no event of a run is kept.
            Case::SampledOut => 1e-12,
            _ => 1.0,
        }
    }

    fn mode(self) -> Option<Mode> {
        match self {
            Case::TimerOnly | Case::BuildOnly | Case::AppendOnly => None,
            Case::Async | Case::AsyncAdmin => Some(Mode::Async),
            Case::Sampled | Case::SampledOut => Some(Mode::Sampled),
            Case::Durable => Some(Mode::Durable),
        }
    }
}

#[derive(Serialize)]
struct CreateMeta<'a> {
    url: &'a str,
    flagged: bool,
    source: &'a str,
}

#[derive(Serialize)]
struct UserState<'a> {
    status: &'a str,
    role: &'a str,
}

/// What a request brings with it: the strings a handler copies into its event.
/// Made before timing, cycled through by the calls.
struct Request {
    user: String,
    code: String,
    url: String,
    request_id: String,
    ip: IpAddr,
    user_agent: String,
}

/// Distinct requests cycled through by every case.
const POOL: usize = 1024;

fn requests() -> Arc<[Request]> {
    (0..POOL as u64)
        .map(|i| Request {
            user: format!("u{}", i * 7919 % 5_000),
            code: format!("c{:07x}", i * 104_729),
            url: format!("https://example.com/articles/{}", i * 31 % 10_000),
            request_id: format!("req-{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0"
                .to_string(),
        })
        .collect()
}

/// The shortener's `url.created`, built the way its handler builds it: the
/// request's strings copied in, the metadata serialized.
fn url_created(req: &Request, i: u64) -> AuditEvent {
    let mut event = AuditEvent::new("url.created")
        .actor("user", req.user.as_str())
        .target("url", req.code.as_str())
        .request_id(req.request_id.as_str())
        .ip(req.ip)
        .user_agent(req.user_agent.as_str())
        .outcome(Outcome::Success);
    let meta = CreateMeta {
        url: &req.url,
        flagged: i % 97 == 0,
        source: "web",
    };
    event.metadata = JsonText::from_value("metadata", &meta).ok();
    event
}

/// An admin change with its before and after.
fn admin_change(req: &Request) -> AuditEvent {
    let mut event = AuditEvent::new("admin.user.disabled")
        .actor("admin", "7")
        .target("user", req.user.as_str())
        .reason("abuse report")
        .request_id(req.request_id.as_str())
        .ip(req.ip)
        .outcome(Outcome::Success);
    let (before, after) = (
        UserState {
            status: "active",
            role: "member",
        },
        UserState {
            status: "disabled",
            role: "member",
        },
    );
    event.before = JsonText::from_value("before", &before).ok();
    event.after = JsonText::from_value("after", &after).ok();
    event
}

/// One timed run of one case.
struct Run {
    calls: u64,
    secs: f64,
    /// Build + call, per call.
    latencies_ns: Vec<u64>,
    /// The audit call alone (sorted), per call.
    call_ns: Vec<u64>,
}

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let calls = env_u64("AUDITWAL_BENCH_EVENTS", 400_000)?;
    let durable_calls = env_u64("AUDITWAL_BENCH_DURABLE_EVENTS", 4_000)?;
    let rounds = env_u64("AUDITWAL_BENCH_ROUNDS", 3)?.max(1) as usize;
    let scratch = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating the bench's scratch directory")?;

    let mut plan = Vec::new();
    for threads in [1usize, 2] {
        for case in Case::ALL {
            if case == Case::Durable && threads > 1 {
                continue;
            }
            plan.push((case, threads));
        }
    }
    let mut runs: Vec<Vec<BenchResult>> = vec![Vec::new(); plan.len()];
    for round in 0..rounds {
        for (k, &(case, threads)) in plan.iter().enumerate() {
            let n = if case == Case::Durable {
                durable_calls
            } else {
                calls
            };
            let wal_dir = scratch.path().join(format!("r{round}-{k}"));
            let run = run_case(case, threads, n, &wal_dir)?;
            let mut lat = run.latencies_ns;
            let mut r = BenchResult::new(BENCH, case.name(threads), run.calls, run.secs)
                .with_latencies_ns(&mut lat);
            if !matches!(case, Case::BuildOnly) {
                for (key, p) in [
                    ("call_ns_p50", 50.0),
                    ("call_ns_p99", 99.0),
                    ("call_ns_p999", 99.9),
                ] {
                    r.extra
                        .insert(key.into(), serde_json::json!(percentile(&run.call_ns, p)));
                }
            }
            runs[k].push(r);
            // Segments of 64 MiB per case add up; the next case needs none of them.
            let _ = std::fs::remove_dir_all(&wal_dir);
        }
    }

    let mut results: Vec<BenchResult> = plan
        .iter()
        .zip(&runs)
        .map(|(&(case, threads), per_round)| {
            let mut r = median_of_rounds(BENCH, case.name(threads), per_round);
            for key in ["call_ns_p50", "call_ns_p99", "call_ns_p999"] {
                let values = per_round
                    .iter()
                    .filter_map(|x| x.extra.get(key).and_then(|v| v.as_f64()))
                    .collect();
                if let Some(m) = median(values) {
                    r.extra.insert(key.into(), serde_json::json!(m));
                }
            }
            r
        })
        .collect();
    for threads in [1usize, 2] {
        let find = |results: &[BenchResult], c: Case| {
            results.iter().find(|r| r.case == c.name(threads)).cloned()
        };
        let (Some(base), Some(append)) = (
            find(&results, Case::BuildOnly),
            find(&results, Case::AppendOnly),
        ) else {
            continue;
        };
        for r in results
            .iter_mut()
            .filter(|r| r.case.ends_with(&format!("-{threads}t")))
        {
            if let Some(p50) = r.p50_us {
                r.extra.insert("ns_p50".into(), ns(p50));
            }
            if let Some(p99) = r.p99_us {
                r.extra.insert("ns_p99".into(), ns(p99));
            }
            if r.case.starts_with("record-") {
                let call_p50 =
                    |r: &BenchResult| r.extra.get("call_ns_p50").and_then(|v| v.as_f64());
                if let (Some(a), Some(b)) = (r.p50_us, append.p50_us) {
                    if b > 0.0 {
                        r.extra
                            .insert("x_append_only_p50".into(), serde_json::json!(a / b));
                    }
                }
                if let (Some(a), Some(b)) = (call_p50(r), call_p50(&append)) {
                    if b > 0.0 {
                        r.extra
                            .insert("call_x_append_only_p50".into(), serde_json::json!(a / b));
                    }
                }
            }
            if r.case != base.case {
                *r = r.clone().against(&base);
            }
        }
    }
    report(&results, json);
    Ok(ExitCode::SUCCESS)
}

fn ns(us: f64) -> serde_json::Value {
    serde_json::json!((us * 1000.0).round())
}

fn run_case(case: Case, threads: usize, calls: u64, wal_dir: &Path) -> Result<Run, Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the bench's runtime")?;
    let reqs = requests();
    rt.block_on(async move {
        match case {
            Case::TimerOnly => {
                time_tasks(threads, calls, move |_| async move {
                    let t = Instant::now();
                    Ok(t.elapsed())
                })
                .await
            }
            Case::BuildOnly => {
                time_tasks(threads, calls, move |i| {
                    let reqs = reqs.clone();
                    async move {
                        black_box(url_created(&reqs[i as usize % POOL], i));
                        Ok(Duration::ZERO)
                    }
                })
                .await
            }
            Case::AppendOnly => {
                let wal = Arc::new(
                    WalWriter::open(WalConfig::new(wal_dir, "bench"))
                        .context("opening the WAL writer")?,
                );
                let mut encoded = Vec::new();
                payload::encode_event(&url_created(&reqs[0], 0), 1.0, &mut encoded)
                    .context("encoding the append-only payload")?;
                let encoded: Arc<[u8]> = encoded.into();
                let w = wal.clone();
                let run = time_tasks(threads, calls, move |_| {
                    let (w, p) = (w.clone(), encoded.clone());
                    async move {
                        let t = Instant::now();
                        w.append_encoded(&p).map_err(|e| e.to_string())?;
                        Ok(t.elapsed())
                    }
                })
                .await;
                wal.close().context("closing the WAL writer")?;
                run
            }
            _ => {
                let config = Config::builder()
                    .wal_dir(wal_dir)
                    .stream("bench")
                    .sample_rate(case.sample_rate())
                    .build()
                    .context("building the log's config")?;
                let log = Arc::new(AuditLog::open(config).await.context("opening the log")?);
                let Some(mode) = case.mode() else {
                    return Err(Failure::runtime(anyhow::anyhow!(
                        "case {case:?} has no mode"
                    )));
                };
                let admin = case == Case::AsyncAdmin;
                let l = log.clone();
                let run = time_tasks(threads, calls, move |i| {
                    let (l, reqs) = (l.clone(), reqs.clone());
                    async move {
                        let req = &reqs[i as usize % POOL];
                        let event = if admin {
                            admin_change(req)
                        } else {
                            url_created(req, i)
                        };
                        let t = Instant::now();
                        l.record_with(&event, mode)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(t.elapsed())
                    }
                })
                .await;
                log.close().await.context("closing the log")?;
                run
            }
        }
    })
}

/// Runs `threads` tasks, each making `calls / threads` calls of `call(i)` in a
/// loop. Each call is timed whole (build + call); `call` returns how long its
/// own audit call took (zero when it makes none). Returns the merged latencies,
/// or the first call's error.
async fn time_tasks<F, Fut>(threads: usize, calls: u64, call: F) -> Result<Run, Failure>
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<Duration, String>> + Send,
{
    let per_task = (calls / threads as u64).max(1);
    let barrier = Arc::new(tokio::sync::Barrier::new(threads));
    let mut tasks = Vec::new();
    for t in 0..threads {
        let (call, barrier) = (call.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut whole = Vec::with_capacity(per_task as usize);
            let mut own = Vec::with_capacity(per_task as usize);
            let base = t as u64 * per_task;
            let t0 = Instant::now();
            for i in base..base + per_task {
                let s = Instant::now();
                let call_took = call(i).await?;
                whole.push(s.elapsed().as_nanos() as u64);
                own.push(call_took.as_nanos() as u64);
            }
            Ok::<_, String>((whole, own, t0.elapsed()))
        }));
    }
    let mut latencies_ns = Vec::with_capacity(calls as usize);
    let mut call_ns = Vec::with_capacity(calls as usize);
    let mut longest = Duration::ZERO;
    for t in tasks {
        let (whole, own, took) = t
            .await
            .context("a bench task panicked")?
            .map_err(|e| Failure::runtime(anyhow::anyhow!("a call failed: {e}")))?;
        latencies_ns.extend(whole);
        call_ns.extend(own);
        longest = longest.max(took);
    }
    call_ns.sort_unstable();
    Ok(Run {
        calls: per_task * threads as u64,
        secs: longest.as_secs_f64(),
        latencies_ns,
        call_ns,
    })
}
