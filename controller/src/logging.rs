//! Logging: the set-up shared with the other Causeway binaries (`causeway-telemetry`):
//! `RUST_LOG` as an `EnvFilter` (every directive honoured, changeable at run time), to
//! the systemd journal with real priorities when stderr is connected to it, else stderr.

pub use causeway_telemetry::{fatal, init};
