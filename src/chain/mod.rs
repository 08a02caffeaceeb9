//! The hash chain that makes a stream's trail tamper-evident (docs/integrity.md).
//!
//! Every event record of a WAL stream is a link: its hash covers a domain tag,
//! the stream, its LSN, the LSN of the link before it, the record's payload bytes
//! (the WAL encoding, which the table keeps in `wal_payload`) and the hash of the
//! link before it ([`link_hash`]). The writer's flusher computes the chain over the
//! records it has synced and, every so often, appends a signed [`Checkpoint`]
//! record (stream, last LSN covered, head hash, time) to the WAL; the loader
//! computes the same chain, stores each row's link and each checkpoint, and
//! `auditwal verify-db` walks the table to prove that no row was changed,
//! deleted, inserted or reordered since the writer signed it ([`audit`]).
//!
//! A chain *epoch* starts where a writer has no chain state to continue from (a
//! new stream, signing just turned on, or its last checkpoint gone): the writer
//! then appends an epoch checkpoint (head all zeros) before any new event, and
//! the chain restarts from it. Only event records are links; end-of-segment and
//! checkpoint records take LSNs but are not in the chain, which is why each link
//! names the LSN of the one before it.
//!
//! This module is pure: bytes and values in, hashes, notes and findings out. Key
//! files are read and written by [`keys`].

pub mod audit;
pub mod keys;
pub mod note;
pub mod wal_check;

use sha2::{Digest, Sha256};

use crate::wal::Lsn;

pub use keys::{KeyError, Signer, Verifier};
pub use note::{Checkpoint, NoteError};
pub use wal_check::WalCheck;

/// Length of a link hash (SHA-256).
pub const HASH_LEN: usize = 32;

/// A link hash.
pub type Hash = [u8; HASH_LEN];

/// The hash before a chain's first link (and an epoch checkpoint's head).
pub const ZERO_HASH: Hash = [0; HASH_LEN];

/// Domain tag at the start of every link's hash input: no other SHA-256 input of
/// this product (or, by its spelling, of any other) starts with these bytes.
const LINK_TAG: &[u8] = b"auditwal chain v1\0";

/// The record kind byte of an event record, hashed into each link so a link can
/// never be read as some other kind of record's.
const EVENT_KIND: u8 = 1;

/// The hash of the link for the event record `lsn` of `stream`, whose payload is
/// `payload`, following the link `prev_lsn` whose hash is `prev`.
pub fn link_hash(stream: &str, lsn: Lsn, prev_lsn: Lsn, payload: &[u8], prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(LINK_TAG);
    // Stream ids are at most 32 bytes (wal::format), so one length byte holds them.
    h.update([stream.len() as u8]);
    h.update(stream.as_bytes());
    h.update(lsn.to_be_bytes());
    h.update(prev_lsn.to_be_bytes());
    h.update([EVENT_KIND]);
    h.update((payload.len() as u32).to_be_bytes());
    h.update(payload);
    h.update(prev);
    h.finalize().into()
}

/// One link as the table stores it with its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// The LSN of the link before this one (the epoch's start for its first).
    pub prev_lsn: Lsn,
    pub hash: Hash,
}

/// Where a chain stands: the last link's LSN and hash, and the events chained
/// since the epoch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    pub lsn: Lsn,
    pub head: Hash,
    /// Events chained since the epoch began (the checkpoint's `events`).
    pub events: u64,
    /// Where the current epoch began.
    pub epoch: Lsn,
}

impl ChainState {
    /// A chain whose epoch begins after LSN `at` (0: the stream's beginning).
    pub fn epoch_at(at: Lsn) -> ChainState {
        ChainState {
            lsn: at,
            head: ZERO_HASH,
            events: 0,
            epoch: at,
        }
    }

    /// Adds the event record `lsn` (above [`ChainState::lsn`]) and returns its link.
    pub fn push(&mut self, stream: &str, lsn: Lsn, payload: &[u8]) -> Link {
        let link = Link {
            prev_lsn: self.lsn,
            hash: link_hash(stream, lsn, self.lsn, payload, &self.head),
        };
        self.lsn = lsn;
        self.head = link.hash;
        self.events += 1;
        link
    }

    /// The state a checkpoint says a chain is in.
    pub fn from_checkpoint(c: &Checkpoint) -> ChainState {
        ChainState {
            lsn: c.size,
            head: c.head,
            events: c.events,
            epoch: c.epoch,
        }
    }
}

/// The hash as lowercase hex, for reports.
pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_of_a_link_changes_its_hash() {
        let base = link_hash("s", 5, 3, b"payload", &ZERO_HASH);
        assert_ne!(base, link_hash("t", 5, 3, b"payload", &ZERO_HASH));
        assert_ne!(base, link_hash("s", 6, 3, b"payload", &ZERO_HASH));
        assert_ne!(base, link_hash("s", 5, 4, b"payload", &ZERO_HASH));
        assert_ne!(base, link_hash("s", 5, 3, b"payloaD", &ZERO_HASH));
        assert_ne!(base, link_hash("s", 5, 3, b"payload", &[1; HASH_LEN]));
        // Lengths are framed: moving a byte from the stream into the payload
        // does not give the same input.
        assert_ne!(
            link_hash("ab", 1, 0, b"c", &ZERO_HASH),
            link_hash("a", 1, 0, b"bc", &ZERO_HASH)
        );
    }

    #[test]
    fn a_state_chains_links_in_order() {
        let mut state = ChainState::epoch_at(10);
        let a = state.push("s", 11, b"a");
        let b = state.push("s", 13, b"b");
        assert_eq!(a.prev_lsn, 10);
        assert_eq!(a.hash, link_hash("s", 11, 10, b"a", &ZERO_HASH));
        assert_eq!(b.prev_lsn, 11);
        assert_eq!(b.hash, link_hash("s", 13, 11, b"b", &a.hash));
        assert_eq!((state.lsn, state.head, state.events), (13, b.hash, 2));
    }
}
