//! Logging setup: one `tracing` subscriber writing JSON or text lines to stdout. The proxy emits
//! access-log events on target [`ACCESS_TARGET`] (one per request); everything else is ordinary
//! logs. Level from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Target of access-log events (`tracing::info!(target: "portico::access", ...)`).
pub const ACCESS_TARGET: &str = "portico::access";

/// Install the global subscriber. Safe to call once; a second call is ignored (tests).
pub fn init(format: LogFormat, access_log: bool) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !access_log && let Ok(directive) = format!("{ACCESS_TARGET}=off").parse() {
        filter = filter.add_directive(directive);
    }
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
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
}
