//! Which workload address an agent may register, and which endpoints may enter the
//! merged registry at all.
//!
//! An agent names its workload address in its `Hello`; the controller registers it only
//! when it can vouch for it (see ARCHITECTURE.md, "Auto-registration"): the address the
//! agent's QUIC connection comes from, or one inside its group's or join token's CIDRs
//! (hosts behind NAT). Never inside the VIP range (traffic to it would loop through every
//! agent's capture), never unspecified/multicast/broadcast, and never loopback unless the
//! control endpoint itself listens on loopback (one host: demos, tests, benchmarks).
//! Shadowing another agent's endpoint is checked by the mesh, which holds the endpoints.
//!
//! Every source's endpoints pass [`endpoint_problem`] before they enter the registry.

use std::net::IpAddr;

use causeway_api::registry::Endpoint;
use ipnet::{IpNet, Ipv4Net};

/// Why an agent's workload address was refused. The text is shown to the agent (its log
/// and status) and in `causewayctl agent show`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressRefused {
    /// Inside the VIP range.
    #[error(
        "workload address {address} is inside the VIP range {range}: traffic to it would loop through the mesh; start the agent with --address set to this host's own address"
    )]
    VipRange {
        /// The address.
        address: IpAddr,
        /// The VIP range.
        range: Ipv4Net,
    },
    /// Not a unicast host address.
    #[error(
        "workload address {address} is not a host address (unspecified, multicast or broadcast); start the agent with --address set to this host's own address"
    )]
    NotUnicast {
        /// The address.
        address: IpAddr,
    },
    /// Loopback, while the control endpoint is reachable from other hosts.
    #[error(
        "workload address {address} is a loopback address, which other hosts cannot reach (the controller's control endpoint does not listen on loopback, so agents are on other hosts); start the agent with --address set to this host's own address, or without --address"
    )]
    Loopback {
        /// The address.
        address: IpAddr,
    },
    /// Neither the connection's source nor inside the group's or token's CIDRs.
    #[error(
        "workload address {address} is neither the address this agent connects from ({remote}) nor inside its group's or join token's CIDRs ({cidrs}); start the agent without --address, or (a host behind NAT) add its network to the group's CIDRs"
    )]
    NotVouched {
        /// The address.
        address: IpAddr,
        /// The connection's source address.
        remote: IpAddr,
        /// The group's and token's CIDRs, comma-separated, or "none".
        cidrs: String,
    },
    /// Another agent's endpoint already has this address and a port in common.
    #[error(
        "workload address {address} port {port} is already the endpoint of agent {other} (service {service}); an agent cannot take over another's endpoint: start this agent with its own host's --address, or remove the other agent first (causewayctl agent remove {other})"
    )]
    Taken {
        /// The address.
        address: IpAddr,
        /// A port both would use.
        port: u16,
        /// The agent holding it.
        other: String,
        /// Its service.
        service: String,
    },
}

/// What the controller knows to judge an address.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    /// The VIP range.
    pub vip_range: Ipv4Net,
    /// Whether the control endpoint listens on loopback (then agents are on this host).
    pub control_on_loopback: bool,
}

impl AddressPolicy {
    /// Checks `address`, asked for by an agent connecting from `remote`, whose group and
    /// token allow `cidrs`.
    pub fn check(
        &self,
        address: IpAddr,
        remote: IpAddr,
        cidrs: &[IpNet],
    ) -> Result<(), AddressRefused> {
        let address = address.to_canonical();
        let remote = remote.to_canonical();
        if let IpAddr::V4(v4) = address
            && self.vip_range.contains(&v4)
        {
            return Err(AddressRefused::VipRange {
                address,
                range: self.vip_range,
            });
        }
        let not_unicast = match address {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if not_unicast {
            return Err(AddressRefused::NotUnicast { address });
        }
        if address.is_loopback() {
            // On one host every loopback address is the agent's own host.
            return if self.control_on_loopback {
                Ok(())
            } else {
                Err(AddressRefused::Loopback { address })
            };
        }
        if address == remote || cidrs.iter().any(|n| n.contains(&address)) {
            return Ok(());
        }
        Err(AddressRefused::NotVouched {
            address,
            remote,
            cidrs: if cidrs.is_empty() {
                "none".into()
            } else {
                cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }
}

/// Why an endpoint from a source cannot enter the merged registry, if it cannot: no
/// address, an address inside the VIP range (it would loop), or a port 0.
pub fn endpoint_problem(ep: &Endpoint, vip_range: Ipv4Net) -> Option<String> {
    if ep.address.trim().is_empty() {
        return Some("it has no address".into());
    }
    if let Some(p) = causeway_api::push::endpoint_problem(&ep.address, Some(vip_range)) {
        return Some(p);
    }
    if let Some((name, _)) = ep.ports.iter().find(|(_, p)| **p == 0) {
        return Some(format!("port {name} is 0"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(control_on_loopback: bool) -> AddressPolicy {
        AddressPolicy {
            vip_range: "240.240.0.0/16".parse().unwrap(),
            control_on_loopback,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_an_agent_may_and_may_not_register() {
        let remote = ip("198.51.100.7");
        let nat: Vec<IpNet> = vec!["10.20.0.0/16".parse().unwrap()];
        let p = policy(false);
        // Its connection's address, or inside the group's/token's CIDRs.
        p.check(remote, remote, &[]).unwrap();
        p.check(ip("10.20.3.4"), remote, &nat).unwrap();
        // Anything else is not vouched for.
        let e = p.check(ip("10.99.0.1"), remote, &nat).unwrap_err();
        assert!(matches!(e, AddressRefused::NotVouched { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("10.99.0.1")
                && text.contains("198.51.100.7")
                && text.contains("10.20.0.0/16"),
            "{text}"
        );
        // Never inside the VIP range, even from the CIDRs or as the source.
        let vip: Vec<IpNet> = vec!["240.240.0.0/16".parse().unwrap()];
        let e = p
            .check(ip("240.240.0.77"), ip("240.240.0.77"), &vip)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("inside the VIP range 240.240.0.0/16"),
            "{e}"
        );
        // Loopback only when the control endpoint is on loopback.
        let e = p.check(ip("127.0.0.5"), ip("127.0.0.1"), &[]).unwrap_err();
        assert!(matches!(e, AddressRefused::Loopback { .. }), "{e}");
        assert!(e.to_string().contains("loopback"), "{e}");
        let lo: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(p.check(ip("127.0.0.1"), ip("127.0.0.1"), &lo).is_err());
        assert!(p.check(ip("::1"), ip("::1"), &[]).is_err());
        policy(true)
            .check(ip("127.0.0.5"), ip("127.0.0.1"), &[])
            .unwrap();
        // Not a host address.
        for bad in ["0.0.0.0", "224.0.0.1", "255.255.255.255", "::"] {
            assert!(matches!(
                p.check(ip(bad), remote, &[]),
                Err(AddressRefused::NotUnicast { .. })
            ));
        }
        // An IPv4-mapped source counts as its IPv4 address.
        p.check(remote, ip("::ffff:198.51.100.7"), &[]).unwrap();
    }

    #[test]
    fn endpoints_that_cannot_enter_the_registry() {
        let range: Ipv4Net = "240.240.0.0/16".parse().unwrap();
        let prov = causeway_api::registry::Provenance {
            source: "f".into(),
            kind: causeway_api::registry::SourceKind::File,
            native_id: "1".into(),
            revision: "1".into(),
        };
        let mut ep = Endpoint::new("10.0.0.1", prov);
        ep.ports.insert("http".into(), 80);
        assert_eq!(endpoint_problem(&ep, range), None);
        ep.address = "web.example.com".into();
        assert_eq!(endpoint_problem(&ep, range), None, "host names are fine");
        ep.address = "240.240.1.2".into();
        assert!(
            endpoint_problem(&ep, range)
                .unwrap()
                .contains("inside the VIP range")
        );
        ep.address = String::new();
        assert!(endpoint_problem(&ep, range).is_some());
        ep.address = "10.0.0.1".into();
        ep.ports.insert("admin".into(), 0);
        assert!(
            endpoint_problem(&ep, range)
                .unwrap()
                .contains("port admin is 0")
        );
    }
}
