//! The throwaway cluster: it answers, restarts on the same port with its data, and
//! never outlives its owner: not on drop, and not when the owner is SIGKILLed.

use auditwal_test_support as common;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use auditwal_test_support::{Cluster, ClusterOptions};
use sqlx::{Connection, PgConnection};

fn port_answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

async fn connect(cluster: &Cluster) -> PgConnection {
    PgConnection::connect(&cluster.url())
        .await
        .expect("connect to the cluster")
}

/// Polls `cond` until it holds or `within` passes.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_private_cluster_answers_on_loopback_and_drop_stops_it_and_removes_its_dir() {
    let cluster = common::private_cluster();
    let port = cluster.port();
    let dir = cluster.dir().to_path_buf();
    let mut conn = connect(&cluster).await;
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&mut conn)
        .await
        .expect("SHOW listen_addresses");
    assert_eq!(listen, "127.0.0.1");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .expect("SELECT 1");
    assert_eq!(one, 1);
    drop(conn);
    assert!(dir.join("data").is_dir());

    drop(cluster);
    assert!(!port_answers(port), "server still answers after drop");
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

#[tokio::test]
async fn stop_immediate_then_start_again_keeps_the_port_and_committed_rows() {
    let cluster = common::private_cluster();
    let port = cluster.port();
    {
        let mut conn = connect(&cluster).await;
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await
            .expect("create");
        sqlx::query("INSERT INTO t VALUES (1), (2), (3)")
            .execute(&mut conn)
            .await
            .expect("insert");
    }
    cluster.stop_immediate().expect("stop -m immediate");
    assert!(!cluster.is_running());
    assert!(!port_answers(port), "server still answers after stop");
    assert!(PgConnection::connect(&cluster.url()).await.is_err());

    cluster.start_again().expect("start again");
    assert_eq!(cluster.port(), port);
    let mut conn = connect(&cluster).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(n, 3);
}

#[test]
fn the_shared_cluster_is_started_once_per_process() {
    let a = Cluster::shared().expect("shared cluster");
    let b = Cluster::shared().expect("shared cluster");
    assert!(std::ptr::eq(a, b));
    assert!(port_answers(a.port()));
}

const CHILD_ENV: &str = "AUDITWAL_TEST_CLUSTER_CHILD";

/// Not a test: the child process of the SIGKILL test below. It starts a cluster,
/// prints where it is, and waits to be killed (at most two minutes).
#[test]
#[ignore = "helper process for a_sigkilled_owner_leaves_no_server_and_no_dir"]
fn child_holds_a_cluster_until_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::for_tests()).expect("child: start cluster");
    println!("CLUSTER {} {}", cluster.port(), cluster.dir().display());
    std::thread::sleep(Duration::from_secs(120));
    drop(cluster);
}

#[test]
fn a_sigkilled_owner_leaves_no_server_and_no_dir() {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_holds_a_cluster_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test <name> ... " on the same line first.
            if let Some((_, rest)) = line.split_once("CLUSTER ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) => l,
        Err(e) => {
            let _ = child.kill();
            panic!("the child never reported its cluster: {e}");
        }
    };
    let (port, dir) = line.split_once(' ').expect("CLUSTER <port> <dir>");
    let port: u16 = port.parse().expect("port");
    let dir = PathBuf::from(dir);
    assert!(port_answers(port), "the child's server is not up");
    assert!(dir.is_dir());

    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");

    assert!(
        eventually(Duration::from_secs(15), || !port_answers(port)),
        "the server on port {port} still answers 15 s after its owner was killed"
    );
    assert!(
        eventually(Duration::from_secs(15), || !dir.exists()),
        "{} still exists 15 s after its owner was killed",
        dir.display()
    );
}
