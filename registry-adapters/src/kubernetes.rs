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
//!
//! Labels and locality (issue 21): EndpointSlices carry no pod labels, so the source also
//! watches Pods and Nodes as metadata only (`PartialObjectMetadata`: names, labels,
//! resourceVersion; no specs or statuses, so a large cluster costs little). An endpoint
//! whose `targetRef` is a Pod gets that Pod's labels; its region comes from its Node's
//! `topology.kubernetes.io/region` label and its zone from the slice's `zone`, else the
//! Node's `topology.kubernetes.io/zone`. A label or zone change is pushed like any other
//! endpoint change. The service account needs list/watch on pods and nodes; without it
//! the endpoints still sync, without labels, and the denial is logged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use causeway_api::registry::{
    Endpoint, Health, Locality, NamespaceMapping, Provenance, ServiceEndpoints, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
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
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Endpoint metadata naming the Pod behind it (its `targetRef`), in `k8s-namespace`.
const POD_META: &str = "k8s-pod";

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
            if let Some(r) = &ep.target_ref
                && r.kind.as_deref() == Some("Pod")
                && let Some(pod) = &r.name
            {
                e.metadata.insert(POD_META.into(), pod.clone());
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
    Pod(Box<Result<Event<PartialObjectMeta<Pod>>, watcher::Error>>),
    Node(Box<Result<Event<PartialObjectMeta<Node>>, watcher::Error>>),
}

type Labels = BTreeMap<String, String>;

fn labels_of(m: &kube::core::ObjectMeta) -> Labels {
    m.labels.clone().unwrap_or_default().into_iter().collect()
}

fn pod_id(m: &kube::core::ObjectMeta) -> NsName {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

/// The topology labels of a node (the only ones used).
fn node_topology(m: &kube::core::ObjectMeta) -> Labels {
    labels_of(m)
        .into_iter()
        .filter(|(k, _)| k == REGION_LABEL || k == ZONE_LABEL)
        .collect()
}

#[derive(Default)]
struct State {
    services: BTreeSet<NsName>,
    slices: BTreeMap<NsName, Slice>,
    svc_init: Option<BTreeSet<NsName>>,
    slice_init: Option<BTreeMap<NsName, Slice>>,
    svc_ready: bool,
    slice_ready: bool,
    /// Pod labels by (namespace, name).
    pods: BTreeMap<NsName, Labels>,
    pod_init: Option<BTreeMap<NsName, Labels>>,
    /// Node topology labels by name.
    nodes: BTreeMap<String, Labels>,
    node_init: Option<BTreeMap<String, Labels>>,
}

impl State {
    fn endpoints_of(&self, id: &NsName) -> ServiceEndpoints {
        if !self.services.contains(id) {
            return ServiceEndpoints::new();
        }
        let mut out = ServiceEndpoints::new();
        for ((ns, _), s) in &self.slices {
            if *ns == id.0 && s.service == id.1 {
                out.extend(s.endpoints.iter().map(|(k, v)| {
                    let mut e = v.clone();
                    self.enrich(&mut e);
                    (k.clone(), e)
                }));
            }
        }
        out
    }

    /// Labels from the endpoint's Pod, region (and zone, when the slice has none) from its
    /// Node.
    fn enrich(&self, e: &mut Endpoint) {
        if let (Some(pod), Some(ns)) = (e.metadata.get(POD_META), e.metadata.get("k8s-namespace"))
            && let Some(labels) = self.pods.get(&(ns.clone(), pod.clone()))
        {
            e.labels = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        if let Some(node) = &e.locality.node
            && let Some(topo) = self.nodes.get(node)
        {
            e.locality.region = topo.get(REGION_LABEL).cloned();
            if e.locality.zone.is_none() {
                e.locality.zone = topo.get(ZONE_LABEL).cloned();
            }
        }
    }

    /// Services with an endpoint for which `f` holds.
    fn services_where(&self, f: impl Fn(&Endpoint) -> bool) -> BTreeSet<NsName> {
        self.slices
            .iter()
            .filter(|(_, s)| s.endpoints.values().any(&f))
            .map(|((ns, _), s)| (ns.clone(), s.service.clone()))
            .collect()
    }

    fn services_of_pod(&self, pod: &NsName) -> BTreeSet<NsName> {
        self.services_where(|e| {
            e.metadata.get(POD_META) == Some(&pod.1)
                && e.metadata.get("k8s-namespace") == Some(&pod.0)
        })
    }

    fn services_on_node(&self, node: &str) -> BTreeSet<NsName> {
        self.services_where(|e| e.locality.node.as_deref() == Some(node))
    }

    /// Applies a Pod event; true when a full snapshot is due (the list was replaced).
    fn apply_pod(
        &mut self,
        ev: Event<PartialObjectMeta<Pod>>,
        affected: &mut BTreeSet<NsName>,
    ) -> bool {
        match ev {
            Event::Init => self.pod_init = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                self.pod_init
                    .get_or_insert_with(BTreeMap::new)
                    .insert(pod_id(&p.metadata), labels_of(&p.metadata));
            }
            Event::InitDone => {
                self.pods = self.pod_init.take().unwrap_or_default();
                return true;
            }
            Event::Apply(p) => {
                let id = pod_id(&p.metadata);
                let labels = labels_of(&p.metadata);
                if self.pods.get(&id) != Some(&labels) {
                    affected.extend(self.services_of_pod(&id));
                    self.pods.insert(id, labels);
                }
            }
            Event::Delete(p) => {
                let id = pod_id(&p.metadata);
                if self.pods.remove(&id).is_some() {
                    affected.extend(self.services_of_pod(&id));
                }
            }
        }
        false
    }

    /// Applies a Node event; true when a full snapshot is due.
    fn apply_node(
        &mut self,
        ev: Event<PartialObjectMeta<Node>>,
        affected: &mut BTreeSet<NsName>,
    ) -> bool {
        let name = |n: &PartialObjectMeta<Node>| n.metadata.name.clone().unwrap_or_default();
        match ev {
            Event::Init => self.node_init = Some(BTreeMap::new()),
            Event::InitApply(n) => {
                self.node_init
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name(&n), node_topology(&n.metadata));
            }
            Event::InitDone => {
                self.nodes = self.node_init.take().unwrap_or_default();
                return true;
            }
            Event::Apply(n) => {
                let topo = node_topology(&n.metadata);
                let name = name(&n);
                if self.nodes.get(&name) != Some(&topo) {
                    affected.extend(self.services_on_node(&name));
                    self.nodes.insert(name, topo);
                }
            }
            Event::Delete(n) => {
                let name = name(&n);
                if self.nodes.remove(&name).is_some() {
                    affected.extend(self.services_on_node(&name));
                }
            }
        }
        false
    }
}

/// Logs a Pod or Node watch error once until it changes (the watcher retries with
/// backoff; endpoints keep syncing without the labels).
fn log_label_error(source: &str, what: &str, e: &watcher::Error, last: &mut Option<String>) {
    let text = e.to_string();
    if last.as_deref() != Some(text.as_str()) {
        tracing::warn!(
            source = %source,
            error = %text,
            "kubernetes: watching {what} (metadata only) failed; endpoints sync without Pod labels or Node topology until it works (the service account needs list and watch on pods and nodes)"
        );
        *last = Some(text);
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
        let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), wc.clone())
            .default_backoff()
            .map(|e| Msg::Slice(Box::new(e)));
        let pods = watcher::watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            wc.clone(),
        )
        .default_backoff()
        .map(|e| Msg::Pod(Box::new(e)));
        let nodes = watcher::watcher(Api::<PartialObjectMeta<Node>>::all(client), wc)
            .default_backoff()
            .map(|e| Msg::Node(Box::new(e)));
        let mut stream = futures_util::stream::select_all([
            Box::pin(svc) as std::pin::Pin<Box<dyn futures_util::Stream<Item = Msg> + Send>>,
            Box::pin(slices),
            Box::pin(pods),
            Box::pin(nodes),
        ]);
        // The last error of the label watchers, logged once until it changes.
        let mut label_error: Option<String> = None;
        let mut st = State::default();
        let mut synced_once = false;
        while let Some(msg) = stream.next().await {
            let mut affected: BTreeSet<NsName> = BTreeSet::new();
            let mut full = false;
            // A Pod or Node event: labels and locality only; the source's health is not
            // judged by it (an RBAC denial on pods still lets endpoints sync).
            let mut label_only = false;
            let msg = match msg {
                Msg::Svc(e) => Ok(*e),
                Msg::Slice(e) => Err(*e),
                Msg::Pod(e) => {
                    match *e {
                        Ok(ev) => {
                            label_error = None;
                            full |= st.apply_pod(ev, &mut affected);
                        }
                        Err(e) => log_label_error(&self.name, "Pods", &e, &mut label_error),
                    }
                    label_only = true;
                    Ok(Ok(Event::InitApply(Service::default())))
                }
                Msg::Node(e) => {
                    match *e {
                        Ok(ev) => {
                            label_error = None;
                            full |= st.apply_node(ev, &mut affected);
                        }
                        Err(e) => log_label_error(&self.name, "Nodes", &e, &mut label_error),
                    }
                    label_only = true;
                    Ok(Ok(Event::InitApply(Service::default())))
                }
            };
            let result: Result<(), String> = match msg {
                _ if label_only => Ok(()),
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
                Ok(()) if label_only => false,
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
