//! `auditwal agent`: a local daemon that records audit events for processes
//! written in any language, with the guarantees of the Rust API.
//!
//! It holds one [`AuditLog`] (so one WAL stream, `agent` unless `--stream` or
//! `AUDITWAL_STREAM` names another) and takes events over a Unix socket
//! (`unix.rs`, newline-delimited JSON with an `id` per request) and, when asked,
//! loopback HTTP (`http.rs`). The wire format is `protocol.rs`'s and
//! docs/agent.md's. The invariant: an answer is sent only after what its mode
//! promises holds (async: in the segment file; durable: fsynced; sync:
//! committed; sampled: kept and appended, or sampled out), so a client holding
//! an answer may exit at once and lose nothing. Modes, sampling, validation and
//! the WAL are the library's; this module owns the listeners, the peer's
//! identity, the shutdown order (stop accepting, answer what is in flight, close
//! the log, remove the socket), and the optional in-process loader (`--load`).

mod http;
mod protocol;
mod unix;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use auditwal::loader::{Loader, LoaderConfig};
use auditwal::{AuditLog, Config, Mode, Receipt};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::{CmdResult, Failure};
use protocol::{ErrorKind, Refusal, RequestId};

/// The socket's file name in the WAL dir when `--socket` is not given.
pub const DEFAULT_SOCKET_NAME: &str = "agent.sock";
/// The agent's stream when neither `--stream` nor `AUDITWAL_STREAM` names one.
pub const DEFAULT_STREAM: &str = "agent";

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
auditwal agent --wal-dir /var/lib/auditwal\n  \
auditwal agent --wal-dir /var/lib/auditwal --database-url postgres://127.0.0.1/audit --load\n  \
auditwal agent --wal-dir /var/lib/auditwal --http 127.0.0.1:8425\n\n\
Requests: one JSON object a line on the socket, {\"id\":1,\"mode\":\"async\",\"event\":{...}};\n\
or POST /v1/events?mode=MODE over HTTP. Each answer is sent only after what the mode\n\
promises holds. The other settings (AUDIT_MODE, AUDIT_SAMPLE_RATE, AUDITWAL_FSYNC_INTERVAL_MS,\n\
...) come from the environment as for the library. Once listening, one line per listener\n\
is printed on stdout: `socket PATH`, `http ADDR`. SIGTERM or SIGINT: stop accepting, answer\n\
what is in flight, fsync, remove the socket, exit 0. See docs/agent.md.")]
pub struct AgentArgs {
    /// The WAL directory; the agent writes one stream in it.
    #[arg(long, env = "AUDITWAL_WAL_DIR")]
    pub wal_dir: PathBuf,
    /// The Unix socket to listen on (default: agent.sock in the WAL dir).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Numeric uid to give the socket file (it is mode 0660).
    #[arg(long)]
    pub socket_owner: Option<u32>,
    /// Numeric gid to give the socket file, for the services allowed to send.
    #[arg(long)]
    pub socket_group: Option<u32>,
    /// Accept socket connections only from these uids (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
    /// Also serve HTTP on this loopback address (POST /v1/events).
    #[arg(long)]
    pub http: Option<String>,
    /// PostgreSQL for sync mode (and --load).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Also run the loader in this process (needs --database-url).
    #[arg(long)]
    pub load: bool,
    /// The stream name under the WAL dir (default: agent, or AUDITWAL_STREAM).
    #[arg(long)]
    pub stream: Option<String>,
    /// Requests read but not yet answered, per connection; past it the socket is not read.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
}

/// What the transports share: the log and the limits.
pub struct Agent {
    log: AuditLog,
    default_mode: Mode,
    max_event_bytes: usize,
    /// Longest request line: room for an event at the size limit with every
    /// byte escaped (`\u0000` is six), and the envelope.
    line_limit: usize,
    max_in_flight: usize,
    allow_uids: Vec<u32>,
    /// How long a closing connection waits for its in-flight requests to be
    /// answered and the answers taken: past every sync call's own timeout.
    drain_grace: std::time::Duration,
}

impl Agent {
    fn allows_uid(&self, uid: u32) -> bool {
        self.allow_uids.is_empty() || self.allow_uids.contains(&uid)
    }

    /// Records one request in its mode; `Ok` once the mode's promise holds.
    async fn record(&self, request: protocol::Request) -> Result<(Mode, Receipt), Refusal> {
        let mode = request.mode.unwrap_or(self.default_mode);
        let configured = self.log.config().sample_rate;
        if let Some(rate) = request.sample_rate.filter(|_| mode == Mode::Sampled) {
            if (rate - configured).abs() > f64::EPSILON {
                return Err(Refusal::new(
                    ErrorKind::InvalidRequest,
                    Some("sample_rate"),
                    format!(
                        "field `sample_rate`: the client expects {rate}, this agent samples at \
                         {configured}; set AUDIT_SAMPLE_RATE alike for both"
                    ),
                ));
            }
        }
        self.log
            .record_with(&request.event, mode)
            .await
            .map(|receipt| (mode, receipt))
            .map_err(|e| protocol::refusal_of(&e))
    }

    /// The answer line (without `\n`) to a request.
    async fn answer(&self, id: &RequestId, request: protocol::Request) -> String {
        match self.record(request).await {
            Ok((mode, receipt)) => protocol::receipt_answer(id, mode, &receipt),
            Err(refusal) => protocol::error_answer(id, &refusal),
        }
    }
}

/// Removes the socket file when the agent stops, whichever way.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the socket");
            }
        }
    }
}

pub fn run(args: AgentArgs) -> CmdResult {
    let http = args.http.as_deref().map(parse_http_addr).transpose()?;
    if args.load && args.database_url.is_none() {
        return Err(Failure::usage(anyhow!(
            "--load needs --database-url URL (or DATABASE_URL)"
        )));
    }
    if args.max_in_flight == 0 {
        return Err(Failure::usage(anyhow!(
            "--max-in-flight must be at least 1"
        )));
    }
    let mut builder = Config::builder().env().wal_dir(&args.wal_dir);
    if let Some(url) = &args.database_url {
        builder = builder.database_url(url);
    }
    match (&args.stream, std::env::var_os("AUDITWAL_STREAM")) {
        (Some(s), _) => builder = builder.stream(s),
        (None, None) => builder = builder.stream(DEFAULT_STREAM),
        (None, Some(_)) => {}
    }
    let config = builder
        .build()
        .map_err(|e| Failure::usage(anyhow!(e).context("agent configuration")))?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.wal_dir.join(DEFAULT_SOCKET_NAME));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, config, socket, http))
}

/// A loopback `ADDR:PORT`; anything else is refused (usage).
fn parse_http_addr(text: &str) -> Result<SocketAddr, Failure> {
    let addr: SocketAddr = text.parse().map_err(|e| {
        Failure::usage(anyhow!(
            "--http {text:?} is not an address like 127.0.0.1:8425 ({e})"
        ))
    })?;
    if !addr.ip().is_loopback() {
        return Err(Failure::usage(anyhow!(
            "--http {addr}: the agent serves HTTP only on a loopback address (127.0.0.0/8, ::1); \
             events from other hosts would arrive without TLS or a peer identity"
        )));
    }
    Ok(addr)
}

/// Binds the socket at `path`, replacing a stale one (no agent answers on it),
/// refusing when another agent listens there or the path is not a socket.
fn bind_socket(
    path: &Path,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<UnixListener, Failure> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Failure::usage(anyhow!(
                "--socket {}: the path exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Failure::runtime(anyhow!(
                "another agent is listening on {}; stop it first, or give --socket",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if owner.is_some() || group.is_some() {
        rustix::fs::chown(
            path,
            owner.map(rustix::fs::Uid::from_raw),
            group.map(rustix::fs::Gid::from_raw),
        )
        .map_err(std::io::Error::from)
        .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(listener)
}

async fn serve(
    args: AgentArgs,
    config: Config,
    socket: PathBuf,
    http: Option<SocketAddr>,
) -> CmdResult {
    let log = AuditLog::open(config).await.map_err(|e| match e {
        auditwal::AuditError::Config(_) => Failure::usage(anyhow!(e)),
        e => Failure::runtime(anyhow!(e).context("opening the audit log")),
    })?;
    let result = listen_until_signal(&args, &log, &socket, http).await;
    // Whatever happened above, what was appended gets its fsync.
    let closed = log.close().await;
    result?;
    closed.context("closing the audit log (final fsync)")?;
    tracing::info!("agent stopped");
    Ok(ExitCode::SUCCESS)
}

async fn listen_until_signal(
    args: &AgentArgs,
    log: &AuditLog,
    socket: &Path,
    http: Option<SocketAddr>,
) -> Result<(), Failure> {
    let max_event_bytes = log.config().max_event_bytes;
    let agent = Arc::new(Agent {
        log: log.clone(),
        default_mode: log.config().mode,
        max_event_bytes,
        line_limit: max_event_bytes.saturating_mul(6).saturating_add(4096),
        max_in_flight: args.max_in_flight,
        allow_uids: args.allow_uid.clone(),
        drain_grace: log.config().sync_timeout * 2 + std::time::Duration::from_secs(5),
    });
    // Installed before the socket exists: a SIGTERM that comes as soon as a
    // client can connect must already take the orderly way out.
    let signals = Signals::install();
    let listener = bind_socket(socket, args.socket_owner, args.socket_group)?;
    let socket_file = SocketFile(socket.to_path_buf());
    let (stop_tx, stop_rx) = watch::channel(false);
    let unix_task = tokio::spawn(unix::serve(listener, agent.clone(), stop_rx.clone()));
    println!("socket {}", socket.display());
    let http_task = match http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --http {addr}"))?;
            let bound = listener.local_addr().context("reading the HTTP address")?;
            println!("http {bound}");
            Some(tokio::spawn(http::serve(
                listener,
                agent.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let loader = match (&args.database_url, args.load) {
        (Some(url), true) => {
            let loader = Arc::new(Loader::new(LoaderConfig::new(&args.wal_dir, url)));
            let handle = loader.shutdown_handle();
            let task = tokio::spawn({
                let loader = loader.clone();
                async move { loader.run().await }
            });
            Some((handle, task))
        }
        _ => None,
    };
    tracing::info!(
        socket = %socket.display(),
        stream = %log.config().stream,
        mode = %log.config().mode,
        "agent listening"
    );
    signals.wait().await;
    let _ = stop_tx.send(true);
    if unix_task.await.is_err() {
        tracing::warn!("the socket listener ended abnormally");
    }
    drop(socket_file);
    if let Some(task) = http_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP listener failed"),
            Err(_) => tracing::warn!("the HTTP listener ended abnormally"),
        }
    }
    if let Some((handle, task)) = loader {
        handle.stop();
        match task.await {
            Ok(Ok(summary)) => tracing::info!(rows = summary.rows_loaded, "loader stopped"),
            Ok(Err(e)) => return Err(Failure::runtime(anyhow!(e).context("the loader failed"))),
            Err(e) => return Err(Failure::runtime(anyhow!("the loader task failed: {e}"))),
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT, caught from [`Signals::install`] on.
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Signals(Some((term, int))),
            _ => {
                tracing::warn!(
                    "cannot install signal handlers; SIGTERM will stop the agent abruptly"
                );
                Signals(None)
            }
        }
    }

    async fn wait(self) {
        let Some((mut term, mut int)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: answering what is in flight, then stopping"),
            _ = int.recv() => tracing::info!("SIGINT: answering what is in flight, then stopping"),
        }
    }
}
