//! The shortener service, runnable with one command:
//! `cargo run --release --example shortener`.
//!
//! This file owns the process around `app`: it finds a database (a throwaway
//! PostgreSQL, or `DATABASE_URL`), opens the `AuditLog` from the usual `AUDIT_*`
//! and `AUDITWAL_*` settings with a WAL in a temp dir unless one is named, runs
//! the loader as a background task so the async rows reach the database, serves
//! the app on a loopback address, and shuts down in the order that loses
//! nothing: stop serving, close the log (fsync), load the WAL to its end, stop
//! the loader, stop the database. What is audited how is app.rs's business.

use shortener_app as app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use auditwal::loader::{Loader, LoaderConfig};
use auditwal::{AuditLog, Config};
use auditwal_test_support::{Cluster, ClusterError, ClusterOptions};
use clap::Parser;

use app::UserAudit;

#[derive(Parser)]
#[command(
    name = "shortener",
    about = "A URL shortener whose user endpoints are audited in AUDIT_MODE and admin endpoints in sync mode",
    after_help = "Environment: DATABASE_URL (else a throwaway PostgreSQL is started), AUDITWAL_WAL_DIR \
(else a temp dir), AUDIT_MODE (async by default) and every other AUDIT_*/AUDITWAL_* setting of \
docs/modes.md, PORT (when --addr is not given).\n\
Exit codes: 0 clean shutdown, 2 bad usage or configuration (or PostgreSQL missing), 3 runtime failure."
)]
struct Args {
    /// Loopback address to serve on (default 127.0.0.1:8080, or 127.0.0.1:$PORT).
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// How the user endpoints are audited: off, sync, durable, async, sampled
    /// (default: the configured audit_mode, AUDIT_MODE). Admin endpoints are
    /// always sync.
    #[arg(long)]
    user_audit: Option<UserAudit>,
}

/// A failure and the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 3, error }
    }
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("shortener: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn run(args: Args) -> Result<(), Failure> {
    let addr = listen_addr(args.addr).map_err(usage)?;
    let env_url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    // Started before the runtime: Cluster::start blocks while initdb runs.
    let cluster = match env_url {
        Some(_) => None,
        None => {
            eprintln!(
                "shortener: starting a throwaway PostgreSQL (initdb + pg_ctl in a temp dir)..."
            );
            let cluster = Cluster::start(ClusterOptions::default()).map_err(|e| match e {
                e @ (ClusterError::NotInstalled | ClusterError::NoPostgresUser) => {
                    usage(anyhow!(e).context("set DATABASE_URL to use an existing server"))
                }
                e => Failure::from(anyhow!(e).context("starting the throwaway PostgreSQL")),
            })?;
            eprintln!(
                "shortener: PostgreSQL is up on 127.0.0.1:{}",
                cluster.port()
            );
            Some(cluster)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(addr, args.user_audit, cluster.as_ref()));
    drop(runtime);
    if let Some(cluster) = cluster {
        drop(cluster);
        eprintln!("shortener: the throwaway PostgreSQL was stopped and removed");
    }
    result
}

/// `--addr`, else 127.0.0.1:$PORT, else 127.0.0.1:8080; loopback only.
fn listen_addr(flag: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let addr = match flag {
        Some(a) => a,
        None => match std::env::var("PORT").ok().filter(|p| !p.is_empty()) {
            Some(p) => {
                let port: u16 = p
                    .parse()
                    .with_context(|| format!("PORT={p:?} is not a port number"))?;
                SocketAddr::from(([127, 0, 0, 1], port))
            }
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        },
    };
    if !addr.ip().is_loopback() {
        bail!("--addr {addr}: this example serves on loopback addresses only (127.0.0.1, ::1)");
    }
    Ok(addr)
}

async fn serve(
    addr: SocketAddr,
    user_audit: Option<UserAudit>,
    cluster: Option<&Cluster>,
) -> Result<(), Failure> {
    // Settings: the usual AUDIT_* / AUDITWAL_* variables; the code fills in
    // only what the environment leaves unset (a setter would override it).
    let mut builder = Config::builder().env();
    if let Some(cluster) = cluster {
        builder = builder.database_url(cluster.url());
    }
    let wal_tmp = match std::env::var("AUDITWAL_WAL_DIR")
        .ok()
        .filter(|d| !d.is_empty())
    {
        Some(_) => None,
        None => Some(tempfile::tempdir().context("creating a temp dir for the WAL")?),
    };
    if let Some(dir) = &wal_tmp {
        builder = builder.wal_dir(dir.path());
    }
    if std::env::var("AUDITWAL_STREAM").map_or(true, |s| s.is_empty()) {
        builder = builder.stream("shortener");
    }
    let config = builder.build().map_err(|e| usage(anyhow!(e)))?;
    let url = config
        .database_url
        .clone()
        .ok_or_else(|| usage(anyhow!("no database: set DATABASE_URL")))?;
    let wal_dir: PathBuf = config
        .wal_dir
        .clone()
        .ok_or_else(|| usage(anyhow!("no WAL directory: set AUDITWAL_WAL_DIR")))?;
    let stream = config.stream.clone();
    let user_audit = user_audit.unwrap_or(UserAudit::Mode(config.mode));

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {}", auditwal::config::redact_url(&url)))?;
    auditwal::pg::migrate(&pool)
        .await
        .context("applying the migrations")?;

    let audit = Arc::new(
        AuditLog::open(config)
            .await
            .context("opening the audit log")?,
    );
    let first_lsn = audit.stats().wal.map_or(0, |w| w.written_lsn);

    let state = app::AppState::new(Some(audit.clone()), user_audit);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding {addr} (is another service on it? try --addr 127.0.0.1:0)")
    })?;
    let local = listener.local_addr().context("reading the bound address")?;

    // The loader (WAL → binary COPY → audit_events) runs beside the service,
    // in this task: its future is not `Send`, so it is joined, not spawned.
    let mut loader_config = LoaderConfig::new(&wal_dir, url.clone());
    loader_config.migrate = false;
    let loader = Loader::new(loader_config.clone());
    let loader_stop = loader.shutdown_handle();
    let service = async {
        print_ready(local, user_audit, &wal_dir, &stream);
        let served = axum::serve(
            listener,
            app::router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown_signal())
        .await;
        eprintln!(
            "shortener: stopped serving; closing the audit log and loading the rest of the WAL..."
        );
        // Graceful shutdown waited for the requests in flight: the counts are final.
        let stats = audit.stats();
        // Close the log: every appended record is fsynced and below the
        // durable watermark, so a loader may load all of it.
        let closed = audit.close().await;
        // Stop the tailing loader after its batch in flight...
        loader_stop.stop();
        (served, stats, closed)
    };
    let (tail, (served, stats, closed)) = tokio::join!(loader.run(), service);
    // ... and load once more, up to the end of the WAL.
    let mut drain = loader_config;
    drain.once = true;
    let drained = Loader::new(drain).run().await;

    let landed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE stream_id = $1 AND lsn > $2")
            .bind(&stream)
            .bind(i64::try_from(first_lsn).unwrap_or(i64::MAX))
            .fetch_one(&pool)
            .await
            .context("counting the loaded rows")?;
    let appended: u64 = [
        auditwal::Mode::Durable,
        auditwal::Mode::Async,
        auditwal::Mode::Sampled,
    ]
    .into_iter()
    .map(|m| stats.recorded.get(m))
    .sum();
    println!(
        "shortener: {landed} rows from this run's WAL stream {stream:?} are in audit_events \
         ({appended} events were appended); {} committed in sync mode; {} audit calls failed",
        stats.recorded.get(auditwal::Mode::Sync),
        stats.failed.total()
    );
    pool.close().await;

    served.context("serving HTTP")?;
    closed.context("closing the audit log")?;
    tail.context("the background loader failed")?;
    drained.context("loading the rest of the WAL")?;
    if landed < 0 || (landed as u64) < appended {
        return Err(
            anyhow!("{appended} events were appended but only {landed} rows landed").into(),
        );
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn print_ready(addr: SocketAddr, user_audit: UserAudit, wal_dir: &std::path::Path, stream: &str) {
    let base = format!("http://{addr}");
    println!(
        "shortener: serving on {base} (user endpoints audited: {user_audit}; admin: sync); \
         WAL stream {stream:?} in {}",
        wal_dir.display()
    );
    println!("Try:");
    println!(
        "  curl -si -X POST {base}/api/links -H 'content-type: application/json' -H 'x-request-id: r1' \
         -d '{{\"user\":\"u1\",\"url\":\"https://example.com/a\"}}'"
    );
    println!(
        "  curl -si -X POST {base}/api/links/bulk -d '{{\"user\":\"u1\",\"urls\":[\"https://example.com/b\",\"http://192.0.2.7/x\"]}}'"
    );
    println!("  curl -si {base}/CODE                      # 302 to the URL (a link to a bare IP is flagged: 403)");
    println!(
        "  curl -si -X POST {base}/api/bio/u1/reorder -d '{{\"order\":[\"CODE2\",\"CODE1\"]}}'"
    );
    println!(
        "  curl -si -X POST {base}/admin/links/CODE/override -d '{{\"admin\":\"a1\",\"reason\":\"reviewed\"}}'"
    );
    println!(
        "  curl -si -X POST {base}/admin/users/u1/disable -d '{{\"admin\":\"a1\",\"reason\":\"violated ToS\"}}'"
    );
    println!("  curl -s {base}/api/stats");
    println!("Ctrl-C stops it: the WAL is fsynced and loaded, then the row count is printed.");
}
