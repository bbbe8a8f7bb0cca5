//! Logging: `tracing` to stderr, or to the systemd journal when stderr is connected to it
//! (JOURNAL_STREAM set by systemd), through systemd-journal-logger with real priorities,
//! so `journalctl -u causeway-controller -p warning` shows warnings and errors only.

/// Installs the logger. `RUST_LOG` (or `default`) sets the level, e.g. "info".
pub fn init(default: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    if systemd_journal_logger::connected_to_journal()
        && let Ok(journal) = systemd_journal_logger::JournalLog::new()
    {
        let level = match filter.split(',').next().unwrap_or("info") {
            "trace" => log::LevelFilter::Trace,
            "debug" => log::LevelFilter::Debug,
            "warn" => log::LevelFilter::Warn,
            "error" => log::LevelFilter::Error,
            _ => log::LevelFilter::Info,
        };
        // With no tracing subscriber installed, tracing's `log` feature forwards every
        // event (message and fields) to this logger.
        if journal
            .with_extra_fields(vec![("VERSION", env!("CARGO_PKG_VERSION"))])
            .install()
            .is_ok()
        {
            log::set_max_level(level);
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Reports the error that ends the process, once: an `error` priority entry when logging
/// goes to the journal (`journalctl -p err` shows it), else one `error: ...` line on stderr.
pub fn fatal(error: &anyhow::Error) {
    let text = causeway_api::error_chain(error.as_ref());
    if systemd_journal_logger::connected_to_journal() {
        tracing::error!("{text}");
    } else {
        eprintln!("error: {text}");
    }
}
