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

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use auditwal::columns::{self, ColumnVisitor, Value, EVENT_COLUMNS, VERIFY_CHAIN_COLUMNS};
use auditwal::wal::payload::decode_event;
use auditwal::wal::reader::{is_stream_dir, list_segments, list_streams, newest_checkpoint};
use auditwal::wal::Lsn;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, Row as _, ValueRef as _};

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
    /// Only what was signed since this time (RFC 3339, e.g. 2026-11-01T00:00:00Z):
    /// each stream's walk starts at its newest checkpoint signed at or before
    /// it, whose head anchors the first row after it.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
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

/// Rows in no chain: `stream_id` NULL (a sync writer without the key).
#[derive(Serialize)]
struct JsonUnchained {
    stream_id: Option<&'static str>,
    finding: &'static str,
    rows: i64,
    first_id: Option<i64>,
    last_id: Option<i64>,
    description: String,
}

fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{text:?} is not an RFC 3339 time (2026-11-01T00:00:00Z): {e}"))
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
        sqlx::query(columns::VERIFY_SESSION_SQL)
            .execute(&mut conn)
            .await
            .context("setting up the session")
            .map_err(Failure::runtime)?;
        let stored = read_checkpoints(&mut conn, args.stream.as_deref())
            .await
            .map_err(Failure::runtime)?;
        let mut streams = list_db_streams(&mut conn, &stored, &external)
            .await
            .map_err(Failure::runtime)?;
        if let Some(only) = &args.stream {
            streams.retain(|s| s == only);
            streams.insert(only.clone());
        }
        let anchors = read_anchors(&mut conn).await.map_err(Failure::runtime)?;
        let starts = match args.since {
            Some(t) => since_starts(&stored, &verifier, t),
            None => HashMap::new(),
        };
        let rows_done = Arc::new(AtomicU64::new(0));
        let bar = progress::wanted(args.no_progress || args.json).then(|| {
            let count = rows_done.clone();
            progress::Progress::start("verify", None, move || count.load(Ordering::Relaxed))
        });
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let mut total_findings = 0;
        if args.stream.is_none() {
            let unchained = unchained_rows(&mut conn, args.since)
                .await
                .map_err(Failure::runtime)?;
            if let Some(u) = unchained {
                total_findings += 1;
                report_unchained(&mut out, args.json, &u)
                    .context("writing to stdout")
                    .map_err(Failure::runtime)?;
            }
        }
        let walk = Walk {
            verifier: &verifier,
            stored: &stored,
            external: &external,
            starts: &starts,
            anchors: &anchors,
        };
        let mut on_stream = |stream: &str, findings: Vec<Finding>, summary: Summary, secs: f64| {
            total_findings += findings.len();
            report(&mut out, args.json, stream, &findings, &summary, secs)
                .context("writing to stdout")
        };
        walk.run(
            &mut conn,
            args.stream.as_deref(),
            &streams,
            &rows_done,
            &mut on_stream,
        )
        .await
        .map_err(Failure::runtime)?;
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
        if let Some(lsn) = summary.retention_cut {
            line.push_str(&format!(
                "; the rows up to LSN {lsn} were dropped by retention (the chain continues \
                 from the hash recorded at the cut)"
            ));
        }
        if let Some(lsn) = summary.unanchored_from {
            line.push_str(&format!(
                "; the rows before LSN {} are gone and neither a checkpoint nor a retention \
                 anchor holds the hash there, so the first row's link is not checked",
                lsn + 1
            ));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Every stored checkpoint (of `only`, when given), by stream, in LSN order.
async fn read_checkpoints(
    conn: &mut PgConnection,
    only: Option<&str>,
) -> anyhow::Result<BTreeMap<String, Vec<StoredCheckpoint>>> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT stream_id, lsn, note FROM audit_chain_checkpoints \
         WHERE $1::text IS NULL OR stream_id = $1 ORDER BY stream_id, lsn",
    )
    .bind(only)
    .fetch_all(conn)
    .await
    .context("reading audit_chain_checkpoints (is the schema migrated?)")?;
    let mut by_stream: BTreeMap<String, Vec<StoredCheckpoint>> = BTreeMap::new();
    for (stream, lsn, note) in rows {
        by_stream.entry(stream).or_default().push(StoredCheckpoint {
            lsn: lsn.max(0) as u64,
            note,
        });
    }
    Ok(by_stream)
}

/// Per stream, the newest retention anchor (`audit_chain_anchors`, written by
/// `audit_drop_partitions_before`).
async fn read_anchors(conn: &mut PgConnection) -> anyhow::Result<HashMap<String, (Lsn, Hash)>> {
    let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT DISTINCT ON (stream_id) stream_id, lsn, hash FROM audit_chain_anchors \
         ORDER BY stream_id, lsn DESC",
    )
    .fetch_all(conn)
    .await
    .context("reading audit_chain_anchors (is the schema migrated?)")?;
    Ok(rows
        .into_iter()
        .filter_map(|(stream, lsn, hash)| {
            let hash = Hash::try_from(hash.as_slice()).ok()?;
            Some((stream, (lsn.max(0) as u64, hash)))
        })
        .collect())
}

/// Every stream the loader or a checkpoint knows (streams with rows are found
/// by the walk itself).
async fn list_db_streams(
    conn: &mut PgConnection,
    stored: &BTreeMap<String, Vec<StoredCheckpoint>>,
    external: &[(Checkpoint, String)],
) -> anyhow::Result<BTreeSet<String>> {
    let loaded: Vec<String> = sqlx::query_scalar("SELECT stream_id FROM audit_checkpoints")
        .fetch_all(conn)
        .await
        .context("listing the loaded streams (is the schema migrated?)")?;
    let mut streams: BTreeSet<String> = loaded.into_iter().collect();
    streams.extend(stored.keys().cloned());
    streams.extend(external.iter().map(|(c, _)| c.stream.clone()));
    Ok(streams)
}

/// For `--since t`: per stream, the LSN its walk starts after, the size of
/// its newest checkpoint signed by the key at or before `t`.
fn since_starts(
    stored: &BTreeMap<String, Vec<StoredCheckpoint>>,
    verifier: &Verifier,
    t: DateTime<Utc>,
) -> HashMap<String, Lsn> {
    let t = t.timestamp();
    stored
        .iter()
        .filter_map(|(stream, checkpoints)| {
            checkpoints
                .iter()
                .filter_map(|c| Checkpoint::open(c.note.as_bytes(), verifier).ok())
                .filter(|c| c.time <= t && &c.stream == stream)
                .map(|c| c.size)
                .max()
                .map(|size| (stream.clone(), size))
        })
        .collect()
}

/// Rows in no chain: `stream_id` NULL.
struct Unchained {
    rows: i64,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

async fn unchained_rows(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Option<Unchained>> {
    let (rows, first_id, last_id): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT count(*), min(id), max(id) FROM audit_events \
         WHERE stream_id IS NULL AND ($1::timestamptz IS NULL OR recorded_at >= $1)",
    )
    .bind(since)
    .fetch_one(conn)
    .await
    .context("counting the rows in no chain")?;
    Ok((rows > 0).then_some(Unchained {
        rows,
        first_id,
        last_id,
    }))
}

fn report_unchained(out: &mut impl Write, json: bool, u: &Unchained) -> io::Result<()> {
    let description = format!(
        "{} row(s) are in no chain (stream_id NULL, ids {}..={}): sync rows written without \
         a chain key, or rows inserted by hand; nothing vouches for them",
        u.rows,
        u.first_id.unwrap_or(0),
        u.last_id.unwrap_or(0)
    );
    if json {
        let line = JsonUnchained {
            stream_id: None,
            finding: "unchained_rows",
            rows: u.rows,
            first_id: u.first_id,
            last_id: u.last_id,
            description,
        };
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)
    } else {
        writeln!(out, "finding: {description}")
    }
}

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

/// `stored` (jsonb's text) against `record` (the event's JSON text). Fast
/// path: the record rendered as jsonb prints it; on any difference (a number
/// jsonb normalises, a duplicate key), equality by value.
fn json_text_eq(stored: &str, record: &str) -> bool {
    if stored == record {
        return true;
    }
    let Ok(record) = serde_json::from_str::<serde_json::Value>(record) else {
        return false;
    };
    let mut rendered = String::with_capacity(stored.len());
    jsonb_text(&record, &mut rendered);
    if rendered == stored {
        return true;
    }
    serde_json::from_str::<serde_json::Value>(stored).is_ok_and(|s| json_eq(&s, &record))
}

/// `v` as PostgreSQL prints a jsonb value: object keys shortest first, then
/// bytewise; `": "` and `", "` between; strings escaped as JSON requires.
fn jsonb_text(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            out.push('{');
            for (n, k) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                jsonb_text(&m[k], out);
            }
            out.push('}');
        }
        J::Array(a) => {
            out.push('[');
            for (n, x) in a.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                jsonb_text(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Compares each event column of a row with the record's value, in
/// [`EVENT_COLUMNS`] order (as [`columns::verify_select_list`] reads them);
/// remembers the first that differs.
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
        // Text columns are compared as the bytes on the wire (UTF-8, the same
        // in the binary format): no UTF-8 check, no type check per value.
        let bytes = || -> Result<Option<&[u8]>, ()> {
            let v = row.try_get_raw(i).map_err(|_| ())?;
            match v.is_null() {
                true => Ok(None),
                false => v.as_bytes().map(Some).map_err(|_| ()),
            }
        };
        let text_is = |want: Option<&str>| bytes().is_ok_and(|g| g == want.map(str::as_bytes));
        let same = match value {
            Value::Uuid(u) => row
                .try_get_unchecked::<uuid::Uuid, _>(i)
                .is_ok_and(|g| g == *u),
            Value::Timestamptz(t) => row
                .try_get_unchecked::<i64, _>(i)
                .is_ok_and(|g| g == t.timestamp_micros()),
            Value::Text(s) => text_is(Some(s)),
            Value::OptText(s) => text_is(s),
            Value::Outcome(o) => text_is(o.map(|o| o.as_str())),
            Value::Inet(ip) => row
                .try_get_unchecked::<Option<&str>, _>(i)
                .is_ok_and(|g| g.map(|g| g.parse::<IpAddr>().ok()) == ip.map(Some)),
            Value::Jsonb(j) => bytes().is_ok_and(|g| match (g, j) {
                (None, None) => true,
                (Some(g), Some(j)) => {
                    std::str::from_utf8(g).is_ok_and(|g| json_text_eq(g, j.as_str()))
                }
                _ => false,
            }),
        };
        if !same {
            self.first_bad = Some(EVENT_COLUMNS[i - VERIFY_CHAIN_COLUMNS.len()].name);
        }
    }
}

/// `Ok(())`, or the first column that differs from the record.
fn compare(row: &sqlx::postgres::PgRow, payload: &[u8]) -> Result<(), String> {
    let decoded =
        decode_event(payload).map_err(|e| format!("wal_payload (does not decode: {e})"))?;
    let sample_rate: f64 = row.try_get(5).map_err(|e| e.to_string())?;
    if sample_rate != decoded.sample_rate {
        return Err("sample_rate".into());
    }
    let mut checker = Checker {
        row,
        index: VERIFY_CHAIN_COLUMNS.len(),
        first_bad: None,
    };
    columns::visit_event(&decoded.event, &mut checker);
    match checker.first_bad {
        None => Ok(()),
        Some(column) => Err(column.to_string()),
    }
}

/// What every stream's walk starts from.
struct Walk<'a> {
    verifier: &'a Verifier,
    stored: &'a BTreeMap<String, Vec<StoredCheckpoint>>,
    external: &'a [(Checkpoint, String)],
    /// `--since`: the LSN each stream's walk starts after.
    starts: &'a HashMap<String, Lsn>,
    /// Per stream, where retention last cut it.
    anchors: &'a HashMap<String, (Lsn, Hash)>,
}

impl Walk<'_> {
    fn auditor(&self, stream: &str) -> Auditor {
        let start = self.starts.get(stream).copied().unwrap_or(0);
        // With --since, the checkpoints stored before the start vouch for rows
        // the walk does not read.
        let stored: Vec<StoredCheckpoint> = self
            .stored
            .get(stream)
            .map(|v| v.iter().filter(|c| c.lsn > start).cloned().collect())
            .unwrap_or_default();
        let mut auditor = Auditor::new(stream, &stored, self.verifier);
        if start > 0 {
            auditor.start_after(start);
        }
        if let Some(&(lsn, hash)) = self.anchors.get(stream) {
            auditor.retention_anchor(lsn, hash);
        }
        for (c, source) in self.external {
            auditor.external(c.clone(), source.clone());
        }
        auditor
    }

    /// One ordered read of every chained row (of `only`), a stream at a time,
    /// then the `known` streams that have no rows; `done` gets each stream's
    /// findings.
    async fn run(
        &self,
        conn: &mut PgConnection,
        only: Option<&str>,
        known: &BTreeSet<String>,
        rows_done: &AtomicU64,
        done: &mut impl FnMut(&str, Vec<Finding>, Summary, f64) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let (start_streams, start_lsns): (Vec<&str>, Vec<i64>) = self
            .starts
            .iter()
            .map(|(s, &lsn)| (s.as_str(), lsn as i64))
            .unzip();
        let sql = columns::verify_walk_sql();
        let mut rows = sqlx::query(&sql)
            .bind(only)
            .bind(start_streams)
            .bind(start_lsns)
            .fetch(&mut *conn);
        let mut seen = BTreeSet::new();
        let mut current: Option<(String, Auditor, Instant)> = None;
        while let Some(row) = rows.try_next().await.context("reading audit_events")? {
            let stream: &str = row.try_get(0)?;
            if current.as_ref().map(|(s, _, _)| s.as_str()) != Some(stream) {
                if let Some((s, auditor, started)) = current.take() {
                    let (findings, summary) = auditor.finish();
                    done(&s, findings, summary, started.elapsed().as_secs_f64())?;
                }
                seen.insert(stream.to_string());
                current = Some((stream.to_string(), self.auditor(stream), Instant::now()));
            }
            let Some((_, auditor, _)) = current.as_mut() else {
                continue;
            };
            auditor.push(chained_row(&row)?);
            rows_done.fetch_add(1, Ordering::Relaxed);
        }
        drop(rows);
        if let Some((s, auditor, started)) = current.take() {
            let (findings, summary) = auditor.finish();
            done(&s, findings, summary, started.elapsed().as_secs_f64())?;
        }
        for stream in known.difference(&seen) {
            let started = Instant::now();
            let (findings, summary) = self.auditor(stream).finish();
            done(stream, findings, summary, started.elapsed().as_secs_f64())?;
        }
        Ok(())
    }
}

/// One row of the walk's SELECT as the auditor takes it.
fn chained_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<Row> {
    let lsn: i64 = row.try_get(1)?;
    let prev: Option<i64> = row.try_get(2)?;
    let hash: Option<&[u8]> = row.try_get(3)?;
    let payload: Option<Vec<u8>> = row.try_get(4)?;
    let link = match (prev, hash.map(Hash::try_from)) {
        (Some(prev), Some(Ok(hash))) => Some(Link {
            prev_lsn: prev.max(0) as u64,
            hash,
        }),
        _ => None,
    };
    let content = match &payload {
        Some(p) => compare(row, p),
        None => Ok(()),
    };
    Ok(Row {
        lsn: lsn.max(0) as u64,
        link,
        payload,
        content,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_rendered_as_postgresql_prints_jsonb() {
        // psql: SELECT '{"plan":"free","n":1,"ratio":1.0,"tags":["a","b"],
        // "é":"x\\ny/","ab":{},"b":[]}'::jsonb (PostgreSQL 15).
        let record =
            r#"{"plan":"free","n":1,"ratio":1.0,"tags":["a","b"],"é":"x\\ny/","ab":{},"b":[]}"#;
        let stored = r#"{"b": [], "n": 1, "ab": {}, "é": "x\\ny/", "plan": "free", "tags": ["a", "b"], "ratio": 1.0}"#;
        let mut rendered = String::new();
        jsonb_text(&serde_json::from_str(record).expect("json"), &mut rendered);
        assert_eq!(rendered, stored);
        assert!(json_text_eq(stored, record));
        // What jsonb normalises goes the slow way, and still compares equal.
        assert!(json_text_eq(r#"{"x": 100}"#, r#"{"x":1e2}"#));
        assert!(!json_text_eq(r#"{"x": 101}"#, r#"{"x":1e2}"#));
        assert!(!json_text_eq(stored, r#"{"plan":"pro"}"#));
    }
}
