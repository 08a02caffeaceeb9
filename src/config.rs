//! The application's audit settings: what mode, what sampling, where the WAL
//! lives, how the database is reached, from a TOML file, the environment and
//! code.
//!
//! This module owns the settings, each defined once in the `settings!` table
//! below (TOML key, environment variable, type, default, parser, help and, for
//! most, the builder setter), from which [`SETTINGS`] and the file, environment
//! and code layers are made; the precedence between sources (set in code >
//! environment > file > defaults, whatever order the builder's calls came in),
//! and validation: [`ConfigBuilder::build`] refuses any setting out of range
//! with a [`ConfigError`] that names the setting, its value and where that value
//! came from, so a bad deployment fails at start rather than at the first
//! event. It leaves the meaning of the settings to the layers that use them
//! (`wal::WalConfig`, `pg::SyncConfig`, `sampling::Sampler`), and reuses their
//! own range checks.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::mode::{Mode, ParseModeError};

use crate::event::{Outcome, DEFAULT_MAX_EVENT_BYTES};
use crate::pg::SyncConfig;
use crate::sampling::{ActionPattern, ForceKeep, SampleKey, Sampler};
use crate::wal::format;
use crate::wal::{
    FullDiskPolicy, WalConfig, WalError, DEFAULT_BLOCK_TIMEOUT, DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_DISK_BUDGET, DEFAULT_FSYNC_INTERVAL, DEFAULT_SEGMENT_SIZE,
};

/// Where a setting's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    /// A TOML file (`None`: TOML text given to [`ConfigBuilder::toml`]).
    File(Option<PathBuf>),
    Env(&'static str),
    /// A builder method, or a field set on a [`Config`] in code.
    Code,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(Some(p)) => write!(f, "file {}", p.display()),
            Origin::File(None) => f.write_str("TOML text"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Code => f.write_str("code"),
        }
    }
}

/// Why the configuration was refused. Every variant names the setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value out of range or unreadable.
    #[error("invalid setting `{setting}` = {value} (from {origin}): {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        origin: Origin,
        reason: String,
    },
    /// A key that is not a setting (a typo would otherwise be ignored).
    #[error("unknown setting `{key}` in {origin}; known settings: {known}")]
    Unknown {
        key: String,
        origin: Origin,
        known: String,
    },
    /// A setting the chosen mode cannot do without.
    #[error("setting `{setting}` (environment variable {env}) is required: {reason}")]
    Missing {
        setting: &'static str,
        env: &'static str,
        reason: String,
    },
    #[error("cannot read the configuration file {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not valid TOML: {reason}")]
    Syntax { origin: Origin, reason: String },
    /// The WAL directory does not exist and cannot be created, or a file cannot
    /// be created in it.
    #[error(
        "setting `wal_dir` = {} (from {origin}): the directory cannot be written; \
         create it, or give the service's user write access to it",
        path.display()
    )]
    WalDirNotWritable {
        path: PathBuf,
        origin: Origin,
        #[source]
        source: std::io::Error,
    },
}

/// One setting: its TOML key, its environment variable, what it holds.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub key: &'static str,
    pub env: &'static str,
    pub help: &'static str,
}

/// Makes, from one entry per setting: [`SETTINGS`]; `Layer`, one source's
/// settings, with its parser (`Layer::parse`), its precedence
/// (`Layer::overlay`) and its defaults (`Layer::values`); and the
/// [`ConfigBuilder`] setters of the entries that name one. An entry:
///
/// ```text
/// key: Type = default, env "VAR", help "text", parse fn(&Raw) -> Result<Type, String>
///     [, builder method(arg: ArgType) => value of Type];
/// ```
macro_rules! settings {
    ($(
        $key:ident: $ty:ty = $default:expr,
        env $env:literal,
        help $help:literal,
        parse $parse:expr
        $(, builder $(#[doc = $doc:literal])* $method:ident($arg:ident: $arg_ty:ty) => $value:expr)?;
    )*) => {
        /// Every setting, in the order docs/modes.md lists them. `AUDIT_*`
        /// variables say what is recorded; `AUDITWAL_*` where and how.
        pub const SETTINGS: &[Setting] = &[$(Setting {
            key: stringify!($key),
            env: $env,
            help: $help,
        },)*];

        /// One source's settings, each `None` where the source says nothing.
        #[derive(Debug, Clone, Default)]
        struct Layer {
            $($key: Option<$ty>,)*
            origins: BTreeMap<&'static str, Origin>,
        }

        /// Every setting's value, the defaults filled in.
        struct Values {
            $($key: $ty,)*
        }

        impl Layer {
            /// Parses `raw` for `key` into this layer; `None` when `key` is not
            /// a setting.
            fn parse(&mut self, key: &str, raw: &Raw) -> Option<Result<(), String>> {
                match key {
                    $(stringify!($key) => {
                        let parse: fn(&Raw) -> Result<$ty, String> = $parse;
                        Some(parse(raw).map(|v| self.$key = Some(v)))
                    })*
                    _ => None,
                }
            }

            /// `self` with every setting `top` has replaced by `top`'s.
            fn overlay(mut self, top: Layer) -> Layer {
                $(if top.$key.is_some() {
                    self.$key = top.$key;
                    if let Some(o) = top.origins.get(stringify!($key)) {
                        self.origins.insert(stringify!($key), o.clone());
                    }
                })*
                self
            }

            /// This layer's settings over the defaults.
            fn values(self) -> (Values, BTreeMap<&'static str, Origin>) {
                let values = Values {
                    $($key: self.$key.unwrap_or_else(|| $default),)*
                };
                (values, self.origins)
            }
        }

        impl ConfigBuilder {
            $($(
                $(#[doc = $doc])*
                pub fn $method(self, $arg: $arg_ty) -> Self {
                    let value: $ty = $value;
                    self.set(stringify!($key), |l| l.$key = Some(value))
                }
            )?)*
        }
    };
}

settings! {
    audit_mode: Mode = Mode::Async,
        env "AUDIT_MODE",
        help "default mode: sync, durable, async, sampled",
        parse |r| text(r)?.parse().map_err(|e: ParseModeError| e.to_string()),
        builder mode(mode: Mode) => mode;
    sample_rate: f64 = 1.0,
        env "AUDIT_SAMPLE_RATE",
        help "fraction kept in sampled mode, in [0, 1]",
        parse parse_rate,
        builder sample_rate(rate: f64) => rate;
    force_keep_actions: Vec<ActionPattern> = ActionPattern::parse("admin.*").into_iter().collect(),
        env "AUDIT_FORCE_KEEP_ACTIONS",
        help "actions kept whatever the rate: exact, prefix.* or *",
        parse |r| {
            list(r)
                .iter()
                .map(|p| ActionPattern::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        };
    force_keep_outcomes: Vec<Outcome> = vec![Outcome::Failure, Outcome::Denied],
        env "AUDIT_FORCE_KEEP_OUTCOMES",
        help "outcomes kept whatever the rate",
        parse |r| {
            list(r)
                .iter()
                .map(|o| o.to_ascii_lowercase().parse::<Outcome>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        },
        builder
            /// Replaces the force-keep outcomes.
            force_keep_outcomes(outcomes: impl IntoIterator<Item = Outcome>) => outcomes.into_iter().collect();
    sample_key: SampleKey = SampleKey::RequestId,
        env "AUDIT_SAMPLE_KEY",
        help "field that keeps events together: request_id, actor_id, tenant_id, target_id, none",
        parse |r| text(r)?.parse().map_err(|e: crate::sampling::SamplingError| e.to_string()),
        builder sample_key(key: SampleKey) => key;
    wal_dir: Option<PathBuf> = None,
        env "AUDITWAL_WAL_DIR",
        help "directory of the local WAL",
        parse |r| text(r).map(|t| Some(PathBuf::from(t))),
        builder wal_dir(dir: impl Into<PathBuf>) => Some(dir.into());
    stream: String = "default".to_string(),
        env "AUDITWAL_STREAM",
        help "this process's stream under wal_dir",
        parse text,
        builder stream(stream: impl Into<String>) => stream.into();
    fsync_interval_ms: Duration = DEFAULT_FSYNC_INTERVAL,
        env "AUDITWAL_FSYNC_INTERVAL_MS",
        help "flusher period: what async can lose on power loss",
        parse millis,
        builder fsync_interval(interval: Duration) => interval;
    segment_size: u64 = DEFAULT_SEGMENT_SIZE,
        env "AUDITWAL_SEGMENT_SIZE",
        help "bytes per segment file (64MiB)",
        parse size,
        builder segment_size(bytes: u64) => bytes;
    disk_budget: u64 = DEFAULT_DISK_BUDGET,
        env "AUDITWAL_DISK_BUDGET",
        help "bytes of segment files the stream may use",
        parse size,
        builder disk_budget(bytes: u64) => bytes;
    full_disk_policy: PolicyKind = PolicyKind::Block,
        env "AUDITWAL_FULL_DISK_POLICY",
        help "at the budget: block, drop-newest, fail",
        parse |r| match text(r)?.to_ascii_lowercase().as_str() {
            "block" => Ok(PolicyKind::Block),
            "drop-newest" | "drop_newest" => Ok(PolicyKind::DropNewest),
            "fail" => Ok(PolicyKind::Fail),
            _ => Err("expected block, drop-newest or fail".into()),
        };
    block_timeout_ms: Duration = DEFAULT_BLOCK_TIMEOUT,
        env "AUDITWAL_BLOCK_TIMEOUT_MS",
        help "longest wait for space under block",
        parse millis;
    zero_fill_segments: bool = true,
        env "AUDITWAL_ZERO_FILL_SEGMENTS",
        help "write zeros over each new segment (off on copy-on-write file systems)",
        parse flag,
        builder
            /// Sets `zero_fill_segments` (docs/modes.md).
            zero_fill_segments(on: bool) => on;
    chain_key: Option<PathBuf> = None,
        env "AUDITWAL_CHAIN_KEY",
        help "Ed25519 private key file (auditwal keygen): sign the stream's hash chain (docs/integrity.md)",
        parse |r| text(r).map(|t| Some(PathBuf::from(t))),
        builder chain_key(path: impl Into<PathBuf>) => Some(path.into());
    checkpoint_every: u64 = DEFAULT_CHECKPOINT_EVERY,
        env "AUDITWAL_CHECKPOINT_EVERY",
        help "events between signed checkpoints, at most",
        parse |r| text(r)?.parse::<u64>().map_err(|_| "expected a whole number of events".to_string()),
        builder checkpoint_every(events: u64) => events;
    checkpoint_interval_ms: Duration = DEFAULT_CHECKPOINT_INTERVAL,
        env "AUDITWAL_CHECKPOINT_INTERVAL_MS",
        help "longest time new events wait for a signed checkpoint",
        parse millis,
        builder checkpoint_interval(interval: Duration) => interval;
    database_url: Option<String> = None,
        env "DATABASE_URL",
        help "PostgreSQL URL for sync mode",
        parse |r| text(r).map(Some),
        builder database_url(url: impl Into<String>) => Some(url.into());
    sync_timeout_ms: Duration = SyncConfig::default().timeout,
        env "AUDITWAL_SYNC_TIMEOUT_MS",
        help "longest a sync call waits",
        parse millis,
        builder sync_timeout(timeout: Duration) => timeout;
    link_timeout_ms: Duration = SyncConfig::default().link_timeout,
        env "AUDITWAL_LINK_TIMEOUT_MS",
        help "keepalive and TCP user timeout of sync mode's connections: a dead link is noticed within this",
        parse millis,
        builder link_timeout(timeout: Duration) => timeout;
    sync_migrate: bool = true,
        env "AUDITWAL_SYNC_MIGRATE",
        help "apply migrations when sync mode connects",
        parse flag,
        builder sync_migrate(on: bool) => on;
    max_event_bytes: usize = DEFAULT_MAX_EVENT_BYTES,
        env "AUDITWAL_MAX_EVENT_BYTES",
        help "event size limit",
        parse |r| usize::try_from(size(r)?).map_err(|_| "too large".to_string()),
        builder max_event_bytes(bytes: usize) => bytes;
}

/// The environment variable naming a TOML file, read by [`ConfigBuilder::env`]
/// when no file was given in code.
pub const CONFIG_FILE_ENV: &str = "AUDITWAL_CONFIG";

/// Room left in a WAL record for what is not the event's text and JSON: the
/// event id, timestamp, sample rate, option tags and lengths (about 160 bytes
/// at most), with a margin.
const RECORD_OVERHEAD: usize = 1024;

/// The largest `max_event_bytes` accepted: a valid event always fits one WAL
/// record, so validation, not the WAL, is what refuses an oversized event.
pub const MAX_MAX_EVENT_BYTES: usize = crate::wal::format::MAX_PAYLOAD_LEN - RECORD_OVERHEAD;

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

fn env_of(key: &'static str) -> &'static str {
    setting(key).map_or("", |s| s.env)
}

/// The validated settings of an [`crate::AuditLog`].
///
/// Build with [`Config::builder`] (or [`Config::from_env`]); the fields are
/// public so that code can read them, and adjust them before
/// [`crate::AuditLog::open`], which validates again.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// `audit_mode`: the mode of [`crate::AuditLog::record`].
    pub mode: Mode,
    /// `sample_rate`: the fraction sampled mode keeps, in [0, 1].
    pub sample_rate: f64,
    /// `force_keep_actions` and `force_keep_outcomes`.
    pub force_keep: ForceKeep,
    /// `sample_key`.
    pub sample_key: SampleKey,
    /// `wal_dir`: required by every mode but sync.
    pub wal_dir: Option<PathBuf>,
    /// `stream`: one writer process per stream.
    pub stream: String,
    pub fsync_interval: Duration,
    pub segment_size: u64,
    pub disk_budget: u64,
    pub full_disk_policy: FullDiskPolicy,
    /// Whether new segments are written with zeros first (docs/modes.md).
    pub zero_fill_segments: bool,
    /// `chain_key`: the private key that signs the stream's checkpoints; none
    /// (the default) writes no checkpoints (docs/integrity.md).
    pub chain_key: Option<PathBuf>,
    /// `checkpoint_every` and `checkpoint_interval_ms`.
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    /// `database_url`: required by sync mode. Never printed with its password.
    pub database_url: Option<String>,
    pub sync_timeout: Duration,
    /// `link_timeout_ms`: how long a connection may go unanswered before it is dropped (docs/modes.md).
    pub link_timeout: Duration,
    pub sync_migrate: bool,
    pub max_event_bytes: usize,
    /// Where each value that is not a default came from, by setting key.
    origins: BTreeMap<&'static str, Origin>,
}

impl Default for Config {
    /// The defaults (the `settings!` table's). `wal_dir` and `database_url`
    /// have none.
    fn default() -> Self {
        Layer::default().into_config()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("sample_rate", &self.sample_rate)
            .field("force_keep", &self.force_keep)
            .field("sample_key", &self.sample_key)
            .field("wal_dir", &self.wal_dir)
            .field("stream", &self.stream)
            .field("fsync_interval", &self.fsync_interval)
            .field("segment_size", &self.segment_size)
            .field("disk_budget", &self.disk_budget)
            .field("full_disk_policy", &self.full_disk_policy)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("sync_timeout", &self.sync_timeout)
            .field("link_timeout", &self.link_timeout)
            .field("sync_migrate", &self.sync_migrate)
            .field("zero_fill_segments", &self.zero_fill_segments)
            .field("chain_key", &self.chain_key)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
}

impl Config {
    /// A builder with nothing read yet: add [`ConfigBuilder::file`],
    /// [`ConfigBuilder::env`] and settings, then [`ConfigBuilder::build`].
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The environment (and the file named by `AUDITWAL_CONFIG`, if set) over
    /// the defaults.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::builder().env().build()
    }

    /// Where `key`'s value came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// Checks every setting, naming the first one out of range, then that the
    /// WAL directory (if any) can be created and written.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_values()?;
        self.check_wal_dir()
    }

    /// The sampler sampled mode uses.
    pub fn sampler(&self) -> Result<Sampler, ConfigError> {
        Sampler::new(self.sample_rate, self.force_keep.clone(), self.sample_key)
            .map_err(|e| self.invalid("sample_rate", self.sample_rate.to_string(), e.to_string()))
    }

    /// The WAL writer's settings, when a WAL dir is configured.
    pub fn wal_config(&self) -> Option<WalConfig> {
        let dir = self.wal_dir.as_ref()?;
        Some(
            WalConfig::new(dir, &self.stream)
                .with_segment_size(self.segment_size)
                .with_fsync_interval(self.fsync_interval)
                .with_disk_budget(self.disk_budget)
                .with_full_disk_policy(self.full_disk_policy)
                .with_zero_fill_segments(self.zero_fill_segments)
                .with_chain(
                    self.chain_key.clone(),
                    self.checkpoint_every,
                    self.checkpoint_interval,
                ),
        )
    }

    /// The sync writer's settings (its URL is `database_url`).
    pub fn sync_config(&self) -> SyncConfig {
        SyncConfig {
            timeout: self.sync_timeout,
            link_timeout: self.link_timeout,
            migrate: self.sync_migrate,
            max_event_bytes: self.max_event_bytes,
            chain_key: self.chain_key.clone(),
            checkpoint_every: self.checkpoint_every,
            checkpoint_interval: self.checkpoint_interval,
            ..SyncConfig::default()
        }
    }

    /// `database_url` with its password replaced by `***`, for logs.
    pub fn redacted_database_url(&self) -> Option<String> {
        self.database_url.as_deref().map(redact_url)
    }

    fn invalid(&self, setting: &'static str, value: String, reason: String) -> ConfigError {
        ConfigError::Invalid {
            setting,
            value,
            origin: self.origin(setting),
            reason,
        }
    }

    fn check_values(&self) -> Result<(), ConfigError> {
        self.sampler()?;
        if self.fsync_interval < Duration::from_millis(1)
            || self.fsync_interval > Duration::from_secs(3600)
        {
            return Err(self.invalid(
                "fsync_interval_ms",
                self.fsync_interval.as_millis().to_string(),
                "must be 1 ..= 3600000 (a zero interval would fsync in a busy loop)".into(),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(self.invalid(
                "checkpoint_every",
                "0".into(),
                "must be at least 1".into(),
            ));
        }
        if self.checkpoint_interval < Duration::from_millis(10)
            || self.checkpoint_interval > Duration::from_secs(3600)
        {
            return Err(self.invalid(
                "checkpoint_interval_ms",
                self.checkpoint_interval.as_millis().to_string(),
                "must be 10 ..= 3600000".into(),
            ));
        }
        if self.sync_timeout.is_zero() {
            return Err(self.invalid(
                "sync_timeout_ms",
                "0".into(),
                "must be at least 1 ms".into(),
            ));
        }
        if self.link_timeout < Duration::from_secs(1) {
            return Err(self.invalid(
                "link_timeout_ms",
                self.link_timeout.as_millis().to_string(),
                "must be at least 1000 (keepalive counts whole seconds)".into(),
            ));
        }
        crate::wal::format::validate_stream_id(&self.stream).map_err(|e| {
            self.invalid(
                "stream",
                format!("{:?}", self.stream),
                format!("{e} (use 1 to 32 bytes of A-Z a-z 0-9 . _ -, not starting with '.')"),
            )
        })?;
        // The WAL's own range checks, reported under this config's names.
        let wal = WalConfig::new(self.wal_dir.clone().unwrap_or_default(), &self.stream)
            .with_segment_size(self.segment_size)
            .with_fsync_interval(self.fsync_interval)
            .with_disk_budget(self.disk_budget)
            .with_full_disk_policy(self.full_disk_policy);
        if let Err(WalError::InvalidConfig { setting, reason }) = wal.validate() {
            let (key, value) = match setting {
                "segment_size" => ("segment_size", self.segment_size.to_string()),
                "disk_budget" => ("disk_budget", self.disk_budget.to_string()),
                "full_disk_policy" => ("block_timeout_ms", policy_text(self.full_disk_policy)),
                _ => (
                    "fsync_interval_ms",
                    self.fsync_interval.as_millis().to_string(),
                ),
            };
            return Err(self.invalid(key, value, reason));
        }
        // A valid event must fit one record of one segment.
        let limit = if self.wal_dir.is_some() {
            let room = usize::try_from(self.segment_size)
                .unwrap_or(usize::MAX)
                .saturating_sub(
                    format::SEGMENT_HEADER_LEN
                        + format::EOS_FRAME_LEN
                        + format::FRAME_HEADER_LEN
                        + 8
                        + RECORD_OVERHEAD,
                );
            room.min(MAX_MAX_EVENT_BYTES)
        } else {
            MAX_MAX_EVENT_BYTES
        };
        if !(1..=limit).contains(&self.max_event_bytes) {
            return Err(self.invalid(
                "max_event_bytes",
                self.max_event_bytes.to_string(),
                format!(
                    "must be 1 ..= {limit} (an event must fit one WAL record of a {}-byte segment)",
                    self.segment_size
                ),
            ));
        }
        if let Some(url) = &self.database_url {
            if let Err(e) = url.parse::<sqlx::postgres::PgConnectOptions>() {
                return Err(self.invalid("database_url", redact_url(url), e.to_string()));
            }
        }
        match (self.mode, &self.database_url, &self.wal_dir) {
            (Mode::Sync, None, _) => Err(ConfigError::Missing {
                setting: "database_url",
                env: env_of("database_url"),
                reason: "audit_mode = sync writes to PostgreSQL".into(),
            }),
            (mode, _, None) if mode.uses_wal() => Err(ConfigError::Missing {
                setting: "wal_dir",
                env: env_of("wal_dir"),
                reason: format!("audit_mode = {mode} writes to the local WAL"),
            }),
            _ => Ok(()),
        }
    }

    fn check_wal_dir(&self) -> Result<(), ConfigError> {
        let Some(dir) = &self.wal_dir else {
            return Ok(());
        };
        let failed = |source| ConfigError::WalDirNotWritable {
            path: dir.clone(),
            origin: self.origin("wal_dir"),
            source,
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        // A file created and removed at once: the only reliable test of write
        // access (permission bits say nothing about read-only mounts or ACLs).
        // The name is this process's and create_new never touches another's.
        let probe = dir.join(format!(".auditwal-probe-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(failed)?;
        std::fs::remove_file(&probe).map_err(failed)
    }
}

fn policy_text(p: FullDiskPolicy) -> String {
    match p {
        FullDiskPolicy::Block { timeout } => format!("block, {} ms", timeout.as_millis()),
        FullDiskPolicy::DropNewest => "drop-newest".into(),
        FullDiskPolicy::Fail => "fail".into(),
    }
}

/// `url` with the password of its user info and any `password=` parameter
/// replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let auth_end = out[auth_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| auth_start + i);
        if let Some(at) = out[auth_start..auth_end].rfind('@') {
            let userinfo = &out[auth_start..auth_start + at];
            if let Some(colon) = userinfo.find(':') {
                let from = auth_start + colon + 1;
                out.replace_range(from..auth_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// Full-disk policy without its timeout (that is `block_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyKind {
    Block,
    DropNewest,
    Fail,
}

/// A raw value before it is parsed for its setting.
enum Raw {
    Text(String),
    List(Vec<String>),
}

/// One value, trimmed.
fn text(raw: &Raw) -> Result<String, String> {
    match raw {
        Raw::Text(t) => Ok(t.trim().to_string()),
        Raw::List(_) => Err("expected one value, not a list".into()),
    }
}

/// A list: a TOML array, or comma-separated text (`none` for an empty list).
fn list(raw: &Raw) -> Vec<String> {
    match raw {
        Raw::List(l) => l.clone(),
        Raw::Text(t) if t.trim() == "none" => Vec::new(),
        Raw::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    }
}

fn millis(raw: &Raw) -> Result<Duration, String> {
    text(raw)?
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| "expected a whole number of milliseconds".into())
}

fn flag(raw: &Raw) -> Result<bool, String> {
    match text(raw)?.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn size(raw: &Raw) -> Result<u64, String> {
    parse_size(&text(raw)?)
}

fn parse_rate(raw: &Raw) -> Result<f64, String> {
    let rate: f64 = text(raw)?
        .parse()
        .map_err(|_| "expected a number in [0, 1]".to_string())?;
    if !(0.0..=1.0).contains(&rate) {
        return Err("must be in [0, 1]".into());
    }
    Ok(rate)
}

impl Layer {
    /// Sets `spec.key` from `raw`, naming the setting and `origin` on error.
    fn apply(
        &mut self,
        spec: &'static Setting,
        raw: Raw,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        let key = spec.key;
        let shown = match &raw {
            Raw::Text(t) if key == "database_url" => redact_url(t),
            Raw::Text(t) => format!("{t:?}"),
            Raw::List(l) => format!("{l:?}"),
        };
        let parsed = self.parse(key, &raw).unwrap_or_else(|| {
            // SETTINGS and the parsers come from the same table: a key of
            // SETTINGS always has one.
            Err(format!("setting `{key}` has no parser"))
        });
        if let Err(reason) = parsed {
            return Err(ConfigError::Invalid {
                setting: key,
                value: shown,
                origin,
                reason,
            });
        }
        self.origins.insert(key, origin);
        Ok(())
    }

    /// The defaults with this layer's settings applied: the one place the flat
    /// settings become [`Config`]'s fields.
    fn into_config(self) -> Config {
        let (v, origins) = self.values();
        Config {
            mode: v.audit_mode,
            sample_rate: v.sample_rate,
            force_keep: ForceKeep {
                actions: v.force_keep_actions,
                outcomes: v.force_keep_outcomes,
            },
            sample_key: v.sample_key,
            wal_dir: v.wal_dir,
            stream: v.stream,
            fsync_interval: v.fsync_interval_ms,
            segment_size: v.segment_size,
            disk_budget: v.disk_budget,
            full_disk_policy: match v.full_disk_policy {
                PolicyKind::DropNewest => FullDiskPolicy::DropNewest,
                PolicyKind::Fail => FullDiskPolicy::Fail,
                PolicyKind::Block => FullDiskPolicy::Block {
                    timeout: v.block_timeout_ms,
                },
            },
            zero_fill_segments: v.zero_fill_segments,
            chain_key: v.chain_key,
            checkpoint_every: v.checkpoint_every,
            checkpoint_interval: v.checkpoint_interval_ms,
            database_url: v.database_url,
            sync_timeout: v.sync_timeout_ms,
            link_timeout: v.link_timeout_ms,
            sync_migrate: v.sync_migrate,
            max_event_bytes: v.max_event_bytes,
            origins,
        }
    }
}

/// Bytes, from `65536`, `64KiB`, `64 MiB`, `4GiB` (binary units; `k`, `m`, `g`
/// alone mean the same).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number of bytes, such as 65536 or 64MiB".to_string())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use B, KiB, MiB, GiB or TiB (powers of 1024)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "too large".to_string())
}

/// Where the TOML comes from.
#[derive(Debug, Clone)]
enum FileSource {
    Path(PathBuf),
    Text(String),
}

/// Collects settings from a TOML file, the environment and code, and builds a
/// validated [`Config`]. Precedence, whatever the order of the calls: code
/// (this builder's setters) > environment > file > defaults.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    file: Option<FileSource>,
    env: Option<Vec<(String, String)>>,
    code: Layer,
    /// Patterns given to a setter that do not parse: (pattern, reason).
    code_errors: Vec<(String, String)>,
}

impl ConfigBuilder {
    /// Reads settings from this TOML file (a missing file is an error).
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(FileSource::Path(path.as_ref().to_path_buf()));
        self
    }

    /// Reads settings from TOML text, in place of a file.
    pub fn toml(mut self, text: impl Into<String>) -> Self {
        self.file = Some(FileSource::Text(text.into()));
        self
    }

    /// Reads the process environment (now), and the file named by
    /// `AUDITWAL_CONFIG` unless [`file`](Self::file) named one.
    pub fn env(self) -> Self {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
        self.env_from(vars)
    }

    /// As [`env`](Self::env), from these variables instead of the process's
    /// (tests, or a service with its own source of variables).
    pub fn env_from<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    fn set(mut self, key: &'static str, f: impl FnOnce(&mut Layer)) -> Self {
        f(&mut self.code);
        self.code.origins.insert(key, Origin::Code);
        self
    }

    // The setters of one setting each are made by `settings!`; these two are
    // written out: one keeps unparsable patterns for `build` to report, the
    // other sets two settings.

    /// Replaces the force-keep action patterns (`admin.*`, `url.deleted`, `*`).
    pub fn force_keep_actions<S: AsRef<str>>(
        mut self,
        patterns: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut parsed = Vec::new();
        for p in patterns {
            match ActionPattern::parse(p.as_ref()) {
                Ok(p) => parsed.push(p),
                Err(e) => self
                    .code_errors
                    .push((p.as_ref().to_string(), e.to_string())),
            }
        }
        self.set("force_keep_actions", |l| {
            l.force_keep_actions = Some(parsed)
        })
    }

    /// Sets `full_disk_policy` (and, for `Block`, `block_timeout_ms`).
    pub fn full_disk_policy(self, policy: FullDiskPolicy) -> Self {
        let (kind, timeout) = match policy {
            FullDiskPolicy::Block { timeout } => (PolicyKind::Block, Some(timeout)),
            FullDiskPolicy::DropNewest => (PolicyKind::DropNewest, None),
            FullDiskPolicy::Fail => (PolicyKind::Fail, None),
        };
        let this = self.set("full_disk_policy", |l| l.full_disk_policy = Some(kind));
        match timeout {
            Some(t) => this.set("block_timeout_ms", |l| l.block_timeout_ms = Some(t)),
            None => this,
        }
    }

    /// Reads the file, the environment, applies the precedence and validates
    /// (including that `wal_dir` can be created and written).
    pub fn build(self) -> Result<Config, ConfigError> {
        if let Some((pattern, reason)) = self.code_errors.first() {
            return Err(ConfigError::Invalid {
                setting: "force_keep_actions",
                value: format!("{pattern:?}"),
                origin: Origin::Code,
                reason: reason.clone(),
            });
        }
        let env_file = self.env.as_ref().and_then(|vars| {
            vars.iter()
                .find(|(k, v)| k == CONFIG_FILE_ENV && !v.trim().is_empty())
                .map(|(_, v)| FileSource::Path(PathBuf::from(v.trim())))
        });
        let file = match self.file.or(env_file) {
            Some(source) => file_layer(&source)?,
            None => Layer::default(),
        };
        let env = match &self.env {
            Some(vars) => env_layer(vars)?,
            None => Layer::default(),
        };
        let config = file.overlay(env).overlay(self.code).into_config();
        config.validate()?;
        Ok(config)
    }
}

fn file_layer(source: &FileSource) -> Result<Layer, ConfigError> {
    let (text, origin) = match source {
        FileSource::Path(path) => (
            std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?,
            Origin::File(Some(path.clone())),
        ),
        FileSource::Text(text) => (text.clone(), Origin::File(None)),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.clone(),
            reason: e.to_string(),
        })?;
    let mut layer = Layer::default();
    for (key, value) in table {
        let Some(spec) = setting(&key) else {
            return Err(ConfigError::Unknown {
                key,
                origin,
                known: SETTINGS
                    .iter()
                    .map(|s| s.key)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let raw = match value {
            toml::Value::String(s) => Raw::Text(s),
            toml::Value::Integer(i) => Raw::Text(i.to_string()),
            toml::Value::Float(f) => Raw::Text(f.to_string()),
            toml::Value::Boolean(b) => Raw::Text(b.to_string()),
            toml::Value::Array(items) => Raw::List(
                items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect(),
            ),
            other => {
                return Err(ConfigError::Invalid {
                    setting: spec.key,
                    value: other.to_string(),
                    origin,
                    reason: "expected a string, number, boolean or list".into(),
                })
            }
        };
        layer.apply(spec, raw, origin.clone())?;
    }
    Ok(layer)
}

/// The settings among `vars`. An empty variable counts as unset (use `none`
/// for an empty force-keep list). Unknown `AUDITWAL_*` variables are logged,
/// since a misspelt one would otherwise be ignored.
fn env_layer(vars: &[(String, String)]) -> Result<Layer, ConfigError> {
    let mut layer = Layer::default();
    for spec in SETTINGS {
        // The last occurrence wins, as in a shell.
        if let Some((_, value)) = vars.iter().rev().find(|(k, _)| k == spec.env) {
            if value.trim().is_empty() {
                continue;
            }
            layer.apply(spec, Raw::Text(value.clone()), Origin::Env(spec.env))?;
        }
    }
    for (k, _) in vars {
        if k.starts_with("AUDITWAL_")
            && k != CONFIG_FILE_ENV
            && !SETTINGS.iter().any(|s| s.env == k)
        {
            tracing::debug!(variable = %k, "ignoring an AUDITWAL_* variable that is not an audit log setting");
        }
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_parser() {
        // A value each parser accepts.
        let sample = |key: &str| match key {
            "audit_mode" => "durable",
            "sample_rate" => "0.5",
            "force_keep_actions" => "admin.*",
            "force_keep_outcomes" => "failure",
            "sample_key" => "tenant_id",
            "wal_dir" => "/tmp/x",
            "stream" => "s",
            "full_disk_policy" => "fail",
            "database_url" => "postgres://u@localhost/db",
            "sync_migrate" | "zero_fill_segments" => "false",
            _ => "4096",
        };
        for spec in SETTINGS {
            let mut layer = Layer::default();
            layer
                .apply(spec, Raw::Text(sample(spec.key).into()), Origin::Code)
                .expect(spec.key);
            assert_eq!(
                layer.origins.get(spec.key),
                Some(&Origin::Code),
                "{}",
                spec.key
            );
        }
    }

    #[test]
    fn docs_modes_md_lists_every_setting_in_order() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/modes.md");
        let text = std::fs::read_to_string(&path).expect("reading docs/modes.md");
        let code = |cell: &str| -> Option<String> {
            Some(
                cell.trim()
                    .strip_prefix('`')?
                    .strip_suffix('`')?
                    .to_string(),
            )
        };
        // The settings table's rows: `key` | `ENV_VAR` | default | meaning.
        let documented: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| {
                let mut cells = line.strip_prefix('|')?.split('|');
                let key = code(cells.next()?)?;
                let env = code(cells.next()?)?;
                let is_env = env.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                is_env.then_some((key, env))
            })
            .collect();
        let settings: Vec<(String, String)> = SETTINGS
            .iter()
            .map(|s| (s.key.to_string(), s.env.to_string()))
            .collect();
        assert_eq!(documented, settings);
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert!(parse_size("64MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?sslmode=require&password=x"),
            "postgres://u:***@h:5432/db?sslmode=require&password=***"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
