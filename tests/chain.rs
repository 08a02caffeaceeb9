//! The hash chain against a real PostgreSQL and the real CLI: a signed WAL
//! written by `auditwal emit`, loaded by `auditwal load`, tampered with by a
//! superuser who disables the table's triggers, and judged by
//! `auditwal verify-db`. Each tampering gets a database of its own, loaded from
//! the same WAL; each must be caught and named, and the untouched copy must
//! verify clean. The WAL side too: a record edited with its CRC recomputed.

use auditwal_test_support as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use auditwal::wal::format::{self, RecordKind, ScanItem};
use common::{assert_ok, auditwal_bin, emit_lines_with_env, verify_db_json, TestDb};
use serde_json::Value;

/// A signed WAL: keys, and a stream written by three `emit` runs (so the
/// chain resumes across opens), on small segments (so it crosses seals).
struct SignedWal {
    dir: tempfile::TempDir,
}

const STREAM: &str = "api";
const EVENTS_PER_RUN: usize = 120;

impl SignedWal {
    fn new() -> SignedWal {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(auditwal_bin())
            .args(["keygen", "--out"])
            .arg(dir.path().join("keys"))
            .output()
            .expect("run keygen");
        assert_ok(&out);
        let w = SignedWal { dir };
        for run in 0..3 {
            w.emit(run);
        }
        w
    }

    fn wal(&self) -> PathBuf {
        self.dir.path().join("wal")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("keys/auditwal.key")
    }

    fn public_key(&self) -> PathBuf {
        self.dir.path().join("keys/auditwal.pub")
    }

    fn emit(&self, run: usize) -> usize {
        let lines: String = (0..EVENTS_PER_RUN)
            .map(|i| {
                let n = run * EVENTS_PER_RUN + i;
                format!(
                    "{{\"action\":\"doc.edited\",\"actor_id\":\"user-{n}\",\"target_type\":\"doc\",\
                     \"target_id\":\"{n}\",\"ip\":\"10.0.0.{}\",\"metadata\":{{\"n\":{n},\"ratio\":1.0,\
                     \"pad\":\"{}\"}}}}\n",
                    n % 250,
                    "x".repeat(200)
                )
            })
            .collect();
        let key = self.key();
        let ids = emit_lines_with_env(
            &self.wal(),
            STREAM,
            "async",
            lines,
            &[
                ("AUDITWAL_CHAIN_KEY", key.to_str().expect("utf-8 path")),
                ("AUDITWAL_CHECKPOINT_EVERY", "25"),
                ("AUDITWAL_SEGMENT_SIZE", "64KiB"),
            ],
        );
        ids.len()
    }

    /// A fresh database holding this WAL, loaded by `auditwal load --once`
    /// from a copy (the loader retires the segments it has loaded).
    async fn loaded_db(&self) -> TestDb {
        let copy = self.copy();
        load_into(&copy.path().join("wal")).await
    }

    /// A copy of the WAL, in `copy/wal`.
    fn copy(&self) -> tempfile::TempDir {
        let copy = tempfile::tempdir().expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.wal())
            .arg(copy.path())
            .status()
            .expect("cp");
        assert!(status.success());
        copy
    }

    /// `verify-db --json` (plus `extra`): exit code, findings, the last
    /// stream summary.
    fn verify_db(&self, db: &TestDb, extra: &[&str]) -> (i32, Vec<Value>, Value) {
        let (code, findings, summaries) = verify_db_json(db.url(), &self.public_key(), extra);
        (
            code,
            findings,
            summaries.last().cloned().unwrap_or(Value::Null),
        )
    }
}

/// A fresh database with `wal_dir` loaded into it.
async fn load_into(wal_dir: &Path) -> TestDb {
    let db = TestDb::new().await;
    let out = Command::new(auditwal_bin())
        .args(["load", "--once", "--metrics-addr", "off", "--wal-dir"])
        .arg(wal_dir)
        .args(["--database-url", db.url()])
        .output()
        .expect("run load");
    assert_ok(&out);
    db
}

async fn lsns(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT lsn FROM audit_events WHERE stream_id = $1 ORDER BY lsn")
        .bind(STREAM)
        .fetch_all(db.pool())
        .await
        .expect("lsns")
}

/// The one finding, which must be of `kind`.
fn only<'a>(findings: &'a [Value], kind: &str) -> &'a Value {
    assert_eq!(findings.len(), 1, "expected one {kind}: {findings:#?}");
    assert_eq!(findings[0]["finding"], kind, "{findings:#?}");
    &findings[0]
}

#[tokio::test]
async fn a_signed_trail_verifies_clean_and_every_tampering_is_named() {
    let wal = SignedWal::new();

    // Untouched: clean, every row under a signature (the last emit's close
    // signed its tail), checkpoints from every run and seal.
    let db = wal.loaded_db().await;
    let all = lsns(&db).await;
    assert_eq!(all.len(), 3 * EVENTS_PER_RUN);
    let (code, findings, summary) = wal.verify_db(&db, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    assert_eq!(summary["rows"], 3 * EVENTS_PER_RUN as u64);
    assert_eq!(summary["signed_through"], *all.last().expect("rows"));
    assert_eq!(summary["unsigned_rows"], 0);
    assert!(
        summary["checkpoints"].as_u64().expect("count") >= 4,
        "{summary}"
    );
    // The second and third runs resumed the chain: one epoch, at the start.
    let epochs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_chain_checkpoints WHERE head = decode(repeat('00', 32), 'hex')",
    )
    .fetch_one(db.pool())
    .await
    .expect("epochs");
    assert_eq!(epochs, 1);
    // The local WAL agrees with the table.
    let wal_dir = wal.wal();
    let wal_arg = wal_dir.to_str().expect("utf-8");
    let (code, findings, _) = wal.verify_db(&db, &["--wal-dir", wal_arg]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");

    // A loader that begins mid-stream (this WAL after a load retired its
    // first segments) cannot know the head it starts from: one mismatch at
    // the first checkpoint it reads, and the chain is whole after it.
    let copy = wal.copy();
    let _ = load_into(&copy.path().join("wal")).await;
    let late = load_into(&copy.path().join("wal")).await;
    let (_, findings, summary) = wal.verify_db(&late, &[]);
    let f = only(&findings, "checkpoint_mismatch");
    let first_row = lsns(&late).await[0];
    assert!(
        first_row > 1 && f["size"].as_i64().expect("size") >= first_row,
        "{f} {summary}"
    );

    // UPDATE one field of one row.
    let target = all[40];
    db.tamper(&format!(
        "UPDATE audit_events SET actor_id = 'mallory' WHERE stream_id = 'api' AND lsn = {target}"
    ))
    .await;
    let (code, findings, _) = wal.verify_db(&db, &[]);
    let f = only(&findings, "changed_row");
    assert_eq!((code, f["lsn"].as_i64()), (1, Some(target)));
    assert!(
        f["detail"].as_str().expect("detail").contains("actor_id"),
        "{f}"
    );

    // UPDATE the record (and the chain hash with it would not help: the link
    // is checked against its predecessor).
    let db = wal.loaded_db().await;
    let target = all[77];
    db.tamper(&format!(
            "UPDATE audit_events SET wal_payload = overlay(wal_payload placing '\\x00'::bytea from 20), \
             chain_hash = sha256(chain_hash) WHERE stream_id = 'api' AND lsn = {target}"
        ),
    )
    .await;
    let (_, findings, _) = wal.verify_db(&db, &[]);
    assert!(
        findings
            .iter()
            .any(|f| f["finding"] == "changed_row" && f["lsn"] == target),
        "{findings:#?}"
    );

    // DELETE one row.
    let db = wal.loaded_db().await;
    let target = all[100];
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE stream_id = 'api' AND lsn = {target}"
    ))
    .await;
    let (code, findings, _) = wal.verify_db(&db, &[]);
    let f = only(&findings, "deleted_rows");
    assert_eq!(code, 1);
    assert_eq!(f["last_missing"].as_i64(), Some(target), "{f}");
    assert_eq!(f["after"].as_i64(), Some(all[99]), "{f}");

    // INSERT a forged row at a plausible LSN (one no event took: a checkpoint
    // or end-of-segment record's), copying a real row's link and record.
    let db = wal.loaded_db().await;
    let gap = all
        .windows(2)
        .skip(150)
        .find(|w| w[1] > w[0] + 1)
        .expect("an LSN gap")[0];
    let forged = gap + 1;
    db.tamper(&format!(
            "INSERT INTO audit_events (event_id, occurred_at, action, actor_id, stream_id, lsn, \
             sample_rate, chain_prev_lsn, chain_hash, wal_payload) \
             SELECT gen_random_uuid(), occurred_at, action, 'ghost', stream_id, {forged}, sample_rate, \
             {gap}, chain_hash, wal_payload FROM audit_events WHERE stream_id = 'api' AND lsn = {gap}"
        ),
    )
    .await;
    let (_, findings, _) = wal.verify_db(&db, &[]);
    assert!(
        findings
            .iter()
            .any(|f| f["finding"] == "inserted_row" && f["lsn"] == forged),
        "{findings:#?}"
    );
    assert!(
        findings.iter().all(|f| f["at_lsn"] == forged),
        "only the forged row is named: {findings:#?}"
    );

    // Swap two rows' LSNs.
    let db = wal.loaded_db().await;
    let (a, b) = (all[200], all[201]);
    db.tamper(&format!(
        "UPDATE audit_events SET lsn = -1 WHERE stream_id = 'api' AND lsn = {a}; \
             UPDATE audit_events SET lsn = {a} WHERE stream_id = 'api' AND lsn = {b}; \
             UPDATE audit_events SET lsn = {b} WHERE stream_id = 'api' AND lsn = -1"
    ))
    .await;
    let (_, findings, _) = wal.verify_db(&db, &[]);
    let f = only(&findings, "reordered_pair");
    assert_eq!((f["a"].as_i64(), f["b"].as_i64()), (Some(a), Some(b)));

    // DELETE the newest 10 rows: the table's own last checkpoint shows it.
    let db = wal.loaded_db().await;
    let keep = all[all.len() - 11];
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE stream_id = 'api' AND lsn > {keep}"
    ))
    .await;
    let (_, findings, _) = wal.verify_db(&db, &[]);
    let f = only(&findings, "cut_tail");
    assert_eq!(f["last_row"].as_i64(), Some(keep), "{f}");
    // ...and with the checkpoints that covered them deleted too, only the
    // writer's local WAL can tell.
    db.tamper(&format!(
        "DELETE FROM audit_chain_checkpoints WHERE stream_id = 'api' AND size > {keep}"
    ))
    .await;
    let (code, findings, _) = wal.verify_db(&db, &[]);
    assert_eq!(
        (code, findings.len()),
        (0, 0),
        "the table alone looks whole"
    );
    let (_, findings, _) = wal.verify_db(&db, &["--wal-dir", wal_arg]);
    let f = only(&findings, "cut_tail");
    assert!(
        f["source"].as_str().expect("source").contains("local WAL"),
        "{f}"
    );

    // Replace a checkpoint's signature; re-sign one with another key.
    let db = wal.loaded_db().await;
    let cps: Vec<(i64, String)> = sqlx::query_as(
        "SELECT lsn, note FROM audit_chain_checkpoints WHERE stream_id = 'api' ORDER BY lsn",
    )
    .fetch_all(db.pool())
    .await
    .expect("checkpoints");
    let (bad_sig_lsn, note) = &cps[2];
    let sig_at = note.rfind(' ').expect("signature") + 1;
    let mut forged_note = note.clone();
    let c = if &note[sig_at + 8..sig_at + 9] == "A" {
        "B"
    } else {
        "A"
    };
    forged_note.replace_range(sig_at + 8..sig_at + 9, c);
    let other = tempfile::tempdir().expect("tempdir");
    assert_ok(
        &Command::new(auditwal_bin())
            .args(["keygen", "--out"])
            .arg(other.path())
            .output()
            .expect("keygen"),
    );
    let (resigned_lsn, note) = &cps[3];
    let resigned = resign(note, &other.path().join("auditwal.key"));
    for (lsn, text) in [(bad_sig_lsn, &forged_note), (resigned_lsn, &resigned)] {
        sqlx::query("ALTER TABLE audit_chain_checkpoints DISABLE TRIGGER ALL")
            .execute(db.pool())
            .await
            .expect("disable");
        sqlx::query(
            "UPDATE audit_chain_checkpoints SET note = $1 WHERE stream_id = 'api' AND lsn = $2",
        )
        .bind(text)
        .bind(lsn)
        .execute(db.pool())
        .await
        .expect("update note");
    }
    let (_, findings, _) = wal.verify_db(&db, &[]);
    let forged: Vec<i64> = findings
        .iter()
        .filter(|f| f["finding"] == "forged_checkpoint")
        .map(|f| f["lsn"].as_i64().expect("lsn"))
        .collect();
    assert_eq!(forged, vec![*bad_sig_lsn, *resigned_lsn], "{findings:#?}");
}

/// `note`'s body signed by the key at `key` instead.
fn resign(note: &str, key: &Path) -> String {
    let signer = auditwal::chain::Signer::read(key).expect("other key");
    let c = auditwal::chain::Checkpoint::parse(note.as_bytes()).expect("note");
    c.sign(&signer)
}

#[test]
fn wal_verify_catches_a_record_edited_with_its_crc_recomputed() {
    let wal = SignedWal::new();
    let public = wal.public_key();
    let verify = || {
        Command::new(auditwal_bin())
            .arg("verify")
            .arg(wal.wal().join(STREAM))
            .arg("--public-key")
            .arg(&public)
            .output()
            .expect("run verify")
    };
    let clean = verify();
    assert_ok(&clean);

    // Rewrite one event's actor in place, with a valid CRC: every format
    // check passes.
    let segment = first_segment(&wal.wal().join(STREAM));
    let mut bytes = std::fs::read(&segment).expect("read segment");
    let (offset, lsn, payload) = format::scan_segment(&bytes)
        .find_map(|item| match item {
            ScanItem::Record { offset, record }
                if record.kind == RecordKind::Event
                    && record.payload.windows(7).any(|w| w == b"user-30") =>
            {
                Some((offset, record.lsn, record.payload.to_vec()))
            }
            _ => None,
        })
        .expect("the event of user-30");
    let at = payload
        .windows(7)
        .position(|w| w == b"user-30")
        .expect("actor");
    let mut edited = payload.clone();
    edited[at..at + 7].copy_from_slice(b"user-99");
    let len = format::frame_len(edited.len());
    format::encode_frame(
        &mut bytes[offset..offset + len],
        lsn,
        RecordKind::Event,
        &edited,
    )
    .expect("re-encode the frame");
    std::fs::write(&segment, &bytes).expect("write segment");

    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("hash chain mismatch"), "{stdout}");
    assert!(!stdout.contains("checksum"), "the CRC is valid: {stdout}");
}

fn first_segment(stream_dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(stream_dir)
        .expect("stream dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.into_iter().next().expect("a segment")
}

fn replay(wal_dir: &Path, url: &str, from_lsn: i64) {
    let out = Command::new(auditwal_bin())
        .args(["replay", "--from-lsn", &from_lsn.to_string(), "--wal-dir"])
        .arg(wal_dir)
        .args(["--database-url", url])
        .output()
        .expect("run replay");
    assert_ok(&out);
}

#[tokio::test]
async fn replayed_rows_get_the_loaders_links_and_verify_clean() {
    let wal = SignedWal::new();

    // A database restored from a backup that holds none of the stream.
    let db = TestDb::new().await;
    let copy = wal.copy();
    replay(&copy.path().join("wal"), db.url(), 1);
    let (code, findings, summary) = wal.verify_db(&db, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    assert_eq!(summary["rows"], 3 * EVENTS_PER_RUN as u64);
    assert_eq!(summary["unsigned_rows"], 0, "{summary}");

    // A backup older than the loader's last commits: the newest rows and
    // their checkpoints are gone; replay from the first missing LSN.
    let db = wal.loaded_db().await;
    let all = lsns(&db).await;
    let cut = all[200];
    db.tamper(&format!(
        "DELETE FROM audit_events WHERE lsn >= {cut}; \
             DELETE FROM audit_chain_checkpoints WHERE lsn >= {cut}"
    ))
    .await;
    let (code, _, _) = wal.verify_db(&db, &[]);
    assert_eq!(
        code, 0,
        "a consistent cut: only a checkpoint held elsewhere shows it"
    );
    let copy = wal.copy();
    replay(&copy.path().join("wal"), db.url(), cut);
    let (code, findings, summary) = wal.verify_db(&db, &[]);
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");
    assert_eq!(summary["rows"], 3 * EVENTS_PER_RUN as u64);
    assert_eq!(summary["signed_through"], *all.last().expect("rows"));
}
