//! `auditwal bench agent`: the agent as a Python service calls it, beside the
//! seed's own flow, measured in the same run.
//!
//! Starts a private PostgreSQL (fsync on) and an agent (this binary, with
//! `--database-url` and `--http 127.0.0.1:0`, `AUDIT_SAMPLE_RATE=0.1`), then a
//! Python driver (`bench_agent.py`, embedded) that times each call from Python:
//! `py-insert-commit` (psycopg, one INSERT + COMMIT per event: the seed's sync
//! flow), `emit-pipe` (a line into `auditwal emit` through a pipe, its ack line
//! back), `agent-async`, `agent-durable`, `agent-sync`, `agent-sampled` (the
//! Python client over the Unix socket), `http-async` (http.client, keep-alive),
//! each with one caller and with 16 caller processes (`-16`), and
//! `agent-async-pipelined` (several processes writing pre-encoded requests and
//! reading answers concurrently: what one agent sustains). Comparison lines set
//! `ratio` (throughput, ours / baseline) and `p50_ratio` (baseline p50 / ours:
//! how many times lower) against `py-insert-commit` of the same caller count.
//! No loader runs: the request path alone is measured.
//!
//! Needs python3 with `psycopg` for the baseline (`pip install "psycopg[binary]"`;
//! without it that case is skipped, with a warning). Knobs: `AUDITWAL_BENCH_EVENTS`
//! (per case, default 20000), `AUDITWAL_BENCH_PIPELINED_EVENTS` (default 400000),
//! `AUDITWAL_BENCH_PIPELINED_CLIENTS` (default 4), `AUDITWAL_PYTHON` (default
//! python3).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{anyhow, Context};
use auditwal_test_support::{Cluster, ClusterError, ClusterOptions};

use super::bench::{env_u64, report, BenchResult};
use super::{CmdResult, Failure};

const DRIVER: &str = include_str!("bench_agent.py");
const BASELINE: &str = "py-insert-commit";
const CASES: [&str; 7] = [
    BASELINE,
    "emit-pipe",
    "agent-async",
    "agent-durable",
    "agent-sync",
    "agent-sampled",
    "http-async",
];
const CALLERS: [u64; 2] = [1, 16];
const SAMPLE_RATE: &str = "0.1";

/// Kills (SIGTERM, then waits) the agent when the bench ends, whichever way.
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let _ = self.0.wait();
    }
}

pub fn run(json: bool, dir: Option<PathBuf>) -> CmdResult {
    let events = env_u64("AUDITWAL_BENCH_EVENTS", 20_000)?.max(100);
    let pipelined_events = env_u64("AUDITWAL_BENCH_PIPELINED_EVENTS", 400_000)?.max(1000);
    let pipelined_clients = env_u64("AUDITWAL_BENCH_PIPELINED_CLIENTS", 4)?.max(1);
    let python = std::env::var("AUDITWAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let pythonpath = python_path();
    let python_has = |module: &str| {
        Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .env("PYTHONPATH", &pythonpath)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !python_has("auditwal_client") {
        return Err(Failure::usage(anyhow!(
            "{python} cannot import auditwal_client: pip install ./clients/python (or set PYTHONPATH)"
        )));
    }
    let mut cases: Vec<&str> = CASES.to_vec();
    if !python_has("psycopg") {
        eprintln!(
            "bench agent: psycopg is missing, so the baseline {BASELINE} is skipped \
             (pip install \"psycopg[binary]\")"
        );
        cases.retain(|c| *c != BASELINE);
    }
    cases.push("agent-async-pipelined");

    let scratch = match &dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating the bench's scratch dir")?;
    let cluster = Cluster::start(ClusterOptions {
        base_dir: dir.clone(),
        ..ClusterOptions::default()
    })
    .map_err(|e| match e {
        e @ (ClusterError::NotInstalled | ClusterError::NoPostgresUser) => {
            Failure::usage(anyhow!(e))
        }
        e => Failure::runtime(anyhow!(e).context("starting the private PostgreSQL")),
    })?;
    let url = cluster.url();
    let (agent, socket, http) = start_agent(scratch.path(), &url)?;
    eprintln!(
        "bench agent: PostgreSQL (fsync on) on 127.0.0.1:{}, agent on {} and {http}, \
         {events} events per case, callers {CALLERS:?}, sample rate {SAMPLE_RATE}",
        cluster.port(),
        socket.display()
    );
    let driver = scratch.path().join("bench_agent.py");
    std::fs::write(&driver, DRIVER).context("writing the Python driver")?;
    let emit_dir = scratch.path().join("emit");
    let exe = std::env::current_exe().context("finding this executable")?;
    let config = serde_json::json!({
        "socket": socket,
        "http": http,
        "database_url": url,
        "auditwal": exe,
        "emit_dir": emit_dir,
        "events": events,
        "callers": CALLERS,
        "cases": cases,
        "sample_rate": SAMPLE_RATE.parse::<f64>().unwrap_or(0.1),
        "pipelined_events": pipelined_events,
        "pipelined_clients": pipelined_clients,
    });
    let mut child = Command::new(&python)
        .arg(&driver)
        .arg(config.to_string())
        .env("PYTHONPATH", &pythonpath)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python}"))?;
    let stdout = child.stdout.take().context("the driver's stdout")?;
    let mut measured = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the driver's output")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("driver line {line:?}"))?;
        eprintln!("bench agent: {line}");
        measured.push(v);
    }
    let status = child.wait().context("waiting for the driver")?;
    drop(agent);
    drop(cluster);
    if !status.success() {
        return Err(Failure::runtime(anyhow!(
            "the Python driver failed ({status}); its error is above"
        )));
    }
    report(&results(&measured), json);
    Ok(ExitCode::SUCCESS)
}

/// `clients/python` of the source tree first, then whatever PYTHONPATH has.
fn python_path() -> String {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python");
    let mut parts = Vec::new();
    if tree.is_dir() {
        parts.push(tree.display().to_string());
    }
    if let Ok(existing) = std::env::var("PYTHONPATH") {
        parts.push(existing);
    }
    parts.join(":")
}

fn start_agent(scratch: &Path, url: &str) -> Result<(AgentProcess, PathBuf, String), Failure> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .arg("agent")
        .arg("--wal-dir")
        .arg(scratch.join("wal"))
        .args(["--database-url", url, "--http", "127.0.0.1:0"])
        .env("AUDIT_SAMPLE_RATE", SAMPLE_RATE)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let stdout = child.stdout.take().context("the agent's stdout")?;
    let agent = AgentProcess(child);
    let (mut socket, mut http) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the agent's stdout")?;
        if let Some(p) = line.strip_prefix("socket ") {
            socket = Some(PathBuf::from(p));
        } else if let Some(a) = line.strip_prefix("http ") {
            http = Some(a.to_string());
        }
        if socket.is_some() && http.is_some() {
            break;
        }
    }
    match (socket, http) {
        (Some(s), Some(h)) => Ok((agent, s, h)),
        _ => Err(Failure::runtime(anyhow!(
            "the agent exited before listening; its error is above"
        ))),
    }
}

fn num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(serde_json::Value::as_f64)
}

/// The contract's lines from the driver's: one per case and caller count,
/// then the comparisons against the baseline of the same caller count.
fn results(measured: &[serde_json::Value]) -> Vec<BenchResult> {
    let mut out: Vec<BenchResult> = Vec::new();
    for v in measured {
        let case = v["case"].as_str().unwrap_or("?");
        let callers = v["callers"].as_u64().unwrap_or(1);
        let name = if callers == 1 || case == "agent-async-pipelined" {
            case.to_string()
        } else {
            format!("{case}-{callers}")
        };
        let mut r = BenchResult::new(
            "agent",
            name,
            v["events"].as_u64().unwrap_or(0),
            num(v, "secs").unwrap_or(0.0),
        );
        r.p50_us = num(v, "p50_us");
        r.p99_us = num(v, "p99_us");
        r.p999_us = num(v, "p999_us");
        r.extra.insert("callers".into(), callers.into());
        out.push(r);
    }
    let mut comparisons = Vec::new();
    for r in &out {
        let callers = r.extra.get("callers").and_then(|c| c.as_u64()).unwrap_or(1);
        let baseline_name = if callers == 1 {
            BASELINE.to_string()
        } else {
            format!("{BASELINE}-{callers}")
        };
        if r.case == baseline_name || r.case == "agent-async-pipelined" {
            continue;
        }
        let Some(base) = out.iter().find(|b| b.case == baseline_name) else {
            continue;
        };
        let mut c = r.clone().against(base);
        if let (Some(ours), Some(theirs)) = (r.p50_us, base.p50_us) {
            if ours > 0.0 {
                c.extra.insert("p50_ratio".into(), (theirs / ours).into());
            }
        }
        comparisons.push(c);
    }
    out.extend(comparisons);
    out
}
