//! The loader and sync mode across a real dead link: PostgreSQL in a network
//! namespace of the test's own (`common::netns`), the link to it set down mid-COPY,
//! mid-COMMIT and while idle, for 2 to 20 s. Each case is run twice: once bringing
//! the link back with both ends' connections intact (TCP resumes), once with the
//! server side of the old connections terminated while the link is down
//! (`pg_terminate_backend`, over the server's unix socket, so the client learns
//! nothing until it tries). Each asserts the exact set of event_ids loaded and
//! that loading resumes within seconds of the link answering, not a minute.
//!
//! Without root or iproute2 each test prints `SKIPPED: ...` to stderr and returns.
//!
//! `link_recovery_is_measured` (ignored) prints the seconds from link up to rows
//! growing for docs/benchmarks.md; `AUDITWAL_LOADER_BIN` picks the loader binary
//! it runs (e.g. one built from an older commit):
//!
//! ```text
//! cargo test --test link_netns -- --ignored --nocapture link_recovery_is_measured
//! ```

use auditwal_test_support as common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetnsCluster;
use common::{emit_lines, ChildGuard, TestDb};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

/// How long after the link answers again rows must be growing: "seconds, not a
/// minute" (the loader's target is 10 s with its default settings).
const RECOVERY_LIMIT: Duration = Duration::from_secs(25);

/// Where the loader is when the link goes down.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The server is executing the batch's COPY.
    MidCopy,
    /// The server is executing the batch's COMMIT (held there by a deferred
    /// trigger on the checkpoint table while the link goes down).
    MidCommit,
    /// Caught up, its connection idle; new events arrive while the link is down.
    Idle,
}

/// What happens to the old connections while the link is down.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Nothing: both ends still hold them when the link comes back.
    Resume,
    /// The server side is terminated; the client is not told.
    ServerSideKilled,
}

struct Setup {
    net: NetnsCluster,
    db: TestDb,
    /// The test database over the unix socket: reachable while the link is down.
    admin: PgPool,
    wal: tempfile::TempDir,
    logs: tempfile::TempDir,
}

async fn setup(net: NetnsCluster) -> Setup {
    let db = TestDb::on_cluster(net.cluster()).await;
    let admin = PgPoolOptions::new()
        .max_connections(3)
        .connect(&net.cluster().socket_url_for(db.name()))
        .await
        .expect("connect over the unix socket");
    Setup {
        net,
        db,
        admin,
        wal: tempfile::tempdir().expect("tempdir"),
        logs: tempfile::tempdir().expect("tempdir"),
    }
}

fn event_line(i: usize) -> String {
    format!(
        "{{\"action\":\"link.event\",\"actor_id\":\"u{i}\",\"target_id\":\"{i}\",\"metadata\":{{\"pad\":\"{}\"}}}}\n",
        "z".repeat(400)
    )
}

fn emit(wal: &Path, from: usize, n: usize) -> Vec<Uuid> {
    emit_lines(
        wal,
        "s",
        "async",
        (from..from + n).map(event_line).collect(),
    )
}

fn loader_bin() -> PathBuf {
    match std::env::var_os("AUDITWAL_LOADER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(common::auditwal_bin()),
    }
}

/// `auditwal load` with its default link settings, logging to `logs/loader.log`.
fn spawn_loader(s: &Setup, batch_rows: u32) -> ChildGuard {
    let log = std::fs::File::create(s.logs.path().join("loader.log")).expect("loader log");
    ChildGuard::new(
        Command::new(loader_bin())
            .args(["load", "--metrics-addr", "off", "--batch-rows"])
            .arg(batch_rows.to_string())
            .arg("--wal-dir")
            .arg(s.wal.path())
            .args(["--database-url", s.db.url()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn auditwal load"),
    )
}

fn loader_log(s: &Setup) -> String {
    let text = std::fs::read_to_string(s.logs.path().join("loader.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn stop(loader: ChildGuard) {
    common::stop_with_sigterm(loader.take());
}

async fn count(admin: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(admin)
        .await
        .expect("count over the unix socket")
}

/// Polls `cond` every few milliseconds until it holds or `within` passes.
async fn wait_until<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// True when a backend of a client across the link is executing a statement
/// starting with `prefix`.
async fn client_running(s: &Setup, prefix: &str) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE client_addr = $1::inet AND state = 'active' AND query ILIKE $2",
    )
    .bind(s.net.client_addr())
    .bind(format!("{prefix}%"))
    .fetch_one(&s.admin)
    .await
    .map(|n| n > 0)
    .unwrap_or(false)
}

/// Terminates every backend of a client across the link and waits until they are gone.
async fn terminate_link_clients(s: &Setup) {
    let gone = wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE client_addr = $1::inet",
        )
        .bind(s.net.client_addr())
        .fetch_one(&s.admin)
        .await
        .map(|n| n == 0)
        .unwrap_or(false)
    })
    .await;
    assert!(gone, "the link's backends were not terminated");
}

/// Holds every COMMIT of a checkpoint for a moment while `slow_commit.hold` is
/// true: a deferred constraint trigger runs at COMMIT, so the server sits in the
/// COMMIT long enough for the test to cut the link under it.
async fn install_slow_commit(s: &Setup) {
    for sql in [
        "CREATE TABLE slow_commit (hold boolean NOT NULL)",
        "INSERT INTO slow_commit VALUES (false)",
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF (SELECT hold FROM slow_commit) THEN PERFORM pg_sleep(1.5); END IF; \
         RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON audit_checkpoints \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(sql)
            .execute(&s.admin)
            .await
            .expect("install the slow commit");
    }
}

async fn hold_commits(s: &Setup, hold: bool) {
    sqlx::query("UPDATE slow_commit SET hold = $1")
        .bind(hold)
        .execute(&s.admin)
        .await
        .expect("switch the slow commit");
}

/// What one case showed.
struct Recovery {
    /// Seconds from link up to rows growing.
    secs: f64,
    /// The loader opened a new connection after the link went down.
    reconnected: bool,
}

/// Runs one case and returns how the loader recovered, after asserting that
/// every event is loaded exactly once.
async fn dead_link(
    net: NetnsCluster,
    phase: Phase,
    outage: Outage,
    down_for: Duration,
) -> Recovery {
    let s = setup(net).await;
    let (backlog, batch_rows) = match phase {
        Phase::MidCopy => (120_000, 20_000),
        Phase::MidCommit => (60_000, 5_000),
        Phase::Idle => (5_000, 20_000),
    };
    if let Phase::MidCommit = phase {
        install_slow_commit(&s).await;
    }
    let mut ids = emit(s.wal.path(), 0, backlog);
    let loader = spawn_loader(&s, batch_rows);

    match phase {
        Phase::MidCopy => {
            let seen = wait_until(Duration::from_secs(60), || client_running(&s, "COPY")).await;
            assert!(seen, "no COPY seen; loader log:\n{}", loader_log(&s));
        }
        Phase::MidCommit => {
            let started = wait_until(Duration::from_secs(60), || async {
                count(&s.admin).await > 0
            })
            .await;
            assert!(started, "nothing loaded; loader log:\n{}", loader_log(&s));
            hold_commits(&s, true).await;
            let seen = wait_until(Duration::from_secs(60), || client_running(&s, "COMMIT")).await;
            assert!(seen, "no COMMIT seen; loader log:\n{}", loader_log(&s));
        }
        Phase::Idle => {
            let caught_up = wait_until(Duration::from_secs(60), || async {
                count(&s.admin).await == backlog as i64
            })
            .await;
            assert!(caught_up, "not caught up; loader log:\n{}", loader_log(&s));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let down_at_server: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&s.admin)
            .await
            .expect("the server's clock");
    let down_at = Instant::now();
    s.net.link_down();
    if let Phase::MidCommit = phase {
        hold_commits(&s, false).await;
    }
    if let Phase::Idle = phase {
        ids.extend(emit(s.wal.path(), backlog, 5_000));
    }
    if let Outage::ServerSideKilled = outage {
        terminate_link_clients(&s).await;
    }
    tokio::time::sleep(down_for.saturating_sub(down_at.elapsed())).await;
    let before_up = count(&s.admin).await;
    s.net.link_up();
    let up_at = Instant::now();
    let grew = wait_until(Duration::from_secs(90), || async {
        count(&s.admin).await > before_up
    })
    .await;
    let recovery = up_at.elapsed();
    assert!(
        grew,
        "{phase:?}/{outage:?}: rows stuck at {before_up} for 90 s after the link came back; \
         loader log:\n{}",
        loader_log(&s)
    );
    let all = wait_until(Duration::from_secs(120), || async {
        count(&s.admin).await == ids.len() as i64
    })
    .await;
    assert!(
        all,
        "{phase:?}/{outage:?}: {} of {} rows loaded; loader log:\n{}",
        count(&s.admin).await,
        ids.len(),
        loader_log(&s)
    );
    let new_connections: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE client_addr = $1::inet AND backend_start > $2",
    )
    .bind(s.net.client_addr())
    .bind(down_at_server)
    .fetch_one(&s.admin)
    .await
    .expect("the loader's connections");
    stop(loader);
    assert_exactly_over_socket(&s.admin, &ids).await;
    let on = if new_connections > 0 {
        "a new"
    } else {
        "the old"
    };
    eprintln!(
        "{phase:?}/{outage:?}, link down {:.1} s: rows growing {:.2} s after link up, on {on} connection",
        down_for.as_secs_f64(),
        recovery.as_secs_f64(),
    );
    Recovery {
        secs: recovery.as_secs_f64(),
        reconnected: new_connections > 0,
    }
}

async fn assert_exactly_over_socket(admin: &PgPool, expected: &[Uuid]) {
    use std::collections::BTreeSet;
    let got: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM audit_events")
        .fetch_all(admin)
        .await
        .expect("select event ids");
    let set: BTreeSet<Uuid> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "duplicates in audit_events");
    let want: BTreeSet<Uuid> = expected.iter().copied().collect();
    assert_eq!(
        set.len(),
        want.len(),
        "{} rows, {} expected",
        set.len(),
        want.len()
    );
    assert!(set == want, "the rows are not the events emitted");
}

fn assert_recovers_in_seconds(r: &Recovery) {
    assert!(
        r.secs < RECOVERY_LIMIT.as_secs_f64(),
        "rows grew only {:.1} s after the link came back",
        r.secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md, ~3 minutes"]
async fn link_recovery_is_measured() {
    let mut lines = Vec::new();
    for (phase, outage) in [
        (Phase::MidCopy, Outage::Resume),
        (Phase::MidCopy, Outage::ServerSideKilled),
        (Phase::Idle, Outage::ServerSideKilled),
    ] {
        let net = auditwal_test_support::netns_cluster_or_skip!();
        let r = dead_link(net, phase, outage, Duration::from_secs(15)).await;
        lines.push(format!(
            "{phase:?}/{outage:?}, link down 15 s: {:.2} s",
            r.secs
        ));
    }
    let frozen = frozen_link().await;
    lines.push(format!(
        "old connection dead without an RST, silent 8 s (loopback proxy): {:.2} s",
        frozen.as_secs_f64()
    ));
    for l in lines {
        eprintln!("link up -> rows growing: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_copy_for_4s_resumes_on_the_old_connection_loading_each_event_once() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(net, Phase::MidCopy, Outage::Resume, Duration::from_secs(4)).await;
    assert_recovers_in_seconds(&r);
    assert!(
        !r.reconnected,
        "a COPY stalled for less than the link timeout was given up"
    );
}

/// The connection given up on the client's side lives on in the server unless its
/// end has keepalive too: its transaction holds the checkpoint row lock, and the
/// loader's new connection would wait on it for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_off_for_longer_than_the_link_timeout_is_given_up_and_its_lock_released() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(net, Phase::MidCopy, Outage::Resume, Duration::from_secs(15)).await;
    assert_recovers_in_seconds(&r);
    assert!(r.reconnected, "a COPY stalled for 15 s was waited out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_copy_whose_server_side_is_killed_is_left_within_seconds_of_link_up() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(
        net,
        Phase::MidCopy,
        Outage::ServerSideKilled,
        Duration::from_secs(12),
    )
    .await;
    assert_recovers_in_seconds(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_off_for_15s_is_settled_by_the_checkpoint_loading_each_event_once() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(
        net,
        Phase::MidCommit,
        Outage::Resume,
        Duration::from_secs(15),
    )
    .await;
    assert_recovers_in_seconds(&r);
    assert!(
        r.reconnected,
        "a COMMIT unanswered for longer than the link timeout was waited out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_off_whose_server_side_is_killed_is_neither_lost_nor_loaded_twice() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(
        net,
        Phase::MidCommit,
        Outage::ServerSideKilled,
        Duration::from_secs(3),
    )
    .await;
    assert_recovers_in_seconds(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_loader_cut_off_for_20s_loads_what_arrived_meanwhile_within_seconds_of_link_up() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(net, Phase::Idle, Outage::Resume, Duration::from_secs(20)).await;
    assert_recovers_in_seconds(&r);
    assert!(
        r.reconnected,
        "a connection silent for longer than the link timeout was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_loader_whose_server_side_was_killed_meanwhile_reconnects_within_seconds() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    let r = dead_link(
        net,
        Phase::Idle,
        Outage::ServerSideKilled,
        Duration::from_secs(8),
    )
    .await;
    assert_recovers_in_seconds(&r);
}

/// Sync calls while the link is dead, then after it is back: each call during the
/// outage fails with `DatabaseUnavailable` or `OutcomeUnknown` within the sync
/// timeout; calls succeed again within seconds of the link answering; the table
/// holds every event that succeeded, none that was not sent, and of those whose
/// outcome was unknown, whatever the database says (each at most once).
async fn sync_across_a_dead_link(net: NetnsCluster, outage: Outage) {
    use auditwal::pg::{PgError, SyncConfig, SyncWriter};
    let s = setup(net).await;
    let timeout = Duration::from_secs(2);
    let writer = SyncWriter::connect(s.db.url(), {
        let mut c = SyncConfig::default();
        c.timeout = timeout;
        c.migrate = false;
        c
    })
    .await
    .expect("sync writer");
    let (mut stored, mut unknown, mut not_sent) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..20 {
        let e = auditwal::AuditEvent::new("link.sync");
        writer
            .record(&e)
            .await
            .expect("a call while the link is up");
        stored.push(e.event_id);
    }
    s.net.link_down();
    if let Outage::ServerSideKilled = outage {
        terminate_link_clients(&s).await;
    }
    let down_at = Instant::now();
    while down_at.elapsed() < Duration::from_secs(8) {
        let e = auditwal::AuditEvent::new("link.sync");
        let started = Instant::now();
        let result = writer.record(&e).await;
        let took = started.elapsed();
        assert!(
            took < timeout + Duration::from_secs(1),
            "a call took {took:?} with a {timeout:?} sync timeout: {result:?}"
        );
        match result {
            Err(PgError::DatabaseUnavailable { .. }) => not_sent.push(e.event_id),
            Err(PgError::OutcomeUnknown { .. }) => unknown.push(e.event_id),
            other => panic!("a call across a dead link answered {other:?}"),
        }
        // Calls that fail at once would otherwise spin.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.net.link_up();
    let up_at = Instant::now();
    let recovered = loop {
        let e = auditwal::AuditEvent::new("link.sync");
        match writer.record(&e).await {
            Ok(_) => {
                stored.push(e.event_id);
                break up_at.elapsed();
            }
            Err(PgError::DatabaseUnavailable { .. }) => not_sent.push(e.event_id),
            Err(PgError::OutcomeUnknown { .. }) => unknown.push(e.event_id),
            Err(other) => panic!("after the link came back: {other}"),
        }
        assert!(
            up_at.elapsed() < RECOVERY_LIMIT,
            "sync calls still failing {RECOVERY_LIMIT:?} after the link came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for _ in 0..20 {
        let e = auditwal::AuditEvent::new("link.sync");
        writer.record(&e).await.expect("a call after recovery");
        stored.push(e.event_id);
    }
    let got: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM audit_events")
        .fetch_all(&s.admin)
        .await
        .expect("select event ids");
    let set: std::collections::BTreeSet<Uuid> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "duplicates in audit_events");
    for id in &stored {
        assert!(set.contains(id), "a committed call's event {id} is missing");
    }
    for id in &not_sent {
        assert!(
            !set.contains(id),
            "an event reported as not sent is stored: {id}"
        );
    }
    let explained = stored.len() + unknown.iter().filter(|id| set.contains(id)).count();
    assert_eq!(set.len(), explained, "rows nobody recorded");
    assert!(
        !not_sent.is_empty() || !unknown.is_empty(),
        "no call failed while the link was down"
    );
    eprintln!(
        "{outage:?}: {} not sent, {} unknown during the outage; calls succeed {:.2} s after link up",
        not_sent.len(),
        unknown.len(),
        recovered.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_calls_across_a_dead_link_fail_within_the_timeout_and_recover_when_it_resumes() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    sync_across_a_dead_link(net, Outage::Resume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_calls_across_a_dead_link_whose_server_side_was_killed_fail_in_time_and_recover() {
    let net = auditwal_test_support::netns_cluster_or_skip!();
    sync_across_a_dead_link(net, Outage::ServerSideKilled).await;
}

/// The socket options [`auditwal::pg::link::connect`] sets, read back from the
/// kernel for the socket of a real connection (found here independently: the
/// server names the connection's local port, and the test looks for the socket
/// bound to it among this process's descriptors).
#[tokio::test]
async fn a_tuned_connection_socket_has_keepalive_and_the_user_timeout_set() {
    use rustix::net::sockopt;
    use sqlx::ConnectOptions;
    let db = TestDb::new().await;
    let options: sqlx::postgres::PgConnectOptions = db.url().parse().expect("url");
    let tuning = auditwal::pg::link::LinkTuning::for_timeout(Duration::from_secs(10));
    let (mut tuned, how) = auditwal::pg::link::connect(&options, &tuning)
        .await
        .expect("connect");
    assert_eq!(how, auditwal::pg::link::Tuned::Socket);
    let mut plain = options.connect().await.expect("connect");

    let fd = socket_of(&mut tuned).await;
    assert!(sockopt::socket_keepalive(&fd).expect("SO_KEEPALIVE"));
    assert_eq!(
        sockopt::tcp_keepidle(&fd).expect("TCP_KEEPIDLE"),
        Duration::from_secs(5)
    );
    assert_eq!(
        sockopt::tcp_keepintvl(&fd).expect("TCP_KEEPINTVL"),
        Duration::from_secs(1)
    );
    assert_eq!(sockopt::tcp_keepcnt(&fd).expect("TCP_KEEPCNT"), 3);
    assert_eq!(
        sockopt::tcp_user_timeout(&fd).expect("TCP_USER_TIMEOUT"),
        10_000
    );

    // The server's end of it too.
    for (setting, want) in [
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "1"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "10000"),
    ] {
        let got: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut tuned)
            .await
            .expect("SHOW");
        assert_eq!(got, want, "{setting} on the server's end");
    }

    // Only the tuned connection's socket is touched.
    let other = socket_of(&mut plain).await;
    assert!(!sockopt::socket_keepalive(&other).expect("SO_KEEPALIVE"));
    assert_eq!(
        sockopt::tcp_user_timeout(&other).expect("TCP_USER_TIMEOUT"),
        0
    );
    // And the tuned connection still works.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut tuned)
        .await
        .expect("query");
    assert_eq!(one, 1);
}

/// The socket of `conn`: the one in this process bound to the port the server
/// sees the connection come from.
async fn socket_of(conn: &mut sqlx::PgConnection) -> std::os::fd::OwnedFd {
    let port: i32 = sqlx::query_scalar("SELECT inet_client_port()")
        .fetch_one(conn)
        .await
        .expect("inet_client_port");
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("fd entry");
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the borrow is only duplicated. A descriptor another test closed
        // meanwhile makes the dup fail; a number reused names another file, whose
        // port check then fails.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let Ok(own) = rustix::io::fcntl_dupfd_cloexec(borrowed, 0) else {
            continue;
        };
        let local = rustix::net::getsockname(&own)
            .ok()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok());
        if local.is_some_and(|a| i32::from(a.port()) == port) {
            return own;
        }
    }
    panic!("no socket bound to port {port}");
}

/// A TCP proxy on loopback that forwards until [`FreezingProxy::go_silent`], and
/// from then on forwards nothing on the connections it holds, ever, while keeping
/// them open (no FIN, no RST): the issue's case of a NAT or firewall that lost its
/// state, where even keepalive probes are answered (by the proxy's kernel). Only
/// the loader's own progress limit can tell. New connections are held while
/// silent and forwarded again after [`FreezingProxy::answer`].
struct FreezingProxy {
    url: String,
    /// Connections numbered below this are frozen for good.
    frozen_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The number the next connection gets.
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    async fn start(db: &TestDb, target_port: u16) -> FreezingProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, url) = common::proxy_listener(db, target_port).await;
        let frozen_below = Arc::new(AtomicU64::new(0));
        let silent = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicU64::new(0));
        let (frozen, hush, ids) = (frozen_below.clone(), silent.clone(), next_id.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if hush.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                let id = ids.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let frozen = frozen.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if id < frozen.load(Ordering::SeqCst) {
                                // Both ends stay open (this task holds them),
                                // silent, for ever.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        FreezingProxy {
            url,
            frozen_below,
            next_id,
            silent,
        }
    }

    /// Every connection open now goes silent for good; new ones are held.
    fn go_silent(&self) {
        use std::sync::atomic::Ordering;
        self.silent.store(true, Ordering::SeqCst);
        self.frozen_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// New connections are forwarded again; the old ones stay dead.
    fn answer(&self) {
        use std::sync::atomic::Ordering;
        self.silent.store(false, Ordering::SeqCst);
    }
}

/// The issue's case, without namespaces: the link goes silent under the loader's
/// connection mid-load for 8 s and then answers new connections while the old one
/// stays dead without an RST (keepalive probes answered by the proxy's kernel).
/// With the old limit of 60 s per batch, nothing loaded for about a minute; with
/// the progress limit (10 s by default) the loader reconnects once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_left_dead_without_an_rst_is_replaced_within_seconds_of_the_link_answering() {
    let recovery = frozen_link().await;
    assert!(
        recovery < RECOVERY_LIMIT,
        "rows grew only {recovery:?} after the link answered again"
    );
}

/// The case above; returns the time from the link answering to rows growing,
/// after asserting that every event is loaded exactly once.
async fn frozen_link() -> Duration {
    let (cluster, db) = common::private_cluster_and_db().await;
    let proxy = FreezingProxy::start(&db, cluster.port()).await;
    let wal = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let ids = emit(wal.path(), 0, 100_000);
    let log = std::fs::File::create(logs.path().join("loader.log")).expect("loader log");
    let loader = ChildGuard::new(
        Command::new(loader_bin())
            .args([
                "load",
                "--metrics-addr",
                "off",
                "--batch-rows",
                "10000",
                "--wal-dir",
            ])
            .arg(wal.path())
            .args(["--database-url", &proxy.url])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn auditwal load"),
    );
    let pool = db.pool();
    let started = wait_until(Duration::from_secs(60), || async { count(pool).await > 0 }).await;
    assert!(started, "nothing loaded");
    proxy.go_silent();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before_up = count(pool).await;
    proxy.answer();
    let up_at = Instant::now();
    let grew = wait_until(Duration::from_secs(90), || async {
        count(pool).await > before_up
    })
    .await;
    let recovery = up_at.elapsed();
    assert!(
        grew,
        "rows stuck at {before_up} for 90 s after the link answered"
    );
    eprintln!(
        "dead without an RST: rows growing {:.2} s after the link answered",
        recovery.as_secs_f64()
    );
    let all = wait_until(Duration::from_secs(120), || async {
        count(pool).await == ids.len() as i64
    })
    .await;
    assert!(all, "{} of {} rows loaded", count(pool).await, ids.len());
    stop(loader);
    assert_exactly_over_socket(pool, &ids).await;
    recovery
}

#[test]
fn a_link_timeout_under_a_second_is_refused_as_bad_usage() {
    let wal = tempfile::tempdir().expect("tempdir");
    let out = Command::new(common::auditwal_bin())
        .args([
            "load",
            "--metrics-addr",
            "off",
            "--link-timeout-ms",
            "500",
            "--wal-dir",
        ])
        .arg(wal.path())
        .args(["--database-url", "postgres://nobody@127.0.0.1:1/none"])
        .output()
        .expect("run auditwal load");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--link-timeout-ms"), "{stderr}");
}

/// Through a proxy (here one inside this process) the server sees the proxy's
/// address: the socket tuned is then the one new socket to the dialled port, and
/// the proxy's own socket to the server, bound to what the server sees, is left
/// alone.
#[tokio::test]
async fn through_a_proxy_the_tuned_socket_is_the_one_dialled() {
    use rustix::net::sockopt;
    let (cluster, db) = common::private_cluster_and_db().await;
    let proxy = common::BlackHoleProxy::silent(&cluster, &db).await;
    proxy.answer();
    let options: sqlx::postgres::PgConnectOptions = proxy.url().parse().expect("url");
    let tuning = auditwal::pg::link::LinkTuning::for_timeout(Duration::from_secs(6));
    let (mut conn, how) = auditwal::pg::link::connect(&options, &tuning)
        .await
        .expect("connect through the proxy");
    assert_eq!(how, auditwal::pg::link::Tuned::Socket);
    let proxy_side = socket_of(&mut conn).await;
    let peer = |fd: &std::os::fd::OwnedFd| {
        rustix::net::getpeername(fd)
            .ok()
            .flatten()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok())
    };
    assert_eq!(
        peer(&proxy_side).map(|a| a.port()),
        Some(cluster.port()),
        "the socket the server sees is the proxy's"
    );
    assert!(!sockopt::socket_keepalive(&proxy_side).expect("SO_KEEPALIVE"));
    let dialled = options.get_port();
    let mut ours = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(fd) = entry
            .expect("fd")
            .file_name()
            .to_string_lossy()
            .parse::<i32>()
        else {
            continue;
        };
        // SAFETY: as in `socket_of`: only duplicated, then checked.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(own) = rustix::io::fcntl_dupfd_cloexec(borrowed, 0) {
            if peer(&own).is_some_and(|a| a.port() == dialled) {
                ours.push(own);
            }
        }
    }
    assert_eq!(ours.len(), 1, "one socket dialled the proxy");
    assert!(sockopt::socket_keepalive(&ours[0]).expect("SO_KEEPALIVE"));
    assert_eq!(
        sockopt::tcp_user_timeout(&ours[0]).expect("TCP_USER_TIMEOUT"),
        6_000
    );
}
