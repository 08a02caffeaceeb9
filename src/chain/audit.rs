//! The auditor's walk: one stream's stored rows, in LSN order, and its stored
//! checkpoints, to a list of findings. `auditwal verify-db` feeds it from the
//! table; this module knows no SQL.
//!
//! Each row carries its link (the LSN of its predecessor in the chain and its
//! hash) and the WAL payload its columns came from; the caller has already
//! compared the columns with the payload ([`Row::content`]). The walk checks:
//!
//! - every row's hash against its payload and its predecessor's hash: a changed
//!   record (or a changed hash) fails here ([`Finding::ChangedRow`]);
//! - every row's predecessor against the row before it in the table: a
//!   predecessor after that row means rows were deleted
//!   ([`Finding::DeletedRows`]); one before it means that row is in no chain
//!   ([`Finding::InsertedRow`]); a row whose stored hash verifies at another
//!   row's LSN, and that row's at its, is a [`Finding::ReorderedPair`];
//! - every checkpoint's signature ([`Finding::ForgedCheckpoint`]), and that the
//!   row at its size holds its head ([`Finding::CheckpointMismatch`]): a chain
//!   rewritten consistently from some row on still ends at a head no one
//!   signed;
//! - that no checkpoint covers LSNs past the last row ([`Finding::CutTail`]).
//!
//! Anomalies are judged within a window of recent rows, so that a swapped pair
//! is reported once as a pair and not as the changed and inserted rows it looks
//! like until its second half is seen.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::keys::Verifier;
use super::note::Checkpoint;
use super::{link_hash, Hash, Link, ZERO_HASH};
use crate::wal::Lsn;

/// Rows a finding waits in before it is final (a swapped pair is recognised
/// when both halves are within it).
const WINDOW: usize = 256;

/// One stored row of a stream.
#[derive(Debug, Clone)]
pub struct Row {
    pub lsn: Lsn,
    /// `None` when the row's chain columns are NULL.
    pub link: Option<Link>,
    /// The WAL record the row came from; `None` when NULL.
    pub payload: Option<Vec<u8>>,
    /// `Err(column)` when a column differs from what the payload says.
    pub content: Result<(), String>,
}

/// One stored checkpoint: the LSN of its WAL record and its signed note.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub lsn: Lsn,
    pub note: String,
}

/// What the walk found, each naming the stream's LSNs it is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum Finding {
    /// The row's content is not what was signed.
    ChangedRow { lsn: Lsn, detail: String },
    /// Rows are missing: the row at `next` follows `last_missing` in the chain,
    /// but the table's row before it is `after`.
    DeletedRows {
        after: Lsn,
        last_missing: Lsn,
        next: Lsn,
    },
    /// The row at `lsn` is in no chain: the row after it follows an earlier one.
    InsertedRow { lsn: Lsn, detail: String },
    /// The rows at `a` and `b` carry each other's LSNs.
    ReorderedPair { a: Lsn, b: Lsn },
    /// The checkpoint record `lsn` is not signed by the auditor's key.
    ForgedCheckpoint { lsn: Lsn, detail: String },
    /// The checkpoint record `lsn` covers up to `size`, and the row there does
    /// not hold its head.
    CheckpointMismatch { lsn: Lsn, size: Lsn, detail: String },
    /// A checkpoint covers LSNs up to `size` but the table's rows end at
    /// `last_row` (0: no rows).
    CutTail {
        last_row: Lsn,
        size: Lsn,
        source: String,
    },
}

impl Finding {
    /// The LSN a report sorts by.
    pub fn lsn(&self) -> Lsn {
        match self {
            Finding::ChangedRow { lsn, .. }
            | Finding::InsertedRow { lsn, .. }
            | Finding::ForgedCheckpoint { lsn, .. }
            | Finding::CheckpointMismatch { lsn, .. } => *lsn,
            Finding::DeletedRows { last_missing, .. } => *last_missing,
            Finding::ReorderedPair { a, .. } => *a,
            Finding::CutTail { last_row, .. } => *last_row + 1,
        }
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        match self {
            Finding::ChangedRow { lsn, detail } => format!("changed row at LSN {lsn}: {detail}"),
            Finding::DeletedRows {
                after,
                last_missing,
                next,
            } => format!(
                "deleted row(s): LSN {next} follows LSN {last_missing} in the chain, \
                 which is missing (the row before it is LSN {after})"
            ),
            Finding::InsertedRow { lsn, detail } => {
                format!("inserted row at LSN {lsn}: {detail}")
            }
            Finding::ReorderedPair { a, b } => {
                format!("reordered rows: LSNs {a} and {b} carry each other's records")
            }
            Finding::ForgedCheckpoint { lsn, detail } => {
                format!("forged checkpoint at LSN {lsn}: {detail}")
            }
            Finding::CheckpointMismatch { lsn, size, detail } => {
                format!("checkpoint at LSN {lsn} (covering up to LSN {size}) does not match: {detail}")
            }
            Finding::CutTail {
                last_row,
                size,
                source,
            } => format!(
                "cut tail: {source} covers up to LSN {size}, but the rows end at LSN {last_row}"
            ),
        }
    }
}

/// What a walk covered, beside its findings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub rows: u64,
    pub checkpoints: u64,
    /// The highest LSN a valid checkpoint vouches for (0: none).
    pub signed_through: Lsn,
    /// Rows after `signed_through`: chained, but no signature covers them yet.
    pub unsigned_rows: u64,
    /// The table's newest row of the stream (0: none).
    pub last_lsn: Lsn,
    /// The first row's predecessor, when its link could not be checked because
    /// the rows before it are gone and neither a checkpoint nor a retention
    /// anchor holds its hash.
    pub unanchored_from: Option<Lsn>,
    /// The rows up to this LSN were dropped by retention: the first row after
    /// them was checked against the hash recorded at the cut.
    pub retention_cut: Option<Lsn>,
}

#[derive(Debug)]
struct Pending {
    row: Row,
    /// The hash a successor's link must name: the stored one, or after a
    /// recognised swap the one the pair's other row stores.
    effective: Option<Hash>,
    findings: Vec<Finding>,
    /// The row's own link failed: a candidate half of a swapped pair.
    suspect: bool,
}

/// Walks one stream. Push rows in LSN order, then [`Auditor::finish`].
pub struct Auditor {
    stream: String,
    /// Valid checkpoints by size: the record LSN of each (0 for one held
    /// outside the table), the checkpoint, and where it came from.
    checkpoints: BTreeMap<Lsn, (Lsn, Checkpoint, String)>,
    /// Epoch checkpoints: start LSN to record LSN.
    epochs: HashMap<Lsn, Lsn>,
    window: VecDeque<Pending>,
    findings: Vec<Finding>,
    summary: Summary,
    last_lsn: Option<Lsn>,
    /// Hashes of rows that left the window, for checkpoints at their LSN.
    hashes_at_sizes: HashMap<Lsn, Option<Hash>>,
    /// Rows pushed with an LSN at or below each checkpoint's size, filled as
    /// the walk passes the size (for the unsigned tail).
    rows_through: HashMap<Lsn, u64>,
    sizes: Vec<Lsn>,
    /// [`Auditor::start_after`]'s LSN (0: the walk reads every row).
    start: Lsn,
    /// Retention anchors: LSN of the newest dropped row to its hash.
    anchors: HashMap<Lsn, Hash>,
}

impl Auditor {
    /// Checks the signature of each of `checkpoints` with `verifier` first; the
    /// forged ones are findings and vouch for nothing.
    pub fn new(stream: &str, checkpoints: &[StoredCheckpoint], verifier: &Verifier) -> Auditor {
        let mut a = Auditor {
            stream: stream.to_string(),
            checkpoints: BTreeMap::new(),
            epochs: HashMap::new(),
            window: VecDeque::new(),
            findings: Vec::new(),
            summary: Summary::default(),
            last_lsn: None,
            hashes_at_sizes: HashMap::new(),
            rows_through: HashMap::new(),
            sizes: Vec::new(),
            start: 0,
            anchors: HashMap::new(),
        };
        for stored in checkpoints {
            a.summary.checkpoints += 1;
            let forged = |detail: String| Finding::ForgedCheckpoint {
                lsn: stored.lsn,
                detail,
            };
            match Checkpoint::open(stored.note.as_bytes(), verifier) {
                Err(e) => a.findings.push(forged(e.to_string())),
                Ok(c) if c.stream != stream => a.findings.push(forged(format!(
                    "it is signed for stream {:?}, stored under {stream:?}",
                    c.stream
                ))),
                Ok(c) if c.size >= stored.lsn => a.findings.push(forged(format!(
                    "it covers LSN {} but is stored at LSN {}",
                    c.size, stored.lsn
                ))),
                Ok(c) => {
                    if c.is_epoch() {
                        a.epochs.insert(c.size, stored.lsn);
                    } else {
                        a.hashes_at_sizes.insert(c.size, None);
                    }
                    let source = format!("the checkpoint at LSN {}", stored.lsn);
                    a.checkpoints.insert(c.size, (stored.lsn, c, source));
                }
            }
        }
        a.sort_sizes();
        a
    }

    /// Adds a checkpoint held outside the table (the writer's local WAL, an
    /// exported file), already checked against the key, before the walk: one
    /// ahead of the table's rows shows a cut tail that deleted the table's
    /// checkpoints too.
    pub fn external(&mut self, checkpoint: Checkpoint, source: String) {
        if checkpoint.stream != self.stream || checkpoint.is_epoch() {
            return;
        }
        self.hashes_at_sizes.entry(checkpoint.size).or_insert(None);
        self.checkpoints
            .entry(checkpoint.size)
            .or_insert((0, checkpoint, source));
        self.sort_sizes();
    }

    /// Retention dropped the rows up to `lsn`, the newest of which had `hash`
    /// (`audit_chain_anchors`). Unsigned, and need not be: a wrong hash does
    /// not let the row after it verify.
    pub fn retention_anchor(&mut self, lsn: Lsn, hash: Hash) {
        self.anchors.insert(lsn, hash);
    }

    /// The walk starts after LSN `lsn`, a valid checkpoint's size (`verify-db
    /// --since`): the rows up to it are not read, the checkpoint's head anchors
    /// the first row after it, and it counts as signed.
    pub fn start_after(&mut self, lsn: Lsn) {
        self.start = lsn;
        self.last_lsn = Some(lsn);
    }

    fn sort_sizes(&mut self) {
        // Largest first, so the walk pops them in LSN order.
        self.sizes = self.checkpoints.keys().rev().copied().collect();
    }

    /// The next row, in LSN order.
    pub fn push(&mut self, row: Row) {
        while let Some(&size) = self.sizes.last().filter(|&&s| s < row.lsn) {
            self.rows_through.insert(size, self.summary.rows);
            self.sizes.pop();
        }
        self.summary.rows += 1;
        let prev = self.window.back().map(|p| (p.row.lsn, p.effective));
        let mut pending = Pending {
            effective: row.link.map(|l| l.hash),
            findings: Vec::new(),
            suspect: false,
            row,
        };
        self.judge(&mut pending, prev);
        if pending.suspect {
            self.try_swap(&mut pending);
        }
        self.last_lsn = Some(pending.row.lsn);
        self.window.push_back(pending);
        if self.window.len() > WINDOW {
            self.retire_oldest();
        }
    }

    /// The checks of one row against the one before it.
    fn judge(&mut self, p: &mut Pending, prev: Option<(Lsn, Option<Hash>)>) {
        let row = &p.row;
        if let Err(column) = &row.content {
            p.findings.push(Finding::ChangedRow {
                lsn: row.lsn,
                detail: format!("{column} differs from the signed record"),
            });
        }
        let Some(link) = row.link else {
            p.findings.push(Finding::InsertedRow {
                lsn: row.lsn,
                detail: "it has no chain link".into(),
            });
            return;
        };
        let Some(payload) = &row.payload else {
            p.findings.push(Finding::ChangedRow {
                lsn: row.lsn,
                detail: "its WAL record (wal_payload) is missing".into(),
            });
            return;
        };
        if link.prev_lsn >= row.lsn {
            p.suspect = true;
            p.findings.push(Finding::ChangedRow {
                lsn: row.lsn,
                detail: format!("its link names LSN {} as the row before it", link.prev_lsn),
            });
            return;
        }
        let epoch_start = self
            .epochs
            .get(&link.prev_lsn)
            .is_some_and(|&record| record < row.lsn);
        // The predecessor's hash, if the walk can know it.
        let prev_hash: Option<Hash> = match prev {
            _ if epoch_start || link.prev_lsn == 0 => Some(ZERO_HASH),
            Some((prev_lsn, hash)) if prev_lsn == link.prev_lsn => hash,
            Some((prev_lsn, _)) if link.prev_lsn > prev_lsn => {
                p.findings.push(Finding::DeletedRows {
                    after: prev_lsn,
                    last_missing: link.prev_lsn,
                    next: row.lsn,
                });
                None
            }
            Some((prev_lsn, _)) => {
                // The row before this one is not its predecessor: it is in no
                // chain (unless it is half of a swapped pair: judged later).
                p.findings.push(Finding::InsertedRow {
                    lsn: prev_lsn,
                    detail: format!(
                        "LSN {} follows LSN {} in the chain, not it",
                        row.lsn, link.prev_lsn
                    ),
                });
                self.hash_in_window(link.prev_lsn)
            }
            None => {
                if let Some(after) = self.expected_start(link.prev_lsn) {
                    // The chain began (or retention cut it) before the first
                    // row's predecessor: the rows between are gone, whether
                    // or not a checkpoint there holds the hash.
                    p.findings.push(Finding::DeletedRows {
                        after,
                        last_missing: link.prev_lsn,
                        next: row.lsn,
                    });
                }
                self.anchor(link.prev_lsn)
            }
        };
        if let Some(prev_hash) = prev_hash {
            let verifies = |prev: &Hash| {
                link_hash(&self.stream, row.lsn, link.prev_lsn, payload, prev) == link.hash
            };
            // A loader whose chain disagreed with a checkpoint continues from
            // the signed head (loader::cursor): the mismatch is reported at
            // that checkpoint, and the link after it follows the head.
            let follows_checkpoint = || {
                self.checkpoints
                    .get(&link.prev_lsn)
                    .is_some_and(|(_, c, _)| !c.is_epoch() && verifies(&c.head))
            };
            if !verifies(&prev_hash) && !follows_checkpoint() {
                p.suspect = true;
                p.findings.push(Finding::ChangedRow {
                    lsn: row.lsn,
                    detail: "its record or its chain hash was altered (the link does not verify)"
                        .into(),
                });
            }
        }
    }

    /// The hash the first row's predecessor must have: a checkpoint's head at
    /// that LSN, else unknown (the rows before were dropped).
    fn anchor(&mut self, prev_lsn: Lsn) -> Option<Hash> {
        if let Some((_, c, _)) = self.checkpoints.get(&prev_lsn) {
            return Some(c.head);
        }
        if let Some(&hash) = self.anchors.get(&prev_lsn) {
            self.summary.retention_cut = Some(prev_lsn);
            return Some(hash);
        }
        self.summary.unanchored_from = Some(prev_lsn);
        None
    }

    /// Where the rows of a walk from the stream's beginning should start,
    /// when the first row's predecessor `prev_lsn` is later: the newest signed
    /// epoch or retention cut at or before it (none when that is `prev_lsn`).
    fn expected_start(&self, prev_lsn: Lsn) -> Option<Lsn> {
        if self.start > 0 {
            return None;
        }
        self.epochs
            .keys()
            .chain(self.anchors.keys())
            .filter(|&&e| e <= prev_lsn)
            .max()
            .copied()
            .filter(|&e| e < prev_lsn)
    }

    fn hash_in_window(&self, lsn: Lsn) -> Option<Hash> {
        self.window
            .iter()
            .rev()
            .find(|p| p.row.lsn == lsn)
            .and_then(|p| p.effective)
    }

    /// Whether `p` and a suspect row before it are a pair whose LSNs were
    /// swapped; if so, replaces both rows' findings with one.
    fn try_swap(&mut self, p: &mut Pending) {
        let b = p.row.lsn;
        for i in (0..self.window.len()).rev() {
            if !self.window[i].suspect {
                continue;
            }
            let a = self.window[i].row.lsn;
            let (Some(qa), Some(rb)) = (self.window[i].row.link, p.row.link) else {
                continue;
            };
            // With the LSNs swapped back, the hash stored at a is the one at b,
            // and the other way round.
            let lookup = |lsn: Lsn| -> Option<Hash> {
                if lsn == a {
                    Some(rb.hash)
                } else if lsn == b {
                    Some(qa.hash)
                } else if lsn == 0 {
                    Some(ZERO_HASH)
                } else {
                    self.hash_in_window(lsn)
                }
            };
            let verifies = |lsn: Lsn, link: Link, payload: &Option<Vec<u8>>| {
                match (payload, lookup(link.prev_lsn)) {
                    (Some(payload), Some(prev)) => {
                        link_hash(&self.stream, lsn, link.prev_lsn, payload, &prev) == link.hash
                    }
                    _ => false,
                }
            };
            if verifies(b, qa, &self.window[i].row.payload) && verifies(a, rb, &p.row.payload) {
                let keep = |f: &Finding| !matches!(f, Finding::ChangedRow { .. } | Finding::InsertedRow { .. });
                self.window[i].findings.retain(keep);
                self.window[i].findings.push(Finding::ReorderedPair { a, b });
                self.window[i].suspect = false;
                self.window[i].effective = Some(rb.hash);
                p.findings.retain(keep);
                p.suspect = false;
                p.effective = Some(qa.hash);
                // Rows between the two named the wrong row as their
                // predecessor's hash: judge them again.
                self.rejudge_after(i);
                return;
            }
        }
    }

    fn rejudge_after(&mut self, from: usize) {
        for j in from + 1..self.window.len() {
            let prev = Some((self.window[j - 1].row.lsn, self.window[j - 1].effective));
            let mut again = Pending {
                row: self.window[j].row.clone(),
                effective: self.window[j].effective,
                findings: Vec::new(),
                suspect: false,
            };
            self.judge(&mut again, prev);
            let reordered: Vec<Finding> = self.window[j]
                .findings
                .iter()
                .filter(|f| matches!(f, Finding::ReorderedPair { .. }))
                .cloned()
                .collect();
            self.window[j].findings = reordered;
            self.window[j].findings.extend(again.findings);
            self.window[j].suspect = again.suspect;
        }
    }

    fn retire_oldest(&mut self) {
        if let Some(p) = self.window.pop_front() {
            if let Some(slot) = self.hashes_at_sizes.get_mut(&p.row.lsn) {
                *slot = if p.findings.is_empty() { p.effective } else { None };
            }
            self.findings.extend(p.findings);
        }
    }

    /// The findings, in LSN order, and what the walk covered.
    pub fn finish(mut self) -> (Vec<Finding>, Summary) {
        while !self.window.is_empty() {
            self.retire_oldest();
        }
        let last_row = self.last_lsn.unwrap_or(0);
        let mut signed_through = match self.checkpoints.get(&self.start) {
            Some(_) if self.start > 0 => self.start,
            _ => 0,
        };
        // One cut tail, named by the checkpoint furthest ahead.
        if let Some((&size, (_, _, source))) = self
            .checkpoints
            .iter()
            .rev()
            .find(|(_, (_, c, _))| !c.is_epoch())
            .filter(|(&size, _)| size > last_row)
        {
            self.findings.push(Finding::CutTail {
                last_row,
                size,
                source: source.clone(),
            });
        }
        for (&size, (record, c, _)) in &self.checkpoints {
            if c.is_epoch() || size > last_row {
                continue;
            }
            match self.hashes_at_sizes.get(&size).copied().flatten() {
                Some(hash) if hash == c.head => signed_through = signed_through.max(size),
                Some(_) => self.findings.push(Finding::CheckpointMismatch {
                    lsn: *record,
                    size,
                    detail: "the row there holds another chain head (the chain was rewritten)"
                        .into(),
                }),
                // The row is missing or already reported: the finding about it
                // says what happened.
                None => {}
            }
        }
        self.summary.signed_through = signed_through;
        self.summary.last_lsn = last_row;
        let rows = self.summary.rows;
        let through = |size| self.rows_through.get(&size).copied().unwrap_or(rows);
        self.summary.unsigned_rows = rows - if signed_through == 0 { 0 } else { through(signed_through) };
        self.findings.sort_by_key(Finding::lsn);
        self.findings.dedup();
        (self.findings, self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{ChainState, Signer};

    struct Fixture {
        signer: Signer,
        rows: Vec<Row>,
        checkpoints: Vec<StoredCheckpoint>,
    }

    /// Rows at LSNs 1, 2, 3, ... (every fifth LSN an end-of-segment record, so
    /// the chain has gaps), a checkpoint record after every tenth row and one at
    /// the end.
    fn fixture(n: usize) -> Fixture {
        let signer = Signer::generate("test");
        let mut state = ChainState::epoch_at(0);
        let (mut rows, mut checkpoints) = (Vec::new(), Vec::new());
        let mut lsn = 0;
        let checkpoint = |state: &ChainState, lsn: &mut Lsn, cps: &mut Vec<StoredCheckpoint>| {
            *lsn += 1;
            let c = Checkpoint {
                stream: "s".into(),
                size: state.lsn,
                head: state.head,
                epoch: 0,
                events: state.events,
                sampled_out: 0,
                time: 0,
            };
            cps.push(StoredCheckpoint {
                lsn: *lsn,
                note: c.sign(&signer),
            });
        };
        for i in 0..n {
            lsn += 1;
            if lsn % 5 == 0 {
                lsn += 1;
            }
            let payload = format!("event {i}").into_bytes();
            let link = state.push("s", lsn, &payload);
            rows.push(Row {
                lsn,
                link: Some(link),
                payload: Some(payload),
                content: Ok(()),
            });
            if i % 10 == 9 {
                checkpoint(&state, &mut lsn, &mut checkpoints);
            }
        }
        checkpoint(&state, &mut lsn, &mut checkpoints);
        Fixture {
            signer,
            rows,
            checkpoints,
        }
    }

    fn walk(f: &Fixture) -> Vec<Finding> {
        let mut a = Auditor::new("s", &f.checkpoints, &f.signer.verifier());
        for r in &f.rows {
            a.push(r.clone());
        }
        a.finish().0
    }

    #[test]
    fn an_untouched_stream_verifies_clean() {
        let f = fixture(45);
        let mut a = Auditor::new("s", &f.checkpoints, &f.signer.verifier());
        for r in &f.rows {
            a.push(r.clone());
        }
        let (findings, summary) = a.finish();
        assert_eq!(findings, vec![]);
        assert_eq!(summary.rows, 45);
        assert_eq!(summary.signed_through, f.rows[44].lsn);
    }

    #[test]
    fn a_changed_column_or_record_is_named() {
        let mut f = fixture(30);
        f.rows[3].content = Err("actor_id".into());
        f.rows[7].payload.as_mut().unwrap()[0] ^= 1;
        let lsns = (f.rows[3].lsn, f.rows[7].lsn);
        let findings = walk(&f);
        assert_eq!(findings.len(), 2, "{findings:?}");
        assert!(matches!(&findings[0], Finding::ChangedRow { lsn, detail } if *lsn == lsns.0 && detail.contains("actor_id")));
        assert!(matches!(&findings[1], Finding::ChangedRow { lsn, .. } if *lsn == lsns.1));
    }

    /// The fixture with its first `dropped` rows gone, with or without an
    /// epoch checkpoint at 0 and the retention anchor of the cut.
    fn cut(dropped: usize, epoch: bool, anchor: bool) -> (Vec<Finding>, Summary) {
        let mut f = fixture(30);
        if epoch {
            let note = Checkpoint::epoch("s", 0, 0).sign(&f.signer);
            f.checkpoints.insert(0, StoredCheckpoint { lsn: 1, note });
            // The epoch record takes LSN 1 in a real stream; here no row is
            // at 1 once the first rows are dropped.
        }
        let gone: Vec<Row> = f.rows.drain(..dropped).collect();
        let last = gone.last().expect("dropped rows");
        let mut a = Auditor::new("s", &f.checkpoints, &f.signer.verifier());
        if anchor {
            a.retention_anchor(last.lsn, last.link.expect("link").hash);
        }
        for r in &f.rows {
            a.push(r.clone());
        }
        a.finish()
    }

    #[test]
    fn a_retention_cut_is_anchored_and_a_head_cut_without_anchor_is_named() {
        // Cut between checkpoints (the 10th row's checkpoint is at row 10).
        let (findings, summary) = cut(13, true, true);
        assert_eq!(findings, vec![]);
        assert!(summary.retention_cut.is_some() && summary.unanchored_from.is_none());
        // The same rows deleted by hand: the epoch says the chain began at 0.
        let (findings, summary) = cut(13, true, false);
        assert!(
            matches!(findings.as_slice(), [Finding::DeletedRows { after: 0, .. }]),
            "{findings:?}"
        );
        assert!(summary.unanchored_from.is_some());
        // No epoch stored (a loader that began mid-stream): nothing to say
        // more than that the first link is unchecked.
        let (findings, summary) = cut(13, false, false);
        assert_eq!(findings, vec![]);
        assert!(summary.unanchored_from.is_some());
        // Rows deleted after a retention cut, up to a checkpoint (whose head
        // would anchor the next row): still deleted.
        let mut f = fixture(30);
        let note = Checkpoint::epoch("s", 0, 0).sign(&f.signer);
        f.checkpoints.insert(0, StoredCheckpoint { lsn: 1, note });
        let gone: Vec<Row> = f.rows.drain(..20).collect();
        let mut a = Auditor::new("s", &f.checkpoints, &f.signer.verifier());
        a.retention_anchor(gone[12].lsn, gone[12].link.expect("link").hash);
        for r in &f.rows {
            a.push(r.clone());
        }
        assert_eq!(
            a.finish().0,
            vec![Finding::DeletedRows {
                after: gone[12].lsn,
                last_missing: gone[19].lsn,
                next: f.rows[0].lsn
            }]
        );
        // A wrong anchor hash does not make the next row verify.
        let mut f = fixture(30);
        let gone: Vec<Row> = f.rows.drain(..13).collect();
        let mut a = Auditor::new("s", &f.checkpoints, &f.signer.verifier());
        a.retention_anchor(gone[12].lsn, [7; 32]);
        for r in &f.rows {
            a.push(r.clone());
        }
        let (findings, _) = a.finish();
        assert!(
            matches!(findings.first(), Some(Finding::ChangedRow { lsn, .. }) if *lsn == f.rows[0].lsn),
            "{findings:?}"
        );
    }

    #[test]
    fn a_walk_started_at_a_checkpoint_reads_only_what_follows() {
        let f = fixture(30);
        // The checkpoint after the 20th row.
        let size = f.rows[19].lsn;
        let mut a = Auditor::new("s", &f.checkpoints[1..], &f.signer.verifier());
        a.start_after(size);
        let mut rows = f.rows[20..].to_vec();
        rows[0].payload = Some(b"changed".to_vec());
        for r in &rows {
            a.push(r.clone());
        }
        let (findings, summary) = a.finish();
        // The checkpoint's head checks the first row's link.
        assert!(
            matches!(findings.as_slice(), [Finding::ChangedRow { lsn, .. }] if *lsn == rows[0].lsn),
            "{findings:?}"
        );
        assert_eq!(summary.unanchored_from, None);
        let mut a = Auditor::new("s", &f.checkpoints[1..], &f.signer.verifier());
        a.start_after(size);
        for r in &f.rows[20..] {
            a.push(r.clone());
        }
        let (findings, summary) = a.finish();
        assert_eq!(findings, vec![]);
        assert_eq!((summary.rows, summary.signed_through), (10, f.rows[29].lsn));
    }

    #[test]
    fn a_deleted_row_is_named_by_its_lsn() {
        let mut f = fixture(30);
        let gone = f.rows.remove(12);
        let findings = walk(&f);
        assert_eq!(
            findings,
            vec![Finding::DeletedRows {
                after: f.rows[11].lsn,
                last_missing: gone.lsn,
                next: f.rows[12].lsn
            }]
        );
    }

    #[test]
    fn an_inserted_row_is_named_even_with_a_valid_looking_link() {
        let mut f = fixture(30);
        // A row before a gap in the LSNs (a checkpoint or end-of-segment record).
        let at = (0..f.rows.len() - 1)
            .find(|&i| i > 10 && f.rows[i + 1].lsn > f.rows[i].lsn + 1)
            .unwrap();
        let before = f.rows[at].clone();
        let lsn = before.lsn + 1;
        let payload = b"forged".to_vec();
        let hash = link_hash("s", lsn, before.lsn, &payload, &before.link.unwrap().hash);
        f.rows.insert(
            at + 1,
            Row {
                lsn,
                link: Some(Link {
                    prev_lsn: before.lsn,
                    hash,
                }),
                payload: Some(payload),
                content: Ok(()),
            },
        );
        let findings = walk(&f);
        assert!(
            matches!(&findings[..], [Finding::InsertedRow { lsn: l, .. }] if *l == lsn),
            "{findings:?}"
        );
    }

    #[test]
    fn swapped_lsns_are_one_reordered_pair() {
        for gap in [1, 4] {
            let mut f = fixture(30);
            let (a, b) = (f.rows[10].lsn, f.rows[10 + gap].lsn);
            f.rows[10].lsn = b;
            f.rows[10 + gap].lsn = a;
            f.rows.sort_by_key(|r| r.lsn);
            let findings = walk(&f);
            assert_eq!(findings, vec![Finding::ReorderedPair { a, b }], "gap {gap}");
        }
    }

    #[test]
    fn a_cut_tail_and_a_rewritten_chain_are_caught_at_the_checkpoints() {
        let mut f = fixture(30);
        let last = f.rows.len() - 10;
        f.rows.truncate(last);
        let findings = walk(&f);
        assert!(
            findings.iter().any(|x| matches!(x, Finding::CutTail { .. })),
            "{findings:?}"
        );

        // Rewrite the last rows consistently: every link verifies, but the
        // heads no longer match what was signed.
        let mut f = fixture(30);
        let start = 25;
        let mut state = ChainState {
            lsn: f.rows[start - 1].lsn,
            head: f.rows[start - 1].link.unwrap().hash,
            events: 0,
            epoch: 0,
        };
        for r in &mut f.rows[start..] {
            let payload = b"rewritten".to_vec();
            r.link = Some(state.push("s", r.lsn, &payload));
            r.payload = Some(payload);
        }
        let findings = walk(&f);
        assert!(
            findings
                .iter()
                .any(|x| matches!(x, Finding::CheckpointMismatch { .. })),
            "{findings:?}"
        );
    }

    #[test]
    fn forged_and_foreign_signatures_are_findings() {
        let mut f = fixture(20);
        let other = Signer::generate("test");
        let c = Checkpoint::parse(f.checkpoints[0].note.as_bytes()).unwrap();
        f.checkpoints[0].note = c.sign(&other);
        let sig_at = f.checkpoints[1].note.rfind(' ').unwrap() + 1;
        let mut note = f.checkpoints[1].note.clone().into_bytes();
        note[sig_at + 10] = if note[sig_at + 10] == b'A' { b'B' } else { b'A' };
        f.checkpoints[1].note = String::from_utf8(note).unwrap();
        let findings = walk(&f);
        let forged: Vec<Lsn> = findings
            .iter()
            .filter_map(|x| match x {
                Finding::ForgedCheckpoint { lsn, .. } => Some(*lsn),
                _ => None,
            })
            .collect();
        assert_eq!(forged, vec![f.checkpoints[0].lsn, f.checkpoints[1].lsn]);
    }
}
