//! One loader batch as one transaction: lock the stream's checkpoint, COPY the rows,
//! advance the checkpoint, COMMIT.
//!
//! Rows and checkpoint commit together or not at all, which is what makes loading
//! exactly-once. Every attempt starts by reading the checkpoint under its row lock,
//! so a batch whose COMMIT was lost with the connection (it may have committed) is
//! recognised as already loaded instead of being sent twice. This module knows one
//! transaction; retries, reconnects and dead-letter files are the loader's.
//!
//! [`commit_within`] bounds the transaction by progress, not by its total time:
//! each round trip must be answered, and each [`COPY_CHUNK`] of the COPY accepted
//! by the socket, within the link timeout. A batch that needs minutes is fine as
//! long as it keeps moving; a link that died under it is noticed within one
//! timeout, whatever the batch size. (COPY ignores `statement_timeout`, so the
//! limit has to be the client's.)

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::event::AuditEvent;
use crate::loader::checkpoint;
use crate::chain::{Checkpoint, Hash, Link};
use crate::loader::copy::{copy_statement, CopyBuffer, RowOrigin};

/// One row of a batch, decoded from the WAL.
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub lsn: u64,
    pub event: AuditEvent,
    pub sample_rate: f64,
    /// The WAL record's payload (stored in `wal_payload`).
    pub payload: Vec<u8>,
    /// The row's hash-chain link; `None` where the reader does not know the
    /// chain yet (replay of an archive, before its first checkpoint).
    pub link: Option<Link>,
}

/// A signed checkpoint read from the WAL, to store with the batch.
#[derive(Debug, Clone)]
pub struct SignedCheckpoint {
    pub lsn: u64,
    pub checkpoint: Checkpoint,
    pub note: String,
}

/// Rows of one stream, in LSN order, and the checkpoint they bring the stream to.
/// `end_lsn` can be past the last row's LSN: end-of-segment records and corrupt
/// ranges consume LSNs but load no row.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub rows: Vec<BatchRow>,
    pub end_lsn: u64,
    /// Where the chain stands after the batch (its last link's LSN and hash),
    /// stored with the checkpoint; `None` leaves it as it is.
    pub chain: Option<(u64, Hash)>,
    /// The signed checkpoints read in the batch's LSN range.
    pub signed: Vec<SignedCheckpoint>,
}

/// What a commit attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Rows and checkpoint committed.
    Committed { rows: u64 },
    /// The checkpoint was already at or past `end_lsn`: nothing sent.
    AlreadyLoaded { checkpoint: u64 },
}

/// Why an attempt failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// PostgreSQL refused one row's data (SQLSTATE class 22 or 23): dead-letter
    /// that row and try again without it. `index` is into `Batch::rows`.
    #[error("row at index {index} refused ({sqlstate}): {message}")]
    PoisonRow {
        index: usize,
        sqlstate: String,
        message: String,
    },
    /// PostgreSQL refused the data but did not say which row: load row by row.
    #[error("batch refused ({sqlstate}), row unknown: {message}")]
    PoisonUnknownRow { sqlstate: String, message: String },
    /// Anything else (connection lost, server shutting down, timeouts, schema
    /// missing): drop the connection, back off, reconnect, retry from the checkpoint.
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    /// COPY reported a different row count than was sent: a bug or a trigger; the
    /// transaction was rolled back.
    #[error("COPY stored {stored} rows, {sent} were sent")]
    RowCountMismatch { sent: u64, stored: u64 },
    /// A step made no progress within the link timeout: the link is taken for
    /// dead. The connection is in an unknown state (a COMMIT may have been
    /// applied): drop it, and settle the batch by re-reading the checkpoint.
    #[error("{step}: no progress within {after:?}, the database link is taken for dead")]
    LinkTimeout { step: &'static str, after: Duration },
}

/// The COPY is sent in pieces of this size, each of which the socket must accept
/// within the link timeout: a link moving less than this per timeout (6.4 kB/s at
/// 10 s) counts as dead. Small enough for that, large enough that the per-piece
/// cost is nothing beside the bytes.
pub const COPY_CHUNK: usize = 64 * 1024;

/// `fut`, or [`BatchError::LinkTimeout`] naming `step` if it takes longer than `limit`.
async fn within<T, E>(
    limit: Duration,
    step: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, BatchError>
where
    BatchError: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(BatchError::from),
        Err(_) => Err(BatchError::LinkTimeout { step, after: limit }),
    }
}

/// Runs one batch transaction on `conn` for `stream_id` into `table`, with no
/// limit on the time it takes.
pub async fn commit(
    conn: &mut PgConnection,
    table: &str,
    stream_id: &str,
    batch: &Batch,
) -> Result<BatchOutcome, BatchError> {
    commit_within(conn, table, stream_id, batch, Duration::MAX).await
}

/// [`commit`], each step of which must make progress within `link_timeout`
/// (see the module comment).
pub async fn commit_within(
    conn: &mut PgConnection,
    table: &str,
    stream_id: &str,
    batch: &Batch,
    link_timeout: Duration,
) -> Result<BatchOutcome, BatchError> {
    let t = link_timeout;
    let mut tx = within(t, "BEGIN", conn.begin()).await?;
    let checkpoint = within(
        t,
        "locking the checkpoint",
        checkpoint::lock(&mut tx, stream_id),
    )
    .await?;
    if checkpoint >= batch.end_lsn {
        within(t, "ROLLBACK", tx.rollback()).await?;
        return Ok(BatchOutcome::AlreadyLoaded { checkpoint });
    }
    // Rows at or below the checkpoint are already in the table (another loader got
    // there first, or a replay overlapped): send only the rest.
    let first = batch.rows.partition_point(|r| r.lsn <= checkpoint);
    let rows = &batch.rows[first..];
    let mut sent = 0u64;
    if !rows.is_empty() {
        let mut body = CopyBuffer::new();
        for r in rows {
            body.push(
                &r.event,
                RowOrigin {
                    stream_id,
                    lsn: r.lsn,
                    sample_rate: r.sample_rate,
                    link: r.link,
                    payload: Some(&r.payload),
                },
            );
        }
        sent = body.rows() as u64;
        let body = body.finish();
        let result = {
            let statement = copy_statement(table);
            let mut copy = within(t, "starting the COPY", tx.copy_in_raw(&statement)).await?;
            let mut sent_all = Ok(());
            for piece in body.chunks(COPY_CHUNK) {
                // Dropping `copy` (on an error or a timeout) sends CopyFail; the
                // transaction is then aborted.
                match tokio::time::timeout(t, copy.send(piece)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        sent_all = Err(classify_copy_error(e, first));
                        break;
                    }
                    Err(_) => {
                        sent_all = Err(BatchError::LinkTimeout {
                            step: "sending the COPY",
                            after: t,
                        });
                        break;
                    }
                }
            }
            match sent_all {
                Ok(()) => match tokio::time::timeout(t, copy.finish()).await {
                    Ok(r) => r.map_err(|e| classify_copy_error(e, first)),
                    Err(_) => Err(BatchError::LinkTimeout {
                        step: "finishing the COPY",
                        after: t,
                    }),
                },
                Err(e) => Err(e),
            }
        };
        let stored = result?;
        if stored != sent {
            within(t, "ROLLBACK", tx.rollback()).await?;
            return Err(BatchError::RowCountMismatch { sent, stored });
        }
    }
    for signed in batch.signed.iter().filter(|s| s.lsn > checkpoint) {
        within(
            t,
            "storing a signed checkpoint",
            checkpoint::store_signed(
                &mut tx,
                stream_id,
                signed.lsn,
                &signed.checkpoint,
                &signed.note,
            ),
        )
        .await?;
    }
    within(
        t,
        "advancing the checkpoint",
        checkpoint::advance(&mut tx, stream_id, batch.end_lsn, batch.chain),
    )
    .await?;
    within(t, "COMMIT", tx.commit()).await?;
    Ok(BatchOutcome::Committed { rows: sent })
}

/// Data exceptions (22) and integrity violations (23) are about a row; everything
/// else is about the connection, the server or the schema.
fn classify_copy_error(e: sqlx::Error, first_index: usize) -> BatchError {
    let sqlx::Error::Database(db) = &e else {
        return BatchError::Database(e);
    };
    let code = db.code().unwrap_or(Cow::Borrowed(""));
    if !(code.starts_with("22") || code.starts_with("23")) {
        return BatchError::Database(e);
    }
    let sqlstate = code.into_owned();
    let message = db.message().to_string();
    let line = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.r#where())
        .and_then(copy_line_number);
    match line {
        // COPY numbers rows from 1.
        Some(n) if n >= 1 => BatchError::PoisonRow {
            index: first_index + n - 1,
            sqlstate,
            message,
        },
        _ => BatchError::PoisonUnknownRow { sqlstate, message },
    }
}

/// Extracts N from a COPY error context such as `COPY audit_events, line 3, column ip: "x"`.
fn copy_line_number(context: &str) -> Option<usize> {
    let after = &context[context.find("line ")? + 5..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::copy_line_number;

    #[test]
    fn copy_context_line_numbers_are_read() {
        assert_eq!(copy_line_number("COPY audit_events, line 3"), Some(3));
        assert_eq!(
            copy_line_number("COPY audit_events, line 12, column ip: \"x\""),
            Some(12)
        );
        assert_eq!(copy_line_number("SQL statement"), None);
    }
}
