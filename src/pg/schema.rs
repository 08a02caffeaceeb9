//! The schema: the embedded migrations (migrations/*.sql) and the partition upkeep.
//!
//! [`migrate`] is what `auditwal migrate`, the loader and sync mode run at start.
//! It is idempotent and safe from several processes at once: sqlx takes a
//! session-level advisory lock per database around the whole run, and the SQL
//! itself tolerates what the lock does not cover (roles are global to the cluster,
//! so the migrations of two databases may race to create them). The table's shape,
//! the append-only triggers and the roles live in the SQL files, documented there
//! and in docs/operations.md; this module only runs them.

use std::future::Future;
use std::pin::Pin;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{PgConnection, PgPool};

use super::error::{classify, PgError, Stage};

/// The migrations in migrations/, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How many months of partitions [`migrate`] and the writers keep ready ahead of
/// the current one.
pub const PARTITIONS_AHEAD: i32 = 3;

/// Applies every pending migration, then makes sure the monthly partitions from
/// last month to `PARTITIONS_AHEAD` (3) months ahead exist.
pub async fn migrate(pool: &PgPool) -> Result<(), PgError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| classify(&e, Stage::BeforeSend, None))?;
    if let Err(e) = migrate_connection(&mut conn).await {
        // sqlx leaves its advisory lock held when a migration fails; a connection
        // returned to the pool would keep every other migrator of this database
        // waiting. Close it instead.
        conn.close_on_drop();
        return Err(e);
    }
    Ok(())
}

/// [`migrate`] on a connection of the caller's (which should not be reused after
/// an error: sqlx may leave its advisory lock held).
pub async fn migrate_connection(conn: &mut PgConnection) -> Result<(), PgError> {
    // Boxed as `dyn Future + Send` here, where the connection's lifetime is
    // concrete: left to inference, sqlx's generic migrator makes every future
    // that awaits this one (the loader's run, say) fail `tokio::spawn`'s Send
    // check with "implementation of Acquire is not general enough".
    let run: Pin<Box<dyn Future<Output = Result<(), MigrateError>> + Send + '_>> =
        Box::pin(MIGRATOR.run_direct(&mut *conn));
    run.await?;
    ensure_partitions(conn, PARTITIONS_AHEAD).await?;
    Ok(())
}

/// Creates the monthly partitions from last month to `months_ahead` months ahead
/// that do not exist yet (SQL function `audit_ensure_partitions`); returns how many
/// it created. A month whose rows already sit in the default partition is skipped
/// (with a NOTICE in the server log): see docs/operations.md.
pub async fn ensure_partitions(conn: &mut PgConnection, months_ahead: i32) -> Result<i32, PgError> {
    sqlx::query_scalar::<_, i32>("SELECT audit_ensure_partitions($1, 1)")
        .bind(months_ahead)
        .fetch_one(conn)
        .await
        .map_err(|e| classify(&e, Stage::InFlight, None))
}
