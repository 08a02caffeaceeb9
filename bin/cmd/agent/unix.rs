//! The agent's Unix-socket transport: accepting connections, reading request
//! lines, answering each once what its mode promises holds.
//!
//! Each connection has at most `max_in_flight` requests between "read" and
//! "answered": a permit is taken before the next line is read, so a client that
//! sends faster than the disk (or the database) takes finds the socket no longer
//! read, and the kernel's socket buffer, then its own `send`, blocks. Nothing
//! queues without bound. Async and sampled requests are recorded inline (a
//! memory copy into the segment), durable and sync ones in a task each so that
//! they share fsyncs and group commits; answers are therefore in completion
//! order, matched by `id`. An answer is written only after `record_with`
//! returned: inline answers by the reading task itself, gathered while more
//! whole requests are already buffered and written before it waits for the
//! socket again (one write per burst; a lone request's answer goes out with no
//! hop to another task); a task's answer by that task. A client that does not
//! read makes those writes block, and so the reading. On shutdown a connection stops reading, waits for its in-flight
//! requests, writes their answers and closes; a client that does not take
//! its answers within the drain grace (twice the sync timeout, plus 5 s) is
//! cut off, so that it cannot hold a shutdown.

use std::sync::Arc;

use auditwal::Mode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::protocol::{self, ErrorKind, Peer, Refusal};
use super::Agent;

/// Read buffer, and the most answers gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Accepts connections until `stop` turns true, then waits for every
/// connection to answer what it has in flight.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let for_connections = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, agent.clone(), for_connections.clone()));
                }
                Err(e) => {
                    // EMFILE and the like: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Returns once `stop` is true (at once if it already is).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, before any await.
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

/// One line read from a connection.
enum Frame {
    /// A whole line (without its `\n`) is in the buffer.
    Line,
    /// The line was over the limit; the buffer holds its first bytes only.
    TooLong,
    Eof,
}

/// Reads up to the next `\n`, keeping at most `limit` bytes of it in `buf`.
async fn read_frame(
    reader: &mut BufReader<OwnedReadHalf>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Frame> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Frame::TooLong,
                (false, true) => Frame::Eof,
                // A last line without its newline still counts.
                (false, false) => Frame::Line,
            });
        }
        let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        if chunk.len() > room {
            too_long = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            return Ok(if too_long {
                Frame::TooLong
            } else {
                Frame::Line
            });
        }
    }
}

async fn connection(stream: UnixStream, agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer::Unix {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials; closing the connection");
            return;
        }
    };
    let (read_half, mut write_half) = stream.into_split();
    if let Peer::Unix { uid, .. } = peer {
        if !agent.allows_uid(uid) {
            let refusal = Refusal::new(
                ErrorKind::Forbidden,
                None,
                format!("uid {uid} is not allowed to send to this agent (--allow-uid)"),
            );
            let mut line = protocol::error_answer(&protocol::RequestId::null(), &refusal);
            line.push('\n');
            let _ = write_half.write_all(line.as_bytes()).await;
            tracing::warn!(uid, "refused a connection from a uid not on the allow-list");
            return;
        }
    }
    let in_flight = agent.max_in_flight;
    let out = Arc::new(AnswerSink::new(write_half));
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut reader = BufReader::with_capacity(WRITE_BATCH_BYTES, read_half);
    let mut buf = Vec::with_capacity(1024);
    // Answers of the requests recorded inline, written in one go when no
    // further whole request is buffered: one write per burst, and for a lone
    // request one write from this task, with no hop to another.
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let more_buffered = reader.buffer().contains(&b'\n');
        if !pending.is_empty() && (!more_buffered || pending.len() >= WRITE_BATCH_BYTES) {
            let ok = out
                .write_bounded(&pending, &mut stop, agent.drain_grace)
                .await;
            pending.clear();
            if !ok {
                break;
            }
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let frame = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            frame = read_frame(&mut reader, &mut buf, agent.line_limit) => frame,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "reading from a client");
                break;
            }
        };
        match frame {
            Frame::Eof => break,
            Frame::TooLong => {
                let id = protocol::id_from_prefix(&buf).unwrap_or_else(protocol::RequestId::null);
                let refusal = Refusal::new(
                    ErrorKind::TooLarge,
                    Some("line"),
                    format!(
                        "request line is over the limit of {} bytes",
                        agent.line_limit
                    ),
                );
                push_line(&mut pending, &protocol::error_answer(&id, &refusal));
            }
            Frame::Line if buf.iter().all(u8::is_ascii_whitespace) => {}
            Frame::Line => {
                let (id, request) =
                    protocol::parse_socket_request(&buf, agent.max_event_bytes, peer);
                let request = match request {
                    Ok(r) => r,
                    Err(refusal) => {
                        push_line(&mut pending, &protocol::error_answer(&id, &refusal));
                        continue;
                    }
                };
                let mode = request.mode.unwrap_or(agent.default_mode);
                if matches!(mode, Mode::Async | Mode::Sampled) {
                    push_line(&mut pending, &agent.answer(&id, request).await);
                } else {
                    let (agent, out) = (agent.clone(), out.clone());
                    tokio::spawn(async move {
                        let mut answer = agent.answer(&id, request).await;
                        answer.push('\n');
                        // A failed write means the client is gone; the event is
                        // recorded all the same.
                        out.write(answer.as_bytes()).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    // Answer what was read, and wait for the requests still in flight, so
    // that their answers go out; but not for ever: a client that reads none of
    // its answers would hold the connection, and a shutdown, as long as it likes.
    let drained = tokio::time::timeout(agent.drain_grace, async {
        if !pending.is_empty() {
            out.write(&pending).await;
        }
        let _ = permits.acquire_many(in_flight as u32).await;
        out.shutdown().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace = ?agent.drain_grace,
            "closing a connection whose client did not take its answers in time"
        );
    }
}

fn push_line(pending: &mut Vec<u8>, answer: &str) {
    pending.extend_from_slice(answer.as_bytes());
    pending.push(b'\n');
}

/// The connection's write half, shared by the reader (inline answers) and
/// the tasks of durable and sync requests. A write that blocks (the client
/// does not read) blocks its writer: that is the backpressure.
struct AnswerSink {
    out: tokio::sync::Mutex<OwnedWriteHalf>,
    broken: std::sync::atomic::AtomicBool,
}

impl AnswerSink {
    fn new(out: OwnedWriteHalf) -> Self {
        AnswerSink {
            out: tokio::sync::Mutex::new(out),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes `bytes` whole; false once the client is gone.
    async fn write(&self, bytes: &[u8]) -> bool {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) {
            return false;
        }
        let mut out = self.out.lock().await;
        if let Err(e) = out.write_all(bytes).await {
            tracing::debug!(error = %e, "a client went away before its answers");
            self.broken.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// [`write`](Self::write), whose wait is bounded by `grace` once `stop`
    /// is set (before it, waiting is the backpressure of a slow reader).
    async fn write_bounded(
        &self,
        bytes: &[u8],
        stop: &mut watch::Receiver<bool>,
        grace: std::time::Duration,
    ) -> bool {
        let write = self.write(bytes);
        tokio::pin!(write);
        tokio::select! {
            biased;
            written = &mut write => return written,
            () = stopped(stop) => {}
        }
        tokio::time::timeout(grace, write).await.unwrap_or(false)
    }

    async fn shutdown(&self) {
        let _ = self.out.lock().await.shutdown().await;
    }
}
