//! Logging setup: one `tracing` subscriber writing JSON or text lines to stdout. The proxy emits
//! access-log events on target [`ACCESS_TARGET`] (one per request); everything else is ordinary
//! logs. Level from `RUST_LOG` (default `info`). rustls logs peer misbehaviour at `warn` (an IP
//! address sent as SNI, on every handshake from such a client), so a client could write a log
//! line per handshake: rustls is held at `error` unless `RUST_LOG` names it.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Target of access-log events (`tracing::info!(target: "portico::access", ...)`).
pub const ACCESS_TARGET: &str = "portico::access";

/// Install the global subscriber. Safe to call once; a second call is ignored (tests).
pub fn init(format: LogFormat, access_log: bool) {
    let filter = filter(
        std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(),
        access_log,
    );
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
