//! A progress bar for the batch commands, `load --once` and `replay`: on stderr,
//! and only when stderr is a terminal.
//!
//! This module owns three things: deciding whether a bar is shown at all
//! ([`wanted`]), estimating how much there is to do from the WAL on disk
//! ([`Estimate`]), and drawing a count the library keeps (the loader's metrics,
//! replay's row counter) by polling it from a thread of its own ([`Progress`]).
//! It also owns [`log_writer`], the tracing writer that clears the bar around
//! each log line, so logs and bar never tear each other. It never writes to
//! stdout: stdout is the command line contract's output. Whenever no bar is
//! shown (stderr piped or redirected, `TERM=dumb`, `--no-progress`) nothing here
//! writes anything, and stderr is byte for byte what it was without this module.
//!
//! The counting itself is left to the library; the bar only reads it.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use auditwal::wal::format::DURABLE_LSN_FILE;
use auditwal::wal::{list_segments, read_durable_lsn, Lsn};
use indicatif::{HumanCount, ProgressBar, ProgressState, ProgressStyle};

/// How often the bar reads the count (indicatif itself redraws at most 20 times a
/// second).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the total is estimated again: a stream settled by the loader, or a
/// writer still appending, raises its durable watermark while we load.
const ESTIMATE_EVERY: u32 = 10;

/// The bar being drawn, if any, for [`log_writer`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// True when a bar should be drawn: stderr is a terminal that can move its
/// cursor, and the user did not ask for none.
pub fn wanted(no_progress: bool) -> bool {
    !no_progress
        && io::stderr().is_terminal()
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// The work ahead, in LSNs, per stream: from just after the last LSN already
/// done up to the stream's durable watermark, read again on each [`Estimate::total`]
/// (a stream the loader settles, or a writer still appending, raises it meanwhile).
///
/// An estimate, a little high: every sealed segment ends with an end-of-segment
/// record that takes an LSN but is not a row, and damaged ranges the reader skips
/// hold LSNs that are never loaded. With the default 64 MiB segments that is one
/// LSN in a few hundred thousand.
pub struct Estimate {
    /// Stream directory and the last LSN not to count there, fixed at the start.
    streams: Vec<(PathBuf, Lsn)>,
}

impl Estimate {
    /// `streams`: each stream directory with the last LSN already loaded (or not
    /// asked for) there.
    pub fn new(streams: Vec<(PathBuf, Lsn)>) -> Estimate {
        let streams = streams
            .into_iter()
            .map(|(dir, done_through)| {
                // LSNs below the first segment still on disk are gone (retired, or
                // not in this archive): nobody will read them.
                let first = list_segments(&dir)
                    .ok()
                    .and_then(|s| s.first().map(|s| s.first_lsn));
                let base = first.map_or(done_through, |f| done_through.max(f.saturating_sub(1)));
                (dir, base)
            })
            .collect();
        Estimate { streams }
    }

    /// LSNs to do from the start, or `None` when a stream has no durable watermark
    /// (an archive directory) or it cannot be read: then only the count is shown.
    pub fn total(&self) -> Option<u64> {
        let mut total = 0u64;
        for (dir, base) in &self.streams {
            if !dir.join(DURABLE_LSN_FILE).exists() {
                return None;
            }
            let durable = read_durable_lsn(dir).ok()?;
            total = total.saturating_add(durable.saturating_sub(*base));
        }
        Some(total)
    }
}

/// A bar on stderr, fed by a polling thread until [`Progress::finish`].
pub struct Progress {
    bar: ProgressBar,
    stop: mpsc::Sender<()>,
    poller: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing `verb` ("load", "replay") with the count `count()` against
    /// the total of `estimate` (count and rate alone when there is none).
    pub fn start(
        verb: &'static str,
        estimate: Option<Estimate>,
        count: impl Fn() -> u64 + Send + 'static,
    ) -> Progress {
        let total = estimate.as_ref().and_then(Estimate::total);
        let bar = ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::stderr())
            .with_style(style(total.is_some()))
            .with_prefix(verb);
        set_active(Some(bar.clone()));
        let (stop, stopped) = mpsc::channel::<()>();
        let poller = {
            let bar = bar.clone();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || poll(&bar, estimate, count, &stopped))
                .map_err(|e| tracing::debug!("no progress bar: cannot start its thread: {e}"))
                .ok()
        };
        Progress { bar, stop, poller }
    }

    /// Stops polling and leaves the bar's last state on screen. `complete` says the
    /// work ran to its end: the bar then reads 100 % whatever the estimate said.
    pub fn finish(mut self, count: u64, complete: bool) {
        let _ = self.stop.send(());
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        self.bar.set_position(count);
        if complete {
            if self.bar.length().is_some() {
                self.bar.set_length(count);
            }
            self.bar.finish();
        } else {
            self.bar.abandon();
        }
        set_active(None);
        // The bar's last line has no newline of its own: end it, so whatever comes
        // next on stderr (a log line, replay's summary) starts a line of its own.
        if !self.bar.is_hidden() {
            eprintln!();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // finish() took the poller; an early return (a panic, `?`) did not.
        if let Some(poller) = self.poller.take() {
            let _ = self.stop.send(());
            let _ = poller.join();
            self.bar.abandon();
            set_active(None);
            if !self.bar.is_hidden() {
                eprintln!();
            }
        }
    }
}

fn poll(
    bar: &ProgressBar,
    estimate: Option<Estimate>,
    count: impl Fn() -> u64,
    stopped: &mpsc::Receiver<()>,
) {
    let mut ticks = 0u32;
    loop {
        let pos = count();
        bar.set_position(pos);
        ticks = ticks.wrapping_add(1);
        if let Some(len) = bar.length() {
            let total = if ticks % ESTIMATE_EVERY == 0 {
                estimate.as_ref().and_then(Estimate::total).unwrap_or(len)
            } else {
                len
            };
            // The total only grows, and never below the count (the estimate is one).
            let total = total.max(len).max(pos);
            if total != len {
                bar.set_length(total);
            }
        }
        match stopped.recv_timeout(POLL_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn style(with_total: bool) -> ProgressStyle {
    let template = if with_total {
        "{prefix} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows  {rate}  ETA {eta}"
    } else {
        "{spinner} {prefix} [{elapsed_precise}] {human_pos} rows  {rate}"
    };
    // The templates are constants: a failure here is a bug caught by any run with a
    // terminal, and falls back to indicatif's plain bar rather than failing the load.
    let style = match ProgressStyle::with_template(template) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("progress bar template: {e}");
            ProgressStyle::default_bar()
        }
    };
    style.progress_chars("=> ").with_key(
        "rate",
        |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{} rows/s", HumanCount(state.per_sec() as u64));
        },
    )
}

fn set_active(bar: Option<ProgressBar>) {
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = bar;
}

fn active() -> Option<ProgressBar> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The tracing writer: stderr, with the bar (when one is drawn) cleared before
/// each log line and drawn again after it, so neither overwrites the other.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// See [`log_writer`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match active() {
            // The formatter hands over one whole line per write; keep it whole.
            Some(bar) => bar
                .suspend(|| io::stderr().write_all(buf))
                .map(|()| buf.len()),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
