//! Sync mode's side of the hash chain (docs/integrity.md): with a signing key,
//! every committer of a [`super::SyncWriter`] is a chain stream of its own.
//!
//! A committer sends one statement at a time, so the order of its commits is a
//! total order: the LSNs of its stream are assigned in that order, as the WAL's
//! are in append order. Each row gets the same columns a loaded row gets
//! (`stream_id`, `lsn`, `chain_prev_lsn`, `chain_hash`, and `wal_payload`, the
//! event in the WAL's encoding, which is what the link hashes), and a due
//! checkpoint is signed and inserted into `audit_chain_checkpoints` by the same
//! statement as the rows it covers. `auditwal verify-db` then walks a sync
//! stream exactly as it walks a loaded one.
//!
//! The stream is `sync-<writer>-<committer>`, the writer part random at each
//! start: a stream has one writer for its whole life, so no two processes can
//! ever interleave in it. Its first statement carries an epoch checkpoint
//! (size 0), which also makes the stream known to verify-db before its first
//! regular checkpoint. A checkpoint is due after `checkpoint_every` events, once
//! the oldest unsigned event is `checkpoint_interval` old (the committer wakes
//! for it when idle), and when the writer closes.
//!
//! The position is advanced only by a statement known to have committed. One
//! whose outcome is unknown (no answer, a lost connection) leaves the position
//! *in doubt*: before the committer sends anything on its next connection it
//! takes the stream's advisory lock, which it can only get once the session of
//! the unanswered statement has ended (committed or not, for good), then looks
//! for that statement's first row (or checkpoint) and takes its position from
//! what it finds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tokio::time::Instant;
use uuid::Uuid;

use crate::chain::{ChainState, Checkpoint, Signer};
use crate::wal::Lsn;

/// The signing key and checkpoint settings, shared by a writer's committers.
#[derive(Clone)]
pub(crate) struct ChainSettings {
    signer: Arc<Signer>,
    /// `sync-<16 hex digits>`, random per writer.
    writer: String,
    every: u64,
    interval: Duration,
}

impl ChainSettings {
    pub(crate) fn read(key: &Path, every: u64, interval: Duration) -> Result<Self, String> {
        let signer = Signer::read(key).map_err(|e| e.to_string())?;
        if every == 0 || interval.is_zero() {
            return Err("checkpoint_every and checkpoint_interval must be positive".into());
        }
        let id = Uuid::now_v7().simple().to_string();
        Ok(ChainSettings {
            signer: Arc::new(signer),
            // The random tail of a v7 UUID: the head is the clock.
            writer: format!("sync-{}", &id[16..]),
            every,
            interval,
        })
    }

    /// The chain of committer `index`.
    pub(crate) fn stream(&self, index: usize) -> SyncChain {
        SyncChain {
            settings: self.clone(),
            stream: format!("{}-{index}", self.writer),
            at: Position {
                state: ChainState::epoch_at(0),
                next_lsn: 1,
                unsigned: 0,
                unsigned_since: None,
                epoch_stored: false,
            },
            in_doubt: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Position {
    state: ChainState,
    /// The LSN the next row or checkpoint gets.
    next_lsn: Lsn,
    /// Events after the last checkpoint, and when the first of them was sent.
    unsigned: u64,
    unsigned_since: Option<Instant>,
    epoch_stored: bool,
}

/// One committer's chain.
pub(crate) struct SyncChain {
    settings: ChainSettings,
    stream: String,
    /// Where the committed statements left the chain.
    at: Position,
    in_doubt: Option<InDoubt>,
}

/// A statement whose outcome is unknown, and how to find out.
struct InDoubt {
    after: Position,
    probe: Probe,
}

enum Probe {
    /// The statement's first row: (event_id, occurred_at) is unique.
    Row {
        event_id: Uuid,
        occurred_at: DateTime<Utc>,
        lsn: Lsn,
    },
    /// A checkpoint-only statement: its checkpoint's LSN.
    Checkpoint { lsn: Lsn },
}

/// What one statement writes beside its events' own columns: one entry per
/// event, in order, and the checkpoints it stores.
#[derive(Default)]
pub(crate) struct Plan {
    pub lsns: Vec<i64>,
    pub prev_lsns: Vec<i64>,
    pub hashes: Vec<Vec<u8>>,
    pub checkpoint_lsns: Vec<i64>,
    pub checkpoint_sizes: Vec<i64>,
    pub checkpoint_heads: Vec<Vec<u8>>,
    pub checkpoint_notes: Vec<String>,
    after: Option<Position>,
    probe: Option<Probe>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl SyncChain {
    pub(crate) fn stream_id(&self) -> &str {
        &self.stream
    }

    /// When the oldest unsigned event's checkpoint falls due, if any is waiting.
    pub(crate) fn checkpoint_due_at(&self) -> Option<Instant> {
        self.at
            .unsigned_since
            .filter(|_| self.at.unsigned > 0)
            .map(|t| t + self.settings.interval)
    }

    /// Whether events are waiting for a checkpoint.
    pub(crate) fn has_unsigned(&self) -> bool {
        self.at.unsigned > 0
    }

    /// Plans a statement for `events` (each with its WAL payload and the key
    /// that finds its row), with a checkpoint when one is due or `force`d.
    pub(crate) fn plan<'a>(
        &self,
        events: impl Iterator<Item = (&'a [u8], Uuid, DateTime<Utc>)>,
        force: bool,
    ) -> Plan {
        let mut pos = self.at;
        let mut plan = Plan::default();
        if !pos.epoch_stored {
            let epoch = Checkpoint::epoch(&self.stream, pos.state.lsn, unix_now());
            self.push_checkpoint(&mut plan, &mut pos, &epoch);
            pos.epoch_stored = true;
        }
        let now = Instant::now();
        for (payload, event_id, occurred_at) in events {
            let lsn = pos.next_lsn;
            let link = pos.state.push(&self.stream, lsn, payload);
            plan.probe.get_or_insert(Probe::Row {
                event_id,
                occurred_at,
                lsn,
            });
            plan.lsns.push(lsn as i64);
            plan.prev_lsns.push(link.prev_lsn as i64);
            plan.hashes.push(link.hash.to_vec());
            pos.next_lsn += 1;
            pos.unsigned += 1;
            pos.unsigned_since.get_or_insert(now);
        }
        let due = pos.unsigned >= self.settings.every
            || pos
                .unsigned_since
                .is_some_and(|t| now >= t + self.settings.interval);
        if pos.unsigned > 0 && (due || force) {
            let c = Checkpoint {
                stream: self.stream.clone(),
                size: pos.state.lsn,
                head: pos.state.head,
                epoch: pos.state.epoch,
                events: pos.state.events,
                sampled_out: 0,
                time: unix_now(),
            };
            self.push_checkpoint(&mut plan, &mut pos, &c);
            pos.unsigned = 0;
            pos.unsigned_since = None;
        }
        if plan.probe.is_none() {
            plan.probe = plan.checkpoint_lsns.last().map(|&lsn| Probe::Checkpoint {
                lsn: lsn as Lsn,
            });
        }
        plan.after = Some(pos);
        plan
    }

    fn push_checkpoint(&self, plan: &mut Plan, pos: &mut Position, c: &Checkpoint) {
        plan.checkpoint_lsns.push(pos.next_lsn as i64);
        plan.checkpoint_sizes.push(c.size as i64);
        plan.checkpoint_heads.push(c.head.to_vec());
        plan.checkpoint_notes.push(c.sign(&self.settings.signer));
        pos.next_lsn += 1;
    }

    /// The planned statement committed.
    pub(crate) fn committed(&mut self, plan: Plan) {
        if let Some(after) = plan.after {
            self.at = after;
        }
    }

    /// The planned statement got no answer: it may or may not have committed.
    pub(crate) fn in_doubt(&mut self, plan: Plan) {
        if let (Some(after), Some(probe)) = (plan.after, plan.probe) {
            self.in_doubt = Some(InDoubt { after, probe });
        }
    }

    /// On a new connection, before anything is sent on it: takes the stream's
    /// advisory lock (held for the session) and settles a statement in doubt.
    pub(crate) async fn on_connect(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("auditwal.sync-chain.{}", self.stream))
            .execute(&mut *conn)
            .await?;
        let Some(doubt) = &self.in_doubt else {
            return Ok(());
        };
        let stored: bool = match doubt.probe {
            Probe::Row {
                event_id,
                occurred_at,
                lsn,
            } => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM audit_events WHERE event_id = $1 \
                     AND occurred_at = $2 AND stream_id = $3 AND lsn = $4)",
                )
                .bind(event_id)
                .bind(occurred_at)
                .bind(&self.stream)
                .bind(lsn as i64)
                .fetch_one(&mut *conn)
                .await?
            }
            Probe::Checkpoint { lsn } => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM audit_chain_checkpoints \
                     WHERE stream_id = $1 AND lsn = $2)",
                )
                .bind(&self.stream)
                .bind(lsn as i64)
                .fetch_one(&mut *conn)
                .await?
            }
        };
        if stored {
            self.at = doubt.after;
        }
        tracing::info!(
            stream = %self.stream,
            committed = stored,
            "sync chain: settled the statement whose outcome was unknown"
        );
        self.in_doubt = None;
        Ok(())
    }
}

/// Stores the checkpoints of a plan that has no events (the idle timer, close).
pub(crate) async fn insert_checkpoints(
    conn: &mut PgConnection,
    stream: &str,
    plan: &Plan,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_chain_checkpoints (stream_id, lsn, size, head, note) \
         SELECT $1, * FROM unnest($2::int8[], $3::int8[], $4::bytea[], $5::text[])",
    )
    .bind(stream)
    .bind(&plan.checkpoint_lsns)
    .bind(&plan.checkpoint_sizes)
    .bind(&plan.checkpoint_heads)
    .bind(&plan.checkpoint_notes)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::link_hash;

    fn settings(every: u64) -> ChainSettings {
        ChainSettings {
            signer: Arc::new(Signer::generate("t")),
            writer: "sync-test".into(),
            every,
            interval: Duration::from_secs(3600),
        }
    }

    fn events(n: usize) -> Vec<(Vec<u8>, Uuid, DateTime<Utc>)> {
        (0..n)
            .map(|i| (format!("e{i}").into_bytes(), Uuid::now_v7(), Utc::now()))
            .collect()
    }

    fn plan(chain: &SyncChain, evs: &[(Vec<u8>, Uuid, DateTime<Utc>)], force: bool) -> Plan {
        chain.plan(evs.iter().map(|(p, id, at)| (p.as_slice(), *id, *at)), force)
    }

    #[test]
    fn the_first_statement_carries_the_epoch_and_links_follow_in_commit_order() {
        let mut chain = settings(100).stream(0);
        let evs = events(2);
        let first = plan(&chain, &evs, false);
        assert_eq!(first.checkpoint_lsns, vec![1]);
        assert_eq!(first.checkpoint_sizes, vec![0]);
        assert_eq!(first.lsns, vec![2, 3]);
        assert_eq!(first.prev_lsns, vec![0, 2]);
        let h2 = link_hash("sync-test-0", 2, 0, b"e0", &crate::chain::ZERO_HASH);
        assert_eq!(first.hashes[0], h2.to_vec());
        chain.committed(first);
        let second = plan(&chain, &events(1), false);
        assert!(second.checkpoint_lsns.is_empty());
        assert_eq!((second.lsns[0], second.prev_lsns[0]), (4, 3));
    }

    #[test]
    fn a_checkpoint_follows_every_n_events_and_on_force() {
        let mut chain = settings(3).stream(1);
        let p = plan(&chain, &events(3), false);
        // Epoch at 1, events 2..=4, the checkpoint covering 4 at 5.
        assert_eq!(p.checkpoint_lsns, vec![1, 5]);
        assert_eq!(p.checkpoint_sizes, vec![0, 4]);
        chain.committed(p);
        assert!(!chain.has_unsigned());
        chain.committed(plan(&chain, &events(1), false));
        assert!(chain.has_unsigned());
        let close = plan(&chain, &events(0), true);
        assert_eq!((close.checkpoint_lsns.clone(), close.checkpoint_sizes.clone()), (vec![7], vec![6]));
        let note = Checkpoint::open(
            close.checkpoint_notes[0].as_bytes(),
            &chain.settings.signer.verifier(),
        )
        .expect("signed by the writer's key");
        assert_eq!((note.stream.as_str(), note.events), ("sync-test-1", 4));
    }

    #[test]
    fn a_refused_or_doubtful_statement_does_not_move_the_position() {
        let mut chain = settings(100).stream(0);
        let refused = plan(&chain, &events(2), false);
        drop(refused);
        let again = plan(&chain, &events(1), false);
        assert_eq!(again.lsns, vec![2]);
        chain.in_doubt(again);
        // Until the doubt is settled on a new connection, the next plan starts
        // from the last committed position.
        assert_eq!(plan(&chain, &events(1), false).lsns, vec![2]);
    }
}
