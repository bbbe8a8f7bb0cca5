//! Wire compatibility: the messages as hand-written prost derives before they were
//! generated from `api/proto/*.proto` (copied verbatim, doc comments dropped), against
//! the generated ones. Every field set, encoded by one and decoded by the other, in both
//! directions: the field numbers and types of the `.proto` files are those agents and
//! controllers already deployed speak.

#![allow(unreachable_pub, missing_docs, clippy::all)]

use std::collections::BTreeMap;

use causeway_api::{push, wire};
use prost::Message;

mod old {
    use std::collections::BTreeMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ClientRequest {
        #[prost(oneof = "client_request::Kind", tags = "1, 2, 3")]
        pub kind: Option<client_request::Kind>,
    }

    pub mod client_request {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(message, tag = "1")]
            Join(super::JoinRequest),
            #[prost(message, tag = "2")]
            Renew(super::RenewRequest),
            #[prost(message, tag = "3")]
            Subscribe(super::Hello),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JoinRequest {
        #[prost(string, tag = "1")]
        pub token_id: String,
        #[prost(bytes = "vec", tag = "2")]
        pub secret: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub csr_der: Vec<u8>,
        #[prost(string, tag = "4")]
        pub hostname: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RenewRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub csr_der: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServerResponse {
        #[prost(oneof = "server_response::Kind", tags = "1, 2")]
        pub kind: Option<server_response::Kind>,
    }

    pub mod server_response {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(message, tag = "1")]
            Issued(super::Issued),
            #[prost(message, tag = "2")]
            Error(super::ErrorReply),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Issued {
        #[prost(string, tag = "1")]
        pub agent_id: String,
        #[prost(string, tag = "2")]
        pub spiffe_id: String,
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub cert_chain_der: Vec<Vec<u8>>,
        #[prost(bytes = "vec", repeated, tag = "4")]
        pub trust_bundle_der: Vec<Vec<u8>>,
        #[prost(int64, tag = "5")]
        pub not_after_unix: i64,
        #[prost(string, tag = "6")]
        pub group: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ErrorReply {
        #[prost(enumeration = "ErrorCode", tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ErrorCode {
        Unspecified = 0,
        Malformed = 1,
        TooLarge = 2,
        TokenInvalid = 3,
        TokenExpired = 4,
        TokenSpent = 5,
        SourceNotAllowed = 6,
        CsrInvalid = 7,
        NotAuthenticated = 8,
        AgentRemoved = 9,
        GroupMissing = 10,
        Unsupported = 11,
        Internal = 12,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Hello {
        #[prost(uint64, tag = "1")]
        pub last_version: u64,
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(string, tag = "3")]
        pub agent_version: String,
        #[prost(uint32, tag = "4")]
        pub protocol: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushFrame {
        #[prost(oneof = "push_frame::Kind", tags = "1, 2, 3, 4")]
        pub kind: Option<push_frame::Kind>,
    }

    pub mod push_frame {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(message, tag = "1")]
            Update(super::ConfigUpdate),
            #[prost(message, tag = "2")]
            Heartbeat(super::Heartbeat),
            #[prost(message, tag = "3")]
            Error(super::ErrorReply),
            #[prost(message, tag = "4")]
            Registration(super::Registration),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AgentFrame {
        #[prost(oneof = "agent_frame::Kind", tags = "1, 2, 3, 4")]
        pub kind: Option<agent_frame::Kind>,
    }

    pub mod agent_frame {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(message, tag = "1")]
            Ack(super::Ack),
            #[prost(message, tag = "2")]
            Nack(super::Nack),
            #[prost(message, tag = "3")]
            Goodbye(super::Goodbye),
            #[prost(message, tag = "4")]
            Denials(super::DenialReport),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DenialReport {
        #[prost(message, repeated, tag = "1")]
        pub denials: Vec<Denial>,
    }

    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Denial {
        #[prost(uint64, tag = "1")]
        pub unix_ms: u64,
        #[prost(string, tag = "2")]
        pub source_principal: String,
        #[prost(string, tag = "3")]
        pub source_address: String,
        #[prost(uint32, tag = "4")]
        pub port: u32,
        #[prost(string, tag = "5")]
        pub policy: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(uint64, tag = "1")]
        pub version: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Nack {
        #[prost(uint64, tag = "1")]
        pub version: u64,
        #[prost(string, tag = "2")]
        pub error: String,
        #[prost(uint64, tag = "3")]
        pub current_version: u64,
        #[prost(message, repeated, tag = "4")]
        pub rejected: Vec<ServiceRejection>,
    }

    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
    pub struct ServiceRejection {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(string, tag = "3")]
        pub error: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Registration {
        #[prost(string, tag = "1")]
        pub address: String,
        #[prost(bool, tag = "2")]
        pub accepted: bool,
        #[prost(string, tag = "3")]
        pub error: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Goodbye {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Heartbeat {
        #[prost(uint64, tag = "1")]
        pub version: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConfigUpdate {
        #[prost(uint64, tag = "1")]
        pub version: u64,
        #[prost(uint64, tag = "2")]
        pub base_version: u64,
        #[prost(bool, tag = "3")]
        pub full: bool,
        #[prost(message, repeated, tag = "4")]
        pub services: Vec<ServiceMsg>,
        #[prost(message, repeated, tag = "5")]
        pub removed: Vec<ServiceRef>,
        #[prost(bytes = "vec", repeated, tag = "6")]
        pub trust_bundle_der: Vec<Vec<u8>>,
        #[prost(bool, tag = "7")]
        pub bundle_set: bool,
        #[prost(string, repeated, tag = "8")]
        pub deny_serials: Vec<String>,
        #[prost(bool, tag = "9")]
        pub deny_set: bool,
        #[prost(string, tag = "10")]
        pub vip_cidr: String,
        #[prost(string, repeated, tag = "11")]
        pub required_features: Vec<String>,
        #[prost(message, repeated, tag = "12")]
        pub policies: Vec<PolicyMsg>,
        #[prost(string, repeated, tag = "13")]
        pub removed_policies: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PolicyMsg {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(uint64, tag = "2")]
        pub seq: u64,
        #[prost(bytes = "vec", tag = "3")]
        pub json: Vec<u8>,
    }

    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
    pub struct ServiceRef {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServiceMsg {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(string, tag = "3")]
        pub vip: String,
        #[prost(message, repeated, tag = "4")]
        pub endpoints: Vec<EndpointMsg>,
        #[prost(string, repeated, tag = "5")]
        pub hostnames: Vec<String>,
        #[prost(string, repeated, tag = "6")]
        pub source_kinds: Vec<String>,
        #[prost(string, repeated, tag = "7")]
        pub consul_tags: Vec<String>,
        #[prost(string, repeated, tag = "8")]
        pub consul_datacenters: Vec<String>,
        #[prost(string, repeated, tag = "9")]
        pub eureka_vips: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EndpointMsg {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(btree_map = "string, uint32", tag = "3")]
        pub ports: BTreeMap<String, u32>,
        #[prost(bool, tag = "4")]
        pub healthy: bool,
        #[prost(string, tag = "5")]
        pub zone: String,
        #[prost(string, tag = "6")]
        pub identity: String,
        #[prost(string, tag = "7")]
        pub source: String,
        #[prost(bool, tag = "8")]
        pub stale: bool,
        #[prost(btree_map = "string, string", tag = "9")]
        pub labels: BTreeMap<String, String>,
        #[prost(bool, tag = "10")]
        pub mtls_strict: bool,
    }
}

/// `old` encoded, decoded as `N` and encoded again gives the same bytes (a field with
/// another number or wire type would be dropped as unknown, or change them), and `N`'s
/// bytes decode back to `old`.
fn same<O: Message + Default + PartialEq + std::fmt::Debug, N: Message + Default>(old: O) {
    let bytes = old.encode_to_vec();
    assert!(!bytes.is_empty());
    let new = N::decode(bytes.as_slice()).expect("the generated message decodes the old one");
    let again = new.encode_to_vec();
    assert_eq!(again, bytes, "{old:?}");
    assert_eq!(O::decode(again.as_slice()).unwrap(), old);
}

fn hello() -> old::Hello {
    old::Hello {
        last_version: u64::MAX,
        address: "10.0.0.1".into(),
        agent_version: "0.1.0".into(),
        protocol: 7,
    }
}

fn error_reply() -> old::ErrorReply {
    old::ErrorReply {
        code: 12,
        message: "controller failed".into(),
    }
}

#[test]
fn control_messages_keep_their_encoding() {
    use old::{client_request as cr, server_response as sr};
    for kind in [
        cr::Kind::Join(old::JoinRequest {
            token_id: "tok".into(),
            secret: vec![1, 2, 3],
            csr_der: vec![0x30, 0x82],
            hostname: "vm-1".into(),
        }),
        cr::Kind::Renew(old::RenewRequest {
            csr_der: vec![9; 40],
        }),
        cr::Kind::Subscribe(hello()),
    ] {
        same::<_, wire::ClientRequest>(old::ClientRequest { kind: Some(kind) });
    }
    for kind in [
        sr::Kind::Issued(old::Issued {
            agent_id: "a1".into(),
            spiffe_id: "spiffe://causeway.local/ns/default/sa/web".into(),
            cert_chain_der: vec![vec![1], vec![2, 2]],
            trust_bundle_der: vec![vec![3]],
            not_after_unix: 1_900_000_000,
            group: "web".into(),
        }),
        sr::Kind::Error(error_reply()),
    ] {
        same::<_, wire::ServerResponse>(old::ServerResponse { kind: Some(kind) });
    }
    // Every error code keeps its number.
    for code in 0..=12 {
        let new = wire::ErrorCode::try_from(code).expect("known code");
        assert_eq!(new as i32, code);
    }
    assert_eq!(wire::ErrorCode::Internal as i32, 12);
    assert_eq!(wire::ErrorCode::Unsupported as i32, 11);
}

#[test]
fn push_messages_keep_their_encoding() {
    use old::{agent_frame as af, push_frame as pf};
    let endpoint = old::EndpointMsg {
        id: "file/w1".into(),
        address: "10.0.0.1".into(),
        ports: BTreeMap::from([("http".into(), 8080), ("grpc".into(), 9090)]),
        healthy: true,
        zone: "z1".into(),
        identity: "spiffe://causeway.local/ns/default/sa/web".into(),
        source: "file".into(),
        stale: true,
        labels: BTreeMap::from([("app".into(), "web".into())]),
        mtls_strict: true,
    };
    let update = old::ConfigUpdate {
        version: 42,
        base_version: 40,
        full: true,
        services: vec![old::ServiceMsg {
            namespace: "default".into(),
            name: "web".into(),
            vip: "240.240.0.1".into(),
            endpoints: vec![endpoint],
            hostnames: vec!["web.example".into()],
            source_kinds: vec!["file".into()],
            consul_tags: vec!["v1".into()],
            consul_datacenters: vec!["dc1".into()],
            eureka_vips: vec!["WEB".into()],
        }],
        removed: vec![old::ServiceRef {
            namespace: "default".into(),
            name: "old".into(),
        }],
        trust_bundle_der: vec![vec![0x30, 1]],
        bundle_set: true,
        deny_serials: vec!["abcd".into()],
        deny_set: true,
        vip_cidr: "240.240.0.0/16".into(),
        required_features: vec!["policy/v1".into()],
        policies: vec![old::PolicyMsg {
            key: "AuthorizationPolicy/default/allow".into(),
            seq: 3,
            json: b"{}".to_vec(),
        }],
        removed_policies: vec!["PeerAuthentication/default/x".into()],
    };
    for kind in [
        pf::Kind::Update(update),
        pf::Kind::Heartbeat(old::Heartbeat { version: 9 }),
        pf::Kind::Error(error_reply()),
        pf::Kind::Registration(old::Registration {
            address: "10.0.0.1".into(),
            accepted: true,
            error: "no".into(),
        }),
    ] {
        same::<_, push::PushFrame>(old::PushFrame { kind: Some(kind) });
    }
    for kind in [
        af::Kind::Ack(old::Ack { version: 5 }),
        af::Kind::Nack(old::Nack {
            version: 6,
            error: "bad".into(),
            current_version: 5,
            rejected: vec![old::ServiceRejection {
                namespace: "default".into(),
                name: "web".into(),
                error: "port".into(),
            }],
        }),
        af::Kind::Goodbye(old::Goodbye {}),
        af::Kind::Denials(old::DenialReport {
            denials: vec![old::Denial {
                unix_ms: 1_700_000_000_000,
                source_principal: "spiffe://causeway.local/ns/default/sa/api".into(),
                source_address: "10.0.0.2".into(),
                port: 8080,
                policy: "default/deny".into(),
            }],
        }),
    ] {
        same::<_, push::AgentFrame>(old::AgentFrame { kind: Some(kind) });
    }
    same::<_, push::Hello>(hello());
}

/// A hello from a newer agent, naming its metrics endpoint for Prometheus service
/// discovery (field 5), decodes in a controller that predates the field: it ignores it.
#[test]
fn a_hello_with_a_metrics_endpoint_decodes_in_an_older_controller() {
    let old = hello();
    let new = push::Hello {
        last_version: old.last_version,
        address: old.address.clone(),
        agent_version: old.agent_version.clone(),
        protocol: old.protocol,
        metrics_endpoint: "10.0.0.1:15090".into(),
    };
    let decoded = old::Hello::decode(new.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, old);
    let back = push::Hello::decode(decoded.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back.metrics_endpoint, "");
}
