//! Logging setup: one `tracing` subscriber writing JSON or text lines to stdout. The proxy emits
//! access-log events on target [`ACCESS_TARGET`] (one per request); everything else is ordinary
//! logs. Level from `RUST_LOG` (default `info`). rustls logs peer misbehaviour at `warn` (an IP
//! address sent as SNI, on every handshake from such a client), so a client could write a log
//! line per handshake: rustls is held at `error` unless `RUST_LOG` names it.
//!
//! Lines are formatted where the event happens and written by one writer thread
//! (`tracing-appender`'s non-blocking writer): a request never waits on stdout. A container's
//! stdout is a pipe that the runtime's log collector drains, and a slow or stuck collector
//! would otherwise stop every worker thread at its next log line, so every request. The
//! thread writes whatever queued in as few `write(2)`s as it can (64 KiB at a time) and holds
//! at most [`QUEUED_LINES`]; past
//! that, lines are dropped, not waited for, and counted in `portico_log_lines_dropped_total`
//! ([`LogGuard::register_metrics`]). The guard returned by [`init`] flushes what is queued
//! when dropped, waiting at most 2 s for a stuck stdout.

use std::io::Write;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, Registry};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines queued for the writer thread before new ones are dropped: about a second of access
/// log at 16 000 requests/s, and at most a few MiB of memory while stdout is stuck.
pub const QUEUED_LINES: usize = 16_384;

/// Longest wait at exit for the writer thread to flush its queue.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// Keeps the writer thread's queue flushed at exit; see the module doc.
pub struct LogGuard {
    worker: Option<WorkerGuard>,
    dropped: ErrorCounter,
}

impl Drop for LogGuard {
    /// tracing-appender's guard waits 100 ms to queue its shutdown, then 1 s for the flush,
    /// but when the queue is still full (stdout stuck) it reports that with `println!`, which
    /// blocks on the same stuck stdout: the process would never exit. So the guard is dropped
    /// on a thread of its own, and exit waits for it at most [`FLUSH_AT_EXIT`]; lines that
    /// stdout did not take by then are lost with the process.
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let (done, flushed) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("portico-log-exit".into())
            .spawn(move || {
                drop(worker);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = flushed.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

impl LogGuard {
    /// Export `portico_log_lines_dropped_total` from `registry` (read at every scrape).
    pub fn register_metrics(&self, registry: &Registry) -> prometheus::Result<()> {
        let counter = IntCounter::new(
            "portico_log_lines_dropped_total",
            "Log lines dropped because stdout did not keep up (writer queue full)",
        )?;
        registry.register(Box::new(DroppedLines {
            counter,
            dropped: self.dropped.clone(),
        }))
    }
}

/// A counter that follows the writer's own count of dropped lines.
struct DroppedLines {
    counter: IntCounter,
    dropped: ErrorCounter,
}

impl Collector for DroppedLines {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = u64::try_from(self.dropped.dropped_lines()).unwrap_or(u64::MAX);
        // Only ever grows; scrapes may race, hence the saturating difference.
        self.counter.inc_by(now.saturating_sub(self.counter.get()));
        self.counter.collect()
    }
}

/// Target of access-log events (`tracing::info!(target: "portico::access", ...)`).
pub const ACCESS_TARGET: &str = "portico::access";

/// Install the global subscriber and start the writer thread. Keep the guard until the
/// process ends: dropping it flushes and stops the writer. A second call installs nothing
/// (tests) but still returns a guard.
pub fn init(format: LogFormat, access_log: bool) -> LogGuard {
    let filter = filter(
        std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(),
        access_log,
    );
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("portico-log")
        .finish(stdout_batched());
    let guard = LogGuard {
        dropped: writer.error_counter(),
        worker: Some(worker),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
    // Err only when a subscriber is already installed.
    let _ = result;
    guard
}

/// Stdout for the writer thread, buffered so that the lines queued since its last write go
/// out in one `write(2)` (the thread flushes whenever its queue runs empty). `std::io::Stdout`
/// flushes at every newline, so it writes through a duplicate of the descriptor instead (same
/// open file, so appends and pipes behave as before); if that cannot be made, plain stdout.
fn stdout_batched() -> Box<dyn Write + Send> {
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::File::from(fd),
        )),
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// The log filter for `RUST_LOG` = `env` (unset or invalid: `info`).
fn filter(env: Option<&str>, access_log: bool) -> EnvFilter {
    let spec = env.unwrap_or("info");
    let mut filter = EnvFilter::try_new(spec).unwrap_or_else(|_| {
        // Nothing is logging yet: say it where the operator looks first.
        eprintln!("RUST_LOG={spec:?} is not a valid filter; logging at info");
        EnvFilter::new("info")
    });
    // Only a directive for rustls itself (`rustls`, `rustls::...`) lifts the clamp; one for
    // `tokio_rustls` or `hyper_rustls` does not.
    let names_rustls = spec.split(',').any(|d| {
        let target = d.split(['=', '[']).next().unwrap_or_default().trim();
        target == "rustls" || target.starts_with("rustls::")
    });
    if !names_rustls && let Ok(directive) = "rustls=error".parse() {
        filter = filter.add_directive(directive);
    }
    if !access_log && let Ok(directive) = format!("{ACCESS_TARGET}=off").parse() {
        filter = filter.add_directive(directive);
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::filter;

    fn directives(env: Option<&str>, access_log: bool) -> Vec<String> {
        let mut d: Vec<String> = filter(env, access_log)
            .to_string()
            .split(',')
            .map(str::to_owned)
            .collect();
        d.sort();
        d
    }

    #[test]
    fn rustls_is_held_at_error_unless_rust_log_names_it() {
        assert_eq!(directives(None, true), ["info", "rustls=error"]);
        assert_eq!(directives(Some("debug"), true), ["debug", "rustls=error"]);
        assert_eq!(
            directives(Some("info,rustls=warn"), true),
            ["info", "rustls=warn"]
        );
        assert_eq!(
            directives(None, false),
            ["info", "portico::access=off", "rustls=error"]
        );
        assert_eq!(
            directives(Some("not a [filter"), true),
            ["info", "rustls=error"]
        );
        // A crate whose name merely contains "rustls" leaves the clamp in place.
        assert_eq!(
            directives(Some("info,tokio_rustls=debug"), true),
            ["info", "rustls=error", "tokio_rustls=debug"]
        );
        assert_eq!(
            directives(Some("rustls::server=debug"), true),
            ["rustls::server=debug"]
        );
    }
}
