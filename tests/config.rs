//! The audit log's settings: TOML, environment, builder, their precedence, and
//! every refusal naming the setting, its value and where it came from.
//!
//! No test here changes this process's environment (tests run in parallel):
//! environment variables are passed with `ConfigBuilder::env_from`, and the one
//! test of the real environment runs a child process.

use std::path::Path;
use std::time::Duration;

use auditwal::config::{ConfigError, Origin, SETTINGS};
use auditwal::wal::FullDiskPolicy;
use auditwal::{Config, Mode, Outcome, SampleKey};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn wal(dir: &Path) -> String {
    dir.join("wal").display().to_string()
}

fn err_text(r: Result<Config, ConfigError>) -> String {
    match r {
        Ok(c) => panic!("expected a refusal, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that the refusal `msg` mentions every one of `parts` (the setting's
/// name, the value, where it came from).
fn assert_mentions(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "expected {part:?} in: {msg}");
    }
}

#[test]
fn defaults_apply_when_only_the_wal_dir_is_set() {
    let d = tmp();
    let c = Config::builder()
        .wal_dir(d.path())
        .build()
        .expect("defaults");
    assert_eq!(c.mode, Mode::Async);
    assert_eq!(c.sample_rate, 1.0);
    assert_eq!(c.stream, "default");
    assert_eq!(c.fsync_interval, Duration::from_millis(100));
    assert_eq!(c.segment_size, 64 << 20);
    assert_eq!(c.disk_budget, 4 << 30);
    assert_eq!(
        c.full_disk_policy,
        FullDiskPolicy::Block {
            timeout: Duration::from_secs(2)
        }
    );
    assert_eq!(c.sample_key, SampleKey::RequestId);
    assert_eq!(
        c.force_keep.outcomes,
        vec![Outcome::Failure, Outcome::Denied]
    );
    let actions: Vec<&str> = c.force_keep.actions.iter().map(|p| p.as_str()).collect();
    assert_eq!(actions, ["admin.*"]);
    assert_eq!(c.database_url, None);
    assert_eq!(c.sync_timeout, Duration::from_secs(5));
    assert_eq!(c.link_timeout, Duration::from_secs(10));
    assert!(c.sync_migrate);
    assert_eq!(c.max_event_bytes, 64 * 1024);
    assert_eq!(c.origin("sample_rate"), Origin::Default);
    assert_eq!(c.origin("wal_dir"), Origin::Code);
}

#[test]
fn code_beats_environment_beats_file_beats_defaults_whatever_the_call_order() {
    let d = tmp();
    let file = d.path().join("audit.toml");
    std::fs::write(
        &file,
        format!(
            "wal_dir = {:?}\nsample_rate = 0.1\nstream = \"from-file\"\nfsync_interval_ms = 7\n",
            wal(d.path())
        ),
    )
    .expect("write toml");
    let env = [
        ("AUDIT_SAMPLE_RATE", "0.2"),
        ("AUDITWAL_STREAM", "from-env"),
    ];

    // The setter comes first in the chain and still wins.
    let c = Config::builder()
        .sample_rate(0.3)
        .env_from(env)
        .file(&file)
        .build()
        .expect("all three");
    assert_eq!(c.sample_rate, 0.3);
    assert_eq!(c.origin("sample_rate"), Origin::Code);
    assert_eq!(c.stream, "from-env");
    assert_eq!(c.origin("stream"), Origin::Env("AUDITWAL_STREAM"));
    assert_eq!(c.fsync_interval, Duration::from_millis(7));
    assert_eq!(
        c.origin("fsync_interval_ms"),
        Origin::File(Some(file.clone()))
    );
    assert_eq!(c.segment_size, 64 << 20);
    assert_eq!(c.origin("segment_size"), Origin::Default);

    let c = Config::builder()
        .file(&file)
        .env_from(env)
        .build()
        .expect("env and file");
    assert_eq!(c.sample_rate, 0.2);

    let c = Config::builder().file(&file).build().expect("file alone");
    assert_eq!(c.sample_rate, 0.1);
    assert_eq!(c.stream, "from-file");
}

#[test]
fn toml_sets_every_setting() {
    let d = tmp();
    let text = format!(
        r#"
audit_mode = "sampled"
sample_rate = 0.25
force_keep_actions = ["admin.*", "billing.refund"]
force_keep_outcomes = ["denied"]
sample_key = "tenant_id"
wal_dir = {:?}
stream = "api-1"
fsync_interval_ms = 20
segment_size = "1MiB"
disk_budget = 8388608
full_disk_policy = "block"
block_timeout_ms = 250
database_url = "postgres://auditwal@127.0.0.1:5432/audit"
sync_timeout_ms = 1500
link_timeout_ms = 4000
sync_migrate = false
zero_fill_segments = false
chain_key = "/etc/auditwal/auditwal.key"
checkpoint_every = 500
checkpoint_interval_ms = 2000
max_event_bytes = "8KiB"
"#,
        wal(d.path())
    );
    let c = Config::builder().toml(text).build().expect("full file");
    assert_eq!(c.mode, Mode::Sampled);
    assert_eq!(c.sample_rate, 0.25);
    let actions: Vec<&str> = c.force_keep.actions.iter().map(|p| p.as_str()).collect();
    assert_eq!(actions, ["admin.*", "billing.refund"]);
    assert_eq!(c.force_keep.outcomes, vec![Outcome::Denied]);
    assert_eq!(c.sample_key, SampleKey::TenantId);
    assert_eq!(c.stream, "api-1");
    assert_eq!(c.fsync_interval, Duration::from_millis(20));
    assert_eq!(c.segment_size, 1 << 20);
    assert_eq!(c.disk_budget, 8 << 20);
    assert_eq!(
        c.full_disk_policy,
        FullDiskPolicy::Block {
            timeout: Duration::from_millis(250)
        }
    );
    assert_eq!(
        c.database_url.as_deref(),
        Some("postgres://auditwal@127.0.0.1:5432/audit")
    );
    assert_eq!(c.sync_timeout, Duration::from_millis(1500));
    assert_eq!(c.link_timeout, Duration::from_secs(4));
    assert_eq!(c.sync_config().link_timeout, Duration::from_secs(4));
    assert!(!c.sync_migrate);
    assert!(!c.zero_fill_segments);
    assert_eq!(
        c.chain_key.as_deref(),
        Some(Path::new("/etc/auditwal/auditwal.key"))
    );
    assert_eq!(c.checkpoint_every, 500);
    assert_eq!(c.checkpoint_interval, Duration::from_secs(2));
    assert_eq!(c.max_event_bytes, 8192);
    // Every setting of the table was covered by this file.
    for s in SETTINGS {
        assert!(
            matches!(c.origin(s.key), Origin::File(None)),
            "{} not set by the file",
            s.key
        );
    }
}

#[test]
fn environment_sets_every_setting() {
    let d = tmp();
    let w = wal(d.path());
    let vars = [
        ("AUDIT_MODE", "DURABLE"),
        ("AUDIT_SAMPLE_RATE", "0.5"),
        ("AUDIT_FORCE_KEEP_ACTIONS", "admin.*, security.*"),
        ("AUDIT_FORCE_KEEP_OUTCOMES", "none"),
        ("AUDIT_SAMPLE_KEY", "actor_id"),
        ("AUDITWAL_WAL_DIR", w.as_str()),
        ("AUDITWAL_STREAM", "worker-3"),
        ("AUDITWAL_FSYNC_INTERVAL_MS", "50"),
        ("AUDITWAL_SEGMENT_SIZE", "128KiB"),
        ("AUDITWAL_DISK_BUDGET", "1MiB"),
        ("AUDITWAL_FULL_DISK_POLICY", "drop-newest"),
        ("AUDITWAL_BLOCK_TIMEOUT_MS", "10"),
        ("DATABASE_URL", "postgres://u:pw@127.0.0.1/db"),
        ("AUDITWAL_SYNC_TIMEOUT_MS", "900"),
        ("AUDITWAL_LINK_TIMEOUT_MS", "3000"),
        ("AUDITWAL_SYNC_MIGRATE", "no"),
        ("AUDITWAL_ZERO_FILL_SEGMENTS", "off"),
        ("AUDITWAL_CHAIN_KEY", "/keys/a.key"),
        ("AUDITWAL_CHECKPOINT_EVERY", "7"),
        ("AUDITWAL_CHECKPOINT_INTERVAL_MS", "100"),
        ("AUDITWAL_MAX_EVENT_BYTES", "4096"),
        ("UNRELATED", "x"),
    ];
    let c = Config::builder().env_from(vars).build().expect("env");
    assert_eq!(c.mode, Mode::Durable);
    assert_eq!(c.sample_rate, 0.5);
    let actions: Vec<&str> = c.force_keep.actions.iter().map(|p| p.as_str()).collect();
    assert_eq!(actions, ["admin.*", "security.*"]);
    assert!(c.force_keep.outcomes.is_empty(), "`none` clears the list");
    assert_eq!(c.sample_key, SampleKey::ActorId);
    assert_eq!(c.wal_dir.as_deref(), Some(Path::new(&w)));
    assert_eq!(c.stream, "worker-3");
    assert_eq!(c.fsync_interval, Duration::from_millis(50));
    assert_eq!(c.segment_size, 128 << 10);
    assert_eq!(c.disk_budget, 1 << 20);
    assert_eq!(c.full_disk_policy, FullDiskPolicy::DropNewest);
    assert_eq!(c.sync_timeout, Duration::from_millis(900));
    assert_eq!(c.link_timeout, Duration::from_secs(3));
    assert!(!c.sync_migrate);
    assert!(!c.zero_fill_segments);
    assert!(
        !c.wal_config().expect("wal dir set").zero_fill_segments,
        "the WAL writer gets the setting"
    );
    let wal_config = c.wal_config().expect("wal dir set");
    assert_eq!(
        (
            wal_config.chain_key.as_deref(),
            wal_config.checkpoint_every,
            wal_config.checkpoint_interval
        ),
        (
            Some(Path::new("/keys/a.key")),
            7,
            Duration::from_millis(100)
        ),
        "the WAL writer gets the chain settings"
    );
    assert_eq!(c.max_event_bytes, 4096);
    for s in SETTINGS {
        assert_eq!(c.origin(s.key), Origin::Env(s.env), "{}", s.key);
    }
    // The password never shows in Debug output.
    let debug = format!("{c:?}");
    assert!(!debug.contains("pw@"), "{debug}");
    assert!(debug.contains("u:***@"), "{debug}");
}

#[test]
fn an_empty_variable_counts_as_unset() {
    let d = tmp();
    let c = Config::builder()
        .toml("sample_rate = 0.4")
        .env_from([("AUDIT_SAMPLE_RATE", ""), ("DATABASE_URL", " ")])
        .wal_dir(d.path())
        .build()
        .expect("empty vars");
    assert_eq!(c.sample_rate, 0.4);
    assert_eq!(c.database_url, None);
}

#[test]
fn auditwal_config_names_the_file_when_code_does_not() {
    let d = tmp();
    let file = d.path().join("from-env.toml");
    std::fs::write(
        &file,
        format!("wal_dir = {:?}\nstream = \"named-by-env\"\n", wal(d.path())),
    )
    .expect("write toml");
    let path = file.display().to_string();
    let c = Config::builder()
        .env_from([("AUDITWAL_CONFIG", path.as_str())])
        .build()
        .expect("AUDITWAL_CONFIG");
    assert_eq!(c.stream, "named-by-env");

    let other = d.path().join("code.toml");
    std::fs::write(
        &other,
        format!(
            "wal_dir = {:?}\nstream = \"named-in-code\"\n",
            wal(d.path())
        ),
    )
    .expect("write toml");
    let c = Config::builder()
        .env_from([("AUDITWAL_CONFIG", path.as_str())])
        .file(&other)
        .build()
        .expect("file in code");
    assert_eq!(c.stream, "named-in-code");
}

#[test]
fn a_sample_rate_out_of_range_is_refused_by_name_value_and_origin() {
    let d = tmp();
    let msg = err_text(Config::builder().wal_dir(d.path()).sample_rate(1.5).build());
    assert_mentions(&msg, &["`sample_rate`", "1.5"]);

    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .env_from([("AUDIT_SAMPLE_RATE", "1.5")])
            .build(),
    );
    assert_mentions(&msg, &["`sample_rate`", "1.5", "AUDIT_SAMPLE_RATE"]);

    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .toml("sample_rate = \"lots\"")
            .build(),
    );
    assert_mentions(&msg, &["`sample_rate`", "lots"]);
}

#[test]
fn an_unknown_mode_is_refused_by_name_and_value() {
    let d = tmp();
    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .env_from([("AUDIT_MODE", "fast")])
            .build(),
    );
    assert_mentions(&msg, &["`audit_mode`", "fast", "AUDIT_MODE"]);
    assert!(msg.contains("sync, durable, async or sampled"), "{msg}");
}

#[test]
fn a_wal_dir_that_cannot_be_written_is_refused_at_build() {
    let d = tmp();
    // A path below a regular file: no directory can be created there, even by root.
    let file = d.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let bad = file.join("wal");
    let r = Config::builder().wal_dir(&bad).build();
    assert!(
        matches!(&r, Err(ConfigError::WalDirNotWritable { path, .. }) if path == &bad),
        "{r:?}"
    );
    let msg = err_text(r);
    assert_mentions(&msg, &["`wal_dir`", &bad.display().to_string()]);
}

#[test]
fn a_zero_fsync_interval_is_refused() {
    let d = tmp();
    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .fsync_interval(Duration::ZERO)
            .build(),
    );
    assert_mentions(&msg, &["`fsync_interval_ms`", "0"]);
    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .env_from([("AUDITWAL_FSYNC_INTERVAL_MS", "0")])
            .build(),
    );
    assert_mentions(&msg, &["`fsync_interval_ms`", "AUDITWAL_FSYNC_INTERVAL_MS"]);
}

#[test]
fn other_out_of_range_settings_are_refused_by_name() {
    let d = tmp();
    let base = || Config::builder().wal_dir(d.path());
    let cases: Vec<(&str, Result<Config, ConfigError>)> = vec![
        ("`stream`", base().stream("../escape").build()),
        ("`segment_size`", base().segment_size(1000).build()),
        (
            "`disk_budget`",
            base().segment_size(1 << 20).disk_budget(1 << 20).build(),
        ),
        (
            "`sync_timeout_ms`",
            base().sync_timeout(Duration::ZERO).build(),
        ),
        (
            "`link_timeout_ms`",
            base().link_timeout(Duration::from_millis(999)).build(),
        ),
        ("`max_event_bytes`", base().max_event_bytes(0).build()),
        (
            "`max_event_bytes`",
            // The default 64 KiB limit does not fit a 64 KiB segment.
            base().segment_size(64 * 1024).build(),
        ),
        (
            "`force_keep_actions`",
            base().force_keep_actions(["a*b"]).build(),
        ),
        (
            "`force_keep_outcomes`",
            base()
                .env_from([("AUDIT_FORCE_KEEP_OUTCOMES", "failure,oops")])
                .build(),
        ),
        (
            "`full_disk_policy`",
            base()
                .env_from([("AUDITWAL_FULL_DISK_POLICY", "panic")])
                .build(),
        ),
        (
            "`segment_size`",
            base().toml("segment_size = \"64MB\"").build(),
        ),
        (
            "`sample_key`",
            base().toml("sample_key = \"session\"").build(),
        ),
        (
            "`sync_migrate`",
            base()
                .env_from([("AUDITWAL_SYNC_MIGRATE", "maybe")])
                .build(),
        ),
    ];
    for (name, r) in cases {
        let msg = err_text(r);
        assert!(msg.contains(name), "expected {name} in: {msg}");
    }
}

#[test]
fn a_bad_database_url_is_refused_without_showing_its_password() {
    let d = tmp();
    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .database_url("postgres://u:hunter2@127.0.0.1:notaport/db")
            .build(),
    );
    assert!(msg.contains("`database_url`"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[test]
fn each_mode_requires_its_destination() {
    let r = Config::builder().mode(Mode::Sync).build();
    assert!(
        matches!(
            &r,
            Err(ConfigError::Missing {
                setting: "database_url",
                env: "DATABASE_URL",
                ..
            })
        ),
        "{r:?}"
    );
    for mode in [Mode::Async, Mode::Durable, Mode::Sampled] {
        let msg = err_text(
            Config::builder()
                .mode(mode)
                .database_url("postgres://127.0.0.1/db")
                .build(),
        );
        assert!(
            msg.contains("`wal_dir`") && msg.contains("AUDITWAL_WAL_DIR"),
            "{mode}: {msg}"
        );
    }
    // Sync needs no WAL.
    Config::builder()
        .mode(Mode::Sync)
        .database_url("postgres://127.0.0.1/db")
        .build()
        .expect("sync without a WAL dir");
}

#[test]
fn an_unknown_toml_key_is_refused_naming_it() {
    let d = tmp();
    let msg = err_text(
        Config::builder()
            .wal_dir(d.path())
            .toml("fsync_interval = 100")
            .build(),
    );
    assert!(msg.contains("`fsync_interval`"), "{msg}");
    assert!(
        msg.contains("fsync_interval_ms"),
        "lists the known keys: {msg}"
    );

    let msg = err_text(Config::builder().toml("sample_rate = ").build());
    assert!(msg.contains("not valid TOML"), "{msg}");

    let missing = d.path().join("nope.toml");
    let r = Config::builder().file(&missing).build();
    assert!(matches!(r, Err(ConfigError::ReadFile { .. })), "{r:?}");
}

/// Run in a child process by the test below, with its own environment.
#[test]
#[ignore = "run as a child process by from_env_reads_the_process_environment"]
fn child_prints_the_config_from_its_environment() {
    if std::env::var_os("AUDITWAL_TEST_CHILD").is_none() {
        return;
    }
    let c = Config::from_env().expect("config from the environment");
    println!(
        "mode={} rate={} stream={} fsync_ms={}",
        c.mode,
        c.sample_rate,
        c.stream,
        c.fsync_interval.as_millis()
    );
}

#[test]
fn from_env_reads_the_process_environment() {
    let d = tmp();
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_prints_the_config_from_its_environment",
            "--ignored",
            "--nocapture",
        ])
        .env("AUDITWAL_TEST_CHILD", "1")
        .env("AUDIT_MODE", "sampled")
        .env("AUDIT_SAMPLE_RATE", "0.125")
        .env("AUDITWAL_WAL_DIR", d.path())
        .env("AUDITWAL_STREAM", "child")
        .env("AUDITWAL_FSYNC_INTERVAL_MS", "33")
        .env_remove("AUDITWAL_CONFIG")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mode=sampled rate=0.125 stream=child fsync_ms=33"),
        "{stdout}"
    );
}
