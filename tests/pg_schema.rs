//! The schema in a real PostgreSQL: columns, monthly and default partitions,
//! append-only enforcement, roles, retention, and migrations that are idempotent
//! and safe to run concurrently.

use auditwal_test_support as common;

use std::time::Duration;

use auditwal::{columns, pg};
use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use common::TestDb;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// First day of the UTC month `offset` months from now.
fn month(offset: i32) -> NaiveDate {
    let first = Utc::now().date_naive().with_day(1).expect("day 1 exists");
    if offset >= 0 {
        first + Months::new(offset as u32)
    } else {
        first - Months::new(offset.unsigned_abs())
    }
}

fn partition_name(offset: i32) -> String {
    let m = month(offset);
    format!("audit_events_p{:04}{:02}", m.year(), m.month())
}

fn mid_month(offset: i32) -> DateTime<Utc> {
    let m = month(offset);
    Utc.from_utc_datetime(&m.and_hms_opt(0, 0, 0).expect("midnight")) + chrono::Duration::days(14)
}

async fn partitions(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'audit_events'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("listing partitions")
}

async fn insert_at(pool: &PgPool, at: DateTime<Utc>) -> String {
    sqlx::query_scalar(
        "INSERT INTO audit_events (event_id, occurred_at, action) VALUES ($1, $2, 'test.row') \
         RETURNING tableoid::regclass::text",
    )
    .bind(Uuid::now_v7())
    .bind(at)
    .fetch_one(pool)
    .await
    .expect("inserting a row")
}

fn sqlstate(err: &sqlx::Error) -> String {
    err.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn audit_events_has_every_column_of_the_event_schema_with_its_type() {
    let db = TestDb::new().await;
    let cols: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text \
         FROM information_schema.columns WHERE table_name = 'audit_events' \
         ORDER BY ordinal_position",
    )
    .fetch_all(db.pool())
    .await
    .expect("columns");
    let want = [
        ("id", "bigint", "NO"),
        ("event_id", "uuid", "NO"),
        ("occurred_at", "timestamp with time zone", "NO"),
        ("action", "text", "NO"),
        ("actor_id", "text", "YES"),
        ("actor_type", "text", "YES"),
        ("target_type", "text", "YES"),
        ("target_id", "text", "YES"),
        ("target_name", "text", "YES"),
        ("tenant_id", "text", "YES"),
        ("outcome", "text", "YES"),
        ("reason", "text", "YES"),
        ("ip", "inet", "YES"),
        ("user_agent", "text", "YES"),
        ("request_id", "text", "YES"),
        ("before", "jsonb", "YES"),
        ("after", "jsonb", "YES"),
        ("metadata", "jsonb", "YES"),
        ("stream_id", "text", "YES"),
        ("lsn", "bigint", "YES"),
        ("sample_rate", "double precision", "NO"),
        ("recorded_at", "timestamp with time zone", "NO"),
        ("chain_prev_lsn", "bigint", "YES"),
        ("chain_hash", "bytea", "YES"),
        ("wal_payload", "bytea", "YES"),
    ];
    let got: Vec<(&str, &str, &str)> = cols
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(got, want);

    let ckpt: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'audit_checkpoints' ORDER BY ordinal_position",
    )
    .fetch_all(db.pool())
    .await
    .expect("checkpoint columns");
    assert_eq!(
        ckpt,
        [
            ("stream_id".to_string(), "text".to_string()),
            ("lsn".to_string(), "bigint".to_string()),
            (
                "updated_at".to_string(),
                "timestamp with time zone".to_string()
            ),
            ("chain_lsn".to_string(), "bigint".to_string()),
            ("chain_head".to_string(), "bytea".to_string()),
        ]
    );

    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'audit_events' ORDER BY indexname",
    )
    .fetch_all(db.pool())
    .await
    .expect("indexes");
    let all = indexes.join("\n");
    for needle in [
        "USING brin (occurred_at)",
        "(actor_id, occurred_at)",
        "(target_type, target_id, occurred_at)",
        "(tenant_id, occurred_at)",
        "UNIQUE INDEX audit_events_event_id_key ON ONLY public.audit_events USING btree (event_id, occurred_at)",
        "USING brin (id)",
    ] {
        assert!(all.contains(needle), "no index with {needle:?} in:\n{all}");
    }
    // Every index is paid on every insert: exactly these six, nothing more.
    assert_eq!(indexes.len(), 6, "unexpected indexes:\n{all}");
}

#[tokio::test]
async fn the_code_s_column_list_is_the_migrated_table_s_columns_in_order() {
    let db = TestDb::new().await;
    let cols: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, udt_name::text, is_nullable::text \
         FROM information_schema.columns WHERE table_name = $1 \
         ORDER BY ordinal_position",
    )
    .bind(columns::TABLE)
    .fetch_all(db.pool())
    .await
    .expect("columns");
    // Every column but the two the database fills itself, which no writer names.
    let got: Vec<(&str, &str, bool)> = cols
        .iter()
        .filter(|(name, _, _)| name != "id" && name != "recorded_at")
        .map(|(name, ty, nullable)| (name.as_str(), ty.as_str(), nullable == "YES"))
        .collect();
    let want: Vec<(&str, &str, bool)> = columns::LOADED_COLUMNS
        .iter()
        .map(|c| (c.name, c.pg_type, c.nullable))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        cols.first().map(|c| c.0.as_str()),
        Some("id"),
        "id is first, the columns of the list follow"
    );
    let at = |name: &str| cols.iter().position(|c| c.0 == name);
    assert_eq!(
        at("recorded_at"),
        at("sample_rate").map(|i| i + 1),
        "recorded_at follows the sample rate; the chain columns come after it"
    );
}

#[tokio::test]
async fn a_lookup_by_row_id_reads_the_id_index_not_the_whole_partition() {
    let db = TestDb::new().await;
    // Enough rows in the current month that the id's block ranges are summarised.
    sqlx::query(
        "INSERT INTO audit_events (event_id, occurred_at, action) \
         SELECT gen_random_uuid(), now(), 'test.row' FROM generate_series(1, 20000)",
    )
    .execute(db.pool())
    .await
    .expect("inserting rows");
    let mut conn = db.pool().acquire().await.expect("connection");
    conn.execute("VACUUM ANALYZE audit_events")
        .await
        .expect("vacuum");
    let id: i64 = sqlx::query_scalar("SELECT max(id) - 10000 FROM audit_events")
        .fetch_one(&mut *conn)
        .await
        .expect("an id");
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN SELECT * FROM audit_events WHERE id = $1")
        .bind(id)
        .fetch_all(&mut *conn)
        .await
        .expect("explain");
    let plan = plan.join("\n");
    // (Empty partitions may still be "scanned": they have no pages.)
    let current = partition_name(0);
    assert!(
        plan.contains(&format!("Bitmap Index Scan on {current}_id_idx")),
        "{plan}"
    );
    assert!(
        !plan.contains(&format!("Seq Scan on {current} ")),
        "the partition holding the rows is scanned whole:\n{plan}"
    );
}

#[tokio::test]
async fn monthly_partitions_exist_from_last_month_to_three_ahead_plus_a_default() {
    let db = TestDb::new().await;
    let mut want: Vec<String> = (-1..=3).map(partition_name).collect();
    want.push("audit_events_default".to_string());
    want.sort();
    assert_eq!(partitions(db.pool()).await, want);
}

#[tokio::test]
async fn a_row_lands_in_the_partition_of_its_month() {
    let db = TestDb::new().await;
    assert_eq!(insert_at(db.pool(), mid_month(0)).await, partition_name(0));
    assert_eq!(insert_at(db.pool(), mid_month(2)).await, partition_name(2));
    assert_eq!(
        insert_at(db.pool(), mid_month(-1)).await,
        partition_name(-1)
    );
    // The first microsecond of a month belongs to that month (bounds are UTC).
    let start = Utc.from_utc_datetime(&month(1).and_hms_opt(0, 0, 0).expect("midnight"));
    assert_eq!(insert_at(db.pool(), start).await, partition_name(1));
    assert_eq!(
        insert_at(db.pool(), start - chrono::Duration::microseconds(1)).await,
        partition_name(0)
    );
    assert_eq!(db.count().await, 5);
}

#[tokio::test]
async fn far_past_and_far_future_rows_land_in_the_default_partition() {
    let db = TestDb::new().await;
    let past = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
    let future = Utc.with_ymd_and_hms(2200, 1, 1, 0, 0, 0).unwrap();
    assert_eq!(insert_at(db.pool(), past).await, "audit_events_default");
    assert_eq!(insert_at(db.pool(), future).await, "audit_events_default");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events_default")
        .fetch_one(db.pool())
        .await
        .expect("count default");
    assert_eq!(n, 2);
}

#[tokio::test]
async fn update_delete_and_truncate_are_rejected_even_for_the_owner() {
    let db = TestDb::new().await;
    insert_at(db.pool(), mid_month(0)).await;
    insert_at(
        db.pool(),
        Utc.with_ymd_and_hms(2001, 1, 1, 0, 0, 0).unwrap(),
    )
    .await;
    let this_month = partition_name(0);
    let statements = [
        "UPDATE audit_events SET action = 'tampered'".to_string(),
        "DELETE FROM audit_events".to_string(),
        "TRUNCATE audit_events".to_string(),
        format!("UPDATE {this_month} SET action = 'tampered'"),
        format!("DELETE FROM {this_month}"),
        format!("TRUNCATE {this_month}"),
        "DELETE FROM audit_events_default".to_string(),
        "TRUNCATE audit_events_default".to_string(),
        // Moving a row to another partition is an UPDATE too.
        "UPDATE audit_events SET occurred_at = occurred_at + interval '1 month'".to_string(),
    ];
    // The test connects as a superuser (the table owner): only the triggers stand in
    // the way, also when the usual trigger bypass is on.
    for replica in [false, true] {
        let mut conn = db.pool().acquire().await.expect("connection");
        if replica {
            conn.execute("SET session_replication_role = replica")
                .await
                .expect("set session_replication_role");
        }
        for sql in &statements {
            let err = conn
                .execute(sql.as_str())
                .await
                .expect_err(&format!("{sql} should be rejected (replica: {replica})"));
            assert!(
                err.to_string().contains("append-only"),
                "{sql}: unexpected error {err}"
            );
        }
        conn.execute("RESET session_replication_role")
            .await
            .expect("reset");
    }
    assert_eq!(db.count().await, 2);
    let actions: Vec<String> = sqlx::query_scalar("SELECT DISTINCT action FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("actions");
    assert_eq!(actions, ["test.row"]);
}

#[tokio::test]
async fn the_writer_role_may_insert_and_checkpoint_but_not_change_rows() {
    let db = TestDb::new().await;
    let mut conn = db.pool().acquire().await.expect("connection");
    conn.execute("SET ROLE auditwal_writer")
        .await
        .expect("set role");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit_events (event_id, occurred_at, action) VALUES ($1, now(), 'w') RETURNING id",
    )
    .bind(Uuid::now_v7())
    .fetch_one(&mut *conn)
    .await
    .expect("the writer may insert (with RETURNING id)");
    assert!(id > 0);
    conn.execute(
        "INSERT INTO audit_checkpoints (stream_id, lsn) VALUES ('s1', 10) \
         ON CONFLICT (stream_id) DO UPDATE SET lsn = excluded.lsn, updated_at = now()",
    )
    .await
    .expect("the writer may write a checkpoint");
    conn.execute(
        "INSERT INTO audit_checkpoints (stream_id, lsn) VALUES ('s1', 20) \
         ON CONFLICT (stream_id) DO UPDATE SET lsn = excluded.lsn, updated_at = now()",
    )
    .await
    .expect("the writer may advance a checkpoint");
    sqlx::query_scalar::<_, i32>("SELECT audit_ensure_partitions(3, 1)")
        .fetch_one(&mut *conn)
        .await
        .expect("the writer may create partitions ahead");
    for sql in [
        "UPDATE audit_events SET action = 'x'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "SELECT action FROM audit_events",
        "SELECT audit_drop_partitions_before(now())",
    ] {
        let err = conn.execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    conn.execute("RESET ROLE").await.expect("reset role");
    let lsn: i64 = sqlx::query_scalar("SELECT lsn FROM audit_checkpoints WHERE stream_id = 's1'")
        .fetch_one(&mut *conn)
        .await
        .expect("checkpoint");
    assert_eq!(lsn, 20);
    assert_eq!(db.count().await, 1);
}

#[tokio::test]
async fn retention_drops_whole_old_partitions_and_nothing_else() {
    let db = TestDb::new().await;
    let created: i32 = sqlx::query_scalar("SELECT audit_ensure_partitions(3, 4)")
        .fetch_one(db.pool())
        .await
        .expect("partitions four months back");
    assert_eq!(created, 3);
    for offset in [-4, -3, -2, -1, 0] {
        insert_at(db.pool(), mid_month(offset)).await;
    }
    insert_at(
        db.pool(),
        Utc.with_ymd_and_hms(2001, 1, 1, 0, 0, 0).unwrap(),
    )
    .await;

    let mut conn = db.pool().acquire().await.expect("connection");
    conn.execute("SET ROLE auditwal_retention")
        .await
        .expect("set role");
    // Everything whose month ends by the start of two months ago.
    let cutoff = Utc.from_utc_datetime(&month(-2).and_hms_opt(0, 0, 0).expect("midnight"));
    let dropped: Vec<String> = sqlx::query_scalar("SELECT audit_drop_partitions_before($1)")
        .bind(cutoff)
        .fetch_all(&mut *conn)
        .await
        .expect("the retention role may drop old partitions");
    assert_eq!(dropped, [partition_name(-4), partition_name(-3)]);
    let err = conn
        .execute("DELETE FROM audit_events")
        .await
        .expect_err("retention may not delete rows");
    assert_eq!(sqlstate(&err), "42501");
    conn.execute("RESET ROLE").await.expect("reset role");
    drop(conn);

    let parts = partitions(db.pool()).await;
    assert!(!parts.contains(&partition_name(-3)));
    assert!(parts.contains(&partition_name(-2)));
    assert!(parts.contains(&"audit_events_default".to_string()));
    // Rows of months -2, -1, 0 and the default partition's row remain.
    assert_eq!(db.count().await, 4);
}

#[tokio::test]
async fn a_month_already_holding_rows_in_the_default_partition_is_skipped_not_failed() {
    let db = TestDb::new().await;
    assert_eq!(
        insert_at(db.pool(), mid_month(6)).await,
        "audit_events_default"
    );
    let mut conn = db.pool().acquire().await.expect("connection");
    let created = pg::ensure_partitions(&mut conn, 8)
        .await
        .expect("ensure_partitions with rows in the default partition");
    // Months 4, 5, 7 and 8 are new; month 6 is skipped.
    assert_eq!(created, 4);
    let parts = partitions(db.pool()).await;
    for offset in [4, 5, 7, 8] {
        assert!(parts.contains(&partition_name(offset)), "{offset} missing");
    }
    assert!(!parts.contains(&partition_name(6)));
    let where_: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM audit_events")
        .fetch_one(db.pool())
        .await
        .expect("row");
    assert_eq!(where_, "audit_events_default");
    // New rows of the skipped month still find a home.
    assert_eq!(
        insert_at(db.pool(), mid_month(6)).await,
        "audit_events_default"
    );
}

async fn applied_migrations(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .expect("_sqlx_migrations")
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = TestDb::new().await;
    insert_at(db.pool(), mid_month(0)).await;
    let before = partitions(db.pool()).await;
    for _ in 0..3 {
        pg::migrate(db.pool()).await.expect("migrating again");
    }
    assert_eq!(
        applied_migrations(db.pool()).await,
        pg::MIGRATOR.iter().count() as i64
    );
    assert_eq!(partitions(db.pool()).await, before);
    assert_eq!(db.count().await, 1);
}

/// Runs the migrations on each of `urls` at once, from a task of its own over
/// a pool of one connection; asserts that every one succeeded.
async fn migrate_all_at_once(urls: Vec<String>) {
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .expect("connect");
                pg::migrate(&pool).await
            })
        })
        .collect();
    for t in tasks {
        t.await
            .expect("task")
            .expect("a concurrent migration failed");
    }
}

#[tokio::test]
async fn concurrent_migrations_of_a_fresh_database_from_many_tasks_all_succeed() {
    let db = TestDb::empty().await;
    migrate_all_at_once(vec![db.url().to_string(); 8]).await;
    assert_eq!(
        applied_migrations(db.pool()).await,
        pg::MIGRATOR.iter().count() as i64
    );
    assert_eq!(insert_at(db.pool(), mid_month(0)).await, partition_name(0));
}

#[tokio::test]
async fn concurrent_auditwal_migrate_processes_on_a_fresh_database_all_succeed() {
    let db = TestDb::empty().await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            tokio::process::Command::new(common::auditwal_bin())
                .args(["migrate", "--database-url", db.url()])
                .env_remove("DATABASE_URL")
                .output()
        })
        .collect();
    for child in children {
        let out = child.await.expect("running auditwal migrate");
        assert!(
            out.status.success(),
            "auditwal migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        applied_migrations(db.pool()).await,
        pg::MIGRATOR.iter().count() as i64
    );
}

#[tokio::test]
async fn migrate_against_a_closed_port_fails_fast_with_exit_code_3() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(common::auditwal_bin())
        .args(["migrate", "--database-url", &url, "--timeout-secs", "2"])
        .output()
        .await
        .expect("running auditwal migrate");
    assert_eq!(out.status.code(), Some(3));
    assert!(started.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unavailable") || stderr.contains("no answer"),
        "{stderr}"
    );
}

/// On a cluster where the auditwal roles do not exist yet: a migrating user without
/// CREATEROLE still migrates (roles and grants skipped), then several databases
/// migrated at once race to create the cluster-global roles, and all succeed.
#[tokio::test]
async fn roles_are_created_once_under_concurrent_migrations_and_their_absence_is_tolerated() {
    let cluster = common::private_cluster();
    let mut admin = PgConnection::connect(&cluster.url()).await.expect("admin");
    admin
        .execute("CREATE ROLE plain_owner LOGIN CREATEDB")
        .await
        .expect("create a role without CREATEROLE");
    admin
        .execute("CREATE DATABASE owned_by_plain OWNER plain_owner")
        .await
        .expect("create database");
    let plain_url = cluster
        .url_for("owned_by_plain")
        .replacen("postgres@", "plain_owner@", 1);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&plain_url)
        .await
        .expect("connect as plain_owner");
    pg::migrate(&pool)
        .await
        .expect("migrating without CREATEROLE");
    pool.close().await;
    let roles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'auditwal\\_%'")
            .fetch_one(&mut admin)
            .await
            .expect("roles");
    assert_eq!(roles, 0);

    let names: Vec<String> = (0..4).map(|i| format!("race_{i}")).collect();
    for n in &names {
        admin
            .execute(format!("CREATE DATABASE {n}").as_str())
            .await
            .expect("create database");
    }
    migrate_all_at_once(names.iter().map(|n| cluster.url_for(n)).collect()).await;
    let roles: Vec<String> = sqlx::query_scalar(
        "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'auditwal\\_%' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .expect("roles");
    assert_eq!(
        roles,
        ["auditwal_reader", "auditwal_retention", "auditwal_writer"]
    );
}
