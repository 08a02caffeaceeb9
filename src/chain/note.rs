//! The signed checkpoint: a text note modelled on the C2SP tlog checkpoint
//! (c2sp.org/tlog-checkpoint, signed as in c2sp.org/signed-note).
//!
//! ```text
//! auditwal/<stream>            origin: whose chain
//! <size>                       the last event LSN the head covers (decimal)
//! <head>                       the chain's head hash, standard base64
//! epoch <lsn>                  where this chain epoch began
//! events <n>                   events chained since the epoch began
//! sampled-out <n>              events the writer's sampler dropped since the last checkpoint
//! time <unix seconds>          when the writer signed it
//!
//! — <key name> <base64(key id (4 bytes) || Ed25519 signature (64 bytes))>
//! ```
//!
//! The body is every line before the blank line, each ending in `\n`; the
//! signature covers exactly those bytes. An epoch checkpoint has `size` equal to
//! `epoch` and an all-zero head. A note is at most [`MAX_NOTE_LEN`] bytes and
//! parsing it allocates nothing beyond that.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::keys::{Signer, Verifier};
use super::{Hash, HASH_LEN, ZERO_HASH};
use crate::wal::Lsn;

/// Longest note a parser accepts.
pub const MAX_NOTE_LEN: usize = 1024;

/// The prefix of a checkpoint's origin line.
const ORIGIN_PREFIX: &str = "auditwal/";

/// The signature line's leading em dash and space.
const SIG_PREFIX: &str = "\u{2014} ";

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub stream: String,
    /// The last event LSN covered (the epoch's start in an epoch checkpoint).
    pub size: Lsn,
    pub head: Hash,
    pub epoch: Lsn,
    pub events: u64,
    pub sampled_out: u64,
    /// Seconds since the Unix epoch.
    pub time: i64,
}

/// What is wrong with a note.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    #[error("checkpoint note is {len} bytes, over the limit of {MAX_NOTE_LEN}")]
    TooLong { len: usize },
    #[error("checkpoint note is not UTF-8")]
    NotUtf8,
    #[error("checkpoint note has no signature section (no blank line)")]
    Unsigned,
    #[error("checkpoint note line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("checkpoint note is signed by key {name}+{id:08x}, not by the expected {expected}")]
    UnknownKey {
        name: String,
        id: u32,
        expected: String,
    },
    #[error("checkpoint note's signature by {name} does not verify")]
    BadSignature { name: String },
}

impl Checkpoint {
    /// An epoch checkpoint: the chain of `stream` starts after LSN `at`.
    pub fn epoch(stream: &str, at: Lsn, time: i64) -> Checkpoint {
        Checkpoint {
            stream: stream.to_string(),
            size: at,
            head: ZERO_HASH,
            epoch: at,
            events: 0,
            sampled_out: 0,
            time,
        }
    }

    /// True for the checkpoint that starts an epoch.
    pub fn is_epoch(&self) -> bool {
        self.size == self.epoch && self.head == ZERO_HASH
    }

    /// The signed text (body, blank line, signature line).
    pub fn sign(&self, signer: &Signer) -> String {
        let body = self.body();
        let sig = signer.sign(body.as_bytes());
        let mut blob = Vec::with_capacity(4 + sig.len());
        blob.extend_from_slice(&signer.id().to_be_bytes());
        blob.extend_from_slice(&sig);
        format!("{body}\n{SIG_PREFIX}{} {}\n", signer.name(), B64.encode(blob))
    }

    fn body(&self) -> String {
        format!(
            "{ORIGIN_PREFIX}{}\n{}\n{}\nepoch {}\nevents {}\nsampled-out {}\ntime {}\n",
            self.stream,
            self.size,
            B64.encode(self.head),
            self.epoch,
            self.events,
            self.sampled_out,
            self.time
        )
    }

    /// Parses a note without checking its signature (what the loader and
    /// `inspect` need); see [`Checkpoint::open`] for the auditor's check.
    pub fn parse(note: &[u8]) -> Result<Checkpoint, NoteError> {
        Ok(split(note)?.0)
    }

    /// Parses a note and checks that `verifier`'s key signed it.
    pub fn open(note: &[u8], verifier: &Verifier) -> Result<Checkpoint, NoteError> {
        let (checkpoint, body, signatures) = split(note)?;
        let mut seen = None;
        for (line_no, line) in signatures {
            let (name, id, sig) = parse_signature(line_no, line)?;
            if name == verifier.name() && id == verifier.id() {
                return if verifier.verify(body.as_bytes(), &sig) {
                    Ok(checkpoint)
                } else {
                    Err(NoteError::BadSignature {
                        name: name.to_string(),
                    })
                };
            }
            seen.get_or_insert((name.to_string(), id));
        }
        let (name, id) = seen.unwrap_or_default();
        Err(NoteError::UnknownKey {
            name,
            id,
            expected: format!("{}+{:08x}", verifier.name(), verifier.id()),
        })
    }
}

type Split<'a> = (Checkpoint, &'a str, Vec<(usize, &'a str)>);

/// The checkpoint, its body text and its signature lines (with line numbers).
fn split(note: &[u8]) -> Result<Split<'_>, NoteError> {
    if note.len() > MAX_NOTE_LEN {
        return Err(NoteError::TooLong { len: note.len() });
    }
    let text = std::str::from_utf8(note).map_err(|_| NoteError::NotUtf8)?;
    let split_at = text.find("\n\n").ok_or(NoteError::Unsigned)?;
    let body = &text[..split_at + 1];
    let mut lines = body.lines().enumerate().map(|(i, l)| (i + 1, l));
    let mut next = |what: &str| {
        lines.next().ok_or_else(|| NoteError::BadLine {
            line: 0,
            reason: format!("missing the {what} line"),
        })
    };
    let bad = |line: usize, reason: String| NoteError::BadLine { line, reason };

    let (n, origin) = next("origin")?;
    let stream = origin
        .strip_prefix(ORIGIN_PREFIX)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(n, format!("origin {origin:?} is not auditwal/<stream>")))?;
    let (n, size) = next("size")?;
    let size = decimal(n, size)?;
    let (n, head) = next("head hash")?;
    let head: Hash = B64
        .decode(head)
        .ok()
        .and_then(|b| <[u8; HASH_LEN]>::try_from(b).ok())
        .ok_or_else(|| bad(n, "head is not a base64 32-byte hash".into()))?;
    let mut field = |name: &str| -> Result<u64, NoteError> {
        let (n, line) = next(name)?;
        let value = line
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| bad(n, format!("expected `{name} <n>`, found {line:?}")))?;
        decimal(n, value)
    };
    let epoch = field("epoch")?;
    let events = field("events")?;
    let sampled_out = field("sampled-out")?;
    let time = field("time")?;
    let checkpoint = Checkpoint {
        stream: stream.to_string(),
        size,
        head,
        epoch,
        events,
        sampled_out,
        time: i64::try_from(time).map_err(|_| bad(7, "time out of range".into()))?,
    };
    let body_lines = body.lines().count();
    let signatures: Vec<(usize, &str)> = text[split_at + 2..]
        .lines()
        .enumerate()
        .map(|(i, l)| (body_lines + 2 + i, l))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if signatures.is_empty() {
        return Err(NoteError::Unsigned);
    }
    Ok((checkpoint, body, signatures))
}

fn decimal(line: usize, text: &str) -> Result<u64, NoteError> {
    // Canonical decimal only: one spelling per number, so a note cannot be
    // re-spelled into different signed bytes with the same meaning.
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    text.parse()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| NoteError::BadLine {
            line,
            reason: format!("{text:?} is not a decimal number"),
        })
}

fn parse_signature(line_no: usize, line: &str) -> Result<(&str, u32, [u8; 64]), NoteError> {
    let bad = |reason: &str| NoteError::BadLine {
        line: line_no,
        reason: reason.to_string(),
    };
    let rest = line
        .strip_prefix(SIG_PREFIX)
        .ok_or_else(|| bad("a signature line starts with an em dash and a space"))?;
    let (name, blob) = rest
        .split_once(' ')
        .ok_or_else(|| bad("a signature line is `— <name> <base64>`"))?;
    let blob = B64
        .decode(blob)
        .map_err(|_| bad("the signature is not base64"))?;
    if blob.len() != 4 + 64 {
        return Err(bad("the signature is not a key id and an Ed25519 signature"));
    }
    let id = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
    let mut sig = [0; 64];
    sig.copy_from_slice(&blob[4..]);
    Ok((name, id, sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            stream: "edge-1".into(),
            size: 1234,
            head: [7; HASH_LEN],
            epoch: 0,
            events: 1200,
            sampled_out: 5,
            time: 1_790_000_000,
        }
    }

    #[test]
    fn a_signed_note_opens_with_its_key_and_not_another() {
        let signer = Signer::generate("test-key");
        let note = sample().sign(&signer);
        assert!(note.starts_with("auditwal/edge-1\n1234\n"), "{note}");
        assert_eq!(Checkpoint::open(note.as_bytes(), &signer.verifier()), Ok(sample()));
        assert_eq!(Checkpoint::parse(note.as_bytes()), Ok(sample()));

        let other = Signer::generate("test-key");
        assert!(matches!(
            Checkpoint::open(note.as_bytes(), &other.verifier()),
            Err(NoteError::UnknownKey { .. }) | Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_changed_body_fails_the_signature() {
        let signer = Signer::generate("k");
        let note = sample().sign(&signer).replace("\n1234\n", "\n1235\n");
        assert!(matches!(
            Checkpoint::open(note.as_bytes(), &signer.verifier()),
            Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn malformed_notes_are_refused_by_line() {
        let signer = Signer::generate("k");
        let good = sample().sign(&signer);
        for bad in [
            good.replace("auditwal/edge-1", "other/edge-1"),
            good.replace("\n1234\n", "\n01234\n"),
            good.replace("epoch 0", "epoch x"),
            good.replace("\n\n", "\n"),
            "not a note".to_string(),
        ] {
            assert!(Checkpoint::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(matches!(
            Checkpoint::parse(&[0xff; 10]),
            Err(NoteError::NotUtf8)
        ));
    }

    #[test]
    fn an_epoch_checkpoint_is_recognised() {
        let c = Checkpoint::epoch("s", 40, 1);
        assert!(c.is_epoch());
        assert!(!sample().is_epoch());
    }
}
