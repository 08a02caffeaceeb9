//! `auditwal emit --wal-dir DIR [--mode async|durable] [--stream NAME]`: JSON
//! lines on stdin into one WAL stream, one acknowledged event_id per line on
//! stdout.
//!
//! An id is printed (and stdout flushed) only after that event's append
//! returned: in async mode once the record is in the segment file (survives
//! kill -9), in durable mode once an fsync covered it (survives power loss).
//! Durable mode reads and appends on one thread and waits for durability on
//! another, so a fast producer gets many events per fsync instead of one.
//!
//! A line that is not a valid event is reported on stderr with its line number
//! and skipped; the rest goes on, and the exit code is 1 at the end (the work
//! found a problem). A WAL failure stops the command with exit code 3; every id
//! already printed stays acknowledged. At end of input the writer is closed,
//! which fsyncs everything written.
//!
//! `AUDITWAL_SEGMENT_SIZE` (the library's setting, e.g. `64KiB`) overrides the
//! segment size, for tests and small devices; `AUDITWAL_WAL_SEGMENT_SIZE` is the
//! older name of the same thing, still read when the first is unset.

use std::io::{self, BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::Context;
use auditwal::wal::{Lsn, WalConfig, WalError, WalWriter};
use auditwal::{AuditEvent, DEFAULT_MAX_EVENT_BYTES};

use super::{CmdResult, Failure, EXIT_FOUND_PROBLEM};

/// Environment overrides of the segment size: the library's name, then the
/// name this command read first.
const SEGMENT_SIZE_ENVS: [&str; 2] = ["AUDITWAL_SEGMENT_SIZE", "AUDITWAL_WAL_SEGMENT_SIZE"];

/// Bound on appended-but-not-yet-durable events queued for the printing thread.
const DURABLE_PIPELINE: usize = 4096;

/// The hash-chain settings from the library's environment variables
/// (docs/integrity.md): `AUDITWAL_CHAIN_KEY`, `AUDITWAL_CHECKPOINT_EVERY`,
/// `AUDITWAL_CHECKPOINT_INTERVAL_MS`. Shared with `emit --mode sync`.
pub(super) struct ChainEnv {
    pub key: Option<std::path::PathBuf>,
    pub every: Option<u64>,
    pub interval: Option<std::time::Duration>,
}

impl ChainEnv {
    pub(super) fn read() -> Result<ChainEnv, Failure> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str| -> Result<Option<u64>, Failure> {
            var(name)
                .map(|text| {
                    text.trim().parse::<u64>().map_err(|_| {
                        Failure::usage(anyhow::anyhow!("{name}={text:?} is not a whole number"))
                    })
                })
                .transpose()
        };
        Ok(ChainEnv {
            key: var("AUDITWAL_CHAIN_KEY").map(Into::into),
            every: number("AUDITWAL_CHECKPOINT_EVERY")?,
            interval: number("AUDITWAL_CHECKPOINT_INTERVAL_MS")?
                .map(std::time::Duration::from_millis),
        })
    }
}

fn chain_from_env(config: &mut WalConfig) -> Result<(), Failure> {
    let env = ChainEnv::read()?;
    config.chain_key = env.key.or(config.chain_key.take());
    config.checkpoint_every = env.every.unwrap_or(config.checkpoint_every);
    config.checkpoint_interval = env.interval.unwrap_or(config.checkpoint_interval);
    Ok(())
}

pub fn run(wal_dir: &Path, stream: &str, durable: bool) -> CmdResult {
    let mut config = WalConfig::new(wal_dir, stream);
    let from_env = SEGMENT_SIZE_ENVS
        .iter()
        .find_map(|name| std::env::var(name).ok().map(|text| (name, text)));
    if let Some((name, text)) = from_env {
        config.segment_size = auditwal::config::parse_size(&text)
            .map_err(|e| Failure::usage(anyhow::anyhow!("{name}={text:?} is not a size: {e}")))?;
    }
    chain_from_env(&mut config)?;
    let wal = WalWriter::open(config).map_err(|e| {
        let usage = matches!(
            e,
            WalError::InvalidStreamName { .. } | WalError::InvalidConfig { .. }
        );
        let err = anyhow::Error::new(e).context(format!(
            "cannot open WAL stream `{stream}` in {}",
            wal_dir.display()
        ));
        if usage {
            Failure::usage(err)
        } else {
            Failure::runtime(err)
        }
    })?;
    let outcome = if durable {
        emit_durable(&wal)
    } else {
        emit_async(&wal)
    };
    // Close even after a failure: what was appended gets its fsync.
    let closed = wal.close().context("closing the WAL (final fsync)");
    let rejected = outcome?;
    closed?;
    if rejected > 0 {
        eprintln!("auditwal: {rejected} input line(s) rejected (see above); all other events were written");
        return Ok(ExitCode::from(EXIT_FOUND_PROBLEM));
    }
    Ok(ExitCode::SUCCESS)
}

/// One input line: its number and the event it holds, or why it holds none.
enum Line {
    Event(usize, Box<AuditEvent>),
    Rejected,
    End,
}

/// Reads lines until one holds an event (reporting bad ones on stderr).
fn next_event(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    line_no: &mut usize,
) -> anyhow::Result<Line> {
    buf.clear();
    let n = input
        .read_until(b'\n', buf)
        .context("reading events from stdin")?;
    if n == 0 {
        return Ok(Line::End);
    }
    *line_no += 1;
    let text = match std::str::from_utf8(buf) {
        Ok(t) => t.trim(),
        Err(e) => {
            eprintln!("auditwal: line {line_no}: not UTF-8: {e}");
            return Ok(Line::Rejected);
        }
    };
    if text.is_empty() {
        return next_event(input, buf, line_no);
    }
    match AuditEvent::from_json(text, DEFAULT_MAX_EVENT_BYTES) {
        Ok(event) => Ok(Line::Event(*line_no, Box::new(event))),
        Err(e) => {
            eprintln!("auditwal: line {line_no}: {e}");
            Ok(Line::Rejected)
        }
    }
}

fn print_ack(out: &mut impl Write, event: &AuditEvent) -> anyhow::Result<()> {
    writeln!(out, "{}", event.event_id)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Async mode: append, print, next. Returns the number of rejected lines.
fn emit_async(wal: &WalWriter) -> Result<u64, Failure> {
    let mut out = io::stdout().lock();
    Ok(append_each(wal, |_, event| {
        print_ack(&mut out, event)?;
        Ok(true)
    })?)
}

/// Reads events from stdin to its end, appends each to `wal` and then hands
/// it with its LSN to `then`, until `then` answers false. Returns the number
/// of rejected lines.
fn append_each(
    wal: &WalWriter,
    mut then: impl FnMut(Lsn, &AuditEvent) -> anyhow::Result<bool>,
) -> anyhow::Result<u64> {
    let mut input = io::stdin().lock();
    let (mut buf, mut line_no, mut rejected) = (Vec::new(), 0usize, 0u64);
    loop {
        match next_event(&mut input, &mut buf, &mut line_no)? {
            Line::End => return Ok(rejected),
            Line::Rejected => rejected += 1,
            Line::Event(n, event) => {
                let lsn = wal
                    .append(&event)
                    .with_context(|| format!("line {n}: appending event {}", event.event_id))?;
                if !then(lsn, &event)? {
                    return Ok(rejected);
                }
            }
        }
    }
}

/// Durable mode: this thread reads and appends; a second one waits for each
/// LSN to be durable and prints the id, in input order.
fn emit_durable(wal: &WalWriter) -> Result<u64, Failure> {
    let (tx, rx) = mpsc::sync_channel::<(Lsn, uuid::Uuid)>(DURABLE_PIPELINE);
    std::thread::scope(|scope| {
        let printer = scope.spawn(move || -> anyhow::Result<()> {
            let mut out = io::stdout().lock();
            for (lsn, id) in rx {
                wal.wait_durable(lsn)
                    .with_context(|| format!("waiting for event {id} (LSN {lsn}) to be durable"))?;
                writeln!(out, "{id}")
                    .and_then(|()| out.flush())
                    .context("writing to stdout")?;
            }
            Ok(())
        });
        // A failed send means the printer stopped; its error is reported below.
        let appended = append_each(wal, |lsn, event| Ok(tx.send((lsn, event.event_id)).is_ok()));
        drop(tx);
        let printed = match printer.join() {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the acknowledgement thread panicked")),
        };
        printed?;
        Ok(appended?)
    })
}
