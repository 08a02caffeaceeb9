//! The TCP tuning of every PostgreSQL connection auditwal opens (the loader's, sync
//! mode's committers', replay's), so that a link that dies under a connection is
//! noticed in seconds rather than after TCP's own retransmission budget (about 15
//! minutes) or never (an idle connection without keepalive).
//!
//! One setting, the *link timeout*, drives all of it: keepalive probes start after
//! half of it idle and are sent every sixth of it, three unanswered probes end
//! the connection, and `TCP_USER_TIMEOUT` ends it when data it sent stays
//! unacknowledged for the whole of it. Either way the next read or write on the
//! connection fails (ETIMEDOUT) and the caller's usual "connection lost" path runs.
//! The loader's own progress limit (`crate::loader`) covers what the kernel
//! cannot see, such as a proxy that acknowledges bytes and forwards none.
//!
//! The server's end gets the same (the session settings `tcp_keepalives_idle`,
//! `_interval`, `_count` and `tcp_user_timeout`, PostgreSQL 12 or later). Without
//! it, a connection the client gave up while the link was down lives on in the
//! server, which has nothing to send and so never learns: its transaction, in
//! the middle of a COPY, holds the stream's checkpoint row lock, and every new
//! connection of the loader waits on that lock until the server's own TCP
//! notices, two hours later by default. With it, the server ends its side within
//! about the link timeout and the lock is released.
//!
//! Why the socket is found after the fact: sqlx 0.8 opens the socket itself and
//! has neither a keepalive option nor a way to hand it a socket of ours (upstream
//! pull requests for both are unmerged), and no way to reach the socket of a
//! [`PgConnection`]. So [`connect`] connects as usual, asks the server which
//! address and port it sees the connection coming from (`inet_client_addr()`,
//! `inet_client_port()`), and looks among this process's descriptors
//! (`/proc/self/fd`) for the TCP socket bound to exactly that address and port and
//! connected to the port it dialled. A local address and port identify one
//! socket, so no other connection of the process is touched (the dialled port
//! rules out a proxy inside the same process, whose socket to the server is bound
//! to what the server sees too). When the server sees another address (a proxy or
//! NAT in between), the socket is the one TCP socket to the dialled port that
//! appeared during the connect; if there is no such single socket, nothing is
//! tuned and a warning says so (the loader's progress limit still holds). A
//! unix-socket connection needs none of this.
//!
//! This module leaves to its callers the connect timeout, retries and what a lost
//! connection means for the data; it knows sockets, not batches.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};

/// The default link timeout of the loader ([`LoaderConfig::link_timeout`]) and
/// of sync mode ([`SyncConfig`]): a dead link costs about this much before
/// reconnecting; a healthy server answers any step of a batch well within it.
///
/// [`LoaderConfig::link_timeout`]: crate::loader::LoaderConfig::link_timeout
/// [`SyncConfig`]: crate::pg::SyncConfig
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// The keepalive and user-timeout values one link timeout stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTuning {
    /// Idle time before the first keepalive probe.
    pub keepalive_idle: Duration,
    /// Time between probes.
    pub keepalive_interval: Duration,
    /// Unanswered probes that end the connection.
    pub keepalive_count: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    pub user_timeout: Duration,
}

impl LinkTuning {
    /// The tuning for `link_timeout` (at least 2 s: the kernel counts keepalive
    /// times in whole seconds).
    pub fn for_timeout(link_timeout: Duration) -> LinkTuning {
        let t = link_timeout.max(Duration::from_secs(2));
        let whole = |d: Duration| Duration::from_secs(d.as_secs().max(1));
        LinkTuning {
            keepalive_idle: whole(t / 2),
            keepalive_interval: whole(t / 6),
            keepalive_count: 3,
            user_timeout: t,
        }
    }
}

/// What [`connect`] could do to the connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// Keepalive and user timeout are set on its socket.
    Socket,
    /// A unix-socket connection: nothing to tune.
    NotTcp,
    /// Its socket could not be identified for certain; left as it was.
    NotFound,
}

/// Opens a connection with `options` and tunes its TCP socket for `tuning`. No
/// timeout of its own: the caller bounds the whole (connect and the one query that
/// finds the socket).
pub async fn connect(
    options: &PgConnectOptions,
    tuning: &LinkTuning,
) -> Result<(PgConnection, Tuned), sqlx::Error> {
    if options.get_socket().is_some() {
        return Ok((options.connect().await?, Tuned::NotTcp));
    }
    let before = socket_inodes();
    let mut conn = options.connect().await?;
    tune_server_side(&mut conn, tuning).await?;
    let seen: (Option<String>, Option<i32>) =
        sqlx::query_as("SELECT host(inet_client_addr()), inet_client_port()")
            .fetch_one(&mut conn)
            .await?;
    let by_server = match seen {
        (Some(addr), Some(port)) => addr
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| Some(SocketAddr::new(ip, u16::try_from(port).ok()?))),
        // NULL: the server sees a unix socket (the host named a socket directory).
        _ => return Ok((conn, Tuned::NotTcp)),
    };
    let port = options.get_port();
    let found = match by_server.and_then(|local| socket_bound_to(local, port)) {
        Some(fd) => Some(fd),
        None => new_socket_to_port(&before, port),
    };
    let Some(fd) = found else {
        tracing::warn!(
            host = options.get_host(),
            port = options.get_port(),
            "cannot identify this connection's TCP socket; keepalive not set (a dead \
             link is still noticed by the link timeout)"
        );
        return Ok((conn, Tuned::NotFound));
    };
    match apply(&fd, tuning) {
        Ok(()) => Ok((conn, Tuned::Socket)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set keepalive on the database connection");
            Ok((conn, Tuned::NotFound))
        }
    }
}

/// Gives the server's end of `conn` the same keepalive and user timeout. A server
/// that refuses a setting (older than PostgreSQL 12: no `tcp_user_timeout`) is
/// logged and left as it is; losing the connection meanwhile is an error.
async fn tune_server_side(conn: &mut PgConnection, t: &LinkTuning) -> Result<(), sqlx::Error> {
    let result = sqlx::query(
        "SELECT set_config('tcp_keepalives_idle', $1, false), \
                set_config('tcp_keepalives_interval', $2, false), \
                set_config('tcp_keepalives_count', $3, false), \
                set_config('tcp_user_timeout', $4, false)",
    )
    .bind(t.keepalive_idle.as_secs().to_string())
    .bind(t.keepalive_interval.as_secs().to_string())
    .bind(t.keepalive_count.to_string())
    .bind(t.user_timeout.as_millis().to_string())
    .execute(conn)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) => {
            tracing::warn!(
                "the server refused its side's keepalive settings ({e}); a connection \
                 given up on a dead link may hold its locks there until its TCP notices"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Sets keepalive and the user timeout on `fd`.
fn apply(fd: &OwnedFd, t: &LinkTuning) -> rustix::io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, t.keepalive_idle)?;
    sockopt::set_tcp_keepintvl(fd, t.keepalive_interval)?;
    sockopt::set_tcp_keepcnt(fd, t.keepalive_count)?;
    let ms = u32::try_from(t.user_timeout.as_millis()).unwrap_or(u32::MAX);
    sockopt::set_tcp_user_timeout(fd, ms)
}

/// This process's socket descriptors, by number and inode (from the
/// `socket:[INODE]` links in /proc/self/fd). Reading procfs does not block on a
/// device: it is answered from the kernel's tables.
fn sockets() -> Vec<(RawFd, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

fn socket_inodes() -> BTreeSet<u64> {
    sockets().into_iter().map(|(_, inode)| inode).collect()
}

/// A descriptor of our own for the socket behind `fd`, if it is a TCP socket.
///
/// The descriptor number was read from /proc/self/fd and belongs to someone else
/// in this process, who may close it at any moment (and the number be reused).
/// So it is duplicated first and every check and option applies to the
/// duplicate: whatever file the number named at the instant of the `dup`, the
/// checks are about that file, and the options land on the socket checked.
fn tcp_socket(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: the borrow lives for the one `fcntl(F_DUPFD_CLOEXEC)` call below and
    // nothing else; if the number was closed meanwhile, the call fails with EBADF,
    // and if it was reused, the duplicate is of the new file, which the checks
    // that follow are then about. No read, write or close goes through it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let own = rustix::io::fcntl_dupfd_cloexec(borrowed, 0).ok()?;
    let is_stream =
        rustix::net::sockopt::socket_type(&own).ok()? == rustix::net::SocketType::STREAM;
    let is_tcp = rustix::net::sockopt::socket_protocol(&own)
        .ok()
        .flatten()
        .is_some_and(|p| p == rustix::net::ipproto::TCP);
    (is_stream && is_tcp).then_some(own)
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()
}

fn peer_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    SocketAddr::try_from(rustix::net::getpeername(fd).ok()??).ok()
}

/// Two addresses the same but for an IPv4-mapped IPv6 spelling.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// The TCP socket of this process whose local address is `local` and whose peer
/// port is `port` (the one dialled: a proxy inside this process has a socket
/// bound to what the server sees too, but that one leads to the server's port).
fn socket_bound_to(local: SocketAddr, port: u16) -> Option<OwnedFd> {
    sockets().into_iter().find_map(|(fd, _)| {
        let own = tcp_socket(fd)?;
        let bound = local_addr(&own).is_some_and(|a| same_addr(a, local));
        let dialled = peer_addr(&own).is_some_and(|p| p.port() == port);
        (bound && dialled).then_some(own)
    })
}

/// The one TCP socket to `port` that is not among `before`, if there is exactly one.
fn new_socket_to_port(before: &BTreeSet<u64>, port: u16) -> Option<OwnedFd> {
    let mut found = sockets()
        .into_iter()
        .filter(|(_, inode)| !before.contains(inode))
        .filter_map(|(fd, _)| tcp_socket(fd))
        .filter(|own| peer_addr(own).is_some_and(|p| p.port() == port));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuning_notices_a_dead_idle_connection_within_about_the_link_timeout() {
        let t = LinkTuning::for_timeout(Duration::from_secs(10));
        assert_eq!(t.keepalive_idle, Duration::from_secs(5));
        assert_eq!(t.keepalive_interval, Duration::from_secs(1));
        assert_eq!(t.user_timeout, Duration::from_secs(10));
        let idle_detection = t.keepalive_idle + t.keepalive_interval * t.keepalive_count;
        assert!(
            idle_detection <= Duration::from_secs(10),
            "{idle_detection:?}"
        );
        let tiny = LinkTuning::for_timeout(Duration::from_millis(10));
        assert!(tiny.keepalive_idle >= Duration::from_secs(1));
        assert!(tiny.keepalive_interval >= Duration::from_secs(1));
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_same_address() {
        let a: SocketAddr = "10.0.0.1:5".parse().expect("addr");
        let b: SocketAddr = "[::ffff:10.0.0.1]:5".parse().expect("addr");
        assert!(same_addr(a, b));
        assert!(!same_addr(a, "10.0.0.1:6".parse().expect("addr")));
    }
}
