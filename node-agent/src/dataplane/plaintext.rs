//! Inbound plaintext (15006): off-host plaintext that PERMISSIVE lets in is authorized by
//! the agent before any byte reaches the application.
//!
//! Capture ([`super::capture::PlaintextCapture`]) hands each off-host TCP connection to
//! this host's workload ports that admit plaintext to this listener with TPROXY: the
//! accepted socket keeps the client's address as its peer and the original destination
//! as its local address. The connection is decided by the same evaluator as tunnel
//! streams ([`super::authz::LocalAuthz`]) with no principal, so `ipBlocks`,
//! `remoteIpBlocks` and `source.ip` rules apply and principal / namespace rules do not
//! match. Denied: reset at once, logged and counted. Allowed: the agent connects to the
//! original destination from the client's address (IP_TRANSPARENT), so the application
//! still sees the real client, and splices; the application's replies carry the
//! connection's mark and are routed back to the agent. An open connection is decided
//! again whenever the policies change (or its port stops admitting plaintext) and cut
//! when now refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument as _;

use super::authz::LocalAuthz;
use super::capture::RuleSet;
use super::splice::splice_until;
use super::tunnel::Tunnel;

/// What plaintext capture hands to the agent now: this host's workload addresses and the
/// ports that admit plaintext. A connection to anything else (someone dialling 15006
/// directly, a port that turned STRICT since) is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    addrs: Vec<Ipv4Addr>,
    ports: Vec<u16>,
}

impl Targets {
    /// The targets of installed capture rules (none without plaintext capture).
    pub fn of(rules: &RuleSet) -> Self {
        if rules.plaintext.is_none() {
            return Self::default();
        }
        Self {
            addrs: rules.plain_addrs.clone(),
            ports: rules.plain_ports.clone(),
        }
    }

    /// Whether a connection to `dst` was captured for authorization.
    pub fn admits(&self, dst: SocketAddr) -> bool {
        let ip = match dst.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) => a,
                None => return false,
            },
        };
        self.addrs.contains(&ip) && self.ports.contains(&dst.port())
    }
}

/// Settings of the plaintext listener.
#[derive(Debug, Clone)]
pub struct PlaintextSettings {
    /// Mark of the connections to the application (the policy route returns their
    /// replies to the agent).
    pub mark: u32,
    /// Timeout of the connect to the application.
    pub connect_timeout: Duration,
    /// Idle timeout of a proxied connection (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// Binds the TPROXY target `addr` (IP_TRANSPARENT: it accepts connections addressed to
/// the application ports; needs CAP_NET_ADMIN, which capture needs anyway).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Accepts captured plaintext connections until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    tunnel: Arc<Tunnel>,
    targets: watch::Receiver<Arc<Targets>>,
    settings: PlaintextSettings,
) {
    let settings = Arc::new(settings);
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(dst) = client.local_addr() else {
            continue;
        };
        let (tunnel, targets, settings) = (tunnel.clone(), targets.clone(), settings.clone());
        let span = tracing::info_span!("inbound_plaintext", src = %peer, dst = %dst);
        tokio::spawn(
            async move { serve_one(client, peer, dst, &tunnel, targets, &settings).await }
                .instrument(span),
        );
    }
}

/// Closes `s` with a reset.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

async fn serve_one(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    tunnel: &Tunnel,
    targets: watch::Receiver<Arc<Targets>>,
    settings: &PlaintextSettings,
) {
    if !targets.borrow().admits(dst) {
        tracing::warn!(
            "plaintext connection refused: not a port of this host's workload that admits plaintext"
        );
        reset(client);
        return;
    }
    let authz = tunnel.policy_changes();
    let decision = authz.borrow().decide(None, peer.ip(), dst.ip(), dst.port());
    if !decision.allow {
        tracing::warn!(
            policy = decision.policy_label(),
            "plaintext connection denied by policy"
        );
        reset(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let app = match connect_as(peer.ip(), dst, settings).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(app = %dst, error = %e, "local application unreachable");
            reset(client);
            return;
        }
    };
    let _inflight = tunnel.inflight().track();
    tracing::info!(
        policy = decision.policy_label(),
        "inbound plaintext connection"
    );
    let cut = cut_when_refused(authz, targets, peer.ip(), dst);
    let done = splice_until(client, app, settings.idle_timeout, cut).await;
    tracing::debug!(bytes_in = done.a_to_b, bytes_out = done.b_to_a, end = ?done.end, "inbound plaintext connection done");
}

/// Connects to the application at `dst` from `source` (the client's address, so the
/// application sees the real client), with the plaintext mark.
async fn connect_as(
    source: IpAddr,
    dst: SocketAddr,
    settings: &PlaintextSettings,
) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_ip_transparent_v4(true)?;
    sock.set_mark(settings.mark)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::new(source, 0).into())?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    let s = tokio::time::timeout(settings.connect_timeout, sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Completes when an open plaintext connection must be cut: a policy change denies it,
/// or its port no longer admits plaintext (it turned STRICT). Allowed connections are
/// untouched.
async fn cut_when_refused(
    mut authz: watch::Receiver<Arc<LocalAuthz>>,
    mut targets: watch::Receiver<Arc<Targets>>,
    source: IpAddr,
    dst: SocketAddr,
) {
    authz.mark_unchanged();
    targets.mark_unchanged();
    loop {
        tokio::select! {
            r = authz.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                let view = authz.borrow_and_update().clone();
                let d = view.decide(None, source, dst.ip(), dst.port());
                if !d.allow {
                    tracing::warn!(policy = d.policy_label(), "open plaintext connection cut: a policy change denies it");
                    return;
                }
            }
            r = targets.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                if !targets.borrow_and_update().admits(dst) {
                    tracing::warn!("open plaintext connection cut: its port no longer admits plaintext");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_admit_only_captured_address_and_port() {
        let t = Targets {
            addrs: vec!["10.0.0.1".parse().unwrap()],
            ports: vec![8080],
        };
        assert!(t.admits("10.0.0.1:8080".parse().unwrap()));
        assert!(t.admits("[::ffff:10.0.0.1]:8080".parse().unwrap()));
        assert!(
            !t.admits("10.0.0.1:15006".parse().unwrap()),
            "a direct dial of 15006"
        );
        assert!(!t.admits("10.0.0.2:8080".parse().unwrap()));
        assert!(!Targets::default().admits("10.0.0.1:8080".parse().unwrap()));
    }
}
