//! The progress bar of `load --once` and `replay`, through the real CLI against
//! the real server: drawn on stderr when stderr is a terminal (a pseudo-terminal
//! from util-linux `script`), and not one byte of it otherwise — stderr piped,
//! stderr redirected to a file, `--no-progress` — nor ever on stdout.

use auditwal_test_support as common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{assert_exactly, assert_ok, auditwal_bin, TestDb};
use uuid::Uuid;

/// Small segments (the minimum, 64 KiB), so the WAL holds many end-of-segment
/// records: LSNs that are not rows, which the bar's total has to get over.
const SEGMENT_SIZE: &str = "65536";

/// Emits `n` events into `wal_dir/stream` in small segments and returns the ids.
fn emit(wal_dir: &Path, stream: &str, n: usize) -> Vec<Uuid> {
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{{\"action\":\"test.progress\",\"actor_id\":\"u{i}\",\"target_type\":\"doc\",\"target_id\":\"{i}\",\"metadata\":{{\"pad\":\"{}\"}}}}\n",
                "x".repeat(100)
            )
        })
        .collect();
    let ids = common::emit_lines_with_env(
        wal_dir,
        stream,
        "async",
        lines,
        &[("AUDITWAL_SEGMENT_SIZE", SEGMENT_SIZE)],
    );
    assert_eq!(ids.len(), n);
    ids
}

/// `auditwal ARGS` as one shell command line, each argument single-quoted.
fn shell_line(args: &[&str]) -> String {
    std::iter::once(auditwal_bin())
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `line` through `sh -c` with stdin, stdout and stderr on a fresh
/// pseudo-terminal (util-linux `script`); returns what the terminal showed.
fn on_terminal(line: &str) -> Output {
    let out = Command::new("script")
        .args(["-q", "-e", "-c", line, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("util-linux `script` runs the command on a pseudo-terminal (package bsdutils)");
    assert_ok(&out);
    out
}

/// Marks of a drawn bar: indicatif's redraw (carriage return, erase line) and the
/// words of our templates.
const BAR_MARKS: [&str; 4] = ["\r\x1b[2K", "rows/s", "ETA", "[00:00:"];

/// The marks of a drawn bar that `bytes` holds.
fn bar_marks(bytes: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(bytes);
    BAR_MARKS.into_iter().filter(|m| text.contains(m)).collect()
}

/// What the terminal showed, after checking that `command`'s bar was drawn on
/// it and ended on `rows` of `rows` (as the bar writes them: "4,000").
fn assert_bar_ended(out: &Output, command: &str, rows: &str) -> String {
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        bar_marks(&out.stdout),
        BAR_MARKS,
        "no bar on the terminal:\n{shown}"
    );
    assert!(
        shown.contains(&format!("{command} [")) && shown.contains(&format!("{rows}/{rows} rows")),
        "the bar does not end on {rows}/{rows} rows:\n{shown}"
    );
    shown
}

/// No bar drawn in `bytes` (some other output is fine).
fn assert_no_bar(bytes: &[u8]) {
    assert_eq!(
        bar_marks(bytes),
        Vec::<&str>::new(),
        "bar output where none belongs:\n{:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// Runs `auditwal ARGS` with stdin closed and stdout and stderr piped, not a
/// terminal: it must succeed and draw no bar on stderr, not even a carriage
/// return. Returns its output.
fn run_piped(args: &[&str]) -> Output {
    let out = Command::new(auditwal_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run auditwal");
    assert_ok(&out);
    assert_no_bar(&out.stderr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\r'), "{stderr:?}");
    out
}

/// `replay --from-lsn 1` of `wal` into `url`.
fn replay_args<'a>(wal: &'a str, url: &'a str) -> [&'a str; 7] {
    [
        "replay",
        "--wal-dir",
        wal,
        "--database-url",
        url,
        "--from-lsn",
        "1",
    ]
}

fn load_args<'a>(wal: &'a str, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "load",
        "--once",
        "--metrics-addr",
        "off",
        "--batch-rows",
        "500",
        "--wal-dir",
        wal,
        "--database-url",
        url,
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn load_once_on_a_terminal_draws_a_bar_that_ends_on_the_row_count() {
    // Not migrated: the bar's estimate must read "no checkpoints yet" as zero.
    let db = TestDb::empty().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 4000);
    let wal_s = wal.path().to_str().expect("utf-8 temp path");
    let stdout_file = wal.path().join("stdout.txt");
    let line = format!(
        "{} >'{}'",
        shell_line(&load_args(wal_s, db.url(), &[])),
        stdout_file.display()
    );
    let out = on_terminal(&line);
    // The total was estimated from the WAL (it counts end-of-segment records, so it
    // reads a little above the rows while loading), and a complete run ends on the
    // row count, 100 %.
    let shown = assert_bar_ended(&out, "load", "4,000");
    assert!(
        shown.matches("/4,0").count() > shown.matches("/4,000 rows").count(),
        "the bar never showed the estimated total (4,000 rows + end-of-segment records):\n{shown}"
    );
    // Log lines are whole lines between redraws, not glued to the bar.
    assert!(
        shown.contains("\x1b[2K") && shown.lines().any(|l| l.contains("loader stopped")),
        "{shown}"
    );
    let stdout = std::fs::read(&stdout_file).expect("stdout file");
    assert!(
        stdout.is_empty(),
        "load printed on stdout: {:?}",
        String::from_utf8_lossy(&stdout)
    );
    assert_exactly(&db, &ids).await;
}

#[tokio::test]
async fn load_once_with_stderr_piped_writes_no_bar_at_all() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 3000);
    let wal_s = wal.path().to_str().expect("utf-8 temp path");
    let out = run_piped(&load_args(wal_s, db.url(), &[]));
    assert_exactly(&db, &ids).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Stderr was written to (the logs), one whole line at a time.
    assert!(
        stderr.lines().any(|l| l.contains("loader stopped")),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn replay_on_a_terminal_draws_a_bar_and_keeps_its_summary_line() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 3000);
    let wal_s = wal.path().to_str().expect("utf-8 temp path");
    let out = on_terminal(&shell_line(&replay_args(wal_s, db.url())));
    let shown = assert_bar_ended(&out, "replay", "3,000");
    // The summary starts a line of its own after the bar.
    assert!(
        shown
            .lines()
            .any(|l| l.trim_end_matches('\r')
                == "replay: 3000 rows sent, 0 already present, 3000 new"),
        "{shown}"
    );
    assert_exactly(&db, &ids).await;
}

#[tokio::test]
async fn replay_with_stderr_piped_prints_only_its_logs_and_summary() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 2000);
    let wal_s = wal.path().to_str().expect("utf-8 temp path");
    let out = run_piped(&replay_args(wal_s, db.url()));
    assert_exactly(&db, &ids).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.ends_with("replay: 2000 rows sent, 0 already present, 2000 new\n"),
        "{stderr:?}"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn a_terminal_gets_no_bar_with_no_progress_or_when_stderr_goes_elsewhere() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), "s1", 1500);
    let wal_s = wal.path().to_str().expect("utf-8 temp path");

    // stdout on the terminal, stderr to a file: a replay draws nothing anywhere.
    let stderr_file = wal.path().join("stderr.txt");
    let line = format!(
        "{} 2>'{}'",
        shell_line(&replay_args(wal_s, db.url())),
        stderr_file.display()
    );
    let out = on_terminal(&line);
    let stderr = std::fs::read(&stderr_file).expect("stderr file");
    assert_no_bar(&out.stdout);
    assert_no_bar(&stderr);
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(
        stderr.ends_with("replay: 1500 rows sent, 0 already present, 1500 new\n"),
        "{stderr:?}"
    );

    // A terminal, but --no-progress (the replay left nothing for load to do; it
    // still logs).
    let out = on_terminal(&shell_line(&load_args(wal_s, db.url(), &["--no-progress"])));
    assert_no_bar(&out.stdout);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("loader stopped"), "{shown}");

    assert_exactly(&db, &ids).await;
}
