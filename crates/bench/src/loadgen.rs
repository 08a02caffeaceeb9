//! The HTTP/1.1 load generator of `bench e2e`: keep-alive connections over tokio
//! `TcpStream`s, driven open loop (a fixed request rate) or closed loop (as fast as
//! the service answers).
//!
//! It owns two things. First, a pure parser of one HTTP/1.1 response from the
//! front of a byte buffer ([`parse_response`]: complete, incomplete, or an error;
//! `Content-Length` and chunked bodies), so the wire handling can be tested
//! without a socket. Second, the two drivers and what they promise about their
//! measurements:
//!
//! - [`open_loop`]: request *i* is *scheduled* at `t0 + i / rate` by a pacer on its
//!   own OS thread (tokio's timer wheel ticks in whole milliseconds, too coarse at
//!   1,000+ requests/s), handed to whichever connection is free, and its latency is
//!   measured from its scheduled time, not from when a connection got round to
//!   sending it. A slow response therefore charges every request queued behind it
//!   (no coordinated omission); how late requests left the client is reported on
//!   its own (`send_delay_ns`) so a saturated client is visible as such.
//! - [`closed_loop`]: every connection sends its next request as soon as the
//!   previous response arrived; latency is send → response.
//!
//! Every response's status is checked: a non-2xx status, a malformed response or a
//! broken connection is counted as an error (the connection is re-opened and the
//! run goes on), and the caller fails the case if any occurred. What the requests
//! contain is the caller's ([`RequestSource`]); so is the meaning of the numbers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest response head (status line + headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// A run stops early after this many errors: the case is failed anyway, and a
/// dead service should not be hammered for the rest of the window.
const MAX_ERRORS: u64 = 100;

/// One parsed response at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the buffer this response occupies (head + body).
    pub len: usize,
    /// The server will close the connection after it (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// What the front of the buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Complete(Response),
    /// More bytes are needed.
    Incomplete,
}

/// A response the client cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed status line {0:?}")]
    StatusLine(String),
    #[error("malformed header line {0:?}")]
    Header(String),
    #[error("response head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    #[error("response has neither Content-Length nor chunked encoding")]
    NoLength,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one HTTP/1.x response from the front of `buf`.
pub fn parse_response(buf: &[u8]) -> Result<Parsed, HttpError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLong);
        }
        return Ok(Parsed::Incomplete);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HttpError::StatusLine(String::from_utf8_lossy(&buf[..head_end]).into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let bad_status = || HttpError::StatusLine(status_line.to_string());
    let (version, rest) = status_line.split_once(' ').ok_or_else(bad_status)?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad_status()),
    };
    let code = rest.get(..3).ok_or_else(bad_status)?;
    let status: u16 = code.parse().map_err(|_| bad_status())?;
    if !(100..=999).contains(&status) || rest.as_bytes().get(3).is_some_and(|&b| b != b' ') {
        return Err(bad_status());
    }

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Header(line.to_string()))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .map_err(|_| HttpError::Header(line.to_string()))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body_start = head_end + 4;
    // 1xx, 204 and 304 have no body whatever the headers say (RFC 9112 §6.3).
    let no_body = status < 200 || status == 204 || status == 304;
    let end = if no_body {
        Some(body_start)
    } else if chunked {
        chunked_end(buf, body_start)?
    } else if let Some(n) = content_length {
        let end = body_start.checked_add(n).ok_or(HttpError::NoLength)?;
        (buf.len() >= end).then_some(end)
    } else {
        return Err(HttpError::NoLength);
    };
    Ok(match end {
        Some(len) => Parsed::Complete(Response { status, len, close }),
        None => Parsed::Incomplete,
    })
}

/// The end of a chunked body starting at `at`, if all of it is in `buf`.
fn chunked_end(buf: &[u8], mut at: usize) -> Result<Option<usize>, HttpError> {
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + eol])
            .map_err(|_| HttpError::Chunk("size line is not text"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Chunk("size is not hexadecimal"))?;
        at += eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        let data_end = at
            .checked_add(size)
            .and_then(|e| e.checked_add(2))
            .ok_or(HttpError::Chunk("size overflows"))?;
        if buf.len() < data_end {
            return Ok(None);
        }
        if &buf[data_end - 2..data_end] != b"\r\n" {
            return Err(HttpError::Chunk("chunk data not followed by CRLF"));
        }
        at = data_end;
    }
}

/// Builds the bytes of request number `id` (each request gets a fresh id).
pub type RequestSource = Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

/// One keep-alive connection; re-opened after the server closes it or an error.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let mut c = Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        };
        c.connect().await?;
        Ok(c)
    }

    async fn connect(&mut self) -> std::io::Result<()> {
        self.buf.clear();
        let stream = TcpStream::connect(self.addr).await?;
        // Requests are one small write each; Nagle would hold them for the ACK.
        stream.set_nodelay(true)?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Sends `request` and reads its response; returns the status.
    async fn exchange(&mut self, request: &[u8]) -> Result<u16, String> {
        let result = self.exchange_inner(request).await;
        if result.is_err() {
            // Whatever is left on this connection cannot be trusted.
            self.stream = None;
        }
        result
    }

    async fn exchange_inner(&mut self, request: &[u8]) -> Result<u16, String> {
        if self.stream.is_none() {
            self.connect()
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no connection".into());
        };
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("sending a request: {e}"))?;
        loop {
            match parse_response(&self.buf).map_err(|e| e.to_string())? {
                Parsed::Complete(r) => {
                    self.buf.drain(..r.len);
                    if r.close {
                        self.stream = None;
                    }
                    return Ok(r.status);
                }
                Parsed::Incomplete => {}
            }
            self.buf.reserve(4096);
            let n = stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("reading a response: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection mid-response".into());
            }
        }
    }
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct RunResult {
    /// Latency of each request of the measured window, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Open loop only: for each measured request, how long after its scheduled
    /// time it was sent (pacer lateness + waiting for a free connection).
    pub send_delay_ns: Vec<u64>,
    /// The measured window. Open loop: from the first scheduled request of the
    /// window to the last response, at least the window asked for.
    pub window: Duration,
    /// Requests answered with a 2xx status, warm-up included.
    pub ok: u64,
    /// Requests that failed (status, I/O, malformed response), warm-up included.
    pub errors: u64,
    /// The first error seen.
    pub first_error: Option<String>,
    /// When the last response of the run arrived.
    pub last_response: Option<Instant>,
}

impl RunResult {
    fn merge(&mut self, other: WorkerTally) {
        self.latencies_ns.extend(other.latencies_ns);
        self.send_delay_ns.extend(other.send_delay_ns);
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_response = self.last_response.max(other.last_response);
    }

    /// Requests per second over the measured window.
    pub fn per_sec(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.latencies_ns.len() as f64 / secs
        } else {
            0.0
        }
    }
}

#[derive(Default)]
struct WorkerTally {
    latencies_ns: Vec<u64>,
    send_delay_ns: Vec<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last_response: Option<Instant>,
}

impl WorkerTally {
    /// Counts one exchange; false when the run should stop (too many errors).
    fn count(&mut self, outcome: Result<u16, String>, errors: &AtomicU64) -> bool {
        let message = match outcome {
            Ok(status) if (200..300).contains(&status) => {
                self.ok += 1;
                return errors.load(Ordering::Relaxed) < MAX_ERRORS;
            }
            Ok(status) => format!("HTTP status {status}"),
            Err(e) => e,
        };
        self.errors += 1;
        self.first_error.get_or_insert(message);
        errors.fetch_add(1, Ordering::Relaxed) + 1 < MAX_ERRORS
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn open_all(addr: SocketAddr, n: usize) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(
            Conn::open(addr)
                .await
                .map_err(|e| format!("cannot connect to the service at {addr}: {e}"))?,
        );
    }
    Ok(conns)
}

/// An open-loop run: `rate` requests/s for `warmup` + `window`, over
/// `connections` keep-alive connections; only requests scheduled inside the window
/// are measured. Must run inside a tokio runtime.
pub async fn open_loop(
    addr: SocketAddr,
    requests: RequestSource,
    ids: Arc<AtomicU64>,
    rate: f64,
    connections: usize,
    warmup: Duration,
    window: Duration,
) -> Result<RunResult, String> {
    if rate.is_nan() || rate <= 0.0 {
        return Err(format!("request rate {rate} must be positive"));
    }
    let conns = open_all(addr, connections.max(1)).await?;
    let total = ((warmup + window).as_secs_f64() * rate).floor() as u64;
    let t0 = Instant::now() + Duration::from_millis(10);
    let measure_from = t0 + warmup;
    let schedule = move |i: u64| t0 + Duration::from_secs_f64(i as f64 / rate);

    // The pacer: a plain thread sleeping with nanosleep precision, handing out
    // request numbers when they fall due.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pacer_stop = stop.clone();
    let pacer = std::thread::Builder::new()
        .name("e2e-pacer".into())
        .spawn(move || {
            for i in 0..total {
                if pacer_stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = schedule(i);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if tx.send(i).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the pacer thread: {e}"))?;

    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let rx = rx.clone();
        let requests = requests.clone();
        let ids = ids.clone();
        let errors = errors.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = WorkerTally::default();
            loop {
                // One connection at a time waits on the queue (FIFO lock), so
                // tickets go to connections in the order they became free.
                let Some(i) = rx.lock().await.recv().await else {
                    break;
                };
                let due = schedule(i);
                let sent = Instant::now();
                let request = requests(ids.fetch_add(1, Ordering::Relaxed));
                let outcome = conn.exchange(&request).await;
                let done = Instant::now();
                let measured =
                    due >= measure_from && outcome.as_ref().is_ok_and(|s| (200..300).contains(s));
                if measured {
                    tally
                        .latencies_ns
                        .push(nanos(done.saturating_duration_since(due)));
                    tally
                        .send_delay_ns
                        .push(nanos(sent.saturating_duration_since(due)));
                }
                tally.last_response = Some(done);
                if !tally.count(outcome, &errors) {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
            tally
        }));
    }
    let mut result = gather(tasks, window).await?;
    // The window runs until the last of its requests was answered: a service
    // that falls behind the schedule shows a rate below the target.
    if let Some(last) = result.last_response {
        result.window = result
            .window
            .max(last.saturating_duration_since(measure_from));
    }
    // Workers that stopped early dropped nothing the pacer still needs; tell it.
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    pacer
        .join()
        .map_err(|_| "the pacer thread panicked".to_string())?;
    Ok(result)
}

/// A closed-loop run: each of `connections` connections sends its next request
/// when the previous response arrived, for `warmup` + `window`; requests sent and
/// answered inside the window are measured.
pub async fn closed_loop(
    addr: SocketAddr,
    requests: RequestSource,
    ids: Arc<AtomicU64>,
    connections: usize,
    warmup: Duration,
    window: Duration,
) -> Result<RunResult, String> {
    let conns = open_all(addr, connections.max(1)).await?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let requests = requests.clone();
        let ids = ids.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = WorkerTally::default();
            loop {
                let request = requests(ids.fetch_add(1, Ordering::Relaxed));
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = conn.exchange(&request).await;
                let done = Instant::now();
                let ok = outcome.as_ref().is_ok_and(|s| (200..300).contains(s));
                if ok && sent >= measure_from && done <= end {
                    tally.latencies_ns.push(nanos(done - sent));
                }
                tally.last_response = Some(done);
                if !tally.count(outcome, &errors) {
                    break;
                }
            }
            tally
        }));
    }
    gather(tasks, window).await
}

/// Waits for every connection's task and adds up their tallies.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<WorkerTally>>,
    window: Duration,
) -> Result<RunResult, String> {
    let mut result = RunResult {
        window,
        ..RunResult::default()
    };
    for t in tasks {
        let tally = t.await.map_err(|e| format!("a load task failed: {e}"))?;
        result.merge(tally);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The first error a test server's task hit.
    type ServerError = Arc<Mutex<Option<String>>>;

    fn fresh_ids() -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(0))
    }

    fn complete(buf: &[u8]) -> Response {
        match parse_response(buf) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("expected a complete response, got {other:?}"),
        }
    }

    #[test]
    fn a_response_with_content_length_is_complete_only_with_its_whole_body() {
        let r = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            complete(r),
            Response {
                status: 201,
                len: r.len(),
                close: false
            }
        );
        for cut in 0..r.len() {
            assert_eq!(
                parse_response(&r[..cut]),
                Ok(Parsed::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn bytes_after_a_response_are_left_for_the_next_one() {
        let mut two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let first = two.len();
        two.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(complete(&two).len, first);
        assert_eq!(complete(&two[first..]).status, 404);
    }

    #[test]
    fn a_chunked_body_ends_after_the_zero_chunk_and_trailers() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nT: v\r\n\r\n";
        assert_eq!(complete(r).len, r.len());
        for cut in 0..r.len() {
            assert_eq!(
                parse_response(&r[..cut]),
                Ok(Parsed::Incomplete),
                "cut at {cut}"
            );
        }
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwikiXX0\r\n\r\n";
        assert!(matches!(parse_response(bad), Err(HttpError::Chunk(_))));
    }

    #[test]
    fn connection_close_and_http10_mark_the_connection_as_closing() {
        let r = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(complete(r).close);
        let r = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(complete(r).close);
        let r = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert!(!complete(r).close);
    }

    #[test]
    fn no_content_status_needs_no_length_but_others_do() {
        assert_eq!(complete(b"HTTP/1.1 204 No Content\r\n\r\n").status, 204);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),
            Err(HttpError::NoLength)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(HttpError::StatusLine(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 2x1 OK\r\n\r\n"),
            Err(HttpError::StatusLine(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n"),
            Err(HttpError::Header(_))
        ));
        assert_eq!(
            parse_response(&[b'a'; MAX_HEAD + 1]),
            Err(HttpError::HeadTooLong)
        );
    }

    /// A minimal keep-alive server answering every request with `status`, closing
    /// the connection after `close_after` responses (0: never).
    async fn tiny_server(
        status: u16,
        close_after: usize,
        delay: Duration,
    ) -> (SocketAddr, ServerError) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let error: ServerError = Arc::default();
        let err = error.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let err = err.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        // Requests carry Content-Length bodies; read head + body.
                        if let Some(h) = find(&buf, b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= h + 4 + len {
                                buf.drain(..h + 4 + len);
                                served += 1;
                                let close = close_after > 0 && served % close_after == 0;
                                tokio::time::sleep(delay).await;
                                let reply = format!(
                                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\n{}\r\nok",
                                    if close { "connection: close\r\n" } else { "" }
                                );
                                if s.write_all(reply.as_bytes()).await.is_err() {
                                    return;
                                }
                                if close {
                                    return;
                                }
                                continue;
                            }
                        }
                        match s.read_buf(&mut buf).await {
                            Ok(0) => return,
                            Ok(_) => {}
                            Err(e) => {
                                err.lock().expect("lock").get_or_insert(e.to_string());
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, error)
    }

    fn requests() -> RequestSource {
        Arc::new(|i| {
            let body = format!("{{\"n\":{i}}}");
            format!(
                "POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
    }

    /// `open_loop` of the test requests at `rate` over `connections`.
    async fn open_loop_of(
        addr: SocketAddr,
        rate: f64,
        connections: usize,
        warmup: Duration,
        window: Duration,
    ) -> RunResult {
        open_loop(
            addr,
            requests(),
            fresh_ids(),
            rate,
            connections,
            warmup,
            window,
        )
        .await
        .expect("open loop")
    }

    /// `closed_loop` of the test requests over two connections, no warm-up.
    async fn closed_loop_on_two(addr: SocketAddr, window: Duration) -> RunResult {
        closed_loop(addr, requests(), fresh_ids(), 2, Duration::ZERO, window)
            .await
            .expect("closed loop")
    }

    #[tokio::test]
    async fn open_loop_sends_the_scheduled_number_of_requests_and_measures_the_window() {
        let (addr, err) = tiny_server(201, 7, Duration::ZERO).await;
        let r = open_loop_of(
            addr,
            500.0,
            4,
            Duration::from_millis(200),
            Duration::from_millis(400),
        )
        .await;
        assert_eq!(
            r.errors,
            0,
            "{:?} {:?}",
            r.first_error,
            err.lock().expect("lock")
        );
        assert_eq!(r.ok, 300, "0.6 s at 500/s");
        // Tickets scheduled in [0.2 s, 0.6 s): 200 of them.
        assert_eq!(r.latencies_ns.len(), 200);
        assert_eq!(r.send_delay_ns.len(), 200);
        assert!(r.last_response.is_some());
        assert!(r.window >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn open_loop_charges_queueing_behind_a_slow_server_to_the_latency() {
        // One connection, 10 ms per response, 200 requests/s wanted: the server
        // can answer 100/s, so requests queue and wait ever longer.
        let (addr, _) = tiny_server(201, 0, Duration::from_millis(10)).await;
        let r = open_loop_of(addr, 200.0, 1, Duration::ZERO, Duration::from_millis(500)).await;
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert_eq!(r.latencies_ns.len(), 100);
        let worst = r.latencies_ns.iter().copied().max().unwrap_or(0);
        // The 100th request is due at 0.495 s and answered at about 1 s: a
        // closed-loop measurement would have said 10 ms.
        assert!(worst > 400_000_000, "worst latency {worst} ns");
        assert!(
            r.window >= Duration::from_millis(900),
            "window {:?}",
            r.window
        );
        assert!(r.per_sec() < 120.0, "{} req/s", r.per_sec());
    }

    #[tokio::test]
    async fn closed_loop_counts_bad_statuses_as_errors_and_stops_early() {
        let (addr, _) = tiny_server(500, 0, Duration::ZERO).await;
        let r = closed_loop_on_two(addr, Duration::from_secs(5)).await;
        assert_eq!(r.ok, 0);
        assert!(r.errors >= MAX_ERRORS, "stopped after {} errors", r.errors);
        assert!(
            r.errors < MAX_ERRORS + 2,
            "two connections overshoot by at most one each"
        );
        assert_eq!(r.first_error.as_deref(), Some("HTTP status 500"));
        assert!(r.latencies_ns.is_empty());
    }

    #[tokio::test]
    async fn closed_loop_reconnects_when_the_server_closes_and_counts_no_error() {
        let (addr, _) = tiny_server(200, 3, Duration::ZERO).await;
        let r = closed_loop_on_two(addr, Duration::from_millis(200)).await;
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(r.ok > 10);
    }
}
