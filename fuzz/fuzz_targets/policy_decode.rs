//! Policy decoding and evaluation on arbitrary input: `decode_documents` (YAML/JSON),
//! `validate`, compilation and a decision never panic; `decide` and `explain` agree; a
//! valid resource re-encodes to JSON that decodes to the same resource.
//!
//! Input: the first 12 bytes choose the request (source and destination address bytes,
//! port, whether there is a principal and HTTP attributes); the rest is the policy text.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use causeway_api::policy::validate::validate;
use causeway_api::policy::{
    HttpAttributes, PolicySet, Request, Resource, Workload, decode_documents, effective_mode,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, rest) = data.split_at(12);
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(docs) = decode_documents("fuzz", text) else {
        return;
    };
    let valid: Vec<&Resource> = docs.iter().filter(|d| validate(d).is_empty()).collect();
    for d in &valid {
        let json = serde_json::to_value(d).expect("a resource serialises");
        let back = causeway_api::policy::resource::decode_value(json).expect("re-decodes");
        assert_eq!(&&back, d, "JSON round trip");
    }
    let aps: Vec<_> = valid
        .iter()
        .filter_map(|d| match d {
            Resource::AuthorizationPolicy(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let pas: Vec<_> = valid
        .iter()
        .filter_map(|d| match d {
            Resource::PeerAuthentication(p) => Some(p),
            _ => None,
        })
        .collect();
    let set = PolicySet::new(aps.iter());
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    let ns = if head[0] & 1 == 0 { "default" } else { "causeway-system" };
    let w = set.for_workload(Workload { namespace: ns, labels: &labels });
    let port = u16::from_be_bytes([head[9], head[10]]);
    let headers = vec![("x-user".to_owned(), "alice".to_owned())];
    let req = Request {
        principal: (head[11] & 1 == 1).then_some("causeway.local/ns/default/sa/web"),
        source_ip: IpAddr::V4(Ipv4Addr::new(head[1], head[2], head[3], head[4])),
        remote_ip: None,
        destination_ip: IpAddr::V4(Ipv4Addr::new(head[5], head[6], head[7], head[8])),
        destination_port: port,
        sni: None,
        http: (head[11] & 2 == 2).then_some(HttpAttributes {
            host: "web.default:8080",
            method: "GET",
            path: "/api/v1/items",
            headers: &headers,
            request_principal: (head[11] & 4 == 4).then_some("iss/sub"),
            claims: None,
        }),
    };
    let v = w.decide(&req);
    let e = w.explain(&req);
    assert_eq!(v.allow, e.decision == "allow");
    assert_eq!(v.policy.map(|p| p.id()), e.policy);
    let _ = effective_mode(
        pas.iter().enumerate().map(|(i, p)| (i as u64, *p)),
        Workload { namespace: ns, labels: &labels },
        port,
    );
});
