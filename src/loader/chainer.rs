//! The hash chain as a reader of one stream computes it, for the rows it sends:
//! the loader's cursor and replay (docs/integrity.md).
//!
//! Each event record is a link following the one before ([`Chainer::event`]); an
//! epoch checkpoint restarts the chain; any other checkpoint is compared with
//! the chain, and where they disagree the chain continues from the signed head
//! ([`Chainer::checkpoint`]), so that one divergence is one finding of verify-db
//! and not one per later checkpoint.
//!
//! A chainer whose start is unknown (replay reading an archive from its first
//! record, where the records before it are gone) gives no links until an epoch
//! or a checkpoint tells it where the chain stands.

use crate::chain::{ChainState, Checkpoint, Hash, Link};
use crate::loader::batch::BatchRow;
use crate::wal::format::Lsn;

pub(crate) struct Chainer {
    stream: String,
    /// Through the last record taken.
    chain: ChainState,
    /// `chain` when the batch being gathered began.
    batch_start: ChainState,
    /// Whether `chain` is the stream's real chain (else links are `None`).
    known: bool,
}

impl Chainer {
    /// A chain that stands at `at` (the loader's stored position).
    pub(crate) fn resume(stream: &str, at: ChainState) -> Chainer {
        Chainer {
            stream: stream.to_string(),
            chain: at,
            batch_start: at,
            known: true,
        }
    }

    /// A chain whose position is not known yet.
    pub(crate) fn unknown(stream: &str) -> Chainer {
        Chainer {
            known: false,
            ..Chainer::resume(stream, ChainState::epoch_at(0))
        }
    }

    /// A new batch begins: rows gathered from here on are its rows.
    pub(crate) fn begin_batch(&mut self) {
        self.batch_start = self.chain;
    }

    /// The last link's LSN and hash, when known.
    pub(crate) fn position(&self) -> Option<(Lsn, Hash)> {
        self.known.then_some((self.chain.lsn, self.chain.head))
    }

    /// The link of the event record `lsn`.
    pub(crate) fn event(&mut self, lsn: Lsn, payload: &[u8]) -> Option<Link> {
        let link = self.chain.push(&self.stream, lsn, payload);
        self.known.then_some(link)
    }

    /// A checkpoint record, after the rows of this batch gathered so far
    /// (`rows`, in LSN order, every event since [`Chainer::begin_batch`]).
    pub(crate) fn checkpoint(&mut self, checkpoint: &Checkpoint, rows: &mut [BatchRow]) {
        if checkpoint.is_epoch() {
            // A writer that lost its chain state starts a new epoch before its
            // next event: follow it.
            if checkpoint.size >= self.chain.lsn {
                self.chain = ChainState::epoch_at(checkpoint.size);
                self.known = true;
            }
            return;
        }
        self.follow(checkpoint, rows);
    }

    /// Where the chain disagrees with a signed checkpoint, continues from the
    /// checkpoint's head. It happens when the loader began mid-stream (a new
    /// database, segments before it already retired: its chain could not know
    /// the head it started from), when records were changed in the WAL before
    /// they were read, and when the start was unknown. The rows of this batch
    /// after the checkpoint's size get their links again; when some were in an
    /// earlier batch, the chain is left as it is.
    fn follow(&mut self, checkpoint: &Checkpoint, rows: &mut [BatchRow]) {
        let tail = rows.partition_point(|r| r.lsn <= checkpoint.size);
        let ours = match tail.checked_sub(1) {
            Some(i) => rows[i].link.map(|l| l.hash),
            None if self.batch_start.lsn <= checkpoint.size => {
                Some(self.batch_start.head).filter(|_| self.known)
            }
            // Links after the checkpoint's size are in an earlier batch.
            None => return,
        };
        if ours == Some(checkpoint.head) {
            return;
        }
        if self.known {
            tracing::warn!(
                stream = %self.stream,
                size = checkpoint.size,
                "hash chain: the rows read do not hash to the signed checkpoint's head \
                 (reading began mid-stream, or the WAL was changed); continuing from the \
                 signed head"
            );
        }
        let mut chain = ChainState::from_checkpoint(checkpoint);
        for row in &mut rows[tail..] {
            row.link = Some(chain.push(&self.stream, row.lsn, &row.payload));
        }
        self.chain = chain;
        self.known = true;
    }
}
