//! The name index: every mesh name the agent answers, built once per applied config
//! version (not per query), so answering is one hash lookup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use causeway_api::push::MeshState;

/// Which names to build (from `[dns]` of the agent config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zones {
    /// Kubernetes cluster domains (`cluster.local`).
    pub cluster_domains: Vec<String>,
    /// Consul's domain (`consul`).
    pub consul_domain: String,
    /// Suffixes for Eureka VIP names.
    pub eureka_suffixes: Vec<String>,
    /// Answer bare single-label Eureka VIP names.
    pub eureka_bare_names: bool,
    /// Causeway's domain (`causeway`).
    pub causeway_domain: String,
    /// TTL of answers, seconds.
    pub ttl: u32,
}

impl Default for Zones {
    fn default() -> Self {
        Self {
            cluster_domains: vec!["cluster.local".into()],
            consul_domain: "consul".into(),
            eureka_suffixes: Vec::new(),
            eureka_bare_names: false,
            causeway_domain: "causeway".into(),
            ttl: 5,
        }
    }
}

/// What a mesh name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service, `namespace/name`.
    pub service: String,
    /// Its VIP (None: the controller gave it none; A queries get NODATA).
    pub vip: Option<Ipv4Addr>,
    /// Named ports (union over endpoints), for SRV.
    pub ports: Vec<(String, u16)>,
}

/// One mesh name in the index: its target, and the answer record of an A query for it
/// built once with the index.
#[derive(Debug, Clone)]
pub struct Entry {
    target: Arc<Target>,
    /// The A record as it goes on the wire after the question: a compression pointer to
    /// the question's name, type A, class IN, the TTL, length 4, the VIP (None: no VIP).
    a: Option<[u8; 16]>,
}

impl Entry {
    fn new(target: Arc<Target>, ttl: u32) -> Self {
        let a = target.vip.map(|vip| {
            let mut r = [0u8; 16];
            r[..6].copy_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            r[6..10].copy_from_slice(&ttl.to_be_bytes());
            r[10..12].copy_from_slice(&[0, 4]);
            r[12..].copy_from_slice(&vip.octets());
            r
        });
        Self { target, a }
    }

    /// What the name stands for.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The A answer record (the name's VIP), as it follows the question on the wire.
    pub fn a_record(&self) -> Option<&[u8; 16]> {
        self.a.as_ref()
    }
}

/// All mesh names of one config version.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// The config version it was built from.
    pub version: u64,
    /// Lower-case names without the trailing dot (bytes: the query path looks them up
    /// without making a string). Hashed with foldhash (hashbrown's default, randomly
    /// seeded per process; in the tree through `lru`), not SipHash: the look-up is most
    /// of the mesh path's user-space time, and foldhash takes 15 ns for a name where
    /// SipHash takes 38 (BENCHMARKS.md, DNS). The keys come from the config, not from
    /// queries, so SipHash's flooding resistance buys nothing here.
    names: HashMap<Box<[u8]>, Entry, lru::DefaultHasher>,
    /// Zones the mesh owns (unknown names inside get NXDOMAIN), lower case, longest first.
    zones: Vec<String>,
    /// TTL of answers.
    pub ttl: u32,
}

/// The answer to a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A mesh name.
    Found(&'a Target),
    /// Inside a mesh zone (the zone given) but unknown: NXDOMAIN.
    NxDomain(&'a str),
    /// Not a mesh name: forward.
    Outside,
}

fn label_ok(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Lower-cases and strips the trailing dot; None when it is not a usable DNS name.
pub fn normalize(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    (!n.is_empty() && n.len() <= 253 && n.split('.').all(label_ok)).then_some(n)
}

impl Index {
    /// Builds the index for `state`.
    pub fn build(state: &MeshState, z: &Zones) -> Self {
        let mut idx = Index {
            version: state.version,
            names: HashMap::default(),
            zones: Vec::new(),
            ttl: z.ttl,
        };
        let mut zones: BTreeSet<String> = BTreeSet::new();
        let cluster: Vec<String> = z
            .cluster_domains
            .iter()
            .filter_map(|d| normalize(d))
            .map(|d| format!("svc.{d}"))
            .collect();
        let consul = normalize(&z.consul_domain);
        let causeway = normalize(&z.causeway_domain);
        let suffixes: Vec<String> = z
            .eureka_suffixes
            .iter()
            .filter_map(|d| normalize(d))
            .collect();
        zones.extend(cluster.iter().cloned());
        zones.extend(causeway.iter().cloned());
        zones.extend(suffixes.iter().cloned());
        if let Some(c) = &consul {
            zones.insert(format!("service.{c}"));
        }
        // Services in key order, so which service wins a shared name is stable. A name
        // of an earlier service is never replaced (first wins), except that the
        // "default" namespace wins a Consul or Eureka name over the others.
        let mut ordered: Vec<(&String, &causeway_api::push::ServiceState)> =
            state.services.iter().collect();
        ordered.sort_by_key(|(k, _)| (!k.starts_with("default/"), k.as_str()));
        for (key, svc) in ordered {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let mut ports: BTreeMap<String, u16> = BTreeMap::new();
            for ep in svc.endpoints.values() {
                for (pn, p) in &ep.ports {
                    ports.entry(pn.clone()).or_insert(*p);
                }
            }
            let target = Arc::new(Target {
                service: key.clone(),
                vip: svc.vip,
                ports: ports.into_iter().collect(),
            });
            let ttl = idx.ttl;
            let mut add = |n: String| {
                if let Some(n) = normalize(&n) {
                    idx.names
                        .entry(n.into_bytes().into_boxed_slice())
                        .or_insert_with(|| Entry::new(target.clone(), ttl));
                }
            };
            for c in &cluster {
                add(format!("{name}.{ns}.{c}"));
            }
            if let Some(c) = &causeway {
                add(format!("{name}.{ns}.{c}"));
            }
            if let Some(c) = &consul
                && svc.source_kinds.iter().any(|k| k == "consul")
            {
                let mut bases = vec![format!("{name}.service.{c}")];
                for dc in &svc.consul_datacenters {
                    if let Some(dc) = normalize(dc) {
                        zones.insert(format!("service.{dc}.{c}"));
                        bases.push(format!("{name}.service.{dc}.{c}"));
                    }
                }
                for b in &bases {
                    add(b.clone());
                    for t in &svc.consul_tags {
                        add(format!("{t}.{b}"));
                    }
                }
            }
            for vip in &svc.eureka_vips {
                let Some(v) = normalize(vip) else { continue };
                if v.contains('.') {
                    add(v);
                    continue;
                }
                for s in &suffixes {
                    add(format!("{v}.{s}"));
                }
                if z.eureka_bare_names {
                    add(v);
                }
            }
            // Other extra names (file-source hosts, Kubernetes FQDNs): exact names only.
            for h in &svc.hostnames {
                if h.contains('.') && !svc.eureka_vips.contains(h) {
                    add(h.clone());
                }
            }
        }
        let mut zones: Vec<String> = zones.into_iter().collect();
        zones.sort_by_key(|z| std::cmp::Reverse(z.len()));
        idx.zones = zones;
        idx
    }

    /// Looks up a lower-case name without the trailing dot.
    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        if let Some(e) = self.entry(name.as_bytes()) {
            return Lookup::Found(&e.target);
        }
        match self.zone_of(name.as_bytes()) {
            Some(z) => Lookup::NxDomain(z),
            None => Lookup::Outside,
        }
    }

    /// The mesh name `name` (lower case, without the trailing dot), if it is one.
    pub fn entry(&self, name: &[u8]) -> Option<&Entry> {
        self.names.get(name)
    }

    /// The owned zone `name` (lower case, without the trailing dot) is in or is, if any.
    pub fn zone_of(&self, name: &[u8]) -> Option<&str> {
        self.zones
            .iter()
            .find(|z| {
                let z = z.as_bytes();
                name == z
                    || (name.len() > z.len()
                        && name.ends_with(z)
                        && name[name.len() - z.len() - 1] == b'.')
            })
            .map(String::as_str)
    }

    /// The zones the mesh owns.
    pub fn zones(&self) -> &[String] {
        &self.zones
    }

    /// How many names it holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether it holds no names.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use causeway_api::push::{EndpointState, ServiceState};

    pub(crate) fn service(vip: &str, kinds: &[&str]) -> ServiceState {
        ServiceState {
            vip: Some(vip.parse().unwrap()),
            endpoints: [(
                "s/1".to_owned(),
                EndpointState {
                    address: "10.0.0.1".into(),
                    ports: [("http".to_owned(), 8080), ("grpc".to_owned(), 9090)].into(),
                    healthy: true,
                    zone: None,
                    identity: None,
                    source: "s".into(),
                    stale: false,
                    labels: Default::default(),
                    mtls_strict: false,
                    region: None,
                },
            )]
            .into(),
            hostnames: vec![],
            source_kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            consul_tags: vec![],
            consul_datacenters: vec![],
            eureka_vips: vec![],
        }
    }

    pub(crate) fn mesh() -> MeshState {
        let mut s = MeshState {
            version: 4,
            ..MeshState::default()
        };
        let mut web = service("240.240.0.10", &["consul"]);
        web.consul_tags = vec!["v1".into(), "primary".into()];
        web.consul_datacenters = vec!["dc1".into()];
        s.services.insert("default/web".into(), web);
        let mut inv = service("240.240.0.11", &["eureka"]);
        inv.eureka_vips = vec!["inventory-service".into(), "inventory.secure".into()];
        inv.hostnames = inv.eureka_vips.clone();
        s.services.insert("shop/inventory".into(), inv);
        let mut pay = service("240.240.0.12", &["file"]);
        pay.hostnames = vec!["payments.example.com".into()];
        s.services.insert("ext/payments".into(), pay);
        s
    }

    #[test]
    fn every_name_form() {
        let z = Zones {
            eureka_suffixes: vec!["eureka.internal".into()],
            eureka_bare_names: true,
            ..Zones::default()
        };
        let idx = Index::build(&mesh(), &z);
        for n in [
            "web.default.svc.cluster.local",
            "web.default.causeway",
            "web.service.consul",
            "web.service.dc1.consul",
            "v1.web.service.consul",
            "primary.web.service.dc1.consul",
        ] {
            assert!(
                matches!(idx.lookup(n), Lookup::Found(t) if t.service == "default/web"),
                "{n}"
            );
        }
        for n in [
            "inventory-service.eureka.internal",
            "inventory-service",
            "inventory.secure",
            "inventory.shop.causeway",
        ] {
            assert!(
                matches!(idx.lookup(n), Lookup::Found(t) if t.service == "shop/inventory"),
                "{n}"
            );
        }
        assert!(matches!(
            idx.lookup("payments.example.com"),
            Lookup::Found(_)
        ));
        // Not Consul: no consul name.
        assert_eq!(
            idx.lookup("payments.service.consul"),
            Lookup::NxDomain("service.consul")
        );
        assert_eq!(
            idx.lookup("v2.web.service.consul"),
            Lookup::NxDomain("service.consul")
        );
        assert_eq!(
            idx.lookup("nope.default.svc.cluster.local"),
            Lookup::NxDomain("svc.cluster.local")
        );
        assert_eq!(
            idx.lookup("x.service.dc1.consul"),
            Lookup::NxDomain("service.dc1.consul")
        );
        assert_eq!(idx.lookup("example.com"), Lookup::Outside);
        assert_eq!(
            idx.lookup("node1.node.consul"),
            Lookup::Outside,
            "only service.consul is owned"
        );
        assert_eq!(idx.lookup("xcauseway"), Lookup::Outside);
        let ports = &match idx.lookup("web.default.causeway") {
            Lookup::Found(t) => t.clone(),
            _ => unreachable!(),
        }
        .ports;
        assert_eq!(
            ports,
            &vec![("grpc".to_owned(), 9090), ("http".to_owned(), 8080)]
        );
    }

    /// The A record built with the index: pointer to the question's name, A, IN, the
    /// index's TTL, length 4, the VIP; none for a service without a VIP. The byte
    /// look-ups answer as the string one.
    #[test]
    fn precomputed_a_records() {
        let mut state = mesh();
        state
            .services
            .get_mut("ext/payments")
            .expect("in the mesh")
            .vip = None;
        let z = Zones {
            ttl: 0x0102_0304,
            ..Zones::default()
        };
        let idx = Index::build(&state, &z);
        let e = idx.entry(b"web.default.causeway").expect("a mesh name");
        assert_eq!(e.target().service, "default/web");
        assert_eq!(
            e.a_record(),
            Some(&[0xc0, 0x0c, 0, 1, 0, 1, 1, 2, 3, 4, 0, 4, 240, 240, 0, 10])
        );
        let e = idx.entry(b"payments.example.com").expect("a mesh name");
        assert_eq!(e.a_record(), None, "no VIP, no record");
        assert!(
            idx.entry(b"Web.default.causeway").is_none(),
            "lower case only"
        );
        for n in [
            "web.service.consul",
            "nope.service.consul",
            "service.consul",
            "xservice.consul",
            "example.com",
            "causeway",
        ] {
            let by_bytes = match (idx.entry(n.as_bytes()), idx.zone_of(n.as_bytes())) {
                (Some(e), _) => Lookup::Found(e.target()),
                (None, Some(z)) => Lookup::NxDomain(z),
                (None, None) => Lookup::Outside,
            };
            assert_eq!(by_bytes, idx.lookup(n), "{n}");
        }
        assert_eq!(idx.zone_of(b"service.consul"), Some("service.consul"));
        assert_eq!(idx.zone_of(b"xservice.consul"), None);
    }

    #[test]
    fn bare_names_only_when_configured() {
        let idx = Index::build(&mesh(), &Zones::default());
        assert_eq!(idx.lookup("inventory-service"), Lookup::Outside);
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            normalize("Web.Service.Consul.").as_deref(),
            Some("web.service.consul")
        );
        assert_eq!(normalize(""), None);
        assert_eq!(normalize("a..b"), None);
        assert_eq!(normalize("a b"), None);
    }
}
