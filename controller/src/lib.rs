//! `causeway-controller`: the control plane of Causeway.
//!
//! What it does: keeps state in a [`store::Store`] (sled by default), runs the
//! certificate authority ([`ca`]), admits agents with join tokens and renews their
//! certificates ([`enroll`]) over the QUIC control endpoint ([`control`]), and serves the
//! admin HTTP API for `causewayctl` ([`admin`]).
//!
//! What it does not (yet): merge registries or push config; those arrive with the
//! registry and push work.

pub mod admin;
pub mod ca;
pub mod config;
pub mod control;
pub mod csr;
pub mod durability;
pub mod enroll;
pub mod logging;
pub mod mesh;
pub mod push;
pub mod store;
pub mod tls_listener;
