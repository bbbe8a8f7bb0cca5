//! `causeway-agent`: the Causeway node agent that runs on every VM.
//!
//! What it does now: enrolls the host with a join token ([`client::join`]), keeping the
//! private key on the host; renews the workload certificate over mutual TLS before it
//! expires ([`run`]); subscribes to config and keeps it on disk ([`push`]); captures and
//! proxies traffic through the mTLS tunnel ([`dataplane`]); answers the mesh's names and
//! forwards the rest ([`dns`]); reports identity, expiry, controller connection and
//! config version ([`status`]); serves health, readiness and metrics on 15020 and tells
//! systemd when it is ready ([`health`]). State files are written off the data-plane
//! thread ([`writer`]). Inbound plaintext is authorized on 15006
//! ([`dataplane::plaintext`]).

pub mod client;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod health;
pub mod identity;
pub mod jwks;
pub mod logging;
pub mod metrics;
pub mod pinned;
pub mod push;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod writer;
