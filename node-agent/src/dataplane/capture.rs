//! Traffic capture: the agent's own iptables chains in the `nat` table.
//!
//! Everything the agent installs lives in chains whose names start with `CAUSEWAY_`,
//! plus one jump from the built-in `OUTPUT` chain. Rules are applied with
//! `iptables-restore --noflush` so a change is one transaction: either the whole new
//! rule set is live or the old one still is. Removal is one transaction too, computed from
//! what `iptables-save` shows, so leftovers of a crashed agent are found and removed.
//!
//! STRICT mode adds `CAUSEWAY_INBOUND` in the `filter` table (reset for off-host TCP to
//! this host's application ports). What this module does not do: DNS capture (port
//! 15053) and the inbound plaintext port (15006) come with their own work items.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use causeway_api::push::MeshState;
use ipnet::Ipv4Net;

/// Prefix of every chain the agent owns.
pub const CHAIN_PREFIX: &str = "CAUSEWAY_";
/// The chain holding the outbound redirect rules.
pub const OUTPUT_CHAIN: &str = "CAUSEWAY_OUTPUT";
/// The VIP range when the controller has not sent one.
pub const DEFAULT_VIP_CIDR: &str = "240.240.0.0/16";

/// Why installing, removing or reading rules failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The iptables tool could not be started (not installed?).
    #[error("cannot run {tool}: {source}; install iptables, or start the agent with --no-capture")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The tool ran and refused (typically: not root / no CAP_NET_ADMIN).
    #[error(
        "{tool} failed ({status}): {stderr}; capture needs root or CAP_NET_ADMIN: run the agent as root (or with CAP_NET_ADMIN), or start it with --no-capture"
    )]
    Failed {
        /// The tool.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// Its error output.
        stderr: String,
    },
}

/// The chain that drops off-host plaintext to this host's application ports (STRICT).
pub const INBOUND_CHAIN: &str = "CAUSEWAY_INBOUND";

/// The expected capture rules for one state of the mesh: pure, so it is unit-tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Mark that exempts the agent's own sockets.
    pub mark: u32,
    /// Port of the outbound listener.
    pub outbound_port: u16,
    /// Captured destinations (VIP range first, then meshed endpoint addresses).
    pub destinations: Vec<Ipv4Net>,
    /// STRICT mode: this host's application ports, refused to plaintext from off-host
    /// (the tunnel reaches them over loopback). Empty in PERMISSIVE mode.
    pub strict_ports: Vec<u16>,
    /// Whether STRICT mode is on (the filter chain exists even with no ports yet).
    pub strict: bool,
}

impl RuleSet {
    /// The rules for `state`: the VIP range and every endpoint IPv4 address of every
    /// service, except `own` addresses (this host's workloads: no hairpin through the
    /// agent) and loopback. With `strict`, the ports of this host's own endpoints are
    /// closed to off-host plaintext.
    pub fn for_state(
        state: &MeshState,
        mark: u32,
        outbound_port: u16,
        own: &[Ipv4Addr],
        strict: bool,
    ) -> Self {
        Self::for_state_by_port(state, mark, outbound_port, own, strict, &|_| strict)
    }

    /// [`RuleSet::for_state`] with the mode decided per port (PeerAuthentication's
    /// `portLevelMtls`): `strict_port` says which of this host's ports refuse off-host
    /// plaintext; `chain` keeps the filter chain even when no port does.
    pub fn for_state_by_port(
        state: &MeshState,
        mark: u32,
        outbound_port: u16,
        own: &[Ipv4Addr],
        chain: bool,
        strict_port: &dyn Fn(u16) -> bool,
    ) -> Self {
        let vip = state
            .vip_cidr
            .unwrap_or_else(|| DEFAULT_VIP_CIDR.parse().expect("literal"));
        let mut addrs = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for svc in state.services.values() {
            for ep in svc.endpoints.values() {
                let Ok(ip) = ep.address.parse::<Ipv4Addr>() else {
                    continue;
                };
                if own.contains(&ip) {
                    ports.extend(ep.ports.values().copied());
                } else if !ip.is_loopback() && !ip.is_unspecified() && !vip.contains(&ip) {
                    addrs.insert(ip);
                }
            }
        }
        let mut destinations = vec![vip];
        destinations.extend(addrs.into_iter().map(Ipv4Net::from));
        Self {
            mark,
            outbound_port,
            destinations,
            strict: chain || ports.iter().any(|p| strict_port(*p)),
            strict_ports: ports.into_iter().filter(|p| strict_port(*p)).collect(),
        }
    }

    /// The rules of [`OUTPUT_CHAIN`] (nat), in the exact form `iptables-save` prints them.
    pub fn chain_rules(&self) -> Vec<String> {
        let mut rules = vec![format!(
            "-A {OUTPUT_CHAIN} -m mark --mark {:#x} -j RETURN",
            self.mark
        )];
        for d in &self.destinations {
            rules.push(format!(
                "-A {OUTPUT_CHAIN} -d {d} -p tcp -j REDIRECT --to-ports {}",
                self.outbound_port
            ));
        }
        rules
    }

    /// The rules of [`INBOUND_CHAIN`] (filter), STRICT mode only.
    pub fn inbound_rules(&self) -> Vec<String> {
        if !self.strict {
            return Vec::new();
        }
        let mut rules = vec![format!("-A {INBOUND_CHAIN} -i lo -j RETURN")];
        for p in &self.strict_ports {
            rules.push(format!(
                "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {p} -j REJECT --reject-with tcp-reset"
            ));
        }
        rules
    }

    /// The jump from the built-in chain.
    pub fn jump_rule() -> String {
        format!("-A OUTPUT -j {OUTPUT_CHAIN}")
    }

    fn inbound_jump() -> String {
        format!("-A INPUT -j {INBOUND_CHAIN}")
    }

    /// Every live line the agent expects, each prefixed with its table.
    pub fn expected_lines(&self) -> Vec<String> {
        let mut v = vec![
            format!("nat :{OUTPUT_CHAIN}"),
            format!("nat {}", Self::jump_rule()),
        ];
        v.extend(self.chain_rules().into_iter().map(|r| format!("nat {r}")));
        if self.strict {
            v.push(format!("filter :{INBOUND_CHAIN}"));
            v.push(format!("filter {}", Self::inbound_jump()));
            v.extend(
                self.inbound_rules()
                    .into_iter()
                    .map(|r| format!("filter {r}")),
            );
        }
        v
    }

    fn section(table: &str, chain: &str, rules: &[String], jump: Option<&str>) -> String {
        let mut s = format!("*{table}\n:{chain} - [0:0]\n");
        for r in rules {
            s.push_str(r);
            s.push('\n');
        }
        if let Some(j) = jump {
            s.push_str(j);
            s.push('\n');
        }
        s.push_str("COMMIT\n");
        s
    }

    /// The `iptables-restore --noflush` input that installs everything (after a cleanup).
    pub fn install_script(&self) -> String {
        let mut s = Self::section(
            "nat",
            OUTPUT_CHAIN,
            &self.chain_rules(),
            Some(&Self::jump_rule()),
        );
        if self.strict {
            s.push_str(&Self::section(
                "filter",
                INBOUND_CHAIN,
                &self.inbound_rules(),
                Some(&Self::inbound_jump()),
            ));
        }
        s
    }

    /// The input that replaces the chains' rules in place (jumps stay): declaring a chain
    /// in `--noflush` mode flushes it, in the same transaction as the new rules.
    pub fn update_script(&self, previous: &RuleSet) -> String {
        let mut s = Self::section("nat", OUTPUT_CHAIN, &self.chain_rules(), None);
        match (previous.strict, self.strict) {
            (true, true) => {
                s.push_str(&Self::section("filter", INBOUND_CHAIN, &self.inbound_rules(), None))
            }
            (false, true) => s.push_str(&Self::section(
                "filter",
                INBOUND_CHAIN,
                &self.inbound_rules(),
                Some(&Self::inbound_jump()),
            )),
            (true, false) => s.push_str(&format!(
                "*filter\n-D INPUT -j {INBOUND_CHAIN}\n-F {INBOUND_CHAIN}\n-X {INBOUND_CHAIN}\nCOMMIT\n"
            )),
            (false, false) => {}
        }
        s
    }
}

/// What the live tables hold that belongs to Causeway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveRules {
    /// (table, chain) of every `CAUSEWAY_*` chain declared.
    pub chains: Vec<(String, String)>,
    /// (table, rule) of rules inside `CAUSEWAY_*` chains and rules elsewhere that jump to one.
    pub rules: Vec<(String, String)>,
}

impl LiveRules {
    /// Extracts Causeway's part of `iptables-save` output (every table).
    pub fn parse(save: &str) -> Self {
        let mut live = Self::default();
        let mut table = String::new();
        for line in save.lines().map(str::trim) {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_owned();
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if name.starts_with(CHAIN_PREFIX) {
                    live.chains.push((table.clone(), name.to_owned()));
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or("");
                if chain.starts_with(CHAIN_PREFIX) || rule.contains(&format!("-j {CHAIN_PREFIX}")) {
                    live.rules.push((table.clone(), line.to_owned()));
                }
            }
        }
        live
    }

    /// Whether nothing of Causeway's is live.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty()
    }

    /// The lines in the form of [`RuleSet::expected_lines`].
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .chains
            .iter()
            .map(|(t, c)| format!("{t} :{c}"))
            .collect();
        v.extend(self.rules.iter().map(|(t, r)| format!("{t} {r}")));
        v
    }

    /// The `iptables-restore --noflush` input that removes all of it in one transaction:
    /// per table, jumps from other chains first, then flush and delete every
    /// `CAUSEWAY_*` chain.
    pub fn removal_script(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let tables: BTreeSet<&str> = self
            .chains
            .iter()
            .map(|(t, _)| t.as_str())
            .chain(self.rules.iter().map(|(t, _)| t.as_str()))
            .collect();
        let mut s = String::new();
        for table in tables {
            s.push_str(&format!("*{table}\n"));
            for (_, r) in self.rules.iter().filter(|(t, _)| t == table) {
                let chain = r.trim_start_matches("-A ").split_whitespace().next();
                if chain.is_some_and(|c| !c.starts_with(CHAIN_PREFIX)) {
                    s.push_str(&format!("-D {}\n", r.trim_start_matches("-A ")));
                }
            }
            let chains: Vec<&str> = self
                .chains
                .iter()
                .filter(|(t, _)| t == table)
                .map(|(_, c)| c.as_str())
                .collect();
            for c in &chains {
                s.push_str(&format!("-F {c}\n"));
            }
            for c in &chains {
                s.push_str(&format!("-X {c}\n"));
            }
            s.push_str("COMMIT\n");
        }
        Some(s)
    }
}

/// How live rules differ from the expected ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Expected lines that are not live.
    pub missing: Vec<String>,
    /// Live lines that are not expected (stale rules, or another tool's rewrite).
    pub unexpected: Vec<String>,
}

impl Drift {
    /// Compares; duplicates count (a jump installed twice is drift).
    pub fn between(expected: &[String], live: &[String]) -> Self {
        let mut left: Vec<&String> = live.iter().collect();
        let mut missing = Vec::new();
        for e in expected {
            if let Some(i) = left.iter().position(|l| *l == e) {
                left.remove(i);
            } else {
                missing.push(e.clone());
            }
        }
        Self {
            missing,
            unexpected: left.into_iter().cloned().collect(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// Runs `iptables-save` (every table).
pub fn save() -> Result<String, CaptureError> {
    let out = Command::new("iptables-save")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CaptureError::Spawn {
            tool: "iptables-save",
            source,
        })?;
    if !out.status.success() {
        return Err(CaptureError::Failed {
            tool: "iptables-save",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `iptables-restore --noflush` with `script` as one transaction.
pub fn restore(script: &str) -> Result<(), CaptureError> {
    let spawn_err = |source| CaptureError::Spawn {
        tool: "iptables-restore",
        source,
    };
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CaptureError::Failed {
            tool: "iptables-restore",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Removes every Causeway chain and jump that is live (leftovers included).
/// Returns how many lines were removed.
pub fn remove_all() -> Result<usize, CaptureError> {
    let live = LiveRules::parse(&save()?);
    let n = live.lines().len();
    if let Some(script) = live.removal_script() {
        restore(&script)?;
    }
    Ok(n)
}

/// Installed capture: updates in place and removes everything on [`Capture::remove`].
#[derive(Debug)]
pub struct Capture {
    current: RuleSet,
}

impl Capture {
    /// Removes leftovers of an earlier (crashed) agent, then installs `rules`.
    pub fn install(rules: RuleSet) -> Result<Self, CaptureError> {
        let stale = remove_all()?;
        if stale > 0 {
            tracing::warn!(
                lines = stale,
                "removed capture rules left by an earlier agent"
            );
        }
        restore(&rules.install_script())?;
        tracing::info!(destinations = rules.destinations.len(), mark = %format!("{:#x}", rules.mark), "capture rules installed");
        Ok(Self { current: rules })
    }

    /// The rules now installed.
    pub fn current(&self) -> &RuleSet {
        &self.current
    }

    /// Replaces the chain's rules if they changed (one transaction).
    pub fn update(&mut self, rules: RuleSet) -> Result<bool, CaptureError> {
        if rules == self.current {
            return Ok(false);
        }
        restore(&rules.update_script(&self.current))?;
        tracing::info!(
            destinations = rules.destinations.len(),
            "capture rules updated"
        );
        self.current = rules;
        Ok(true)
    }

    /// Removes everything Causeway has in the nat table.
    pub fn remove(self) -> Result<(), CaptureError> {
        remove_all()?;
        tracing::info!("capture rules removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::push::{EndpointState, ServiceState};

    fn state(addrs: &[&str]) -> MeshState {
        let mut s = MeshState::default();
        let endpoints = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    format!("e{i}"),
                    EndpointState {
                        address: (*a).into(),
                        ports: [("http".to_owned(), 80)].into(),
                        healthy: true,
                        zone: None,
                        identity: None,
                        source: "file".into(),
                        stale: false,
                        labels: Default::default(),
                        mtls_strict: false,
                    },
                )
            })
            .collect();
        s.services.insert(
            "default/web".into(),
            ServiceState {
                vip: None,
                endpoints,
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
        s
    }

    #[test]
    fn rules_cover_vips_and_endpoints_but_not_self_or_names() {
        let r = RuleSet::for_state(
            &state(&[
                "10.0.0.2",
                "10.0.0.1",
                "db.example",
                "10.0.0.2",
                "127.0.0.1",
            ]),
            0x4357,
            15001,
            &["10.0.0.1".parse().unwrap()],
            false,
        );
        assert_eq!(
            r.chain_rules(),
            vec![
                "-A CAUSEWAY_OUTPUT -m mark --mark 0x4357 -j RETURN",
                "-A CAUSEWAY_OUTPUT -d 240.240.0.0/16 -p tcp -j REDIRECT --to-ports 15001",
                "-A CAUSEWAY_OUTPUT -d 10.0.0.2/32 -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        assert!(
            r.install_script()
                .contains("-A OUTPUT -j CAUSEWAY_OUTPUT\nCOMMIT")
        );
        assert!(!r.update_script(&r).contains("-A OUTPUT"));
        assert!(
            !r.install_script().contains("filter"),
            "PERMISSIVE: no filter rules"
        );
    }

    #[test]
    fn strict_closes_own_ports_to_off_host_plaintext() {
        let own = ["10.0.0.1".parse().unwrap()];
        let strict =
            RuleSet::for_state(&state(&["10.0.0.1", "10.0.0.2"]), 0x4357, 15001, &own, true);
        assert_eq!(strict.strict_ports, vec![80]);
        assert_eq!(
            strict.inbound_rules(),
            vec![
                "-A CAUSEWAY_INBOUND -i lo -j RETURN",
                "-A CAUSEWAY_INBOUND -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset",
            ]
        );
        assert!(
            strict
                .install_script()
                .contains("*filter\n:CAUSEWAY_INBOUND - [0:0]\n")
        );
        assert!(
            strict
                .expected_lines()
                .contains(&"filter -A INPUT -j CAUSEWAY_INBOUND".to_owned())
        );
        let permissive = RuleSet::for_state(&state(&["10.0.0.1"]), 0x4357, 15001, &own, false);
        assert!(
            strict
                .update_script(&permissive)
                .contains("-A INPUT -j CAUSEWAY_INBOUND")
        );
        assert!(
            permissive
                .update_script(&strict)
                .contains("-X CAUSEWAY_INBOUND")
        );
    }

    const SAVE: &str = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n:CAUSEWAY_OUTPUT - [0:0]\n-A OUTPUT -j CAUSEWAY_OUTPUT\n-A OUTPUT -j DOCKER\n-A CAUSEWAY_OUTPUT -m mark --mark 0x4357 -j RETURN\n-A CAUSEWAY_OUTPUT -d 240.240.0.0/16 -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";

    #[test]
    fn live_rules_and_drift() {
        let live = LiveRules::parse(SAVE);
        assert_eq!(
            live.chains,
            vec![("nat".to_owned(), "CAUSEWAY_OUTPUT".to_owned())]
        );
        assert_eq!(live.rules.len(), 3, "{live:?}");
        let expected = RuleSet::for_state(&MeshState::default(), 0x4357, 15001, &[], false);
        assert!(Drift::between(&expected.expected_lines(), &live.lines()).is_empty());
        let other = RuleSet::for_state(&state(&["10.0.0.9"]), 0x4357, 15001, &[], false);
        let d = Drift::between(&other.expected_lines(), &live.lines());
        assert_eq!(
            d.missing,
            vec!["nat -A CAUSEWAY_OUTPUT -d 10.0.0.9/32 -p tcp -j REDIRECT --to-ports 15001"]
        );
        assert!(d.unexpected.is_empty());
        let mut doubled = live.lines();
        doubled.push(format!("nat {}", RuleSet::jump_rule()));
        assert_eq!(
            Drift::between(&expected.expected_lines(), &doubled).unexpected,
            vec![format!("nat {}", RuleSet::jump_rule())]
        );
    }

    #[test]
    fn removal_deletes_jumps_then_chains() {
        let script = LiveRules::parse(SAVE).removal_script().unwrap();
        assert_eq!(
            script,
            "*nat\n-D OUTPUT -j CAUSEWAY_OUTPUT\n-F CAUSEWAY_OUTPUT\n-X CAUSEWAY_OUTPUT\nCOMMIT\n"
        );
        let filter = LiveRules::parse(
            "*filter\n:CAUSEWAY_INBOUND - [0:0]\n-A INPUT -j CAUSEWAY_INBOUND\nCOMMIT\n",
        );
        assert_eq!(
            filter.removal_script().unwrap(),
            "*filter\n-D INPUT -j CAUSEWAY_INBOUND\n-F CAUSEWAY_INBOUND\n-X CAUSEWAY_INBOUND\nCOMMIT\n"
        );
    }
}
