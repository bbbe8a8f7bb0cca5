//! DNS capture that fails open: an nftables table with the `owner` flag.
//!
//! The kernel ties an owned table to the netlink socket that created it and deletes the
//! table when that socket closes. The socket belongs to an `nft -i` child whose standard
//! input is a pipe from the agent: when the agent exits in any way (including `kill -9`
//! or the OOM killer), the pipe reaches EOF, `nft` exits and the kernel removes the
//! redirect; when the `nft` child itself dies, the same happens. No user-space cleanup
//! has to run after a crash, so a dead agent never leaves port 53 pointing at nothing.
//!
//! The table (`ip causeway_dns`, chain `output`, nat hook at priority -100):
//! packets with the agent's mark return (its own upstream queries), then UDP and TCP to
//! port 53 *of the nameservers in resolv.conf* are redirected to the DNS listener's port
//! on 127.0.0.1. IPv6 nameservers get the same in a table `ip6 causeway_dns` (created by
//! the same `nft` process, so it goes with it), redirected to the port on [::1]; the
//! `ip` table is always there (with only the mark rule when every nameserver is IPv6).
//! Only those destinations: a local resolver (dnsmasq, unbound on
//! 127.0.0.1) forwarding to its own upstreams must not be captured, or its queries would
//! come back to the agent, which forwards to that local resolver again (a loop); and a
//! program that asks a named server explicitly (`dig @192.0.2.1`) gets that server.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The tables' name (families `ip` and `ip6`).
pub const TABLE: &str = "causeway_dns";
/// The families of the capture tables.
pub const FAMILIES: [&str; 2] = ["ip", "ip6"];

/// Why the DNS capture could not be installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NftError {
    /// `nft` could not be started.
    #[error(
        "cannot run nft: {0}; install the nftables package, or set [dns] mode = \"resolv-conf\" or \"off\""
    )]
    Spawn(std::io::Error),
    /// The table did not appear (no CAP_NET_ADMIN, kernel without owner tables, ...).
    #[error(
        "the DNS capture table {TABLE} did not appear: {0}; the agent needs CAP_NET_ADMIN and a kernel with nftables owner tables (5.12+); or set [dns] mode = \"resolv-conf\""
    )]
    NotInstalled(String),
    /// A table of that name is held by another live process (another agent?).
    #[error(
        "nftables table ip {TABLE} already exists and is owned by another process (another causeway-agent?): stop it first"
    )]
    Busy,
}

/// The `nft` script that creates the tables, capturing queries to `resolvers`.
pub fn script(mark: u32, port: u16, resolvers: &[IpAddr]) -> String {
    let mut out = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let set: Vec<String> = resolvers
            .iter()
            .filter(|r| r.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if set.is_empty() && v6 {
            continue;
        }
        out.push_str(&format!(
            "add table {family} {TABLE} {{ flags owner; }}\n\
             add chain {family} {TABLE} output {{ type nat hook output priority -100; policy accept; }}\n\
             add rule {family} {TABLE} output meta mark {mark:#x} return\n"
        ));
        if set.is_empty() {
            continue;
        }
        let daddr = format!("{{ {} }}", set.join(", "));
        for proto in ["udp", "tcp"] {
            out.push_str(&format!(
                "add rule {family} {TABLE} output {family} daddr {daddr} {proto} dport 53 redirect to :{port}\n"
            ));
        }
    }
    out
}

/// The live table of `family` as `nft list table` prints it, if it exists.
pub fn live_family(family: &str) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", family, TABLE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The live tables (`ip`, then `ip6` when there is one) as `nft list table` prints
/// them, if the `ip` one exists.
pub fn live() -> Option<String> {
    let mut t = live_family("ip")?;
    if let Some(t6) = live_family("ip6") {
        t.push_str(&t6);
    }
    Some(t)
}

/// Whether a live table's text redirects port 53 to `port` and exempts `mark`.
pub fn matches(listing: &str, mark: u32, port: u16) -> bool {
    let norm: String = listing.split_whitespace().collect::<Vec<_>>().join(" ");
    norm.contains(&format!("meta mark {mark:#010x} return"))
        && norm.contains(&format!("udp dport 53 redirect to :{port}"))
        && norm.contains(&format!("tcp dport 53 redirect to :{port}"))
}

/// The installed capture; dropping it (or the agent dying) removes the table.
#[derive(Debug)]
pub struct DnsCapture {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl DnsCapture {
    /// Creates the table through a long-lived `nft -i` and waits until it is live.
    /// Blocking: call it from `spawn_blocking`.
    #[allow(
        clippy::disallowed_methods,
        reason = "blocking by design; the agent calls it from spawn_blocking"
    )]
    pub fn install(mark: u32, port: u16, resolvers: &[IpAddr]) -> Result<Self, NftError> {
        for family in FAMILIES {
            if live_family(family).is_none() {
                continue;
            }
            // Not owned (someone ran nft by hand) or owned by a live process.
            let out = Command::new("nft")
                .args(["delete", "table", family, TABLE])
                .output()
                .map_err(NftError::Spawn)?;
            if !out.status.success() {
                return Err(NftError::Busy);
            }
            tracing::warn!(
                table = TABLE,
                family,
                "removed a DNS capture table left by someone else"
            );
        }
        let want_v6 = resolvers.iter().any(IpAddr::is_ipv6);
        let mut child = Command::new("nft")
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftError::Spawn)?;
        let mut stdin = child.stdin.take();
        if let Some(s) = stdin.as_mut()
            && let Err(e) = s
                .write_all(script(mark, port, resolvers).as_bytes())
                .and_then(|()| s.flush())
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NftError::NotInstalled(e.to_string()));
        }
        let mut cap = Self { child, stdin };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(t) = live()
                && matches(&t, mark, port)
                && (!want_v6 || live_family("ip6").is_some())
            {
                tracing::info!(
                    table = TABLE,
                    port,
                    "DNS capture installed (port 53 → agent; removed by the kernel if the agent dies)"
                );
                return Ok(cap);
            }
            if let Ok(Some(status)) = cap.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = cap.child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(NftError::NotInstalled(format!(
                    "nft -i exited ({status}): {}",
                    err.trim()
                )));
            }
            if Instant::now() > deadline {
                cap.remove();
                return Err(NftError::NotInstalled("timed out after 5s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the table: closes `nft`'s input, so it exits and the kernel deletes the
    /// table with its socket. Blocking (at most 2 s): call it from `spawn_blocking`.
    #[allow(
        clippy::disallowed_methods,
        reason = "blocking by design; the agent calls it from spawn_blocking"
    )]
    pub fn remove(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Whether the `nft` child (and so the table) is still there.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for DnsCapture {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_and_listing_match() {
        let s = script(
            0x4357,
            15053,
            &["10.0.0.2".parse().unwrap(), "127.0.0.53".parse().unwrap()],
        );
        assert!(s.contains("flags owner"));
        assert!(s.contains("meta mark 0x4357 return"));
        assert!(s.contains("ip daddr { 10.0.0.2, 127.0.0.53 } udp dport 53 redirect to :15053"));
        assert!(!s.contains("ip6"), "no IPv6 nameserver, no ip6 table:\n{s}");
        // IPv6 nameservers: an ip6 table beside the ip one; IPv6 only: the ip table keeps
        // just its mark rule.
        let s = script(
            0x4357,
            15053,
            &["10.0.0.2".parse().unwrap(), "fd77::11".parse().unwrap()],
        );
        assert!(
            s.contains("add table ip6 causeway_dns { flags owner; }"),
            "{s}"
        );
        assert!(s.contains("add rule ip6 causeway_dns output meta mark 0x4357 return"));
        assert!(s.contains("ip6 daddr { fd77::11 } tcp dport 53 redirect to :15053"));
        assert!(s.contains("ip daddr { 10.0.0.2 } udp dport 53"));
        let s = script(0x4357, 15053, &["fd77::11".parse().unwrap()]);
        assert!(s.contains("add table ip causeway_dns"));
        assert!(!s.contains("ip daddr"), "{s}");
        assert!(s.contains("ip6 daddr { fd77::11 } udp dport 53 redirect to :15053"));
        // What `nft list table ip causeway_dns` prints for it (nftables 1.0.6).
        let listing = "table ip causeway_dns { # progname nft\n\tflags owner\n\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tmeta mark 0x00004357 return\n\t\tip daddr 10.0.0.2 udp dport 53 redirect to :15053\n\t\tip daddr 10.0.0.2 tcp dport 53 redirect to :15053\n\t}\n}\n";
        assert!(matches(listing, 0x4357, 15053));
        assert!(!matches(listing, 0x4357, 15054));
        assert!(!matches(listing, 0x1, 15053));
    }
}
