//! Traffic capture: the agent's own iptables chains in the `nat` table.
//!
//! Everything the agent installs lives in chains whose names start with `CAUSEWAY_`,
//! plus one jump from the built-in `OUTPUT` chain. Rules are applied with
//! `iptables-restore --noflush` so a change is one transaction: either the whole new
//! rule set is live or the old one still is. Removal is one transaction too, computed from
//! what `iptables-save` shows, so leftovers of a crashed agent are found and removed.
//!
//! STRICT mode adds `CAUSEWAY_INBOUND` in the `filter` table (reset for off-host TCP to
//! this host's application ports). Inbound plaintext capture ([`PlaintextCapture`]) adds
//! `CAUSEWAY_PLAIN_IN` and `CAUSEWAY_PLAIN_OUT` in the `mangle` table (TPROXY of off-host
//! plaintext to the application ports that admit it, to the agent's 15006, and the mark
//! that routes the application's replies back to the agent) plus one policy-routing rule
//! and route in table [`ROUTE_TABLE`]. DNS capture (port 15053) is in `crate::dns`.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
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
/// The `mangle PREROUTING` chain that hands off-host plaintext to the agent (TPROXY).
pub const PLAIN_IN_CHAIN: &str = "CAUSEWAY_PLAIN_IN";
/// The `mangle OUTPUT` chain that marks the application's replies to the agent's
/// transparent connections, so they are routed back to the agent ([`ROUTE_TABLE`]).
pub const PLAIN_OUT_CHAIN: &str = "CAUSEWAY_PLAIN_OUT";
/// Routing table (and rule preference) of the policy route `local 0.0.0.0/0 dev lo` that
/// delivers packets carrying the plaintext mark locally. Fixed, so cleanup finds it
/// without knowing the mark of the agent that installed it.
pub const ROUTE_TABLE: u32 = 0x4357;

/// Inbound plaintext capture: off-host TCP to this host's workload addresses on the
/// ports that admit plaintext (not STRICT) is handed to the agent's listener with TPROXY
/// (the connection keeps its addresses: the agent sees the client's real address and the
/// original destination); the agent connects to the application from the client's
/// address (IP_TRANSPARENT) with socket mark `mark`, whose connection mark makes the
/// application's replies return to the agent through the policy route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaintextCapture {
    /// The agent's plaintext listener (the TPROXY target, `[dataplane] inbound_listen`).
    pub listen: SocketAddrV4,
    /// Mark of the agent's connections to the application (and of the replies).
    pub mark: u32,
}

impl PlaintextCapture {
    /// The mark for the agent's `[dataplane] mark`: the next value (it must differ: the
    /// policy route sends every packet with it to this host).
    pub fn mark_for(agent_mark: u32) -> u32 {
        agent_mark.wrapping_add(1).max(1)
    }
}

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
    /// This host's workload addresses that plaintext is captured on (not loopback).
    pub plain_addrs: Vec<Ipv4Addr>,
    /// This host's application ports that admit plaintext (every own port not STRICT).
    pub plain_ports: Vec<u16>,
    /// Inbound plaintext capture (`None`: plaintext goes straight to the application).
    pub plaintext: Option<PlaintextCapture>,
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
        let mut plain_addrs: Vec<Ipv4Addr> = own
            .iter()
            .copied()
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .collect();
        plain_addrs.sort_unstable();
        plain_addrs.dedup();
        Self {
            mark,
            outbound_port,
            destinations,
            strict: chain || ports.iter().any(|p| strict_port(*p)),
            strict_ports: ports.iter().copied().filter(|p| strict_port(*p)).collect(),
            plain_addrs,
            plain_ports: ports.into_iter().filter(|p| !strict_port(*p)).collect(),
            plaintext: None,
        }
    }

    /// The same rules with inbound plaintext capture to `capture`.
    pub fn with_plaintext(mut self, capture: PlaintextCapture) -> Self {
        self.plaintext = Some(capture);
        self
    }

    /// The rules of [`PLAIN_IN_CHAIN`] and [`PLAIN_OUT_CHAIN`] (mangle), empty without
    /// plaintext capture. Loopback is never captured: the tunnel reaches the application
    /// over it, and so do this host's own clients and the application's replies to the
    /// agent.
    pub fn plaintext_rules(&self) -> (Vec<String>, Vec<String>) {
        let Some(p) = &self.plaintext else {
            return (Vec::new(), Vec::new());
        };
        let mut input = vec![format!("-A {PLAIN_IN_CHAIN} -i lo -j RETURN")];
        for a in &self.plain_addrs {
            for port in &self.plain_ports {
                input.push(format!(
                    "-A {PLAIN_IN_CHAIN} -d {a}/32 -p tcp -m tcp --dport {port} -j TPROXY --on-port {} --on-ip {} --tproxy-mark 0x0/0x0",
                    p.listen.port(),
                    p.listen.ip()
                ));
            }
        }
        let output = vec![
            format!(
                "-A {PLAIN_OUT_CHAIN} -p tcp -m mark --mark {:#x} -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                p.mark
            ),
            format!(
                "-A {PLAIN_OUT_CHAIN} -p tcp -m connmark --mark {:#x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                p.mark
            ),
        ];
        (input, output)
    }

    fn plaintext_jumps() -> [String; 2] {
        [
            format!("-A PREROUTING -j {PLAIN_IN_CHAIN}"),
            format!("-A OUTPUT -j {PLAIN_OUT_CHAIN}"),
        ]
    }

    /// The mangle section: both chains declared (which flushes them in `--noflush`
    /// mode), their rules, and the jumps when `jumps`.
    fn mangle_section(&self, jumps: bool) -> String {
        let (input, output) = self.plaintext_rules();
        let mut s = format!("*mangle\n:{PLAIN_IN_CHAIN} - [0:0]\n:{PLAIN_OUT_CHAIN} - [0:0]\n");
        for r in input.iter().chain(&output) {
            s.push_str(r);
            s.push('\n');
        }
        if jumps {
            for j in Self::plaintext_jumps() {
                s.push_str(&j);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
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
        if self.plaintext.is_some() {
            let (input, output) = self.plaintext_rules();
            v.push(format!("mangle :{PLAIN_IN_CHAIN}"));
            v.push(format!("mangle :{PLAIN_OUT_CHAIN}"));
            v.extend(Self::plaintext_jumps().map(|j| format!("mangle {j}")));
            v.extend(
                input
                    .into_iter()
                    .chain(output)
                    .map(|r| format!("mangle {r}")),
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
        if self.plaintext.is_some() {
            s.push_str(&self.mangle_section(true));
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
        match (previous.plaintext.is_some(), self.plaintext.is_some()) {
            (true, true) => s.push_str(&self.mangle_section(false)),
            (false, true) => s.push_str(&self.mangle_section(true)),
            (true, false) => s.push_str(&format!(
                "*mangle\n-D PREROUTING -j {PLAIN_IN_CHAIN}\n-D OUTPUT -j {PLAIN_OUT_CHAIN}\n-F {PLAIN_IN_CHAIN}\n-F {PLAIN_OUT_CHAIN}\n-X {PLAIN_IN_CHAIN}\n-X {PLAIN_OUT_CHAIN}\nCOMMIT\n"
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

/// Runs `ip ARGS`; its output on success.
fn ip(args: &[&str]) -> Result<String, CaptureError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CaptureError::Spawn { tool: "ip", source })?;
    if !out.status.success() {
        return Err(CaptureError::Failed {
            tool: "ip",
            status: out.status.to_string(),
            stderr: format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The policy route of plaintext capture: packets with `mark` are delivered on this host
/// (the application's replies to the agent's transparent connections, addressed to an
/// off-host client). Replaces what is there.
pub fn install_route(mark: u32) -> Result<(), CaptureError> {
    remove_route()?;
    let (table, mark) = (ROUTE_TABLE.to_string(), format!("{mark:#x}"));
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    ip(&[
        "rule", "add", "fwmark", &mark, "lookup", &table, "pref", &table,
    ])?;
    Ok(())
}

/// The live policy-routing rules that look up [`ROUTE_TABLE`], as `ip rule` prints them.
pub fn live_route_rules() -> Result<Vec<String>, CaptureError> {
    let table = ROUTE_TABLE.to_string();
    Ok(ip(&["rule", "show", "table", &table])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The live routes of [`ROUTE_TABLE`], as `ip -4 route show table all` prints them
/// without the trailing `scope` (e.g. `local default dev lo table 17239`).
pub fn live_route_table() -> Result<Vec<String>, CaptureError> {
    let marker = format!(" table {ROUTE_TABLE} ");
    Ok(ip(&["-4", "route", "show", "table", "all"])?
        .lines()
        .filter(|l| format!("{l} ").contains(&marker))
        .map(|l| {
            let l = l.trim();
            l.split_once(" scope ")
                .map_or(l, |(head, _)| head)
                .to_owned()
        })
        .collect())
}

/// Removes every rule that looks up [`ROUTE_TABLE`] and the table's routes; how many
/// rules were removed.
pub fn remove_route() -> Result<usize, CaptureError> {
    let table = ROUTE_TABLE.to_string();
    let n = live_route_rules()?.len();
    for _ in 0..n {
        ip(&["rule", "del", "table", &table])?;
    }
    // `ip route show table N` fails while the table does not exist: look in all tables.
    let marker = format!(" table {table} ");
    if ip(&["-4", "route", "show", "table", "all"])?
        .lines()
        .any(|l| format!("{l} ").contains(&marker))
    {
        ip(&["route", "flush", "table", &table])?;
    }
    Ok(n)
}

/// Removes every Causeway chain and jump that is live (leftovers included) and the
/// plaintext policy route. Returns how many lines and rules were removed.
pub fn remove_all() -> Result<usize, CaptureError> {
    let live = LiveRules::parse(&save()?);
    let n = live.lines().len();
    if let Some(script) = live.removal_script() {
        restore(&script)?;
    }
    let routes = match remove_route() {
        Ok(r) => r,
        // A host without `ip` has no policy route of ours.
        Err(CaptureError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            0
        }
        Err(e) => return Err(e),
    };
    Ok(n + routes)
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
        if let Some(p) = &rules.plaintext {
            install_route(p.mark)?;
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
        match (&self.current.plaintext, &rules.plaintext) {
            (_, Some(p)) if self.current.plaintext.as_ref() != Some(p) => install_route(p.mark)?,
            (Some(_), None) => {
                remove_route()?;
            }
            _ => {}
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
                        region: None,
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

    #[test]
    fn plaintext_capture_tproxies_permissive_own_ports_and_marks_replies() {
        let own = ["10.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let mut s = state(&["10.0.0.1", "10.0.0.2"]);
        let web = s.services.get_mut("default/web").unwrap();
        web.endpoints.get_mut("e0").unwrap().ports =
            [("http".to_owned(), 80), ("admin".to_owned(), 9090)].into();
        let p = PlaintextCapture {
            listen: "0.0.0.0:15006".parse().unwrap(),
            mark: PlaintextCapture::mark_for(0x4357),
        };
        // Port 9090 STRICT: refused by the filter rule, never handed to the agent.
        let r = RuleSet::for_state_by_port(&s, 0x4357, 15001, &own, false, &|p| p == 9090)
            .with_plaintext(p.clone());
        assert_eq!(r.plain_addrs, vec!["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(r.plain_ports, vec![80]);
        assert_eq!(r.strict_ports, vec![9090]);
        let (input, output) = r.plaintext_rules();
        assert_eq!(
            input,
            vec![
                "-A CAUSEWAY_PLAIN_IN -i lo -j RETURN",
                "-A CAUSEWAY_PLAIN_IN -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x0/0x0",
            ]
        );
        assert_eq!(
            output,
            vec![
                "-A CAUSEWAY_PLAIN_OUT -p tcp -m mark --mark 0x4358 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                "-A CAUSEWAY_PLAIN_OUT -p tcp -m connmark --mark 0x4358 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            ]
        );
        let install = r.install_script();
        assert!(
            install.contains("*mangle\n:CAUSEWAY_PLAIN_IN - [0:0]\n:CAUSEWAY_PLAIN_OUT - [0:0]\n")
                && install.contains(
                    "-A PREROUTING -j CAUSEWAY_PLAIN_IN\n-A OUTPUT -j CAUSEWAY_PLAIN_OUT\nCOMMIT"
                ),
            "{install}"
        );
        assert!(
            r.expected_lines()
                .contains(&"mangle -A PREROUTING -j CAUSEWAY_PLAIN_IN".to_owned())
        );
        assert!(!r.update_script(&r).contains("-A PREROUTING"), "jumps stay");
        let without = RuleSet::for_state(&s, 0x4357, 15001, &own, false);
        assert!(
            r.update_script(&without)
                .contains("-A PREROUTING -j CAUSEWAY_PLAIN_IN")
        );
        assert!(without.update_script(&r).contains("-X CAUSEWAY_PLAIN_IN"));
        // The parsed live form is what the agent expects (doctor), and removal covers it.
        let save = format!(
            "*mangle\n:PREROUTING ACCEPT [0:0]\n:CAUSEWAY_PLAIN_IN - [0:0]\n:CAUSEWAY_PLAIN_OUT - [0:0]\n{}\n{}\nCOMMIT\n",
            RuleSet::plaintext_jumps().join("\n"),
            input
                .iter()
                .chain(&output)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let live = LiveRules::parse(&save);
        let expected: Vec<String> = r
            .expected_lines()
            .into_iter()
            .filter(|l| l.starts_with("mangle "))
            .collect();
        assert!(Drift::between(&expected, &live.lines()).is_empty());
        assert_eq!(
            live.removal_script().unwrap(),
            "*mangle\n-D PREROUTING -j CAUSEWAY_PLAIN_IN\n-D OUTPUT -j CAUSEWAY_PLAIN_OUT\n-F CAUSEWAY_PLAIN_IN\n-F CAUSEWAY_PLAIN_OUT\n-X CAUSEWAY_PLAIN_IN\n-X CAUSEWAY_PLAIN_OUT\nCOMMIT\n"
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
