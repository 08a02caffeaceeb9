//! The dead-letter file: rows PostgreSQL refused, kept beside their stream so a
//! poison row never blocks the rows behind it and is never lost either.
//!
//! One JSON line per refused row in `<wal_dir>/<stream>/dead-letter.jsonl`: the
//! stream, the LSN, the reason and SQLSTATE PostgreSQL gave, and the whole event by
//! its schema names (so it can be fixed and re-emitted). A line is fsynced *before*
//! the batch that skips its row commits its checkpoint: after a crash between the
//! two, the row is dead-lettered a second time on restart (a duplicate line with the
//! same stream and LSN), never lost. docs/operations.md says what to do with the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::event::AuditEvent;

/// File name of the dead-letter file inside a stream directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

#[derive(Serialize)]
struct DeadLetterLine<'a> {
    stream_id: &'a str,
    lsn: u64,
    sqlstate: Option<&'a str>,
    reason: &'a str,
    sample_rate: f64,
    event: &'a AuditEvent,
}

/// An open dead-letter file for one stream.
pub struct DeadLetterFile {
    path: PathBuf,
    file: Option<File>,
}

impl DeadLetterFile {
    /// Names the file; it is created on the first refused row only.
    pub fn new(stream_dir: &Path) -> Self {
        DeadLetterFile {
            path: stream_dir.join(DEAD_LETTER_FILE),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one refused row and makes it durable.
    pub fn append(
        &mut self,
        stream_id: &str,
        lsn: u64,
        sqlstate: Option<&str>,
        reason: &str,
        sample_rate: f64,
        event: &AuditEvent,
    ) -> std::io::Result<()> {
        let line = DeadLetterLine {
            stream_id,
            lsn,
            sqlstate,
            reason,
            sample_rate,
            event,
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?,
            ),
        };
        file.write_all(&text)?;
        file.sync_data()
    }
}
