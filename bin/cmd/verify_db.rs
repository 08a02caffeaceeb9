//! `auditwal verify-db`: proves a table's rows are what the writers signed
//! (docs/integrity.md).
//!
//! For each stream (or `--stream`): the stored signed checkpoints, then the rows
//! in LSN order, each with its link, its WAL record and its columns. Each row's
//! columns are compared with what its record says (the record is what the link
//! hashes), and `chain::audit` walks links and checkpoints into findings.
//! Checkpoints held outside the database — the writer's local WAL
//! (`--wal-dir`), exported notes (`--checkpoint FILE`) — show a tail cut together
//! with the table's own checkpoints.
//!
//! Exit codes as `verify`'s: 0 clean, 1 findings, 2 bad usage (URL, key file),
//! 3 the database or the WAL could not be read.

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use auditwal::chain::audit::{Auditor, Finding, Row, StoredCheckpoint, Summary};
use auditwal::chain::{Checkpoint, Hash, Link, Verifier};
use auditwal::columns::{self, ColumnVisitor, Value, EVENT_COLUMNS};
use auditwal::wal::payload::decode_event;
use auditwal::wal::reader::{is_stream_dir, list_segments, list_streams, newest_checkpoint};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, Row as _};

use super::{progress, CmdResult, Failure, EXIT_FOUND_PROBLEM};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  auditwal verify-db --database-url postgres://auditor@db/audit --public-key auditwal.pub\n  \
auditwal verify-db --public-key auditwal.pub --stream api --wal-dir /var/lib/auditwal --json\n\n\
Each finding names the stream, the LSN and what it is: a changed row, deleted rows, an\n\
inserted row, a reordered pair, a forged or mismatched checkpoint, a cut tail.\n\
Exit codes: 0 clean, 1 findings, 2 bad usage, 3 the database or the WAL cannot be read."
)]
pub struct VerifyDbArgs {
    /// PostgreSQL connection URL (a role that can read audit_events and
    /// audit_chain_checkpoints: auditwal_reader).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// The writers' public key (`auditwal keygen`'s auditwal.pub).
    #[arg(long)]
    pub public_key: PathBuf,
    /// Only this stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// A WAL directory (or one stream's) whose newest checkpoints the table must
    /// have reached: a cut of the table's newest rows and checkpoints shows here.
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// An exported checkpoint note (as `inspect --json` prints in `note`); may
    /// be given more than once.
    #[arg(long)]
    pub checkpoint: Vec<PathBuf>,
    /// One JSON object per finding, then one per stream summary.
    #[arg(long)]
    pub json: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Serialize)]
struct JsonFinding<'a> {
    stream_id: &'a str,
    /// The LSN the finding sorts by (each kind's own fields say more).
    at_lsn: u64,
    #[serde(flatten)]
    finding: &'a Finding,
    description: String,
}

#[derive(Serialize)]
struct JsonSummary<'a> {
    stream_id: &'a str,
    findings: usize,
    #[serde(flatten)]
    summary: &'a Summary,
    secs: f64,
}

pub fn run(args: VerifyDbArgs) -> CmdResult {
    let options: PgConnectOptions = args.database_url.parse().map_err(|e| {
        Failure::usage(anyhow!("--database-url is not a valid PostgreSQL URL: {e}"))
    })?;
    // The walk is one long statement by design: no slow-statement warning.
    let options = options.log_slow_statements(tracing::log::LevelFilter::Off, Duration::MAX);
    let verifier = Verifier::read(&args.public_key).map_err(Failure::usage)?;
    let mut external = Vec::new();
    for path in &args.checkpoint {
        let note = std::fs::read(path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(Failure::usage)?;
        let c = Checkpoint::open(&note, &verifier)
            .with_context(|| format!("{} is not a checkpoint signed by the key", path.display()))
            .map_err(Failure::usage)?;
        external.push((c, format!("the checkpoint file {}", path.display())));
    }
    if let Some(dir) = &args.wal_dir {
        external.extend(wal_checkpoints(dir, &verifier).map_err(Failure::runtime)?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let mut conn = options
            .connect()
            .await
            .context("connecting to the database")
            .map_err(Failure::runtime)?;
        let streams = match &args.stream {
            Some(s) => vec![s.clone()],
            None => list_db_streams(&mut conn, &external)
                .await
                .map_err(Failure::runtime)?,
        };
        let rows_done = Arc::new(AtomicU64::new(0));
        let bar = progress::wanted(args.no_progress || args.json).then(|| {
            let count = rows_done.clone();
            progress::Progress::start("verify", None, move || count.load(Ordering::Relaxed))
        });
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let mut total_findings = 0;
        for stream in &streams {
            let started = Instant::now();
            let (findings, summary) =
                verify_stream(&mut conn, stream, &verifier, &external, &rows_done)
                    .await
                    .with_context(|| format!("verifying stream {stream}"))
                    .map_err(Failure::runtime)?;
            total_findings += findings.len();
            let secs = started.elapsed().as_secs_f64();
            report(&mut out, args.json, stream, &findings, &summary, secs)
                .context("writing to stdout")
                .map_err(Failure::runtime)?;
        }
        if let Some(bar) = bar {
            bar.finish(rows_done.load(Ordering::Relaxed), true);
        }
        if total_findings > 0 {
            Ok(ExitCode::from(EXIT_FOUND_PROBLEM))
        } else {
            Ok(ExitCode::SUCCESS)
        }
    })
}

fn report(
    out: &mut impl Write,
    json: bool,
    stream: &str,
    findings: &[Finding],
    summary: &Summary,
    secs: f64,
) -> io::Result<()> {
    for f in findings {
        if json {
            let line = JsonFinding {
                stream_id: stream,
                at_lsn: f.lsn(),
                finding: f,
                description: f.describe(),
            };
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)?;
        } else {
            writeln!(out, "finding: stream {stream}: {}", f.describe())?;
        }
    }
    if json {
        let line = JsonSummary {
            stream_id: stream,
            findings: findings.len(),
            summary,
            secs,
        };
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)?;
    } else {
        let verdict = match findings.len() {
            0 => "clean".to_string(),
            n => format!("{n} finding(s)"),
        };
        let mut line = format!(
            "stream {stream}: {} row(s), {} checkpoint(s), signed through LSN {}, {} newer row(s) \
             not yet covered by a signature ({:.0} rows/s): {verdict}",
            summary.rows,
            summary.checkpoints,
            summary.signed_through,
            summary.unsigned_rows,
            summary.rows as f64 / secs.max(1e-9),
        );
        if let Some(lsn) = summary.unanchored_from {
            line.push_str(&format!(
                "; the rows before LSN {} are gone (retention) and no checkpoint holds the \
                 hash there, so the first row's link is not checked",
                lsn + 1
            ));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Every stream the loader or a checkpoint knows.
async fn list_db_streams(
    conn: &mut PgConnection,
    external: &[(Checkpoint, String)],
) -> anyhow::Result<Vec<String>> {
    let mut streams: Vec<String> = sqlx::query_scalar(
        "SELECT stream_id FROM audit_checkpoints \
         UNION SELECT stream_id FROM audit_chain_checkpoints ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .context("listing the streams (is the schema migrated?)")?;
    for (c, _) in external {
        if !streams.contains(&c.stream) {
            streams.push(c.stream.clone());
        }
    }
    Ok(streams)
}

/// The SELECT list: the chain columns, then each event column in a form
/// [`Checker`] compares with the record's value without rendering it.
fn select_list() -> String {
    let mut cols: Vec<String> = CHAIN_COLUMNS.iter().map(|c| c.to_string()).collect();
    for c in EVENT_COLUMNS {
        cols.push(match c.pg_type {
            "timestamptz" => format!("(extract(epoch FROM {0}) * 1000000)::int8 AS {0}", c.name),
            "inet" => format!("host({0}) AS {0}", c.name),
            "jsonb" => format!("{0}::text AS {0}", c.name),
            _ => c.name.to_string(),
        });
    }
    cols.join(", ")
}

/// The columns before the event's, in [`select_list`] order.
const CHAIN_COLUMNS: [&str; 5] = [
    "lsn",
    "chain_prev_lsn",
    "chain_hash",
    "wal_payload",
    "sample_rate",
];

/// JSON equality by value: keys in any order, numbers by value (jsonb keeps
/// 1.0 as 1.0 but prints 1e2 as 100).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        (J::Array(x), J::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| json_eq(v, w))
        }
        (J::Number(x), J::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(i), Some(j), _, _) => i == j,
            (_, _, Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

fn json_text_eq(stored: &str, record: &str) -> bool {
    if stored == record {
        return true;
    }
    match (
        serde_json::from_str::<serde_json::Value>(stored),
        serde_json::from_str::<serde_json::Value>(record),
    ) {
        (Ok(a), Ok(b)) => json_eq(&a, &b),
        _ => false,
    }
}

/// Compares each event column of a row with the record's value, in
/// [`EVENT_COLUMNS`] order; remembers the first that differs.
struct Checker<'r> {
    row: &'r sqlx::postgres::PgRow,
    index: usize,
    first_bad: Option<&'static str>,
}

impl ColumnVisitor<'_> for Checker<'_> {
    fn value(&mut self, value: Value<'_>) {
        let i = self.index;
        self.index += 1;
        if self.first_bad.is_some() {
            return;
        }
        let row = self.row;
        let text = || row.try_get::<Option<&str>, _>(i);
        let same = match value {
            Value::Uuid(u) => row.try_get::<uuid::Uuid, _>(i).is_ok_and(|g| g == *u),
            Value::Timestamptz(t) => row
                .try_get::<i64, _>(i)
                .is_ok_and(|g| g == t.timestamp_micros()),
            Value::Text(s) => row.try_get::<&str, _>(i).is_ok_and(|g| g == s),
            Value::OptText(s) => text().is_ok_and(|g| g == s),
            Value::Outcome(o) => text().is_ok_and(|g| g == o.map(|o| o.as_str())),
            Value::Inet(ip) => {
                text().is_ok_and(|g| g.map(|g| g.parse::<IpAddr>().ok()) == ip.map(Some))
            }
            Value::Jsonb(j) => text().is_ok_and(|g| match (g, j) {
                (None, None) => true,
                (Some(g), Some(j)) => json_text_eq(g, j.as_str()),
                _ => false,
            }),
        };
        if !same {
            self.first_bad = Some(EVENT_COLUMNS[i - CHAIN_COLUMNS.len()].name);
        }
    }
}

/// `Ok(())`, or the first column that differs from the record.
fn compare(row: &sqlx::postgres::PgRow, payload: &[u8]) -> Result<(), String> {
    let decoded =
        decode_event(payload).map_err(|e| format!("wal_payload (does not decode: {e})"))?;
    let sample_rate: f64 = row.try_get(4).map_err(|e| e.to_string())?;
    if sample_rate != decoded.sample_rate {
        return Err("sample_rate".into());
    }
    let mut checker = Checker {
        row,
        index: CHAIN_COLUMNS.len(),
        first_bad: None,
    };
    columns::visit_event(&decoded.event, &mut checker);
    match checker.first_bad {
        None => Ok(()),
        Some(column) => Err(column.to_string()),
    }
}

async fn verify_stream(
    conn: &mut PgConnection,
    stream: &str,
    verifier: &Verifier,
    external: &[(Checkpoint, String)],
    rows_done: &AtomicU64,
) -> anyhow::Result<(Vec<Finding>, Summary)> {
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT lsn, note FROM audit_chain_checkpoints WHERE stream_id = $1 ORDER BY lsn",
    )
    .bind(stream)
    .fetch_all(&mut *conn)
    .await
    .context("reading audit_chain_checkpoints")?;
    let stored: Vec<StoredCheckpoint> = stored
        .into_iter()
        .map(|(lsn, note)| StoredCheckpoint {
            lsn: lsn.max(0) as u64,
            note,
        })
        .collect();
    let mut auditor = Auditor::new(stream, &stored, verifier);
    for (c, source) in external {
        auditor.external(c.clone(), source.clone());
    }
    let sql = format!(
        "SELECT {} FROM {} WHERE stream_id = $1 ORDER BY lsn",
        select_list(),
        columns::TABLE
    );
    let mut rows = sqlx::query(&sql).bind(stream).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await.context("reading audit_events")? {
        let lsn: i64 = row.try_get(0)?;
        let prev: Option<i64> = row.try_get(1)?;
        let hash: Option<&[u8]> = row.try_get(2)?;
        let payload: Option<Vec<u8>> = row.try_get(3)?;
        let link = match (prev, hash.map(Hash::try_from)) {
            (Some(prev), Some(Ok(hash))) => Some(Link {
                prev_lsn: prev.max(0) as u64,
                hash,
            }),
            _ => None,
        };
        let content = match &payload {
            Some(p) => compare(&row, p),
            None => Ok(()),
        };
        auditor.push(Row {
            lsn: lsn.max(0) as u64,
            link,
            payload,
            content,
        });
        rows_done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(auditor.finish())
}

/// The newest checkpoint record of each stream under `dir` (a WAL directory or
/// one stream's), signed by the key.
fn wal_checkpoints(dir: &Path, verifier: &Verifier) -> anyhow::Result<Vec<(Checkpoint, String)>> {
    let stream_dirs: Vec<PathBuf> = if is_stream_dir(dir) || !list_segments(dir)?.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        list_streams(dir)?
            .into_iter()
            .map(|s| dir.join(s))
            .collect()
    };
    let mut out = Vec::new();
    for stream_dir in stream_dirs {
        let newest =
            newest_checkpoint(&stream_dir, |_, note| Checkpoint::open(note, verifier).ok())?;
        if let Some((c, lsn, segment)) = newest {
            let source = format!(
                "the local WAL's checkpoint at LSN {lsn} ({})",
                segment.display()
            );
            out.push((c, source));
        }
    }
    Ok(out)
}
