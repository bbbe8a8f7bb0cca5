//! `[dns] mode = "resolv-conf"`: no capture rules; the agent points the host's resolver
//! configuration at its port-53 address and restores the original on stop.
//!
//! - Plain /etc/resolv.conf: the original is copied to `resolv.conf.orig` in the state
//!   directory first, then resolv.conf is rewritten in place (it may be a bind mount) with
//!   the agent first and up to two original servers after it, so libc falls back to them
//!   at once (connection refused) when the agent is not running. A backup found at start
//!   means an earlier agent did not stop cleanly: it is restored before anything else.
//! - systemd-resolved (resolv.conf → its stub 127.0.0.53): a drop-in
//!   `/etc/systemd/resolved.conf.d/causeway.conf` routes the mesh zones to the agent
//!   (`Domains=~zone`), everything else keeps resolved's own servers; removed on stop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::upstream::{RESOLVED_STUB, ResolvConf};

/// Backup of the original resolv.conf, in the state directory.
pub const BACKUP: &str = "resolv.conf.orig";
/// Which file the backup belongs to (for `causeway-agent cleanup`, which has no config).
pub const BACKUP_TARGET: &str = "resolv.conf.orig.target";
/// The systemd-resolved drop-in.
pub const RESOLVED_DROPIN: &str = "/etc/systemd/resolved.conf.d/causeway.conf";

/// The text the agent writes: itself first, then up to two original servers, then the
/// original search and options lines.
pub fn rewrite(original: &str, agent: IpAddr) -> String {
    let rc = ResolvConf::parse(original);
    let mut out = format!(
        "# Written by causeway-agent ([dns] mode = \"resolv-conf\"); the original is restored when it stops.\nnameserver {agent}\n"
    );
    for n in rc.nameservers.iter().filter(|n| **n != agent).take(2) {
        out.push_str(&format!("nameserver {n}\n"));
    }
    for line in original.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "search" | "domain" | "options" | "sortlist") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The systemd-resolved drop-in for `zones`.
pub fn resolved_dropin(agent: IpAddr, zones: &[String]) -> String {
    let domains: Vec<String> = zones.iter().map(|z| format!("~{z}")).collect();
    format!(
        "# Written by causeway-agent ([dns] mode = \"resolv-conf\"); removed when it stops.\n[Resolve]\nDNS={agent}\nDomains={}\n",
        domains.join(" ")
    )
}

/// What was changed, to undo on stop.
#[derive(Debug)]
pub enum ResolvGuard {
    /// resolv.conf was rewritten; the backup holds the original.
    File {
        /// resolv.conf.
        path: PathBuf,
        /// The backup.
        backup: PathBuf,
    },
    /// A systemd-resolved drop-in was written.
    Resolved,
}

fn restart_resolved() {
    match Command::new("systemctl")
        .args(["try-reload-or-restart", "systemd-resolved"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => {
            tracing::warn!(status = %s, "systemctl try-reload-or-restart systemd-resolved failed")
        }
        Err(e) => tracing::warn!(error = %e, "cannot run systemctl to reload systemd-resolved"),
    }
}

/// For `causeway-agent cleanup` (no config at hand): restores a backup to the file named
/// in [`BACKUP_TARGET`] and removes a leftover systemd-resolved drop-in. Whether anything
/// was restored.
pub fn cleanup(state_dir: &Path) -> std::io::Result<bool> {
    let mut did = false;
    if let Ok(target) = std::fs::read_to_string(state_dir.join(BACKUP_TARGET)) {
        recover(Path::new(target.trim()), state_dir)?;
        std::fs::remove_file(state_dir.join(BACKUP_TARGET))?;
        did = true;
    }
    if let Ok(text) = std::fs::read_to_string(RESOLVED_DROPIN)
        && text.starts_with("# Written by causeway-agent")
    {
        std::fs::remove_file(RESOLVED_DROPIN)?;
        restart_resolved();
        did = true;
    }
    Ok(did)
}

/// Restores a backup left by an agent that did not stop cleanly.
pub fn recover(path: &Path, state_dir: &Path) -> std::io::Result<()> {
    let backup = state_dir.join(BACKUP);
    if let Ok(orig) = std::fs::read(&backup) {
        std::fs::write(path, orig)?;
        std::fs::remove_file(&backup)?;
        tracing::warn!(path = %path.display(), "restored the resolver configuration left changed by an earlier agent");
    }
    Ok(())
}

/// Points the host at `agent`; returns what to undo.
pub fn apply(
    path: &Path,
    state_dir: &Path,
    agent: IpAddr,
    zones: &[String],
) -> std::io::Result<ResolvGuard> {
    recover(path, state_dir)?;
    let original = std::fs::read_to_string(path)?;
    let rc = ResolvConf::parse(&original);
    if rc.nameservers == [RESOLVED_STUB] && Path::new("/run/systemd/resolve").is_dir() {
        if let Some(dir) = Path::new(RESOLVED_DROPIN).parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(RESOLVED_DROPIN, resolved_dropin(agent, zones))?;
        restart_resolved();
        return Ok(ResolvGuard::Resolved);
    }
    let backup = state_dir.join(BACKUP);
    crate::identity::write_atomic(&backup, original.as_bytes(), 0o644)
        .and_then(|()| {
            crate::identity::write_atomic(
                &state_dir.join(BACKUP_TARGET),
                path.to_string_lossy().as_bytes(),
                0o644,
            )
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // In place: resolv.conf may be a bind mount (containers, `ip netns exec`).
    std::fs::write(path, rewrite(&original, agent))?;
    Ok(ResolvGuard::File {
        path: path.to_owned(),
        backup,
    })
}

impl ResolvGuard {
    /// Undoes the change.
    pub fn restore(self) -> std::io::Result<()> {
        match self {
            ResolvGuard::File { path, backup } => {
                let orig = std::fs::read(&backup)?;
                std::fs::write(&path, orig)?;
                if let Some(dir) = backup.parent() {
                    let _ = std::fs::remove_file(dir.join(BACKUP_TARGET));
                }
                std::fs::remove_file(&backup)
            }
            ResolvGuard::Resolved => {
                std::fs::remove_file(RESOLVED_DROPIN)?;
                restart_resolved();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_search_and_fallbacks() {
        let orig = "nameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\nsearch corp.example\noptions ndots:2\n";
        let text = rewrite(orig, "127.0.0.153".parse().unwrap());
        let rc = ResolvConf::parse(&text);
        assert_eq!(rc.nameservers.len(), 3, "libc reads three servers at most");
        assert_eq!(rc.nameservers[0], "127.0.0.153".parse::<IpAddr>().unwrap());
        assert_eq!(rc.search, vec!["corp.example"]);
        assert_eq!(rc.ndots, Some(2));
    }

    #[test]
    fn apply_then_restore_and_recover_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let orig = "nameserver 10.0.0.2\nsearch corp.example\n";
        std::fs::write(&conf, orig).unwrap();
        let g = apply(&conf, dir.path(), "127.0.0.153".parse().unwrap(), &[]).unwrap();
        assert!(
            std::fs::read_to_string(&conf)
                .unwrap()
                .starts_with("# Written by causeway-agent")
        );
        g.restore().unwrap();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), orig);
        // A crash: applied, never restored. The next start restores first.
        let _lost = apply(&conf, dir.path(), "127.0.0.153".parse().unwrap(), &[]).unwrap();
        recover(&conf, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), orig);
        assert!(!dir.path().join(BACKUP).exists());
        // The same crash, cleaned up by `causeway-agent cleanup` (no config: the target
        // file is recorded beside the backup).
        let _lost = apply(&conf, dir.path(), "127.0.0.153".parse().unwrap(), &[]).unwrap();
        assert!(cleanup(dir.path()).unwrap());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), orig);
        assert!(!cleanup(dir.path()).unwrap(), "nothing left to do");
    }
}
