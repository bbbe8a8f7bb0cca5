//! The agent's DNS query path (`causeway_agent::dns::answer::handle`) on arbitrary bytes,
//! over UDP and TCP, against an index with every kind of mesh name: never panics; an
//! answer always echoes the query's ID, is a response, parses as a DNS message, and
//! over UDP fits the size the client can take.
#![no_main]

use std::sync::OnceLock;

use causeway_agent::dns::answer::{Outcome, Transport, handle};
use causeway_agent::dns::index::{Index, Zones};
use causeway_api::push::{EndpointState, MeshState, ServiceState};
use libfuzzer_sys::fuzz_target;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut s = MeshState {
            version: 1,
            ..MeshState::default()
        };
        let ep = EndpointState {
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
        };
        let svc = |vip: &str, kinds: &[&str]| ServiceState {
            vip: Some(vip.parse().expect("literal")),
            endpoints: [("s/1".to_owned(), ep.clone())].into(),
            hostnames: vec![],
            source_kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            consul_tags: vec!["v1".into()],
            consul_datacenters: vec!["dc1".into()],
            eureka_vips: vec![],
        };
        s.services.insert("default/web".into(), svc("240.240.0.10", &["consul"]));
        let mut inv = svc("240.240.0.11", &["eureka"]);
        inv.eureka_vips = vec!["inventory-service".into()];
        s.services.insert("shop/inventory".into(), inv);
        let mut novip = svc("240.240.0.12", &["file"]);
        novip.vip = None;
        novip.hostnames = vec!["payments.example.com".into()];
        s.services.insert("ext/payments".into(), novip);
        Index::build(
            &s,
            &Zones {
                eureka_suffixes: vec!["eureka.internal".into()],
                eureka_bare_names: true,
                ..Zones::default()
            },
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let idx = index();
    for t in [Transport::Udp, Transport::Tcp] {
        if let Outcome::Answer(bytes) = handle(idx, data, t) {
            assert!(bytes.len() >= 12, "an answer has a header");
            assert_eq!(bytes[..2], data[..2], "the answer echoes the query ID");
            assert_ne!(bytes[2] & 0x80, 0, "the answer is a response");
            hickory_proto::op::Message::from_vec(&bytes).expect("the answer parses");
            if t == Transport::Udp {
                assert!(bytes.len() <= 4096, "a UDP answer stays within EDNS sizes");
            }
        }
    }
});
