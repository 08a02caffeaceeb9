//! What the integration tests (tests/), `auditwal demo` and the benches share:
//! the throwaway PostgreSQL cluster ([`cluster`]), network namespaces for the
//! dead-link tests ([`netns`]), and the helpers below. A test file says
//! `use auditwal_test_support as common;` then
//! `let db = common::TestDb::new().await;`.
//!
//! With `DATABASE_URL` unset, tests run against a private PostgreSQL cluster started
//! once per test process (`Cluster::shared`, fsync off, stopped by its guardian when
//! the process exits, even on panic or SIGKILL). With `DATABASE_URL` set they use
//! that server instead; its role needs CREATEDB. Either way each `TestDb` is a fresh
//! database of its own (`CREATE DATABASE` with a unique name, migrations applied), so
//! tests run in parallel without seeing each other's rows; it is dropped again when
//! the `TestDb` is.
//!
//! Tests that stop and restart the server use [`private_cluster`] and
//! [`TestDb::on_cluster`].
pub mod cluster;
pub mod netns;

pub use cluster::{Cluster, ClusterError, ClusterNetwork, ClusterOptions};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The server tests run against: `DATABASE_URL`, or the shared private cluster.
/// Returns the URL of a database to connect to for CREATE DATABASE.
pub fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => Cluster::shared()
            .expect("starting the private test PostgreSQL (or set DATABASE_URL)")
            .url(),
    }
}

/// A private, restartable cluster (fsync off) for tests that stop the server.
pub fn private_cluster() -> Cluster {
    Cluster::start(ClusterOptions::for_tests()).expect("starting a private PostgreSQL cluster")
}

/// A private cluster (see [`private_cluster`]) and a fresh migrated test
/// database on it: what a test that stops the server starts from.
pub async fn private_cluster_and_db() -> (Cluster, TestDb) {
    let cluster = private_cluster();
    let db = TestDb::on_cluster(&cluster).await;
    (cluster, db)
}

/// `url` with its database name replaced by `dbname`.
pub fn with_database(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{}", &base[..path_start], dbname);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh database of one test's own.
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    pool: PgPool,
}

impl TestDb {
    /// A fresh database with the migrations applied, on the default test server.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        auditwal::pg::migrate(&db.pool)
            .await
            .expect("applying migrations to the test database");
        db
    }

    /// A fresh database with nothing in it (for migration tests).
    pub async fn empty() -> TestDb {
        TestDb::create(server_url()).await
    }

    /// A fresh migrated database on `cluster` (a private one, for restart tests).
    pub async fn on_cluster(cluster: &Cluster) -> TestDb {
        let db = TestDb::create(cluster.url()).await;
        auditwal::pg::migrate(&db.pool)
            .await
            .expect("applying migrations to the test database");
        db
    }

    async fn create(admin_url: String) -> TestDb {
        let name = format!(
            "auditwal_t{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_micros())
        );
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connecting to the test server to create a database");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("CREATE DATABASE (with DATABASE_URL set, the role needs CREATEDB)");
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .expect("connecting to the new test database");
        TestDb {
            name,
            url,
            admin_url,
            pool,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows in audit_events.
    pub async fn count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events")
            .fetch_one(&self.pool)
            .await
            .expect("counting audit_events")
    }

    /// Runs `sql` (statements separated by `;`) in one transaction as the
    /// superuser with the append-only triggers off: the tampering a trail
    /// must show (tests of the hash chain).
    pub async fn tamper(&self, sql: &str) {
        let mut tx = self.pool.begin().await.expect("begin");
        for stmt in [
            "ALTER TABLE audit_events DISABLE TRIGGER ALL",
            "ALTER TABLE audit_events_default DISABLE TRIGGER ALL",
            "ALTER TABLE audit_chain_checkpoints DISABLE TRIGGER ALL",
        ]
        .into_iter()
        .chain(sql.split(';').map(str::trim).filter(|s| !s.is_empty()))
        {
            sqlx::query(stmt)
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        tx.commit().await.expect("commit");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop has no runtime to await on; a short-lived thread with its own does the
        // DROP DATABASE. Best effort: with the shared cluster the whole server goes
        // away at exit anyway, and a stopped private cluster has nothing to drop.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let work = async {
                    let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    admin.execute(sql.as_str()).await.ok()?;
                    admin.close().await.ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
            });
        });
        let _ = handle.join();
    }
}

/// The `auditwal` binary built for these tests. Cargo tells the integration
/// tests of the package that owns the binary (bin/Cargo.toml) its path in
/// `CARGO_BIN_EXE_auditwal`, at build time and at run time; this crate reads the
/// run-time one.
pub fn auditwal_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CARGO_BIN_EXE_auditwal").expect(
            "CARGO_BIN_EXE_auditwal is unset: run the tests with `cargo test` \
             (they belong to the auditwal-cli package)",
        )
    })
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a test
/// that fails half-way leaves no loader running behind it.
pub struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    pub fn new(child: std::process::Child) -> Self {
        ChildGuard(Some(child))
    }

    /// The child, for signalling or waiting; the guard no longer kills it.
    pub fn take(mut self) -> std::process::Child {
        self.0
            .take()
            .expect("ChildGuard holds its child until taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops `child` (a long-running `auditwal` command: `load`, `agent`) with
/// SIGTERM, waits for it and asserts that it exited 0, the clean stop the
/// command-line contract promises.
pub fn stop_with_sigterm(child: std::process::Child) {
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let out = child.wait_with_output().expect("wait for the child");
    assert!(out.status.success(), "exit status {:?}", out.status);
}

/// Feeds `lines` (JSON events, one per line) to `auditwal emit --wal-dir` in
/// `mode` and returns the event_ids it acknowledged, in order.
pub fn emit_lines(
    wal_dir: &std::path::Path,
    stream: &str,
    mode: &str,
    lines: String,
) -> Vec<uuid::Uuid> {
    emit_lines_with_env(wal_dir, stream, mode, lines, &[])
}

/// [`emit_lines`] with extra environment variables for `auditwal emit` (e.g. a
/// small `AUDITWAL_SEGMENT_SIZE`).
pub fn emit_lines_with_env(
    wal_dir: &std::path::Path,
    stream: &str,
    mode: &str,
    lines: String,
    env: &[(&str, &str)],
) -> Vec<uuid::Uuid> {
    use std::io::Write;
    let mut child = spawn_emit(wal_dir, stream, mode, env);
    let mut stdin = child.stdin.take().expect("emit's stdin");
    // A feeder thread, so emit's output pipe never fills while we are writing.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(lines.as_bytes());
    });
    let out = child.wait_with_output().expect("emit output");
    let _ = feeder.join();
    assert!(out.status.success(), "emit failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| uuid::Uuid::parse_str(l.trim()).expect("emit prints event ids"))
        .collect()
}

/// Starts `auditwal emit` into `wal_dir/stream` in `mode`, with extra
/// environment variables `env`: stdin (the events) and stdout (the
/// acknowledged ids) piped, stderr discarded.
pub fn spawn_emit(
    wal_dir: &std::path::Path,
    stream: &str,
    mode: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(auditwal_bin())
        .args(["emit", "--mode", mode, "--stream", stream, "--wal-dir"])
        .arg(wal_dir)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn auditwal emit")
}

/// Starts `auditwal load` tailing `wal_dir` into `url` (metrics off, batches of
/// at most `batch_rows`, stderr discarded); the caller stops it.
pub fn spawn_loader(wal_dir: &std::path::Path, url: &str, batch_rows: u32) -> std::process::Child {
    std::process::Command::new(auditwal_bin())
        .args(["load", "--metrics-addr", "off", "--batch-rows"])
        .arg(batch_rows.to_string())
        .arg("--wal-dir")
        .arg(wal_dir)
        .args(["--database-url", url])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn auditwal load")
}

/// Asserts that a finished `auditwal` command succeeded, showing its stderr if not.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that `audit_events` holds exactly the event_ids `expected`, each once.
pub async fn assert_exactly(db: &TestDb, expected: &[uuid::Uuid]) {
    use std::collections::BTreeSet;
    let got: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM audit_events")
        .fetch_all(db.pool())
        .await
        .expect("select event ids");
    let set: BTreeSet<uuid::Uuid> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "duplicates in audit_events");
    let want: BTreeSet<uuid::Uuid> = expected.iter().copied().collect();
    let missing: Vec<_> = want.difference(&set).take(5).collect();
    let extra: Vec<_> = set.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} rows, {} expected; missing e.g. {missing:?}, unexpected e.g. {extra:?}",
        set.len(),
        want.len()
    );
}

/// A loopback listener for a test proxy in front of `db`, and `db`'s URL with
/// the server's port `target_port` replaced by the listener's.
pub async fn proxy_listener(db: &TestDb, target_port: u16) -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let port = listener.local_addr().expect("proxy address").port();
    let url = db
        .url()
        .replace(&format!(":{target_port}/"), &format!(":{port}/"));
    assert_ne!(url, db.url(), "the proxy's URL must lead through it");
    (listener, url)
}

/// A TCP proxy on loopback in front of a test database that can be switched
/// into a black hole: while it is, new connections are accepted and held
/// without a byte either way, which is how a link that drops packets looks to
/// a client. Connections made while it passes traffic are forwarded.
pub struct BlackHoleProxy {
    url: String,
    silent: Arc<AtomicBool>,
}

impl BlackHoleProxy {
    /// A proxy to `db` on `cluster`, silent from the start.
    pub async fn silent(cluster: &Cluster, db: &TestDb) -> BlackHoleProxy {
        let target = cluster.port();
        let (listener, url) = proxy_listener(db, target).await;
        let silent = Arc::new(AtomicBool::new(true));
        let holes = silent.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if holes.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        BlackHoleProxy { url, silent }
    }

    /// The database's URL through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// From now on, new connections reach the database.
    pub fn answer(&self) {
        self.silent.store(false, Ordering::SeqCst);
    }
}

/// Awaits `call`, asserts that it failed within `limit`, and returns its error.
pub async fn fails_within<T: std::fmt::Debug, E: std::fmt::Display>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> E {
    let started = std::time::Instant::now();
    let result = call.await;
    let took = started.elapsed();
    match result {
        Ok(v) => panic!("expected a failure, got {v:?}"),
        Err(e) => {
            assert!(
                took < limit,
                "failed after {took:?}, not within {limit:?}: {e}"
            );
            e
        }
    }
}

/// `auditwal verify-db --json --database-url URL --public-key KEY` plus
/// `extra`: its exit code (asserted 0 or 1), its findings and its stream
/// summaries, each line as JSON.
pub fn verify_db_json(
    url: &str,
    public_key: &std::path::Path,
    extra: &[&str],
) -> (i32, Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let out = std::process::Command::new(auditwal_bin())
        .args(["verify-db", "--json", "--database-url", url, "--public-key"])
        .arg(public_key)
        .args(extra)
        .output()
        .expect("run verify-db");
    let code = out.status.code().expect("exit code");
    assert!(
        code == 0 || code == 1,
        "verify-db failed ({code}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut findings, mut summaries) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        match v.get("finding") {
            Some(_) => findings.push(v),
            None => summaries.push(v),
        }
    }
    (code, findings, summaries)
}
