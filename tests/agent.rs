//! `auditwal agent` as a client in another process sees it: a real agent
//! process, a real PostgreSQL, a real SIGKILL and SIGTERM.
//!
//! What is pinned: every answer means what its mode promised (an answered
//! async, durable or kept sampled event is in the WAL after the agent is
//! SIGKILLed; an answered sync event is a committed row with the answered row
//! id), bad input is refused per request with the field named while the
//! connection goes on, the peer's uid and pid are the kernel's, a client that
//! does not read stops being read, SIGTERM answers what is in flight and
//! removes the socket, and HTTP stays on loopback.

use auditwal_test_support as common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_exactly, assert_ok, auditwal_bin, ChildGuard, TestDb};
use serde_json::Value;
use uuid::Uuid;

/// A running agent: its process, socket and (when asked) HTTP address.
struct Agent {
    child: ChildGuard,
    socket: PathBuf,
    http: Option<String>,
}

fn start_agent(wal_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
    let mut child = Command::new(auditwal_bin())
        .arg("agent")
        .arg("--wal-dir")
        .arg(wal_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("AUDIT_MODE")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn auditwal agent");
    let stdout = child.stdout.take().expect("agent stdout");
    let wants_http = extra.contains(&"--http");
    let mut lines = BufReader::new(stdout).lines();
    let (mut socket, mut http) = (None, None);
    while socket.is_none() || (wants_http && http.is_none()) {
        let line = lines
            .next()
            .expect("the agent printed its listeners before exiting")
            .expect("reading the agent's stdout");
        if let Some(p) = line.strip_prefix("socket ") {
            socket = Some(PathBuf::from(p));
        } else if let Some(a) = line.strip_prefix("http ") {
            http = Some(a.to_string());
        }
    }
    Agent {
        child: ChildGuard::new(child),
        socket: socket.expect("socket line"),
        http,
    }
}

/// A socket client that writes requests and reads answers by id.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).expect("connect to the agent");
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        Client { stream, reader }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("write");
        self.stream.write_all(b"\n").expect("write");
    }

    fn answer(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("an answer is JSON")),
        }
    }

    /// Reads `n` answers, by id.
    fn answers(&mut self, n: usize) -> BTreeMap<i64, Value> {
        (0..n)
            .map(|_| {
                let a = self.answer().expect("an answer");
                (a["id"].as_i64().expect("answers carry the id"), a)
            })
            .collect()
    }
}

fn request(id: u64, mode: &str, action: &str) -> String {
    format!(
        r#"{{"id":{id},"mode":"{mode}","event":{{"action":"{action}","request_id":"r-{id}"}}}}"#
    )
}

fn event_id(answer: &Value) -> Uuid {
    answer["event_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no event_id in {answer}"))
}

fn load_once(wal_dir: &Path, url: &str) {
    let out = Command::new(auditwal_bin())
        .args([
            "load",
            "--once",
            "--no-progress",
            "--metrics-addr",
            "off",
            "--wal-dir",
        ])
        .arg(wal_dir)
        .args(["--database-url", url])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run auditwal load --once");
    assert_ok(&out);
}

fn sigterm(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_event_is_stored_after_a_sigkill_of_the_agent() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(
        wal.path(),
        &["--database-url", db.url()],
        &[
            ("AUDIT_SAMPLE_RATE", "0.5"),
            ("AUDIT_FORCE_KEEP_ACTIONS", "none"),
        ],
    );
    let mut client = Client::connect(&agent.socket);
    let modes = ["async", "durable", "sync", "sampled"];
    let n = 400u64;
    for id in 0..n {
        client.send(&request(id, modes[(id % 4) as usize], "agent.crash.test"));
    }
    let answers = client.answers(n as usize);
    // The agent dies with every answer out and nothing closed or fsynced by it.
    let mut child = agent.child.take();
    child.kill().expect("SIGKILL the agent");
    let _ = child.wait();

    let (mut expected, mut sync_rows, mut sampled_out) = (Vec::new(), Vec::new(), 0);
    for (id, a) in &answers {
        assert!(a.get("error").is_none(), "request {id}: {a}");
        match modes[(*id % 4) as usize] {
            "sync" => sync_rows.push((event_id(a), a["row_id"].as_i64().expect("row_id"))),
            "sampled" if a["sampled_out"] == true => sampled_out += 1,
            _ => {
                assert!(a["lsn"].as_u64().is_some(), "{a}");
                expected.push(event_id(a));
            }
        }
    }
    assert!(
        sampled_out > 0 && sampled_out < n / 4,
        "at rate 0.5 some of the {} sampled events are kept, some not: {sampled_out} out",
        n / 4
    );
    // Sync answers are committed rows, before any loading.
    for (event_id, row_id) in &sync_rows {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT id FROM audit_events WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(db.pool())
                .await
                .expect("select the sync row");
        assert_eq!(stored, Some(*row_id), "sync event {event_id}");
    }
    load_once(wal.path(), db.url());
    expected.extend(sync_rows.iter().map(|(e, _)| *e));
    assert_exactly(&db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_answered_while_the_agent_is_killed_mid_stream_are_all_stored() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(wal.path(), &[], &[]);
    let client = Client::connect(&agent.socket);
    let Client {
        mut stream,
        mut reader,
    } = client;
    // A writer that never stops on its own, and a reader that collects answers
    // until the agent's death closes the socket.
    let writer = std::thread::spawn(move || {
        for id in 0u64.. {
            let mode = if id % 2 == 0 { "async" } else { "durable" };
            if stream
                .write_all(format!("{}\n", request(id, mode, "a.mid")).as_bytes())
                .is_err()
            {
                return id;
            }
        }
        unreachable!()
    });
    let collector = std::thread::spawn(move || {
        let mut answered = Vec::new();
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            if let Ok(a) = serde_json::from_str::<Value>(&line) {
                if a["lsn"].is_u64() {
                    answered.push(event_id(&a));
                }
            }
            line.clear();
        }
        answered
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut child = agent.child.take();
    child.kill().expect("SIGKILL the agent");
    let _ = child.wait();
    let sent = writer.join().expect("writer");
    let answered = collector.join().expect("collector");
    assert!(
        answered.len() > 100,
        "the agent answered only {}",
        answered.len()
    );
    load_once(wal.path(), db.url());
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("select");
    let stored: BTreeSet<Uuid> = stored.into_iter().collect();
    let missing: Vec<_> = answered.iter().filter(|e| !stored.contains(e)).collect();
    assert!(missing.is_empty(), "answered but lost: {missing:?}");
    // Unanswered events may or may not be stored; nothing else is.
    assert!(
        stored.len() as u64 <= sent,
        "{} stored of {sent} sent",
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_each_naming_its_field_and_the_connection_goes_on() {
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(wal.path(), &[], &[("AUDITWAL_MAX_EVENT_BYTES", "1000")]);
    let mut client = Client::connect(&agent.socket);
    let big = "x".repeat(20_000);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            r#"{"id":1,"event":{"actor_id":"u"}}"#.into(),
            "invalid_event",
            "action",
        ),
        (
            r#"{"id":2,"event":{"action":["a"]}}"#.into(),
            "invalid_event",
            "action",
        ),
        (
            r#"{"id":3,"event":{"action":"a","ip":"nope"}}"#.into(),
            "invalid_event",
            "ip",
        ),
        (
            r#"{"id":4,"mode":"eventually","event":{"action":"a"}}"#.into(),
            "invalid_request",
            "mode",
        ),
        (
            format!(r#"{{"id":5,"event":{{"action":"a","reason":"{big}"}}}}"#),
            "too_large",
            "line",
        ),
        (
            format!(
                r#"{{"id":6,"event":{{"action":"a","reason":"{}"}}}}"#,
                &big[..990]
            ),
            "too_large",
            "",
        ),
        (
            r#"{"id":7,"mode":"sync","event":{"action":"a"}}"#.into(),
            "unavailable",
            "mode",
        ),
        (
            r#"{"id":8,"event":{"action":"a","metadata":"text"}}"#.into(),
            "invalid_event",
            "metadata",
        ),
    ];
    for (i, (line, _, _)) in cases.iter().enumerate() {
        client.send(line);
        client.send(&request(100 + i as u64, "async", "a.good"));
    }
    client.send("this is not JSON");
    let mut answers = BTreeMap::new();
    let mut without_id = Vec::new();
    for _ in 0..cases.len() * 2 + 1 {
        let a = client.answer().expect("every line is answered");
        match a["id"].as_i64() {
            Some(id) => drop(answers.insert(id, a)),
            None => without_id.push(a),
        }
    }
    assert_eq!(
        without_id.len(),
        1,
        "only the junk line has no id: {without_id:?}"
    );
    assert_eq!(without_id[0]["kind"], "invalid_request");
    for (i, (line, kind, field)) in cases.iter().enumerate() {
        let a = answers
            .remove(&(i as i64 + 1))
            .expect("every request is answered");
        assert_eq!(a["kind"], *kind, "{line}: {a}");
        if !field.is_empty() {
            assert_eq!(a["field"], *field, "{line}: {a}");
        }
        let good = answers
            .remove(&(100 + i as i64))
            .expect("the good one after it");
        assert!(
            good["lsn"].is_u64(),
            "the event after a bad one is recorded: {good}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_is_stamped_from_the_kernel_whatever_the_client_claims() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(wal.path(), &[], &[]);
    let mut client = Client::connect(&agent.socket);
    client.send(
        r#"{"id":1,"event":{"action":"a.peer","metadata":{"k":"v","_auditwal_peer":{"uid":0,"pid":1}}}}"#,
    );
    let a = client.answer().expect("answer");
    let mut child = agent.child.take();
    sigterm(child.id());
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    load_once(wal.path(), db.url());
    let (uid, pid, k): (Option<i64>, Option<i64>, Option<String>) = sqlx::query_as(
        "SELECT (metadata->'_auditwal_peer'->>'uid')::bigint, \
                (metadata->'_auditwal_peer'->>'pid')::bigint, metadata->>'k' \
         FROM audit_events WHERE event_id = $1",
    )
    .bind(event_id(&a))
    .fetch_one(db.pool())
    .await
    .expect("the event is stored");
    assert_eq!(uid, Some(i64::from(rustix::process::getuid().as_raw())));
    assert_eq!(pid, Some(i64::from(std::process::id())));
    assert_eq!(k.as_deref(), Some("v"), "the rest of metadata is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_off_the_allow_list_is_refused() {
    let wal = tempfile::tempdir().expect("tempdir");
    let other = rustix::process::getuid().as_raw().wrapping_add(1);
    let agent = start_agent(wal.path(), &["--allow-uid", &other.to_string()], &[]);
    let mut client = Client::connect(&agent.socket);
    client.send(&request(1, "async", "a"));
    let a = client.answer().expect("a refusal");
    assert_eq!(a["kind"], "forbidden", "{a}");
    assert!(client.answer().is_none(), "then the connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answers_stops_being_read() {
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(wal.path(), &["--max-in-flight", "64"], &[]);
    let mut client = Client::connect(&agent.socket);
    client.stream.set_nonblocking(true).expect("nonblocking");
    let line = format!("{}\n", request(1, "async", "a.pressure"));
    let mut written = 0usize;
    let started = Instant::now();
    // Without backpressure the agent would read (and queue answers for) all of
    // this; with it, the socket fills after a bounded number of requests.
    let mut stalled_since: Option<Instant> = None;
    while written < 256 << 20 {
        match client.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                written += n;
                stalled_since = None;
            }
            Ok(n) => {
                client.stream.set_nonblocking(false).expect("blocking");
                client
                    .stream
                    .write_all(&line.as_bytes()[n..])
                    .expect("finish the line");
                client.stream.set_nonblocking(true).expect("nonblocking");
                written += line.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never stalled");
    }
    assert!(
        written < 64 << 20,
        "the agent kept reading a client that reads nothing: {written} bytes"
    );
    // Reading the answers lets it go on: every request written is answered.
    client.stream.set_nonblocking(false).expect("blocking");
    let requests = written / line.len();
    let drain = std::thread::spawn(move || {
        let mut n = 0;
        while n < requests {
            let a = client
                .answer()
                .expect("an answer for every request written");
            assert!(a["lsn"].is_u64(), "{a}");
            n += 1;
        }
        n
    });
    assert_eq!(drain.join().expect("drain"), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_what_is_in_flight_removes_the_socket_and_exits_0() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(wal.path(), &[], &[]);
    let mut client = Client::connect(&agent.socket);
    for id in 0..200 {
        client.send(&request(id, "durable", "a.term"));
    }
    let mut child = agent.child.take();
    sigterm(child.id());
    let mut answered = Vec::new();
    while let Some(a) = client.answer() {
        if a["lsn"].is_u64() {
            answered.push(event_id(&a));
        }
    }
    let status = child.wait().expect("wait for the agent");
    assert!(status.success(), "exit status {status:?}");
    assert!(!agent.socket.exists(), "the socket is removed");
    load_once(wal.path(), db.url());
    // Whatever was answered is stored; what was read but not yet answered when
    // the signal came was answered too (nothing half-done is dropped).
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("select");
    assert_eq!(stored.len(), answered.len(), "stored = answered");
    assert_exactly(&db, &answered).await;
}

/// One HTTP/1.1 request; the status and body of the answer.
fn http_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect HTTP");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_each_event_after_its_mode_promise_and_names_bad_fields() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(
        wal.path(),
        &["--http", "127.0.0.1:0", "--database-url", db.url()],
        &[],
    );
    let addr = agent.http.clone().expect("http address");
    let (status, body) = http_post(&addr, "/v1/events?mode=sync", r#"{"action":"h.sync"}"#);
    assert_eq!(status, 200, "{body}");
    let a: Value = serde_json::from_str(&body).expect("json");
    let row: Option<i64> = sqlx::query_scalar("SELECT id FROM audit_events WHERE event_id = $1")
        .bind(event_id(&a))
        .fetch_optional(db.pool())
        .await
        .expect("select");
    assert_eq!(
        row,
        a["row_id"].as_i64(),
        "a sync answer is a committed row"
    );

    let (status, body) = http_post(&addr, "/v1/events", r#"{"action":"h","ip":"x"}"#);
    assert_eq!(status, 400);
    let a: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(a["field"], "ip", "{a}");

    let (status, _) = http_post(&addr, "/v1/events?mode=soon", r#"{"action":"h"}"#);
    assert_eq!(status, 400);

    let batch = "{\"action\":\"h.1\"}\n{\"action\":5}\n{\"action\":\"h.3\",\"mode\":\"durable\"}\n";
    let (status, body) = http_post(&addr, "/v1/events?mode=async", batch);
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3, "{body}");
    assert!(
        lines[0]["lsn"].is_u64() && lines[2]["lsn"].is_u64(),
        "{body}"
    );
    assert_eq!(lines[1]["field"], "action", "{body}");
    assert_eq!(lines[2]["mode"], "durable", "a mode field wins over ?mode=");
}

#[test]
fn http_on_a_non_loopback_address_is_refused_as_bad_usage() {
    let wal = tempfile::tempdir().expect("tempdir");
    let out = Command::new(auditwal_bin())
        .args(["agent", "--http", "0.0.0.0:0", "--wal-dir"])
        .arg(wal.path())
        .output()
        .expect("run the agent");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
    assert!(!wal.path().join("agent.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_load_the_agent_moves_its_events_into_postgresql_itself() {
    let db = TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(
        wal.path(),
        &["--database-url", db.url(), "--load"],
        &[("AUDITWAL_FSYNC_INTERVAL_MS", "20")],
    );
    let mut client = Client::connect(&agent.socket);
    for id in 0..50 {
        client.send(&request(id, "async", "a.load"));
    }
    let answered: Vec<Uuid> = client.answers(50).values().map(event_id).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.count().await < 50 {
        assert!(
            Instant::now() < deadline,
            "the in-process loader did not load in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_exactly(&db, &answered).await;
    let mut child = agent.child.take();
    sigterm(child.id());
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "the agent and its loader stop cleanly: {status:?}"
    );
}

#[test]
fn sigterm_is_not_held_up_by_a_client_that_reads_no_answers() {
    let wal = tempfile::tempdir().expect("tempdir");
    // Drain grace: twice the sync timeout plus 5 s, so about 6 s here.
    let agent = start_agent(
        wal.path(),
        &["--max-in-flight", "16"],
        &[("AUDITWAL_SYNC_TIMEOUT_MS", "500")],
    );
    let mut client = Client::connect(&agent.socket);
    client.stream.set_nonblocking(true).expect("nonblocking");
    let line = format!("{}\n", request(1, "async", "a.stuck"));
    let started = Instant::now();
    let mut stalled = 0;
    while stalled < 50 {
        match client.stream.write(line.as_bytes()) {
            Ok(_) => stalled = 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stalled += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never stalled");
    }
    let mut child = agent.child.take();
    let signalled = Instant::now();
    sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still runs 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(5),
        "it waited its grace first"
    );
    assert!(!agent.socket.exists());
}
