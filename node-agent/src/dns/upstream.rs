//! The host's own resolvers, as they were before the agent: `nameserver`, `search` and
//! `options ndots` of resolv.conf. A systemd-resolved stub (127.0.0.53) is followed to
//! /run/systemd/resolve/resolv.conf, which lists the real upstreams.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// systemd-resolved's stub listener.
pub const RESOLVED_STUB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
/// The file systemd-resolved writes with the real upstream servers.
pub const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// What resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// Name servers, in order.
    pub nameservers: Vec<IpAddr>,
    /// Search domains, in order (applied by the application's libc, kept as they are).
    pub search: Vec<String>,
    /// `options ndots:N`.
    pub ndots: Option<u8>,
}

impl ResolvConf {
    /// Parses resolv.conf text; unknown lines are ignored as libc does.
    pub fn parse(text: &str) -> Self {
        let mut rc = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // "fe80::1%eth0" carries a zone: dropped (cannot be a SocketAddr).
                    if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                        rc.nameservers.push(ip);
                    }
                }
                Some("search") | Some("domain") => {
                    rc.search = words.map(str::to_owned).collect();
                }
                Some("options") => {
                    for o in words {
                        if let Some(n) = o.strip_prefix("ndots:") {
                            rc.ndots = n.parse().ok();
                        }
                    }
                }
                _ => {}
            }
        }
        rc
    }

    /// Reads `path`; a stub-only file is replaced by the servers of `resolved` (the
    /// search domains stay those of `path`: they are what the applications use).
    pub fn load(path: &Path, resolved: &Path) -> std::io::Result<Self> {
        let mut rc = Self::parse(&std::fs::read_to_string(path)?);
        if rc.nameservers.contains(&RESOLVED_STUB)
            && let Ok(text) = std::fs::read_to_string(resolved)
        {
            let real = Self::parse(&text);
            rc.nameservers.retain(|n| *n != RESOLVED_STUB);
            for n in real.nameservers {
                if !rc.nameservers.contains(&n) {
                    rc.nameservers.push(n);
                }
            }
        }
        Ok(rc)
    }

    /// The upstream addresses (port 53), without `own` (the agent's own resolver
    /// address: forwarding to it would loop).
    pub fn upstreams(&self, own: &[IpAddr]) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .filter(|n| !own.contains(n))
            .map(|n| SocketAddr::new(*n, 53))
            .collect()
    }
}

/// Parses an upstream given as `ip` or `ip:port` (`[v6]:port`).
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
        .filter(|a| a.port() != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_search_and_ndots() {
        let rc = ResolvConf::parse(
            "# generated\nnameserver 10.0.0.2\nnameserver fd00::53 # v6\nnameserver bogus\nsearch corp.example lab.example\noptions ndots:2 timeout:1\n",
        );
        assert_eq!(
            rc.nameservers,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        assert_eq!(rc.search, vec!["corp.example", "lab.example"]);
        assert_eq!(rc.ndots, Some(2));
        assert_eq!(
            rc.upstreams(&["10.0.0.2".parse().unwrap()]),
            vec!["[fd00::53]:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn follows_the_systemd_resolved_stub() {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("resolv.conf");
        let real = dir.path().join("upstream.conf");
        std::fs::write(
            &stub,
            "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n",
        )
        .unwrap();
        std::fs::write(
            &real,
            "nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch other\n",
        )
        .unwrap();
        let rc = ResolvConf::load(&stub, &real).unwrap();
        assert_eq!(rc.nameservers.len(), 2);
        assert_eq!(rc.nameservers[0], "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(rc.search, vec!["corp.example"]);
        // No resolved file: the stub stays (it still answers while resolved runs).
        let rc = ResolvConf::load(&stub, &dir.path().join("missing")).unwrap();
        assert_eq!(rc.nameservers, vec![RESOLVED_STUB]);
    }

    #[test]
    fn upstream_forms() {
        assert_eq!(
            parse_upstream("10.0.0.2"),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("10.0.0.2:5353"),
            Some("10.0.0.2:5353".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("[fd00::1]:53"),
            Some("[fd00::1]:53".parse().unwrap())
        );
        assert_eq!(parse_upstream("dns.example"), None);
        assert_eq!(parse_upstream("10.0.0.2:0"), None);
    }
}
