//! Sync mode against a real PostgreSQL: its own transaction, group commit with one
//! answer per caller, bad events failing alone, validation before sending, typed
//! errors within the timeout when the database is down, and `auditwal emit --mode
//! sync`.

use auditwal_test_support as common;

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener};
use std::time::{Duration, Instant};

use auditwal::pg::{PgError, RowId, SyncConfig, SyncWriter};
use auditwal::{AuditEvent, EventError, Outcome};
use chrono::{TimeZone, Utc};
use common::TestDb;
use sqlx::{Executor, Row};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

fn config(timeout: Duration) -> SyncConfig {
    {
        let mut c = SyncConfig::default();
        c.timeout = timeout;
        c
    }
}

/// A writer that does not migrate, so it opens without reaching the server.
async fn lazy_writer(url: &str, timeout: Duration) -> SyncWriter {
    SyncWriter::connect(url, {
        let mut c = config(timeout);
        c.migrate = false;
        c
    })
    .await
    .expect("a lazy writer")
}

async fn writer(db: &TestDb) -> SyncWriter {
    SyncWriter::connect(db.url(), config(Duration::from_secs(10)))
        .await
        .expect("connecting the sync writer")
}

fn event(i: usize) -> AuditEvent {
    AuditEvent::new("doc.viewed")
        .actor("user", format!("u{i}"))
        .target("doc", format!("d{i}"))
        .outcome(Outcome::Success)
}

async fn stored_id(db: &TestDb, event_id: Uuid) -> Option<i64> {
    sqlx::query_scalar("SELECT id FROM audit_events WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(db.pool())
        .await
        .expect("looking up a row")
}

/// Once the database answers again: a call goes through and its row is
/// stored under the id it got, while the events `refused` earlier are not.
async fn assert_recovered(db: &TestDb, w: &SyncWriter, i: usize, refused: std::ops::Range<usize>) {
    let e = event(i);
    let id = w.record(&e).await.expect("once the database answers again");
    assert_eq!(stored_id(db, e.event_id).await, Some(id.0));
    for r in refused {
        assert_eq!(stored_id(db, event(r).event_id).await, None, "event {r}");
    }
}

/// How many transactions wrote the rows of `audit_events`: rows written by one
/// transaction share its xmin.
async fn writing_transactions(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM audit_events")
        .fetch_one(db.pool())
        .await
        .expect("xmin")
}

/// A database URL on a loopback port with nothing listening on it.
fn nowhere_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable")
}

#[tokio::test]
async fn the_audit_row_survives_the_callers_rollback_and_its_failure_does_not_abort_the_caller() {
    let db = TestDb::new().await;
    let w = writer(&db).await;
    let mut caller = db.pool().begin().await.expect("caller's transaction");
    caller
        .execute("CREATE TABLE business (x int)")
        .await
        .expect("caller's own work");
    let e = event(1);
    let id = w
        .record(&e)
        .await
        .expect("record inside the caller's transaction");
    // An audit failure (here a duplicate) is an error for the caller to handle; the
    // caller's transaction is untouched by it.
    let dup = w.record(&e).await;
    assert!(
        matches!(dup, Err(PgError::Duplicate { event_id }) if event_id == e.event_id),
        "{dup:?}"
    );
    caller
        .execute("INSERT INTO business VALUES (1)")
        .await
        .expect("the caller's transaction is still usable");
    caller.rollback().await.expect("rollback");

    assert_eq!(stored_id(&db, e.event_id).await, Some(id.0));
    let business: Option<String> = sqlx::query_scalar("SELECT to_regclass('business')::text")
        .fetch_one(db.pool())
        .await
        .expect("to_regclass");
    assert_eq!(business, None, "the caller's work was rolled back");
}

#[tokio::test]
async fn every_field_is_stored_and_sync_rows_have_no_stream_and_rate_one() {
    let db = TestDb::new().await;
    let w = writer(&db).await;
    let ip: IpAddr = "2001:db8::7".parse().expect("ip");
    let e = AuditEvent::new("admin.user.disabled")
        .actor("user", "42")
        .target("user", "7")
        .target_name("Mallory")
        .tenant("t1")
        .outcome(Outcome::Denied)
        .reason("no \"quotes\" problem")
        .ip(ip)
        .user_agent("curl/8")
        .request_id("r-9")
        .before(&serde_json::json!({"enabled": true}))
        .and_then(|e| e.after(&serde_json::json!({"enabled": false})))
        .and_then(|e| e.metadata(&serde_json::json!({"k": ["v", 1]})))
        .expect("json fields");
    let id = w.record(&e).await.expect("record");
    let sampled = w
        .record_sampled(&event(2), 0.25)
        .await
        .expect("record_sampled");

    let row = sqlx::query(
        "SELECT id, event_id, occurred_at, action, actor_id, actor_type, target_type, target_id, \
         target_name, tenant_id, outcome, reason, host(ip) AS ip, user_agent, request_id, \
         before::text, after::text, metadata::text, stream_id, lsn, sample_rate \
         FROM audit_events WHERE event_id = $1",
    )
    .bind(e.event_id)
    .fetch_one(db.pool())
    .await
    .expect("the row");
    let s = |c: &str| row.try_get::<Option<String>, _>(c).expect(c);
    assert_eq!(row.try_get::<i64, _>("id").expect("id"), id.0);
    let at: chrono::DateTime<Utc> = row.try_get("occurred_at").expect("occurred_at");
    assert_eq!(at.timestamp_micros(), e.occurred_at.timestamp_micros());
    // Every text column as written (json columns as PostgreSQL prints them).
    for (column, want) in [
        ("action", "admin.user.disabled"),
        ("actor_id", "42"),
        ("actor_type", "user"),
        ("target_type", "user"),
        ("target_id", "7"),
        ("target_name", "Mallory"),
        ("tenant_id", "t1"),
        ("outcome", "denied"),
        ("reason", "no \"quotes\" problem"),
        ("ip", "2001:db8::7"),
        ("user_agent", "curl/8"),
        ("request_id", "r-9"),
        ("before", r#"{"enabled": true}"#),
        ("after", r#"{"enabled": false}"#),
        ("metadata", r#"{"k": ["v", 1]}"#),
    ] {
        assert_eq!(s(column).as_deref(), Some(want), "{column}");
    }
    assert_eq!(s("stream_id"), None);
    assert_eq!(row.try_get::<Option<i64>, _>("lsn").expect("lsn"), None);
    assert_eq!(row.try_get::<f64, _>("sample_rate").expect("rate"), 1.0);

    let rate: f64 = sqlx::query_scalar("SELECT sample_rate FROM audit_events WHERE id = $1")
        .bind(sampled.0)
        .fetch_one(db.pool())
        .await
        .expect("sampled row");
    assert_eq!(rate, 0.25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_callers_each_get_their_own_id_and_commits_are_shared() {
    const CALLERS: usize = 64;
    const EACH: usize = 25;
    let db = TestDb::new().await;
    let w = writer(&db).await;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|c| {
            let w = w.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let e = event(c * EACH + i);
                    let id = w.record(&e).await.expect("record");
                    got.push((e.event_id, id));
                }
                got
            })
        })
        .collect();
    let mut all: Vec<(Uuid, RowId)> = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("caller task"));
    }
    let ids: HashSet<RowId> = all.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), CALLERS * EACH, "row ids are not distinct");

    let rows: Vec<(Uuid, i64)> = sqlx::query_as("SELECT event_id, id FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("rows");
    assert_eq!(rows.len(), CALLERS * EACH);
    let stored: HashSet<(Uuid, i64)> = rows.into_iter().collect();
    for (event_id, id) in &all {
        assert!(
            stored.contains(&(*event_id, id.0)),
            "caller got id {id} for {event_id}, which is not that row's id"
        );
    }
    // Fewer transactions than rows means calls were coalesced.
    let transactions = writing_transactions(&db).await;
    assert!(
        (transactions as usize) < CALLERS * EACH / 2,
        "{transactions} transactions for {} rows: little or no group commit",
        CALLERS * EACH
    );
}

#[tokio::test]
async fn a_lone_caller_gets_a_transaction_of_its_own_each_time() {
    let db = TestDb::new().await;
    let w = writer(&db).await;
    for i in 0..20 {
        w.record(&event(i)).await.expect("record");
    }
    let transactions = writing_transactions(&db).await;
    assert_eq!(transactions, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_event_in_a_coalesced_batch_fails_alone_and_its_neighbours_commit() {
    let db = TestDb::new().await;
    // One committer, so everything queued behind a blocked INSERT goes out as one
    // batch once the block is lifted.
    let w = SyncWriter::connect(db.url(), {
        let mut c = config(Duration::from_secs(20));
        c.committers = 1;
        c
    })
    .await
    .expect("writer");
    let original = event(0);
    w.record(&original).await.expect("the original");

    let mut locker = db.pool().begin().await.expect("locker");
    locker
        .execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let first = {
        let w = w.clone();
        tokio::spawn(async move { w.record(&event(1000)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await; // the committer is now blocked
    let mut burst = Vec::new();
    for i in 1..64 {
        let w = w.clone();
        // Event 32 repeats the original's event_id and occurred_at.
        let e = if i == 32 { original.clone() } else { event(i) };
        burst.push((e.event_id, tokio::spawn(async move { w.record(&e).await })));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // all queued behind the lock
    locker.rollback().await.expect("release the lock");

    first.await.expect("task").expect("the blocked event");
    let mut ok = 0;
    for (event_id, t) in burst {
        match t.await.expect("task") {
            Ok(id) => {
                assert_eq!(stored_id(&db, event_id).await, Some(id.0));
                ok += 1;
            }
            Err(PgError::Duplicate { event_id: dup }) => assert_eq!(dup, original.event_id),
            Err(e) => panic!("a neighbour failed: {e}"),
        }
    }
    assert_eq!(ok, 62);
    // original + the blocked one + 62 neighbours
    assert_eq!(db.count().await, 64);
}

#[tokio::test]
async fn events_postgres_cannot_store_are_refused_naming_the_field_before_anything_is_sent() {
    // Pointed at a port where nothing listens: a validation error must come back
    // (not "database unavailable"), which proves nothing was sent.
    let nowhere = nowhere_url();
    let w = SyncWriter::connect(&nowhere, {
        let mut c = config(Duration::from_secs(2));
        c.migrate = false;
        c
    })
    .await
    .expect("a lazy writer");
    let db = TestDb::new().await;
    let live = writer(&db).await;

    // Before 4713 BC: outside PostgreSQL's timestamptz.
    let too_old = Utc
        .with_ymd_and_hms(-5000, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid chrono date");
    let cases: Vec<(AuditEvent, EventError)> = vec![
        (
            event(1).reason("a\0b"),
            EventError::NulByte { field: "reason" },
        ),
        (
            event(2).user_agent("x\0"),
            EventError::NulByte {
                field: "user_agent",
            },
        ),
        (
            event(3)
                .metadata(&serde_json::json!({"k": "v\u{0}"}))
                .expect("json"),
            EventError::NulByte { field: "metadata" },
        ),
        (
            AuditEvent::new(""),
            EventError::MissingField { field: "action" },
        ),
        (
            event(4).reason("x".repeat(70 * 1024)),
            EventError::TooLarge {
                size: 70 * 1024 + "doc.viewed".len() + 2 + 4 + 3 + 2 + "success".len(),
                limit: auditwal::DEFAULT_MAX_EVENT_BYTES,
            },
        ),
        (
            {
                let mut e = event(5);
                e.occurred_at = too_old;
                e
            },
            EventError::TimestampOutOfRange {
                value: too_old.to_rfc3339(),
            },
        ),
    ];
    for (e, want) in &cases {
        for writer in [&w, &live] {
            let started = Instant::now();
            match writer.record(e).await {
                Err(PgError::InvalidEvent(got)) => assert_eq!(&got, want),
                other => panic!("expected {want:?}, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_millis(500));
        }
    }
    let rate = live.record_sampled(&event(9), 0.0).await;
    assert!(
        matches!(rate, Err(PgError::InvalidSampleRate { .. })),
        "{rate:?}"
    );
    assert_eq!(db.count().await, 0);
}

/// Asserts that `err` is DatabaseUnavailable and came within 2 s of `started`.
fn assert_unavailable_at_once(err: &PgError, started: Instant) {
    assert!(
        matches!(err, PgError::DatabaseUnavailable { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_port_with_nothing_listening_gives_database_unavailable_at_once_not_after_the_timeout() {
    let url = nowhere_url();
    // A refused connect is the answer: neither the migration at start nor a
    // call waits out the (long) timeout for it.
    let timeout = Duration::from_secs(10);
    let started = Instant::now();
    let err = SyncWriter::connect(&url, config(timeout))
        .await
        .err()
        .expect("connect with migrate must fail");
    assert_unavailable_at_once(&err, started);

    let w = lazy_writer(&url, timeout).await;
    let started = Instant::now();
    let err = w.record(&event(1)).await.expect_err("record must fail");
    assert_unavailable_at_once(&err, started);
}

#[tokio::test]
async fn a_server_that_accepts_but_never_answers_gives_database_unavailable_within_the_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accept connections and hold them open without a word.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let timeout = Duration::from_millis(800);
    let w = lazy_writer(&url, timeout).await;
    let started = Instant::now();
    let results = futures_join_all((0..8).map(|i| {
        let w = w.clone();
        async move { w.record(&event(i)).await }
    }))
    .await;
    for r in results {
        assert!(
            matches!(r, Err(PgError::DatabaseUnavailable { .. })),
            "{r:?}"
        );
    }
    assert!(
        started.elapsed() < timeout + Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    holder.abort();
}

/// Joins futures by spawning them (the crate has no `futures` dependency).
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn a_stopped_cluster_gives_a_typed_error_at_once_and_writes_resume_after_restart() {
    let (cluster, db) = common::private_cluster_and_db().await;
    // Long, so that "at once" below is not "within the timeout": a service on
    // a flaky link must not hold each request for the whole of it to learn
    // that the server is gone.
    let timeout = Duration::from_secs(10);
    let at_once = Duration::from_secs(2);
    let w = SyncWriter::connect(db.url(), config(timeout))
        .await
        .expect("writer");
    w.record(&event(1)).await.expect("before the stop");

    cluster.stop_immediate().expect("stop");
    // Right after the crash the committer's connection is dead but not yet known to
    // be: the INSERT may be sent into it, and the honest answer is then "outcome
    // unknown". Either way: a typed, transient error, as soon as the socket closes.
    let err = common::fails_within(at_once, w.record(&event(2))).await;
    assert!(err.is_transient(), "{err:?}");
    // Past PING_AFTER_IDLE every held connection is checked before use, found
    // dead and dropped, so each call has to connect, and nothing listens: the
    // refusal is the answer ("not sent").
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 3..6 {
        let err = common::fails_within(at_once, w.record(&event(i))).await;
        assert!(
            matches!(err, PgError::DatabaseUnavailable { .. }),
            "{err:?}"
        );
    }

    cluster.start_again().expect("start again");
    assert_recovered(&db, &w, 6, 3..6).await;
}

#[tokio::test]
async fn after_a_connect_that_got_no_answer_calls_fail_at_once_until_the_link_answers_again() {
    let (cluster, db) = common::private_cluster_and_db().await;
    let proxy = common::BlackHoleProxy::silent(&cluster, &db).await;
    let timeout = Duration::from_secs(1);
    let w = lazy_writer(proxy.url(), timeout).await;

    // The first call waits for an answer that never comes.
    let started = Instant::now();
    let err = w.record(&event(1)).await.expect_err("no answer");
    assert!(
        matches!(err, PgError::DatabaseUnavailable { .. }),
        "{err:?}"
    );
    assert!(started.elapsed() >= timeout - Duration::from_millis(100));
    // The next ones do not wait for the same silence: they fail at once, saying why.
    for i in 2..5 {
        let err = common::fails_within(Duration::from_millis(300), w.record(&event(i))).await;
        assert!(
            matches!(&err, PgError::DatabaseUnavailable { reason } if reason.contains("no answer")),
            "{err:?}"
        );
    }

    // The link answers again: after the pause, the next call connects.
    proxy.answer();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_recovered(&db, &w, 5, 1..5).await;
}

#[tokio::test]
async fn a_connection_left_idle_in_the_pool_before_a_crash_is_never_sent_the_insert() {
    let (cluster, db) = common::private_cluster_and_db().await;
    // A pool that, like the writer's own, does not test connections on
    // acquire, holding one idle connection opened before the crash.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(db.url())
        .await
        .expect("pool");
    drop(pool.acquire().await.expect("a connection"));
    let timeout = Duration::from_secs(2);
    let w = SyncWriter::from_pool(pool, config(timeout))
        .await
        .expect("writer");
    // Once the writer's start-up work (migrations, partition upkeep) has
    // handed its connections back, every connection of the pool is idle.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.pool().num_idle() == 0 || w.pool().num_idle() != w.pool().size() as usize {
        assert!(Instant::now() < deadline, "the pool never went idle");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    cluster.stop_immediate().expect("stop");
    // The committer has no connection of its own yet and is fresh (never idle,
    // so nothing is pinged). It opens its own rather than taking the pool's
    // idle one, which would carry the INSERT into a dead socket.
    let err = w.record(&event(1)).await.expect_err("database is down");
    assert!(
        matches!(err, PgError::DatabaseUnavailable { .. }),
        "the INSERT was sent into a dead connection: {err:?}"
    );

    cluster.start_again().expect("start again");
    let e = event(2);
    let id = w.record(&e).await.expect("after the restart");
    assert_eq!(stored_id(&db, e.event_id).await, Some(id.0));
}

#[tokio::test]
async fn emit_sync_prints_event_id_and_row_id_per_committed_line_in_input_order() {
    let db = TestDb::new().await;
    let mut input = String::new();
    let mut want_ids = Vec::new();
    for i in 0..300 {
        match i {
            10 => input.push_str("{not json\n"),
            20 => input.push_str("{\"action\":\"a\",\"ip\":\"999.1.1.1\"}\n"),
            30 => input.push_str("{\"action\":\"a\",\"reason\":\"x\\u0000y\"}\n"),
            40 => input.push('\n'),
            _ => {
                let id = Uuid::now_v7();
                want_ids.push(id);
                input.push_str(&format!(
                    "{{\"event_id\":\"{id}\",\"action\":\"emit.test\",\"actor_id\":\"{i}\"}}\n"
                ));
            }
        }
    }
    let mut child = tokio::process::Command::new(common::auditwal_bin())
        .args(["emit", "--database-url", db.url(), "--mode", "sync"])
        .env_remove("AUDITWAL_WAL_DIR")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning auditwal emit");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("emit output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for line_no in [11, 21, 31] {
        assert!(
            stderr.contains(&format!("line {line_no}:")),
            "stderr does not name line {line_no}: {stderr}"
        );
    }
    assert!(stderr.contains("ip"), "{stderr}");
    assert!(stderr.contains("reason"), "{stderr}");

    let printed: Vec<(Uuid, i64)> = stdout
        .lines()
        .map(|l| {
            let (e, r) = l.split_once(' ').expect("`event_id row_id`");
            (e.parse().expect("uuid"), r.parse().expect("row id"))
        })
        .collect();
    assert_eq!(
        printed.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        want_ids,
        "one line per committed event, in input order"
    );
    let rows: Vec<(Uuid, i64)> = sqlx::query_as("SELECT event_id, id FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("rows");
    assert_eq!(rows.len(), want_ids.len());
    let stored: HashSet<(Uuid, i64)> = rows.into_iter().collect();
    for p in &printed {
        assert!(stored.contains(p), "printed {p:?} is not in the table");
    }
}

/// A BEFORE INSERT trigger that sleeps inside the INSERT: `test.lone` rows for
/// `lone_secs` every time, `test.slow` rows for `slow_secs` the first time only
/// (a sequence, which a rolled-back statement does not undo).
async fn install_sleeping_trigger(db: &TestDb, lone_secs: f64, slow_secs: f64) {
    let sql = format!(
        "CREATE SEQUENCE slow_once;
         CREATE FUNCTION sleep_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.action = 'test.lone' THEN PERFORM pg_sleep({lone_secs}); END IF;
           IF NEW.action = 'test.slow' AND nextval('slow_once') = 1 THEN
             PERFORM pg_sleep({slow_secs});
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER sleep_on_insert BEFORE INSERT ON audit_events
           FOR EACH ROW EXECUTE FUNCTION sleep_on_insert();"
    );
    db.pool()
        .execute(sql.as_str())
        .await
        .expect("installing the test trigger");
}

#[tokio::test]
async fn in_the_retry_of_a_refused_batch_an_event_whose_time_ran_out_is_not_sent() {
    let db = TestDb::new().await;
    let timeout = Duration::from_secs(3);
    let w = SyncWriter::connect(db.url(), {
        let mut c = config(timeout);
        c.committers = 1;
        c
    })
    .await
    .expect("writer");
    let original = event(0);
    w.record(&original).await.expect("the original");
    install_sleeping_trigger(&db, 1.0, 2.5).await;

    // t=0: a lone event holds the one committer for 1 s. t≈0.05: `late` queues
    // (deadline ≈ 3.05 s). t≈0.9: `slow` and a duplicate of the original queue
    // (deadlines ≈ 3.9 s). At t≈1 the three go out as one batch; `slow` sleeps
    // 2.5 s, then the duplicate refuses the statement at t≈3.5: past `late`'s
    // deadline, before the others'.
    let spawn = |e: AuditEvent| {
        let w = w.clone();
        tokio::spawn(async move { w.record(&e).await })
    };
    let lone = spawn(AuditEvent::new("test.lone"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late_event = event(1);
    let late = spawn(late_event.clone());
    tokio::time::sleep(Duration::from_millis(850)).await;
    let slow_event = AuditEvent::new("test.slow");
    let slow = spawn(slow_event.clone());
    let dup = spawn(original.clone());

    lone.await.expect("task").expect("the lone event");
    match late.await.expect("task") {
        Err(PgError::OutcomeUnknown { .. }) => {} // its own timer: it was sent once
        other => panic!("the late event's caller: {other:?}"),
    }
    let slow_id = slow
        .await
        .expect("task")
        .expect("the slow event, retried alone");
    match dup.await.expect("task") {
        Err(PgError::Duplicate { event_id }) => assert_eq!(event_id, original.event_id),
        other => panic!("the duplicate: {other:?}"),
    }
    // Not sent in the retry (before the fix it went out with a 1 ms limit: it
    // was stored, or the limit dropped the connection and `slow` failed).
    assert_eq!(stored_id(&db, late_event.event_id).await, None);
    assert_eq!(stored_id(&db, slow_event.event_id).await, Some(slow_id.0));
}

#[test]
fn a_committer_that_stops_after_sending_answers_outcome_unknown_not_closed() {
    // The writer's committers run on `writers_rt`; the caller and the test's
    // own connections on `test_rt`. Shutting `writers_rt` down mid-INSERT drops
    // the committer and the reply it owed.
    let test_rt = tokio::runtime::Runtime::new().expect("runtime");
    let writers_rt = tokio::runtime::Runtime::new().expect("runtime");
    // Connections dropped by a failing assertion need a runtime to drop on.
    let _in_test_rt = test_rt.enter();
    let db = test_rt.block_on(TestDb::new());
    let w = writers_rt
        .block_on(SyncWriter::connect(
            db.url(),
            config(Duration::from_secs(20)),
        ))
        .expect("writer");
    let e = event(7);
    let locker = test_rt.block_on(async {
        let mut locker = db.pool().begin().await.expect("locker");
        locker
            .execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")
            .await
            .expect("lock");
        locker
    });
    let call = {
        let (w, e) = (w.clone(), e.clone());
        test_rt.spawn(async move { w.record(&e).await })
    };
    // The INSERT is now on the server, waiting for the lock.
    std::thread::sleep(Duration::from_millis(500));
    writers_rt.shutdown_background();
    match test_rt.block_on(call).expect("task") {
        Err(PgError::OutcomeUnknown { .. }) => {}
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    // Whether the row commits is now up to the server (the INSERT waits for the
    // lock on a connection the client has closed): "not stored" would be a guess.
    test_rt
        .block_on(locker.rollback())
        .expect("release the lock");
    drop(w);
}
