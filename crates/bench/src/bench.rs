//! The bench output format of the contract: one JSON object per line with `--json`
//! (`bench`, `case`, `events`, `secs`, `events_per_sec`, optional percentiles, and for
//! a comparison `baseline` + `ratio`, ours / baseline, higher is better), otherwise a
//! readable table. Also percentile helpers shared by every bench.

use anyhow::{anyhow, Context};
use serde::Serialize;

use super::Failure;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub bench: &'static str,
    pub case: String,
    pub events: u64,
    pub secs: f64,
    pub events_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Anything else a bench measures (e.g. peak_rss_mb), flattened into the object.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BenchResult {
    pub fn new(bench: &'static str, case: impl Into<String>, events: u64, secs: f64) -> Self {
        BenchResult {
            bench,
            case: case.into(),
            events,
            secs,
            events_per_sec: if secs > 0.0 {
                events as f64 / secs
            } else {
                0.0
            },
            p50_us: None,
            p99_us: None,
            p999_us: None,
            baseline: None,
            ratio: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Sets p50/p99/p99.9 from latency samples in nanoseconds.
    pub fn with_latencies_ns(mut self, samples: &mut [u64]) -> Self {
        if !samples.is_empty() {
            samples.sort_unstable();
            self.p50_us = Some(percentile(samples, 50.0) as f64 / 1000.0);
            self.p99_us = Some(percentile(samples, 99.0) as f64 / 1000.0);
            self.p999_us = Some(percentile(samples, 99.9) as f64 / 1000.0);
        }
        self
    }

    /// Names `baseline` as this case's baseline and sets the throughput ratio.
    pub fn against(mut self, baseline: &BenchResult) -> Self {
        self.baseline = Some(baseline.case.clone());
        self.ratio = if baseline.events_per_sec > 0.0 {
            Some(self.events_per_sec / baseline.events_per_sec)
        } else {
            None
        };
        self
    }
}

/// A whole-number knob of a bench from the environment (`AUDITWAL_BENCH_*`),
/// `default` when unset; anything else is a usage error naming the variable.
pub fn env_u64(name: &str, default: u64) -> Result<u64, Failure> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| Failure::usage(anyhow!("{name}={v:?} is not a whole number"))),
        Err(_) => Ok(default),
    }
}

/// The median of `v` (the upper one for an even count), `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// One line for a case measured over several rounds: the round with the median
/// throughput gives `events` and `secs`, and each percentile is the median of
/// the rounds' percentiles.
pub fn median_of_rounds(
    bench: &'static str,
    case: String,
    per_round: &[BenchResult],
) -> BenchResult {
    let mut by_rate: Vec<&BenchResult> = per_round.iter().collect();
    by_rate.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
    let Some(mid) = by_rate.get(by_rate.len() / 2) else {
        return BenchResult::new(bench, case, 0, 0.0);
    };
    let mut out = BenchResult::new(bench, case, mid.events, mid.secs);
    out.p50_us = median(per_round.iter().filter_map(|r| r.p50_us).collect());
    out.p99_us = median(per_round.iter().filter_map(|r| r.p99_us).collect());
    out.p999_us = median(per_round.iter().filter_map(|r| r.p999_us).collect());
    out
}

/// The `p`th percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints results as JSON lines or as a table.
pub fn report(results: &[BenchResult], json: bool) {
    if json {
        for r in results {
            match serde_json::to_string(r) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("auditwal: cannot encode bench result: {e}"),
            }
        }
        return;
    }
    let fmt_opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{:<8} {:<22} {:>10} {:>8} {:>14} {:>9} {:>9} {:>9}  {:<22} {:>6}",
        "bench",
        "case",
        "events",
        "secs",
        "events/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "baseline",
        "ratio"
    );
    for r in results {
        println!(
            "{:<8} {:<22} {:>10} {:>8.2} {:>14.0} {:>9} {:>9} {:>9}  {:<22} {:>6}",
            r.bench,
            r.case,
            r.events,
            r.secs,
            r.events_per_sec,
            fmt_opt(r.p50_us),
            fmt_opt(r.p99_us),
            fmt_opt(r.p999_us),
            r.baseline.as_deref().unwrap_or("-"),
            r.ratio
                .map_or_else(|| "-".to_string(), |v| format!("{v:.2}")),
        );
        for (k, v) in &r.extra {
            println!("{:<8} {:<22} {k} = {v}", "", "");
        }
    }
}

/// Leaves PostgreSQL with no maintenance owed before a case: the rows of the
/// cases before it would otherwise start autovacuum (insert-driven since
/// PostgreSQL 13) or a checkpoint inside whichever case came next, on the cores
/// the bench shares, and charge it to the wrong case. VACUUM ANALYZE does that
/// work now; CHECKPOINT makes every case start from the same state (its first
/// writes of each page carry a full-page image). CHECKPOINT needs superuser or
/// pg_checkpoint: with a `DATABASE_URL` role that has neither, it is skipped.
pub async fn quiesce(pg: &mut sqlx::PgConnection) -> Result<(), Failure> {
    sqlx::query("VACUUM (ANALYZE) audit_events")
        .execute(&mut *pg)
        .await
        .context("VACUUM ANALYZE audit_events before a case")?;
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut *pg).await {
        tracing::debug!(error = %e, "CHECKPOINT before a case skipped");
    }
    Ok(())
}
