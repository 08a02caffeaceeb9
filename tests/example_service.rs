//! The example service (examples/shortener/app.rs) over real HTTP against a real
//! PostgreSQL: admin actions are committed in sync mode before they take effect
//! and answer 503 (without taking effect) when the database is gone; user
//! actions in async mode land, after a loader run, as exactly the event ids
//! their responses carried; bad input is a 400 naming the field; off writes
//! nothing.
//!
//! The client is a few lines over a TcpStream (HTTP/1.1, `Connection: close`),
//! so the test needs no HTTP client crate.

use auditwal_test_support as common;

use shortener_app as app;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditwal::loader::{Loader, LoaderConfig};
use auditwal::{AuditLog, Config, Mode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use app::{AppState, UserAudit};

/// An HTTP answer: status, headers (lower-cased names), body parsed as JSON
/// (`Value::Null` when empty or not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    json: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Serves `state`'s router on a free loopback port, the way main.rs does.
async fn serve(state: Arc<AppState>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app::router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

/// One request, one connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the service");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .expect("read answer");
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    http(addr, "GET", path, &[], "").await
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> Answer {
    http(addr, "POST", path, &[], &body.to_string()).await
}

fn config(wal: &Path, url: &str) -> auditwal::ConfigBuilder {
    Config::builder()
        .wal_dir(wal)
        .stream("shortener-test")
        .fsync_interval(Duration::from_millis(5))
        .segment_size(1 << 20)
        .disk_budget(64 << 20)
        .database_url(url)
        .sync_timeout(Duration::from_secs(10))
}

/// Opens the audit log `settings` describe.
async fn open_with(settings: auditwal::ConfigBuilder) -> Arc<AuditLog> {
    Arc::new(
        AuditLog::open(settings.build().expect("valid settings"))
            .await
            .expect("open the audit log"),
    )
}

async fn open(wal: &Path, url: &str) -> Arc<AuditLog> {
    open_with(config(wal, url)).await
}

/// Serves the app with `log` behind it and user actions audited as `user`.
async fn serve_logged(log: &Arc<AuditLog>, user: UserAudit) -> SocketAddr {
    serve(AppState::new(Some(log.clone()), user)).await
}

/// What most tests start from: a fresh database, a WAL directory, the audit
/// log over both (settings of `config`), and the app served with that log.
struct Service {
    db: common::TestDb,
    wal: tempfile::TempDir,
    log: Arc<AuditLog>,
    addr: SocketAddr,
}

async fn start(user: UserAudit) -> Service {
    let db = common::TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open(wal.path(), db.url()).await;
    let addr = serve_logged(&log, user).await;
    Service { db, wal, log, addr }
}

/// Loads the WAL once, up to its end, as main.rs does at shutdown.
async fn load_once(wal: &Path, url: &str) -> u64 {
    let mut c = LoaderConfig::new(wal, url);
    c.once = true;
    Loader::new(c).run().await.expect("loader run").rows_loaded
}

fn uuid_of(v: &Value) -> Uuid {
    Uuid::parse_str(
        v.as_str()
            .unwrap_or_else(|| panic!("a uuid string, got {v}")),
    )
    .expect("a uuid")
}

async fn create(addr: SocketAddr, user: &str, url: &str) -> Answer {
    let a = post(addr, "/api/links", json!({"user": user, "url": url})).await;
    assert_eq!(a.status, 201, "{a:?}");
    a
}

#[tokio::test]
async fn admin_disable_answers_with_the_committed_audit_row_before_the_user_is_disabled() {
    let Service {
        db,
        wal: _wal,
        log,
        addr,
    } = start(UserAudit::Mode(Mode::Async)).await;

    let link = create(addr, "u1", "https://example.com/a").await;
    let code = link.json["code"].as_str().expect("code").to_string();
    let follow = get(addr, &format!("/{code}")).await;
    assert_eq!(follow.status, 302);
    assert_eq!(follow.header("location"), Some("https://example.com/a"));

    let a = http(
        addr,
        "POST",
        "/admin/users/u1/disable",
        &[
            ("x-request-id", "req-disable-1"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
        &json!({"admin": "a1", "reason": "violated ToS"}).to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let audit_id = uuid_of(&a.json["audit_id"]);
    let row_id = a.json["audit_row_id"].as_i64().expect("audit_row_id");
    assert_eq!(a.json["audit"]["mode"], "sync");

    // The row is there already: the response came after the commit.
    let row: (i64, String, String, String, String, String, String, String) = sqlx::query_as(
        "SELECT id, action, actor_type, actor_id, target_id, reason, request_id, host(ip) \
         FROM audit_events WHERE event_id = $1",
    )
    .bind(audit_id)
    .fetch_one(db.pool())
    .await
    .expect("the audit row of the disable");
    assert_eq!(row.0, row_id);
    assert_eq!(
        (
            row.1.as_str(),
            row.2.as_str(),
            row.3.as_str(),
            row.4.as_str()
        ),
        ("admin.user.disabled", "admin", "a1", "u1")
    );
    assert_eq!(row.5, "violated ToS");
    assert_eq!(row.6, "req-disable-1");
    assert_eq!(row.7, "203.0.113.9");

    // And the action took effect: u1 can no longer create links, and its
    // links no longer redirect.
    let refused = post(
        addr,
        "/api/links",
        json!({"user": "u1", "url": "https://example.com/b"}),
    )
    .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(get(addr, &format!("/{code}")).await.status, 410);

    // The safety override: a link to a bare IP is flagged until an admin says so.
    let flagged = create(addr, "u2", "http://192.0.2.7/login").await;
    assert_eq!(flagged.json["flagged"], true);
    let code = flagged.json["code"].as_str().expect("code").to_string();
    assert_eq!(get(addr, &format!("/{code}")).await.status, 403);
    let o = post(
        addr,
        &format!("/admin/links/{code}/override"),
        json!({"admin": "a1", "reason": "reviewed: the customer's own appliance"}),
    )
    .await;
    assert_eq!(o.status, 200, "{o:?}");
    let action: String = sqlx::query_scalar("SELECT action FROM audit_events WHERE id = $1")
        .bind(o.json["audit_row_id"].as_i64().expect("row id"))
        .fetch_one(db.pool())
        .await
        .expect("the override's row");
    assert_eq!(action, "admin.url.safety_override");
    assert_eq!(get(addr, &format!("/{code}")).await.status, 302);

    // Unknown targets are 404 and audit nothing.
    assert_eq!(
        post(
            addr,
            "/admin/users/nobody/disable",
            json!({"admin": "a1", "reason": "x"})
        )
        .await
        .status,
        404
    );
    assert_eq!(log.stats().recorded.get(Mode::Sync), 2);
    log.close().await.expect("close");
}

#[tokio::test]
async fn user_actions_in_async_mode_land_after_a_loader_run_as_exactly_the_event_ids_answered() {
    let Service { db, wal, log, addr } = start(UserAudit::Mode(Mode::Async)).await;

    let mut expected = Vec::new();
    let mut codes = Vec::new();
    for i in 0..40 {
        let a = http(
            addr,
            "POST",
            "/api/links",
            &[("x-request-id", &format!("req-{i}"))],
            &json!({"user": format!("u{}", i % 3), "url": format!("https://example.com/{i}")})
                .to_string(),
        )
        .await;
        assert_eq!(a.status, 201, "{a:?}");
        assert_eq!(a.json["audit"]["mode"], "async");
        assert!(a.json["audit"]["lsn"].as_u64().is_some(), "{a:?}");
        expected.push(uuid_of(&a.json["audit"]["event_id"]));
        if i % 3 == 0 {
            codes.push(a.json["code"].as_str().expect("code").to_string());
        }
    }
    let bulk = post(
        addr,
        "/api/links/bulk",
        json!({"user": "u0", "urls": ["https://example.com/x", "not a url", "https://example.com/y"]}),
    )
    .await;
    assert_eq!(bulk.status, 201, "{bulk:?}");
    assert_eq!(bulk.json["created"].as_array().map(Vec::len), Some(2));
    assert_eq!(bulk.json["failed"][0]["field"], "urls[1]");
    expected.push(uuid_of(&bulk.json["audit"]["event_id"]));
    codes.reverse();
    let reorder = post(addr, "/api/bio/u0/reorder", json!({"order": codes})).await;
    assert_eq!(reorder.status, 200, "{reorder:?}");
    expected.push(uuid_of(&reorder.json["audit"]["event_id"]));

    let stats = get(addr, "/api/stats").await;
    assert_eq!(
        stats.json["audit"]["recorded"]["async"],
        json!(expected.len())
    );

    // Nothing is in the database before the loader ran: async does not wait for it.
    assert_eq!(db.count().await, 0);
    log.close()
        .await
        .expect("close: fsync and the durable watermark");
    assert_eq!(load_once(wal.path(), db.url()).await, expected.len() as u64);
    common::assert_exactly(&db, &expected).await;

    let (target, request_id): (String, String) =
        sqlx::query_as("SELECT target_id, request_id FROM audit_events WHERE event_id = $1")
            .bind(expected[0])
            .fetch_one(db.pool())
            .await
            .expect("the first create's row");
    assert_eq!(request_id, "req-0");
    assert_eq!(target, codes[codes.len() - 1]);
    let (count, created): (i64, i64) = sqlx::query_as(
        "SELECT (metadata->>'count')::bigint, (metadata->>'created')::bigint \
         FROM audit_events WHERE action = 'link.bulk_import'",
    )
    .fetch_one(db.pool())
    .await
    .expect("the bulk import's row");
    assert_eq!((count, created), (3, 2));
}

#[tokio::test]
async fn with_the_database_stopped_admin_actions_answer_503_and_do_not_take_effect() {
    let (cluster, db) = common::private_cluster_and_db().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let timeout = Duration::from_millis(1000);
    let log = open_with(config(wal.path(), db.url()).sync_timeout(timeout)).await;
    let addr = serve_logged(&log, UserAudit::Mode(Mode::Async)).await;
    let flagged = create(addr, "u1", "http://198.51.100.1/").await;
    let code = flagged.json["code"].as_str().expect("code").to_string();
    // One admin action while the database is up, so the failure below is the
    // outage and not a first connection.
    let ok = post(
        addr,
        &format!("/admin/links/{code}/override"),
        json!({"admin": "a1", "reason": "ok"}),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let other = create(addr, "u1", "http://198.51.100.2/").await;
    let other_code = other.json["code"].as_str().expect("code").to_string();

    cluster.stop_immediate().expect("stop the database");
    let started = Instant::now();
    let a = post(
        addr,
        "/admin/users/u1/disable",
        json!({"admin": "a1", "reason": "violated ToS"}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(a.status, 503, "{a:?}");
    let msg = a.json["error"].as_str().expect("error message");
    assert!(msg.contains("NOT performed"), "{msg}");
    assert!(a.json["audit_event_id"].is_string(), "{a:?}");
    assert!(
        took < timeout * 2 + Duration::from_secs(1),
        "503 after {took:?}"
    );
    let o = post(
        addr,
        &format!("/admin/links/{other_code}/override"),
        json!({"admin": "a1", "reason": "ok"}),
    )
    .await;
    assert_eq!(o.status, 503, "{o:?}");

    // Neither took effect: u1 still creates links (async: the WAL does not
    // need the database), and the second flagged link is still refused.
    let still = create(addr, "u1", "https://example.com/still-here").await;
    assert_eq!(still.json["audit"]["mode"], "async");
    assert_eq!(get(addr, &format!("/{other_code}")).await.status, 403);
    assert!(log.stats().failed.get(Mode::Sync) >= 2);

    // User endpoints in sync mode follow the same rule: 503, no link.
    let sync_users = AppState::new(Some(log.clone()), UserAudit::Mode(Mode::Sync));
    let sync_addr = serve(sync_users).await;
    let a = post(
        sync_addr,
        "/api/links",
        json!({"user": "u9", "url": "https://example.com/proof"}),
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
    let stats = get(sync_addr, "/api/stats").await;
    assert_eq!(
        stats.json["links"], 0,
        "a link whose sync audit failed stays out: {stats:?}"
    );

    // With the database back, the same request goes through.
    cluster.start_again().expect("restart the database");
    let mut answer = None;
    for _ in 0..50 {
        let a = post(
            addr,
            "/admin/users/u1/disable",
            json!({"admin": "a1", "reason": "violated ToS"}),
        )
        .await;
        if a.status == 200 {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = answer.expect("disable succeeds once the database is back");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE event_id = $1")
        .bind(uuid_of(&a.json["audit_id"]))
        .fetch_one(&sqlx::PgPool::connect(db.url()).await.expect("reconnect"))
        .await
        .expect("count");
    assert_eq!(n, 1);
    assert_eq!(
        post(
            addr,
            "/api/links",
            json!({"user": "u1", "url": "https://example.com/z"})
        )
        .await
        .status,
        403
    );
    log.close().await.expect("close");
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    // Input is checked before anything else: no database needed.
    let addr = serve(AppState::new(None, UserAudit::Off)).await;
    // Per endpoint: a body it refuses and the field the refusal names.
    let cases: Vec<(&str, Vec<(Value, &str)>)> = vec![
        (
            "/api/links",
            vec![
                (json!({"user": "u1"}), "url"),
                (json!({"user": 5, "url": "https://example.com"}), "user"),
                (json!({"user": "u1", "url": "ftp://example.com"}), "url"),
                (json!({"user": "u1", "url": "https://"}), "url"),
                (json!({"user": "", "url": "https://example.com"}), "user"),
            ],
        ),
        (
            "/api/links/bulk",
            vec![
                (json!({"user": "u1", "urls": "https://example.com"}), "urls"),
                (json!({"user": "u1", "urls": []}), "urls"),
            ],
        ),
        (
            "/api/bio/u1/reorder",
            vec![(json!({"order": ["nope"]}), "order")],
        ),
        (
            "/admin/users/u1/disable",
            vec![
                (json!({"admin": "a1"}), "reason"),
                (json!({"admin": "a1", "reason": " "}), "reason"),
            ],
        ),
        (
            "/admin/links/abc/override",
            vec![(json!({"reason": "r"}), "admin")],
        ),
    ];
    for (path, bodies) in cases {
        for (body, field) in bodies {
            let a = post(addr, path, body.clone()).await;
            assert_eq!(a.status, 400, "{path} {body}: {a:?}");
            assert_eq!(a.json["field"], field, "{path} {body}: {a:?}");
            let msg = a.json["error"].as_str().expect("error message");
            assert!(msg.contains(field), "{msg}");
        }
    }
    let a = http(addr, "POST", "/api/links", &[], "{not json").await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.json["error"]
            .as_str()
            .is_some_and(|m| m.contains("not valid JSON")),
        "{a:?}"
    );
    // Without an audit log the admin endpoints refuse rather than act unaudited.
    let a = http(
        addr,
        "POST",
        "/api/links",
        &[],
        &json!({"user": "u1", "url": "https://example.com"}).to_string(),
    )
    .await;
    assert_eq!(a.status, 201);
    let a = post(
        addr,
        "/admin/users/u1/disable",
        json!({"admin": "a1", "reason": "r"}),
    )
    .await;
    assert_eq!(a.status, 503, "{a:?}");
}

#[tokio::test]
async fn an_event_the_log_would_refuse_is_a_400_and_leaves_no_link() {
    let db = common::TestDb::new().await;
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open_with(config(wal.path(), db.url()).max_event_bytes(300)).await;
    let state = AppState::new(Some(log.clone()), UserAudit::Mode(Mode::Async));
    let addr = serve(state).await;
    let long = format!("https://example.com/{}", "a".repeat(400));
    let a = post(addr, "/api/links", json!({"user": "u1", "url": long})).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.json["error"]
            .as_str()
            .is_some_and(|m| m.contains("audit event refused")),
        "{a:?}"
    );
    let stats = get(addr, "/api/stats").await;
    assert_eq!(stats.json["links"], 0, "{stats:?}");
    log.close().await.expect("close");
}

#[tokio::test]
async fn off_writes_nothing_for_user_actions_while_admin_actions_stay_sync() {
    let Service { db, wal, log, addr } = start(UserAudit::Off).await;
    let mut codes = Vec::new();
    for i in 0..10 {
        let a = create(addr, "u1", &format!("https://example.com/{i}")).await;
        assert_eq!(a.json["audit"], Value::Null, "{a:?}");
        codes.push(a.json["code"].as_str().expect("code").to_string());
    }
    let bulk = post(
        addr,
        "/api/links/bulk",
        json!({"user": "u1", "urls": ["https://example.com/b"]}),
    )
    .await;
    assert_eq!(bulk.status, 201);
    assert_eq!(bulk.json["audit"], Value::Null);
    let r = post(addr, "/api/bio/u1/reorder", json!({"order": codes})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["audit"], Value::Null);

    let written = log.stats().wal.expect("wal stats").written_lsn;
    assert_eq!(written, 0, "nothing appended to the WAL");
    assert_eq!(log.stats().recorded.total(), 0);
    let a = post(
        addr,
        "/admin/users/u1/disable",
        json!({"admin": "a1", "reason": "r"}),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    log.close().await.expect("close");
    load_once(wal.path(), db.url()).await;
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("actions");
    assert_eq!(actions, vec!["admin.user.disabled".to_string()]);
}

#[tokio::test]
async fn durable_and_sampled_user_modes_answer_their_receipts() {
    let Service {
        db,
        wal: _wal,
        log,
        addr,
    } = start(UserAudit::Mode(Mode::Durable)).await;
    let a = create(addr, "u1", "https://example.com/d").await;
    assert_eq!(a.json["audit"]["mode"], "durable");
    let lsn = a.json["audit"]["lsn"].as_u64().expect("lsn");
    assert!(
        log.stats().wal.expect("wal").durable_lsn >= lsn,
        "fsynced before the answer"
    );
    log.close().await.expect("close");

    // Sampled at rate 0: nothing kept but forced events; the answer says so.
    let wal = tempfile::tempdir().expect("tempdir");
    let log = open_with(config(wal.path(), db.url()).sample_rate(0.0)).await;
    let addr = serve_logged(&log, UserAudit::Mode(Mode::Sampled)).await;
    let a = create(addr, "u1", "https://example.com/s").await;
    assert_eq!(a.json["audit"]["sampled_out"], true, "{a:?}");
    assert_eq!(log.stats().sampled_out, 1);
    log.close().await.expect("close");
}
