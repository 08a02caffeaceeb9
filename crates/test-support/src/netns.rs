//! A PostgreSQL server behind a link the test can cut: the server runs in a network
//! namespace of the test's own, reached from the test's namespace through a second
//! one that stands for the network between them:
//!
//! ```text
//! test (10.200.N.1) ─veth─ [ mid: bridge ] ─veth─ server ns (10.200.N.2, PostgreSQL)
//! ```
//!
//! [`NetnsCluster::link_down`] sets the bridge down: frames from either side are
//! dropped in the middle, silently, while both ends keep their carrier, their
//! routes and their (permanent) neighbour entries, so neither side's kernel sees an
//! error of its own and neither side's TCP state changes. That is a link that went
//! silent, as a NAT or a firewall that lost its state or a cut upstream looks to
//! both ends. (Setting one end of a single veth pair down is not the same: the
//! sender's own device then drops the packets, TCP takes that for local congestion
//! and retries every 500 ms, so connections resume at once however long the
//! outage.) `link_up` brings the bridge back; TCP connections resume if both ends
//! still hold them, after their next retransmission.
//!
//! Tear-down (server, namespaces, veths) happens in `Drop`, so also when the test
//! panics; namespaces left by a test process that was SIGKILLed are removed by
//! the next one (their names carry the pid). Where namespaces cannot be made (not
//! root, no iproute2, no permission), [`NetnsCluster::start`] says why and the
//! test prints a `SKIPPED:` line instead of passing silently.

use std::process::{Command, Stdio};

use crate::cluster::{Cluster, ClusterNetwork, ClusterOptions};

/// Prefix of every namespace these tests create: `auditwal-PID-N`.
const NS_PREFIX: &str = "auditwal-";

/// The port the server listens on inside its namespace.
pub const PORT: u16 = 5432;

/// Runs `ip ARGS`, returning its stderr on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The server in its namespace, and the link to it.
pub struct NetnsCluster {
    cluster: Option<Cluster>,
    /// The server's namespace.
    ns: String,
    /// The namespace in the middle, holding the bridge that is the link.
    mid: String,
    host_if: String,
    host_addr: String,
}

impl NetnsCluster {
    /// A namespace, a veth pair, and a private cluster (fsync off) listening on the
    /// namespace's address. `Err` says why it cannot be made here (the test skips).
    pub fn start() -> Result<NetnsCluster, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("network namespaces need root (CI runs as root)".into());
        }
        ip(&["netns", "list"])?;
        remove_stale_namespaces();
        // Choose N and create the pair under a lock shared by parallel test
        // processes, so no two pick the same subnet.
        let lock_path = std::env::temp_dir().join("auditwal-netns.lock");
        let lock_file = std::fs::File::create(&lock_path)
            .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
        rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let in_use = ip(&["-o", "-4", "addr", "show"])?;
        let n = (1..=250u32)
            .find(|n| !in_use.contains(&format!("10.200.{n}.")))
            .ok_or("no free 10.200.N.0/30 subnet left")?;
        let mut link = NetnsCluster {
            cluster: None,
            ns: format!("{NS_PREFIX}{}-{n}", std::process::id()),
            mid: format!("{NS_PREFIX}{}-{n}-mid", std::process::id()),
            host_if: format!("awl{n}h"),
            host_addr: format!("10.200.{n}.1"),
        };
        let server = format!("10.200.{n}.2");
        let (host_mac, server_mac) = (
            format!("02:00:0a:c8:{n:02x}:01"),
            format!("02:00:0a:c8:{n:02x}:02"),
        );
        let (ns, mid) = (link.ns.clone(), link.mid.clone());
        let (mid_a, mid_b, ns_if) = (format!("awl{n}a"), format!("awl{n}b"), format!("awl{n}n"));
        // From the first `netns add` on, dropping `link` removes what exists.
        ip(&["netns", "add", &mid])?;
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link",
            "add",
            &link.host_if,
            "address",
            &host_mac,
            "type",
            "veth",
            "peer",
            "name",
            &mid_a,
            "netns",
            &mid,
        ])?;
        ip(&[
            "-n",
            &mid,
            "link",
            "add",
            &mid_b,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "address",
            &server_mac,
            "netns",
            &ns,
        ])?;
        ip(&["-n", &mid, "link", "add", "br0", "type", "bridge"])?;
        for port in [&mid_a, &mid_b] {
            ip(&["-n", &mid, "link", "set", port, "master", "br0"])?;
            ip(&["-n", &mid, "link", "set", port, "up"])?;
        }
        ip(&["-n", &mid, "link", "set", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.host_addr),
            "dev",
            &link.host_if,
        ])?;
        ip(&["link", "set", &link.host_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{server}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &ns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // Permanent neighbours: ARP failing during an outage would make each
        // side's kernel drop its own packets, which is not what a silent link does.
        ip(&[
            "neigh",
            "replace",
            &server,
            "lladdr",
            &server_mac,
            "dev",
            &link.host_if,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n",
            &ns,
            "neigh",
            "replace",
            &link.host_addr,
            "lladdr",
            &host_mac,
            "dev",
            &ns_if,
            "nud",
            "permanent",
        ])?;
        drop(lock_file);
        let cluster = Cluster::start(ClusterOptions {
            network: Some(ClusterNetwork {
                listen: server.parse().map_err(|e| format!("{server}: {e}"))?,
                port: PORT,
                clients: format!("10.200.{n}.0/30"),
                wrapper: vec!["ip".into(), "netns".into(), "exec".into(), link.ns.clone()],
            }),
            ..ClusterOptions::for_tests()
        })
        .map_err(|e| format!("cannot start PostgreSQL in namespace {}: {e}", link.ns))?;
        link.cluster = Some(cluster);
        Ok(link)
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("a NetnsCluster holds its cluster until dropped")
    }

    /// The test's address on the link (the server sees its clients from here).
    pub fn client_addr(&self) -> &str {
        &self.host_addr
    }

    /// Cuts the link: from now on nothing crosses it, either way, and nobody is told.
    pub fn link_down(&self) {
        ip(&["-n", &self.mid, "link", "set", "br0", "down"]).expect("set the link down");
    }

    /// Restores the link.
    pub fn link_up(&self) {
        ip(&["-n", &self.mid, "link", "set", "br0", "up"]).expect("set the link up");
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        // The server first: a namespace with a process in it lives on after `del`.
        drop(self.cluster.take());
        // Deleting a namespace deletes its ends of the pairs, and with them ours.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["netns", "del", &self.mid]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Deletes namespaces named by a test process that no longer exists.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A [`NetnsCluster`], or a `SKIPPED:` line on stderr and an early return.
#[macro_export]
macro_rules! netns_cluster_or_skip {
    () => {
        match $crate::netns::NetnsCluster::start() {
            Ok(c) => c,
            Err(why) => {
                eprintln!("SKIPPED: this test needs a network namespace: {why}");
                return;
            }
        }
    };
}
