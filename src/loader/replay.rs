//! `replay`: re-sending a range of the WAL idempotently, for a database restored
//! from a backup older than the loader's last commits.
//!
//! Unlike the loader, replay cannot trust the checkpoint (it is the restored,
//! older one, or the rows it covers are the ones that went missing), so it never
//! skips by LSN: each batch is COPYed into a temporary table and inserted with
//! `ON CONFLICT (event_id, occurred_at) DO NOTHING`, so rows already present are
//! skipped, not duplicated. The stream's checkpoint is moved forward to the end of
//! what was replayed (never backward), in the same transaction, so a loader that
//! starts afterwards does not send those rows again.
//!
//! Replayed rows get the chain links the loader gave them: replay computes the
//! chain from the first record in the directory (all of it from LSN 1, or from
//! the first signed checkpoint it meets; rows before that get none) and stores
//! the signed checkpoints the table lacks.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Connection, PgConnection};

use crate::chain::{ChainState, Checkpoint};
use crate::loader::batch::{Batch, BatchRow, SignedCheckpoint};
use crate::loader::chainer::Chainer;
use crate::loader::checkpoint;
use crate::loader::copy::{CopyBuffer, RowOrigin, COPY_COLUMNS};
use crate::loader::{list_streams, LoadError, LoaderConfig};
use crate::wal::reader::{self, Follow, ReadItem, StreamReader};
use crate::wal::settle::settle_idle_stream;

/// Rows per replay transaction.
const REPLAY_BATCH_ROWS: usize = 10_000;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Rows read from the WAL and sent.
    pub rows_sent: u64,
    /// Of those, rows the table already held (skipped).
    pub rows_present: u64,
    /// Of those, rows inserted now.
    pub rows_inserted: u64,
    /// Damaged ranges met (skipped, as the loader does).
    pub damaged: u64,
}

/// Re-sends every record with LSN ≥ `from_lsn` of `stream` (or of every stream).
pub async fn replay(
    config: &LoaderConfig,
    from_lsn: u64,
    stream: Option<&str>,
) -> Result<ReplaySummary, LoadError> {
    replay_with_progress(config, from_lsn, stream, &AtomicU64::new(0)).await
}

/// [`replay`], adding to `rows_sent` the rows of each batch once its transaction
/// has committed, so another task can watch how far it got (the CLI's progress bar).
pub async fn replay_with_progress(
    config: &LoaderConfig,
    from_lsn: u64,
    stream: Option<&str>,
    rows_sent: &AtomicU64,
) -> Result<ReplaySummary, LoadError> {
    let streams = match stream {
        Some(s) => vec![s.to_string()],
        None => list_streams(&config.wal_dir)?,
    };
    // Tuned like the loader's: on a link that dies mid-replay the kernel ends the
    // connection within the link timeout and replay fails (it is idempotent: run
    // it again) instead of hanging.
    let options: sqlx::postgres::PgConnectOptions = config
        .database_url
        .parse()
        .map_err(|e: sqlx::Error| LoadError::Url(e.to_string()))?;
    let tuning = crate::pg::link::LinkTuning::for_timeout(config.link_timeout);
    let (mut conn, _) = tokio::time::timeout(
        config.connect_timeout,
        crate::pg::link::connect(&options, &tuning),
    )
    .await
    .map_err(|_| {
        LoadError::Url(format!(
            "cannot connect within {:?}",
            config.connect_timeout
        ))
    })?
    .map_err(|e| LoadError::Url(format!("cannot connect: {e}")))?;
    if config.migrate {
        crate::pg::schema::MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| LoadError::Url(format!("cannot migrate: {e}")))?;
    }
    let mut total = ReplaySummary::default();
    for s in streams {
        let dir = config.wal_dir.join(&s);
        let summary = replay_stream(&mut conn, config, &dir, &s, from_lsn, rows_sent).await?;
        tracing::info!(
            stream = s,
            sent = summary.rows_sent,
            present = summary.rows_present,
            inserted = summary.rows_inserted,
            "stream replayed"
        );
        total.rows_sent += summary.rows_sent;
        total.rows_present += summary.rows_present;
        total.rows_inserted += summary.rows_inserted;
        total.damaged += summary.damaged;
    }
    Ok(total)
}

async fn replay_stream(
    conn: &mut PgConnection,
    config: &LoaderConfig,
    dir: &Path,
    stream: &str,
    from_lsn: u64,
    rows_sent: &AtomicU64,
) -> Result<ReplaySummary, LoadError> {
    let stream_err = |reason: String| LoadError::Replay {
        stream: stream.to_string(),
        reason,
    };
    // A live stream directory: only what is durable (settled if the writer is
    // gone). An archive (no watermark file): everything in it was loaded once, so
    // it was durable.
    let up_to = if dir.join(crate::wal::format::DURABLE_LSN_FILE).exists() {
        if let Some(wal_dir) = dir.parent() {
            settle_idle_stream(wal_dir, stream).map_err(|e| stream_err(e.to_string()))?;
        }
        Some(reader::read_durable_lsn(dir).map_err(|e| stream_err(e.to_string()))?)
    } else {
        None
    };
    // The chain is computed from the stream's first record still in `dir`, so
    // that the rows sent get the links the loader gave them; from the very
    // first LSN it is known, else from the first checkpoint met (Chainer).
    let starts_at_one = reader::list_segments(dir)
        .map_err(|e| stream_err(e.to_string()))?
        .first()
        .is_some_and(|s| s.first_lsn == 1);
    let mut chain = match starts_at_one {
        true => Chainer::resume(stream, ChainState::epoch_at(0)),
        false => Chainer::unknown(stream),
    };
    let mut reader = StreamReader::open(dir, 1, Follow::AtRest);
    let mut summary = ReplaySummary::default();
    loop {
        chain.begin_batch();
        let mut rows = Vec::new();
        let mut signed = Vec::new();
        while rows.len() < REPLAY_BATCH_ROWS {
            match reader
                .next_item(up_to)
                .map_err(|e| stream_err(e.to_string()))?
            {
                Some(ReadItem::Event {
                    lsn,
                    event,
                    payload,
                    ..
                }) => {
                    let link = chain.event(lsn, &payload);
                    rows.push(BatchRow {
                        lsn,
                        event: event.event,
                        sample_rate: event.sample_rate,
                        payload,
                        link,
                    });
                }
                Some(ReadItem::Checkpoint { lsn, note, .. }) => {
                    let parsed = Checkpoint::parse(&note)
                        .ok()
                        .zip(String::from_utf8(note).ok());
                    if let Some((checkpoint, note)) = parsed {
                        chain.checkpoint(&checkpoint, &mut rows);
                        if lsn >= from_lsn {
                            signed.push(SignedCheckpoint {
                                lsn,
                                checkpoint,
                                note,
                            });
                        }
                    }
                }
                Some(ReadItem::SegmentConsumed { .. }) => {}
                Some(damage) => {
                    if reader.next_lsn() > from_lsn {
                        summary.damaged += 1;
                        tracing::warn!(stream, "damaged WAL range skipped: {damage:?}");
                    }
                }
                None => break,
            }
        }
        if rows.is_empty() && signed.is_empty() {
            return Ok(summary);
        }
        // Rows before from_lsn were read only to compute the chain.
        let send = &rows[rows.partition_point(|r| r.lsn < from_lsn)..];
        if send.is_empty() && signed.is_empty() {
            continue;
        }
        let end_lsn = reader.next_lsn().saturating_sub(1);
        let batch = Batch {
            rows: send.to_vec(),
            end_lsn,
            chain: chain.position(),
            signed,
        };
        let inserted = insert_missing(conn, &config.table, stream, &batch)
            .await
            .map_err(|e| stream_err(format!("replay batch failed: {e}")))?;
        summary.rows_sent += send.len() as u64;
        summary.rows_inserted += inserted;
        summary.rows_present += send.len() as u64 - inserted;
        rows_sent.fetch_add(send.len() as u64, Ordering::Relaxed);
    }
}

/// One replay transaction: COPY into a temporary table, insert what is missing
/// and the signed checkpoints the table lacks, move the checkpoint (and the
/// chain's position, when known) forward.
async fn insert_missing(
    conn: &mut PgConnection,
    table: &str,
    stream: &str,
    batch: &Batch,
) -> Result<u64, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut inserted = 0;
    if !batch.rows.is_empty() {
        sqlx::query(&format!(
            "CREATE TEMP TABLE auditwal_replay (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP"
        ))
        .execute(&mut *tx)
        .await?;
        let mut body = CopyBuffer::new();
        for r in &batch.rows {
            body.push(
                &r.event,
                RowOrigin {
                    stream_id: stream,
                    lsn: r.lsn,
                    sample_rate: r.sample_rate,
                    link: r.link,
                    payload: Some(&r.payload),
                },
            );
        }
        {
            let mut copy = tx
                .copy_in_raw(&crate::loader::copy::copy_statement("auditwal_replay"))
                .await?;
            copy.send(body.finish()).await?;
            copy.finish().await?;
        }
        let cols = COPY_COLUMNS.join(", ");
        inserted = sqlx::query(&format!(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM auditwal_replay \
             ON CONFLICT (event_id, occurred_at) DO NOTHING"
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    for s in &batch.signed {
        checkpoint::store_signed(&mut tx, stream, s.lsn, &s.checkpoint, &s.note).await?;
    }
    let current = checkpoint::lock(&mut tx, stream).await?;
    if batch.end_lsn > current {
        checkpoint::advance(&mut tx, stream, batch.end_lsn, batch.chain).await?;
    }
    tx.commit().await?;
    Ok(inserted)
}
