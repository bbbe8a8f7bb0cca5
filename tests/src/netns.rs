//! Network namespaces as "VMs" for end-to-end data-plane tests.
//!
//! A [`Lab`] is a hub namespace holding a bridge, and one namespace per node, each with
//! `eth0` (a veth whose peer is on the bridge), an address in `10.77.0.0/24` and a default
//! route on `eth0`. Names are unique per process and lab, so tests run in parallel; every
//! namespace (and so every veth and rule inside it) is removed in `Drop`, also when a test
//! panics, after killing the processes still running inside it. Nothing is done in the
//! host's own namespace except creating and deleting these namespaces.
//!
//! Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN): [`Lab::new`] panics with an explanation
//! otherwise, so such tests fail loudly instead of passing.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Panics unless root, naming what to do.
pub fn require_root(test: &str) {
    assert!(
        is_root(),
        "{test} needs root (network namespaces, veth, iptables): run the data-plane tests as root (CI does), e.g. `sudo -E cargo test -p causeway-tests --test dataplane`"
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (run scripts/install-deps-dataplane.sh)")
    })
}

fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        crate::describe(&out)
    );
    out
}

/// One node: a namespace with `eth0` at `addr`.
#[derive(Debug, Clone)]
pub struct Node {
    /// The namespace's name.
    pub ns: String,
    /// Its address on the lab network.
    pub addr: Ipv4Addr,
}

impl Node {
    /// A command that runs `program` inside this namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `sh -c script` inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        run(self.cmd("sh").args(["-c", script]))
    }

    /// Runs `sh -c script`, asserting success; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = ok(self.cmd("sh").args(["-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `causewayctl args` inside the namespace against the controller whose admin
    /// API is `admin` and whose data directory (with `admin.token`) is `data_dir`;
    /// asserts success; returns stdout.
    pub fn causewayctl(&self, admin: &str, data_dir: &std::path::Path, args: &[&str]) -> String {
        let out = ok(self
            .cmd(crate::bin("causewayctl"))
            .args(args)
            .env("CAUSEWAY_CONTROLLER", admin)
            .env("CAUSEWAY_ADMIN_TOKEN_FILE", data_dir.join("admin.token")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables-save -t nat` inside the namespace.
    pub fn nat_rules(&self) -> String {
        self.sh_ok("iptables-save -t nat")
    }
}

/// Removes the namespaces of labs whose process is gone (killed by a signal or a timeout,
/// so its `Drop` never ran), with any process still inside them. A lab's namespaces are
/// named `cw<pid>x<n>-<node>`; those of a live process are left alone.
fn sweep_dead_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns
            .strip_prefix("cw")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !ns.contains('-') || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        eprintln!("removing namespace {ns} left by process {pid}, which is gone");
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// A set of namespaces joined by a bridge; removed on drop.
#[derive(Debug)]
pub struct Lab {
    hub: String,
    /// The nodes, in the order given.
    pub nodes: Vec<Node>,
}

/// The lab network's prefix length.
pub const PREFIX: u8 = 24;

impl Lab {
    /// Creates one namespace per name, with addresses 10.77.0.10, .11, ... in that order.
    pub fn new(names: &[&str]) -> Self {
        require_root("this network-namespace test");
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_dead_labs);
        let id = format!(
            "cw{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{id}-hub");
        let mut lab = Self {
            hub: hub.clone(),
            nodes: Vec::new(),
        };
        ok(Command::new("ip").args(["netns", "add", &hub]));
        let in_hub = |args: &[&str]| {
            ok(Command::new("ip").args(["netns", "exec", &hub]).args(args));
        };
        in_hub(&["ip", "link", "set", "lo", "up"]);
        in_hub(&["ip", "link", "add", "br0", "type", "bridge"]);
        in_hub(&["ip", "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{id}-{name}");
            ok(Command::new("ip").args(["netns", "add", &ns]));
            let node = Node {
                ns: ns.clone(),
                addr: Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(i).expect("few nodes")),
            };
            lab.nodes.push(node.clone());
            let port = format!("p{i}");
            ok(Command::new("ip").args([
                "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &hub,
            ]));
            in_hub(&["ip", "link", "set", &port, "master", "br0"]);
            in_hub(&["ip", "link", "set", &port, "up"]);
            node.sh_ok(&format!(
                "ip link set lo up && ip addr add {}/{PREFIX} dev eth0 && ip link set eth0 up && ip route add default dev eth0",
                node.addr
            ));
        }
        lab
    }

    /// Sets the MTU of every link of the lab (each node's `eth0`, the bridge ports).
    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        for (i, node) in self.nodes.iter().enumerate() {
            node.sh_ok(&format!("ip link set eth0 mtu {mtu}"));
            ok(Command::new("ip").args([
                "netns",
                "exec",
                &self.hub,
                "ip",
                "link",
                "set",
                &format!("p{i}"),
                "mtu",
                &mtu,
            ]));
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.ns.ends_with(&format!("-{name}")))
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self
            .nodes
            .iter()
            .map(|n| n.ns.as_str())
            .chain(std::iter::once(self.hub.as_str()))
        {
            // Processes this test started inside the namespace keep it alive: kill them.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A process started in a namespace (stdout and stderr appended to a log file, RUST_LOG=info);
/// killed on drop.
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` in `node`.
    pub fn spawn(
        node: &Node,
        log: &Path,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = node
            .cmd(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawn in namespace");
        Self {
            child: Some(child),
            log: log.to_owned(),
        }
    }
    /// Takes charge of a process started some other way, whose output goes to `log`.
    pub fn adopt(child: Child, log: &Path) -> Self {
        Self {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Its exit status if it has ended (it is then no longer killed on drop).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
    /// Polls `f` like [`crate::wait_for`], but panics at once with this process's output
    /// when it exits first: the cause shows instead of a timeout.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        crate::wait_for(what, timeout, || {
            if let Some(v) = f() {
                return Some(v);
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) while waiting for {what}; its output ({}):\n{}",
                    self.name(),
                    self.log.display(),
                    self.log()
                );
            }
            None
        })
    }
    fn name(&self) -> String {
        self.log.file_stem().map_or_else(
            || "the process".to_owned(),
            |s| s.to_string_lossy().into_owned(),
        )
    }
    /// SIGTERM, without waiting for the exit (see [`Proc::exited`]).
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            crate::terminate(c);
        }
    }
    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::terminate(&c);
            let _ = c.wait();
        }
    }
    /// SIGKILL, then waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that dies while a test waits for it fails the wait at once with its
    /// output (the DNS tests waited 60 s for fake registries that had panicked).
    #[test]
    fn a_wait_on_a_dead_process_reports_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("fake-registries.log");
        let f = std::fs::File::create(&log).expect("log");
        let child = Command::new("sh")
            .args(["-c", "echo 'fixture missing: /x/consul.http' >&2; exit 3"])
            .stderr(f)
            .spawn()
            .expect("spawn sh");
        let mut proc = Proc::adopt(child, &log);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            proc.wait_for(
                "a file that never appears",
                std::time::Duration::from_secs(600),
                || None::<()>,
            )
        }))
        .expect_err("the wait must fail");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("fake-registries exited"), "{msg}");
        assert!(msg.contains("fixture missing: /x/consul.http"), "{msg}");
        assert!(msg.contains("a file that never appears"), "{msg}");
    }

    /// A namespace named like a lab of a process that is gone is removed by the sweep; one
    /// of this (live) process is kept.
    #[test]
    fn the_sweep_removes_labs_of_dead_processes_only() {
        require_root("this network-namespace test");
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait");
        let gone = format!("cw{dead}x0-swept");
        let live = format!("cw{}x9999-kept", std::process::id());
        for ns in [&gone, &live] {
            ok(Command::new("ip").args(["netns", "add", ns]));
        }
        sweep_dead_labs();
        let list = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .expect("ip netns list")
                .stdout,
        )
        .into_owned();
        let _ = Command::new("ip").args(["netns", "del", &live]).status();
        if list.contains(&gone) {
            let _ = Command::new("ip").args(["netns", "del", &gone]).status();
        }
        assert!(!list.contains(&gone), "{gone} was not swept:\n{list}");
        assert!(list.contains(&live), "{live} was swept:\n{list}");
    }
}
