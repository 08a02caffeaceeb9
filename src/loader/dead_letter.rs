//! The dead-letter file: rows PostgreSQL refused, kept beside their stream so a
//! poison row never blocks the rows behind it and is never lost either.
//!
//! One JSON line per refused row in `<wal_dir>/<stream>/dead-letter.jsonl`: the
//! stream, the LSN, the reason and SQLSTATE PostgreSQL gave, and the whole event by
//! its schema names (so it can be fixed and re-emitted). A line is fsynced *before*
//! the batch that skips its row commits its checkpoint: after a crash between the
//! two, the row is dead-lettered a second time on restart (a duplicate line with the
//! same stream and LSN), never lost. docs/operations.md says what to do with the file.
//! The write and its fsync run on tokio's blocking pool, not on the loader's
//! worker threads.

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

    /// Appends one refused row and makes it durable (on the blocking pool).
    /// Cancelled meanwhile, the line may still be written: the row is then
    /// dead-lettered twice, which the file allows (module docs).
    pub async fn append(
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
        let (path, file) = (self.path.clone(), self.file.take());
        let (file, written) = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(f) => f,
                None => match OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)
                {
                    Ok(f) => f,
                    Err(e) => return (None, Err(e)),
                },
            };
            let written = file.write_all(&text).and_then(|()| file.sync_data());
            (Some(file), written)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.file = file;
        written
    }
}
