//! The data plane end to end, in network namespaces created by the test: a controller
//! namespace, two "VMs" with agents (capture on, the brief's ports), and a plain server
//! without an agent. Needs root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use causeway_api::push::MeshState;
use causeway_tests::netns::{Lab, Node, Proc, require_root};
use causeway_tests::{bin, describe, terminate, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Echo server: first line names the peer address and the server, then echoes until EOF,
/// then closes its side (so half-close is visible to the client).
const SERVER_PY: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0", int(sys.argv[1]))); s.listen(128)
def h(c, a):
    c.sendall(("peer=%s name=%s\n" % (a[0], sys.argv[2])).encode())
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR); c.close()
while True:
    c, a = s.accept(); threading.Thread(target=h, args=(c, a), daemon=True).start()
"#;

/// Client: sends argv[3], half-closes, prints everything it receives until EOF.
const CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(sys.argv[3].encode()); c.shutdown(socket.SHUT_WR)
b = b""
while True:
    d = c.recv(65536)
    if not d: break
    b += d
sys.stdout.write(b.decode())
"#;

/// Long-lived client: sends argv[3], reads its echo, waits until file argv[4] exists,
/// sends argv[5], half-closes, prints everything it received.
const LONG_CLIENT_PY: &str = r#"
import os, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
first = sys.argv[3].encode(); c.sendall(first)
b = b""
while not b.endswith(first):
    d = c.recv(65536)
    if not d: break
    b += d
open(sys.argv[4] + ".open", "w").close()
while not os.path.exists(sys.argv[4]):
    time.sleep(0.05)
c.sendall(sys.argv[5].encode()); c.shutdown(socket.SHUT_WR)
while True:
    d = c.recv(65536)
    if not d: break
    b += d
sys.stdout.write(b.decode())
"#;

/// Server for resets: reads one line; "RST" → closes with a reset at once; "WAIT" →
/// reads on and prints how the connection ended ("server saw reset" or "server saw eof").
const RESET_SERVER_PY: &str = r#"
import socket, struct, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
def h(c):
    d = c.recv(100)
    if d.startswith(b"RST"):
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close(); return
    try:
        while c.recv(100): pass
        print("server saw eof", flush=True)
    except ConnectionResetError:
        print("server saw reset", flush=True)
while True:
    c, a = s.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()
"#;

/// Client for resets, mode argv[3]: "rst" asks the server to reset, "wait" waits to be
/// closed by the proxy, "abort" resets its own side after a moment. Prints how it ended.
const RESET_CLIENT_PY: &str = r#"
import socket, struct, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
mode = sys.argv[3]
if mode == "abort":
    c.sendall(b"WAIT\n"); time.sleep(1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
    print("client reset"); sys.exit(0)
c.sendall(b"RST\n" if mode == "rst" else b"WAIT\n")
try:
    d = c.recv(100)
    print("client saw eof" if not d else "client saw data")
except ConnectionResetError:
    print("client saw reset")
"#;

struct Mesh {
    // Field order = drop order: processes before the namespaces they run in.
    procs: Vec<Proc>,
    ctl_admin: String,
    root: PathBuf,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Lab with nodes ctl, vm1, vm2, plain; a controller in ctl with a file source naming
    /// the plain server; groups `web` (port 8080) and `client`.
    fn new() -> Self {
        Self::with_services("")
    }

    /// Like [`Mesh::new`], with more file-source services (TOML `[[services]]` entries).
    fn with_services(extra: &str) -> Self {
        require_root("the data-plane tests");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let lab = Lab::new(&["ctl", "vm1", "vm2", "plain"]);
        let plain = lab.node("plain").addr;
        let services = root.join("services.toml");
        std::fs::write(
            &services,
            format!(
                "[[services]]\nname = \"plain\"\nnamespace = \"ext\"\nports = {{ tcp = 9090 }}\n[[services.endpoints]]\naddress = \"{plain}\"\n{extra}"
            ),
        )
        .unwrap();
        let cfg = root.join("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
                services.to_str().unwrap()
            ),
        )
        .unwrap();
        let data = root.join("controller");
        let ctl = lab.node("ctl");
        let control = format!("{}:15012", ctl.addr);
        let c = Proc::spawn(
            ctl,
            &root.join("controller.log"),
            bin("causeway-controller"),
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:0",
                "--control-listen",
                &control,
            ],
        );
        let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
            let text = std::fs::read_to_string(data.join("endpoints.json")).ok()?;
            serde_json::from_str(&text).ok()
        });
        let m = Self {
            procs: vec![c],
            ctl_admin: endpoints["admin"].as_str().expect("admin").to_owned(),
            root,
            lab,
            _dir: dir,
        };
        for (group, port) in [("web", "tcp:8080"), ("client", "tcp:7070")] {
            m.ctl_ok(&[
                "group",
                "create",
                group,
                "--namespace",
                "default",
                "--service-account",
                group,
                "--service",
                group,
                "--port",
                port,
            ]);
        }
        m
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        self.lab
            .node("ctl")
            .causewayctl(&self.ctl_admin, &self.root.join("controller"), args)
    }

    /// Starts [`RESET_SERVER_PY`] on port 8080 in `vm`; returns its index in `procs`.
    fn reset_server(&mut self, vm: &str) -> usize {
        let node = self.lab.node(vm).clone();
        let srv = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.reset-server.log")),
            "python3",
            &["-c", RESET_SERVER_PY, "8080"],
        );
        self.procs.push(srv);
        self.procs.len() - 1
    }

    /// Joins `vm` into `group`; returns its state dir.
    fn join(&self, vm: &str, group: &str) -> PathBuf {
        let token = self.ctl_ok(&["token", "create", "--group", group]);
        let state = self.root.join(vm);
        let out = self
            .lab
            .node(vm)
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {vm}: {}", describe(&out));
        state
    }

    /// Starts `causeway-agent run` in `vm` with no config file (capture on, brief's ports);
    /// returns the index in `procs`.
    fn agent(&mut self, vm: &str, state: &Path) -> usize {
        self.agent_with(vm, state, &[])
    }

    /// Starts an agent with `extra` arguments. With `CAUSEWAY_TEST_TUNNEL_TRANSPORT=quic`
    /// (or `tcp`) in the environment, an agent whose config does not name a transport gets
    /// that one: `CAUSEWAY_TEST_TUNNEL_TRANSPORT=quic cargo test --test dataplane` runs every
    /// test of this file over QUIC (the default transport is TCP + TLS).
    fn agent_with(&mut self, vm: &str, state: &Path, extra: &[&str]) -> usize {
        let Some(transport) = std::env::var("CAUSEWAY_TEST_TUNNEL_TRANSPORT")
            .ok()
            .filter(|t| !t.is_empty())
        else {
            return self.agent_exact(vm, state, extra);
        };
        assert!(
            transport == "quic" || transport == "tcp",
            "CAUSEWAY_TEST_TUNNEL_TRANSPORT={transport}: expected quic or tcp"
        );
        let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let at = args.iter().position(|a| a == "--config");
        let mut cfg: toml::Table = match at {
            Some(i) => toml::from_str(&std::fs::read_to_string(&args[i + 1]).unwrap()).unwrap(),
            None => toml::Table::new(),
        };
        let dp = cfg
            .entry("dataplane")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("[dataplane] is a table");
        dp.entry("tunnel_transport")
            .or_insert_with(|| toml::Value::String(transport.clone()));
        let file = self
            .root
            .join(format!("{vm}.agent{}.{transport}.toml", self.procs.len()));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let file = file.to_str().unwrap().to_owned();
        match at {
            Some(i) => args[i + 1] = file,
            None => args.extend(["--config".to_owned(), file]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent_exact(vm, state, &args)
    }

    /// Starts an agent with exactly `extra` (no test-wide transport).
    fn agent_exact(&mut self, vm: &str, state: &Path, extra: &[&str]) -> usize {
        let node = self.lab.node(vm).clone();
        let addr = node.addr.to_string();
        let mut args = vec![
            "run",
            "--state-dir",
            state.to_str().unwrap(),
            "--address",
            &addr,
        ];
        args.extend_from_slice(extra);
        let p = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.agent.log")),
            bin("causeway-agent"),
            &args,
        );
        self.procs.push(p);
        self.procs.len() - 1
    }

    fn server(&mut self, vm: &str, port: u16) -> usize {
        self.server_named(vm, port, vm, "0.0.0.0")
    }

    /// A server in `vm` on `host:port` that calls itself `name`; returns its index.
    fn server_named(&mut self, vm: &str, port: u16, name: &str, host: &str) -> usize {
        let node = self.lab.node(vm).clone();
        let p = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.{name}.server.log")),
            "python3",
            &["-c", SERVER_PY, &port.to_string(), name, host],
        );
        self.procs.push(p);
        let pattern = if host == "0.0.0.0" {
            format!(":{port} ")
        } else {
            format!(" {host}:{port} ")
        };
        wait_for("the test server to listen", WAIT, || {
            node.sh(&format!("ss -ltn | grep -q '{pattern}'"))
                .status
                .success()
                .then_some(())
        });
        self.procs.len() - 1
    }

    fn client_output(&self, vm: &str, host: &str, port: u16, marker: &str) -> std::process::Output {
        self.lab
            .node(vm)
            .cmd("python3")
            .args(["-c", CLIENT_PY, host, &port.to_string(), marker])
            .output()
            .unwrap()
    }

    fn client(&self, vm: &str, host: &str, port: u16, marker: &str) -> String {
        let out = self.client_output(vm, host, port, marker);
        assert!(
            out.status.success(),
            "client {vm} → {host}:{port}: {}\n{}",
            describe(&out),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    }

    fn doctor(&self, vm: &str, state: &Path) -> (bool, String) {
        let out = self
            .lab
            .node(vm)
            .cmd(bin("causeway-agent"))
            .args(["doctor", "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

fn config(state: &Path) -> MeshState {
    std::fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn spiffe_id(state: &Path) -> String {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("agent.json")).unwrap()).unwrap();
    v["spiffe_id"].as_str().unwrap().to_owned()
}

/// Waits until `vm`'s agent has `service` with an endpoint at `addr` and has put that
/// address in its capture rules; returns the service's VIP.
fn wait_routed(state: &Path, service: &str, addr: &str) -> String {
    wait_for(&format!("{service} at {addr} routed"), WAIT, || {
        let s = config(state);
        let svc = s.services.get(service)?;
        svc.endpoints.values().find(|e| e.address == addr)?;
        let rules = std::fs::read_to_string(state.join("capture.rules")).ok()?;
        rules.contains(&format!("-d {addr}/32 ")).then_some(())?;
        svc.vip.map(|v| v.to_string())
    })
}

fn no_causeway_rules(node: &Node) -> bool {
    !node.sh_ok("iptables-save").contains("CAUSEWAY")
}

/// With the default transport (TCP + TLS).
#[test]
fn vip_and_address_through_both_agents_without_plaintext_on_the_wire() {
    through_both_agents_without_plaintext_on_the_wire(None);
}

/// The same with both agents set to `tunnel_transport = "quic"`.
#[test]
fn vip_and_address_through_both_agents_without_plaintext_on_the_wire_over_quic() {
    through_both_agents_without_plaintext_on_the_wire(Some("quic"));
}

/// The agents' transport towards peers: `transport` in their config files, or the
/// default (`None`; `CAUSEWAY_TEST_TUNNEL_TRANSPORT` when set, else TCP + TLS).
fn through_both_agents_without_plaintext_on_the_wire(transport: Option<&str>) {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    m.server("plain", 9090);
    let cfg = m.root.join("agents.toml");
    if let Some(t) = transport {
        std::fs::write(&cfg, format!("[dataplane]\ntunnel_transport = \"{t}\"\n")).unwrap();
    }
    let extra: &[&str] = match transport {
        Some(_) => &["--config", cfg.to_str().unwrap()],
        None => &[],
    };
    let a2 = m.agent_with("vm2", &s2, extra);
    let a1 = m.agent_with("vm1", &s1, extra);
    let vm1 = m.lab.node("vm1").clone();
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let plain_addr = m.lab.node("plain").addr.to_string();
    let web_vip = wait_routed(&s1, "default/web", &vm2_addr);
    let plain_vip = wait_routed(&s1, "ext/plain", &plain_addr);

    // Capture everything on vm1's link; started before any application traffic.
    let pcap = m.root.join("vm1.pcap");
    let mut dump = vm1
        .cmd("tcpdump")
        .args(["-i", "eth0", "-n", "-U", "-w", pcap.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (run scripts/install-deps-dataplane.sh)");
    let mut line = String::new();
    std::io::BufReader::new(dump.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");

    let secret_vip = "SECRET-MARKER-VIP-7f3a9c";
    let secret_addr = "SECRET-MARKER-ADDR-51be02";
    let public = "PUBLIC-MARKER-PLAIN-c0ffee";

    // 1. The VIP: through both agents; the server sees its local agent (loopback).
    let out = m.client("vm1", &web_vip, 8080, secret_vip);
    assert!(
        out.starts_with("peer=127.0.0.1 name=vm2\n") && out.ends_with(secret_vip),
        "{out:?}\n{}",
        m.logs()
    );
    // 2. The service's real address: the same path.
    let out = m.client("vm1", &vm2_addr, 8080, secret_addr);
    assert!(
        out.starts_with("peer=127.0.0.1 name=vm2\n") && out.ends_with(secret_addr),
        "{out:?}"
    );
    // vm2's agent knows the client's SPIFFE ID.
    let client_id = spiffe_id(&s1);
    let vm2_log = m.procs[a2].log();
    assert!(
        vm2_log
            .lines()
            .filter(|l| l.contains("inbound tunnel stream") && l.contains(&client_id))
            .count()
            >= 2,
        "vm2 agent log lacks the client identity {client_id}:\n{vm2_log}"
    );
    // 3. Auto mTLS: the plain server (no agent) is reached in plaintext, from vm1 itself.
    let out = m.client("vm1", &plain_vip, 9090, public);
    assert!(
        out.starts_with(&format!("peer={} name=plain\n", vm1.addr)) && out.ends_with(public),
        "{out:?}"
    );

    // Positive control: the capture does see plaintext (the auto-mTLS connection). Its
    // packets come after the tunnelled ones, so once it is in the file, they are too.
    let contains =
        |wire: &[u8], needle: &str| wire.windows(needle.len()).any(|w| w == needle.as_bytes());
    wait_for("the plaintext marker in the capture", WAIT, || {
        let wire = std::fs::read(&pcap).ok()?;
        contains(&wire, public).then_some(())
    });
    // PERMISSIVE (the default): plaintext from a host without an agent still gets in.
    let out = m.client("plain", &vm2_addr, 8080, "permissive");
    assert!(
        out.starts_with(&format!("peer={} name=vm2\n", m.lab.node("plain").addr)),
        "{out:?}"
    );
    terminate(&dump);
    let _ = dump.wait();
    let wire = std::fs::read(&pcap).unwrap();
    let contains = |needle: &str| contains(&wire, needle);
    assert!(
        !contains(secret_vip),
        "VIP marker seen in plaintext on the wire"
    );
    assert!(
        !contains(secret_addr),
        "address marker seen in plaintext on the wire"
    );
    // Both tunnelled connections used the expected transport.
    let expected = match transport
        .map(str::to_owned)
        .or_else(|| std::env::var("CAUSEWAY_TEST_TUNNEL_TRANSPORT").ok())
        .as_deref()
    {
        Some("quic") => "transport=quic",
        _ => "transport=tcp+tls",
    };
    let log = m.procs[a1].log();
    let used: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("outbound via tunnel"))
        .collect();
    assert!(
        used.len() == 2 && used.iter().all(|l| l.contains(expected)),
        "expected two tunnelled connections with {expected}:\n{log}"
    );
}

#[test]
fn capture_rules_are_removed_on_stop_cleaned_after_sigkill_and_checked_by_doctor() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let vm1 = m.lab.node("vm1").clone();
    let plain_addr = m.lab.node("plain").addr.to_string();

    let a = m.agent("vm1", &s1);
    wait_routed(&s1, "ext/plain", &plain_addr);
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(ok, "doctor on a healthy agent: {text}\n{}", vm1.nat_rules());

    // The plaintext policy route is checked too: without it the application's replies
    // to off-host plaintext clients leave the host and those clients hang.
    let rule = vm1.sh_ok("ip rule show table 17239");
    let body = rule
        .split_once(':')
        .map(|(_, b)| b.trim().to_owned())
        .filter(|b| b.contains("fwmark"))
        .unwrap_or_else(|| panic!("no plaintext policy route on vm1: {rule:?}"));
    vm1.sh_ok("ip rule del table 17239");
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(
        !ok && text.contains(&format!("missing:    ip rule: {body}")),
        "doctor must name the missing policy route: {text}"
    );
    vm1.sh_ok(&format!("ip rule add {body} pref 17239"));
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(ok, "doctor after the route was restored: {text}");

    // Injected drift: a foreign rule in our chain, and our jump removed.
    vm1.sh_ok("iptables -t nat -A CAUSEWAY_OUTPUT -d 10.99.0.1/32 -p tcp -j RETURN");
    vm1.sh_ok("iptables -t nat -D OUTPUT -j CAUSEWAY_OUTPUT");
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(!ok, "doctor must fail on drift: {text}");
    assert!(
        text.contains("unexpected: nat -A CAUSEWAY_OUTPUT -d 10.99.0.1/32 -p tcp -j RETURN")
            && text.contains("missing:    nat -A OUTPUT -j CAUSEWAY_OUTPUT"),
        "{text}"
    );

    // Stop removes every rule (also the foreign one inside our chain).
    m.procs[a].stop();
    assert!(no_causeway_rules(&vm1), "{}", vm1.nat_rules());
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(ok, "{text}");

    // SIGKILL leaves rules behind; doctor names them; the next start cleans them.
    let b = m.agent("vm1", &s1);
    wait_for("capture rules", WAIT, || {
        vm1.nat_rules()
            .contains("-A OUTPUT -j CAUSEWAY_OUTPUT")
            .then_some(())
    });
    m.procs[b].kill();
    assert!(!no_causeway_rules(&vm1));
    let (ok, text) = m.doctor("vm1", &s1);
    assert!(
        !ok && text.contains("not running") && text.contains("unexpected:"),
        "{text}"
    );
    // The agents of vm1 share one log file (appended): only what the new agent wrote
    // counts, or doctor could pass on the killed agent's rules before the new agent has
    // removed and reinstalled them.
    let logged_before = m.procs[b].log().len();
    let c = m.agent("vm1", &s1);
    let new_log = |m: &Mesh| {
        m.procs[c]
            .log()
            .get(logged_before..)
            .unwrap_or("")
            .to_owned()
    };
    wait_for("a clean start after the crash", WAIT, || {
        new_log(&m)
            .contains("capture rules installed")
            .then_some(())
            .filter(|()| m.doctor("vm1", &s1).0)
    });
    let rules = vm1.nat_rules();
    assert_eq!(
        rules.matches("-A OUTPUT -j CAUSEWAY_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert!(
        new_log(&m).contains("removed capture rules left by an earlier agent"),
        "{}",
        new_log(&m)
    );
    m.procs[c].stop();
    assert!(no_causeway_rules(&vm1), "{}", vm1.nat_rules());
}

#[test]
fn capture_without_privilege_fails_naming_the_fix_and_no_capture_runs() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let vm1 = m.lab.node("vm1").clone();
    // Root without capabilities (empty bounding set): iptables is refused.
    let unprivileged = |extra: &[&str]| {
        let mut c = vm1.cmd("setpriv");
        c.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(bin("causeway-agent"))
            .args(["run", "--state-dir", s1.to_str().unwrap()])
            .args(extra);
        c
    };
    let out = unprivileged(&[]).output().expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--no-capture") && err.contains("root"),
        "{}",
        describe(&out)
    );
    assert!(no_causeway_rules(&vm1));
    // With --no-capture the same unprivileged agent runs and its listeners are up.
    let log = m.root.join("vm1.unprivileged.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = unprivileged(&["--no-capture"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    m.procs.push(Proc::adopt(child, &log));
    wait_for("the unprivileged agent's data plane", WAIT, || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("data plane listening")
            .then_some(())
    });
    assert!(
        vm1.sh("ss -ltn | grep -q '127.0.0.1:15001 '")
            .status
            .success()
    );
    assert!(vm1.sh("ss -lun | grep -q ':15008 '").status.success());
    assert!(no_causeway_rules(&vm1), "{}", vm1.nat_rules());
}

#[test]
fn load_balancing_skips_a_down_endpoint_and_takes_it_back_after_recovery() {
    // Three endpoints of one service, on extra addresses of the plain node; lb-3 is down.
    let mut extra =
        String::from("[[services]]\nname = \"lb\"\nnamespace = \"ext\"\nports = { tcp = 9191 }\n");
    for i in 1..=3 {
        extra.push_str(&format!(
            "[[services.endpoints]]\naddress = \"10.77.0.{}\"\n",
            20 + i
        ));
    }
    let mut m = Mesh::with_services(&extra);
    let plain = m.lab.node("plain").clone();
    for i in 1..=3 {
        plain.sh_ok(&format!("ip addr add 10.77.0.{}/24 dev eth0", 20 + i));
    }
    m.server_named("plain", 9191, "lb-1", "10.77.0.21");
    m.server_named("plain", 9191, "lb-2", "10.77.0.22");
    let s1 = m.join("vm1", "client");
    // Short ejections so recovery is quick to show.
    let cfg = m.root.join("vm1.toml");
    std::fs::write(
        &cfg,
        "[dataplane]\neject_base = \"1s\"\neject_max = \"2s\"\n",
    )
    .unwrap();
    m.agent_with("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
    let vip = wait_routed(&s1, "ext/lb", "10.77.0.23");
    let name = |out: &str| {
        out.lines()
            .next()
            .and_then(|l| l.split("name=").nth(1))
            .unwrap_or("")
            .to_owned()
    };
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..30 {
        let marker = format!("lb-{i}");
        let out = m.client("vm1", &vip, 9191, &marker);
        assert!(out.ends_with(&marker), "{out:?}");
        *seen.entry(name(&out)).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["lb-1".to_owned(), "lb-2".to_owned()],
        "every connection succeeds, on the two healthy endpoints: {seen:?}"
    );
    // lb-3 comes up: once its ejection ends it gets connections again.
    m.server_named("plain", 9191, "lb-3", "10.77.0.23");
    wait_for("lb-3 to receive connections after recovery", WAIT, || {
        let out = m.client("vm1", &vip, 9191, "again");
        (name(&out) == "lb-3").then_some(())
    });
}

/// The client's agent set to `tunnel_transport = "quic"` (the default is TCP + TLS).
#[test]
fn udp_blocked_between_the_vms_falls_back_to_tcp_tls() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    let a2 = m.agent("vm2", &s2);
    let cfg = m.root.join("vm1-quic.toml");
    std::fs::write(&cfg, "[dataplane]\ntunnel_transport = \"quic\"\n").unwrap();
    let a1 = m.agent_with("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
    let vm1 = m.lab.node("vm1").clone();
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    // Drop the tunnel's UDP between vm1 and vm2 (the controller's UDP 15012 stays open).
    vm1.sh_ok("iptables -A OUTPUT -p udp --dport 15008 -j DROP");
    let out = m.client("vm1", &vip, 8080, "over-tcp");
    assert!(
        out.starts_with("peer=127.0.0.1 name=vm2\n") && out.ends_with("over-tcp"),
        "{out:?}"
    );
    assert!(
        m.procs[a1].log().contains("transport=tcp+tls"),
        "{}",
        m.procs[a1].log()
    );
    assert!(
        m.procs[a2]
            .log()
            .lines()
            .any(|l| l.contains("inbound tunnel stream") && l.contains("transport=tcp+tls")),
        "{}",
        m.procs[a2].log()
    );
    // Further connections are streams of the same multiplexed TLS connection.
    for marker in ["second", "third"] {
        assert!(m.client("vm1", &vip, 8080, marker).ends_with(marker));
    }
    let log = m.procs[a2].log();
    let accepted = log
        .lines()
        .filter(|l| l.contains("tunnel connection accepted (TCP + TLS, multiplexed)"))
        .count();
    let streams = log
        .lines()
        .filter(|l| l.contains("inbound tunnel stream") && l.contains("transport=tcp+tls"))
        .count();
    assert_eq!((accepted, streams), (1, 3), "{log}");
}

/// `tunnel_transport = "tcp"` on the client's agent: TCP + TLS from the first connection,
/// with UDP open and without a QUIC attempt; the server's agent (default settings) serves it.
#[test]
fn tunnel_transport_tcp_goes_straight_to_tcp_tls() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    let a2 = m.agent("vm2", &s2);
    let cfg = m.root.join("vm1.toml");
    std::fs::write(&cfg, "[dataplane]\ntunnel_transport = \"tcp\"\n").unwrap();
    let a1 = m.agent_with("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    for marker in ["tcp-first", "tcp-second"] {
        let out = m.client("vm1", &vip, 8080, marker);
        assert!(out.ends_with(marker), "{out:?}");
    }
    let log = m.procs[a1].log();
    let used: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("outbound via tunnel"))
        .collect();
    assert!(
        used.len() == 2 && used.iter().all(|l| l.contains("transport=tcp+tls")),
        "{log}"
    );
    assert!(!log.contains("QUIC to the peer agent failed"), "{log}");
    let server_log = m.procs[a2].log();
    assert_eq!(
        server_log
            .lines()
            .filter(|l| l.contains("tunnel connection accepted (TCP + TLS, multiplexed)"))
            .count(),
        1,
        "{server_log}"
    );
}

/// The value of the metric line starting with `series` (name and labels) in `text`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Mixed transports, both ways: vm1's agent set to `tunnel_transport = "quic"` (as
/// agents of the previous version were by default), vm2's agent with no config file (the
/// default, TCP + TLS). Each source agent uses its own setting and every agent serves both
/// transports inbound, so vm1 → vm2 goes over QUIC and vm2 → vm1 over TCP + TLS, each
/// answered by the other's agent; vm2's `/metrics` shows its outbound streams on `tcp`.
#[test]
fn quic_and_tcp_agents_talk_both_ways_and_the_default_is_tcp() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    m.server("vm1", 7070);
    let cfg = m.root.join("vm1-quic.toml");
    std::fs::write(&cfg, "[dataplane]\ntunnel_transport = \"quic\"\n").unwrap();
    // Exactly these settings, whatever CAUSEWAY_TEST_TUNNEL_TRANSPORT says.
    let a2 = m.agent_exact("vm2", &s2, &[]);
    let a1 = m.agent_exact("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
    let vm1_addr = m.lab.node("vm1").addr.to_string();
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    wait_routed(&s1, "default/web", &vm2_addr);
    wait_routed(&s2, "default/client", &vm1_addr);
    for round in ["one", "two"] {
        let marker = format!("quic-to-tcp-agent-{round}");
        let out = m.client("vm1", &vm2_addr, 8080, &marker);
        assert!(
            out.starts_with("peer=127.0.0.1 name=vm2\n") && out.ends_with(&marker),
            "{out:?}\n{}",
            m.logs()
        );
        let marker = format!("tcp-to-quic-agent-{round}");
        let out = m.client("vm2", &vm1_addr, 7070, &marker);
        assert!(
            out.starts_with("peer=127.0.0.1 name=vm1\n") && out.ends_with(&marker),
            "{out:?}\n{}",
            m.logs()
        );
    }
    let lines = |i: usize, what: &str| -> Vec<String> {
        m.procs[i]
            .log()
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect()
    };
    // (Neither "transport=quic" nor "transport=tcp+tls" is a prefix of the other.)
    let all = |v: &[String], t: &str| {
        v.len() == 2 && v.iter().all(|l| l.contains(&format!("transport={t}")))
    };
    let (out1, in1) = (
        lines(a1, "outbound via tunnel"),
        lines(a1, "inbound tunnel stream"),
    );
    let (out2, in2) = (
        lines(a2, "outbound via tunnel"),
        lines(a2, "inbound tunnel stream"),
    );
    assert!(all(&out1, "quic"), "vm1 (quic) outbound: {out1:#?}");
    assert!(all(&in2, "quic"), "vm2 (default) inbound: {in2:#?}");
    assert!(all(&out2, "tcp+tls"), "vm2 (default) outbound: {out2:#?}");
    assert!(all(&in1, "tcp+tls"), "vm1 (quic) inbound: {in1:#?}");
    // The default agent's metrics: its outbound streams went over TCP + TLS, none over QUIC.
    let text = m
        .lab
        .node("vm2")
        .sh_ok("curl -s http://127.0.0.1:15020/metrics");
    let series = |d: &str, t: &str| {
        metric(
            &text,
            &format!("causeway_agent_tunnel_streams_total{{direction=\"{d}\",transport=\"{t}\"}}"),
        )
    };
    assert_eq!(
        (series("outbound", "tcp"), series("outbound", "quic")),
        (Some(2.0), Some(0.0)),
        "{text}"
    );
    assert_eq!(series("inbound", "quic"), Some(2.0), "{text}");
}

/// Runs the reset client in `vm` against `host:port` in `mode`; returns what it printed.
fn reset_client(m: &Mesh, vm: &str, host: &str, port: u16, mode: &str) -> String {
    let out = m
        .lab
        .node(vm)
        .cmd("python3")
        .args(["-c", RESET_CLIENT_PY, host, &port.to_string(), mode])
        .output()
        .unwrap();
    assert!(out.status.success(), "reset client: {}", describe(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A reset at either end arrives as a reset at the other end (not as a clean end of
/// stream), over QUIC and over the TCP + TLS fallback (the client's agent set to QUIC);
/// a silent connection is reset at both ends after the idle timeout.
#[test]
fn resets_and_idle_timeouts_travel_end_to_end() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    let node2 = m.lab.node("vm2").clone();
    let srv = m.reset_server("vm2");
    m.agent("vm2", &s2);
    let cfg = m.root.join("vm1.toml");
    std::fs::write(
        &cfg,
        "[dataplane]\nidle_timeout = \"3s\"\ntunnel_transport = \"quic\"\n",
    )
    .unwrap();
    let mut a1 = m.agent_with("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
    let vm1 = m.lab.node("vm1").clone();
    let vm2_addr = node2.addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    let server_saw = |m: &Mesh, n: usize| {
        let start = std::time::Instant::now();
        loop {
            let log = m.procs[srv].log();
            let ends: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with("server saw"))
                .collect();
            if ends.len() >= n {
                return ends[n - 1].to_owned();
            }
            assert!(
                start.elapsed() < WAIT,
                "the server did not report how connection {n} ended\n{}",
                m.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for (transport, round) in [("quic", 0usize), ("tcp+tls", 1)] {
        let before = m.procs[a1].log().len();
        if transport == "tcp+tls" {
            // A fresh agent with the tunnel's UDP dropped (a pooled QUIC connection would
            // otherwise live on until its idle timeout).
            m.procs[a1].stop();
            vm1.sh_ok("iptables -A OUTPUT -p udp --dport 15008 -j DROP");
            a1 = m.agent_with("vm1", &s1, &["--config", cfg.to_str().unwrap()]);
            wait_routed(&s1, "default/web", &vm2_addr);
        }
        assert_eq!(
            reset_client(&m, "vm1", &vip, 8080, "rst"),
            "client saw reset",
            "{transport}: server reset\n{}",
            m.logs()
        );
        assert_eq!(reset_client(&m, "vm1", &vip, 8080, "abort"), "client reset");
        assert_eq!(
            server_saw(&m, 2 * round + 1),
            "server saw reset",
            "{transport}: client reset\n{}",
            m.logs()
        );
        // Idle: nothing moves for 3 s; both ends are reset by the agents.
        assert_eq!(
            reset_client(&m, "vm1", &vip, 8080, "wait"),
            "client saw reset",
            "{transport}: idle\n{}",
            m.logs()
        );
        assert_eq!(
            server_saw(&m, 2 * round + 2),
            "server saw reset",
            "{transport}: idle"
        );
        let log = m.procs[a1].log();
        let used: Vec<&str> = log[before..]
            .lines()
            .filter(|l| l.contains("outbound via tunnel"))
            .collect();
        assert!(
            used.len() == 3
                && used
                    .iter()
                    .all(|l| l.contains(&format!("transport={transport} "))
                        || l.ends_with(&format!("transport={transport}"))),
            "every connection of this round used {transport}: {used:#?}"
        );
        // Each ended for its own reason (not all by the idle timeout): the server's reset,
        // the client's reset, silence.
        let ends: Vec<&str> = log[before..]
            .lines()
            .filter(|l| l.contains("outbound connection done"))
            .filter_map(|l| l.split("end=").nth(1))
            .collect();
        assert_eq!(ends, ["ResetB", "ResetA", "Idle"], "{transport}");
    }
}

#[test]
fn strict_mode_refuses_off_host_plaintext_but_not_the_tunnel() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    let cfg = m.root.join("vm2.toml");
    std::fs::write(&cfg, "[dataplane]\ninbound_mode = \"strict\"\n").unwrap();
    m.agent_with("vm2", &s2, &["--config", cfg.to_str().unwrap()]);
    m.agent("vm1", &s1);
    let vm2 = m.lab.node("vm2").clone();
    let vm2_addr = vm2.addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    wait_for("vm2's STRICT rule for its port 8080", WAIT, || {
        std::fs::read_to_string(s2.join("capture.rules"))
            .ok()?
            .contains("--dport 8080 -j REJECT")
            .then_some(())
    });
    // Straight to the application port from a host without an agent: refused.
    let out = m.client_output("plain", &vm2_addr, 8080, "plaintext");
    assert!(
        !out.status.success(),
        "STRICT let plaintext in: {}",
        describe(&out)
    );
    // Through the mesh: fine.
    let out = m.client("vm1", &vip, 8080, "via-tunnel");
    assert!(
        out.starts_with("peer=127.0.0.1 name=vm2\n") && out.ends_with("via-tunnel"),
        "{out:?}"
    );
    let (ok, text) = m.doctor("vm2", &s2);
    assert!(ok, "{text}");
}

#[test]
fn certificate_rotation_during_a_long_lived_connection_keeps_it() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    m.agent("vm2", &s2);
    let a1 = m.agent("vm1", &s1);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    let go = m.root.join("go");
    let client = m
        .lab
        .node("vm1")
        .cmd("python3")
        .args([
            "-c",
            LONG_CLIENT_PY,
            &vip,
            "8080",
            "before-rotation;",
            go.to_str().unwrap(),
            "after-rotation",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let opened = go.with_extension("open");
    wait_for("the long-lived connection to carry bytes", WAIT, || {
        opened.exists().then_some(())
    });
    // Renew both VMs' certificates while the connection is open.
    let before = (cert_serial(&s1), cert_serial(&s2));
    for (vm, state) in [("vm1", &s1), ("vm2", &s2)] {
        let out = m
            .lab
            .node(vm)
            .cmd(bin("causeway-agent"))
            .args(["renew", "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "renew {vm}: {}", describe(&out));
    }
    assert_ne!(before, (cert_serial(&s1), cert_serial(&s2)));
    wait_for("vm1's tunnel to take the renewed certificate", WAIT, || {
        m.procs[a1]
            .log()
            .contains("tunnel uses the renewed certificate")
            .then_some(())
    });
    std::fs::write(&go, "").unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.starts_with("peer=127.0.0.1 name=vm2\n")
            && text.ends_with("before-rotation;after-rotation"),
        "{text:?}"
    );
    // New connections work after the rotation.
    let out = m.client("vm1", &vip, 8080, "new-connection");
    assert!(out.ends_with("new-connection"), "{out:?}");
}

fn cert_serial(state: &Path) -> String {
    causeway_tests::cert_of(state).serial
}

#[test]
fn strict_group_mode_is_pushed_to_the_agent() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "secure",
        "--namespace",
        "default",
        "--service-account",
        "secure",
        "--service",
        "secure",
        "--port",
        "tcp:8080",
        "--mtls",
        "strict",
    ]);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "secure");
    m.server("vm2", 8080);
    // No local setting: the mode comes from the group, through the controller.
    m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/secure", &vm2_addr);
    wait_for("vm2's STRICT rule from its group", WAIT, || {
        std::fs::read_to_string(s2.join("capture.rules"))
            .ok()?
            .contains("--dport 8080 -j REJECT")
            .then_some(())
    });
    let out = m.client_output("plain", &vm2_addr, 8080, "plaintext");
    assert!(
        !out.status.success(),
        "STRICT group let plaintext in: {}",
        describe(&out)
    );
    let out = m.client("vm1", &vip, 8080, "via-tunnel");
    assert!(out.ends_with("via-tunnel"), "{out:?}");
}

#[test]
fn strict_group_refuses_plaintext_egress_to_an_agentless_endpoint() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "secure",
        "--namespace",
        "default",
        "--service-account",
        "secure",
        "--service",
        "secure",
        "--port",
        "tcp:8080",
        "--mtls",
        "strict",
    ]);
    m.server("plain", 9090);
    let s1 = m.join("vm1", "secure");
    m.agent("vm1", &s1);
    let plain_addr = m.lab.node("plain").addr.to_string();
    let plain_vip = wait_routed(&s1, "ext/plain", &plain_addr);
    // vm1's own workload is pushed as STRICT before the refusal can be observed.
    let vm1_addr = m.lab.node("vm1").addr.to_string();
    wait_for("vm1's workload pushed as STRICT", WAIT, || {
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s1.join("config.json")).ok()?).ok()?;
        cfg["services"]["default/secure"]["endpoints"]
            .as_object()?
            .values()
            .any(|e| e["address"] == vm1_addr.as_str() && e["mtls_strict"] == true)
            .then_some(())
    });
    let out = m.client_output("vm1", &plain_vip, 9090, "must-not-leave-in-plaintext");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("name=plain"),
        "a STRICT group's agent sent plaintext to an agentless endpoint: {}",
        describe(&out)
    );
}

/// Removing an agent (`causewayctl agent remove`: its certificate goes on the deny list
/// pushed to the others) cuts the connections it has open through the mesh, both ways: a
/// server agent resets the streams it accepted from the removed client agent, and a client
/// agent resets its streams to a removed server agent. Other connections are not touched.
#[test]
fn removing_an_agent_cuts_its_open_connections_both_ways() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    let s3 = m.join("plain", "client");
    let node2 = m.lab.node("vm2").clone();
    m.reset_server("vm2");
    let a2 = m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    let a3 = m.agent("plain", &s3);
    let vm2_addr = node2.addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    wait_routed(&s3, "default/web", &vm2_addr);
    // One waiting connection from each client VM.
    let waiting = |vm: &str| {
        m.lab
            .node(vm)
            .cmd("python3")
            .args(["-c", RESET_CLIENT_PY, &vip, "8080", "wait"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut from_vm1 = waiting("vm1");
    let mut from_plain = waiting("plain");
    wait_for("both connections to reach vm2's agent", WAIT, || {
        (m.procs[a2].log().matches("inbound tunnel stream").count() >= 2).then_some(())
    });
    let ended = |c: &mut std::process::Child, what: &str, m: &Mesh| -> String {
        let start = std::time::Instant::now();
        while c.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < WAIT, "{what} was not cut\n{}", m.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut out).unwrap();
        out.trim().to_owned()
    };
    // The client agent in vm1 is removed: vm2's agent cuts the stream it accepted from it.
    m.ctl_ok(&["agent", "remove", &causeway_tests::agent_id(&s1)]);
    assert_eq!(
        ended(&mut from_vm1, "vm1's connection", &m),
        "client saw reset"
    );
    // vm2's agent closed the connection (its stream was cut, or ended with it: the two
    // happen at once, either may be first).
    wait_for(
        "vm2's agent to close the removed client's connection",
        WAIT,
        || {
            m.procs[a2]
                .log()
                .contains("tunnel connection closed: the peer's certificate is on the deny list")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        from_plain.try_wait().unwrap().is_none(),
        "the other client's connection was cut too\n{}",
        m.logs()
    );
    // The server agent in vm2 is removed: the client agent in "plain" cuts its stream.
    m.ctl_ok(&["agent", "remove", &causeway_tests::agent_id(&s2)]);
    assert_eq!(
        ended(&mut from_plain, "plain's connection", &m),
        "client saw reset"
    );
    wait_for("plain's agent to close its connection to vm2", WAIT, || {
        m.procs[a3]
            .log()
            .contains("tunnel connection closed: the peer's certificate is on the deny list")
            .then_some(())
    });
}

/// Writes `yaml` to a file under the mesh's root and applies it with `causewayctl apply`.
fn apply(m: &Mesh, name: &str, yaml: &str) -> String {
    let f = m.root.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    m.ctl_ok(&["apply", "-f", f.to_str().unwrap()])
}

/// Waits until the agent of `state` holds exactly the policy resources `keys`.
fn wait_policies(state: &Path, keys: &[&str]) {
    wait_for(&format!("policies {keys:?} at the agent"), WAIT, || {
        let held: Vec<String> = config(state).policies.keys().cloned().collect();
        (held == keys).then_some(())
    });
    // The tunnel follows the applied state within its half-second poll.
    std::thread::sleep(Duration::from_millis(1200));
}

fn allow_policy(principals: &[&str]) -> String {
    let list = principals
        .iter()
        .map(|p| format!("\"causeway.local/ns/default/sa/{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-clients, namespace: default}}\nspec:\n  selector:\n    matchLabels: {{causeway.io/group: web}}\n  rules:\n  - from:\n    - source:\n        principals: [{list}]\n"
    )
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"causeway.local/ns/default/sa/client\"]\n";

/// Three agent VMs: web (vm2), client (vm1) and other (plain, in group `other`).
/// AuthorizationPolicy admits the principals it names, by VIP and by address; a DENY
/// applied while connections are open cuts the denied client's and leaves the other's;
/// deleting it restores access; the decisions are counted on vm2's metrics endpoint.
#[test]
fn authorization_policy_admits_named_clients_and_cuts_on_deny() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "other",
        "--namespace",
        "default",
        "--service-account",
        "other",
    ]);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    let s3 = m.join("plain", "other");
    m.server("vm2", 8080);
    let a2 = m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    m.agent("plain", &s3);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    wait_routed(&s3, "default/web", &vm2_addr);
    let refused = |m: &Mesh, vm: &str, host: &str, marker: &str| {
        let out = m.client_output(vm, host, 8080, marker);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains(marker),
            "{vm} → {host}: a denied connection reached the application: {text:?}\n{}",
            m.logs()
        );
    };

    apply(&m, "allow-client", &allow_policy(&["client"]));
    wait_policies(&s2, &["AuthorizationPolicy/default/allow-clients"]);
    for host in [vip.as_str(), vm2_addr.as_str()] {
        let out = m.client("vm1", host, 8080, "allowed");
        assert!(out.ends_with("allowed"), "{out:?}");
        refused(&m, "plain", host, "not-named");
    }
    wait_for(
        "the denial in vm2's log, naming the policy's absence",
        WAIT,
        || {
            m.procs[a2]
                .log()
                .contains("tunnel stream denied by policy")
                .then_some(())
        },
    );
    // `why` shows what vm2's agent really refused from that source (reported over the
    // push channel within a few seconds).
    let plain_addr = m.lab.node("plain").addr.to_string();
    let start = std::time::Instant::now();
    let why = loop {
        let v: Value = serde_json::from_str(&m.ctl_ok(&[
            "why", "--from", "other", "--to", "web:8080", "--output", "json",
        ]))
        .unwrap();
        if v["recent_denials"].as_array().is_some_and(|d| d.len() >= 2) {
            break v;
        }
        assert!(
            start.elapsed() < WAIT,
            "vm2's refusals never reached `why`: {v}\nagents: {}\n{}",
            m.ctl_ok(&["agent", "list", "--output", "json"]),
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(why["decision"], "deny", "{why}");
    let d = &why["recent_denials"][0];
    assert_eq!(
        d["source_principal"], "spiffe://causeway.local/ns/default/sa/other",
        "{why}"
    );
    assert_eq!(d["source_address"], plain_addr.as_str(), "{why}");
    assert_eq!(d["policy"], "no-allow-match", "{why}");

    // Both clients allowed, each with an open connection; then the client is denied.
    apply(&m, "allow-both", &allow_policy(&["client", "other"]));
    wait_policies(&s2, &["AuthorizationPolicy/default/allow-clients"]);
    let long = |vm: &str, go: &Path| {
        m.lab
            .node(vm)
            .cmd("python3")
            .args([
                "-c",
                LONG_CLIENT_PY,
                &vip,
                "8080",
                "first;",
                go.to_str().unwrap(),
                "second",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (go1, go3) = (m.root.join("go1"), m.root.join("go3"));
    let from_vm1 = long("vm1", &go1);
    let from_plain = long("plain", &go3);
    wait_for("both long-lived connections to carry bytes", WAIT, || {
        (go1.with_extension("open").exists() && go3.with_extension("open").exists()).then_some(())
    });
    let t0 = std::time::Instant::now();
    apply(&m, "deny-client", DENY_CLIENT);
    wait_for(
        "vm2's agent to cut the denied client's stream",
        WAIT,
        || {
            m.procs[a2]
                .log()
                .contains("open tunnel stream cut: a policy change denies it")
                .then_some(())
        },
    );
    eprintln!(
        "open connection cut {:?} after `causewayctl apply` of the DENY policy returned",
        t0.elapsed()
    );
    std::fs::write(&go1, "").unwrap();
    std::fs::write(&go3, "").unwrap();
    let out1 = from_vm1.wait_with_output().unwrap();
    let out3 = from_plain.wait_with_output().unwrap();
    let text1 = String::from_utf8_lossy(&out1.stdout);
    let text3 = String::from_utf8_lossy(&out3.stdout);
    assert!(
        !text1.contains("second"),
        "the denied client's connection went on: {text1:?}\n{}",
        m.logs()
    );
    assert!(
        text3.ends_with("first;second"),
        "the other client's connection was disturbed: {text3:?} {}\n{}",
        describe(&out3),
        m.logs()
    );
    refused(&m, "vm1", &vip, "after-deny");
    let metrics = m
        .lab
        .node("vm2")
        .cmd("python3")
        .args([
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15020/metrics').read().decode())",
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(
            "causeway_agent_authz_decisions_total{decision=\"deny\",policy=\"default/deny-client\"}"
        ),
        "{metrics}"
    );
    // Deleting the DENY restores access.
    m.ctl_ok(&["delete", "ap", "deny-client", "-n", "default"]);
    wait_policies(&s2, &["AuthorizationPolicy/default/allow-clients"]);
    let out = m.client("vm1", &vip, 8080, "restored");
    assert!(out.ends_with("restored"), "{out:?}");
}

/// An AuthorizationPolicy on the source address of plaintext clients.
fn ip_policy(name: &str, action: &str, cidr: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector:\n    matchLabels: {{causeway.io/group: web}}\n  action: {action}\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{cidr}\"]\n"
    )
}

/// Whether the plaintext policy route of an agent (routing table 17239) is in `node`.
fn plaintext_route(node: &Node) -> bool {
    node.sh_ok("ip rule show").contains("lookup 17239")
}

/// Inbound plaintext through the agent (PERMISSIVE): a host without an agent ("plain")
/// reaches vm2's application through vm2's agent, which sees and passes on the client's
/// real address; principal rules refuse it (it has none), a matching `ipBlocks` rule
/// admits it, and a DENY on its address pushed while a plaintext connection is open cuts
/// that connection and leaves a mesh client's open connection alone. A killed agent's
/// TPROXY rules and policy route are removed by `causeway-agent cleanup`.
#[test]
fn plaintext_is_authorized_by_address_before_the_application_and_cut_on_deny() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    let a2 = m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    let vm2 = m.lab.node("vm2").clone();
    let vm2_addr = vm2.addr.to_string();
    let plain_addr = m.lab.node("plain").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    wait_for("vm2's TPROXY rule for its port 8080", WAIT, || {
        std::fs::read_to_string(s2.join("capture.rules"))
            .ok()?
            .contains(&format!(
                "-d {vm2_addr}/32 -p tcp -m tcp --dport 8080 -j TPROXY --on-port 15006"
            ))
            .then_some(())
    });
    assert!(plaintext_route(&vm2), "{}", vm2.sh_ok("ip rule show"));
    let (ok, text) = m.doctor("vm2", &s2);
    assert!(ok, "{text}");
    let refused = |m: &Mesh, marker: &str| {
        let out = m.client_output("plain", &vm2_addr, 8080, marker);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains(marker),
            "a denied plaintext connection reached the application: {text:?}\n{}",
            m.logs()
        );
    };

    // No policy: admitted through the agent; the application sees the client's address.
    let out = m.client("plain", &vm2_addr, 8080, "no-policy");
    assert!(
        out.starts_with(&format!("peer={plain_addr} name=vm2\n")) && out.ends_with("no-policy"),
        "{out:?}"
    );
    assert!(
        m.procs[a2].log().contains("inbound plaintext connection"),
        "the plaintext connection did not go through vm2's agent\n{}",
        m.logs()
    );

    // Principal rules never match plaintext: refused, and the mesh client still passes.
    apply(&m, "allow-client", &allow_policy(&["client"]));
    wait_policies(&s2, &["AuthorizationPolicy/default/allow-clients"]);
    refused(&m, "principal-only");
    assert!(
        m.procs[a2]
            .log()
            .contains("plaintext connection denied by policy"),
        "{}",
        m.logs()
    );
    let out = m.client("vm1", &vip, 8080, "mesh");
    assert!(out.ends_with("mesh"), "{out:?}");

    // A matching ipBlocks rule admits it, with its real address.
    apply(
        &m,
        "allow-plain",
        &ip_policy("allow-plain", "ALLOW", &format!("{plain_addr}/32")),
    );
    wait_policies(
        &s2,
        &[
            "AuthorizationPolicy/default/allow-clients",
            "AuthorizationPolicy/default/allow-plain",
        ],
    );
    let out = m.client("plain", &vm2_addr, 8080, "by-address");
    assert!(
        out.starts_with(&format!("peer={plain_addr} name=vm2\n")) && out.ends_with("by-address"),
        "{out:?}"
    );

    // Open connections: plaintext from "plain", through the mesh from vm1.
    let long = |vm: &str, host: &str, go: &Path| {
        m.lab
            .node(vm)
            .cmd("python3")
            .args([
                "-c",
                LONG_CLIENT_PY,
                host,
                "8080",
                "first;",
                go.to_str().unwrap(),
                "second",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (go1, go3) = (m.root.join("go1"), m.root.join("go3"));
    let from_vm1 = long("vm1", &vip, &go1);
    let from_plain = long("plain", &vm2_addr, &go3);
    wait_for("both long-lived connections to carry bytes", WAIT, || {
        (go1.with_extension("open").exists() && go3.with_extension("open").exists()).then_some(())
    });
    let t0 = std::time::Instant::now();
    apply(
        &m,
        "deny-plain",
        &ip_policy("deny-plain", "DENY", &format!("{plain_addr}/32")),
    );
    wait_for("vm2's agent to cut the plaintext connection", WAIT, || {
        m.procs[a2]
            .log()
            .contains("open plaintext connection cut: a policy change denies it")
            .then_some(())
    });
    eprintln!(
        "open plaintext connection cut {:?} after `causewayctl apply` of the DENY policy returned",
        t0.elapsed()
    );
    std::fs::write(&go1, "").unwrap();
    std::fs::write(&go3, "").unwrap();
    let out1 = from_vm1.wait_with_output().unwrap();
    let out3 = from_plain.wait_with_output().unwrap();
    let text1 = String::from_utf8_lossy(&out1.stdout);
    let text3 = String::from_utf8_lossy(&out3.stdout);
    assert!(
        !text3.contains("second"),
        "the denied plaintext connection went on: {text3:?}\n{}",
        m.logs()
    );
    assert!(
        text1.ends_with("first;second"),
        "the mesh client's connection was disturbed: {text1:?} {}\n{}",
        describe(&out1),
        m.logs()
    );
    refused(&m, "after-deny");

    // A killed agent leaves its rules and route; cleanup removes both.
    m.procs[a2].kill();
    assert!(!no_causeway_rules(&vm2) && plaintext_route(&vm2));
    let out = vm2
        .cmd(bin("causeway-agent"))
        .args(["cleanup", "--state-dir", s2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(no_causeway_rules(&vm2), "{}", vm2.sh_ok("iptables-save"));
    assert!(!plaintext_route(&vm2), "{}", vm2.sh_ok("ip rule show"));
}

/// PeerAuthentication STRICT for the namespace with a workload-level PERMISSIVE exception
/// on one port: plaintext from a host without an agent reaches only that port; the mesh
/// reaches both.
#[test]
fn peer_authentication_strict_namespace_with_a_permissive_port() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "multi",
        "--namespace",
        "default",
        "--service-account",
        "multi",
        "--service",
        "multi",
        "--port",
        "tcp:8080",
        "--port",
        "tcp-admin:9090",
    ]);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "multi");
    m.server("vm2", 8080);
    m.server_named("vm2", 9090, "admin", "0.0.0.0");
    let a2 = m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/multi", &vm2_addr);
    apply(
        &m,
        "peer",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec:\n  mtls: {mode: STRICT}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: multi-http, namespace: default}\nspec:\n  selector:\n    matchLabels: {causeway.io/group: multi}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n",
    );
    wait_for("vm2's STRICT rule for 9090 only", WAIT, || {
        let rules = std::fs::read_to_string(s2.join("capture.rules")).ok()?;
        (rules.contains("--dport 9090 -j REJECT") && !rules.contains("--dport 8080 -j REJECT"))
            .then_some(())
    });
    let rules = std::fs::read_to_string(s2.join("capture.rules")).unwrap();
    assert!(
        rules.contains("--dport 8080 -j TPROXY") && !rules.contains("--dport 9090 -j TPROXY"),
        "only the PERMISSIVE port is handed to the agent: {rules}"
    );
    // Through vm2's agent (authorized there), with the client's address kept.
    let out = m.client("plain", &vm2_addr, 8080, "plaintext-ok");
    assert!(
        out.starts_with(&format!("peer={} name=vm2\n", m.lab.node("plain").addr))
            && out.ends_with("plaintext-ok"),
        "{out:?}"
    );
    assert!(
        m.procs[a2].log().contains("inbound plaintext connection"),
        "{}",
        m.logs()
    );
    let out = m.client_output("plain", &vm2_addr, 9090, "plaintext-refused");
    assert!(
        !out.status.success(),
        "STRICT port 9090 let plaintext in: {}",
        describe(&out)
    );
    for port in [8080, 9090] {
        let out = m.client("vm1", &vip, port, "via-tunnel");
        assert!(out.ends_with("via-tunnel"), "{port}: {out:?}");
    }
}

/// Policies in the agent's disk cache are enforced from the start: vm2's agent is
/// restarted while the controller is down, and the client vm1 (whom the cached ALLOW
/// policy does not name) is still refused, while a named client would pass.
#[test]
fn cached_policies_are_enforced_after_an_agent_restart_with_the_controller_down() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    let a2 = m.agent("vm2", &s2);
    let a1 = m.agent("vm1", &s1);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    let out = m.client("vm1", &vip, 8080, "before-policy");
    assert!(out.ends_with("before-policy"), "{out:?}");
    apply(&m, "allow-other", &allow_policy(&["other"]));
    wait_policies(&s2, &["AuthorizationPolicy/default/allow-clients"]);
    let refused = |m: &Mesh, marker: &str| {
        let out = m.client_output("vm1", &vip, 8080, marker);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains(marker),
            "a connection the cached policy denies reached the application: {text:?}\n{}",
            m.logs()
        );
    };
    refused(&m, "with-controller");
    // The controller goes away (procs[0]), then both agents restart from their caches
    // (vm1 too, so that it dials the new vm2 agent instead of reusing its pooled
    // connection to the old one).
    m.procs[0].kill();
    m.procs[a1].stop();
    m.procs[a2].stop();
    // The agent's log file is appended to: look only at what the restarted one writes.
    let before = m.procs[a2].log().len();
    let a2 = m.agent("vm2", &s2);
    let log2 = m.procs[a2].log.clone();
    let since_restart =
        move || std::fs::read_to_string(&log2).unwrap_or_default()[before..].to_owned();
    let since = since_restart.clone();
    m.procs[a2].wait_for("vm2's agent serving from its cache", WAIT, || {
        (since().contains("data plane listening")
            && std::fs::read_to_string(s2.join("capture.rules")).is_ok())
        .then_some(())
    });
    m.agent("vm1", &s1);
    wait_routed(&s1, "default/web", &vm2_addr);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !since_restart().contains("connected to the controller"),
        "the controller was supposed to be down\n{}",
        m.logs()
    );
    refused(&m, "controller-down");
    assert!(
        since_restart().contains("tunnel stream denied by policy"),
        "vm2's restarted agent did not refuse by policy\n{}",
        m.logs()
    );
}

/// Drain on stop: SIGTERM to the server's agent while a proxied connection is open. The
/// agent stops accepting, the open connection finishes its exchange (the agent logs that
/// every connection finished, not that the drain timed out), and the agent exits. Its
/// peers are told the tunnel connection is closed: after the server's agent starts again,
/// the client's agent dials a new connection at once (before this fix its pooled QUIC
/// connection to the old process took new streams that nobody answered until it timed
/// out) and a new connection goes through.
#[test]
fn sigterm_drains_open_connections_and_peers_redial_the_restarted_agent() {
    let mut m = Mesh::new();
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "web");
    m.server("vm2", 8080);
    // A long drain: the test sees the connection finish, not the timeout.
    let cfg = m.root.join("drain.toml");
    std::fs::write(&cfg, "[dataplane]\ndrain_timeout = \"60s\"\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let a2 = m.agent_with("vm2", &s2, &["--config", &cfg]);
    let a1 = m.agent("vm1", &s1);
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/web", &vm2_addr);
    // A first connection: vm1's agent now holds a pooled tunnel connection to vm2's.
    let out = m.client("vm1", &vip, 8080, "warm-up");
    assert!(out.ends_with("warm-up"), "{out:?}");
    let go = m.root.join("go");
    let client = m
        .lab
        .node("vm1")
        .cmd("python3")
        .args([
            "-c",
            LONG_CLIENT_PY,
            &vip,
            "8080",
            "before-stop;",
            go.to_str().unwrap(),
            "during-drain",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let opened = go.with_extension("open");
    wait_for("the long-lived connection to carry bytes", WAIT, || {
        opened.exists().then_some(())
    });
    m.procs[a2].terminate();
    wait_for("vm2's agent to drain", WAIT, || {
        m.procs[a2].log().contains("draining").then_some(())
    });
    std::fs::write(&go, "").unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", describe(&out), m.logs());
    assert!(
        text.starts_with("peer=127.0.0.1 name=vm2\n") && text.ends_with("before-stop;during-drain"),
        "the open connection did not complete during the drain: {text:?}\n{}",
        m.logs()
    );
    let status = wait_for("vm2's agent to exit", WAIT, || m.procs[a2].exited());
    assert!(status.success(), "{status}\n{}", m.procs[a2].log());
    let log = m.procs[a2].log();
    assert!(
        log.contains("drained: every proxied connection finished")
            && !log.contains("drain timeout"),
        "{log}"
    );
    // The stop deregistered vm2's workload; it comes back with the restarted agent.
    wait_for("vm1 to drop vm2's stopped endpoint", WAIT, || {
        let s = config(&s1);
        let gone = s
            .services
            .get("default/web")
            .is_none_or(|svc| svc.endpoints.values().all(|e| e.address != vm2_addr));
        gone.then_some(())
    });
    m.agent_with("vm2", &s2, &["--config", &cfg]);
    wait_routed(&s1, "default/web", &vm2_addr);
    let out = m.client("vm1", &vip, 8080, "after-restart");
    assert!(out.ends_with("after-restart"), "{out:?}\n{}", m.logs());
    assert!(
        m.procs[a1]
            .log()
            .contains("pooled tunnel connection closed; dialling again"),
        "vm1's agent did not see its pooled connection to the stopped agent closed:\n{}",
        m.procs[a1].log()
    );
}

/// HTTP/1.1 server on every port in argv: answers `port=<p> path=<path> hop=<X-Causeway-Hop
/// or ->` with keep-alive, and prints `served <port> <path>` per request.
const HTTP_SERVER_PY: &str = r#"
import sys, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        port = self.server.server_address[1]
        body = ("port=%d path=%s hop=%s\n" % (port, self.path, self.headers.get("X-Causeway-Hop", "-"))).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
        print("served %d %s" % (port, self.path), flush=True)
    def log_message(self, *a): pass
for p in sys.argv[1:]:
    srv = ThreadingHTTPServer(("0.0.0.0", int(p)), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
threading.Event().wait()
"#;

/// HTTP/1.1 client: argv[3] GET requests `/r<i>` on one keep-alive connection to
/// argv[1]:argv[2], each with a hop-by-hop header `X-Causeway-Hop` (named in `Connection`,
/// so an HTTP proxy drops it and a splice does not). Prints `<status> <body>` per request,
/// then how many distinct client sockets were used.
const HTTP_CLIENT_PY: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
socks = set()
for i in range(int(sys.argv[3])):
    c.request("GET", "/r%d" % i, headers={"Connection": "keep-alive, X-Causeway-Hop", "X-Causeway-Hop": "1"})
    r = c.getresponse()
    body = r.read().decode().strip()
    socks.add(c.sock.getsockname())
    print("%d %s" % (r.status, body))
print("connections=%d" % len(socks))
"#;

/// Server-speaks-first client: reads the server's first line before sending anything,
/// then sends argv[3], half-closes and prints everything received.
const BANNER_CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
b = b""
while b"\n" not in b:
    d = c.recv(65536)
    if not d: break
    b += d
c.sendall(sys.argv[3].encode()); c.shutdown(socket.SHUT_WR)
while True:
    d = c.recv(65536)
    if not d: break
    b += d
sys.stdout.write(b.decode())
"#;

/// Ports by name through two agents (issue 20): `http:8080` is proxied as HTTP at both
/// ends (keep-alive: several requests on one client connection, each reaching the app);
/// `tcp-web:8081` is spliced untouched (a server-speaks-first banner works, and HTTP on a
/// `tcp-http:8084` port keeps its hop-by-hop header: no proxy parsed it); the undeclared
/// `web:8082` carrying HTTP is detected and proxied (its hop-by-hop header is dropped); an
/// HTTP port whose application is down (`http-down:8083`) gets 503 from the agent.
#[test]
fn http_ports_are_proxied_tcp_ports_spliced_and_undeclared_http_detected() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "shop",
        "--namespace",
        "default",
        "--service-account",
        "shop",
        "--service",
        "shop",
        "--port",
        "http:8080",
        "--port",
        "tcp-web:8081",
        "--port",
        "web:8082",
        "--port",
        "http-down:8083",
        "--port",
        "tcp-http:8084",
    ]);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "shop");
    let vm2 = m.lab.node("vm2").clone();
    let http = Proc::spawn(
        &vm2,
        &m.root.join("vm2.http-server.log"),
        "python3",
        &["-c", HTTP_SERVER_PY, "8080", "8082", "8084"],
    );
    m.procs.push(http);
    let http_log = m.procs.len() - 1;
    m.server("vm2", 8081);
    wait_for("the HTTP test server to listen", WAIT, || {
        vm2.sh("ss -ltn | grep -q ':8084 '")
            .status
            .success()
            .then_some(())
    });
    m.agent("vm2", &s2);
    m.agent("vm1", &s1);
    let vm2_addr = vm2.addr.to_string();
    let vip = wait_routed(&s1, "default/shop", &vm2_addr);
    let http_get = |port: u16, n: usize| -> String {
        let out = m
            .lab
            .node("vm1")
            .cmd("python3")
            .args([
                "-c",
                HTTP_CLIENT_PY,
                &vip,
                &port.to_string(),
                &n.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "HTTP client → {vip}:{port}: {}\n{}",
            describe(&out),
            m.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // (a) Keep-alive through both HTTP proxies: 5 requests, one client connection.
    let out = http_get(8080, 5);
    let want: String = (0..5)
        .map(|i| format!("200 port=8080 path=/r{i} hop=-\n"))
        .collect::<String>()
        + "connections=1\n";
    assert_eq!(out, want, "{}", m.logs());
    let served = m.procs[http_log].log();
    for i in 0..5 {
        assert!(served.contains(&format!("served 8080 /r{i}\n")), "{served}");
    }

    // (b) A declared TCP port is spliced unread: the server speaks first.
    let out = m
        .lab
        .node("vm1")
        .cmd("python3")
        .args(["-c", BANNER_CLIENT_PY, &vip, "8081", "after-banner"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", describe(&out), m.logs());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        "peer=127.0.0.1 name=vm2\nafter-banner",
        "{}",
        m.logs()
    );
    // ... and HTTP on a declared TCP port is not parsed: the hop-by-hop header arrives.
    let out = http_get(8084, 2);
    assert_eq!(
        out,
        "200 port=8084 path=/r0 hop=1\n200 port=8084 path=/r1 hop=1\nconnections=1\n",
        "{}",
        m.logs()
    );

    // (c) An undeclared port carrying HTTP is detected and proxied.
    let out = http_get(8082, 3);
    assert_eq!(
        out,
        "200 port=8082 path=/r0 hop=-\n200 port=8082 path=/r1 hop=-\n200 port=8082 path=/r2 hop=-\nconnections=1\n",
        "{}",
        m.logs()
    );

    // (d) The application of an HTTP port is down: 503 from the agent, not a reset.
    let out = http_get(8083, 1);
    assert!(out.starts_with("503 "), "{out:?}\n{}", m.logs());
}
