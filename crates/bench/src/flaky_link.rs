//! A loopback TCP proxy whose link can go down without a word, for `bench fleet`'s
//! flapping host.
//!
//! It owns one thing: forwarding bytes between a client and one target address
//! while the link is up, and holding them while it is down. Down means what a
//! radio or cable outage looks like to both ends when nothing on the path loses
//! the connection's state: no byte moves either way, and no RST or FIN is ever
//! sent (a connection is closed only when one of its ends closes it, or when the
//! proxy is dropped). Bytes already read when the link went down are delivered
//! when it comes back, in order, as TCP's retransmissions would deliver them; a
//! connection opened while it is down is accepted and reaches the target only
//! once the link is up again. What the link does to the loader (a COPY that
//! stalls, then resumes) is the bench's to measure; the schedule of the flaps is
//! [`FlapCycle`], a pure function of the time elapsed.
//!
//! A link that comes back with its old connections dead (a middlebox that lost
//! their state) is a different failure, noticed by the loader's own timeouts; it
//! is not what this proxy models.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of the link, as every connection's pumps see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down,
    /// The proxy was dropped: every task ends, closing its sockets.
    Closed,
}

/// A proxy on 127.0.0.1 in front of `target`; its link starts up.
pub struct FlakyLink {
    addr: SocketAddr,
    link: watch::Sender<Link>,
}

impl FlakyLink {
    /// Binds a free loopback port and starts forwarding to `target` on the
    /// current tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<FlakyLink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, state) = watch::channel(Link::Up);
        tokio::spawn(accept_loop(listener, target, state));
        Ok(FlakyLink { addr, link })
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets bytes through (`true`) or holds them (`false`).
    pub fn set_up(&self, up: bool) {
        let next = if up { Link::Up } else { Link::Down };
        self.link.send_if_modified(|now| {
            let changed = *now != next && *now != Link::Closed;
            if changed {
                *now = next;
            }
            changed
        });
    }
}

impl Drop for FlakyLink {
    fn drop(&mut self) {
        self.link.send_replace(Link::Closed);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mut state: watch::Receiver<Link>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = wait_closed(&mut state) => return,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, say: the client sees a refused connection,
            // like any other failure to reach the server.
            continue;
        };
        tokio::spawn(forward(client, target, state.clone()));
    }
}

/// One connection: waits for the link, connects to the target, pumps both ways.
async fn forward(client: TcpStream, target: SocketAddr, mut state: watch::Receiver<Link>) {
    if wait_up(&mut state).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        // Dropping the client closes it: the target itself refused, which a
        // client must see as it would without the proxy.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    tokio::join!(
        pump(client_rx, server_tx, state.clone()),
        pump(server_rx, client_tx, state),
    );
}

/// Copies `from` to `to`, never moving a byte while the link is down; passes
/// an end of stream on as a FIN, and ends when the proxy closes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut state: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if wait_up(&mut state).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = wait_closed(&mut state) => return,
        };
        // Read just before the link went down: held until it is up again.
        if wait_up(&mut state).await.is_err() {
            return;
        }
        let written = tokio::select! {
            w = to.write_all(&buf[..n]) => w,
            _ = wait_closed(&mut state) => return,
        };
        if written.is_err() {
            return;
        }
    }
}

/// Waits until the link is up; `Err` once the proxy is closed.
async fn wait_up(state: &mut watch::Receiver<Link>) -> Result<(), ()> {
    match state.wait_for(|l| *l != Link::Down).await {
        Ok(l) if *l == Link::Up => Ok(()),
        _ => Err(()),
    }
}

async fn wait_closed(state: &mut watch::Receiver<Link>) {
    let _ = state.wait_for(|l| *l == Link::Closed).await;
}

/// A link that is up for `up`, then down for `down`, over and over, starting up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapCycle {
    pub up: Duration,
    pub down: Duration,
}

impl FlapCycle {
    /// Parses `UP,DOWN` in seconds (e.g. `5,3`); `off` is no flapping.
    pub fn parse(text: &str) -> Result<Option<FlapCycle>, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let secs = |s: &str| -> Result<Duration, String> {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a number of seconds"))?;
            if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                return Err(format!("{s:?}: seconds must be in (0, 3600]"));
            }
            Ok(Duration::from_secs_f64(v))
        };
        match text.split_once(',') {
            Some((up, down)) => Ok(Some(FlapCycle {
                up: secs(up)?,
                down: secs(down)?,
            })),
            None => Err(format!("{text:?}: give UP,DOWN seconds (e.g. 5,3) or off")),
        }
    }

    /// Whether the link is up `elapsed` after the cycle started.
    pub fn is_up(&self, elapsed: Duration) -> bool {
        let period = (self.up + self.down).as_nanos();
        elapsed.as_nanos() % period < self.up.as_nanos()
    }

    /// Time from `elapsed` to the next switch of the link.
    pub fn until_switch(&self, elapsed: Duration) -> Duration {
        let period = (self.up + self.down).as_nanos();
        let into = elapsed.as_nanos() % period;
        let up = self.up.as_nanos();
        let left = if into < up { up - into } else { period - into };
        Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))
    }

    /// How long the link is down within `[from, to)` of the cycle's time.
    pub fn down_within(&self, from: Duration, to: Duration) -> Duration {
        let mut down = Duration::ZERO;
        let mut t = from;
        while t < to {
            let next = (t + self.until_switch(t)).min(to);
            if !self.is_up(t) {
                down += next - t;
            }
            t = next;
        }
        down
    }
}

/// Switches `link` by `cycle` from now until the task is aborted; whoever
/// aborts it sets the link as it should stay.
pub async fn flap(link: std::sync::Arc<FlakyLink>, cycle: FlapCycle) {
    let start = tokio::time::Instant::now();
    loop {
        let elapsed = start.elapsed();
        link.set_up(cycle.is_up(elapsed));
        tokio::time::sleep(cycle.until_switch(elapsed)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_cycle_is_up_then_down_and_repeats() {
        let c = FlapCycle {
            up: Duration::from_secs(5),
            down: Duration::from_secs(3),
        };
        let at = |ms| Duration::from_millis(ms);
        assert!(c.is_up(at(0)));
        assert!(c.is_up(at(4_999)));
        assert!(!c.is_up(at(5_000)));
        assert!(!c.is_up(at(7_999)));
        assert!(c.is_up(at(8_000)));
        assert!(!c.is_up(at(13_500)));
        assert_eq!(c.until_switch(at(0)), at(5_000));
        assert_eq!(c.until_switch(at(6_000)), at(2_000));
        assert_eq!(c.until_switch(at(8_000)), at(5_000));
        // Two whole cycles and 1 s of a third's downtime.
        assert_eq!(c.down_within(at(0), at(22_000)), at(7_000));
        assert_eq!(c.down_within(at(6_000), at(7_000)), at(1_000));
        assert_eq!(c.down_within(at(1_000), at(1_000)), Duration::ZERO);
    }

    #[test]
    fn a_flap_is_given_as_up_and_down_seconds_or_off() {
        assert_eq!(
            FlapCycle::parse("5,3"),
            Ok(Some(FlapCycle {
                up: Duration::from_secs(5),
                down: Duration::from_secs(3)
            }))
        );
        assert_eq!(
            FlapCycle::parse(" 0.5 , 2.25 ").map(|c| c.map(|c| c.down)),
            Ok(Some(Duration::from_millis(2250)))
        );
        assert_eq!(FlapCycle::parse("OFF"), Ok(None));
        for bad in ["5", "5,", "5,0", "-1,3", "x,3", "5,3,1", "5,inf"] {
            assert!(FlapCycle::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// A loopback server that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Reads exactly `want` bytes, or what arrived within `limit`.
    async fn read_for(s: &mut TcpStream, want: usize, limit: Duration) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 1024];
        while got.len() < want {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        got
    }

    /// A proxy to an echo server, and a connection through it that has carried
    /// `first` there and back.
    async fn echoing_link(first: &[u8]) -> (FlakyLink, TcpStream) {
        let link = FlakyLink::start(echo_server().await).await.expect("proxy");
        let mut s = TcpStream::connect(link.addr()).await.expect("connect");
        s.write_all(first).await.expect("write");
        assert_eq!(
            read_for(&mut s, first.len(), Duration::from_secs(5)).await,
            first
        );
        (link, s)
    }

    /// Asserts that not a byte arrives on `s` within 300 ms.
    async fn assert_nothing_arrives(s: &mut TcpStream) {
        let got = read_for(s, 1, Duration::from_millis(300)).await;
        assert!(got.is_empty(), "{got:?} arrived");
    }

    #[tokio::test]
    async fn bytes_wait_while_the_link_is_down_and_arrive_in_order_when_it_comes_back() {
        let (link, mut s) = echoing_link(b"hello").await;

        link.set_up(false);
        s.write_all(b"held-").await.expect("write");
        s.write_all(b"bytes").await.expect("write");
        // Nothing comes back while the link is down (and no reset either:
        // the read would then return at once with an error or 0).
        assert_nothing_arrives(&mut s).await;

        link.set_up(true);
        assert_eq!(
            read_for(&mut s, 10, Duration::from_secs(5)).await,
            b"held-bytes"
        );
    }

    #[tokio::test]
    async fn a_connection_opened_while_the_link_is_down_is_held_not_refused() {
        let link = FlakyLink::start(echo_server().await).await.expect("proxy");
        link.set_up(false);
        let mut s = TcpStream::connect(link.addr())
            .await
            .expect("accepted while down");
        s.write_all(b"ping").await.expect("write");
        assert_nothing_arrives(&mut s).await;
        link.set_up(true);
        assert_eq!(read_for(&mut s, 4, Duration::from_secs(5)).await, b"ping");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let (link, mut s) = echoing_link(b"x").await;
        link.set_up(false);
        drop(link);
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "still open after {:?}: {r:?}",
            started.elapsed()
        );
    }
}
