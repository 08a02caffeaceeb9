//! `auditwal emit --database-url URL --mode sync`: JSON lines on stdin, each event
//! committed in PostgreSQL, one `event_id row_id` line on stdout per committed event.
//!
//! Reading is pipelined: up to [`IN_FLIGHT`] events are being recorded at once (so
//! the writer's group commit coalesces them and emit is not one round trip per
//! line), but output lines come in input order, each written and flushed only after
//! that event's commit returned. A bad line (not JSON, an invalid event, or a row
//! the database refuses) is reported on stderr with its line number and skipped.
//! Exit: 0 all committed; 1 some lines were refused; 3 the database was unavailable
//! or the outcome of some event is unknown (they are named on stderr); 2 bad usage.
use std::collections::VecDeque;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use auditwal::pg::{PgError, RowId, SyncConfig, SyncWriter};
use auditwal::{AuditEvent, DEFAULT_MAX_EVENT_BYTES};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::emit_wal::ChainEnv;
use super::{CmdResult, Failure, EXIT_FOUND_PROBLEM, EXIT_RUNTIME};

/// Events being recorded at once. Enough for the committers to coalesce; bounded
/// so memory does not grow with the input.
const IN_FLIGHT: usize = 256;

struct Pending {
    line_no: u64,
    event_id: Uuid,
    task: JoinHandle<Result<RowId, PgError>>,
}

#[derive(Default)]
struct Tally {
    committed: u64,
    refused: u64,
    unavailable: u64,
}

pub fn run(database_url: &str) -> CmdResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(emit(database_url))
}

async fn emit(database_url: &str) -> CmdResult {
    let config = {
        let mut c = SyncConfig::default();
        c.timeout = Duration::from_secs(10);
        let chain = ChainEnv::read()?;
        c.chain_key = chain.key;
        c.checkpoint_every = chain.every.unwrap_or(c.checkpoint_every);
        c.checkpoint_interval = chain.interval.unwrap_or(c.checkpoint_interval);
        c
    };
    let writer = match SyncWriter::connect(database_url, config).await {
        Ok(w) => w,
        Err(e @ PgError::Config(_)) => return Err(Failure::usage(anyhow!(e))),
        Err(e) => {
            return Err(Failure::runtime(
                anyhow!(e).context("connecting to the database and applying migrations"),
            ))
        }
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let stdout = std::io::stdout();
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(IN_FLIGHT);
    let mut tally = Tally::default();
    let mut line_no: u64 = 0;
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        match AuditEvent::from_json(&line, DEFAULT_MAX_EVENT_BYTES) {
            Err(e) => {
                eprintln!("auditwal: line {line_no}: {e}");
                tally.refused += 1;
            }
            Ok(event) => {
                let w = writer.clone();
                pending.push_back(Pending {
                    line_no,
                    event_id: event.event_id,
                    task: tokio::spawn(async move { w.record(&event).await }),
                });
            }
        }
        while pending.len() >= IN_FLIGHT {
            if let Some(p) = pending.pop_front() {
                finish(p, &stdout, &mut tally).await?;
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        finish(p, &stdout, &mut tally).await?;
    }
    // With a chain key: the last checkpoint signs the tail.
    writer.close().await;
    tracing::debug!(
        committed = tally.committed,
        refused = tally.refused,
        unavailable = tally.unavailable,
        "emit done"
    );
    if tally.unavailable > 0 {
        eprintln!(
            "auditwal: {} event(s) not confirmed (database unavailable or outcome unknown); \
             re-emit them: one already stored is reported as a duplicate",
            tally.unavailable
        );
        return Ok(ExitCode::from(EXIT_RUNTIME));
    }
    if tally.refused > 0 {
        eprintln!("auditwal: {} line(s) refused", tally.refused);
        return Ok(ExitCode::from(EXIT_FOUND_PROBLEM));
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for one event's commit and prints its line (or its error).
async fn finish(p: Pending, stdout: &std::io::Stdout, tally: &mut Tally) -> Result<(), Failure> {
    let result = p
        .task
        .await
        .map_err(|e| Failure::runtime(anyhow!("a recording task failed: {e}")))?;
    match result {
        Ok(row_id) => {
            let mut out = stdout.lock();
            writeln!(out, "{} {}", p.event_id, row_id)
                .and_then(|()| out.flush())
                .context("writing to stdout")?;
            tally.committed += 1;
        }
        Err(e) => {
            eprintln!("auditwal: line {}: event {}: {e}", p.line_no, p.event_id);
            if e.is_transient() {
                tally.unavailable += 1;
            } else {
                tally.refused += 1;
            }
        }
    }
    Ok(())
}
