//! `causeway-agent`: the Causeway node agent that runs on every VM.
//!
//! What it does now: enrolls the host with a join token ([`client::join`]), keeping the
//! private key on the host; renews the workload certificate over mutual TLS before it
//! expires ([`run`]); reports identity, expiry and controller connection ([`status`]).
//!
//! What it does not (yet): config push, the transparent proxy and DNS arrive with their
//! own work items.

pub mod client;
pub mod config;
pub mod dataplane;
pub mod identity;
pub mod logging;
pub mod pinned;
pub mod push;
pub mod run;
pub mod status;
