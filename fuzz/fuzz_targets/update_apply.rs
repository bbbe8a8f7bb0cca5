//! The agent's update-apply path (`MeshState::apply`, then `apply_deny_only` when the
//! update is refused as a whole; `causeway_agent::push::apply` adds only the cache
//! write) on arbitrary updates: whatever arrives, the agent never loses its previous
//! good config. Input: a push frame (the `push_decode` seeds work). Each decoded update
//! is applied as sent and as a delta on the held version, to a state with three services.
//!
//! Checked after every apply:
//! - the result satisfies `MeshState::check` (VIPs in range and unique, no endpoint in
//!   the VIP range, no port 0);
//! - a refused service is either absent (it was new, or the snapshot dropped it) or
//!   exactly its previous copy; in a delta it keeps its previous copy unless removed;
//! - services the delta does not name are untouched; a deny list sent is the one held;
//! - a refused update changes nothing but (for a newer version) the deny list.
#![no_main]

use std::collections::BTreeSet;

use causeway_api::push::{
    ConfigUpdate, EndpointMsg, MAX_PUSH_FRAME, MeshState, PushFrame, ServiceMsg, push_frame,
};
use causeway_api::wire::decode_frame;
use libfuzzer_sys::fuzz_target;

fn service(name: &str, vip: &str, address: &str) -> ServiceMsg {
    ServiceMsg {
        namespace: "ext".into(),
        name: name.into(),
        vip: vip.into(),
        endpoints: vec![EndpointMsg {
            id: format!("f/{name}"),
            address: address.into(),
            ports: [("http".to_owned(), 80u32)].into(),
            healthy: true,
            ..EndpointMsg::default()
        }],
        ..ServiceMsg::default()
    }
}

fn good() -> MeshState {
    let state = MeshState::default()
        .apply(&ConfigUpdate {
            version: 5,
            full: true,
            vip_cidr: "240.240.0.0/16".into(),
            services: vec![
                service("web", "240.240.0.1", "10.0.0.1"),
                service("api", "240.240.0.2", "10.0.0.2"),
                service("db", "", "db.example.com"),
            ],
            deny_set: true,
            deny_serials: vec!["aa".into()],
            ..ConfigUpdate::default()
        })
        .expect("the base update applies")
        .state;
    state.check().expect("the base state is good");
    state
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn check(good: &MeshState, u: &ConfigUpdate) {
    match good.apply(u) {
        Err(_) => {
            if let Some(next) = good.apply_deny_only(u) {
                assert_eq!(next.version, good.version);
                assert_eq!(next.services, good.services);
                assert_eq!(next.trust_bundle_der, good.trust_bundle_der);
                assert!(u.version > good.version);
            }
        }
        Ok(applied) => {
            let next = &applied.state;
            if let Err(e) = next.check() {
                panic!("applied state is not valid: {e}\nupdate: {u:?}\nstate: {next:?}");
            }
            assert_eq!(next.version, u.version);
            let removed: BTreeSet<String> =
                u.removed.iter().map(|r| key(&r.namespace, &r.name)).collect();
            let named: BTreeSet<String> = u
                .services
                .iter()
                .map(|s| key(&s.namespace, &s.name))
                .chain(removed.iter().cloned())
                .collect();
            for r in &applied.rejected {
                let k = key(&r.namespace, &r.name);
                let held = next.services.get(&k);
                assert!(
                    held.is_none() || held == good.services.get(&k),
                    "refused service {k} is half-applied: {held:?}"
                );
                if !u.full && u.vip_cidr.is_empty() && !removed.contains(&k) {
                    assert_eq!(
                        held,
                        good.services.get(&k),
                        "refused service {k} lost its previous good copy"
                    );
                }
            }
            if !u.full {
                for (k, s) in &good.services {
                    if !named.contains(k) && u.vip_cidr.is_empty() {
                        assert_eq!(next.services.get(k), Some(s), "untouched {k} changed");
                    }
                }
            }
            if u.full || u.deny_set {
                let sent: BTreeSet<String> = u.deny_serials.iter().cloned().collect();
                assert_eq!(next.deny_serials, sent, "the deny list sent is applied");
            } else {
                assert_eq!(next.deny_serials, good.deny_serials);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(PushFrame {
        kind: Some(push_frame::Kind::Update(update)),
    }) = decode_frame::<PushFrame>(data, MAX_PUSH_FRAME)
    else {
        return;
    };
    let good = good();
    check(&good, &update);
    // The same content as a delta on the held version, so the per-service path runs
    // whatever version the input carries.
    let delta = ConfigUpdate {
        full: false,
        base_version: good.version,
        version: good.version + 1 + update.version % 8,
        ..update
    };
    check(&good, &delta);
});
