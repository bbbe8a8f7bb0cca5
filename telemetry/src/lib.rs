//! `causeway-telemetry`: the logging set-up shared by the controller and the agent.
//!
//! One `tracing` subscriber: an [`EnvFilter`] from `RUST_LOG` (every directive honoured,
//! e.g. `info,causeway_agent::dataplane=debug`) behind a reload handle, so the agent's
//! local admin endpoint can change it at run time ([`set_filter`]); events go to the
//! systemd journal with real priorities when stderr is connected to it (`JOURNAL_STREAM`
//! names stderr's device and inode, as systemd sets it for `StandardError=journal`), so
//! `journalctl -u causeway-agent -p warning` shows warnings and errors only; else to
//! stderr as text. Records of the `log` crate (rustls, quinn) go through the same filter.
//!
//! Also the plumbing both binaries' metrics endpoints share ([`metrics`], [`http`]).
//!
//! A crate of its own, not a module of `causeway-api`: that crate is pure (no files, no
//! sockets), and the journal needs a socket.

pub mod http;
pub mod metrics;

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// Changes the filter of a running subscriber.
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<FilterHandle> = OnceLock::new();

/// Parses filter directives (`RUST_LOG` syntax), refusing any that is not valid.
pub fn parse_filter(text: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder().parse(text).map_err(|e| {
        format!(
            "log filter {text:?} is not valid: {e}; use RUST_LOG directives such as \"info\" or \"warn,causeway_agent=debug\""
        )
    })
}

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The systemd journal (native protocol, with priorities and fields).
    Journal,
    /// Text lines on stderr.
    Stderr,
}

/// Where events go, given `JOURNAL_STREAM` (`"<device>:<inode>"`, set by systemd when
/// stdout or stderr is connected to the journal) and stderr's device and inode: the
/// journal only when the two name the same file (a child whose stderr was redirected
/// keeps the variable but not the stream).
pub fn choose_output(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> Output {
    let parsed = journal_stream.and_then(|v| {
        let (dev, ino) = v.split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    match (parsed, stderr) {
        (Some(j), Some(s)) if j == s => Output::Journal,
        _ => Output::Stderr,
    }
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Where this process's events go (see [`choose_output`]).
pub fn output() -> Output {
    let stream = std::env::var("JOURNAL_STREAM").ok();
    choose_output(stream.as_deref(), stderr_dev_ino())
}

fn journald() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    // syslog's meaning of the levels: info is informational, not "notice".
    let priorities = PriorityMappings {
        info: Priority::Informational,
        debug: Priority::Debug,
        ..PriorityMappings::new()
    };
    Ok(tracing_journald::layer()?
        .with_priority_mappings(priorities)
        .with_custom_fields([("VERSION", env!("CARGO_PKG_VERSION"))]))
}

/// The subscriber: `filter` (reloadable through the returned handle) in front of the
/// journal layer when `journal` is given, else text lines to `writer`.
pub fn subscriber<W>(
    filter: EnvFilter,
    journal: Option<tracing_journald::Layer>,
    writer: W,
    ansi: bool,
) -> (
    impl tracing::Subscriber + Send + Sync + 'static,
    FilterHandle,
)
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(filter);
    let text = journal.is_none().then(|| {
        fmt::layer()
            .with_writer(writer)
            .with_target(false)
            .with_ansi(ansi)
    });
    let s = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(text);
    (s, handle)
}

/// Installs the process's logging. `RUST_LOG` (or `default`) sets the filter, e.g.
/// "info" or "info,causeway_agent::dns=debug"; invalid directives are reported on stderr
/// and skipped.
pub fn init(default: &str) {
    let text = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let filter = parse_filter(&text).unwrap_or_else(|e| {
        eprintln!("warning: {e}; skipping the invalid directives");
        EnvFilter::builder().parse_lossy(&text)
    });
    let journal = match output() {
        Output::Journal => journald()
            .inspect_err(|e| {
                eprintln!("warning: cannot log to the journal ({e}); logging to stderr")
            })
            .ok(),
        Output::Stderr => None,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (s, handle) = subscriber(filter, journal, std::io::stderr, ansi);
    if s.try_init().is_ok() {
        let _ = HANDLE.set(handle);
    }
}

/// Replaces the running process's filter with `text` (RUST_LOG syntax); returns the
/// filter now in force. Fails when `text` is not valid or [`init`] has not run.
pub fn set_filter(text: &str) -> Result<String, String> {
    let handle = HANDLE
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_owned())?;
    reload_filter(handle, text)
}

/// The running process's filter, as text (None before [`init`]).
pub fn current_filter() -> Option<String> {
    HANDLE
        .get()
        .and_then(|h| h.with_current(|f| f.to_string()).ok())
}

/// Replaces the filter behind `handle` with `text`; returns the filter now in force.
pub fn reload_filter(handle: &FilterHandle, text: &str) -> Result<String, String> {
    let filter = parse_filter(text)?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    tracing::info!(filter = text, "log filter changed");
    handle
        .with_current(|f| f.to_string())
        .map_err(|e| format!("cannot read the log filter: {e}"))
}

/// Reports the error that ends the process, once: an `error` priority entry when logging
/// goes to the journal (`journalctl -p err` shows it), else one `error: ...` line on stderr.
pub fn fatal(error: &anyhow::Error) {
    let text = causeway_api::error_chain(error.as_ref());
    if output() == Output::Journal && HANDLE.get().is_some() {
        tracing::error!("{text}");
    } else {
        eprintln!("error: {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn emit() {
        tracing::debug!(target: "causeway_a::x", "a-debug");
        tracing::trace!(target: "causeway_a::x", "a-trace");
        tracing::info!(target: "causeway_b", "b-info");
        tracing::warn!(target: "causeway_b", "b-warn");
        tracing::debug!(target: "causeway_c", "c-debug");
    }

    #[test]
    fn every_directive_is_honoured_and_the_filter_reloads() {
        let buf = Buf::default();
        let w = buf.clone();
        let filter = parse_filter("warn,causeway_a=debug,causeway_c=debug").unwrap();
        let (s, handle) = subscriber(filter, None, move || w.clone(), false);
        tracing::subscriber::with_default(s, || {
            emit();
            let t = buf.text();
            // The first directive (the default level) and both later ones.
            assert!(t.contains("a-debug") && t.contains("c-debug"), "{t}");
            assert!(t.contains("b-warn") && !t.contains("b-info"), "{t}");
            assert!(!t.contains("a-trace"), "{t}");

            let now = reload_filter(&handle, "info,causeway_a=trace").unwrap();
            assert!(now.contains("causeway_a=trace"), "{now}");
            buf.0.lock().unwrap().clear();
            emit();
            let t = buf.text();
            assert!(t.contains("a-trace") && t.contains("b-info"), "{t}");
            assert!(!t.contains("c-debug"), "{t}");

            let err = reload_filter(&handle, "info,causeway_a=loud").unwrap_err();
            assert!(
                err.contains("causeway_a=loud") && err.contains("RUST_LOG"),
                "{err}"
            );
        });
    }

    #[test]
    fn journal_only_when_journal_stream_names_stderr() {
        assert_eq!(
            choose_output(Some("8:1234"), Some((8, 1234))),
            Output::Journal
        );
        // Inherited variable, stderr redirected elsewhere.
        assert_eq!(choose_output(Some("8:1234"), Some((8, 99))), Output::Stderr);
        assert_eq!(choose_output(None, Some((8, 1234))), Output::Stderr);
        assert_eq!(
            choose_output(Some("garbage"), Some((8, 1234))),
            Output::Stderr
        );
        assert_eq!(choose_output(Some("8:1234"), None), Output::Stderr);
        // This test's own stderr is not the journal.
        assert!(stderr_dev_ino().is_some());
    }
}
