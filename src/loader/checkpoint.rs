//! The loader's checkpoint: per stream, the last LSN whose record is committed in
//! `audit_events` (or dead-lettered, or skipped as corrupt).
//!
//! The checkpoint is written in the same transaction as the batch it covers, so the
//! two commit or vanish together: that is what makes loading exactly-once across
//! crashes. A loader first *locks* its stream's row (`FOR UPDATE`) inside the batch
//! transaction; a second loader on the same stream then waits and, once the first
//! commits, sees the advanced checkpoint and skips what is already loaded instead of
//! loading it twice.

use sqlx::PgConnection;

/// Reads a stream's checkpoint outside any batch: where a loader resumes.
/// `None` when the stream has never been loaded.
pub async fn read(conn: &mut PgConnection, stream_id: &str) -> Result<Option<u64>, sqlx::Error> {
    let lsn: Option<i64> =
        sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = $1")
            .bind(stream_id)
            .fetch_optional(conn)
            .await?;
    Ok(lsn.map(|l| l.max(0) as u64))
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

/// Inside the same transaction as the rows: advances the checkpoint to `lsn`.
pub async fn advance(
    conn: &mut PgConnection,
    stream_id: &str,
    lsn: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE audit_checkpoints SET lsn = $2, updated_at = now() WHERE stream_id = $1")
        .bind(stream_id)
        .bind(lsn as i64)
        .execute(conn)
        .await?;
    Ok(())
}
