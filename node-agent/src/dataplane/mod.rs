//! The data plane: traffic capture ([`capture`]), the outbound proxy ([`outbound`]) with
//! its endpoint choice ([`lb`]), the tunnel between agents ([`tunnel`], [`tls`]), and the
//! splice that joins two sides of a proxied connection ([`splice`]: half-close, resets,
//! idle timeout).
//!
//! Start order: listeners first, then capture rules, so a redirected connection always
//! finds a listener; stop order is the reverse. With capture on, every failure is fatal
//! (the agent would otherwise swallow traffic); with capture off the listeners are best
//! effort (nothing is redirected to them), so several agents can share one host in tests.
//!
//! DNS (15053) is in [`crate::dns`], health and metrics (15020) in [`crate::health`].
//! Inbound plaintext that PERMISSIVE lets in is captured (TPROXY, the client's address
//! kept) to the agent's 15006 and authorized there ([`plaintext`]); STRICT refuses it with
//! a filter rule (ARCHITECTURE.md, "Inbound plaintext").

pub mod authz;
pub mod capture;
pub mod drain;
pub mod http;
pub mod lb;
pub mod locality;
pub mod mux;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod readahead;
pub mod route;
pub mod splice;
pub mod tls;
pub mod tunnel;
#[cfg(test)]
mod tunnel_tests;
pub mod udp;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::DataplaneConfig;
use crate::identity::Identity;
use crate::push::SharedState;
use capture::{Capture, CaptureError, Drift, LiveRules, RuleSet};

/// File in the state dir listing the capture rules the running agent installed.
pub const RULES_FILE: &str = "capture.rules";

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    /// Capture rules could not be installed or removed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A listener could not be bound.
    #[error(
        "cannot listen on {what} {addr}: {source}; another agent or program holds it, or pick another address in the [dataplane] config"
    )]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The tunnel could not start.
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
}

/// The running data plane.
#[derive(Debug)]
pub struct Dataplane {
    tunnel: Option<Arc<tunnel::Tunnel>>,
    capture: Option<Arc<std::sync::Mutex<Option<Capture>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    rules_file: PathBuf,
}

/// Whether `ip` belongs to this host (a bind to it succeeds).
fn is_local(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

fn rules_for(
    s: &causeway_api::push::MeshState,
    cfg: &DataplaneConfig,
    own: Option<IpAddr>,
    who: &(String, String),
) -> RuleSet {
    let mut local: Vec<Ipv4Addr> = Vec::new();
    if let Some(IpAddr::V4(a)) = own {
        local.push(a);
    }
    for svc in s.services.values() {
        for ep in svc.endpoints.values() {
            if let Ok(ip) = ep.address.parse::<Ipv4Addr>()
                && !local.contains(&ip)
                && is_local(ip)
            {
                local.push(ip);
            }
        }
    }
    // STRICT when this agent's config says so, or when the controller pushed this host's
    // workload with its group in STRICT mode (`causewayctl group create --mtls strict`).
    let group_strict = s.services.values().any(|svc| {
        svc.endpoints.values().any(|ep| {
            ep.mtls_strict
                && ep
                    .address
                    .parse::<Ipv4Addr>()
                    .is_ok_and(|ip| local.contains(&ip))
        })
    });
    let legacy = cfg.inbound_mode == crate::config::InboundMode::Strict || group_strict;
    // A PeerAuthentication that applies to this workload decides each port's mode; the
    // group's `--mtls` and `[dataplane] inbound_mode` decide where none applies.
    let peer = authz::PeerView::build(s, &who.0, &who.1);
    let rules = RuleSet::for_state_by_port(
        s,
        cfg.mark,
        cfg.outbound_listen.port(),
        &local,
        legacy,
        &|port| match peer.mode_from_policy(port) {
            Some(mode) => mode == causeway_api::policy::PeerMode::Strict,
            None => legacy,
        },
    );
    match cfg.inbound_listen {
        std::net::SocketAddr::V4(listen) => rules.with_plaintext(capture::PlaintextCapture {
            listen,
            mark: capture::PlaintextCapture::mark_for(cfg.mark),
        }),
        std::net::SocketAddr::V6(_) => rules,
    }
}

fn write_rules_file(path: &Path, rules: &RuleSet) {
    let text = rules.expected_lines().join("\n") + "\n";
    if let Err(e) = crate::identity::write_atomic(path, text.as_bytes(), 0o644) {
        tracing::warn!(error = %e, "cannot write {RULES_FILE}");
    }
}

impl Dataplane {
    /// The tunnel, when it started.
    pub fn tunnel(&self) -> Option<&Arc<tunnel::Tunnel>> {
        self.tunnel.as_ref()
    }

    /// Starts listeners, the tunnel and (when `cfg.capture`) the capture rules.
    pub async fn start(
        cfg: &DataplaneConfig,
        identity: &Identity,
        state: SharedState,
        own: Option<IpAddr>,
        state_dir: &Path,
        telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    ) -> Result<Self, DataplaneError> {
        let rules_file = state_dir.join(RULES_FILE);
        let _ = std::fs::remove_file(&rules_file);
        let strict = cfg.capture;
        let mark = cfg.capture.then_some(cfg.mark);
        let mut dp = Self {
            tunnel: None,
            capture: None,
            tasks: Vec::new(),
            rules_file: rules_file.clone(),
        };
        let idle = (!cfg.idle_timeout.is_zero()).then_some(cfg.idle_timeout);
        let settings = tunnel::TunnelSettings {
            connect_timeout: cfg.connect_timeout,
            mark,
            idle_timeout: idle,
            tcp_only: cfg.tunnel_transport == crate::config::TunnelTransport::Tcp,
            telemetry: telemetry.clone(),
            ..tunnel::TunnelSettings::default()
        };
        let tunnel = match tunnel::Tunnel::bind(
            cfg.tunnel_listen,
            identity.clone(),
            state.clone(),
            settings,
        ) {
            Ok(t) => Some(t),
            Err(e) if strict => return Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "tunnel not started (capture is off, so the agent keeps running)");
                None
            }
        };
        dp.tunnel = tunnel.clone();
        if let Some(t) = &tunnel {
            // Follow the certificate on disk too (a renewal by `causeway-agent renew`, or
            // by this agent): new connections use it, established ones keep going.
            let (t, dir, mut serial) = (t.clone(), state_dir.to_owned(), identity.serial.clone());
            dp.tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let d = dir.clone();
                    let Ok(Ok(id)) =
                        tokio::task::spawn_blocking(move || crate::identity::StateDir::new(d).load())
                            .await
                    else {
                        continue;
                    };
                    if id.serial != serial {
                        serial = id.serial.clone();
                        if let Err(e) = t.reload(id) {
                            tracing::error!(error = %e, "cannot use the renewed certificate in the tunnel");
                        }
                    }
                }
            }));
        }
        match (
            tokio::net::TcpListener::bind(cfg.outbound_listen).await,
            &tunnel,
        ) {
            (Ok(l), Some(t)) => {
                let lb = lb::Balancer::new(cfg.eject_base, cfg.eject_max);
                let _ = std::fs::remove_file(state_dir.join(lb::OUTLIERS_FILE));
                dp.tasks.push(tokio::spawn(
                    lb.clone().report_outliers(state_dir.to_owned()),
                ));
                let settings = outbound::OutboundSettings {
                    mark,
                    tunnel_port: cfg.tunnel_port,
                    connect_timeout: cfg.connect_timeout,
                    idle_timeout: idle,
                    zone: cfg.zone.clone(),
                    plaintext_upstreams: cfg.plaintext_upstreams,
                    own_address: own,
                    protocol_sniff_timeout: cfg.protocol_sniff_timeout,
                    telemetry,
                };
                tracing::info!(outbound = %cfg.outbound_listen, tunnel = %cfg.tunnel_listen, "data plane listening");
                dp.tasks.push(tokio::spawn(outbound::Outbound::serve(
                    l,
                    state.clone(),
                    t.clone(),
                    lb,
                    settings,
                )));
            }
            (Ok(_), None) => {}
            (Err(source), _) if strict => {
                return Err(DataplaneError::Bind {
                    what: "TCP",
                    addr: cfg.outbound_listen.to_string(),
                    source,
                });
            }
            (Err(e), _) => {
                tracing::error!(addr = %cfg.outbound_listen, error = %e, "outbound listener not started (capture is off, so the agent keeps running)");
            }
        }
        // Inbound plaintext (15006): bound before capture hands connections to it.
        let targets = Arc::new(tokio::sync::watch::Sender::new(Arc::new(
            plaintext::Targets::default(),
        )));
        if cfg.capture
            && let Some(t) = &tunnel
        {
            let listener = plaintext::bind(cfg.inbound_listen).map_err(|source| {
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    // IP_TRANSPARENT needs CAP_NET_ADMIN, as the capture rules do.
                    DataplaneError::Capture(CaptureError::Failed {
                        tool: "the inbound plaintext listener (IP_TRANSPARENT)",
                        status: "refused".into(),
                        stderr: format!("{}: {source}", cfg.inbound_listen),
                    })
                } else {
                    DataplaneError::Bind {
                        what: "TCP (inbound plaintext)",
                        addr: cfg.inbound_listen.to_string(),
                        source,
                    }
                }
            })?;
            let settings = plaintext::PlaintextSettings {
                mark: capture::PlaintextCapture::mark_for(cfg.mark),
                connect_timeout: cfg.connect_timeout,
                idle_timeout: idle,
            };
            dp.tasks.push(tokio::spawn(plaintext::serve(
                listener,
                t.clone(),
                targets.subscribe(),
                settings,
            )));
        }
        if cfg.capture {
            let who = (identity.spiffe_id.to_string(), identity.info.group.clone());
            // Subscribed before the first rules are built: no change is missed between.
            let mut changes = state.subscribe();
            let first = changes.borrow_and_update().clone();
            let rules = rules_for(&first, cfg, own, &who);
            let cap = tokio::task::spawn_blocking(move || Capture::install(rules))
                .await
                .map_err(|e| CaptureError::Failed {
                    tool: "iptables-restore",
                    status: "task failed".into(),
                    stderr: e.to_string(),
                })??;
            write_rules_file(&rules_file, cap.current());
            targets.send_replace(Arc::new(plaintext::Targets::of(cap.current())));
            let cap = Arc::new(std::sync::Mutex::new(Some(cap)));
            dp.capture = Some(cap.clone());
            let cfg = cfg.clone();
            // Follow the mesh: endpoints come and go with config pushes. Woken by each
            // published snapshot; a burst while the rules are being applied ends in one
            // more update from the newest.
            dp.tasks.push(tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let snapshot = changes.borrow_and_update().clone();
                    let (cap, cfg, file, who, targets) = (
                        cap.clone(),
                        cfg.clone(),
                        rules_file.clone(),
                        who.clone(),
                        targets.clone(),
                    );
                    let _ = tokio::task::spawn_blocking(move || {
                        let rules = rules_for(&snapshot, &cfg, own, &who);
                        let mut guard = cap.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(c) = guard.as_mut() {
                            match c.update(rules) {
                                Ok(true) => {
                                    write_rules_file(&file, c.current());
                                    let now = plaintext::Targets::of(c.current());
                                    targets.send_if_modified(|t| {
                                        let changed = **t != now;
                                        if changed {
                                            *t = Arc::new(now);
                                        }
                                        changed
                                    });
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot update capture rules")
                                }
                            }
                        }
                    })
                    .await;
                }
            }));
        } else {
            tracing::info!("capture is off (--no-capture): no traffic is redirected to the agent");
        }
        Ok(dp)
    }

    /// Uses a renewed identity for new tunnel connections.
    pub fn reload(&self, identity: &Identity) {
        if let Some(t) = &self.tunnel
            && let Err(e) = t.reload(identity.clone())
        {
            tracing::error!(error = %e, "cannot use the renewed certificate in the tunnel");
        }
    }

    /// Stops with a drain: removes the capture rules (new connections are no longer
    /// redirected to the agent), stops accepting (the outbound listener and the tunnel's
    /// new connections), lets the proxied connections in flight finish for up to `drain`,
    /// then closes the rest, telling peer agents (an application close, so their pooled
    /// connections to this process redial at once).
    pub async fn stop(self, drain: Duration) -> Result<(), DataplaneError> {
        let mut result = Ok(());
        if let Some(cap) = self.capture {
            let taken = cap.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(c) = taken {
                result = tokio::task::spawn_blocking(move || c.remove())
                    .await
                    .unwrap_or(Ok(()))
                    .map_err(DataplaneError::from);
            }
            let _ = std::fs::remove_file(&self.rules_file);
        }
        for t in self.tasks {
            t.abort();
        }
        if let Some(t) = self.tunnel {
            t.stop_accepting();
            let open = t.inflight().count();
            if open > 0 {
                tracing::info!(
                    connections = open,
                    drain_timeout_secs = drain.as_secs_f64(),
                    "draining: waiting for the open proxied connections to finish"
                );
                match tokio::time::timeout(drain, t.inflight().idle()).await {
                    Ok(()) => tracing::info!("drained: every proxied connection finished"),
                    Err(_) => tracing::warn!(
                        connections = t.inflight().count(),
                        "drain timeout: closing the proxied connections still open"
                    ),
                }
            }
            t.shutdown().await;
        }
        result
    }
}

/// The result of `causeway-agent doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorReport {
    /// Whether an agent process of this state dir is running.
    pub agent_running: bool,
    /// The differences.
    pub drift: Drift,
}

fn agent_alive(state_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(state_dir.join(crate::run::STATUS_FILE)) else {
        return false;
    };
    let Ok(status) = serde_json::from_str::<crate::run::RunStatus>(&text) else {
        return false;
    };
    status.pid != 0
        && std::fs::read_to_string(format!("/proc/{}/comm", status.pid))
            .is_ok_and(|c| c.trim().starts_with("causeway-agent"))
}

/// Compares the live rules with what the agent of `state_dir` installed (nothing, when no
/// agent is running or it runs without capture).
pub fn doctor(state_dir: &Path) -> Result<DoctorReport, CaptureError> {
    let running = agent_alive(state_dir);
    let expected: Vec<String> = if running {
        std::fs::read_to_string(state_dir.join(RULES_FILE))
            .map(|t| {
                t.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let live = LiveRules::parse(&capture::save()?);
    let mut expected = expected;
    expected.extend(expected_route_lines(&expected));
    let mut live = live.lines();
    live.extend(live_route_lines()?);
    Ok(DoctorReport {
        agent_running: running,
        drift: Drift::between(&expected, &live),
    })
}

/// The policy route that plaintext capture needs, in the form [`live_route_lines`]
/// reports it: derived from the mark in the expected `CAUSEWAY_PLAIN_OUT` rules, none
/// without plaintext capture. Without it the application's replies to the agent's
/// transparent connections leave the host and plaintext clients hang.
fn expected_route_lines(expected: &[String]) -> Vec<String> {
    // Lines are "<table> <rule>", e.g. "mangle -A CAUSEWAY_PLAIN_OUT ... --mark 0x4358 ...".
    let prefix = format!("-A {} ", capture::PLAIN_OUT_CHAIN);
    let mark = expected
        .iter()
        .filter(|l| l.contains(&prefix))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "--mark")?;
            words.next().map(str::to_owned)
        });
    let Some(mark) = mark else {
        return Vec::new();
    };
    let table = capture::ROUTE_TABLE;
    vec![
        format!("ip rule: from all fwmark {mark} lookup {table}"),
        format!("ip route: local default dev lo table {table}"),
    ]
}

/// The live policy route of plaintext capture (rules and routes of
/// [`capture::ROUTE_TABLE`]), one line each, comparable with [`expected_route_lines`].
/// A host without `ip` has none.
fn live_route_lines() -> Result<Vec<String>, CaptureError> {
    let rules = match capture::live_route_rules() {
        Err(CaptureError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Vec::new());
        }
        other => other?,
    };
    let mut lines: Vec<String> = rules
        .iter()
        .map(|r| {
            // "17239:\tfrom all fwmark 0x4358 lookup 17239": the preference is not part of
            // the comparison.
            let body = r.split_once(':').map_or(r.as_str(), |(_, b)| b);
            format!(
                "ip rule: {}",
                body.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })
        .collect();
    lines.extend(
        capture::live_route_table()?
            .into_iter()
            .map(|r| format!("ip route: {r}")),
    );
    Ok(lines)
}

/// Removes every Causeway capture rule (leftovers of a killed agent included) and the
/// state dir's record of them; `Ok(0)` when there are none. For `causeway-agent cleanup`
/// (the packaged unit's ExecStopPost and the package's purge). A host without iptables
/// has no rules: that is `Ok(0)` as well.
pub fn cleanup(state_dir: &Path) -> Result<usize, CaptureError> {
    let n = match capture::remove_all() {
        Err(CaptureError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            0
        }
        other => other?,
    };
    let _ = std::fs::remove_file(state_dir.join(RULES_FILE));
    Ok(n)
}

#[cfg(test)]
mod doctor_tests {
    use super::*;

    #[test]
    fn the_policy_route_is_expected_exactly_with_plaintext_capture() {
        let with = vec![
            "nat -A OUTPUT -j CAUSEWAY_OUTPUT".to_owned(),
            "mangle -A CAUSEWAY_PLAIN_OUT -p tcp -m mark --mark 0x4358 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff".to_owned(),
        ];
        assert_eq!(
            expected_route_lines(&with),
            [
                "ip rule: from all fwmark 0x4358 lookup 17239",
                "ip route: local default dev lo table 17239"
            ]
        );
        assert!(expected_route_lines(&with[..1]).is_empty());
    }
}

#[cfg(test)]
mod peer_authentication_tests {
    use causeway_api::push::{EndpointState, MeshState, ServiceState};

    use super::*;

    const ME: &str = "spiffe://causeway.local/ns/shop/sa/web";

    fn state(policies: &str, group_strict: bool) -> SharedState {
        let mut s = MeshState::default();
        let ep = EndpointState {
            address: "127.0.0.1".into(),
            ports: [("http".to_owned(), 8080), ("admin".to_owned(), 9090)].into(),
            healthy: true,
            zone: None,
            identity: Some(ME.into()),
            source: "agents".into(),
            stale: false,
            labels: [("app".to_owned(), "web".to_owned())].into(),
            mtls_strict: group_strict,
            region: None,
        };
        s.services.insert(
            "shop/web".into(),
            ServiceState {
                vip: None,
                endpoints: [("agents/a1".to_owned(), ep)].into(),
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
        s.policies = authz::policies_from_yaml(policies);
        SharedState::new(s)
    }

    fn strict_ports(policies: &str, group_strict: bool) -> Vec<u16> {
        let who = (ME.to_owned(), "web".to_owned());
        rules_for(
            &state(policies, group_strict).get(),
            &DataplaneConfig::default(),
            Some("127.0.0.1".parse().unwrap()),
            &who,
        )
        .strict_ports
    }

    const NS_STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";

    #[test]
    fn peer_authentication_decides_each_port_and_supersedes_the_group_flag() {
        assert_eq!(strict_ports("", false), Vec::<u16>::new());
        assert_eq!(
            strict_ports("", true),
            vec![8080, 9090],
            "the group's --mtls strict"
        );
        assert_eq!(strict_ports(NS_STRICT, false), vec![8080, 9090]);
        let exception = format!(
            "{NS_STRICT}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{causeway.io/group: web}}}}\n  portLevelMtls:\n    8080: {{mode: PERMISSIVE}}\n"
        );
        assert_eq!(strict_ports(&exception, false), vec![9090]);
        let mesh_permissive = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: causeway-system}\nspec: {mtls: {mode: PERMISSIVE}}\n";
        assert_eq!(
            strict_ports(mesh_permissive, true),
            Vec::<u16>::new(),
            "a PeerAuthentication supersedes the group flag"
        );
    }
}
