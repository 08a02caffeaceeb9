//! `auditwal inspect` and `auditwal verify`: reading WAL segments by hand.
//!
//! Both take a segment file, a stream directory, or a WAL directory (every stream
//! in it) and read it at rest through `wal::reader` (nothing is assumed to be
//! writing; a torn tail in a segment that a writer is still filling may be an
//! append in progress). `inspect` prints the records (one JSON object a line with
//! `--json`) and reports damage on stderr; `verify` prints only a damage report.
//! Damage that recovery already repaired by zeroing bytes past a torn tail is
//! gone from the segments; its note in the stream's `repairs.jsonl`
//! (`wal::recovery::REPAIRS_FILE`) is reported as damage too, since records may
//! have been lost there.
//! Exit codes follow the contract: 0 clean, 1 damage found, 2 a path that does
//! not exist or is no stream (no segment, no `LOCK`, no `durable.lsn`), 3 an I/O
//! failure. A stream with no segment yet is an empty log: 0 records, exit 0.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use auditwal::chain::{self, Checkpoint, Verifier, WalCheck};
use auditwal::wal::format::Lsn;
use auditwal::wal::payload::WalEvent;
use auditwal::wal::reader::{
    is_stream_dir, list_segments, list_streams, Follow, ReadError, ReadItem, StreamReader,
};
use auditwal::wal::recovery::{read_repairs, REPAIRS_FILE};
use auditwal::AuditEvent;
use chrono::SecondsFormat;
use serde::Serialize;

use super::{CmdResult, Failure, EXIT_FOUND_PROBLEM};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  auditwal inspect /var/lib/auditwal/api --json | jq .action\n  \
auditwal inspect /var/lib/auditwal/api/00000000000000000001.seg --from-lsn 5000\n\n\
Damage is reported on stderr; intact records are still printed. Exit codes: 0 clean,\n\
1 damage found, 2 not a segment / no such path, 3 I/O failure."
)]
pub struct InspectArgs {
    /// A segment file, a stream directory, or a WAL directory.
    pub path: PathBuf,
    /// Start at this LSN.
    #[arg(long)]
    pub from_lsn: Option<u64>,
    /// One JSON object per record, fields by their schema names.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  auditwal verify /var/lib/auditwal/api || echo damaged\n\n\
Exit codes: 0 clean, 1 damage found (the report names segment, byte range and kind),\n\
2 not a segment / no such path, 3 I/O failure."
)]
pub struct VerifyArgs {
    /// A segment file, a stream directory, or a WAL directory.
    pub path: PathBuf,
    /// Also check each checkpoint's signature with this public key (the hash
    /// chain's heads are checked with or without it).
    #[arg(long)]
    pub public_key: Option<PathBuf>,
}

/// One stream (or lone segment file) to read.
struct Target {
    /// The stream's name when PATH is a WAL directory holding several.
    stream: Option<String>,
    reader: StreamReader,
    /// The stream directory whose repair notes belong to this target.
    notes_dir: Option<PathBuf>,
    /// Only the notes about this segment file (PATH was one segment).
    notes_of: Option<String>,
}

/// Works out what PATH is. A path that does not exist or holds no segment is a
/// usage error (exit 2); failing to read a directory is a runtime one.
fn targets(path: &Path, from_lsn: Lsn) -> Result<Vec<Target>, Failure> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Failure::usage(anyhow::anyhow!(
            "{}: {e}; give a segment file, a stream directory or a WAL directory",
            path.display()
        ))
    })?;
    if meta.is_file() {
        let reader = StreamReader::open_segment_file(path, from_lsn).map_err(read_failure)?;
        return Ok(vec![Target {
            stream: None,
            reader,
            notes_dir: path.parent().map(Path::to_path_buf),
            notes_of: path.file_name().map(|n| n.to_string_lossy().into_owned()),
        }]);
    }
    // A stream whose writer stopped before its first segment (only LOCK and
    // durable.lsn) is an empty log: it reads as 0 records, not as a wrong path.
    let segments = list_segments(path).map_err(read_failure)?;
    if !segments.is_empty() || is_stream_dir(path) {
        return Ok(vec![Target {
            stream: None,
            reader: StreamReader::open(path, from_lsn, Follow::AtRest),
            notes_dir: Some(path.to_path_buf()),
            notes_of: None,
        }]);
    }
    let mut out = Vec::new();
    for stream in list_streams(path).map_err(read_failure)? {
        let dir = path.join(&stream);
        if is_stream_dir(&dir) || !list_segments(&dir).map_err(read_failure)?.is_empty() {
            out.push(Target {
                stream: Some(stream),
                reader: StreamReader::open(&dir, from_lsn, Follow::AtRest),
                notes_dir: Some(dir),
                notes_of: None,
            });
        }
    }
    if out.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "{}: not a stream: no segment files (<20-digit LSN>.seg), LOCK or durable.lsn \
             here or in its stream directories",
            path.display()
        )));
    }
    Ok(out)
}

fn read_failure(e: ReadError) -> Failure {
    match e {
        ReadError::NotASegment { .. } => Failure::usage(e),
        other => Failure::runtime(other),
    }
}

/// An event record as `inspect --json` prints it: `lsn`, `kind`, every event
/// field by its schema name, `sample_rate`.
#[derive(Serialize)]
struct JsonRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a str>,
    lsn: Lsn,
    kind: &'static str,
    #[serde(flatten)]
    event: &'a AuditEvent,
    sample_rate: f64,
}

/// A checkpoint record as `inspect --json` prints it: what the note says, and
/// the note itself.
#[derive(Serialize)]
struct JsonCheckpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a str>,
    lsn: Lsn,
    kind: &'static str,
    size: Lsn,
    head: String,
    epoch: Lsn,
    events: u64,
    sampled_out: u64,
    time: i64,
    note: &'a str,
}

#[derive(Serialize)]
struct JsonEndOfSegment<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a str>,
    lsn: Lsn,
    kind: &'static str,
}

fn text_line(stream: Option<&str>, lsn: Lsn, offset: u64, e: &WalEvent) -> String {
    let ev = &e.event;
    let mut line = String::with_capacity(160);
    if let Some(s) = stream {
        line.push_str(s);
        line.push(' ');
    }
    line.push_str(&format!(
        "lsn={lsn} event @{offset} {} {} event_id={}",
        ev.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        ev.action,
        ev.event_id
    ));
    let pair = |a: &Option<String>, b: &Option<String>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(format!(
            "{}:{}",
            a.as_deref().unwrap_or("-"),
            b.as_deref().unwrap_or("-")
        )),
    };
    if let Some(actor) = pair(&ev.actor_type, &ev.actor_id) {
        line.push_str(&format!(" actor={actor}"));
    }
    if let Some(target) = pair(&ev.target_type, &ev.target_id) {
        line.push_str(&format!(" target={target}"));
    }
    for (name, value) in [
        ("target_name", ev.target_name.as_deref()),
        ("tenant", ev.tenant_id.as_deref()),
        ("outcome", ev.outcome.map(|o| o.as_str())),
        ("reason", ev.reason.as_deref()),
        ("request_id", ev.request_id.as_deref()),
    ] {
        if let Some(v) = value {
            line.push_str(&format!(" {name}={v:?}"));
        }
    }
    if let Some(ip) = ev.ip {
        line.push_str(&format!(" ip={ip}"));
    }
    if e.sample_rate != 1.0 {
        line.push_str(&format!(" sample_rate={}", e.sample_rate));
    }
    line
}

/// The repair notes of `t` as damage report lines (see the module docs).
fn repair_reports(t: &Target) -> Result<Vec<String>, Failure> {
    let Some(dir) = &t.notes_dir else {
        return Ok(Vec::new());
    };
    let notes = read_repairs(dir)
        .with_context(|| format!("reading {}", dir.join(REPAIRS_FILE).display()))
        .map_err(Failure::runtime)?;
    let mut out = Vec::new();
    for note in notes {
        match note {
            Ok(r) if t.notes_of.as_ref().is_none_or(|s| *s == r.segment) => out.push(format!(
                "{}/{} (from {REPAIRS_FILE}; move that file away once reviewed)",
                dir.display(),
                r.report()
            )),
            Ok(_) => {}
            Err(line) => out.push(format!(
                "{}: unreadable repair note: {line}",
                dir.join(REPAIRS_FILE).display()
            )),
        }
    }
    Ok(out)
}

/// What reading all targets found.
#[derive(Default)]
struct Tally {
    records: u64,
    segments: u64,
    damage: u64,
}

/// Reads every target to its end, handing each item to `on_item`, and counts.
/// Repair notes go to `on_repair` first, as damage.
fn read_all(
    targets: &mut [Target],
    mut on_repair: impl FnMut(Option<&str>, &str) -> io::Result<()>,
    mut on_item: impl FnMut(Option<&str>, &ReadItem) -> io::Result<()>,
) -> Result<Tally, Failure> {
    let mut tally = Tally::default();
    for t in targets.iter_mut() {
        for text in repair_reports(t)? {
            tally.damage += 1;
            if let Err(e) = on_repair(t.stream.as_deref(), &text) {
                return match e.kind() {
                    io::ErrorKind::BrokenPipe => Ok(tally),
                    _ => Err(Failure::runtime(
                        anyhow::Error::new(e).context("writing to stdout"),
                    )),
                };
            }
        }
        loop {
            let item = t
                .reader
                .next_item(None)
                .context("reading the WAL")
                .map_err(Failure::runtime)?;
            let Some(item) = item else { break };
            match &item {
                ReadItem::Event { .. } | ReadItem::Checkpoint { .. } => tally.records += 1,
                ReadItem::SegmentConsumed { sealed, .. } => {
                    tally.segments += 1;
                    if *sealed {
                        tally.records += 1;
                    }
                }
                _ => {}
            }
            if item.is_damage() {
                tally.damage += 1;
            }
            match on_item(t.stream.as_deref(), &item) {
                Ok(()) => {}
                // `inspect ... | head` closed the pipe: stop quietly.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(tally),
                Err(e) => {
                    return Err(Failure::runtime(
                        anyhow::Error::new(e).context("writing to stdout"),
                    ))
                }
            }
        }
    }
    Ok(tally)
}

pub fn run_inspect(args: InspectArgs) -> CmdResult {
    let from_lsn = args.from_lsn.unwrap_or(1);
    let mut targets = targets(&args.path, from_lsn)?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let json = args.json;
    let tally = read_all(
        &mut targets,
        |_, text| {
            eprintln!("damage: {text}");
            Ok(())
        },
        |stream, item| {
            match item {
                ReadItem::Checkpoint { lsn, note, .. } => {
                    let text = String::from_utf8_lossy(note);
                    let prefix = stream.map(|s| format!("{s} ")).unwrap_or_default();
                    match Checkpoint::parse(note) {
                        Ok(c) if json => {
                            let rec = JsonCheckpoint {
                                stream_id: stream,
                                lsn: *lsn,
                                kind: "checkpoint",
                                size: c.size,
                                head: chain::hex(&c.head),
                                epoch: c.epoch,
                                events: c.events,
                                sampled_out: c.sampled_out,
                                time: c.time,
                                note: &text,
                            };
                            serde_json::to_writer(&mut out, &rec).map_err(io::Error::from)?;
                            out.write_all(b"\n")?;
                        }
                        Ok(c) => writeln!(
                            out,
                            "{prefix}lsn={lsn} checkpoint size={} head={} epoch={} events={}",
                            c.size,
                            chain::hex(&c.head),
                            c.epoch,
                            c.events
                        )?,
                        Err(e) => {
                            out.flush()?;
                            eprintln!("{prefix}lsn={lsn} checkpoint that does not parse: {e}");
                        }
                    }
                }
                ReadItem::Event {
                    lsn, offset, event, ..
                } => {
                    if json {
                        let rec = JsonRecord {
                            stream_id: stream,
                            lsn: *lsn,
                            kind: "event",
                            event: &event.event,
                            sample_rate: event.sample_rate,
                        };
                        serde_json::to_writer(&mut out, &rec).map_err(io::Error::from)?;
                        out.write_all(b"\n")?;
                    } else {
                        writeln!(out, "{}", text_line(stream, *lsn, *offset, event))?;
                    }
                }
                ReadItem::SegmentConsumed {
                    segment,
                    last_lsn: Some(lsn),
                    sealed: true,
                    ..
                } if *lsn >= from_lsn => {
                    if json {
                        let rec = JsonEndOfSegment {
                            stream_id: stream,
                            lsn: *lsn,
                            kind: "end_of_segment",
                        };
                        serde_json::to_writer(&mut out, &rec).map_err(io::Error::from)?;
                        out.write_all(b"\n")?;
                    } else {
                        let prefix = stream.map(|s| format!("{s} ")).unwrap_or_default();
                        writeln!(
                            out,
                            "{prefix}lsn={lsn} end_of_segment (sealed {})",
                            segment.display()
                        )?;
                    }
                }
                other => {
                    if let Some(text) = other.damage_report() {
                        // Keep stdout and stderr in order for a reader of both.
                        out.flush()?;
                        eprintln!("damage: {text}");
                    }
                }
            }
            Ok(())
        },
    )?;
    match out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            return Err(Failure::runtime(
                anyhow::Error::new(e).context("writing to stdout"),
            ))
        }
        _ => {}
    }
    if tally.damage > 0 {
        eprintln!(
            "{}: {} damage report(s); run `auditwal verify` for a summary",
            args.path.display(),
            tally.damage
        );
        return Ok(ExitCode::from(EXIT_FOUND_PROBLEM));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_verify(args: VerifyArgs) -> CmdResult {
    let verifier = match &args.public_key {
        Some(path) => Some(Verifier::read(path).map_err(Failure::usage)?),
        None => None,
    };
    let mut targets = targets(&args.path, 1)?;
    let stdout = io::stdout();
    let out = std::cell::RefCell::new(stdout.lock());
    let line = |stream: Option<&str>, text: &str| match stream {
        Some(s) => writeln!(out.borrow_mut(), "damage: stream {s}: {text}"),
        None => writeln!(out.borrow_mut(), "damage: {text}"),
    };
    // The hash chain of the stream being read (targets are read one by one).
    let mut chain: Option<(Option<String>, WalCheck)> = None;
    let mut chain_problems = 0u64;
    let tally = read_all(&mut targets, line, |stream, item| {
        if chain.as_ref().is_none_or(|(s, _)| s.as_deref() != stream) {
            chain = Some((
                stream.map(str::to_string),
                WalCheck::new(stream, verifier.clone()),
            ));
        }
        let check = chain.as_mut().map(|(_, c)| c);
        match item {
            ReadItem::Event { lsn, payload, .. } => {
                if let Some(c) = check {
                    c.event(*lsn, payload);
                }
                Ok(())
            }
            ReadItem::Checkpoint { lsn, note, .. } => {
                match check.and_then(|c| c.checkpoint(*lsn, note)) {
                    Some(text) => {
                        chain_problems += 1;
                        line(stream, &text)
                    }
                    None => Ok(()),
                }
            }
            other => match other.damage_report() {
                Some(text) => line(stream, &text),
                None => Ok(()),
            },
        }
    })?;
    let damage = tally.damage + chain_problems;
    let mut out = out.into_inner();
    let verdict = if damage == 0 {
        "clean".to_string()
    } else {
        format!("{damage} problem(s) found")
    };
    let summary = format!(
        "{}: {} record(s) in {} segment(s): {verdict}",
        args.path.display(),
        tally.records,
        tally.segments
    );
    // A closed pipe must not turn a damage verdict into success: the exit code
    // carries the verdict either way.
    let _ = writeln!(out, "{summary}");
    if damage > 0 {
        return Ok(ExitCode::from(EXIT_FOUND_PROBLEM));
    }
    Ok(ExitCode::SUCCESS)
}
