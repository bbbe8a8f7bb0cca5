//! `causeway-registry`: turns the registries a company already runs into normalized
//! endpoints with provenance, for the controller to merge.
//!
//! What it does: one module per source — [`consul`] (blocking queries on the catalog
//! and health endpoints), [`eureka`] (full fetch, then deltas reconciled by
//! `apps__hashcode`), [`kubernetes`] (kube-rs watchers on Services and EndpointSlices,
//! re-listing on 410), [`file`] (external services in a TOML file, reloaded on change).
//! Each source runs as a task, keeps its last known good data, and reports
//! [`SourceUpdate`]s: its data (a full snapshot or the services that changed) and its
//! state (syncing, synced, or stale with the last error). A failing source never sends
//! an empty snapshot; it sends its state as stale, and the controller keeps its endpoints
//! marked stale (see [`causeway_api::registry::Registry::mark_stale`]).
//!
//! What it does not: merge sources (that is [`causeway_api::registry::Registry`], driven
//! by the controller) or persist anything.
//!
//! # Wiring it into the controller
//!
//! ```no_run
//! # async fn wire(config: causeway_registry::SourcesConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use causeway_api::registry::Registry;
//! use causeway_registry::{SourceOptions, spawn_sources, apply_update};
//!
//! config.validate()?;                       // every problem at once
//! let (tx, mut rx) = tokio::sync::mpsc::channel(64);
//! let tasks = spawn_sources(&config, &SourceOptions::default(), tx)?; // JoinHandles
//! let mut registry = Registry::new();       // or restored from the store
//! while let Some(update) = rx.recv().await {
//!     let now_ms = 0; // the controller's clock
//!     for delta in apply_update(&mut registry, update, now_ms) {
//!         // persist `registry`, push `delta` (version + per-service changes) to agents
//!         let _ = delta;
//!     }
//!     // each source's state for the admin API: `registry.sources()[name].state`
//! }
//! # drop(tasks); Ok(()) }
//! ```
//!
//! Each task stops when the receiver is dropped (or when aborted through its handle).
//! Each source also works alone: `ConsulSource::new(&cfg, &opts)?.run(tx).await`.
//!
//! Clients are plain HTTP(S) through reqwest with rustls; the ring crypto provider is
//! installed for the process when a source is created, if none is installed yet.

pub mod config;
pub mod consul;
pub mod eureka;
pub mod file;
pub mod kubernetes;
mod source;

pub use config::{
    ConfigErrors, ConsulSourceConfig, EurekaSourceConfig, FileSourceConfig, KubernetesSourceConfig,
    SourcesConfig,
};
pub use consul::ConsulSource;
pub use eureka::EurekaSource;
pub use file::FileSource;
pub use kubernetes::KubernetesSource;
pub use source::{
    FetchError, SourceError, SourceOptions, SourceUpdate, apply_update, apply_update_into,
    spawn_sources,
};
