//! `auditwal bench fleet` end to end, at a size that runs in seconds: the
//! processes it starts (writers, loaders, a private PostgreSQL, the flapping
//! link) and the JSON lines it prints. The figures themselves are not
//! asserted: they belong to docs/benchmarks.md, not to a test.

use auditwal_test_support as common;

use std::process::Command;

#[test]
fn a_small_fleet_prints_one_json_line_per_case_with_the_flapping_host_apart() {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let out = Command::new(common::auditwal_bin())
        .args([
            "bench",
            "fleet",
            "--json",
            "--hosts",
            "1,2",
            "--host-rate",
            "50",
            "--case-secs",
            "2",
            "--flap",
            "0.5,0.5",
        ])
        .arg("--dir")
        .arg(scratch.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run auditwal bench fleet");
    common::assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON object"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");

    for (line, hosts) in lines.iter().zip([1, 2]) {
        assert_eq!(line["bench"], "fleet");
        assert_eq!(line["case"], format!("{hosts}-hosts-50"));
        assert_eq!(line["hosts"], hosts);
        assert_eq!(line["rate_per_host"], 50);
        for field in [
            "events",
            "secs",
            "events_per_sec",
            "p50_us",
            "p99_us",
            "lag_p50_ms",
            "lag_p99_ms",
            "loaders_cpu_cores",
            "writers_cpu_cores",
            "rows_loaded",
        ] {
            assert!(line[field].is_number(), "{field} missing: {line}");
        }
        // Every acknowledged event was loaded (the bench fails otherwise),
        // and the window saw some of them.
        assert!(line["events"].as_u64().is_some_and(|n| n > 0), "{line}");
        assert!(
            line["rows_loaded"].as_u64() >= line["events"].as_u64(),
            "{line}"
        );
    }
    assert!(lines[0].get("flapping_host").is_none(), "{}", lines[0]);
    assert_eq!(lines[1]["flapping_host"], 0);
    assert!(lines[1]["flap_lag_p99_ms"].is_number(), "{}", lines[1]);
    assert!(lines[1]["flap_down_secs"].is_number(), "{}", lines[1]);

    // The scratch directory holds nothing of the run any more.
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("read scratch")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn fleet_flags_are_refused_by_the_other_benches_and_bad_values_are_usage_errors() {
    for args in [
        &["bench", "wal", "--hosts", "4"][..],
        &["bench", "fleet", "--rate", "100"],
        &["bench", "fleet", "--hosts", "0"],
        &["bench", "fleet", "--flap", "5"],
    ] {
        let out = Command::new(common::auditwal_bin())
            .args(args)
            .output()
            .expect("run auditwal");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says nothing");
    }
}
