//! The hash chain checked in the WAL itself (`auditwal verify`): the events of a
//! stream hashed in LSN order, and each checkpoint record's head compared with
//! what they hash to. A record edited with its CRC recomputed passes every
//! format check; here it changes the head at the next checkpoint.
//!
//! The walk starts at the first checkpoint it meets (the records before it may
//! follow checkpoints already retired with their segments) and vouches for the
//! records between each two checkpoints.

use std::collections::VecDeque;

use super::keys::Verifier;
use super::note::Checkpoint;
use super::{hex, ChainState, Hash};
use crate::wal::Lsn;

/// Checks one stream's records, fed in LSN order.
#[derive(Debug)]
pub struct WalCheck {
    /// The stream's name: given, or taken from the first checkpoint (a lone
    /// segment file or a stream directory does not say it otherwise).
    stream: Option<String>,
    verifier: Option<Verifier>,
    /// `None` until the first checkpoint anchors the walk.
    state: Option<ChainState>,
    /// Each event since the last checkpoint's size: its LSN, the head after
    /// it and its payload (to hash again from a signed head after a mismatch).
    recent: VecDeque<(Lsn, Hash, Vec<u8>)>,
    /// The last checkpoint's size: the start of the range the next one vouches for.
    anchored_at: Lsn,
    pub checkpoints: u64,
}

impl WalCheck {
    /// `verifier`: check signatures too (without one, only the heads).
    pub fn new(stream: Option<&str>, verifier: Option<Verifier>) -> WalCheck {
        WalCheck {
            stream: stream.map(str::to_string),
            verifier,
            state: None,
            recent: VecDeque::new(),
            anchored_at: 0,
            checkpoints: 0,
        }
    }

    pub fn event(&mut self, lsn: Lsn, payload: &[u8]) {
        if let (Some(state), Some(stream)) = (self.state.as_mut(), &self.stream) {
            state.push(stream, lsn, payload);
            self.recent.push_back((lsn, state.head, payload.to_vec()));
        }
    }

    /// The checkpoint record `lsn`; a problem found, as a report line.
    pub fn checkpoint(&mut self, lsn: Lsn, note: &[u8]) -> Option<String> {
        self.checkpoints += 1;
        let opened = match &self.verifier {
            Some(v) => Checkpoint::open(note, v),
            None => Checkpoint::parse(note),
        };
        let c = match opened {
            Ok(c) => c,
            Err(e) => return Some(format!("checkpoint record LSN {lsn}: {e}")),
        };
        match &self.stream {
            Some(s) if *s != c.stream => {
                return Some(format!(
                    "checkpoint record LSN {lsn} is signed for stream {:?}, found in stream {s:?}",
                    c.stream
                ))
            }
            Some(_) => {}
            None => self.stream = Some(c.stream.clone()),
        }
        if c.is_epoch() {
            self.restart(ChainState::epoch_at(c.size));
            return None;
        }
        let Some(state) = self.state else {
            self.restart(ChainState::from_checkpoint(&c));
            return None;
        };
        // The head at the checkpoint's size: the newest event at or below it.
        let head = self
            .recent
            .iter()
            .rev()
            .find(|(l, _, _)| *l <= c.size)
            .map(|(_, h, _)| *h)
            .or((state.lsn <= c.size).then_some(state.head));
        let report = match head {
            Some(h) if h == c.head => None,
            Some(h) => Some(format!(
                "hash chain mismatch: the checkpoint at LSN {lsn} covers up to LSN {} with head \
                 {}, but the records hash to {}: a record in LSNs {}..={} was changed \
                 (its CRC cannot tell)",
                c.size,
                hex(&c.head),
                hex(&h),
                self.anchored_at + 1,
                c.size
            )),
            None => None,
        };
        self.anchored_at = c.size;
        while self.recent.front().is_some_and(|(l, _, _)| *l <= c.size) {
            self.recent.pop_front();
        }
        if report.is_some() {
            // Go on from what was signed, so that one edit is one report.
            let mut state = ChainState::from_checkpoint(&c);
            for (l, h, payload) in self.recent.iter_mut() {
                state.push(&c.stream, *l, payload);
                *h = state.head;
            }
            self.state = Some(state);
        }
        report
    }

    fn restart(&mut self, state: ChainState) {
        self.anchored_at = state.lsn;
        self.state = Some(state);
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Signer;

    #[test]
    fn an_edited_record_changes_the_next_checkpoint_s_head() {
        let signer = Signer::generate("k");
        let mut writer = ChainState::epoch_at(0);
        let mut records: Vec<(Lsn, Vec<u8>, bool)> = Vec::new();
        let epoch = Checkpoint::epoch("s", 0, 0).sign(&signer);
        records.push((1, epoch.into_bytes(), true));
        for lsn in 2..40u64 {
            if lsn % 10 == 0 {
                let c = Checkpoint {
                    stream: "s".into(),
                    size: writer.lsn,
                    head: writer.head,
                    epoch: 0,
                    events: writer.events,
                    sampled_out: 0,
                    time: 0,
                };
                records.push((lsn, c.sign(&signer).into_bytes(), true));
            } else {
                let payload = format!("e{lsn}").into_bytes();
                writer.push("s", lsn, &payload);
                records.push((lsn, payload, false));
            }
        }
        let run = |records: &[(Lsn, Vec<u8>, bool)]| {
            let mut check = WalCheck::new(None, Some(signer.verifier()));
            let mut reports = Vec::new();
            for (lsn, bytes, is_checkpoint) in records {
                if *is_checkpoint {
                    reports.extend(check.checkpoint(*lsn, bytes));
                } else {
                    check.event(*lsn, bytes);
                }
            }
            reports
        };
        assert_eq!(run(&records), Vec::<String>::new());
        records[14].1[0] ^= 1; // LSN 15
        let reports = run(&records);
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].contains("LSNs 10..=19"), "{}", reports[0]);
    }
}
