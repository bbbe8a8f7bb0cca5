//! Kubernetes source: kube-rs watchers on Services and `discovery.k8s.io/v1`
//! EndpointSlices in all namespaces, joined by the `kubernetes.io/service-name` label.
//!
//! The watchers list, then watch from the list's resourceVersion with bookmarks; on
//! `410 Gone` (history compacted, apiserver restarted) they list again, and the source
//! sends a full snapshot of the re-listed state (the merge turns it into a minimal
//! delta). Errors back off and leave the last known good data, marked stale.
//!
//! Mapping: Service `ns/name` → key `(ns, name)` (the Kubernetes namespace is kept);
//! one endpoint per slice address, only for services that exist; ports by the slice's
//! port names (`tcp` when unnamed); health ready → passing, serving but not ready
//! (terminating) → warning, else critical; zone and nodeName kept; hostname
//! `<name>.<ns>.svc.cluster.local`; native id `<ns>/<slice>/<address>`, revision the
//! slice's resourceVersion. Several clusters: one source per cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use causeway_api::registry::{
    Endpoint, Health, Locality, NamespaceMapping, Provenance, ServiceEndpoints, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config};
use tokio::sync::mpsc;

use crate::config::KubernetesSourceConfig;
use crate::source::{SourceOptions, SourceUpdate, StateTracker};

/// A Kubernetes cluster as a source.
#[derive(Clone, Debug)]
pub struct KubernetesSource {
    name: String,
    kubeconfig: Option<PathBuf>,
    mapping: NamespaceMapping,
    opts: SourceOptions,
}

const SERVICE_LABEL: &str = "kubernetes.io/service-name";

type NsName = (String, String);

struct Slice {
    service: String,
    endpoints: ServiceEndpoints,
}

/// Endpoints of one EndpointSlice; `None` without the service-name label.
fn slice_endpoints(source: &str, slice: &EndpointSlice) -> Option<(NsName, Slice)> {
    let ns = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_LABEL)?.clone();
    let revision = slice.metadata.resource_version.clone().unwrap_or_default();
    let mut ports = BTreeMap::new();
    for p in slice.ports.iter().flatten() {
        if let Some(port) = p
            .port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
        {
            let name = p
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "tcp".into());
            ports.insert(name, port);
        }
    }
    let mut endpoints = ServiceEndpoints::new();
    for ep in slice.endpoints.iter().flatten() {
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let health = if ready && !terminating {
            Health::Passing
        } else if serving {
            Health::Warning
        } else {
            Health::Critical
        };
        for addr in &ep.addresses {
            let native_id = format!("{ns}/{slice_name}/{addr}");
            let mut e = Endpoint::new(
                addr.clone(),
                Provenance {
                    source: source.to_string(),
                    kind: SourceKind::Kubernetes,
                    native_id: native_id.clone(),
                    revision: revision.clone(),
                },
            );
            e.ports = ports.clone().into();
            e.health = health;
            e.locality = Locality {
                region: None,
                zone: ep.zone.clone(),
                node: ep.node_name.clone(),
            };
            e.hostnames
                .insert(format!("{service}.{ns}.svc.cluster.local"));
            e.metadata.insert("k8s-namespace".into(), ns.clone());
            e.metadata
                .insert("k8s-endpointslice".into(), slice_name.clone());
            if terminating {
                e.metadata.insert("k8s-terminating".into(), "true".into());
            }
            endpoints.insert(native_id, e);
        }
    }
    Some(((ns, slice_name), Slice { service, endpoints }))
}

fn service_id(svc: &Service) -> NsName {
    (
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

enum Msg {
    Svc(Box<Result<Event<Service>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

#[derive(Default)]
struct State {
    services: BTreeSet<NsName>,
    slices: BTreeMap<NsName, Slice>,
    svc_init: Option<BTreeSet<NsName>>,
    slice_init: Option<BTreeMap<NsName, Slice>>,
    svc_ready: bool,
    slice_ready: bool,
}

impl State {
    fn endpoints_of(&self, id: &NsName) -> ServiceEndpoints {
        if !self.services.contains(id) {
            return ServiceEndpoints::new();
        }
        let mut out = ServiceEndpoints::new();
        for ((ns, _), s) in &self.slices {
            if *ns == id.0 && s.service == id.1 {
                out.extend(s.endpoints.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        out
    }
}

impl KubernetesSource {
    /// A source for one cluster; the client is built when it runs.
    pub fn new(cfg: &KubernetesSourceConfig, opts: &SourceOptions) -> Self {
        let mut mapping = NamespaceMapping::fixed("default");
        mapping.keep_native_namespace = true;
        Self {
            name: cfg.name.clone(),
            kubeconfig: cfg.kubeconfig.clone(),
            mapping,
            opts: opts.clone(),
        }
    }

    async fn client(&self) -> Result<Client, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    format!("cannot read kubeconfig {}: {e}; fix sources.kubernetes kubeconfig", path.display())
                })?;
                Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => Config::incluster().map_err(|e| {
                format!("no kubeconfig given and not running in a cluster ({e}); set sources.kubernetes kubeconfig")
            })?,
        };
        Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
    }

    fn key(&self, id: &NsName) -> Option<ServiceKey> {
        self.mapping.key(&id.1, Some(&id.0), None).ok()
    }

    fn snapshot(&self, st: &State) -> SourceSnapshot {
        let mut snap = SourceSnapshot::default();
        for id in &st.services {
            let eps = st.endpoints_of(id);
            if let (Some(key), false) = (self.key(id), eps.is_empty()) {
                snap.services.entry(key).or_default().extend(eps);
            }
        }
        snap
    }

    /// Runs until `tx` is closed.
    pub async fn run(self, tx: mpsc::Sender<SourceUpdate>) {
        let mut tracker = StateTracker::new();
        let mut backoff = self.opts.backoff();
        let send = |change: Option<SourceChange>, tracker: &StateTracker| {
            let update = SourceUpdate {
                source: self.name.clone(),
                kind: SourceKind::Kubernetes,
                change,
                state: tracker.state.clone(),
            };
            let tx = tx.clone();
            async move { tx.send(update).await.is_ok() }
        };
        let client = loop {
            match self.client().await {
                Ok(c) => break c,
                Err(e) => {
                    if tracker.fail(&e) && !send(None, &tracker).await {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        let wc = watcher::Config::default();
        let svc = watcher::watcher(Api::<Service>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(|e| Msg::Svc(Box::new(e)));
        let slices = watcher::watcher(Api::<EndpointSlice>::all(client), wc)
            .default_backoff()
            .map(|e| Msg::Slice(Box::new(e)));
        let mut stream = futures_util::stream::select(Box::pin(svc), Box::pin(slices));
        let mut st = State::default();
        let mut synced_once = false;
        while let Some(msg) = stream.next().await {
            let mut affected: BTreeSet<NsName> = BTreeSet::new();
            let mut full = false;
            let msg = match msg {
                Msg::Svc(e) => Ok(*e),
                Msg::Slice(e) => Err(*e),
            };
            let result: Result<(), String> = match msg {
                Ok(Ok(ev)) => {
                    match ev {
                        Event::Init => st.svc_init = Some(BTreeSet::new()),
                        Event::InitApply(s) => {
                            st.svc_init
                                .get_or_insert_with(BTreeSet::new)
                                .insert(service_id(&s));
                        }
                        Event::InitDone => {
                            st.services = st.svc_init.take().unwrap_or_default();
                            st.svc_ready = true;
                            full = true;
                        }
                        Event::Apply(s) => {
                            let id = service_id(&s);
                            st.services.insert(id.clone());
                            affected.insert(id);
                        }
                        Event::Delete(s) => {
                            let id = service_id(&s);
                            st.services.remove(&id);
                            affected.insert(id);
                        }
                    }
                    Ok(())
                }
                Err(Ok(ev)) => {
                    match ev {
                        Event::Init => st.slice_init = Some(BTreeMap::new()),
                        Event::InitApply(s) => {
                            if let Some((id, slice)) = slice_endpoints(&self.name, &s) {
                                st.slice_init
                                    .get_or_insert_with(BTreeMap::new)
                                    .insert(id, slice);
                            }
                        }
                        Event::InitDone => {
                            st.slices = st.slice_init.take().unwrap_or_default();
                            st.slice_ready = true;
                            full = true;
                        }
                        Event::Apply(s) => {
                            let ns = s
                                .metadata
                                .namespace
                                .clone()
                                .unwrap_or_else(|| "default".into());
                            let id = (ns.clone(), s.metadata.name.clone().unwrap_or_default());
                            if let Some(old) = st.slices.remove(&id) {
                                affected.insert((ns.clone(), old.service));
                            }
                            if let Some((id, slice)) = slice_endpoints(&self.name, &s) {
                                affected.insert((ns, slice.service.clone()));
                                st.slices.insert(id, slice);
                            }
                        }
                        Event::Delete(s) => {
                            let ns = s
                                .metadata
                                .namespace
                                .clone()
                                .unwrap_or_else(|| "default".into());
                            let id = (ns.clone(), s.metadata.name.clone().unwrap_or_default());
                            if let Some(old) = st.slices.remove(&id) {
                                affected.insert((ns, old.service));
                            }
                        }
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(format!("watching Services: {e}")),
                Err(Err(e)) => Err(format!("watching EndpointSlices: {e}")),
            };
            let state_changed = match &result {
                Ok(()) => tracker.ok(),
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "kubernetes watch failed");
                    tracker.fail(e)
                }
            };
            let ready = st.svc_ready && st.slice_ready;
            let change = if ready && (full || !synced_once) {
                synced_once = true;
                Some(SourceChange::Full(self.snapshot(&st)))
            } else if ready && !affected.is_empty() {
                let mut changes: BTreeMap<ServiceKey, ServiceEndpoints> = BTreeMap::new();
                for id in &affected {
                    if let Some(key) = self.key(id) {
                        changes.entry(key).or_default().extend(st.endpoints_of(id));
                    }
                }
                Some(SourceChange::Services(changes))
            } else {
                None
            };
            if (change.is_some() || (state_changed && (synced_once || tracker.state.is_stale())))
                && !send(change, &tracker).await
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded_slices() -> Vec<EndpointSlice> {
        let f =
            causeway_fakes::read_http_fixture("kubernetes/03-endpointslices-all-namespaces.http");
        let list: serde_json::Value = serde_json::from_str(&f.body).unwrap();
        serde_json::from_value(list["items"].clone()).unwrap()
    }

    #[test]
    fn recorded_slices_map_to_endpoints() {
        let slices = recorded_slices();
        let (id, web) = slices
            .iter()
            .filter_map(|s| slice_endpoints("k8s", s))
            .find(|(id, _)| id.1 == "web-abcde")
            .unwrap();
        assert_eq!(id.0, "demo");
        assert_eq!(web.service, "web");
        let e = &web.endpoints["demo/web-abcde/192.0.2.11"];
        assert_eq!(e.ports["http"], 8080);
        assert_eq!(e.health, Health::Passing);
        assert_eq!(e.locality.zone.as_deref(), Some("zone-1"));
        assert_eq!(e.locality.node.as_deref(), Some("node-a"));
        assert!(e.hostnames.contains("web.demo.svc.cluster.local"));
        let (_, api) = slices
            .iter()
            .filter_map(|s| slice_endpoints("k8s", s))
            .find(|(id, _)| id.1 == "api-fghij")
            .unwrap();
        assert_eq!(
            api.endpoints["demo/api-fghij/192.0.2.21"].health,
            Health::Passing
        );
        assert_eq!(
            api.endpoints["demo/api-fghij/192.0.2.22"].health,
            Health::Critical,
            "not ready, not serving, terminating"
        );
    }

    #[test]
    fn a_slice_without_the_service_label_is_ignored() {
        let mut s = recorded_slices().remove(0);
        s.metadata.labels = None;
        assert!(slice_endpoints("k8s", &s).is_none());
    }
}
