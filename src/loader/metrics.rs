//! The loader's counters and gauges, and a minimal Prometheus text endpoint.
//!
//! Everything an operator would page on: rows loaded, batches, errors, retries,
//! dead-lettered rows, corrupt ranges skipped, and per stream the lag in records,
//! bytes and seconds and the segments still pending. Values are plain atomics
//! updated by the stream tasks; the endpoint renders them in the Prometheus text
//! exposition format (version 0.0.4) on `GET /metrics`. It is hand-written on a
//! tokio listener rather than pulling an HTTP stack into the loader for one page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Per-stream figures.
#[derive(Default, Debug)]
pub struct StreamMetrics {
    pub rows_loaded: AtomicU64,
    pub batches: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub corrupt_ranges: AtomicU64,
    pub lag_records: AtomicU64,
    pub lag_bytes: AtomicU64,
    /// Seconds, stored as f64 bits.
    pub lag_seconds_bits: AtomicU64,
    pub segments_pending: AtomicU64,
    pub checkpoint_lsn: AtomicU64,
}

impl StreamMetrics {
    pub fn set_lag_seconds(&self, secs: f64) {
        self.lag_seconds_bits
            .store(secs.to_bits(), Ordering::Relaxed);
    }
    pub fn lag_seconds(&self) -> f64 {
        f64::from_bits(self.lag_seconds_bits.load(Ordering::Relaxed))
    }
}

/// All of the loader's figures.
#[derive(Default, Debug)]
pub struct LoaderMetrics {
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    streams: Mutex<BTreeMap<String, Arc<StreamMetrics>>>,
}

impl LoaderMetrics {
    /// The figures of one stream, created on first use.
    pub fn stream(&self, stream_id: &str) -> Arc<StreamMetrics> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.entry(stream_id.to_string()).or_default().clone()
    }

    /// Sum of rows loaded over all streams.
    pub fn rows_loaded(&self) -> u64 {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .values()
            .map(|s| s.rows_loaded.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of dead-lettered rows over all streams.
    pub fn dead_lettered(&self) -> u64 {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .values()
            .map(|s| s.dead_lettered.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "auditwal_loader_errors_total",
            "Database and WAL errors seen by the loader.",
            self.errors.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "auditwal_loader_retries_total",
            "Batch attempts retried after an error.",
            self.retries.load(Ordering::Relaxed),
        );
        let streams: Vec<(String, Arc<StreamMetrics>)> = {
            let s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            s.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        type Getter = fn(&StreamMetrics) -> f64;
        let per_stream: [(&str, &str, &str, Getter); 9] = [
            (
                "auditwal_loader_rows_loaded_total",
                "counter",
                "Rows committed to audit_events.",
                |s| s.rows_loaded.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_batches_total",
                "counter",
                "Batches committed.",
                |s| s.batches.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_dead_lettered_rows_total",
                "counter",
                "Rows PostgreSQL refused, written to the dead-letter file.",
                |s| s.dead_lettered.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_corrupt_ranges_total",
                "counter",
                "Corrupt WAL byte ranges skipped.",
                |s| s.corrupt_ranges.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_lag_records",
                "gauge",
                "Records written to the WAL and not yet committed.",
                |s| s.lag_records.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_lag_bytes",
                "gauge",
                "WAL bytes written and not yet committed.",
                |s| s.lag_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_lag_seconds",
                "gauge",
                "Age of the oldest record not yet committed.",
                StreamMetrics::lag_seconds,
            ),
            (
                "auditwal_loader_segments_pending",
                "gauge",
                "Segment files not yet fully committed.",
                |s| s.segments_pending.load(Ordering::Relaxed) as f64,
            ),
            (
                "auditwal_loader_checkpoint_lsn",
                "gauge",
                "Last LSN committed.",
                |s| s.checkpoint_lsn.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, get) in per_stream {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (stream, m) in &streams {
                let _ = writeln!(
                    out,
                    "{name}{{stream=\"{}\"}} {}",
                    escape_label(stream),
                    get(m)
                );
            }
        }
        out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<LoaderMetrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Requests are tiny; read what arrives in one go and answer.
            let mut buf = [0u8; 1024];
            let n = match sock.read(&mut buf).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics") || request.starts_with("GET / ") {
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_stream() {
        let m = LoaderMetrics::default();
        m.stream("a").rows_loaded.fetch_add(5, Ordering::Relaxed);
        m.stream("b").set_lag_seconds(1.5);
        let text = m.render();
        assert!(
            text.contains("auditwal_loader_rows_loaded_total{stream=\"a\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("auditwal_loader_lag_seconds{stream=\"b\"} 1.5"),
            "{text}"
        );
    }
}
