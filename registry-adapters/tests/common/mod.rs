//! Shared test support: fast options and a harness that applies updates to a registry.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use causeway_api::registry::{Endpoint, Registry, RegistryDelta, ServiceKey, SourceStatus};
use causeway_registry::{SourceOptions, SourceUpdate, apply_update};
use tokio::sync::mpsc;

/// Short intervals so that tests run quickly; nothing asserts on timing.
pub fn fast_options() -> SourceOptions {
    SourceOptions {
        consul_wait: Duration::from_millis(1000),
        request_timeout: Duration::from_millis(1000),
        min_interval: Duration::from_millis(10),
        error_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        max_body_bytes: 256 * 1024,
        eureka_interval: Duration::from_millis(50),
        file_interval: Duration::from_millis(50),
    }
}

/// Receives updates, applies them to a registry, keeps every delta.
pub struct Harness {
    pub rx: mpsc::Receiver<SourceUpdate>,
    pub registry: Registry,
    pub deltas: Vec<RegistryDelta>,
    pub updates: Vec<SourceUpdate>,
}

/// A hang guard, not a timing assertion: the condition is expected long before it.
const GUARD: Duration = Duration::from_secs(30);

impl Harness {
    pub fn new() -> (Self, mpsc::Sender<SourceUpdate>) {
        let (tx, rx) = mpsc::channel(256);
        (
            Self {
                rx,
                registry: Registry::new(),
                deltas: Vec::new(),
                updates: Vec::new(),
            },
            tx,
        )
    }

    /// Applies updates until `cond` holds; returns the deltas produced meanwhile.
    pub async fn until(
        &mut self,
        what: &str,
        cond: impl Fn(&Registry) -> bool,
    ) -> Vec<RegistryDelta> {
        let mut got = Vec::new();
        if cond(&self.registry) {
            return got;
        }
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            let update = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(u)) => u,
                Ok(None) => panic!("waiting for {what}: the source stopped"),
                Err(_) => panic!(
                    "waiting for {what}: not reached; last updates: {:#?}\nregistry: {:#?}",
                    self.updates.iter().rev().take(3).collect::<Vec<_>>(),
                    self.registry.merged()
                ),
            };
            let deltas = apply_update(&mut self.registry, update.clone(), 0);
            self.updates.push(update);
            self.deltas.extend(deltas.iter().cloned());
            got.extend(deltas);
            if cond(&self.registry) {
                return got;
            }
        }
    }

    pub fn endpoints(&self, ns: &str, name: &str) -> Vec<Endpoint> {
        self.registry
            .merged()
            .get(&ServiceKey::new(ns, name))
            .cloned()
            .unwrap_or_default()
    }

    pub fn status(&self, source: &str) -> Option<SourceStatus> {
        self.registry.sources().get(source).map(|s| s.state.status)
    }

    pub fn last_error(&self, source: &str) -> String {
        self.registry
            .sources()
            .get(source)
            .and_then(|s| s.state.last_error.clone())
            .unwrap_or_default()
    }
}

pub fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey::new(ns, name)
}

/// Endpoints of `key` in `reg`.
pub fn eps(reg: &Registry, ns: &str, name: &str) -> Vec<Endpoint> {
    reg.merged()
        .get(&ServiceKey::new(ns, name))
        .cloned()
        .unwrap_or_default()
}

pub fn stale_of(reg: &Registry, source: &str) -> bool {
    reg.sources()
        .get(source)
        .is_some_and(|s| s.state.status == SourceStatus::Stale)
}

pub fn synced(reg: &Registry, source: &str) -> bool {
    reg.sources()
        .get(source)
        .is_some_and(|s| s.state.status == SourceStatus::Synced)
}
