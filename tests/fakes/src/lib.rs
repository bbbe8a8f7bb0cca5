//! `causeway-fakes`: fake Consul, Eureka and Kubernetes API servers for tests.
//!
//! What it does: each fake binds `127.0.0.1:0`, seeds itself from the recorded real
//! responses in `tests/fixtures` (see [`fixtures_dir`]), serves the read APIs that
//! Causeway's registry adapters and real client libraries use — with Consul blocking
//! queries (`index`/`wait`, `X-Consul-Index`) and Eureka full and delta fetches — and
//! accepts changes both through the registries' own HTTP write APIs (so `py-consul` and
//! `py-eureka-client` can register into them) and through Rust methods (so tests can
//! drive them). Faults ([`Fault`]) can be injected into every read.
//!
//! What it does not: implement ACL policies, sessions, KV, leader election, peer
//! replication or lease expiry. It is test support, never shipped.

mod consul;
mod eureka;
mod fixtures;
mod http;
mod kubernetes;

pub use consul::{ConsulRegistration, FakeConsul, registration_fixture};
pub use eureka::{EurekaInstance, FakeEureka};
pub use fixtures::{HttpFixture, fixtures_dir, read_fixture_bytes, read_http_fixture};
pub use http::{Fault, RecordedRequest};
pub use kubernetes::{FakeKubernetes, KubeKind};
