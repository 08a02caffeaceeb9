//! A throwaway private PostgreSQL cluster, for tests, `auditwal demo` and the benches.
//!
//! [`Cluster::start`] runs `initdb` in a fresh temp dir and starts the server with
//! `pg_ctl` on a free port of 127.0.0.1 (the unix socket sits in the temp dir),
//! trust authentication, UTF8, C locale. As root it runs both as the `postgres`
//! system user, because PostgreSQL refuses to run as root. The one other address it
//! listens on is one a test asks for with [`ClusterOptions::network`]: an address
//! inside a network namespace the test created, the server started through a
//! command prefix (`ip netns exec NS`), so that the test can take the link down.
//!
//! The invariant this module keeps: **a server it started never outlives the
//! process that started it, and neither does its directory.** `Drop` stops the
//! server (`pg_ctl stop -m immediate`) and removes the directory; and since a test
//! process can be SIGKILLed, or keep a cluster in a `static` that is never dropped,
//! every cluster also has a *guardian*: a small `sh` in its own process group that
//! ignores SIGINT/SIGHUP/SIGTERM and blocks reading a pipe whose only write end this
//! process holds (close-on-exec, so no other child inherits it). When this process
//! exits for any reason, the kernel closes the pipe, the guardian reads EOF, stops
//! the server and removes the directory. It is started before `initdb`, so there is
//! no window in which a kill leaves anything behind.
//!
//! `fsync` is ON by default: the benches need honest commits. Tests turn it off
//! ([`ClusterOptions::for_tests`]): their clusters never survive an OS crash anyway,
//! and an immediate shutdown (`stop_immediate`) loses nothing with fsync off
//! because the data is still in the OS page cache.
//!
//! The API is blocking (it runs `initdb` and `pg_ctl`); it knows nothing about
//! databases, schemas or sqlx.

use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How many fresh ports to try when another process grabs ours between choosing it
/// and the server binding it.
const PORT_ATTEMPTS: usize = 8;

/// The superuser created by `initdb`, and the system user the server runs as when we
/// are root.
pub const SUPERUSER: &str = "postgres";

/// The guardian: waits for EOF on stdin (this process gone), then stops the server
/// and removes the directory. `$1` = the temp dir, `$2` = the data dir, `$3...` =
/// the command that runs pg_ctl (possibly through runuser).
const GUARDIAN_SCRIPT: &str = r#"root=$1; data=$2; shift 2
trap '' HUP INT TERM QUIT PIPE
cat >/dev/null 2>&1
"$@" stop -D "$data" -m immediate -w -t 20 >/dev/null 2>&1
rm -rf "$root"
"#;

/// Why a cluster could not be set up or controlled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in \
         /usr/lib/postgresql/*/bin: install them (`apt-get install -y postgresql`) \
         or set DATABASE_URL to use an existing server"
    )]
    NotInstalled,

    #[error("installing PostgreSQL with apt-get failed: {detail}")]
    InstallFailed { detail: String },

    #[error(
        "running as root, but there is no `postgres` system user to run the server as \
         (PostgreSQL refuses to run as root): create one (`useradd --system postgres`) \
         or install the Debian package postgresql"
    )]
    NoPostgresUser,

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("{what} failed ({status}): {output}")]
    CommandFailed {
        what: String,
        status: String,
        output: String,
    },

    #[error("the PostgreSQL server did not start on port {port}; server log:\n{log_tail}")]
    StartFailed { port: u16, log_tail: String },

    #[error("the shared test cluster could not be started: {0}")]
    SharedUnavailable(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Settings of a throwaway cluster. Defaults: fsync on, modest memory.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `fsync` (and `full_page_writes`). On by default: commits are honest.
    pub fsync: bool,
    /// Where to create the temp dir; default: the system temp dir. As root, the
    /// `postgres` user must be able to traverse it.
    pub base_dir: Option<PathBuf>,
    /// `max_connections`.
    pub max_connections: u32,
    /// `shared_buffers`, in MiB.
    pub shared_buffers_mb: u32,
    /// When the binaries are missing and we are root with apt-get: install the Debian
    /// package `postgresql` (once, under a file lock shared by parallel processes).
    pub install_if_missing: bool,
    /// Serve TLS (`ssl = on`) with a certificate for 127.0.0.1 from a throwaway CA, made by
    /// the `openssl` command; [`Cluster::tls_cert`] is the CA certificate (for
    /// `sslrootcert=` with `sslmode=verify-full`). For tests of TLS connections.
    pub tls: bool,
    /// Listen on an address of the caller's instead of a free port of 127.0.0.1.
    pub network: Option<ClusterNetwork>,
}

/// Where a cluster listens when not on loopback: for tests that run the server in a
/// network namespace of their own and cut the link to it.
#[derive(Debug, Clone)]
pub struct ClusterNetwork {
    /// The address the server listens on (inside the caller's namespace).
    pub listen: std::net::IpAddr,
    /// Its port (in a namespace of its own, any port is free).
    pub port: u16,
    /// The clients trusted in pg_hba.conf, as a CIDR (e.g. `10.200.7.0/30`).
    pub clients: String,
    /// The command prefix `pg_ctl start` runs under, e.g. `ip netns exec NS`: the
    /// server it forks stays in that namespace.
    pub wrapper: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            fsync: true,
            base_dir: None,
            max_connections: 200,
            shared_buffers_mb: 128,
            install_if_missing: true,
            tls: false,
            network: None,
        }
    }
}

impl ClusterOptions {
    /// For tests: fsync off (see the module comment for why that is safe here).
    pub fn for_tests() -> Self {
        ClusterOptions {
            fsync: false,
            ..ClusterOptions::default()
        }
    }
}

/// The PostgreSQL programs we run.
#[derive(Debug, Clone)]
struct PgBins {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// The uid/gid of the `postgres` system user, when we are root and must run the
/// server as it.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

struct Guardian {
    child: Child,
    /// The write end of the guardian's stdin; closing it (or this process exiting)
    /// sets the guardian off.
    pipe: Option<ChildStdin>,
}

/// A private PostgreSQL server in a temp dir. Stopped and removed on drop, or by its
/// guardian when this process exits without dropping it.
pub struct Cluster {
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    network: Option<ClusterNetwork>,
    bins: PgBins,
    run_as: Option<RunAs>,
    running: Mutex<bool>,
    guardian: Mutex<Option<Guardian>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The cluster shared by every test of this process ([`ClusterOptions::for_tests`]),
    /// started on first use. Never dropped: its guardian stops it when the process
    /// exits. Tests that stop or restart the server need a private [`Cluster::start`].
    pub fn shared() -> Result<&'static Cluster, ClusterError> {
        let slot = SHARED
            .get_or_init(|| Cluster::start(ClusterOptions::for_tests()).map_err(|e| e.to_string()));
        match slot {
            Ok(c) => Ok(c),
            Err(msg) => Err(ClusterError::SharedUnavailable(msg.clone())),
        }
    }

    /// initdb a fresh cluster in a new temp dir and start it on a free loopback port.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bins = find_or_install(opts.install_if_missing)?;
        let run_as = if rustix::process::geteuid().is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let base = opts.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let root = tempfile::Builder::new()
            .prefix("auditwal-pg-")
            .tempdir_in(&base)
            .map_err(io_err(format!(
                "cannot create a temp dir in {}",
                base.display()
            )))?
            .keep();
        let mut cluster = Cluster {
            data: root.join("data"),
            log: root.join("server.log"),
            root,
            port: 0,
            network: opts.network.clone(),
            bins,
            run_as,
            running: Mutex::new(false),
            guardian: Mutex::new(None),
        };
        // From here on, dropping `cluster` cleans up whatever exists.
        cluster.spawn_guardian()?;
        cluster.init(&opts)?;
        cluster.start_on_free_port()?;
        tracing::info!(
            port = cluster.port,
            dir = %cluster.root.display(),
            fsync = opts.fsync,
            "started a private PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// The loopback port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: 127.0.0.1, or [`ClusterNetwork::listen`].
    pub fn host(&self) -> std::net::IpAddr {
        self.network
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST.into(), |n| n.listen)
    }

    /// URL of database `dbname` over the server's unix socket: reachable whatever
    /// happens to the network (a test that cut the link administers through it).
    pub fn socket_url_for(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{}/{dbname}?host={}",
            self.port,
            self.root.join("sock").display()
        )
    }

    /// URL of the `postgres` database, as the superuser `postgres`.
    pub fn url(&self) -> String {
        self.url_for(SUPERUSER)
    }

    /// URL of database `dbname`, as the superuser `postgres`.
    pub fn url_for(&self, dbname: &str) -> String {
        // TLS is pointless on loopback and costs a round trip per connection.
        format!(
            "postgres://{SUPERUSER}@{}:{}/{dbname}?sslmode=disable",
            self.host(),
            self.port
        )
    }

    /// A program of the same PostgreSQL installation as the server (e.g. `psql`).
    pub fn program(&self, name: &str) -> PathBuf {
        match self.bins.initdb.parent() {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// The temp dir holding the data dir, the socket and the server log.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The server log (useful in a failing test's message).
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    pub fn is_running(&self) -> bool {
        *lock(&self.running)
    }

    /// Kills the server the way a crash would (`pg_ctl stop -m immediate`): no
    /// checkpoint, clients cut off mid-statement. The data dir stays.
    pub fn stop_immediate(&self) -> Result<(), ClusterError> {
        let mut running = lock(&self.running);
        if *running {
            self.pg_ctl_stop()?;
            *running = false;
        }
        Ok(())
    }

    /// Starts the server again on the same port and data dir (after
    /// [`Cluster::stop_immediate`]); it runs crash recovery first.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        let mut running = lock(&self.running);
        if !*running {
            self.pg_ctl_start(self.port)?;
            *running = true;
        }
        Ok(())
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", SUPERUSER, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        // As the postgres user, the caller's cwd (often /root) may be unreadable.
        cmd.current_dir(&self.root).stdin(Stdio::null());
        cmd
    }

    fn spawn_guardian(&mut self) -> Result<(), ClusterError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(GUARDIAN_SCRIPT)
            .arg("auditwal-pg-guardian")
            .arg(&self.root)
            .arg(&self.data);
        if self.run_as.is_some() {
            cmd.args(["runuser", "-u", SUPERUSER, "--"]);
        }
        cmd.arg(&self.bins.pg_ctl)
            .current_dir("/")
            .stdin(Stdio::piped())
            // Not our stdout: a pipe reader (`cargo test | tee`) would otherwise wait
            // for the guardian.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C on the terminal signals the foreground
            // group only, so the guardian is still there to clean up.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(io_err("cannot start the cluster's guardian (sh)"))?;
        let pipe = child.stdin.take();
        *lock(&self.guardian) = Some(Guardian { child, pipe });
        Ok(())
    }

    fn init(&self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let sock = self.root.join("sock");
        fs::create_dir(&sock).map_err(io_err(format!("cannot create {}", sock.display())))?;
        if let Some(u) = self.run_as {
            for p in [&self.root, &sock] {
                std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid))
                    .map_err(io_err(format!("cannot chown {} to postgres", p.display())))?;
            }
        }
        let mut initdb = self.command(&self.bins.initdb);
        initdb
            .arg("-D")
            .arg(&self.data)
            .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            // The data dir is throwaway: syncing initdb's files buys nothing.
            .arg("--no-sync");
        run(initdb, "initdb")?;
        let onoff = |b: bool| if b { "on" } else { "off" };
        // max_wal_size and checkpoint_timeout as a server tuned for ingest would
        // have them: with the 1 GB default a bench writing 50k rows/s crossed a
        // checkpoint every half minute, and the full-page writes after each one
        // landed on whichever case happened to be running.
        let conf = format!(
            "\n# auditwal throwaway cluster\n\
             listen_addresses = '{listen}'\n\
             unix_socket_directories = '{sock}'\n\
             fsync = {fsync}\n\
             full_page_writes = {fsync}\n\
             synchronous_commit = on\n\
             max_connections = {maxconn}\n\
             shared_buffers = {shared}MB\n\
             max_wal_size = 8GB\n\
             checkpoint_timeout = 30min\n\
             huge_pages = off\n\
             logging_collector = off\n",
            listen = self.host(),
            sock = sock.display(),
            fsync = onoff(opts.fsync),
            maxconn = opts.max_connections,
            shared = opts.shared_buffers_mb,
        );
        let conf = if opts.tls {
            self.make_tls_cert()?;
            conf + "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        } else {
            conf
        };
        let conf_path = self.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .map_err(io_err(format!("cannot open {}", conf_path.display())))?;
        io::Write::write_all(&mut f, conf.as_bytes())
            .map_err(io_err(format!("cannot write {}", conf_path.display())))?;
        if let Some(net) = &self.network {
            let hba_path = self.data.join("pg_hba.conf");
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&hba_path)
                .map_err(io_err(format!("cannot open {}", hba_path.display())))?;
            let line = format!("host all all {} trust\n", net.clients);
            io::Write::write_all(&mut f, line.as_bytes())
                .map_err(io_err(format!("cannot write {}", hba_path.display())))?;
        }
        Ok(())
    }

    /// A throwaway CA and a server certificate it signs for IP 127.0.0.1, in the
    /// data dir (key 0600, owned by the server's user, as PostgreSQL demands); the
    /// CA certificate is copied out for clients. A CA and a leaf rather than one
    /// self-signed certificate: rustls refuses a CA certificate used as the
    /// server's own.
    fn make_tls_cert(&self) -> Result<(), ClusterError> {
        let d = &self.data;
        let (ca_key, ca_crt) = (d.join("ca.key"), d.join("ca.crt"));
        let (key, csr, crt, ext) = (
            d.join("server.key"),
            d.join("server.csr"),
            d.join("server.crt"),
            d.join("server.ext"),
        );
        fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .map_err(io_err(format!("cannot write {}", ext.display())))?;
        let openssl = |args: &[&std::ffi::OsStr]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args);
            run(cmd, "openssl (throwaway TLS certificates)")
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        openssl(&[
            os("req"),
            os("-x509"),
            os("-new"),
            os("-nodes"),
            os("-days"),
            os("2"),
            os("-subj"),
            os("/CN=auditwal throwaway CA"),
            os("-addext"),
            os("basicConstraints=critical,CA:TRUE"),
            os("-keyout"),
            ca_key.as_os_str(),
            os("-out"),
            ca_crt.as_os_str(),
        ])?;
        openssl(&[
            os("req"),
            os("-new"),
            os("-nodes"),
            os("-subj"),
            os("/CN=127.0.0.1"),
            os("-keyout"),
            key.as_os_str(),
            os("-out"),
            csr.as_os_str(),
        ])?;
        openssl(&[
            os("x509"),
            os("-req"),
            os("-in"),
            csr.as_os_str(),
            os("-CA"),
            ca_crt.as_os_str(),
            os("-CAkey"),
            ca_key.as_os_str(),
            os("-CAcreateserial"),
            os("-days"),
            os("2"),
            os("-extfile"),
            ext.as_os_str(),
            os("-out"),
            crt.as_os_str(),
        ])?;
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(io_err(format!("cannot chmod {}", key.display())))?;
        if let Some(u) = self.run_as {
            for p in [&key, &crt] {
                std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid))
                    .map_err(io_err(format!("cannot chown {} to postgres", p.display())))?;
            }
        }
        fs::copy(&ca_crt, self.tls_cert())
            .map_err(io_err("cannot copy the TLS CA certificate for clients"))?;
        Ok(())
    }

    /// Where a TLS cluster's CA certificate is, for clients (`sslrootcert=`).
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("client-root.crt")
    }

    fn start_on_free_port(&mut self) -> Result<(), ClusterError> {
        if let Some(port) = self.network.as_ref().map(|n| n.port) {
            self.pg_ctl_start(port)?;
            self.port = port;
            *lock(&self.running) = true;
            return Ok(());
        }
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match self.pg_ctl_start(port) {
                Ok(()) => {
                    self.port = port;
                    *lock(&self.running) = true;
                    return Ok(());
                }
                // Another process took the port between our probe and the bind.
                Err(e @ ClusterError::StartFailed { .. }) if self.port_was_taken() => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClusterError::StartFailed {
            port: 0,
            log_tail: String::new(),
        }))
    }

    fn port_was_taken(&self) -> bool {
        let log = tail(&self.log, 20);
        log.contains("could not bind") || log.contains("already in use")
    }

    fn pg_ctl_start(&self, port: u16) -> Result<(), ClusterError> {
        let mut cmd = match self.network.as_ref().and_then(|n| n.wrapper.split_first()) {
            // Only the start goes through the wrapper: the server it forks stays
            // where it was started, and stopping is a signal, which works from here
            // (and from the guardian) even after the wrapper's namespace is gone.
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args);
                if self.run_as.is_some() {
                    c.args(["runuser", "-u", SUPERUSER, "--"]);
                }
                c.arg(&self.bins.pg_ctl)
                    .current_dir(&self.root)
                    .stdin(Stdio::null());
                c
            }
            None => self.command(&self.bins.pg_ctl),
        };
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {port}"))
            .arg("start");
        match run(cmd, "pg_ctl start") {
            Ok(_) => Ok(()),
            Err(ClusterError::CommandFailed { .. }) => Err(ClusterError::StartFailed {
                port,
                log_tail: tail(&self.log, 20),
            }),
            Err(e) => Err(e),
        }
    }

    fn pg_ctl_stop(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command(&self.bins.pg_ctl);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        run(cmd, "pg_ctl stop").map(|_| ())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if *lock(&self.running) {
            if let Err(e) = self.pg_ctl_stop() {
                tracing::warn!(error = %e, "could not stop the private PostgreSQL; its guardian will retry");
            }
            *lock(&self.running) = false;
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.root.display(), error = %e, "could not remove the cluster dir; its guardian will retry");
            }
        }
        // Closing the pipe sets the guardian off; it finds nothing left to do (or
        // finishes what failed above). Reap it, within bounds.
        if let Some(mut g) = lock(&self.guardian).take() {
            drop(g.pipe.take());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match g.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        tracing::warn!("the cluster's guardian did not finish in 10 s; leaving it");
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
}

/// A port on 127.0.0.1 nobody listens on right now.
fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("cannot find a free port on 127.0.0.1"))?;
    let port = l
        .local_addr()
        .map_err(io_err("cannot find a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

/// Runs a command to completion, turning a non-zero exit into an error carrying
/// its output.
fn run(mut cmd: Command, what: &str) -> Result<String, ClusterError> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("cannot run {what}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(ClusterError::CommandFailed {
            what: what.to_string(),
            status: out.status.to_string(),
            output: text.trim().to_string(),
        })
    }
}

/// The last `lines` lines of a text file, or a note saying it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    match File::open(path).and_then(|mut f| f.read_to_string(&mut s)) {
        Ok(_) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// uid and gid of the `postgres` system user.
fn postgres_user() -> Result<RunAs, ClusterError> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, SUPERUSER])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(RunAs { uid, gid }),
        _ => Err(ClusterError::NoPostgresUser),
    }
}

/// `name` on PATH, if there.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// initdb and pg_ctl from one directory: PATH first, then the highest version under
/// /usr/lib/postgresql (Debian does not put the server binaries on PATH).
fn find_bins() -> Option<PgBins> {
    let from_dir = |dir: &Path| -> Option<PgBins> {
        let initdb = dir.join("initdb");
        let pg_ctl = dir.join("pg_ctl");
        (initdb.is_file() && pg_ctl.is_file()).then_some(PgBins { initdb, pg_ctl })
    };
    if let Some(initdb) = which("initdb") {
        // pg_ctl finds `postgres` next to itself; resolve symlinks so the programs
        // all come from one installation.
        let real = fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(b) = real.parent().and_then(from_dir) {
            return Some(b);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find_map(|(_, dir)| from_dir(&dir))
}

fn find_or_install(install: bool) -> Result<PgBins, ClusterError> {
    if let Some(b) = find_bins() {
        return Ok(b);
    }
    if !install || !rustix::process::geteuid().is_root() || which("apt-get").is_none() {
        return Err(ClusterError::NotInstalled);
    }
    // Parallel test processes all get here at once: one installs, the others wait
    // on the lock and then find the binaries.
    let lock_path = std::env::temp_dir().join("auditwal-postgresql-install.lock");
    let lock_file = File::create(&lock_path)
        .map_err(io_err(format!("cannot create {}", lock_path.display())))?;
    rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        ClusterError::Io {
            what: format!("cannot lock {}", lock_path.display()),
            source: e.into(),
        }
    })?;
    if let Some(b) = find_bins() {
        return Ok(b);
    }
    // A one-time, minutes-long step the person running the tests must hear about,
    // even when no tracing subscriber is installed (as in tests).
    eprintln!("auditwal: PostgreSQL not found; installing the Debian package `postgresql` with apt-get (once)");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "postgresql"][..],
    ] {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        run(cmd, &format!("apt-get {}", args.join(" "))).map_err(|e| {
            ClusterError::InstallFailed {
                detail: e.to_string(),
            }
        })?;
    }
    find_bins().ok_or(ClusterError::InstallFailed {
        detail: "apt-get succeeded but initdb is still not found".to_string(),
    })
}
