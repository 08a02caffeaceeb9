//! The loader's checkpoint: per stream, the last LSN whose record is committed in
//! `audit_events` (or dead-lettered, or skipped as corrupt), and where the
//! stream's hash chain stands there (`chain`).
//!
//! The checkpoint is written in the same transaction as the batch it covers, so the
//! two commit or vanish together: that is what makes loading exactly-once across
//! crashes. A loader first *locks* its stream's row (`FOR UPDATE`) inside the batch
//! transaction; a second loader on the same stream then waits and, once the first
//! commits, sees the advanced checkpoint and skips what is already loaded instead of
//! loading it twice. The signed checkpoints the batch read from the WAL are stored
//! in that transaction too (`audit_chain_checkpoints`).

use sqlx::PgConnection;

use crate::chain::{Checkpoint, Hash, ZERO_HASH};
use crate::wal::Lsn;

/// A stream's committed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    pub lsn: Lsn,
    /// The last chain link's LSN and hash (0 and zeros before the first).
    pub chain_lsn: Lsn,
    pub chain_head: Hash,
}

fn head_from(bytes: Option<Vec<u8>>) -> Hash {
    bytes
        .and_then(|b| Hash::try_from(b.as_slice()).ok())
        .unwrap_or(ZERO_HASH)
}

/// Reads a stream's checkpoint outside any batch: where a loader resumes.
/// `None` when the stream has never been loaded.
pub async fn read(
    conn: &mut PgConnection,
    stream_id: &str,
) -> Result<Option<Committed>, sqlx::Error> {
    let row: Option<(i64, i64, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT lsn, chain_lsn, chain_head FROM audit_checkpoints WHERE stream_id = $1",
    )
    .bind(stream_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(lsn, chain_lsn, head)| Committed {
        lsn: lsn.max(0) as u64,
        chain_lsn: chain_lsn.max(0) as u64,
        chain_head: head_from(head),
    }))
}

/// Inside a batch transaction: makes sure the stream's row exists, locks it, and
/// returns the committed LSN (0 when new).
pub async fn lock(conn: &mut PgConnection, stream_id: &str) -> Result<u64, sqlx::Error> {
    // One round trip: the no-op DO UPDATE takes the row lock whether the row is new
    // or not, and RETURNING gives the committed LSN.
    let lsn: i64 = sqlx::query_scalar(
        "INSERT INTO audit_checkpoints AS c (stream_id, lsn) VALUES ($1, 0) \
         ON CONFLICT (stream_id) DO UPDATE SET stream_id = c.stream_id \
         RETURNING c.lsn",
    )
    .bind(stream_id)
    .fetch_one(conn)
    .await?;
    Ok(lsn.max(0) as u64)
}

/// Inside the same transaction as the rows: advances the checkpoint to `lsn`,
/// and the chain's position to `chain` when given.
pub async fn advance(
    conn: &mut PgConnection,
    stream_id: &str,
    lsn: u64,
    chain: Option<(Lsn, Hash)>,
) -> Result<(), sqlx::Error> {
    match chain {
        Some((chain_lsn, head)) => {
            sqlx::query(
                "UPDATE audit_checkpoints SET lsn = $2, chain_lsn = $3, chain_head = $4, \
                 updated_at = now() WHERE stream_id = $1",
            )
            .bind(stream_id)
            .bind(lsn as i64)
            .bind(chain_lsn as i64)
            .bind(head.as_slice())
            .execute(conn)
            .await?;
        }
        None => {
            sqlx::query(
                "UPDATE audit_checkpoints SET lsn = $2, updated_at = now() WHERE stream_id = $1",
            )
            .bind(stream_id)
            .bind(lsn as i64)
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}

/// Inside the batch transaction: stores the signed checkpoint read at WAL record
/// `lsn` (once: a second loader's copy of the same record is ignored).
pub async fn store_signed(
    conn: &mut PgConnection,
    stream_id: &str,
    lsn: Lsn,
    checkpoint: &Checkpoint,
    note: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_chain_checkpoints (stream_id, lsn, size, head, note) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_id, lsn) DO NOTHING",
    )
    .bind(stream_id)
    .bind(lsn as i64)
    .bind(checkpoint.size as i64)
    .bind(checkpoint.head.as_slice())
    .bind(note)
    .execute(conn)
    .await?;
    Ok(())
}
