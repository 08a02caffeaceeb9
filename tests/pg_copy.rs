//! The binary COPY encoder and the batch transaction against the real server:
//! every field lands in its column exactly, a batch and its checkpoint commit
//! together, a batch sent twice loads once, and a refused row is named by index.

use auditwal_test_support as common;

use auditwal::loader::batch::{self, Batch, BatchError, BatchOutcome, BatchRow};
use auditwal::{AuditEvent, Outcome};
use chrono::{DateTime, Utc};
use common::TestDb;
use sqlx::Row;
use uuid::Uuid;

fn full_event(i: u32) -> AuditEvent {
    AuditEvent::new(format!("url.created.{i}"))
        .actor("user", format!("u{i}"))
        .target("url", format!("t{i}"))
        .target_name("näme ✓")
        .tenant("tenant-1")
        .outcome(Outcome::Denied)
        .reason("because")
        .ip(if i % 2 == 0 {
            "192.0.2.7".parse().expect("ip")
        } else {
            "2001:db8::42".parse().expect("ip")
        })
        .user_agent("curl/8")
        .request_id(format!("req-{i}"))
        .before(&serde_json::json!({"a": 1}))
        .and_then(|e| e.after(&serde_json::json!({"a": [1, 2, {"b": null}]})))
        .and_then(|e| e.metadata(&serde_json::json!("just a string")))
        .expect("json fields")
}

fn rows(events: &[AuditEvent], first_lsn: u64) -> Vec<BatchRow> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| BatchRow {
            lsn: first_lsn + i as u64,
            event: e.clone(),
            sample_rate: 0.25,
            payload: Vec::new(),
            link: None,
        })
        .collect()
}

async fn conn(db: &TestDb) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect to test database")
}

/// Commits `b` into audit_events for stream `s`.
async fn commit(c: &mut sqlx::PgConnection, b: &Batch) -> Result<BatchOutcome, BatchError> {
    batch::commit(c, "audit_events", "s", b).await
}

#[tokio::test]
async fn every_field_lands_in_its_column_exactly() {
    let db = TestDb::new().await;
    let mut c = conn(&db).await;
    let mut e = full_event(2);
    // Microsecond precision, the server's own.
    e.occurred_at = DateTime::parse_from_rfc3339("2026-11-23T10:11:12.345678Z")
        .expect("ts")
        .with_timezone(&Utc);
    let mut plain = AuditEvent::new("bare");
    plain.occurred_at = e.occurred_at;
    let b = Batch {
        rows: rows(&[e.clone(), plain.clone()], 1),
        end_lsn: 3,
        ..Batch::default()
    };
    let out = batch::commit(&mut c, "audit_events", "s1", &b)
        .await
        .expect("commit");
    assert_eq!(out, BatchOutcome::Committed { rows: 2 });

    let row = sqlx::query(
        "SELECT event_id, occurred_at, action, actor_id, actor_type, target_type, target_id, \
         target_name, tenant_id, outcome, reason, host(ip) AS ip, user_agent, request_id, \
         before::text AS before, after::text AS after, metadata::text AS metadata, \
         stream_id, lsn, sample_rate FROM audit_events WHERE event_id = $1",
    )
    .bind(e.event_id)
    .fetch_one(db.pool())
    .await
    .expect("row");
    assert_eq!(row.get::<Uuid, _>("event_id"), e.event_id);
    assert_eq!(row.get::<DateTime<Utc>, _>("occurred_at"), e.occurred_at);
    assert_eq!(row.get::<String, _>("action"), e.action);
    assert_eq!(row.get::<Option<String>, _>("actor_id"), e.actor_id);
    assert_eq!(row.get::<Option<String>, _>("actor_type"), e.actor_type);
    assert_eq!(row.get::<Option<String>, _>("target_type"), e.target_type);
    assert_eq!(row.get::<Option<String>, _>("target_id"), e.target_id);
    assert_eq!(row.get::<Option<String>, _>("target_name"), e.target_name);
    assert_eq!(row.get::<Option<String>, _>("tenant_id"), e.tenant_id);
    assert_eq!(
        row.get::<Option<String>, _>("outcome").as_deref(),
        Some("denied")
    );
    assert_eq!(row.get::<Option<String>, _>("reason"), e.reason);
    assert_eq!(
        row.get::<Option<String>, _>("ip").as_deref(),
        Some("192.0.2.7")
    );
    assert_eq!(row.get::<Option<String>, _>("user_agent"), e.user_agent);
    assert_eq!(row.get::<Option<String>, _>("request_id"), e.request_id);
    assert_eq!(
        row.get::<Option<String>, _>("before").as_deref(),
        Some(r#"{"a": 1}"#)
    );
    assert_eq!(
        row.get::<Option<String>, _>("after").as_deref(),
        Some(r#"{"a": [1, 2, {"b": null}]}"#)
    );
    assert_eq!(
        row.get::<Option<String>, _>("metadata").as_deref(),
        Some(r#""just a string""#)
    );
    assert_eq!(
        row.get::<Option<String>, _>("stream_id").as_deref(),
        Some("s1")
    );
    assert_eq!(row.get::<Option<i64>, _>("lsn"), Some(1));
    assert_eq!(row.get::<f64, _>("sample_rate"), 0.25);

    let bare =
        sqlx::query("SELECT actor_id, ip, before, outcome FROM audit_events WHERE event_id = $1")
            .bind(plain.event_id)
            .fetch_one(db.pool())
            .await
            .expect("bare row");
    assert_eq!(bare.get::<Option<String>, _>("actor_id"), None);
    assert_eq!(bare.get::<Option<String>, _>("outcome"), None);

    let cp: i64 = sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = 's1'")
        .fetch_one(db.pool())
        .await
        .expect("checkpoint");
    assert_eq!(
        cp, 3,
        "the checkpoint covers the batch's end LSN, past its last row"
    );
}

#[tokio::test]
async fn ipv6_addresses_round_trip() {
    let db = TestDb::new().await;
    let mut c = conn(&db).await;
    let e = full_event(1);
    let b = Batch {
        rows: rows(std::slice::from_ref(&e), 1),
        end_lsn: 1,
        ..Batch::default()
    };
    commit(&mut c, &b).await.expect("commit");
    let ip: String = sqlx::query_scalar("SELECT host(ip) FROM audit_events WHERE event_id = $1")
        .bind(e.event_id)
        .fetch_one(db.pool())
        .await
        .expect("row");
    assert_eq!(ip, "2001:db8::42");
}

#[tokio::test]
async fn a_batch_sent_twice_loads_once() {
    let db = TestDb::new().await;
    let mut c = conn(&db).await;
    let events: Vec<AuditEvent> = (0..100).map(full_event).collect();
    let b = Batch {
        rows: rows(&events, 1),
        end_lsn: 100,
        ..Batch::default()
    };
    let first = commit(&mut c, &b).await.expect("first");
    assert_eq!(first, BatchOutcome::Committed { rows: 100 });
    let again = commit(&mut c, &b).await.expect("again");
    assert_eq!(again, BatchOutcome::AlreadyLoaded { checkpoint: 100 });
    // An overlapping batch sends only the rows past the checkpoint.
    let more: Vec<AuditEvent> = (100..150).map(full_event).collect();
    let mut overlap = rows(&events[50..], 51);
    overlap.extend(rows(&more, 101));
    let b2 = Batch {
        rows: overlap,
        end_lsn: 150,
        ..Batch::default()
    };
    let third = commit(&mut c, &b2).await.expect("overlap");
    assert_eq!(third, BatchOutcome::Committed { rows: 50 });
    assert_eq!(db.count().await, 150);
}

#[tokio::test]
async fn a_refused_row_is_named_by_its_index_and_nothing_commits() {
    let db = TestDb::new().await;
    let mut c = conn(&db).await;
    let events: Vec<AuditEvent> = (0..10).map(full_event).collect();
    let mut r = rows(&events, 1);
    // sample_rate 0 violates the table's CHECK: a row PostgreSQL refuses.
    r[6].sample_rate = 0.0;
    let b = Batch {
        rows: r,
        end_lsn: 10,
        ..Batch::default()
    };
    let err = commit(&mut c, &b).await.expect_err("refused");
    match err {
        BatchError::PoisonRow {
            index, sqlstate, ..
        } => {
            assert_eq!(index, 6);
            assert_eq!(sqlstate, "23514");
        }
        other => panic!("expected PoisonRow, got {other:?}"),
    }
    assert_eq!(db.count().await, 0, "nothing of the batch committed");
    let cp: Option<i64> =
        sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = 's'")
            .fetch_optional(db.pool())
            .await
            .expect("checkpoint");
    assert!(cp.unwrap_or(0) == 0, "checkpoint did not move: {cp:?}");
    // The connection is usable again after the failed transaction.
    let mut fixed = b.clone();
    fixed.rows.remove(6);
    let ok = commit(&mut c, &fixed).await.expect("retry");
    assert_eq!(ok, BatchOutcome::Committed { rows: 9 });
}
