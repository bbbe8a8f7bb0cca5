//! `causeway-controller`: the control plane of Causeway.
//!
//! What it does: keeps state in a [`store::Store`] (sled by default), runs the
//! certificate authority ([`ca`]), admits agents with join tokens and renews their
//! certificates ([`enroll`]) over the QUIC control endpoint ([`control`]), merges the
//! registry sources into one registry with VIPs and agent leases ([`mesh`]), pushes
//! config to subscribed agents ([`push`]), and serves the admin HTTP API for
//! `causewayctl` ([`admin`]), with policy resources and `why` ([`policy_admin`]), and
//! Prometheus metrics on a listener of their own ([`metrics`]).
//!
//! [`app::start`] wires these together; the binary and in-process tests call it.
//!
//! The state can also live in etcd ([`store_etcd`], `[store] backend = "etcd"`), shared
//! by several controllers. What it does not (yet): elect a leader for the registry
//! watchers, or push changes made through another controller.

pub mod address;
pub mod admin;
pub mod admin_server;
pub mod analyze;
pub mod app;
pub mod ca;
pub mod config;
pub mod control;
pub mod csr;
pub mod durability;
pub mod enroll;
pub mod etcd;
pub mod ha;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod policy_admin;
pub mod push;
pub mod route_admin;
pub mod sd;
pub mod store;
pub mod store_etcd;
pub mod tls_listener;
pub mod traffic;
pub mod ui;
